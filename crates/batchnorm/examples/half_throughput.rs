//! Elements per second of the training forward and backward on `f32`, `bf16` and `f16` tensors
//! of one shape, side by side in one run (best of a few repetitions each): the half types move
//! half the bytes of `f32` through the same `f32` arithmetic.
//!
//! ```text
//! cargo run --release -p batchnorm --example half_throughput -- [N C H W] [repetitions]
//! ```

use batchnorm::{batch_norm_backward, batch_norm_train, bf16, f16, Affine, Element, Grads, Layout, View};
use std::time::Instant;

/// Best-of-`reps` seconds of the training forward and of the backward (dx, dγ, dβ) on `T`.
fn time<T: Element<Param = f32>>(shape: &[usize], reps: usize) -> (f64, f64) {
    let n: usize = shape.iter().product();
    let c = shape[1];
    let x: Vec<T> = (0..n).map(|i| T::from_f64((i as f64 * 0.37).sin())).collect();
    let dy: Vec<T> = (0..n).map(|i| T::from_f64((i as f64 * 0.11).cos())).collect();
    let (gamma, beta) = (vec![1.5f32; c], vec![0.25f32; c]);
    let v = View::new(&x, shape, Layout::NCHW);
    let (mut y, mut dx) = (vec![T::from_f64(0.0); n], vec![T::from_f64(0.0); n]);
    let (mut dg, mut db) = (vec![0f32; c], vec![0f32; c]);
    let (mut fwd, mut bwd) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..reps {
        let t = Instant::now();
        let (_, saved) = batch_norm_train(v, Affine::new(&gamma, &beta), 1e-5, &mut y).unwrap();
        fwd = fwd.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let grads = Grads::new(&mut dx, &mut dg, &mut db);
        batch_norm_backward(v, &dy, &saved, Some(&gamma), grads).unwrap();
        bwd = bwd.min(t.elapsed().as_secs_f64());
    }
    (fwd, bwd)
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let shape = if args.len() >= 4 {
        args[..4].to_vec()
    } else {
        vec![32, 64, 56, 56]
    };
    let reps = args.get(4).copied().unwrap_or(5);
    let n: usize = shape.iter().product();
    println!(
        "NCHW {shape:?}, best of {reps}, {} rayon threads",
        rayon::current_num_threads()
    );
    for (name, (fwd, bwd)) in [
        ("f32", time::<f32>(&shape, reps)),
        ("bf16", time::<bf16>(&shape, reps)),
        ("f16", time::<f16>(&shape, reps)),
    ] {
        let rate = |s: f64| n as f64 / s / 1e9;
        println!(
            "{name:>5}: forward {:.3} ms ({:.2} Gelem/s), backward {:.3} ms ({:.2} Gelem/s)",
            fwd * 1e3,
            rate(fwd),
            bwd * 1e3,
            rate(bwd)
        );
    }
}
