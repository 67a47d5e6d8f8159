//! How exact the `f32` kernels are: training forward y and backward dx against the f64 reference
//! (`batchnorm::reference`, naive formulas from the paper evaluated on the same `f32` values
//! widened): the largest error in units of ε_f32·S, where S is the magnitude of the output's
//! terms, counting the statistics at 1 standard deviation (|γ|·(|x̂| + 1) + |β| for y;
//! |γ|/σ·(|dy| + (1 + |x̂|)·(mean|dy| + mean|dy·x̂|)) for dx, as the tests' tolerances do), and
//! the median error in ulps of the exact result, beside the same
//! transform written the way PyTorch's CPU kernels do it (y = x·a + b with a = γ/√(σ²+ε),
//! b = β − μ·a in f32, statistics exact), for data with mean 0 and with a mean large against the
//! spread.
//!
//! ```text
//! cargo run --release -p batchnorm --example precision
//! ```

use batchnorm::{batch_norm_backward, batch_norm_train, reference, Affine, Grads, Layout, View};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// Error of `got` against the exact `want`, in ulps of `want` rounded to f32.
fn ulps(got: f32, want: f64) -> f64 {
    let w = want as f32;
    let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
    (got as f64 - want).abs() / ulp.max(f32::MIN_POSITIVE as f64)
}

/// (max error / (ε_f32·scale), median error in ulps).
fn summary(got: &[f32], want: &[f64], scale: &[f64]) -> (f64, f64) {
    let eps = f32::EPSILON as f64;
    let worst = got
        .iter()
        .zip(want)
        .zip(scale)
        .map(|((&g, &w), &s)| (g as f64 - w).abs() / (eps * s))
        .fold(0.0, f64::max);

    let mut e: Vec<f64> = got.iter().zip(want).map(|(&g, &w)| ulps(g, w)).collect();
    e.sort_by(f64::total_cmp);
    (worst, e[e.len() / 2])
}

fn main() -> Result<(), batchnorm::Error> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    println!(
        "{:<6} {:<18} {:<16} {:>14} {:>14} {:>16}",
        "layout", "shape", "data", "y", "dx", "y as x·a+b"
    );
    println!("(each: largest error in ε_f32 of the terms' magnitude / median error in ulps)");
    for (layout, shape) in [
        (Layout::NC, vec![256, 4096]),
        (Layout::NHWC, vec![16, 14, 14, 256]),
        (Layout::NCHW, vec![16, 64, 28, 28]),
    ] {
        let g = layout.geometry(&shape)?;
        for (name, offset, spread) in [("N(0,1)", 0.0, 1.0), ("N(1e4,1e-2²)", 1e4, 1e-2)] {
            let x: Vec<f32> = (0..g.len())
                .map(|_| (offset + spread * rng.sample::<f64, _>(StandardNormal)) as f32)
                .collect();
            let dy: Vec<f32> = (0..g.len()).map(|_| rng.sample::<f32, _>(StandardNormal)).collect();
            let gamma: Vec<f32> = (0..g.channels).map(|_| rng.gen_range(0.5..2.0)).collect();
            let beta: Vec<f32> = (0..g.channels).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let wide = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
            let (xw, gw, bw) = (wide(&x), wide(&gamma), wide(&beta));
            let eps = 1e-5 * spread * spread;

            let mut y = vec![0.0f32; x.len()];
            let (_, saved) = batch_norm_train(View::new(&x, &shape, layout), Affine::new(&gamma, &beta), eps, &mut y)?;
            let (ry, rmean, rvar) = reference::forward_train(&g, &xw, &gw, &bw, eps);
            let mut dx = vec![0.0f32; x.len()];
            batch_norm_backward(
                View::new(&x, &shape, layout),
                &dy,
                &saved,
                Some(&gamma),
                Grads::dx(&mut dx),
            )?;
            let (rdx, _, _) = reference::backward_train(&g, &xw, &wide(&dy), &gw, eps);

            // Scales (see the module docs).
            let m = g.per_channel() as f64;
            let ch = |k: usize| (k / g.inner) % g.channels;
            let inv = |c: usize| 1.0 / (rvar[c] + eps).sqrt();
            let xhat = |k: usize| (xw[k] - rmean[ch(k)]) * inv(ch(k));
            let (mut mdy, mut mdyx) = (vec![0.0; g.channels], vec![0.0; g.channels]);
            for k in 0..x.len() {
                mdy[ch(k)] += (dy[k] as f64).abs() / m;
                mdyx[ch(k)] += (dy[k] as f64 * xhat(k)).abs() / m;
            }
            let sy: Vec<f64> = (0..x.len())
                .map(|k| gw[ch(k)].abs() * (xhat(k).abs() + 1.0) + bw[ch(k)].abs())
                .collect();
            let sdx: Vec<f64> = (0..x.len())
                .map(|k| {
                    let c = ch(k);
                    (gw[c] * inv(c)).abs() * ((dy[k] as f64).abs() + (1.0 + xhat(k).abs()) * (mdy[c] + mdyx[c]))
                })
                .collect();

            // PyTorch's CPU formula, with exact statistics.
            let y_ab: Vec<f32> = (0..x.len())
                .map(|k| {
                    let c = (k / g.inner) % g.channels;
                    let a = (gw[c] / (rvar[c] + eps).sqrt()) as f32;
                    let b = (bw[c] - rmean[c] * gw[c] / (rvar[c] + eps).sqrt()) as f32;
                    x[k] * a + b
                })
                .collect();

            let (ym, yq) = summary(&y, &ry, &sy);
            let (dm, dq) = summary(&dx, &rdx, &sdx);
            let (am, aq) = summary(&y_ab, &ry, &sy);
            println!(
                "{:<6} {:<18} {:<16} {:>7.2}/{:<6.2} {:>7.2}/{:<6.2} {:>9.1}/{:<6.1}",
                layout.name(),
                format!("{shape:?}").replace(' ', ""),
                name,
                ym,
                yq,
                dm,
                dq,
                am,
                aq
            );
        }
    }
    Ok(())
}
