//! Time per layer (forward, backward) of the `accelerate` conv net on random inputs.
//!
//! `cargo run --release -p bnlab --example layer_times -- [variant] [threads] [steps]`
//! (defaults bn-baseline, 2, 200). Prints the median µs of each layer's forward and backward.

use bnlab::driver::Variant as _;
use bnlab::engine::{Layer, Mode};
use bnlab::experiments::accelerate::{build, Settings, Variant};
use std::time::Instant;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let variant = args.get(1).map_or("bn-baseline", |s| s.as_str());
    let threads: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
    let steps: usize = args.get(3).map_or(Ok(200), |s| s.parse())?;
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    let v = Variant::from_name(variant).ok_or_else(|| anyhow::anyhow!("unknown variant {variant}"))?;
    let settings = Settings::new(std::env::temp_dir());
    let batch = 64;
    let mut net = build(&settings, v, 28, 28, 10)?;
    let layers: &mut Vec<Box<dyn Layer>> = &mut net.layers;
    // acts[i] is the input of layer i; acts[n] the output.
    let mut acts: Vec<Vec<f32>> = vec![(0..batch * 784).map(|i| ((i * 7919) % 255) as f32 / 255.0).collect()];
    for l in layers.iter() {
        acts.push(vec![0.0; batch * l.output_size()]);
    }
    let n = layers.len();
    let (mut fwd, mut bwd) = (vec![Vec::new(); n], vec![Vec::new(); n]);
    for _ in 0..steps {
        for i in 0..n {
            let (a, b) = acts.split_at_mut(i + 1);
            let t = Instant::now();
            layers[i].forward(&a[i], batch, &mut b[0], Mode::Train)?;
            fwd[i].push(t.elapsed().as_secs_f64() * 1e6);
        }
        let mut dy: Vec<f32> = acts[n].iter().map(|v| v * 1e-2).collect();
        for i in (0..n).rev() {
            let mut dx = vec![0.0; batch * layers[i].input_size()];
            let t = Instant::now();
            layers[i].backward(&acts[i], &acts[i + 1], &dy, batch, (i > 0).then_some(&mut dx[..]))?;
            bwd[i].push(t.elapsed().as_secs_f64() * 1e6);
            dy = dx;
        }
    }
    let (mut tf, mut tb) = (0.0, 0.0);
    for i in 0..n {
        let (f, b) = (median(&mut fwd[i]), median(&mut bwd[i]));
        (tf, tb) = (tf + f, tb + b);
        println!("{:<24} fwd {f:8.0} µs  bwd {b:8.0} µs", layers[i].name());
    }
    println!(
        "{:<24} fwd {tf:8.0} µs  bwd {tb:8.0} µs  total {:.2} ms",
        "sum",
        (tf + tb) / 1e3
    );
    Ok(())
}
