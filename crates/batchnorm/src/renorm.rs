//! Batch renormalization (Ioffe, NeurIPS 2017, "Batch Renormalization: Towards Reducing Minibatch
//! Dependence in Batch-Normalized Models", Algorithm 1).
//!
//! Per channel, with moving mean μ and moving standard deviation σ (initialised to 0 and 1):
//!
//! - σ_B = √(ε + σ²_B) with σ²_B the biased batch variance;
//! - r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max), both treated as
//!   constants by the backward;
//! - x̂ = (x − μ_B)/σ_B·r + d, y = γ·x̂ + β;
//! - then μ ← μ + α(μ_B − μ), σ ← σ + α(σ_B − σ);
//! - inference: y = γ·(x − μ)/σ + β.
//!
//! With r_max = 1 and d_max = 0, r = 1 and d = 0 and training is plain batch norm (Algorithm 1 of
//! Ioffe & Szegedy 2015), outputs and gradients alike. The backward with r and d held constant is
//! plain batch norm's with γ replaced by γ·r: with x̂₀ = (x − μ_B)/σ_B,
//! dx = (γ·r/σ_B)·(dy − mean(dy) − x̂₀·mean(dy·x̂₀)), dγ = Σ dy·x̂ = r·Σ dy·x̂₀ + d·Σ dy, dβ = Σ dy.
//!
//! Free functions: [`batch_renorm_train`], [`batch_renorm_backward`], [`batch_renorm_eval`],
//! [`update_renorm_stats`]; a layer: [`BatchRenorm`], with synchronized (multi-worker) training
//! passes [`BatchRenorm::forward_train_sync`] and [`BatchRenorm::backward_sync`] over the global
//! batch; clipping limits [`RenormClip`], possibly following a [`RenormSchedule`].
//!
//! # How Keras differs
//!
//! Checked against the tf.keras 2 implementation (TensorFlow's
//! `tensorflow/python/keras/layers/normalization.py`, `BatchNormalizationBase`):
//!
//! - clipping comes as a dict `renorm_clipping` with optional keys `rmax`, `rmin`, `dmax`; a
//!   missing key means no clipping on that side (inf, 0, inf). Here r's lower limit is always
//!   1/r_max, as in the paper, and both limits are required.
//! - it keeps two sets of moving statistics: `renorm_mean`/`renorm_stddev`, updated with
//!   `renorm_momentum` (a decay: the weight of the old value, default 0.99) and used for r and d
//!   in training; and `moving_mean`/`moving_variance` (the latter through a `moving_stddev` of
//!   √(σ²_B + ε), stored back as `moving_stddev² − ε`), updated with `momentum`, used for
//!   inference as γ·(x − μ)/√(var + ε) + β. Here one moving mean and one moving σ serve both,
//!   as in the paper's Algorithm 1, and inference divides by σ itself.
//! - it divides by max(`renorm_stddev`, √ε) when computing r and d; here σ is used as it is.
//! - r and d are wrapped in `stop_gradient`, as here.

use crate::args::Scope;
use crate::backward::{check_train_backward, dx_coeffs, grad_sums, GradSums, SumsView};
use crate::check;
use crate::forward::{check_forward, normalize_affine};
use crate::kernels::elementwise::DxCoeffs;
use crate::kernels::plan;
use crate::kernels::scratch::Scratch;
use crate::kernels::simd::simd_dispatch;
use crate::kernels::with_simd;
use crate::stats::{batch_stats, inv_std_in_place, BatchStats, SavedStats};
use crate::sync::{sync_batch_stats, sync_grad_sums, Communicator};
use crate::{Affine, Element, Error, Geometry, Grads, View};

/// Clipping limits of batch renormalization: r ∈ [1/r_max, r_max], d ∈ [−d_max, d_max].
/// Always valid: r_max finite and ≥ 1, d_max finite and ≥ 0.
///
/// ```
/// use batchnorm::RenormClip;
/// let clip = RenormClip::new(3.0, 5.0).unwrap();
/// assert_eq!((clip.r_max(), clip.d_max()), (3.0, 5.0));
/// assert!(RenormClip::new(0.5, 0.0).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenormClip {
    r_max: f64,
    d_max: f64,
}

impl RenormClip {
    /// Limits `r_max`, `d_max`. Rejects ([`Error::InvalidRenormLimit`]) r_max not finite or < 1,
    /// d_max not finite or < 0.
    pub fn new(r_max: f64, d_max: f64) -> Result<Self, Error> {
        check::renorm_limits("r_max", r_max, "d_max", d_max)?;
        Ok(RenormClip { r_max, d_max })
    }

    /// r_max = 1, d_max = 0: r = 1 and d = 0, plain batch norm.
    pub fn identity() -> Self {
        RenormClip { r_max: 1.0, d_max: 0.0 }
    }

    /// The upper limit of r (its lower limit is 1/r_max).
    pub fn r_max(&self) -> f64 {
        self.r_max
    }

    /// The limit of |d|.
    pub fn d_max(&self) -> f64 {
        self.d_max
    }
}

/// A schedule for the clipping limits over training steps (the paper, Section 4.1: r_max = 1 and
/// d_max = 0 for the first 5000 steps, then relaxed gradually to reach r_max = 3 at 40k steps
/// and d_max = 5 at 25k steps; [`RenormSchedule::paper`]).
///
/// At step s (counting from 0): for s < `warmup_steps`, (1, 0); then each limit moves linearly
/// from its start (1 for r_max, 0 for d_max) to its final value over its ramp, reaching it at
/// s = `warmup_steps` + ramp and staying there; a ramp of 0 steps jumps at `warmup_steps`.
///
/// ```
/// use batchnorm::RenormSchedule;
/// let s = RenormSchedule::new(10, 20, 10, 3.0, 5.0).unwrap();
/// assert_eq!((s.at(9).r_max(), s.at(9).d_max()), (1.0, 0.0));
/// assert_eq!((s.at(20).r_max(), s.at(20).d_max()), (2.0, 5.0));
/// assert_eq!((s.at(1000).r_max(), s.at(1000).d_max()), (3.0, 5.0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenormSchedule {
    warmup_steps: u64,
    r_ramp_steps: u64,
    d_ramp_steps: u64,
    last: RenormClip,
}

impl RenormSchedule {
    /// A schedule: (1, 0) for `warmup_steps`, then r_max ramps to `r_max_final` over
    /// `r_ramp_steps` and d_max to `d_max_final` over `d_ramp_steps`.
    ///
    /// Rejects: `r_max_final` not finite or < 1, `d_max_final` not finite or < 0
    /// ([`Error::InvalidRenormLimit`]); `warmup_steps` plus a ramp that overflows `u64`
    /// ([`Error::InvalidRenormSchedule`]).
    pub fn new(
        warmup_steps: u64,
        r_ramp_steps: u64,
        d_ramp_steps: u64,
        r_max_final: f64,
        d_max_final: f64,
    ) -> Result<Self, Error> {
        check::renorm_limits("r_max_final", r_max_final, "d_max_final", d_max_final)?;
        check::renorm_ramps(warmup_steps, r_ramp_steps, d_ramp_steps)?;
        Ok(RenormSchedule {
            warmup_steps,
            r_ramp_steps,
            d_ramp_steps,
            last: RenormClip {
                r_max: r_max_final,
                d_max: d_max_final,
            },
        })
    }

    /// Fixed limits at every step.
    pub fn constant(clip: RenormClip) -> Self {
        RenormSchedule {
            warmup_steps: 0,
            r_ramp_steps: 0,
            d_ramp_steps: 0,
            last: clip,
        }
    }

    /// The paper's schedule (Section 4.1): (1, 0) for 5000 steps, r_max reaching 3 at 40k steps,
    /// d_max reaching 5 at 25k steps.
    pub fn paper() -> Self {
        RenormSchedule {
            warmup_steps: 5000,
            r_ramp_steps: 35_000,
            d_ramp_steps: 20_000,
            last: RenormClip { r_max: 3.0, d_max: 5.0 },
        }
    }

    /// Steps at (1, 0) before the ramps start.
    pub fn warmup_steps(&self) -> u64 {
        self.warmup_steps
    }

    /// Steps over which r_max ramps to its final value.
    pub fn r_ramp_steps(&self) -> u64 {
        self.r_ramp_steps
    }

    /// Steps over which d_max ramps to its final value.
    pub fn d_ramp_steps(&self) -> u64 {
        self.d_ramp_steps
    }

    /// The limits after the ramps.
    pub fn last(&self) -> RenormClip {
        self.last
    }

    /// The limits at training step `step` (0 for the first). Within [1, r_max_final] and
    /// [0, d_max_final], so always valid.
    pub fn at(&self, step: u64) -> RenormClip {
        let frac = |ramp: u64| -> f64 {
            if step < self.warmup_steps {
                0.0
            } else if step - self.warmup_steps >= ramp {
                1.0
            } else {
                (step - self.warmup_steps) as f64 / ramp as f64
            }
        };
        let (fr, fd) = (frac(self.r_ramp_steps), frac(self.d_ramp_steps));
        let r_max = if fr >= 1.0 {
            self.last.r_max
        } else {
            (1.0 + fr * (self.last.r_max - 1.0)).clamp(1.0, self.last.r_max)
        };
        let d_max = if fd >= 1.0 {
            self.last.d_max
        } else {
            (fd * self.last.d_max).clamp(0.0, self.last.d_max)
        };
        RenormClip { r_max, d_max }
    }
}

/// Batch renormalization's moving statistics, one of each per channel: the mean μ and the
/// standard deviation σ (ε included), the statistics argument of [`batch_renorm_train`] and
/// [`batch_renorm_eval`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenormStats<'a, T: Element> {
    /// μ per channel.
    pub mean: &'a [T::Param],
    /// σ per channel.
    pub std: &'a [T::Param],
}

impl<'a, T: Element> RenormStats<'a, T> {
    /// Moving mean and moving standard deviation, one of each per channel (in the tensor type's
    /// parameter type, [`Element::Param`]).
    pub fn new(mean: &'a [T::Param], std: &'a [T::Param]) -> Self {
        RenormStats { mean, std }
    }
}

/// What [`batch_renorm_backward`] needs from [`batch_renorm_train`], in `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct RenormSaved {
    /// Batch statistics: count, μ_B and 1/σ_B = 1/√(σ²_B + ε).
    pub stats: SavedStats,
    /// r per channel (a constant for the backward).
    pub r: Vec<f64>,
    /// d per channel (a constant for the backward).
    pub d: Vec<f64>,
}

/// r and d of one channel from μ_B, σ_B and the moving μ, σ (the one place these formulas live).
#[inline(always)]
fn correction(mean_b: f64, sigma_b: f64, mean: f64, sigma: f64, clip: RenormClip) -> (f64, f64) {
    let r = (sigma_b / sigma).clamp(1.0 / clip.r_max, clip.r_max);
    let d = ((mean_b - mean) / sigma).clamp(-clip.d_max, clip.d_max);
    (r, d)
}

/// Checks moving statistics against the channel count (named `moving_mean`, `moving_std`).
fn check_moving<T: Element>(channels: usize, moving: RenormStats<'_, T>) -> Result<(), Error> {
    check::moving_stats(channels, moving.mean, moving.std)
}

/// Batch renormalization's training forward (Ioffe 2017, Algorithm 1; see the module docs):
/// writes y = γ·((x − μ_B)/σ_B·r + d) + β and returns the batch statistics (for
/// [`update_renorm_stats`]) and what [`batch_renorm_backward`] needs. Does not update the moving
/// statistics. `affine`'s `None`s mean γ = 1 / β = 0.
///
/// Rejects: a shape that does not fit the layout, an empty shape, `x`/`y` of the wrong length,
/// `moving.mean`/`moving.std`/γ/β of the wrong channel count (named `moving_mean`, `moving_std`), ε not finite and > 0, fewer than 2
/// values per channel ([`Error::TooFewValues`]). The limits are valid by construction
/// ([`RenormClip`]). Moving statistics are data, not checked: a σ of 0 gives r = r_max and
/// d = ±d_max (or NaN for d where μ_B = μ), a NaN gives NaN, as IEEE says.
///
/// ```
/// use batchnorm::{batch_renorm_train, Affine, Layout, RenormClip, RenormStats, View};
/// let x = [1.0f64, 10.0, 3.0, 30.0]; // [N=2, C=2]
/// let mut y = [0.0; 4];
/// let clip = RenormClip::new(3.0, 5.0).unwrap();
/// let moving = RenormStats::new(&[0.0, 0.0], &[1.0, 1.0]);
/// let x = View::new(&x, &[2, 2], Layout::NC);
/// let (stats, saved) = batch_renorm_train(x, moving, Affine::NONE, 1e-5, clip, &mut y).unwrap();
/// assert_eq!(stats.mean, vec![2.0, 20.0]);
/// // σ_B = √(1 + ε) and √(100 + ε) against σ = 1: r ≈ 1, and ≈ 10 clipped to 3.
/// assert!((saved.r[0] - 1.0).abs() < 1e-5 && saved.r[1] == 3.0);
/// assert_eq!(saved.d, vec![2.0, 5.0]); // (μ_B − 0)/1 = 2, and 20 clipped to 5
/// ```
pub fn batch_renorm_train<T: Element>(
    x: View<'_, T>,
    moving: RenormStats<'_, T>,
    affine: Affine<'_, T>,
    eps: f64,
    clip: RenormClip,
    y: &mut [T],
) -> Result<(BatchStats, RenormSaved), Error> {
    let (g, _) = check_forward(x, None, y, |channels| check_moving(channels, moving), affine)?;
    check::eps(eps)?;
    check::training_count(g.per_channel() as u64, x.shape)?;
    // The statistics and y in one pass per channel where the plan fuses them, as plain batch
    // norm's training forward.
    let m = plan::train_forward_where(&g, x.data, y, None, None, |first, mean, scale, shift| {
        let (mut r, mut d) = (Scratch::any(scale.len()), Scratch::any(scale.len()));
        with_simd(|| inv_std_in_place(scale, eps));
        let out = TrainConstants {
            scale,
            shift,
            r: &mut r,
            d: &mut d,
        };
        train_constants::<T>(first, mean, out, moving, affine, clip);
    });
    let stats = BatchStats {
        count: g.per_channel() as u64,
        mean: m.mean,
        m2: m.m2,
    };
    let saved = stats.saved(eps)?;
    let (mut r, mut d) = (vec![0.0; g.channels], vec![0.0; g.channels]);
    corrections::<T>(0, &saved.mean, &saved.inv_std, moving, clip, &mut r, &mut d);
    Ok((stats, RenormSaved { stats: saved, r, d }))
}

simd_dispatch! {
    /// r and d ([`correction`]) of channels `first..first + r.len()` from their μ_B and 1/σ_B
    /// against the moving statistics.
    fn corrections<T>(
        first: usize,
        mean_b: &[f64], inv_std_b: &[f64], moving: RenormStats<'_, T>, clip: RenormClip, r: &mut [f64], d: &mut [f64]
    ) => corrections_at
}

/// The per-channel constants of a renormalizing training forward, y = (x − μ_B)·scale + shift,
/// of a run of channels: scale = γ·r/σ_B, shift = γ·d + β, and r and d ([`correction`]).
struct TrainConstants<'a> {
    scale: &'a mut [f64],
    shift: &'a mut [f64],
    r: &'a mut [f64],
    d: &'a mut [f64],
}

simd_dispatch! {
    /// [`TrainConstants`] of channels `first..first + out.scale.len()` from their μ_B and 1/σ_B
    /// (`out.scale` holds 1/σ_B on entry, computed once by the caller).
    fn train_constants<T>(
        first: usize, mean_b: &[f64], out: TrainConstants<'_>, moving: RenormStats<'_, T>, affine: Affine<'_, T>, clip: RenormClip
    ) => train_constants_impl
}

/// [`corrections`]. A slice loop, which vectorizes (these per-channel divisions weigh against
/// the passes over a batch of few rows).
#[inline(always)]
fn corrections_at<S, T: Element>(
    _: S,
    first: usize,
    mean_b: &[f64],
    inv_std_b: &[f64],
    moving: RenormStats<'_, T>,
    clip: RenormClip,
    r: &mut [f64],
    d: &mut [f64],
) {
    let end = first + r.len();
    let (mu, sigma) = (&moving.mean[first..end], &moving.std[first..end]);
    for i in 0..r.len() {
        (r[i], d[i]) = correction(mean_b[i], 1.0 / inv_std_b[i], mu[i].to_f64(), sigma[i].to_f64(), clip);
    }
}

#[inline(always)]
fn train_constants_impl<S, T: Element>(
    s: S,
    first: usize,
    mean_b: &[f64],
    out: TrainConstants<'_>,
    moving: RenormStats<'_, T>,
    affine: Affine<'_, T>,
    clip: RenormClip,
) {
    let TrainConstants { scale, shift, r, d } = out;
    corrections_at(s, first, mean_b, scale, moving, clip, r, d);
    // scale·r·γ and β + γ·d (γ = 1, β = 0 when absent: the same bits as those products and sums),
    // each case its own loop so that they vectorize.
    let n = scale.len();
    match affine.gamma.map(|g| &g[first..first + n]) {
        Some(g) => {
            for i in 0..n {
                let g = g[i].to_f64();
                scale[i] = scale[i] * r[i] * g;
                shift[i] = g * d[i];
            }
        }
        None => {
            for i in 0..n {
                scale[i] *= r[i];
            }
            shift.copy_from_slice(d);
        }
    }
    let beta = affine.beta.map(|b| &b[first..first + n]);
    for i in 0..n {
        shift[i] += beta.map_or(0.0, |b| b[i].to_f64());
    }
}

/// The training forward once the batch statistics are known (one process's, or the global
/// batch's merged over ranks): r and d against the moving statistics, then
/// y = (x − μ_B)·(γ·r/σ_B) + (γ·d + β). Arguments already checked; rejects only an invalid ε.
#[allow(clippy::too_many_arguments)]
fn renorm_normalize<T: Element>(
    g: &Geometry,
    x: &[T],
    stats: &BatchStats,
    moving: RenormStats<'_, T>,
    affine: Affine<'_, T>,
    eps: f64,
    clip: RenormClip,
    y: &mut [T],
) -> Result<RenormSaved, Error> {
    let saved = stats.saved(eps)?;
    let (mut r, mut d) = (vec![0.0; g.channels], vec![0.0; g.channels]);
    // 1/σ_B as `saved` holds it, computed once.
    let mut scale = Scratch::collect(saved.inv_std.iter().copied());
    let mut shift = Scratch::any(g.channels);
    let out = TrainConstants {
        scale: &mut scale,
        shift: &mut shift,
        r: &mut r,
        d: &mut d,
    };
    train_constants::<T>(0, &saved.mean, out, moving, affine, clip);
    plan::normalize(g, x, y, &saved.mean, &scale, &shift);
    Ok(RenormSaved { stats: saved, r, d })
}

/// Batch renormalization's backward with r and d held constant (see the module docs): writes any
/// of dx = (γ·r/σ_B)·(dy − mean(dy) − x̂₀·mean(dy·x̂₀)), dγ = Σ dy·x̂ and dβ = Σ dy that `grads`
/// holds.
///
/// Rejects: shape/length mismatches between the shape and `x`, `dy`, `dx`; `saved` (statistics,
/// r, d), γ, `dgamma`, `dbeta` of the wrong channel count; saved statistics with fewer than 2
/// values per channel.
pub fn batch_renorm_backward<T: Element>(
    x: View<'_, T>,
    dy: &[T],
    saved: &RenormSaved,
    gamma: Option<&[T::Param]>,
    grads: Grads<'_, T>,
) -> Result<(), Error> {
    let check_saved = |channels| check::renorm_saved(saved, channels);
    let g = check_train_backward(x, None, None, dy, check_saved, gamma, &grads, saved.stats.count)?;
    let (Grads { dx, dgamma, dbeta }, x) = (grads, x.data);
    let st = &saved.stats;
    let (sum_dy, sum_dy_xmu) = plan::train_backward(&g, x, dy, dx, &st.mean, |first, s1, s2, out| {
        let inv_std = &st.inv_std[first..first + s2.len()];
        let sum_dy_xhat0 = Scratch::collect(s2.iter().zip(inv_std).map(|(v, s)| v * s));
        let sums0 = SumsView {
            sum_dy: s1,
            sum_dy_xhat: &sum_dy_xhat0,
        };
        renorm_dx_coeffs(gamma, saved, first, sums0, out);
    });
    let sums = GradSums {
        sum_dy_xhat: sum_dy_xmu.iter().zip(&st.inv_std).map(|(v, s)| v * s).collect(),
        sum_dy,
    };
    renorm_param_sums(saved, &sums).write_param_grads(dgamma, dbeta)
}

/// dx coefficients of channels `first..first + out.len()` from their Σ dy and Σ dy·x̂₀
/// (`sums0`): plain batch norm's with γ·r in place of γ (r a constant).
#[inline]
fn renorm_dx_coeffs<T: Element>(
    gamma: Option<&[T]>,
    saved: &RenormSaved,
    first: usize,
    sums0: SumsView<'_>,
    out: &mut [DxCoeffs],
) {
    dx_coeffs(gamma, (&saved.stats).into(), first, sums0, out);
    for (o, r) in out.iter_mut().zip(&saved.r[first..]) {
        o.k *= r;
    }
}

/// The sums behind dγ and dβ from Σ dy and Σ dy·x̂₀ (`sums0`): Σ dy·x̂ = r·Σ dy·x̂₀ + d·Σ dy
/// (x̂ = x̂₀·r + d with r, d constants) and Σ dy.
fn renorm_param_sums(saved: &RenormSaved, sums0: &GradSums) -> GradSums {
    let (r, d) = (&saved.r, &saved.d);
    GradSums {
        sum_dy_xhat: (0..r.len())
            .map(|c| r[c] * sums0.sum_dy_xhat[c] + d[c] * sums0.sum_dy[c])
            .collect(),
        sum_dy: sums0.sum_dy.clone(),
    }
}

/// Batch renormalization's inference transform: y = γ·(x − μ)/σ + β with the moving mean μ and
/// moving standard deviation σ (ε is already inside σ).
///
/// Rejects: shape/length mismatches, `moving.mean`/`moving.std`/γ/β of the wrong channel count
/// (named `moving_mean`, `moving_std`). A σ of 0 or NaN is data: it gives ±Inf or NaN, as IEEE
/// says.
pub fn batch_renorm_eval<T: Element>(
    x: View<'_, T>,
    moving: RenormStats<'_, T>,
    affine: Affine<'_, T>,
    y: &mut [T],
) -> Result<(), Error> {
    let (g, _) = check_forward(x, None, y, |channels| check_moving(channels, moving), affine)?;
    let mean = Scratch::collect(moving.mean.iter().map(|v| v.to_f64()));
    let inv_std = Scratch::collect(moving.std.iter().map(|v| 1.0 / v.to_f64()));
    normalize_affine(&g, x.data, y, &mean, inv_std, affine, None, None);
    Ok(())
}

/// Updates batch renormalization's moving statistics with one batch: μ ← μ + α(μ_B − μ),
/// σ ← σ + α(σ_B − σ) with σ_B = √(σ²_B + ε) (biased batch variance), in `f64`, rounded to `T`.
///
/// Rejects: `moving_mean`/`moving_std` whose length differs from the batch's channels, α not
/// finite or outside (0, 1] ([`Error::InvalidMomentum`]), ε not finite and > 0, a batch with
/// fewer than 2 values per channel, batch statistics whose vectors differ in length.
pub fn update_renorm_stats<T: Element>(
    batch: &BatchStats,
    eps: f64,
    alpha: f64,
    moving_mean: &mut [T],
    moving_std: &mut [T],
) -> Result<(), Error> {
    check::batch_stats(batch)?;
    check::moving_stats(batch.channels(), moving_mean, moving_std)?;
    check::renorm_momentum(alpha)?;
    check::eps(eps)?;
    check::training_count(batch.count, &[])?;
    let mut inv_std_b = batch.var_biased();
    inv_std_in_place(&mut inv_std_b, eps);
    blend_moving::<T>(&batch.mean, &inv_std_b, alpha, moving_mean, moving_std);
    Ok(())
}

simd_dispatch! {
    /// μ ← μ + α(μ_B − μ), σ ← σ + α(σ_B − σ) every channel, from μ_B and 1/σ_B (σ_B = √(σ²_B + ε),
    /// the statistics the training forward saved).
    fn blend_moving<T>(mean_b: &[f64], inv_std_b: &[f64], alpha: f64, moving_mean: &mut [T], moving_std: &mut [T])
        => blend_moving_impl
}

#[inline(always)]
fn blend_moving_impl<S, T: Element>(
    _: S,
    mean_b: &[f64],
    inv_std_b: &[f64],
    alpha: f64,
    moving_mean: &mut [T],
    moving_std: &mut [T],
) {
    for (c, &inv_std_b) in inv_std_b.iter().enumerate() {
        let sigma_b = 1.0 / inv_std_b;
        let (mu, sigma) = (moving_mean[c].to_f64(), moving_std[c].to_f64());
        moving_mean[c] = T::from_f64(mu + alpha * (mean_b[c] - mu));
        moving_std[c] = T::from_f64(sigma + alpha * (sigma_b - sigma));
    }
}

/// Settings of a [`BatchRenorm`] layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchRenormConfig {
    /// ε inside σ_B = √(σ²_B + ε) (default 1e-5); must be finite and > 0.
    pub eps: f64,
    /// α, the weight of the batch in the moving averages (default 0.01, the weight that Keras's
    /// default `renorm_momentum` of 0.99 gives the batch); must be finite and in (0, 1].
    pub momentum: f64,
    /// The clipping limits by training step (default [`RenormSchedule::paper`]).
    pub limits: RenormSchedule,
    /// Learn γ and β (default true). Without, γ = 1 and β = 0 and no parameter gradients exist.
    pub affine: bool,
}

impl Default for BatchRenormConfig {
    fn default() -> Self {
        BatchRenormConfig {
            eps: 1e-5,
            momentum: 0.01,
            limits: RenormSchedule::paper(),
            affine: true,
        }
    }
}

/// A batch-renormalization layer over `num_features` channels: learned γ (1) and β (0), moving
/// mean (0) and moving standard deviation (1), and the count of training steps taken, which
/// drives the limits' schedule. Every field is public, to be saved and restored with a checkpoint.
///
/// ```
/// use batchnorm::{BatchRenorm, BatchRenormConfig, Grads, Layout, View};
/// let mut bn = BatchRenorm::<f32>::new(3, BatchRenormConfig::default()).unwrap();
/// let x: Vec<f32> = (0..2 * 3 * 4).map(|i| i as f32).collect(); // NCHW [2, 3, 2, 2]
/// let x = View::new(&x, &[2, 3, 2, 2], Layout::NCHW);
/// let mut y = vec![0.0; x.data.len()];
/// let saved = bn.forward_train(x, &mut y).unwrap();
/// assert_eq!(bn.steps, 1);
/// let (dy, mut dx) = (vec![1.0; y.len()], vec![0.0; y.len()]);
/// let (mut dgamma, mut dbeta) = (vec![0.0; 3], vec![0.0; 3]);
/// bn.backward(x, &dy, &saved, Grads::new(&mut dx, &mut dgamma, &mut dbeta)).unwrap();
/// assert_eq!(dbeta, vec![8.0; 3]);
/// bn.forward_eval(x, &mut y).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRenorm<T: Element> {
    /// The layer's settings.
    pub config: BatchRenormConfig,
    /// Number of channels.
    pub num_features: usize,
    /// γ, one per channel; empty when `affine` is false.
    pub gamma: Vec<T::Param>,
    /// β, one per channel; empty when `affine` is false.
    pub beta: Vec<T::Param>,
    /// Moving mean μ.
    pub moving_mean: Vec<T::Param>,
    /// Moving standard deviation σ (ε included).
    pub moving_std: Vec<T::Param>,
    /// Training steps taken (the step of the next `forward_train` in `config.limits`).
    pub steps: u64,
}

impl<T: Element> BatchRenorm<T> {
    /// A fresh layer. Rejects ε not finite and > 0 and a momentum α outside (0, 1].
    pub fn new(num_features: usize, config: BatchRenormConfig) -> Result<Self, Error> {
        check::eps(config.eps)?;
        check::renorm_momentum(config.momentum)?;
        let params = config.affine as usize;
        Ok(BatchRenorm {
            config,
            num_features,
            gamma: vec![T::Param::from_f64(1.0); num_features * params],
            beta: vec![T::Param::from_f64(0.0); num_features * params],
            moving_mean: vec![T::Param::from_f64(0.0); num_features],
            moving_std: vec![T::Param::from_f64(1.0); num_features],
            steps: 0,
        })
    }

    /// γ and β, or none without affine.
    fn affine(&self) -> Affine<'_, T> {
        if self.config.affine {
            Affine::new(&self.gamma, &self.beta)
        } else {
            Affine::NONE
        }
    }

    /// The moving statistics.
    fn moving(&self) -> RenormStats<'_, T> {
        RenormStats::new(&self.moving_mean, &self.moving_std)
    }

    /// The limits the next training step uses.
    pub fn clip(&self) -> RenormClip {
        self.config.limits.at(self.steps)
    }

    /// Training forward with the limits of step `steps`, then the moving-statistics update and
    /// `steps += 1`. Rejects what [`batch_renorm_train`] rejects, an input whose channel count
    /// differs from `num_features`, an invalid momentum α, and a step counter at `u64::MAX`
    /// ([`Error::InvalidRenormSchedule`]); on error nothing is changed.
    pub fn forward_train(&mut self, x: View<'_, T>, y: &mut [T]) -> Result<RenormSaved, Error> {
        check::layer_input(self.num_features, x.shape, x.layout)?;
        check::renorm_momentum(self.config.momentum)?;
        let next = check::renorm_next_step(self.steps)?;
        let (_, saved) = batch_renorm_train(x, self.moving(), self.affine(), self.config.eps, self.clip(), y)?;
        self.blend_moving(&saved);
        self.steps = next;
        Ok(saved)
    }

    /// [`update_renorm_stats`] from the statistics a training forward saved (checked by it, with
    /// σ_B = 1/saved 1/σ_B: the same numbers, without computing them again).
    fn blend_moving(&mut self, saved: &RenormSaved) {
        let (st, alpha) = (&saved.stats, self.config.momentum);
        blend_moving::<T::Param>(
            &st.mean,
            &st.inv_std,
            alpha,
            &mut self.moving_mean,
            &mut self.moving_std,
        );
    }

    /// Inference forward with the moving statistics. Rejects what [`batch_renorm_eval`] rejects
    /// and an input whose channel count differs from `num_features`.
    pub fn forward_eval(&self, x: View<'_, T>, y: &mut [T]) -> Result<(), Error> {
        check::layer_input(self.num_features, x.shape, x.layout)?;
        batch_renorm_eval(x, self.moving(), self.affine(), y)
    }

    /// Training backward (r, d constant): writes whichever of dx, dγ, dβ `grads` holds (dγ and dβ
    /// are ignored without affine). Rejects what [`batch_renorm_backward`] rejects and an input
    /// whose channel count differs from `num_features`.
    pub fn backward(&self, x: View<'_, T>, dy: &[T], saved: &RenormSaved, grads: Grads<'_, T>) -> Result<(), Error> {
        check::layer_input(self.num_features, x.shape, x.layout)?;
        batch_renorm_backward(x, dy, saved, self.affine().gamma, self.param_grads(grads))
    }

    /// `grads` without dγ and dβ when the layer has no affine parameters.
    fn param_grads<'a>(&self, grads: Grads<'a, T>) -> Grads<'a, T> {
        if self.config.affine {
            grads
        } else {
            Grads {
                dx: grads.dx,
                ..Grads::default()
            }
        }
    }

    /// Synchronized training forward of this rank's shard `x`: the batch statistics are the
    /// global batch's, merged over every rank of `comm` ([`sync_batch_stats`]); r and d come from
    /// the global μ_B and σ_B with the limits of step `steps`; the moving statistics are updated
    /// from the global batch, identically on every rank, and `steps += 1`. With
    /// [`crate::SingleProcess`] it computes the bits of [`BatchRenorm::forward_train`].
    /// Collective: every rank must call it.
    ///
    /// Rejects, before any communication, an input whose channel count differs from
    /// `num_features`, an invalid momentum α, a step counter at `u64::MAX`
    /// ([`Error::InvalidRenormSchedule`]), a `y` of the wrong length, moving statistics, γ or β
    /// of the wrong channel count, ε not finite and > 0, and what [`crate::batch_stats`] rejects
    /// (an empty shard included); after the merge, a global batch with fewer than 2 values per
    /// channel ([`Error::TooFewValues`], with the global count and this rank's shape). Transport
    /// failures are [`Error::Communication`]. On error `y` and the layer are unchanged.
    pub fn forward_train_sync(
        &mut self,
        comm: &dyn Communicator,
        x: View<'_, T>,
        y: &mut [T],
    ) -> Result<RenormSaved, Error> {
        check::layer_input(self.num_features, x.shape, x.layout)?;
        check::renorm_momentum(self.config.momentum)?;
        let next = check::renorm_next_step(self.steps)?;
        let (moving, affine) = (self.moving(), self.affine());
        let (g, _) = check_forward(x, None, y, |channels| check_moving(channels, moving), affine)?;
        check::eps(self.config.eps)?;
        let local = batch_stats(x)?;
        let global = sync_batch_stats(comm, &local)?;
        check::training_count(global.count, x.shape)?;
        let eps = self.config.eps;
        let saved = renorm_normalize(&g, x.data, &global, moving, affine, eps, self.clip(), y)?;
        self.blend_moving(&saved);
        self.steps = next;
        Ok(saved)
    }

    /// Synchronized training backward of this rank's shard, r and d held constant. The sums
    /// Σ dy and Σ dy·x̂₀ of every rank of `comm` are merged ([`sync_grad_sums`]); dx (when
    /// `grads` holds it) follows from the global statistics and sums, and with affine dγ = Σ dy·x̂
    /// and dβ = Σ dy are the global batch's, the same bits on every rank. The result is this
    /// rank's share of dγ and dβ (its own Σ dy·x̂ with x̂ = x̂₀·r + d, and Σ dy), for a caller that
    /// adds parameter gradients over ranks itself, as with [`crate::BatchNorm::backward_sync`].
    /// Over [`crate::SingleProcess`] it gives [`BatchRenorm::backward`]'s bits. Every rank must
    /// call it (collective).
    ///
    /// Rejects, before any communication, an input whose channel count differs from
    /// `num_features`, `saved` (statistics, r, d), γ, `dgamma`, `dbeta` of the wrong channel
    /// count, a `dx` of the wrong length, and what [`crate::grad_sums`] rejects (`x` and `dy` of
    /// the wrong length, saved statistics of fewer than 2 global values per channel); transport
    /// failures are [`Error::Communication`].
    pub fn backward_sync(
        &self,
        comm: &dyn Communicator,
        x: View<'_, T>,
        dy: &[T],
        saved: &RenormSaved,
        grads: Grads<'_, T>,
    ) -> Result<GradSums, Error> {
        let g = check::layer_input(self.num_features, x.shape, x.layout)?;
        let Grads { dx, dgamma, dbeta } = self.param_grads(grads);
        let gamma = self.affine().gamma;
        check::renorm_saved(saved, g.channels)?;
        check::affine(g.channels, gamma, None)?;
        check::param_grads(g.channels, dgamma.as_deref(), dbeta.as_deref())?;
        check::len_opt("dx", &g, dx.as_deref())?;
        // Checks x, dy and the (global) count, still before any communication.
        let local = grad_sums(x, dy, &saved.stats)?;
        let global = sync_grad_sums(comm, &local)?;
        if let Some(dx) = dx {
            let mut coeffs = Scratch::any(g.channels);
            with_simd(|| renorm_dx_coeffs(gamma, saved, 0, (&global).into(), &mut coeffs));
            plan::input_grad_where(&g, x.data, dy, dx, &coeffs, Scope::ALL);
        }
        renorm_param_sums(saved, &global).write_param_grads(dgamma, dbeta)?;
        Ok(renorm_param_sums(saved, &local))
    }
}
