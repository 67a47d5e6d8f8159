//! Half-precision tensors (`bf16`, `f16`): storage, y, dx and dz in the half type; γ, β, running
//! statistics, dγ and dβ in `f32`; per-element arithmetic on the `f32` path, each output rounded
//! once to the half type.
//!
//! - Against the f64 reference, every layout (NC, NCHW, NHWC, rank 5), on inputs and parameters
//!   representable in the half type (so the reference sees exactly what the kernel sees).
//!   Tolerance as `common/mod.rs` derives it, with ε_T, tiny_T of the half type: the final
//!   rounding to the half type (½ ulp, doubled for margin as for `f32`) on top of the `f32`
//!   path's bound (`KERNEL_REL` = 4·ε_f32) and the reference's own.
//! - Against the `f32` kernels on the same values: a half output is the `f32` kernel's output
//!   rounded once to the half type, bit for bit, and the statistics, dγ, dβ are the same bits
//!   (they never see the half type): plain, split phases, frozen, ghost, masked, renorm and
//!   synchronized (2 ranks) batch norm, and a tensor large enough for streaming stores.
//! - Fused ReLU / add + ReLU against the unfused half sequence (batch norm into y, y + z
//!   computed in `f32` and rounded to the half type, then the ReLU), bit for bit.
//! - Bitwise identity over 1, 2 and 3 threads; `f16` overflow (outputs ±Inf, statistics finite);
//!   the same typed errors as `f32`.

use crate::common::*;
use batchnorm::{
    batch_norm_backward, batch_norm_backward_eval, batch_norm_eval, batch_norm_train, batch_stats, bf16, f16,
    grad_sums, input_grad, normalize, reference, Affine, BatchNorm, BatchNormConfig, BatchRenorm, BatchRenormConfig,
    Element, Error, FixedStats, Grads, Layout, ReluMask, SavedStats, View,
};

/// A half type: `f32` parameters, tolerances of its own.
trait Half: TestFloat + Element<Param = f32> {}
impl Half for bf16 {}
impl Half for f16 {}

/// The data's γ, β, mean and variance as `f32` (their values are the half type's, so exactly).
fn params(d: &Data) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    (narrow(&d.gamma), narrow(&d.beta), narrow(&d.mean), narrow(&d.var))
}

/// Training forward and backward, inference forward and backward of half tensors against the
/// reference (Algorithm 1, the paper's backward, Algorithm 2's transform and its gradient).
fn check_reference<H: Half>(layout: Layout, shape: &[usize], seed: u64) {
    let eps = 1e-3;
    let d = Data::new::<H>(layout, shape, seed);
    let (gamma, beta, mean, var) = params(&d);
    let (x, dy) = (narrow::<H>(&d.x), narrow::<H>(&d.dy));
    let v = View::new(&x, shape, layout);
    let m = d.g.per_channel();
    let rel = reduce_rel::<H>(m);
    let what = format!("{} {layout} {shape:?}", H::NAME);
    let nan = H::from_f64(f64::NAN);

    let mut y = vec![nan; x.len()];
    let (stats, saved) = batch_norm_train(v, Affine::new(&gamma, &beta), eps, &mut y).unwrap();
    let (ry, rmean, rvar) = reference::forward_train(&d.g, &d.x, &d.gamma, &d.beta, eps);
    assert_close::<f64>(&format!("{what} mean"), &stats.mean, &rmean, &d.mean_abs_x(), rel);
    assert_close::<f64>(&format!("{what} var"), &stats.var_biased(), &rvar, &rvar, rel);
    let scale = train_y_scale(&d, &d.gamma, &d.beta, &rmean, &rvar, eps);
    assert_close(&format!("{what} y"), &y, &ry, &scale, rel);

    let (mut dx, mut dg, mut db) = (
        vec![nan; x.len()],
        vec![f32::NAN; gamma.len()],
        vec![f32::NAN; gamma.len()],
    );
    batch_norm_backward(v, &dy, &saved, Some(&gamma), Grads::new(&mut dx, &mut dg, &mut db)).unwrap();
    let (rdx, rdg, rdb) = reference::backward_train(&d.g, &d.x, &d.dy, &d.gamma, eps);
    let (sdx, sdg, sdb) = backward_scales(&d, &d.dy, &d.gamma, eps);
    assert_close(&format!("{what} dx"), &dx, &rdx, &sdx, rel);
    assert_close(&format!("{what} dgamma"), &dg, &rdg, &sdg, rel);
    assert_close(&format!("{what} dbeta"), &db, &rdb, &sdb, rel);

    let mut ye = vec![nan; x.len()];
    batch_norm_eval(
        v,
        FixedStats::new(&mean, &var),
        Affine::new(&gamma, &beta),
        eps,
        &mut ye,
    )
    .unwrap();
    let rye = reference::forward_eval(&d.g, &d.x, &d.mean, &d.var, &d.gamma, &d.beta, eps);
    let scale = eval_y_scale(&d, &d.gamma, &d.beta, eps);
    assert_close(&format!("{what} eval y"), &ye, &rye, &scale, elementwise_rel::<H>());

    let (mut dxe, mut dge, mut dbe) = (
        vec![nan; x.len()],
        vec![f32::NAN; gamma.len()],
        vec![f32::NAN; gamma.len()],
    );
    let grads = Grads::new(&mut dxe, &mut dge, &mut dbe);
    batch_norm_backward_eval(v, &dy, FixedStats::new(&mean, &var), Some(&gamma), eps, grads).unwrap();
    let (rdxe, rdge, rdbe) = reference::backward_eval(&d.g, &d.x, &d.dy, &d.mean, &d.var, &d.gamma, eps);
    let sdxe: Vec<f64> = rdxe.iter().map(|v| v.abs()).collect();
    assert_close(&format!("{what} eval dx"), &dxe, &rdxe, &sdxe, elementwise_rel::<H>());
    assert_close(
        &format!("{what} eval dgamma"),
        &dge,
        &rdge,
        &eval_dgamma_scale(&d, &d.dy, eps),
        rel,
    );
    assert_close(&format!("{what} eval dbeta"), &dbe, &rdbe, &sdb, rel);

    // The split phases give the fused passes' bits.
    let mut yn = vec![nan; x.len()];
    normalize(v, &saved, Affine::new(&gamma, &beta), &mut yn).unwrap();
    assert_bits(&format!("{what} normalize"), &yn, &y);
    let sums = grad_sums(v, &dy, &saved).unwrap();
    let mut dxs = vec![nan; x.len()];
    input_grad(v, &dy, &saved, &sums, Some(&gamma), &mut dxs).unwrap();
    assert_bits(&format!("{what} input_grad"), &dxs, &dx);
}

/// Every layout, both half types: channels-first planes (NCHW, and rank 5), rows (NHWC, NC,
/// channels-last rank 5), odd sizes for the vector tails.
#[test]
fn half_against_reference() {
    let cases: [(Layout, &[usize]); 6] = [
        (Layout::NC, &[37, 11]),
        (Layout::NCHW, &[3, 4, 5, 7]),
        (Layout::NHWC, &[3, 5, 7, 4]),
        (Layout::ChannelsFirst, &[2, 3, 4, 5, 3]),
        (Layout::ChannelsLast, &[2, 4, 5, 3, 6]),
        (Layout::NHWC, &[64, 3, 3, 13]),
    ];
    for (k, (layout, shape)) in cases.into_iter().enumerate() {
        check_reference::<bf16>(layout, shape, 100 + k as u64);
        check_reference::<f16>(layout, shape, 200 + k as u64);
    }
}

/// What one scenario writes: tensors (y, dx, …) in the element type, parameter gradients and
/// statistics in `f32`/`f64`.
#[derive(Default)]
struct Outputs<T> {
    tensors: Vec<(&'static str, Vec<T>)>,
    params: Vec<(&'static str, Vec<f32>)>,
    stats: Vec<(&'static str, Vec<f64>)>,
}

impl<T: Element<Param = f32>> Outputs<T> {
    fn tensor(&mut self, name: &'static str, v: Vec<T>) {
        self.tensors.push((name, v));
    }
    fn param(&mut self, name: &'static str, v: Vec<f32>) {
        self.params.push((name, v));
    }
    fn saved(&mut self, name: &'static str, s: &SavedStats) {
        self.stats.push((name, s.mean.clone()));
        self.stats.push((name, s.inv_std.clone()));
    }
    /// The layer's running statistics (and γ, β, which training does not change).
    fn layer(&mut self, bn: &BatchNorm<T>) {
        self.param("running_mean", bn.running_mean.clone());
        self.param("running_var", bn.running_var.clone());
    }
}

/// The scenarios run on `f32` and on half tensors of the same values.
#[derive(Debug, Clone, Copy)]
enum Scenario {
    Plain,
    Frozen,
    Ghost,
    Masked,
    Renorm,
    Sync,
}

/// Runs `scenario` on tensors of `T` holding `d`'s values, with `f32` parameters.
fn run<T: Element<Param = f32>>(scenario: Scenario, d: &Data, layout: Layout, shape: &[usize]) -> Outputs<T> {
    let (gamma, beta, mean, var) = params(d);
    let (x, dy) = (narrow::<T>(&d.x), narrow::<T>(&d.dy));
    let v = View::new(&x, shape, layout);
    let (n, c) = (x.len(), d.g.channels);
    let zero = T::from_f64(0.0);
    let mut out = Outputs::default();
    let layer = |config: BatchNormConfig| {
        let mut bn = BatchNorm::<T>::new(c, config).unwrap();
        (bn.gamma, bn.beta) = (gamma.clone(), beta.clone());
        (bn.running_mean, bn.running_var) = (mean.clone(), var.clone());
        bn
    };
    let grads = |out: &mut Outputs<T>, f: &dyn Fn(Grads<'_, T>)| {
        let (mut dx, mut dg, mut db) = (vec![zero; n], vec![0f32; c], vec![0f32; c]);
        f(Grads::new(&mut dx, &mut dg, &mut db));
        out.tensor("dx", dx);
        out.param("dgamma", dg);
        out.param("dbeta", db);
    };
    match scenario {
        Scenario::Plain | Scenario::Frozen | Scenario::Ghost => {
            let mut bn = layer(BatchNormConfig {
                virtual_batch: matches!(scenario, Scenario::Ghost).then_some(2),
                ..BatchNormConfig::default()
            });
            if matches!(scenario, Scenario::Frozen) {
                bn.freeze();
            }
            let mut y = vec![zero; n];
            let saved = bn.forward_train(v, &mut y).unwrap();
            out.tensor("y", y);
            out.saved("saved", &saved);
            out.layer(&bn);
            grads(&mut out, &|g| bn.backward(v, &dy, &saved, g).unwrap());
            let mut ye = vec![zero; n];
            bn.forward_eval(v, &mut ye).unwrap();
            out.tensor("eval y", ye);
            grads(&mut out, &|g| bn.backward_eval(v, &dy, g).unwrap());
        }
        Scenario::Masked => {
            let mask: Vec<bool> = (0..d.g.per_channel()).map(|i| i % 3 != 1).collect();
            let mut bn = layer(BatchNormConfig::default());
            let mut y = vec![zero; n];
            let saved = bn.forward_train_masked(v, &mask, &mut y).unwrap();
            out.tensor("y", y);
            out.saved("saved", &saved);
            out.layer(&bn);
            grads(&mut out, &|g| bn.backward_masked(v, &mask, &dy, &saved, g).unwrap());
            let mut ye = vec![zero; n];
            bn.forward_eval_masked(v, &mask, &mut ye).unwrap();
            out.tensor("eval y", ye);
            grads(&mut out, &|g| bn.backward_eval_masked(v, &mask, &dy, g).unwrap());
        }
        Scenario::Renorm => {
            let mut bn = BatchRenorm::<T>::new(c, BatchRenormConfig::default()).unwrap();
            (bn.gamma, bn.beta) = (gamma.clone(), beta.clone());
            bn.moving_mean = mean.clone();
            bn.moving_std = var.iter().map(|v| v.sqrt()).collect();
            let mut y = vec![zero; n];
            let saved = bn.forward_train(v, &mut y).unwrap();
            out.tensor("y", y);
            out.param("moving_mean", bn.moving_mean.clone());
            out.param("moving_std", bn.moving_std.clone());
            grads(&mut out, &|g| bn.backward(v, &dy, &saved, g).unwrap());
            let mut ye = vec![zero; n];
            bn.forward_eval(v, &mut ye).unwrap();
            out.tensor("eval y", ye);
        }
        Scenario::Sync => {
            // Two ranks, each with its half of the examples.
            let half = shape[0] / 2;
            let ranks = on_threads(2, |comm| {
                let start = comm_rank(comm) * half;
                let (part, sub) = d.examples(layout, shape, start, half);
                let (px, pdy) = (narrow::<T>(&part.x), narrow::<T>(&part.dy));
                let pv = View::new(&px, &sub, layout);
                let mut bn = layer(BatchNormConfig::default());
                let mut y = vec![zero; px.len()];
                let saved = bn.forward_train_sync(comm, pv, &mut y).unwrap();
                let (mut dx, mut dg, mut db) = (vec![zero; px.len()], vec![0f32; c], vec![0f32; c]);
                bn.backward_sync(comm, pv, &pdy, &saved, Grads::new(&mut dx, &mut dg, &mut db))
                    .unwrap();
                (y, dx, dg, db, saved, bn.running_mean.clone(), bn.running_var.clone())
            });
            for (y, dx, dg, db, saved, rm, rv) in ranks {
                out.tensor("rank y", y);
                out.tensor("rank dx", dx);
                out.param("rank dgamma", dg);
                out.param("rank dbeta", db);
                out.param("rank running_mean", rm);
                out.param("rank running_var", rv);
                out.saved("rank saved", &saved);
            }
        }
    }
    out
}

/// The rank of a thread communicator.
fn comm_rank(comm: &batchnorm::ThreadComm) -> usize {
    batchnorm::Communicator::rank(comm)
}

/// A half scenario's outputs are the `f32` scenario's on the same values with each tensor
/// output rounded once to the half type; parameters and statistics the same bits.
fn assert_rounded_f32<H: Half>(scenario: Scenario, layout: Layout, shape: &[usize], seed: u64) {
    let d = Data::new::<H>(layout, shape, seed);
    let (a, b) = (
        run::<f32>(scenario, &d, layout, shape),
        run::<H>(scenario, &d, layout, shape),
    );
    let what = format!("{} {scenario:?} {layout} {shape:?}", H::NAME);
    assert_eq!(a.tensors.len(), b.tensors.len());
    for ((name, t32), (_, th)) in a.tensors.iter().zip(&b.tensors) {
        assert_bits(&format!("{what} {name}"), th, &narrow::<H>(&wide(t32)));
    }
    for ((name, p), (_, q)) in a.params.iter().zip(&b.params) {
        assert_bits(&format!("{what} {name}"), q, p);
    }
    for ((name, p), (_, q)) in a.stats.iter().zip(&b.stats) {
        assert_bits64(&format!("{what} {name}"), q, p);
    }
}

/// Every variant (the layer's training and inference passes, frozen, ghost, masked, renorm,
/// synchronized over 2 ranks) on half tensors is the `f32` computation rounded once.
#[test]
fn half_is_f32_rounded_once() {
    use Scenario::*;
    for (k, scenario) in [Plain, Frozen, Ghost, Masked, Renorm, Sync].into_iter().enumerate() {
        for (j, (layout, shape)) in [(Layout::NCHW, &[4, 3, 5, 9][..]), (Layout::NHWC, &[4, 5, 3, 10][..])]
            .into_iter()
            .enumerate()
        {
            let seed = 10 * k as u64 + j as u64;
            assert_rounded_f32::<bf16>(scenario, layout, shape, seed);
            assert_rounded_f32::<f16>(scenario, layout, shape, seed + 1000);
        }
    }
    assert_rounded_f32::<bf16>(Plain, Layout::NC, &[50, 19], 7);
    assert_rounded_f32::<f16>(Masked, Layout::NC, &[50, 19], 8);
}

/// On a tensor whose outputs are written with streaming stores (larger than half the assumed
/// last-level cache), and one whose rows are wider than a column tile, still the `f32`
/// computation rounded once.
#[test]
fn half_is_f32_rounded_once_large() {
    assert_rounded_f32::<bf16>(Scenario::Plain, Layout::NCHW, &[8, 8, 512, 257], 1);
    assert_rounded_f32::<f16>(Scenario::Plain, Layout::NCHW, &[8, 8, 512, 257], 2);
    assert_rounded_f32::<f16>(Scenario::Plain, Layout::NC, &[40, 1500], 3);
}

/// `f32` values rounded once to `H`.
fn round_to<H: Half>(v: &[f32]) -> Vec<H> {
    v.iter().map(|&a| H::from_f64(a as f64)).collect()
}

/// The fused backward's dx, dγ, dβ against the unfused one's, bit for bit, and with a residual
/// its dz against dy·[kept] (`dz`: fused, then wanted).
fn assert_fused_grads<H: Half>(what: &str, fused: Grads3<'_, H>, want: Grads3<'_, H>, dz: Option<(&[H], &[H])>) {
    assert_bits(&format!("{what} dx"), fused.0, want.0);
    assert_bits(&format!("{what} dgamma"), fused.1, want.1);
    assert_bits(&format!("{what} dbeta"), fused.2, want.2);
    if let Some((dz, want)) = dz {
        assert_bits(&format!("{what} dz"), dz, want);
    }
}

/// dx, dγ, dβ of a half backward (the parameter gradients in `f32`).
type Grads3<'a, H> = (&'a [H], &'a [f32], &'a [f32]);

/// Fused `relu(bn(x))` and `relu(bn(x) + z)`, training and inference, forward and backward, on
/// half tensors: the unfused half sequence's bits (batch norm into y; y + z in `f32`, rounded
/// to the half type; the ReLU, which keeps y > 0 and NaN), the mask the ReLU's kept set, dx
/// that of plain batch norm's backward from dy·[kept], dz = dy·[kept].
fn check_fused<H: Half>(layout: Layout, shape: &[usize], seed: u64) {
    let eps = 1e-3;
    let d = Data::new::<H>(layout, shape, seed);
    let (gamma, beta, mean, var) = params(&d);
    let (x, dy) = (narrow::<H>(&d.x), narrow::<H>(&d.dy));
    let z: Vec<H> = narrow(&normals(&mut rng(seed + 1), x.len()));
    let v = View::new(&x, shape, layout);
    let (n, c) = (x.len(), d.g.channels);
    let zero = H::from_f64(0.0);
    let what = format!("{} {layout} {shape:?}", H::NAME);
    let affine = || Affine::new(&gamma, &beta);
    let stats = || FixedStats::new(&mean, &var);
    let relu = |y: &[H], z: Option<&[H]>| -> (Vec<H>, Vec<bool>) {
        y.iter()
            .enumerate()
            .map(|(k, &a)| {
                let s = match z {
                    Some(z) => round_to::<H>(&[a.to_f64() as f32 + z[k].to_f64() as f32])[0],
                    None => a,
                };
                let keep = reference::relu_keeps(s.to_f64());
                (if keep { s } else { zero }, keep)
            })
            .unzip()
    };
    let gate = |kept: &[bool]| -> Vec<H> { dy.iter().zip(kept).map(|(&g, &k)| if k { g } else { zero }).collect() };
    for residual in [None, Some(&z[..])] {
        let what = format!("{what} residual={}", residual.is_some());
        // Training.
        let mut y = vec![zero; n];
        let (_, saved) = batch_norm_train(v, affine(), eps, &mut y).unwrap();
        let (want, kept) = relu(&y, residual);
        let (mut yf, mut mask) = (vec![zero; n], ReluMask::new());
        match residual {
            None => batchnorm::batch_norm_train_relu(v, affine(), eps, &mut yf, &mut mask),
            Some(z) => batchnorm::batch_norm_train_add_relu(v, z, affine(), eps, &mut yf, &mut mask),
        }
        .unwrap();
        assert_bits(&format!("{what} train y"), &yf, &want);
        assert_eq!(
            (0..n).map(|k| mask.kept(k).unwrap()).collect::<Vec<_>>(),
            kept,
            "{what} mask"
        );
        let g = gate(&kept);
        let (mut dx, mut dg, mut db) = (vec![zero; n], vec![0f32; c], vec![0f32; c]);
        batch_norm_backward(v, &g, &saved, Some(&gamma), Grads::new(&mut dx, &mut dg, &mut db)).unwrap();
        let (mut dxf, mut dgf, mut dbf, mut dz) = (vec![zero; n], vec![0f32; c], vec![0f32; c], vec![zero; n]);
        let grads = Grads::new(&mut dxf, &mut dgf, &mut dbf);
        match residual {
            None => batchnorm::batch_norm_backward_relu(v, &dy, &mask, &saved, Some(&gamma), grads),
            Some(_) => batchnorm::batch_norm_backward_add_relu(v, &dy, &mask, &saved, Some(&gamma), grads, &mut dz),
        }
        .unwrap();
        let dz = residual.map(|_| (&dz[..], &g[..]));
        assert_fused_grads(&format!("{what} train"), (&dxf, &dgf, &dbf), (&dx, &dg, &db), dz);
        // Inference.
        let mut y = vec![zero; n];
        batch_norm_eval(v, stats(), affine(), eps, &mut y).unwrap();
        let (want, kept) = relu(&y, residual);
        let (mut yf, mut mask) = (vec![zero; n], ReluMask::new());
        match residual {
            None => batchnorm::batch_norm_eval_relu(v, stats(), affine(), eps, &mut yf, Some(&mut mask)),
            Some(z) => batchnorm::batch_norm_eval_add_relu(v, z, stats(), affine(), eps, &mut yf, Some(&mut mask)),
        }
        .unwrap();
        assert_bits(&format!("{what} eval y"), &yf, &want);
        let g = gate(&kept);
        let (mut dx, mut dg, mut db) = (vec![zero; n], vec![0f32; c], vec![0f32; c]);
        let grads = Grads::new(&mut dx, &mut dg, &mut db);
        batch_norm_backward_eval(v, &g, stats(), Some(&gamma), eps, grads).unwrap();
        let (mut dxf, mut dgf, mut dbf, mut dz) = (vec![zero; n], vec![0f32; c], vec![0f32; c], vec![zero; n]);
        let grads = Grads::new(&mut dxf, &mut dgf, &mut dbf);
        match residual {
            None => batchnorm::batch_norm_backward_eval_relu(v, &dy, &mask, stats(), Some(&gamma), eps, grads),
            Some(_) => {
                batchnorm::batch_norm_backward_eval_add_relu(v, &dy, &mask, stats(), Some(&gamma), eps, grads, &mut dz)
            }
        }
        .unwrap();
        let dz = residual.map(|_| (&dz[..], &g[..]));
        assert_fused_grads(&format!("{what} eval"), (&dxf, &dgf, &dbf), (&dx, &dg, &db), dz);
    }
}

#[test]
fn half_fused_is_unfused() {
    for (k, (layout, shape)) in [
        (Layout::NCHW, &[3, 4, 5, 7][..]),
        // ≥ 16 channels: the fused per-channel passes (dz out of the gradient sums' loop).
        (Layout::NCHW, &[3, 17, 13, 7][..]),
        (Layout::NHWC, &[3, 5, 7, 4][..]),
        (Layout::NC, &[41, 9][..]),
    ]
    .into_iter()
    .enumerate()
    {
        check_fused::<bf16>(layout, shape, 300 + k as u64);
        check_fused::<f16>(layout, shape, 400 + k as u64);
    }
}

/// [`check_fused`] on a tensor whose outputs are written with streaming stores (16 MiB and
/// more) with ≥ 16 channels: the fused per-channel passes, dz streamed out of the gradient sums'
/// loop on the planes that start at a 32-byte boundary (an odd plane length: every other one).
#[test]
fn half_fused_is_unfused_large() {
    check_fused::<bf16>(Layout::NCHW, &[4, 33, 255, 257], 500);
}

/// Thread counts 1, 2 and 3 give the same bits for half tensors, on shapes split into several
/// parallel units (planes, blocks of planes, row tasks).
#[test]
fn half_threads_bitwise() {
    fn outputs<H: Half>(layout: Layout, shape: &[usize], threads: usize) -> Outputs<H> {
        let d = Data::new::<H>(layout, shape, 77);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| run::<H>(Scenario::Plain, &d, layout, shape))
    }
    fn check<H: Half>(layout: Layout, shape: &[usize]) {
        let one = outputs::<H>(layout, shape, 1);
        for threads in [2, 3] {
            let other = outputs::<H>(layout, shape, threads);
            let what = format!("{} {layout} {shape:?}: 1 vs {threads} threads", H::NAME);
            for ((name, a), (_, b)) in one.tensors.iter().zip(&other.tensors) {
                assert_bits(&format!("{what} {name}"), b, a);
            }
            for ((name, a), (_, b)) in one.params.iter().zip(&other.params) {
                assert_bits(&format!("{what} {name}"), b, a);
            }
            for ((name, a), (_, b)) in one.stats.iter().zip(&other.stats) {
                assert_bits64(&format!("{what} {name}"), b, a);
            }
        }
    }
    check::<bf16>(Layout::NCHW, &[16, 32, 32, 32]);
    check::<f16>(Layout::NCHW, &[64, 4, 16, 16]);
    check::<bf16>(Layout::NHWC, &[20, 32, 32, 16]);
    check::<f16>(Layout::NC, &[3000, 200]);
}

/// f16 inputs whose squares sum far beyond 65504 (the largest f16): the statistics, kept in
/// f64, are finite and right, and so are the outputs; an output beyond the range becomes ±Inf
/// (IEEE 754), with the sign of the exact value.
#[test]
fn f16_overflow() {
    let (n, eps) = (256, 1e-5);
    // One channel of values ±(1000 + k): Σx² ≈ 2.8·10⁸, far beyond f16's range.
    let xv: Vec<f64> = (0..n)
        .map(|k| (1000.0 + k as f64) * if k % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let x: Vec<f16> = narrow(&xv);
    let xv = wide(&x);
    let shape = [n, 1];
    let v = View::new(&x, &shape, Layout::NC);
    let g = Layout::NC.geometry(&shape).unwrap();
    let stats = batch_stats(v).unwrap();
    let (rmean, rvar) = reference::mean_var(&g, &xv);
    assert!(stats.mean[0].is_finite() && stats.m2[0].is_finite());
    assert_close::<f64>("f16 mean", &stats.mean, &rmean, &[1500.0], reduce_rel::<f16>(n));
    assert_close::<f64>("f16 var", &stats.var_biased(), &rvar, &rvar, reduce_rel::<f16>(n));
    let (gamma, beta) = ([2.0f32], [0.5f32]);
    let mut y = vec![f16::from_f64(0.0); n];
    batch_norm_train(v, Affine::new(&gamma, &beta), eps, &mut y).unwrap();
    let d64: Vec<f64> = [2.0, 0.5].to_vec();
    let (ry, _, _) = reference::forward_train(&g, &xv, &d64[..1], &d64[1..], eps);
    let scale: Vec<f64> = ry.iter().map(|v| v.abs() + 2.0).collect();
    assert_close("f16 y", &y, &ry, &scale, reduce_rel::<f16>(n));
    // γ = 10⁵ pushes every |y| ≥ ~0.2·10⁵ beyond 65504: ±Inf by the sign of the exact value.
    let big = [1e5f32];
    batch_norm_train(v, Affine::new(&big, &beta), eps, &mut y).unwrap();
    for (k, (&a, &r)) in y.iter().zip(&ry).enumerate() {
        let exact = (r - 0.5) / 2.0 * 1e5 + 0.5;
        let a = a.to_f64();
        if exact.abs() >= 65520.0 {
            assert_eq!(a, exact.signum() * f64::INFINITY, "element {k}: exact {exact:e}");
        } else {
            assert!(
                (a - exact).abs() <= 2.0 * f16::EPS * exact.abs() + 1.0,
                "element {k}: {a} vs {exact}"
            );
        }
    }
    // Inference with the same statistics in f32: overflow to ±Inf, never NaN.
    let (mean, var) = ([rmean[0] as f32], [rvar[0] as f32]);
    batch_norm_eval(v, FixedStats::new(&mean, &var), Affine::new(&big, &beta), eps, &mut y).unwrap();
    assert!(y
        .iter()
        .all(|a| a.to_f64().is_infinite() || a.to_f64().abs() <= 65504.0));
    assert!(y.iter().all(|a| !a.to_f64().is_nan()));
    assert!(y.iter().any(|a| a.to_f64() == f64::INFINITY) && y.iter().any(|a| a.to_f64() == f64::NEG_INFINITY));
}

/// Half tensors are rejected with the same typed errors as `f32` ones: wrong lengths of x, y, γ,
/// β, dx, dγ, fixed statistics; ε; too few values.
#[test]
fn half_errors_are_f32_errors() {
    fn errors<T: Element<Param = f32>>() -> Vec<Error> {
        let x = vec![T::from_f64(1.0); 24];
        let shape = [2, 3, 4];
        let v = View::new(&x, &shape, Layout::ChannelsFirst);
        let (g3, g2) = ([1f32; 3], [1f32; 2]);
        let mut y = vec![T::from_f64(0.0); 24];
        let mut short = vec![T::from_f64(0.0); 23];
        let saved = batch_norm_train(v, Affine::NONE, 1e-5, &mut y).unwrap().1;
        let (mut d3, mut e3, mut d2) = ([0f32; 3], [0f32; 3], [0f32; 2]);
        vec![
            batch_norm_train(
                View::new(&x[..23], &shape, Layout::ChannelsFirst),
                Affine::NONE,
                1e-5,
                &mut y,
            )
            .unwrap_err(),
            batch_norm_train(v, Affine::NONE, 1e-5, &mut short).unwrap_err(),
            batch_norm_train(v, Affine::new(&g2, &g3), 1e-5, &mut y).unwrap_err(),
            batch_norm_train(v, Affine::new(&g3, &g2), 1e-5, &mut y).unwrap_err(),
            batch_norm_train(v, Affine::NONE, 0.0, &mut y).unwrap_err(),
            batch_norm_train(View::new(&x[..12], &[1, 3, 4], Layout::NC), Affine::NONE, 1e-5, &mut y).unwrap_err(),
            batch_norm_train(View::new(&x[..3], &[1, 3], Layout::NC), Affine::NONE, 1e-5, &mut y[..3]).unwrap_err(),
            batch_norm_eval(v, FixedStats::new(&g3, &g2), Affine::NONE, 1e-5, &mut y).unwrap_err(),
            batch_norm_backward(v, &y[..23], &saved, None, Grads::dx(&mut short)).unwrap_err(),
            batch_norm_backward(v, &y, &saved, None, Grads::dx(&mut short)).unwrap_err(),
            batch_norm_backward(v, &y, &saved, Some(&g2), Grads::params(&mut d3, &mut e3)).unwrap_err(),
            batch_norm_backward(v, &y, &saved, None, Grads::params(&mut d2, &mut d3)).unwrap_err(),
        ]
    }
    let want = errors::<f32>();
    assert!(want.iter().any(|e| matches!(e, Error::BufferLength { .. })));
    assert!(want.iter().any(|e| matches!(e, Error::FeatureMismatch { .. })));
    assert_eq!(errors::<bf16>(), want);
    assert_eq!(errors::<f16>(), want);
}
