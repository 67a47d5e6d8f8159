//! The backward transforms: training mode (the paper's chain rule through μ_B and σ²_B), inference
//! mode (fixed statistics), and the split-phase form for synchronized batch norm.

use crate::args::Scope;
use crate::check;
use crate::forward::gamma_at;
use crate::fused::ReluBackward;
use crate::kernels::elementwise::DxCoeffs;
use crate::kernels::plan;
use crate::kernels::relu::{self, MaskBits};
use crate::kernels::scratch::Scratch;
use crate::kernels::with_simd;
use crate::stats::{exact_reciprocal, inv_stds, SavedStats};
use crate::{Element, Error, FixedStats, Geometry, Grads, View};

/// Per-channel reductions of backward: Σ dy (= ∂ℓ/∂β) and Σ dy·x̂ (= ∂ℓ/∂γ). Mergeable by
/// addition ([`GradSums::add`]): the reduction phase of synchronized batch norm.
#[derive(Debug, Clone, PartialEq)]
pub struct GradSums {
    /// Σ dy per channel.
    pub sum_dy: Vec<f64>,
    /// Σ dy·x̂ per channel.
    pub sum_dy_xhat: Vec<f64>,
}

impl GradSums {
    /// Adds another worker's sums (in a fixed order for deterministic bits).
    /// Rejects a different channel count ([`Error::MergeMismatch`]).
    pub fn add(&mut self, other: &GradSums) -> Result<(), Error> {
        if self.sum_dy.len() != other.sum_dy.len()
            || self.sum_dy_xhat.len() != self.sum_dy.len()
            || other.sum_dy_xhat.len() != other.sum_dy.len()
        {
            return Err(Error::MergeMismatch {
                left: self.sum_dy.len(),
                right: other.sum_dy.len(),
            });
        }
        self.sum_dy.iter_mut().zip(&other.sum_dy).for_each(|(a, b)| *a += b);
        self.sum_dy_xhat
            .iter_mut()
            .zip(&other.sum_dy_xhat)
            .for_each(|(a, b)| *a += b);
        Ok(())
    }

    /// Writes ∂ℓ/∂γ = Σ dy·x̂ and ∂ℓ/∂β = Σ dy. Rejects outputs of the wrong length.
    pub fn write_param_grads<T: Element>(
        &self,
        dgamma: Option<&mut [T]>,
        dbeta: Option<&mut [T]>,
    ) -> Result<(), Error> {
        let channels = self.sum_dy.len();
        check::grad_sums(self)?;
        check::param_grads(channels, dgamma.as_deref(), dbeta.as_deref())?;
        if let Some(dg) = dgamma {
            dg.iter_mut()
                .zip(&self.sum_dy_xhat)
                .for_each(|(o, &v)| *o = T::from_f64(v));
        }
        if let Some(db) = dbeta {
            db.iter_mut().zip(&self.sum_dy).for_each(|(o, &v)| *o = T::from_f64(v));
        }
        Ok(())
    }
}

/// dx coefficients (see `kernels::elementwise::DxCoeffs`) of channels `first..first +
/// out.len()` from their Σ dy and Σ dy·x̂ (`sums`): the paper's ∂ℓ/∂xᵢ = ∂ℓ/∂x̂ᵢ·inv_std +
/// ∂ℓ/∂σ²·2(xᵢ − μ)/m + ∂ℓ/∂μ/m, simplified. Slice loops, which vectorize.
#[inline(always)]
pub(crate) fn dx_coeffs<T: Element>(
    gamma: Option<&[T]>,
    saved: StatsView<'_>,
    first: usize,
    sums: SumsView<'_>,
    out: &mut [DxCoeffs],
) {
    let m = saved.count as f64;
    let end = first + out.len();
    let stats = saved.mean[first..end].iter().zip(&saved.inv_std[first..end]);
    let sums = sums.sum_dy.iter().zip(sums.sum_dy_xhat);
    let values = out.iter_mut().zip(sums).zip(stats);
    // Divided by m, or multiplied by its exact reciprocal (the same bits, no division).
    match exact_reciprocal(m) {
        Some(r) => coeffs_over(values, |v| v * r),
        None => coeffs_over(values, |v| v / m),
    }
    if let Some(g) = gamma {
        for (o, g) in out.iter_mut().zip(&g[first..end]) {
            o.k *= g.to_f64();
        }
    }
}

/// [`dx_coeffs`]'s loop over (out, (Σ dy, Σ dy·x̂), (mean, inv_std)) of each channel, with
/// `per_value(v)` = v/m.
#[inline(always)]
fn coeffs_over<'a>(
    values: impl Iterator<Item = ((&'a mut DxCoeffs, (&'a f64, &'a f64)), (&'a f64, &'a f64))>,
    per_value: impl Fn(f64) -> f64,
) {
    for ((o, (&s1, &s2)), (&mean, &s)) in values {
        *o = DxCoeffs {
            mean,
            k: s,
            a: per_value(s1),
            b: per_value(s * s2),
        };
    }
}

/// Σ dy and Σ dy·x̂ of a run of channels, borrowed: a [`GradSums`]'s, or the sums a kernel pass
/// returns for the channels it covers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SumsView<'a> {
    /// Σ dy per channel.
    pub sum_dy: &'a [f64],
    /// Σ dy·x̂ per channel.
    pub sum_dy_xhat: &'a [f64],
}

impl<'a> From<&'a GradSums> for SumsView<'a> {
    fn from(s: &'a GradSums) -> Self {
        SumsView {
            sum_dy: &s.sum_dy,
            sum_dy_xhat: &s.sum_dy_xhat,
        }
    }
}

/// The saved statistics a training backward reads, borrowed: a [`SavedStats`]'s, or one group's
/// of a ghost layer's packed ones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatsView<'a> {
    /// Values per channel.
    pub count: u64,
    /// μ per channel.
    pub mean: &'a [f64],
    /// 1/√(σ² + ε) per channel.
    pub inv_std: &'a [f64],
}

impl<'a> From<&'a SavedStats> for StatsView<'a> {
    fn from(s: &'a SavedStats) -> Self {
        StatsView {
            count: s.count,
            mean: &s.mean,
            inv_std: &s.inv_std,
        }
    }
}

/// The checks of a training backward, in this order: `x` against its shape and layout, `dy`
/// against `x`, the mask over positions, the fused ReLU's mask and dz (see [`ReluBackward::check`]),
/// `dx` against `x`, the saved statistics (`check_saved`, given the channel count), γ, dγ and dβ
/// against the channel count, then the saved `count` of values per channel. Returns the geometry.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_train_backward<T: Element>(
    x: View<'_, T>,
    mask: Option<&[bool]>,
    relu: Option<&ReluBackward<'_, T>>,
    dy: &[T],
    check_saved: impl FnOnce(usize) -> Result<(), Error>,
    gamma: Option<&[T::Param]>,
    grads: &Grads<'_, T>,
    count: u64,
) -> Result<Geometry, Error> {
    let (g, _) = check::input_pair(x.data, x.shape, x.layout, ("dy", dy), mask)?;
    ReluBackward::check(relu, &g)?;
    check::len_opt("dx", &g, grads.dx.as_deref())?;
    check_saved(g.channels)?;
    check::affine(g.channels, gamma, None)?;
    check::param_grads(g.channels, grads.dgamma.as_deref(), grads.dbeta.as_deref())?;
    check::training_count(count, x.shape)?;
    Ok(g)
}

/// Training-mode backward of Algorithm 1: from dy (the shape of x) and the saved statistics,
/// writes any of dx, dγ (= Σ dy·x̂) and dβ (= Σ dy) that `grads` holds. Two passes over x and dy at most (one
/// when dx is not asked for), fused per channel where the layout allows.
///
/// Rejects: shape/length mismatches between the shape and `x`, `dy`, `dx`; `saved`, γ, `dgamma`,
/// `dbeta` of the wrong channel count; saved statistics with fewer than 2 values per channel.
pub fn batch_norm_backward<T: Element>(
    x: View<'_, T>,
    dy: &[T],
    saved: &SavedStats,
    gamma: Option<&[T::Param]>,
    grads: Grads<'_, T>,
) -> Result<(), Error> {
    backward_where(x, Scope::ALL, dy, saved, gamma, grads)
}

/// [`batch_norm_backward`] over the positions `mask` selects (`None`: all of them), dx +0.0
/// elsewhere; with `relu`, through a fused ReLU (see [`crate::batch_norm_backward_relu`]).
/// Checks, in order: the shape and `x`, `dy`, the mask's length, the ReLU's mask and dz, `dx`,
/// `saved`, γ, dγ/dβ, the saved count.
pub(crate) fn backward_where<T: Element>(
    x: View<'_, T>,
    scope: Scope<'_, ReluBackward<'_, T>>,
    dy: &[T],
    saved: &SavedStats,
    gamma: Option<&[T::Param]>,
    grads: Grads<'_, T>,
) -> Result<(), Error> {
    let Scope { mask, relu } = scope;
    let check_saved = |channels| check::saved(saved, channels);
    let g = check_train_backward(x, mask, relu.as_ref(), dy, check_saved, gamma, &grads, saved.count)?;
    let Grads { dx, dgamma, dbeta } = grads;
    let relu = relu.map(|r| r.start(&g));
    train_backward_sums(&g, x.data, mask, relu, dy, dx, saved.into(), gamma).write_param_grads(dgamma, dbeta)
}

/// The work of [`batch_norm_backward`] once its arguments are checked: writes dx when given (at
/// the positions `mask` selects, `None`: all of them, +0.0 elsewhere; with `relu`, from dy·\[kept\],
/// and dz) and returns Σ dy and Σ dy·x̂ per channel (for dβ and dγ) over the selected positions.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_backward_sums<T: Element>(
    g: &Geometry,
    x: &[T],
    mask: Option<&[bool]>,
    relu: Option<relu::Backward<'_, T>>,
    dy: &[T],
    dx: Option<&mut [T]>,
    saved: StatsView<'_>,
    gamma: Option<&[T::Param]>,
) -> GradSums {
    let (relu, dz_alone) = dz_with(dx.is_some(), relu);
    let (sum_dy, sum_dy_xmu) =
        plan::train_backward_where(g, x, dy, dx, saved.mean, mask, relu, |first, s1, s2, out| {
            centered_dx_coeffs(gamma, saved, first, s1, s2, out)
        });
    if let Some((bits, dz)) = dz_alone {
        upstream_alone(g, dy, bits, dz);
    }
    GradSums {
        sum_dy_xhat: sum_dy_xmu.iter().zip(saved.inv_std).map(|(v, s)| v * s).collect(),
        sum_dy,
    }
}

/// [`dx_coeffs`] from the sums the kernels take, Σ dy and Σ dy·(x − μ) of channels
/// `first..first + out.len()`: Σ dy·x̂ = inv_std·Σ dy·(x − μ).
#[inline(always)]
pub(crate) fn centered_dx_coeffs<T: Element>(
    gamma: Option<&[T]>,
    saved: StatsView<'_>,
    first: usize,
    sum_dy: &[f64],
    sum_dy_xmu: &[f64],
    out: &mut [DxCoeffs],
) {
    let inv_std = &saved.inv_std[first..first + sum_dy_xmu.len()];
    let sum_dy_xhat = Scratch::collect(sum_dy_xmu.iter().zip(inv_std).map(|(v, s)| v * s));
    let sums = SumsView {
        sum_dy,
        sum_dy_xhat: &sum_dy_xhat,
    };
    dx_coeffs(gamma, saved, first, sums, out);
}

/// A fused backward's ReLU as the dx pass takes it, and the dz it cannot write: dz comes out of
/// the pass that writes dx, so without dx (`with_dx` false) it is returned with the mask's bits,
/// for [`upstream_alone`].
#[allow(clippy::type_complexity)]
fn dz_with<'a, T>(
    with_dx: bool,
    relu: Option<relu::Backward<'a, T>>,
) -> (Option<relu::Backward<'a, T>>, Option<(MaskBits<'a>, &'a mut [T])>) {
    match relu {
        Some(relu::Backward { bits, dz: Some(dz) }) if !with_dx => {
            (Some(relu::Backward { bits, dz: None }), Some((bits, dz)))
        }
        relu => (relu, None),
    }
}

/// dz = dy·\[kept\] (the upstream gradient behind a fused ReLU) when no dx pass writes it: the
/// inference-mode dx pass with k = 1, an exact product.
fn upstream_alone<T: Element>(g: &Geometry, dy: &[T], bits: MaskBits<'_>, dz: &mut [T]) {
    let ones = Scratch::collect(std::iter::repeat_n(1.0, g.channels));
    plan::scale_where(g, dy, dz, &ones, Scope::relu(relu::Backward { bits, dz: None }));
}

/// Phase 1 of the split-phase backward: this worker's Σ dy and Σ dy·x̂ per channel, to be merged
/// over workers with [`GradSums::add`]. Rejects the same as [`batch_norm_backward`].
pub fn grad_sums<T: Element>(x: View<'_, T>, dy: &[T], saved: &SavedStats) -> Result<GradSums, Error> {
    grad_sums_where(x, None, dy, saved)
}

/// [`grad_sums`] over the positions `mask` selects (`None`: all of them). Checks, in order: the
/// shape and `x`, `dy`, the mask's length, `saved`, the saved count.
pub(crate) fn grad_sums_where<T: Element>(
    x: View<'_, T>,
    mask: Option<&[bool]>,
    dy: &[T],
    saved: &SavedStats,
) -> Result<GradSums, Error> {
    let View { data: x, shape, layout } = x;
    let (g, _) = check::input_pair(x, shape, layout, ("dy", dy), mask)?;
    check::saved(saved, g.channels)?;
    check::training_count(saved.count, shape)?;
    let (sum_dy, sum_dy_xmu) = plan::grad_sums_where(&g, x, dy, &saved.mean, mask, None);
    let sum_dy_xhat = sum_dy_xmu.iter().zip(&saved.inv_std).map(|(v, s)| v * s).collect();
    Ok(GradSums { sum_dy, sum_dy_xhat })
}

/// Phase 2 of the split-phase backward: dx from the merged (global) sums and the global count in
/// `saved.count`. With one worker it gives the same bits as [`batch_norm_backward`].
/// Rejects the same as [`batch_norm_backward`], and `sums` of the wrong channel count.
pub fn input_grad<T: Element>(
    x: View<'_, T>,
    dy: &[T],
    saved: &SavedStats,
    sums: &GradSums,
    gamma: Option<&[T::Param]>,
    dx: &mut [T],
) -> Result<(), Error> {
    input_grad_where(x, None, dy, saved, sums, gamma, dx)
}

/// [`input_grad`] at the positions `mask` selects (`None`: all of them), +0.0 elsewhere. Checks,
/// in order: the shape and `x`, `dy`, the mask's length, `dx`, `saved`, `sums`, γ, the saved count.
pub(crate) fn input_grad_where<T: Element>(
    x: View<'_, T>,
    mask: Option<&[bool]>,
    dy: &[T],
    saved: &SavedStats,
    sums: &GradSums,
    gamma: Option<&[T::Param]>,
    dx: &mut [T],
) -> Result<(), Error> {
    let View { data: x, shape, layout } = x;
    let (g, _) = check::input_pair(x, shape, layout, ("dy", dy), mask)?;
    check::len("dx", &g, dx.len())?;
    check::saved(saved, g.channels)?;
    check::grad_sums_channels(sums, g.channels)?;
    check::affine(g.channels, gamma, None)?;
    check::training_count(saved.count, shape)?;
    let mut coeffs = Scratch::any(g.channels);
    with_simd(|| dx_coeffs(gamma, saved.into(), 0, sums.into(), &mut coeffs));
    plan::input_grad_where(&g, x, dy, dx, &coeffs, Scope { mask, relu: None });
    Ok(())
}

/// Inference-mode backward (statistics are constants, e.g. fine-tuning with frozen BN):
/// dx = dy·γ/√(Var + ε), dγ = Σ dy·x̂, dβ = Σ dy, with x̂ from the given mean and variance.
///
/// Rejects: shape/length mismatches, `stats.mean`/`stats.var`/γ/`dgamma`/`dbeta` of the wrong channel count,
/// ε not finite and > 0.
pub fn batch_norm_backward_eval<T: Element>(
    x: View<'_, T>,
    dy: &[T],
    stats: FixedStats<'_, T>,
    gamma: Option<&[T::Param]>,
    eps: f64,
    grads: Grads<'_, T>,
) -> Result<(), Error> {
    backward_eval_where(x, Scope::ALL, dy, stats, gamma, eps, grads)
}

/// [`batch_norm_backward_eval`] over the positions `mask` selects (`None`: all of them), dx +0.0
/// elsewhere; with `relu`, through a fused ReLU (see [`crate::batch_norm_backward_eval_relu`]).
/// Checks, in order: the shape and `x`, `dy`, the mask's length, the ReLU's mask and dz, the
/// statistics, γ, dγ/dβ, ε, `dx`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_eval_where<T: Element>(
    x: View<'_, T>,
    scope: Scope<'_, ReluBackward<'_, T>>,
    dy: &[T],
    stats: FixedStats<'_, T>,
    gamma: Option<&[T::Param]>,
    eps: f64,
    grads: Grads<'_, T>,
) -> Result<(), Error> {
    let (Scope { mask, relu }, FixedStats { mean, var }) = (scope, stats);
    let Grads { dx, dgamma, dbeta } = grads;
    let View { data: x, shape, layout } = x;
    let (g, _) = check::input_pair(x, shape, layout, ("dy", dy), mask)?;
    ReluBackward::check(relu.as_ref(), &g)?;
    check::fixed_stats(g.channels, mean, var)?;
    check::affine(g.channels, gamma, None)?;
    check::param_grads(g.channels, dgamma.as_deref(), dbeta.as_deref())?;
    check::eps(eps)?;
    check::len_opt("dx", &g, dx.as_deref())?;
    let inv = inv_stds(var, eps);
    let (relu, dz_alone) = dz_with(dx.is_some(), relu.map(|r| r.start(&g)));
    let bits = relu.as_ref().map(|r| r.bits);
    let sums = match (dx, dgamma.is_some() || dbeta.is_some()) {
        (Some(dx), true) => Some(fixed_backward(&g, x, dy, mask, relu, mean, gamma, &inv, dx)),
        (dx, with_sums) => {
            if let Some(dx) = dx {
                fixed_input_grad(&g, dy, mask, relu, gamma, &inv, dx);
            }
            with_sums.then(|| fixed_grad_sums(&g, x, dy, mask, bits, mean, &inv))
        }
    };
    if let Some((bits, dz)) = dz_alone {
        upstream_alone(&g, dy, bits, dz);
    }
    match sums {
        Some(sums) => sums.write_param_grads(dgamma, dbeta),
        None => Ok(()),
    }
}

/// dx as [`fixed_input_grad`] writes it and the sums [`fixed_grad_sums`] returns, in one pass
/// over x and dy (see `kernels::plan::fixed_backward_where`): the same bits as those two.
/// Arguments already checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fixed_backward<T: Element>(
    g: &Geometry,
    x: &[T],
    dy: &[T],
    mask: Option<&[bool]>,
    relu: Option<relu::Backward<'_, T>>,
    mean: &[T::Param],
    gamma: Option<&[T::Param]>,
    inv_std: &[f64],
    dx: &mut [T],
) -> GradSums {
    let k = fixed_scale(g, gamma, inv_std);
    let mean = Scratch::collect(mean.iter().map(|v| v.to_f64()));
    let pass = plan::FixedBackward {
        x,
        dy,
        mean: &mean,
        k: &k,
        mask,
        relu,
    };
    let (sum_dy, sum_dy_xmu) = plan::fixed_backward_where(g, pass, dx);
    fixed_sums(sum_dy, &sum_dy_xmu, inv_std)
}

/// The factors k = γ·inv_std of dx = dy·k per channel, through fixed statistics.
fn fixed_scale<T: Element>(g: &Geometry, gamma: Option<&[T]>, inv_std: &[f64]) -> Scratch<f64> {
    Scratch::collect((0..g.channels).map(|c| gamma_at(gamma, c) * inv_std[c]))
}

/// Σ dy and Σ dy·x̂ = inv_std·Σ dy·(x − mean), from Σ dy and Σ dy·(x − mean).
fn fixed_sums(sum_dy: Vec<f64>, sum_dy_xmu: &[f64], inv_std: &[f64]) -> GradSums {
    GradSums {
        sum_dy_xhat: sum_dy_xmu.iter().zip(inv_std).map(|(v, s)| v * s).collect(),
        sum_dy,
    }
}

/// dx = dy·γ·inv_std per channel: the backward through fixed statistics (inference mode, frozen
/// batch norm), at the positions `mask` selects (`None`: all of them), +0.0 elsewhere; with
/// `relu`, from dy·\[kept\], and dz. Arguments already checked.
pub(crate) fn fixed_input_grad<T: Element>(
    g: &Geometry,
    dy: &[T],
    mask: Option<&[bool]>,
    relu: Option<relu::Backward<'_, T>>,
    gamma: Option<&[T::Param]>,
    inv_std: &[f64],
    dx: &mut [T],
) {
    let k = fixed_scale(g, gamma, inv_std);
    plan::scale_where(g, dy, dx, &k, Scope { mask, relu });
}

/// Σ dy and Σ dy·x̂ per channel with x̂ = (x − mean)·inv_std from fixed statistics (inference
/// mode, frozen batch norm), over the positions `mask` selects (`None`: all of them; with
/// `relu`, of dy·\[kept\]). Arguments already checked.
pub(crate) fn fixed_grad_sums<T: Element>(
    g: &Geometry,
    x: &[T],
    dy: &[T],
    mask: Option<&[bool]>,
    relu: Option<MaskBits>,
    mean: &[T::Param],
    inv_std: &[f64],
) -> GradSums {
    let mean = Scratch::collect(mean.iter().map(|v| v.to_f64()));
    let (sum_dy, sum_dy_xmu) = plan::grad_sums_where(g, x, dy, &mean, mask, relu);
    fixed_sums(sum_dy, &sum_dy_xmu, inv_std)
}
