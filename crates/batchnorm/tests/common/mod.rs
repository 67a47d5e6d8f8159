//! Shared helpers of the batch-norm integration tests: random data, shape strategies, the f64
//! reference on any element type, and tolerance checks.
//!
//! # Tolerances (used by every test file)
//!
//! Let u = 2⁻⁵³ (f64 unit roundoff). A kernel output of element type `T` is compared with the
//! f64 reference (computed from the *same* values widened to f64) as
//!
//! |out − ref| ≤ 2·ε_T·|ref| + rel·scale + tiny_T
//!
//! - `2·ε_T·|ref|`: the final rounding to `T` costs ≤ ½ ulp and the error underneath can push the
//!   result across one rounding boundary, so ≤ 1 ulp(T) ≤ ε_T·|ref|; doubled for margin.
//! - `rel·scale`: the f64 error of the computation itself, relative to `scale`, the magnitude of
//!   the terms that produce the value (not the value, which may cancel to ~0).
//!   * element-wise maps (inference forward/backward, normalize with given statistics, folding):
//!     a handful of roundings → [`ELEMENTWISE_REL`] = 1e-14 (≈ 90 u).
//!   * anything behind a per-channel sum over m values (statistics, training y, dx, dγ, dβ):
//!     the reference sums naively, whose error is bounded by (m − 1)·u·Σ|terms| (Higham), and
//!     that error flows through O(1) factors into the outputs → [`reduce_rel`]`(m)` = 4·(m + 16)·u
//!     (8.9e-15 for m = 4, 2e-11 for the largest m = 9·10⁴ used here). A formula bug (e.g. m
//!     instead of m − 1, a missing term) is orders of magnitude larger.
//!   * plus, for `f32` tensors, [`TestFloat::KERNEL_REL`] = 4·ε_f32 ≈ 4.8e-7: the statistics are
//!     still computed in `f64`, but the element-wise passes (y, dx) compute in `f32` (see
//!     `kernels/elementwise.rs`: ≤ 2·ε_f32 of the terms' magnitude, with the mean split in two
//!     `f32` so that x − mean stays exact); doubled for margin. A formula bug is still orders of
//!     magnitude larger (the smallest, m instead of m − 1 at m = 10⁴, is 1e-4).
//! - `tiny_T`: the smallest normal number of `T`, for results that underflow.
#![allow(dead_code)]

use batchnorm::{
    batch_norm_backward, batch_norm_backward_eval, batch_norm_train, bf16, f16, input_grad, normalize, reference,
    Affine, BatchNorm, BatchNormConfig, BatchStats, Communicator, Element, FixedStats, Geometry, GradSums, Grads,
    Layout, SavedStats, SingleProcess, SmallBatch, ThreadComm, View,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// f64 unit roundoff.
pub const U: f64 = f64::EPSILON / 2.0;

/// Relative tolerance of element-wise maps on `T` tensors (see the module docs).
pub fn elementwise_rel<T: TestFloat>() -> f64 {
    1e-14 + T::KERNEL_REL
}

/// Relative tolerance of values behind a per-channel reduction over `m` values of `T` tensors (see
/// the module docs).
pub fn reduce_rel<T: TestFloat>(m: usize) -> f64 {
    4.0 * (m as f64 + 16.0) * U + T::KERNEL_REL
}

/// Element types under test, with their rounding constants.
pub trait TestFloat: Element {
    /// Machine epsilon of the storage type.
    const EPS: f64;
    /// Smallest positive normal value of the storage type.
    const TINY: f64;
    /// Relative error of the kernels' element-precision arithmetic on this type, on top of the
    /// reference's own (see the module docs).
    const KERNEL_REL: f64;
}

impl TestFloat for f32 {
    const EPS: f64 = f32::EPSILON as f64;
    const TINY: f64 = f32::MIN_POSITIVE as f64;
    const KERNEL_REL: f64 = 4.0 * f32::EPSILON as f64;
}

impl TestFloat for f64 {
    const EPS: f64 = f64::EPSILON;
    const TINY: f64 = f64::MIN_POSITIVE;
    const KERNEL_REL: f64 = 0.0;
}

/// The half types compute as `f32` tensors do (the same `KERNEL_REL`) and round each output once
/// to their own type (`EPS`, `TINY` theirs).
impl TestFloat for bf16 {
    const EPS: f64 = 0.0078125; // 2⁻⁷
    const TINY: f64 = f32::MIN_POSITIVE as f64; // bf16 has f32's exponent range
    const KERNEL_REL: f64 = 4.0 * f32::EPSILON as f64;
}

impl TestFloat for f16 {
    const EPS: f64 = 0.0009765625; // 2⁻¹⁰
    const TINY: f64 = 6.103515625e-5; // 2⁻¹⁴
    const KERNEL_REL: f64 = 4.0 * f32::EPSILON as f64;
}

/// `f32` and `f64`: element types whose parameters (γ, β, statistics, dγ, dβ) have their own
/// type, so that one generic test covers both.
pub trait PlainFloat: TestFloat + Element<Param = Self> {}

impl<T: TestFloat + Element<Param = T>> PlainFloat for T {}

/// The tolerance of one output (see the module docs).
pub fn tol<T: TestFloat>(reference: f64, scale: f64, rel: f64) -> f64 {
    2.0 * T::EPS * reference.abs() + rel * scale + T::TINY
}

/// Asserts `|actual[k] − reference[k]| ≤ tol(reference[k], scale[k], rel)` for every k.
#[track_caller]
pub fn assert_close<T: TestFloat>(what: &str, actual: &[T], reference: &[f64], scale: &[f64], rel: f64) {
    assert_eq!(actual.len(), reference.len(), "{what}: length");
    assert_eq!(scale.len(), reference.len(), "{what}: scale length");
    for (k, ((a, &r), &s)) in actual.iter().zip(reference).zip(scale).enumerate() {
        let a = a.to_f64();
        let t = tol::<T>(r, s, rel);
        assert!(
            (a - r).abs() <= t,
            "{what}[{k}] ({}): got {a:e}, reference {r:e}, |diff| {:e} > tol {t:e} (scale {s:e}, rel {rel:e})",
            T::NAME,
            (a - r).abs()
        );
    }
}

/// Asserts two buffers hold the same bits.
#[track_caller]
pub fn assert_bits<T: Element>(what: &str, a: &[T], b: &[T]) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        let (x, y) = (x.to_f64(), y.to_f64());
        assert!(
            x.to_bits() == y.to_bits(),
            "{what}[{k}] ({}): {x:e} vs {y:e} differ in bits",
            T::NAME
        );
    }
}

/// Asserts two f64 vectors hold the same bits.
#[track_caller]
pub fn assert_bits64(what: &str, a: &[f64], b: &[f64]) {
    assert_bits::<f64>(what, a, b);
}

/// Widens a buffer to f64.
pub fn wide<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|a| a.to_f64()).collect()
}

/// Rounds an f64 buffer to `T`.
pub fn narrow<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&a| T::from_f64(a)).collect()
}

/// A seeded generator.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Standard normal samples.
pub fn normals(r: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| StandardNormal.sample(r)).collect()
}

/// Index of element (o, c, i) of a geometry (as documented on [`Geometry`]).
pub fn at(g: &Geometry, o: usize, c: usize, i: usize) -> usize {
    (o * g.channels + c) * g.inner + i
}

/// Channel of flat index `k`.
pub fn channel_of(g: &Geometry, k: usize) -> usize {
    (k / g.inner) % g.channels
}

/// Everything an op needs, as f64 values exactly representable in `T` (already rounded).
#[derive(Debug, Clone)]
pub struct Data {
    pub g: Geometry,
    /// Input, per channel N(μ_c, σ_c²) with μ_c ∈ [−3, 3], σ_c ∈ [0.5, 2].
    pub x: Vec<f64>,
    /// Upstream gradient, N(0, 1).
    pub dy: Vec<f64>,
    /// γ ∈ [−2, 2], β ∈ [−1, 1].
    pub gamma: Vec<f64>,
    pub beta: Vec<f64>,
    /// Inference statistics: near the channel's mean and variance.
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

impl Data {
    /// Random data for `shape` in `layout`, every value rounded to `T` so that the f64 reference
    /// sees exactly what the kernel sees.
    pub fn new<T: Element>(layout: Layout, shape: &[usize], seed: u64) -> Data {
        let g = layout.geometry(shape).expect("valid test shape");
        let mut r = rng(seed);
        let mu: Vec<f64> = (0..g.channels).map(|_| r.gen_range(-3.0..3.0)).collect();
        let sd: Vec<f64> = (0..g.channels).map(|_| r.gen_range(0.5..2.0)).collect();
        let z = normals(&mut r, g.len());
        let x: Vec<f64> = z
            .iter()
            .enumerate()
            .map(|(k, z)| {
                let c = channel_of(&g, k);
                mu[c] + sd[c] * z
            })
            .collect();
        let dy = normals(&mut r, g.len());
        let gamma = (0..g.channels).map(|_| r.gen_range(-2.0..2.0)).collect::<Vec<f64>>();
        let beta = (0..g.channels).map(|_| r.gen_range(-1.0..1.0)).collect::<Vec<f64>>();
        let mean = (0..g.channels)
            .map(|c| mu[c] + 0.3 * r.gen_range(-1.0..1.0))
            .collect::<Vec<f64>>();
        let var = (0..g.channels)
            .map(|c| sd[c] * sd[c] * r.gen_range(0.5..2.0))
            .collect::<Vec<f64>>();
        let round = |v: Vec<f64>| wide(&narrow::<T>(&v));
        Data {
            g,
            x: round(x),
            dy: round(dy),
            gamma: round(gamma),
            beta: round(beta),
            mean: round(mean),
            var: round(var),
        }
    }

    /// x, dy, γ and β as `T` buffers (their values are already `T`'s, so exactly these).
    pub fn narrowed<T: PlainFloat>(&self) -> (Vec<T>, Vec<T>, Vec<T>, Vec<T>) {
        (
            narrow(&self.x),
            narrow(&self.dy),
            narrow(&self.gamma),
            narrow(&self.beta),
        )
    }

    /// γ = 1, β = 0 (what the kernels use without affine).
    pub fn ones_zeros(&self) -> (Vec<f64>, Vec<f64>) {
        (vec![1.0; self.g.channels], vec![0.0; self.g.channels])
    }

    /// γ, β as the reference sees them for `affine`.
    pub fn affine(&self, affine: bool) -> (Vec<f64>, Vec<f64>) {
        if affine {
            (self.gamma.clone(), self.beta.clone())
        } else {
            self.ones_zeros()
        }
    }

    /// The data of examples `start..start + n` of a batch of `shape` in `layout` (dimension 0,
    /// the batch, comes first in every layout, so they are a contiguous slice), with their
    /// shape: what one rank's shard or one ghost group holds. γ, β and the inference statistics
    /// are the whole batch's.
    pub fn examples(&self, layout: Layout, shape: &[usize], start: usize, n: usize) -> (Data, Vec<usize>) {
        let per_example = self.x.len() / shape[0];
        let mut sub = shape.to_vec();
        sub[0] = n;
        let range = start * per_example..(start + n) * per_example;
        let d = Data {
            g: layout.geometry(&sub).expect("a shard of a valid shape"),
            x: self.x[range.clone()].to_vec(),
            dy: self.dy[range].to_vec(),
            ..self.clone()
        };
        (d, sub)
    }

    /// Mean of |x| per channel (the scale of rounding errors in a channel mean).
    pub fn mean_abs_x(&self) -> Vec<f64> {
        (0..self.g.channels)
            .map(|c| {
                let v = reference::channel_values(&self.g, &self.x, c);
                v.iter().map(|a| a.abs()).sum::<f64>() / v.len() as f64
            })
            .collect()
    }
}

/// `Some(slice)` or `None`.
pub fn opt<T>(v: &[T], on: bool) -> Option<&[T]> {
    on.then_some(v)
}

/// γ and β when `on`, none otherwise.
pub fn affine_if<'a, T: Element>(on: bool, gamma: &'a [T::Param], beta: &'a [T::Param]) -> Affine<'a, T> {
    Affine {
        gamma: opt(gamma, on),
        beta: opt(beta, on),
    }
}

/// The training forward on `x` into a NaN-filled `y` (so that an element it does not write
/// fails any comparison): `(y, batch statistics, saved statistics)`.
pub fn train<T: PlainFloat>(x: View<'_, T>, affine: Affine<'_, T>, eps: f64) -> (Vec<T>, BatchStats, SavedStats) {
    let mut y = vec![T::from_f64(f64::NAN); x.data.len()];
    let (stats, saved) = batch_norm_train(x, affine, eps, &mut y).unwrap();
    (y, stats, saved)
}

/// The training backward writing all of dx, dγ, dβ into NaN-filled buffers: `(dx, dγ, dβ)`.
pub fn backward_all<T: PlainFloat>(
    x: View<'_, T>,
    dy: &[T],
    saved: &SavedStats,
    gamma: Option<&[T]>,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let nan = T::from_f64(f64::NAN);
    let c = saved.mean.len();
    let (mut dx, mut dg, mut db) = (vec![nan; x.data.len()], vec![nan; c], vec![nan; c]);
    batch_norm_backward(x, dy, saved, gamma, Grads::new(&mut dx, &mut dg, &mut db)).unwrap();
    (dx, dg, db)
}

/// The layer's training backward writing all of dx, dγ, dβ into NaN-filled buffers: `(dx, dγ, dβ)`.
pub fn layer_backward_all<T: PlainFloat>(
    bn: &BatchNorm<T>,
    x: View<'_, T>,
    dy: &[T],
    saved: &SavedStats,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let nan = T::from_f64(f64::NAN);
    let c = bn.num_features;
    let (mut dx, mut dg, mut db) = (vec![nan; x.data.len()], vec![nan; c], vec![nan; c]);
    bn.backward(x, dy, saved, Grads::new(&mut dx, &mut dg, &mut db))
        .unwrap();
    (dx, dg, db)
}

/// The gradients `backward` writes into zeroed f64 buffers of `n` elements and `c` channels:
/// `(dx, dγ, dβ)`.
pub fn grads_of(n: usize, c: usize, backward: impl FnOnce(Grads<'_, f64>)) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut dx, mut dg, mut db) = (vec![0.0; n], vec![0.0; c], vec![0.0; c]);
    backward(Grads::new(&mut dx, &mut dg, &mut db));
    (dx, dg, db)
}

/// A layer with the data's γ, β (with `affine`) and running statistics (`d.mean`, `d.var`).
pub fn layer_with<T: PlainFloat>(d: &Data, eps: f64, affine: bool, small_batch: SmallBatch) -> BatchNorm<T> {
    let config = BatchNormConfig {
        eps,
        affine,
        small_batch,
        ..BatchNormConfig::default()
    };
    layer_of(d, config)
}

/// A layer of `config` with the data's γ, β (with `config.affine`) and running statistics
/// (`d.mean`, `d.var`).
pub fn layer_of<T: PlainFloat>(d: &Data, config: BatchNormConfig) -> BatchNorm<T> {
    let mut bn = BatchNorm::<T>::new(d.g.channels, config).unwrap();
    bn.running_mean = narrow(&d.mean);
    bn.running_var = narrow(&d.var);
    if config.affine {
        bn.gamma = narrow(&d.gamma);
        bn.beta = narrow(&d.beta);
    }
    bn
}

/// The split-phase normalization (`normalize`) into a NaN-filled y.
pub fn split_normalize<T: PlainFloat>(x: View<'_, T>, saved: &SavedStats, affine: Affine<'_, T>) -> Vec<T> {
    let mut y = vec![T::from_f64(f64::NAN); x.data.len()];
    normalize(x, saved, affine, &mut y).unwrap();
    y
}

/// The split-phase input gradient (`input_grad`) from the merged `sums`, into a NaN-filled dx.
pub fn split_input_grad<T: PlainFloat>(
    sums: &GradSums,
    x: View<'_, T>,
    dy: &[T],
    saved: &SavedStats,
    gamma: Option<&[T]>,
) -> Vec<T> {
    let mut dx = vec![T::from_f64(f64::NAN); x.data.len()];
    input_grad(x, dy, saved, sums, gamma, &mut dx).unwrap();
    dx
}

/// A backward pass asked for part of its outputs gives the same bits as asked for all of them:
/// `backward` writes each of dx alone, dγ and dβ, dγ alone and dβ alone into NaN-filled buffers,
/// compared with `all` = (dx, dγ, dβ) computed together.
#[track_caller]
pub fn assert_output_subsets<T: PlainFloat>(what: &str, all: (&[T], &[T], &[T]), backward: impl Fn(Grads<'_, T>)) {
    let (dx, dg, db) = all;
    let nan = T::from_f64(f64::NAN);
    let mut dx1 = vec![nan; dx.len()];
    backward(Grads::dx(&mut dx1));
    assert_bits(&format!("{what} dx alone"), &dx1, dx);
    let (mut dg2, mut db2) = (vec![nan; dg.len()], vec![nan; db.len()]);
    backward(Grads::params(&mut dg2, &mut db2));
    assert_bits(&format!("{what} dgamma without dx"), &dg2, dg);
    assert_bits(&format!("{what} dbeta without dx"), &db2, db);
    let mut dg3 = vec![nan; dg.len()];
    backward(Grads {
        dgamma: Some(&mut dg3),
        ..Grads::default()
    });
    assert_bits(&format!("{what} dgamma alone"), &dg3, dg);
    let mut db4 = vec![nan; db.len()];
    backward(Grads {
        dbeta: Some(&mut db4),
        ..Grads::default()
    });
    assert_bits(&format!("{what} dbeta alone"), &db4, db);
}

/// Inference-mode backward's dx and dγ with `gamma` (no dβ), into zero-filled outputs.
pub fn backward_eval_dx_dgamma<T: PlainFloat>(
    x: View<'_, T>,
    dy: &[T],
    stats: FixedStats<'_, T>,
    gamma: &[T],
    eps: f64,
) -> (Vec<T>, Vec<T>) {
    let zero = T::from_f64(0.0);
    let (mut dx, mut dgamma) = (vec![zero; x.data.len()], vec![zero; gamma.len()]);
    let grads = Grads {
        dx: Some(&mut dx),
        dgamma: Some(&mut dgamma),
        dbeta: None,
    };
    batch_norm_backward_eval(x, dy, stats, Some(gamma), eps, grads).unwrap();
    (dx, dgamma)
}

/// Per-element scale of the training forward y = γ·x̂ + β (see module docs): the terms
/// |γ|·|x̂| and |β|, plus |γ|·inv_std·mean|x| for the rounding error of the channel mean, plus
/// |γ| for the relative error of the variance.
pub fn train_y_scale(d: &Data, gamma: &[f64], beta: &[f64], mean: &[f64], var: &[f64], eps: f64) -> Vec<f64> {
    let mabs = d.mean_abs_x();
    (0..d.x.len())
        .map(|k| {
            let c = channel_of(&d.g, k);
            let s = 1.0 / (var[c] + eps).sqrt();
            gamma[c].abs() * ((d.x[k] - mean[c]).abs() * s + 1.0 + s * mabs[c]) + beta[c].abs()
        })
        .collect()
}

/// Per-element scale of the inference forward: |γ|·(|x| + |mean|)·inv_std + |β|.
pub fn eval_y_scale(d: &Data, gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
    (0..d.x.len())
        .map(|k| {
            let c = channel_of(&d.g, k);
            let s = 1.0 / (d.var[c] + eps).sqrt();
            gamma[c].abs() * (d.x[k].abs() + d.mean[c].abs()) * s + beta[c].abs()
        })
        .collect()
}

/// Scales of the training backward (see module docs) for data `d` with upstream gradient `dy`:
/// per element for dx, |γ|·inv_std·(|dy| + (1 + |x̂| + inv_std·mean|x|)·(Σ|dy| + Σ|dy·x̂|)/m)
/// (the three terms of the paper's ∂ℓ/∂x, with the error of x̂ through the rounding of μ_B,
/// ≈ u·mean|x|·inv_std, and of σ²_B); per channel for dγ, Σ|dy|·(|x̂| + 1 + inv_std·mean|x|);
/// for dβ, Σ|dy|.
pub fn backward_scales(d: &Data, dy: &[f64], gamma: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mean, var) = reference::mean_var(&d.g, &d.x);
    let mabs = d.mean_abs_x();
    let m = d.g.per_channel() as f64;
    let c_of = |k| channel_of(&d.g, k);
    let s: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let xhat: Vec<f64> = (0..d.x.len()).map(|k| (d.x[k] - mean[c_of(k)]) * s[c_of(k)]).collect();
    let mut sum_dy = vec![0.0; d.g.channels];
    let mut sum_dyx = vec![0.0; d.g.channels];
    let mut dgamma = vec![0.0; d.g.channels];
    for k in 0..d.x.len() {
        let c = c_of(k);
        sum_dy[c] += dy[k].abs();
        sum_dyx[c] += (dy[k] * xhat[k]).abs();
        dgamma[c] += dy[k].abs() * (xhat[k].abs() + 1.0 + s[c] * mabs[c]);
    }
    let dx = (0..d.x.len())
        .map(|k| {
            let c = c_of(k);
            let xhat_err = 1.0 + xhat[k].abs() + s[c] * mabs[c];
            gamma[c].abs() * s[c] * (dy[k].abs() + xhat_err * (sum_dy[c] + sum_dyx[c]) / m)
        })
        .collect();
    (dx, dgamma, sum_dy)
}

/// Values of channel `c` of a `T` buffer, widened.
pub fn channel<T: Element>(g: &Geometry, v: &[T], c: usize) -> Vec<f64> {
    reference::channel_values(g, &wide(v), c)
}

/// A layout and a shape with at least 2 values per channel and at most `max_len` elements:
/// NC; NCHW; NHWC; channels-first and channels-last of rank 2..=5.
pub fn layout_shape(max_len: usize) -> impl Strategy<Value = (Layout, Vec<usize>)> {
    prop_oneof![
        (2usize..400, 1usize..40).prop_map(|(n, c)| (Layout::NC, vec![n, c])),
        (1usize..7, 1usize..24, 1usize..14, 1usize..14).prop_map(|(n, c, h, w)| (Layout::NCHW, vec![n, c, h, w])),
        (1usize..7, 1usize..14, 1usize..14, 1usize..24).prop_map(|(n, h, w, c)| (Layout::NHWC, vec![n, h, w, c])),
        (1usize..7, 1usize..24, prop::collection::vec(1usize..12, 0..=3)).prop_map(|(n, c, rest)| {
            let mut s = vec![n, c];
            s.extend(rest);
            (Layout::ChannelsFirst, s)
        }),
        (1usize..7, prop::collection::vec(1usize..12, 0..=3), 1usize..24).prop_map(|(n, mid, c)| {
            let mut s = vec![n];
            s.extend(mid);
            s.push(c);
            (Layout::ChannelsLast, s)
        }),
    ]
    .prop_filter("at least 2 values per channel, small", move |(l, s)| {
        let g = l.geometry(s).unwrap();
        g.per_channel() >= 2 && g.len() <= max_len
    })
}

/// Small shapes of every layout, with vector steps and tails (the masked and fused tests).
pub fn small_shapes_of_every_layout() -> Vec<(Layout, Vec<usize>)> {
    let shapes: [(Layout, &[usize]); 5] = [
        (Layout::NC, &[7, 3]),
        (Layout::NCHW, &[3, 2, 5, 7]),
        (Layout::NHWC, &[2, 5, 3, 9]),
        (Layout::ChannelsFirst, &[3, 4, 19]),
        (Layout::ChannelsLast, &[2, 3, 4, 5]),
    ];
    shapes.iter().map(|&(layout, shape)| (layout, shape.to_vec())).collect()
}

/// ε values the property tests draw from.
pub fn eps_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![Just(1e-5), Just(1e-3), Just(0.1), Just(1e-12)]
}

/// Fixed shapes that exercise the kernels' internal chunking (pieces of 8192 elements, blocks of
/// planes below 16 channels, fused per-channel passes from 16 channels, row tasks of 2¹⁸
/// elements, in-cache row blocks of 8192 elements, odd sizes, serial and parallel sizes).
pub fn chunking_shapes() -> Vec<(Layout, Vec<usize>)> {
    vec![
        // channels-first plane of 10000 > 8192 elements, 3 < 16 channels: blocks of planes, parallel.
        (Layout::NCHW, vec![2, 3, 100, 100]),
        // plane one element longer than a piece, 2 channels.
        (Layout::ChannelsFirst, vec![3, 2, 8193]),
        // odd sizes, few channels.
        (Layout::NCHW, vec![5, 7, 9, 11]),
        // ≥ 16 channels: fused per-channel passes (serial, then parallel).
        (Layout::NCHW, vec![3, 17, 13, 7]),
        (Layout::NCHW, vec![4, 32, 20, 20]),
        // few channels, many planes: 4 blocks of 16 planes per channel.
        (Layout::NCHW, vec![64, 4, 8, 8]),
        // rows: 5000 > 262144/64 rows, two tasks.
        (Layout::NC, vec![5000, 64]),
        // rows: several in-cache blocks of 2730 rows in one task.
        (Layout::NHWC, vec![8, 40, 40, 3]),
        // rows: 90000 > 262144/3 rows, two tasks.
        (Layout::NHWC, vec![4, 150, 150, 3]),
        // one channel, more rows than one in-cache block.
        (Layout::NC, vec![9001, 1]),
        // wide rows.
        (Layout::NC, vec![3, 300]),
        // higher and lower ranks.
        (Layout::ChannelsLast, vec![3, 7, 11, 13, 5]),
        (Layout::ChannelsFirst, vec![2, 3, 4, 5, 6]),
        (Layout::ChannelsFirst, vec![37, 5]),
        (Layout::ChannelsLast, vec![37, 5]),
        (Layout::ChannelsFirst, vec![2, 19, 1001]),
        // channels-first above one element-wise task (2¹⁸ elements): planes split over 2 tasks,
        // few channels (blocked statistics) and ≥ 16 channels (fused).
        (Layout::NCHW, vec![4, 5, 120, 120]),
        (Layout::NCHW, vec![2, 16, 90, 100]),
        // one plane longer than a task.
        (Layout::ChannelsFirst, vec![2, 1, 300_000]),
    ]
}

/// Calls `check(layout, shape, seed)` on every [`chunking_shapes`] shape, the i-th with seed
/// `first_seed + i`.
pub fn for_each_chunking_shape(first_seed: u64, mut check: impl FnMut(Layout, &[usize], u64)) {
    for (i, (layout, shape)) in chunking_shapes().into_iter().enumerate() {
        check(layout, &shape, first_seed + i as u64);
    }
}

/// Property tests over random layouts and shapes (`layout_shape(20_000)`), seeds, affine on and
/// off and ε (`eps_strategy()`), `$cases` cases each: `name => check for T, …;` defines the test
/// `name`, which calls `check::<T>(layout, &shape, seed, affine, eps)` for each `T` in turn.
macro_rules! shape_proptests {
    ($cases:expr; $($name:ident => $check:ident for $($t:ty),+;)+) => {
        proptest! {
            #![proptest_config(config($cases))]
            $(
                #[test]
                fn $name((layout, shape) in layout_shape(20_000), seed: u64, affine: bool, eps in eps_strategy()) {
                    $($check::<$t>(layout, &shape, seed, affine, eps);)+
                }
            )+
        }
    };
}
pub(crate) use shape_proptests;

/// Proptest configuration of the suite: few cases, each on up to ~20k elements.
pub fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Logical NCHW index → NHWC flat buffer transpose.
pub fn nchw_to_nhwc<T: Copy>(x: &[T], shape: [usize; 4]) -> Vec<T> {
    let [n, c, h, w] = shape;
    let mut out = Vec::with_capacity(x.len());
    for ni in 0..n {
        for hi in 0..h {
            for wi in 0..w {
                for ci in 0..c {
                    out.push(x[((ni * c + ci) * h + hi) * w + wi]);
                }
            }
        }
    }
    out
}

/// Σ|dy| per channel of `d` (the scale of dβ = Σ dy, and of the Σ dy term of dγ).
pub fn sum_abs_dy(d: &Data) -> Vec<f64> {
    let mut out = vec![0.0; d.g.channels];
    for k in 0..d.x.len() {
        out[channel_of(&d.g, k)] += d.dy[k].abs();
    }
    out
}

/// The inference-mode backward's dγ = Σ dy·x̂ and dβ = Σ dy (x̂ from the data's fixed statistics)
/// against the reference's `rdg`, `rdb`, with their scales ([`eval_dgamma_scale`], [`sum_abs_dy`])
/// and `rel`.
#[track_caller]
#[allow(clippy::too_many_arguments)]
pub fn assert_eval_param_grads<T: PlainFloat>(
    what: &str,
    (dg, db): (&[T], &[T]),
    (rdg, rdb): (&[f64], &[f64]),
    d: &Data,
    eps: f64,
    rel: f64,
) {
    assert_close(
        &format!("{what} dgamma"),
        dg,
        rdg,
        &eval_dgamma_scale(d, &d.dy, eps),
        rel,
    );
    assert_close(&format!("{what} dbeta"), db, rdb, &sum_abs_dy(d), rel);
}

/// Per-channel scale of the inference-mode dγ = Σ dy·(x − mean)·inv_std: Σ|dy|·(|x| + |mean|)·inv_std.
pub fn eval_dgamma_scale(d: &Data, dy: &[f64], eps: f64) -> Vec<f64> {
    let mut out = vec![0.0; d.g.channels];
    for k in 0..d.x.len() {
        let c = channel_of(&d.g, k);
        out[c] += (dy[k] * (d.x[k].abs() + d.mean[c].abs())).abs() / (d.var[c] + eps).sqrt();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Central finite differences (f64).
//
// ℓ = Σ wₖ·yₖ with random w (so dy = w), y from the kernels' own forward. Each input is
// perturbed by ±h with h = 1e-6 and (ℓ(+h) − ℓ(−h))/2h compared with the analytic gradient.
// Error of the estimate: truncation h²/6·|ℓ'''| ≈ 1e-12·O(1) (data have σ ∈ [0.5, 2], ε = 1e-5,
// so the derivatives of x̂ are O(1)), plus round-off ≈ u·Σ|wₖyₖ|/h ≤ 1.1e-16·200/1e-6 ≈ 2e-8 for
// the ≤ 60 elements used here. Tolerance 1e-6·(1 + |analytic|) leaves a margin of 50 over that,
// while the smallest term of the chain rule that a bug could drop (∂ℓ/∂μ_B/m or
// ∂ℓ/∂σ²_B·2(xᵢ − μ_B)/m, O(1/m) ≥ 1/60) is 4 orders of magnitude larger.
// ---------------------------------------------------------------------------------------------

/// The finite-difference step h.
pub const H: f64 = 1e-6;
/// The ε of the finite-difference tests (the error budget above assumes it).
pub const FD_EPS: f64 = 1e-5;
/// The finite-difference tolerance, relative to 1 + |analytic|.
pub const FD_TOL: f64 = 1e-6;

/// The finite-difference shapes: every layout, small enough to perturb each element.
pub fn fd_shapes() -> Vec<(Layout, Vec<usize>)> {
    vec![
        (Layout::NC, vec![6, 3]),
        (Layout::NCHW, vec![3, 2, 2, 3]),
        (Layout::NHWC, vec![3, 2, 3, 2]),
        (Layout::ChannelsFirst, vec![4, 3, 5]),
        (Layout::ChannelsLast, vec![4, 5, 3]),
        // ≥ 16 channels (fused per-channel path) and an NC batch of 2.
        (Layout::NCHW, vec![2, 16, 1, 2]),
        (Layout::NC, vec![2, 4]),
    ]
}

/// Asserts |analytic − numeric| ≤ `FD_TOL`·(1 + |analytic|).
#[track_caller]
pub fn assert_fd(what: &str, analytic: f64, numeric: f64) {
    let t = FD_TOL * (1.0 + analytic.abs());
    assert!(
        (analytic - numeric).abs() <= t,
        "{what}: analytic {analytic:e}, finite difference {numeric:e}, |diff| {:e} > {t:e}",
        (analytic - numeric).abs()
    );
}

/// ℓ = Σ wₖ·yₖ.
pub fn loss(w: &[f64], y: &[f64]) -> f64 {
    w.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// The loss `w·y` of the output `forward` writes into a zeroed y.
pub fn loss_of(w: &[f64], forward: impl FnOnce(&mut [f64])) -> f64 {
    let mut y = vec![0.0; w.len()];
    forward(&mut y);
    loss(w, &y)
}

/// The analytic gradients (`dx`, `dg`, `db`) against central differences: of `loss_x(x, γ, β)`
/// in each element of x, and of `loss_params(γ, β)` in each channel's γ and β (both taken
/// around the given x, γ, β).
#[allow(clippy::too_many_arguments)]
pub fn assert_fd_grads(
    what: &str,
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    (dx, dg, db): (&[f64], &[f64], &[f64]),
    loss_x: impl Fn(&[f64], &[f64], &[f64]) -> f64,
    loss_params: impl Fn(&[f64], &[f64]) -> f64,
) {
    for k in 0..x.len() {
        let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
        xp[k] += H;
        xm[k] -= H;
        let fd = (loss_x(&xp, gamma, beta) - loss_x(&xm, gamma, beta)) / (2.0 * H);
        assert_fd(&format!("{what} dx[{k}]"), dx[k], fd);
    }
    for c in 0..gamma.len() {
        let perturbed = |v: &[f64], delta: f64| {
            let mut p = v.to_vec();
            p[c] += delta;
            p
        };
        let fd_g = (loss_params(&perturbed(gamma, H), beta) - loss_params(&perturbed(gamma, -H), beta)) / (2.0 * H);
        let fd_b = (loss_params(gamma, &perturbed(beta, H)) - loss_params(gamma, &perturbed(beta, -H))) / (2.0 * H);
        assert_fd(&format!("{what} dgamma[{c}]"), dg[c], fd_g);
        assert_fd(&format!("{what} dbeta[{c}]"), db[c], fd_b);
    }
}

/// `check(layout, shape, affine, data)` for every finite-difference shape, with and without
/// affine; the data of shape i from seed `seed0 + i`.
pub fn for_each_fd_case(seed0: u64, mut check: impl FnMut(Layout, &[usize], bool, &Data)) {
    for (i, (layout, shape)) in fd_shapes().into_iter().enumerate() {
        for affine in [true, false] {
            let d = Data::new::<f64>(layout, &shape, seed0 + i as u64);
            check(layout, &shape, affine, &d);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Synchronized tests: shards of a batch over in-process ranks.
// ---------------------------------------------------------------------------------------------

/// Shapes of every layout; dimension 0 is the batch, split into shards.
pub fn shard_shapes() -> Vec<(Layout, Vec<usize>)> {
    vec![
        (Layout::NC, vec![7, 5]),
        (Layout::NCHW, vec![6, 3, 2, 3]),
        (Layout::NHWC, vec![5, 2, 3, 4]),
        (Layout::ChannelsFirst, vec![6, 3]),
        (Layout::ChannelsFirst, vec![5, 2, 2, 1, 3]),
        (Layout::ChannelsLast, vec![6, 2, 2, 3]),
        (Layout::ChannelsLast, vec![7, 4]),
    ]
}

/// Uneven shard sizes of a batch of `n` over `p` ranks (one shard of a single example).
pub fn shard_sizes(n: usize, p: usize) -> Vec<usize> {
    match p {
        1 => vec![n],
        2 => vec![1, n - 1],
        3 => vec![1, 2, n - 3],
        _ => unreachable!("the tests use P <= 3"),
    }
}

/// Runs `f(comm)` on each rank of a `p`-thread group; results in rank order.
pub fn on_threads<R: Send>(p: usize, f: impl Fn(&ThreadComm) -> R + Sync) -> Vec<R> {
    let comms = ThreadComm::group(p).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || f(&c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank panicked")).collect()
    })
}

/// `step` on one rank both ways there is: over [`SingleProcess`] and over a group of one thread.
pub fn on_one_rank<R: Send>(step: impl Fn(&dyn Communicator) -> R + Sync) -> [R; 2] {
    [step(&SingleProcess), on_threads(1, |c| step(c)).remove(0)]
}

/// |a − b| ≤ 2·tol(b, scale, rel) elementwise: two results each within [`tol`] of the exact
/// value (a synchronized and a one-process computation, summing in different orders) differ by
/// at most twice it.
#[track_caller]
pub fn assert_near<T: TestFloat>(what: &str, a: &[T], b: &[T], scale: &[f64], rel: f64) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (k, ((x, y), s)) in wide(a).iter().zip(wide(b)).zip(scale).enumerate() {
        let t = 2.0 * tol::<T>(y, *s, rel);
        assert!(
            (x - y).abs() <= t,
            "{what}[{k}] ({}): synchronized {x:e}, one process {y:e}, |diff| {:e} > {t:e}",
            T::NAME,
            (x - y).abs()
        );
    }
}

/// What one training step writes: y, and the gradients dx, dγ, dβ.
#[derive(Debug, Clone)]
pub struct Outputs<T> {
    pub y: Vec<T>,
    pub dx: Vec<T>,
    pub dgamma: Vec<T>,
    pub dbeta: Vec<T>,
}

impl<T: TestFloat> Outputs<T> {
    /// The buffers with their names, in the order y, dx, dγ, dβ.
    fn named(&self) -> [(&'static str, &[T]); 4] {
        [
            ("y", &self.y),
            ("dx", &self.dx),
            ("dgamma", &self.dgamma),
            ("dbeta", &self.dbeta),
        ]
    }

    /// Asserts that every buffer holds the bits of `want`'s (`what(name)` names it).
    #[track_caller]
    pub fn assert_bits(&self, want: &Outputs<T>, what: impl Fn(&str) -> String) {
        for ((name, got), (_, want)) in self.named().into_iter().zip(want.named()) {
            assert_bits(&what(name), got, want);
        }
    }

    /// [`assert_near`] of every buffer against `want`'s, at `scales` (of y, dx, dγ, dβ in turn).
    #[track_caller]
    pub fn assert_near(&self, want: &Outputs<T>, scales: [&[f64]; 4], rel: f64, what: impl Fn(&str) -> String) {
        for (((name, got), (_, want)), scale) in self.named().into_iter().zip(want.named()).zip(scales) {
            assert_near(&what(name), got, want, scale, rel);
        }
    }

    /// The whole batch's outputs from the ranks' (in rank order): y and dx concatenated, dγ and
    /// dβ those every rank holds (asserted bit for bit).
    #[track_caller]
    pub fn gather<'a>(ranks: impl IntoIterator<Item = &'a Outputs<T>>) -> Outputs<T>
    where
        T: 'a,
    {
        let mut ranks = ranks.into_iter();
        let mut all = ranks.next().expect("at least one rank").clone();
        for r in ranks {
            assert_bits("dgamma across ranks", &r.dgamma, &all.dgamma);
            assert_bits("dbeta across ranks", &r.dbeta, &all.dbeta);
            all.y.extend_from_slice(&r.y);
            all.dx.extend_from_slice(&r.dx);
        }
        all
    }
}

/// The first example of each shard of `sizes`.
pub fn shard_starts(sizes: &[usize]) -> Vec<usize> {
    sizes
        .iter()
        .scan(0, |acc, &n| Some(std::mem::replace(acc, *acc + n)))
        .collect()
}

/// Runs `f` in rayon pools of 1, 2 and 3 threads and asserts that every run returns what the
/// first did (the kernels' results may not depend on the thread count).
#[track_caller]
pub fn assert_same_for_1_2_3_threads<R: PartialEq + Send>(what: &str, f: impl Fn() -> R + Send + Sync) {
    let runs: Vec<R> = [1usize, 2, 3]
        .into_iter()
        .map(|t| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
            pool.install(&f)
        })
        .collect();
    for (t, run) in runs.iter().enumerate().skip(1) {
        assert!(run == &runs[0], "{what}: 1 vs {} threads differ", t + 1);
    }
}
