//! batchnorm-candle's `BatchNorm` against `candle_nn::BatchNorm` (CPU, f32): training forward,
//! training forward + backward, and one SGD step of a small MLP with either layer.
//!
//! ```text
//! cargo run --release -p batchnorm-candle --example bench_candle [-- [--quick] [FILTER]]
//! ```
//!
//! Each figure is the median of all timed runs of a case: two blocks per layer, run in the order
//! ours, candle-nn's, ours, candle-nn's; each block is one warm-up run and then 3 to 10 runs
//! (until about 1.5 s is used; `--quick`: one block of 1 to 3). Both layers run in one process on
//! the same inputs, each on its own variables; candle's CPU ops and the kernels share the global
//! rayon pool.

use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Result, Tensor, Var};
use candle_nn::{Linear, Module, Optimizer, VarBuilder, VarMap, SGD};

/// Median wall times of `a` and `b` in milliseconds. Each is timed in blocks of back-to-back
/// runs (after a warm-up run, so that the allocator and caches are in the steady state of that
/// layer alone), in the order a, b, a, b: two blocks each, so that slow drifts in the load from
/// other processes fall on both alike.
fn median_pair(
    quick: bool,
    mut a: impl FnMut() -> Result<()>,
    mut b: impl FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    let (rounds, min_reps, max_reps, budget) = if quick { (1, 1, 3, 0.5) } else { (2, 3, 10, 1.5) };
    let block = |f: &mut dyn FnMut() -> Result<()>, v: &mut Vec<f64>| -> Result<()> {
        f()?; // warm-up
        let (start, first) = (Instant::now(), v.len());
        while v.len() - first < min_reps || (v.len() - first < max_reps && start.elapsed().as_secs_f64() < budget) {
            let t = Instant::now();
            f()?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    };
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        block(&mut a, &mut ta)?;
        block(&mut b, &mut tb)?;
    }
    Ok((median(ta), median(tb)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Deterministic pseudo-random values in [lo, hi).
fn values(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

fn tensor(seed: u64, shape: &[usize], lo: f32, hi: f32) -> Result<Tensor> {
    Tensor::from_vec(values(seed, shape.iter().product(), lo, hi), shape, &Device::Cpu)
}

/// The two layers over `c` channels, each on its own variables (γ = 1, β = 0 initially).
fn layers(c: usize) -> Result<(Box<dyn ModuleT>, Box<dyn ModuleT>)> {
    let dev = Device::Cpu;
    let cfg = candle_nn::BatchNormConfig::default();
    let ours = batchnorm_candle::batch_norm(c, cfg, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev))?;
    let theirs = candle_nn::batch_norm(c, cfg, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev))?;
    Ok((Box::new(ours), Box::new(theirs)))
}

/// Training forward (x not tracked).
fn fwd(bn: &dyn ModuleT, x: &Tensor) -> Result<()> {
    bn.forward_t(x, true).map(drop)
}

/// Training forward and backward with dy = 1 (candle seeds `y.backward()` with ones): the
/// layer's own cost plus candle's bookkeeping for one op (for candle-nn: for each of its ops).
fn fwd_bwd(bn: &dyn ModuleT, x: &Tensor) -> Result<()> {
    bn.forward_t(x, true)?.backward().map(drop)
}

/// The same through a loss Σ y·w: adds the mul, the sum and their backward (candle computes a
/// gradient for w too), the same work on both sides.
fn fwd_bwd_loss(bn: &dyn ModuleT, x: &Tensor, w: &Tensor) -> Result<()> {
    (bn.forward_t(x, true)? * w)?.sum_all()?.backward().map(drop)
}

struct Row {
    case: String,
    ours: f64,
    theirs: f64,
}

impl Row {
    fn new(case: String, ours: f64, theirs: f64) -> Self {
        Row { case, ours, theirs }
    }
}

fn kernel_rows(shape: &[usize], quick: bool, rows: &mut Vec<Row>) -> Result<()> {
    let name = if shape.len() == 2 { "NC" } else { "NCHW" };
    let label = format!("{name} {shape:?}");
    let (ours, theirs) = layers(shape[1])?;
    let x = tensor(1, shape, -1.0, 3.0)?;
    let w = tensor(2, shape, -1.0, 1.0)?;
    let xv = Var::from_tensor(&x)?;

    let (o, t) = median_pair(quick, || fwd(&*ours, &x), || fwd(&*theirs, &x))?;
    rows.push(Row::new(format!("{label} forward-train"), o, t));
    let x = xv.as_tensor();
    let (o, t) = median_pair(quick, || fwd_bwd(&*ours, x), || fwd_bwd(&*theirs, x))?;
    rows.push(Row::new(format!("{label} forward+backward"), o, t));
    let (o, t) = median_pair(quick, || fwd_bwd_loss(&*ours, x, &w), || fwd_bwd_loss(&*theirs, x, &w))?;
    rows.push(Row::new(format!("{label} forward+backward of Σy·w"), o, t));
    Ok(())
}

/// 784-100-100-100-10 with batch norm before each sigmoid, softmax cross-entropy, SGD.
struct Mlp {
    hidden: Vec<(Linear, Box<dyn ModuleT>)>,
    out: Linear,
}

impl Mlp {
    fn new(ours: bool, varmap: &VarMap) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let cfg = candle_nn::BatchNormConfig::default();
        let mut hidden = Vec::new();
        for (i, (fan_in, fan_out)) in [(784, 100), (100, 100), (100, 100)].into_iter().enumerate() {
            let lin = candle_nn::linear(fan_in, fan_out, vb.pp(format!("fc{i}")))?;
            let bn: Box<dyn ModuleT> = if ours {
                Box::new(batchnorm_candle::batch_norm(fan_out, cfg, vb.pp(format!("bn{i}")))?)
            } else {
                Box::new(candle_nn::batch_norm(fan_out, cfg, vb.pp(format!("bn{i}")))?)
            };
            hidden.push((lin, bn));
        }
        let out = candle_nn::linear(100, 10, vb.pp("out"))?;
        Ok(Mlp { hidden, out })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (lin, bn) in &self.hidden {
            h = candle_nn::ops::sigmoid(&bn.forward_t(&lin.forward(&h)?, true)?)?;
        }
        self.out.forward(&h)
    }
}

/// One training step (forward, cross-entropy, backward, SGD update) of the MLP.
struct MlpRun {
    mlp: Mlp,
    sgd: SGD,
    x: Tensor,
    labels: Tensor,
}

impl MlpRun {
    fn new(ours: bool) -> Result<Self> {
        let varmap = VarMap::new();
        let mlp = Mlp::new(ours, &varmap)?;
        let sgd = SGD::new(varmap.all_vars(), 0.5)?;
        let x = tensor(3, &[60, 784], 0.0, 1.0)?;
        let labels = Tensor::from_vec((0..60u32).map(|i| (i * 7) % 10).collect::<Vec<_>>(), 60, &Device::Cpu)?;
        Ok(MlpRun { mlp, sgd, x, labels })
    }

    fn loss(&self) -> Result<Tensor> {
        candle_nn::loss::cross_entropy(&self.mlp.forward(&self.x)?, &self.labels)
    }

    /// `STEPS` steps (one step alone is too short to time well).
    fn steps(&mut self) -> Result<()> {
        for _ in 0..MLP_STEPS {
            let loss = self.loss()?;
            self.sgd.backward_step(&loss)?;
        }
        Ok(())
    }
}

const MLP_STEPS: usize = 20;

fn mlp_row(quick: bool) -> Result<Row> {
    let (mut ours, mut theirs) = (MlpRun::new(true)?, MlpRun::new(false)?);
    let before = ours.loss()?.to_scalar::<f32>()?;
    let (o, t) = {
        let (ro, rt) = (&mut ours, &mut theirs);
        median_pair(quick, move || ro.steps(), move || rt.steps())?
    };
    // Sanity: both models train (same initial weights are not shared, so compare each to itself).
    let after = ours.loss()?.to_scalar::<f32>()?;
    assert!(after.is_finite() && after < before, "loss {before} -> {after}");
    assert!(theirs.loss()?.to_scalar::<f32>()?.is_finite());
    let steps = MLP_STEPS as f64;
    Ok(Row::new(
        "MLP 784-100-100-100-10 SGD step, batch 60".into(),
        o / steps,
        t / steps,
    ))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    // Any other argument selects the cases whose name contains it ("MLP", "NCHW", "[60, 100]").
    let filter = args.iter().find(|a| !a.starts_with("--")).cloned().unwrap_or_default();
    let shapes: [&[usize]; 5] = [
        &[60, 100],
        &[256, 4096],
        &[32, 64, 56, 56],
        &[64, 256, 14, 14],
        &[128, 64, 56, 56],
    ];
    println!(
        "batchnorm-candle vs candle-nn BatchNorm, f32, CPU, {} cores; medians (ms)",
        cores()
    );
    let mut rows = Vec::new();
    for shape in shapes {
        let name = if shape.len() == 2 { "NC" } else { "NCHW" };
        if format!("{name} {shape:?}").contains(&filter) {
            kernel_rows(shape, quick, &mut rows)?;
        }
    }
    if "MLP".contains(&filter) || filter.contains("MLP") {
        rows.push(mlp_row(quick)?);
    }
    println!();
    println!("| case | batchnorm-candle (ms) | candle-nn (ms) | speed-up |");
    println!("|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.3} | {:.3} | {:.1}× |",
            r.case,
            r.ours,
            r.theirs,
            r.theirs / r.ours
        );
    }
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
