//! The forward transforms: training (Algorithm 1), inference (Algorithm 2's affine map) and the
//! normalization step of the split-phase (synchronized) form.

use crate::args::Scope;
use crate::check;
use crate::fused::ReluForward;
use crate::kernels::scratch::Scratch;
use crate::kernels::with_simd;
use crate::kernels::{plan, relu};
use crate::stats::{inv_std_in_place, inv_stds, BatchStats, SavedStats};
use crate::{Affine, Element, Error, FixedStats, Geometry, View};

/// Turns `scale`, holding 1/√(σ² + ε) for channels `first..first + scale.len()`, into the
/// normalization's scale γ·1/√(σ² + ε), and writes β into `shift` (γ = 1 and β = 0 without
/// affine parameters). Slice loops, which vectorize.
#[inline]
pub(crate) fn scale_shift<T: Element>(
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
    first: usize,
    scale: &mut [f64],
    shift: &mut [f64],
) {
    let end = first + scale.len();
    if let Some(g) = gamma {
        for (s, g) in scale.iter_mut().zip(&g[first..end]) {
            *s *= g.to_f64();
        }
    }
    match beta {
        Some(b) => {
            for (s, b) in shift.iter_mut().zip(&b[first..end]) {
                *s = b.to_f64();
            }
        }
        None => shift.fill(0.0),
    }
}

/// The checks every forward transform starts with, in this order: `x` against its shape and
/// layout, `y` against `x`, the optional mask over positions, the statistics (`check_stats`, given
/// the channel count), then γ and β against the channel count. Returns the geometry and the count
/// of values per channel the mask selects (all of them without one).
pub(crate) fn check_forward<T: Element>(
    x: View<'_, T>,
    mask: Option<&[bool]>,
    y: &[T],
    check_stats: impl FnOnce(usize) -> Result<(), Error>,
    affine: Affine<'_, T>,
) -> Result<(Geometry, u64), Error> {
    let (g, count) = check::input_pair(x.data, x.shape, x.layout, ("y", y), mask)?;
    check_stats(g.channels)?;
    check::affine(g.channels, affine.gamma, affine.beta)?;
    Ok((g, count))
}

/// y = (x − mean)·γ·inv_std + β per channel over `x` (already checked against `g`), the last
/// step of the forward transforms, with `inv_std` holding each channel's 1/σ (γ = 1 and β = 0
/// where `affine` has none); only at the positions `mask` selects (`None`: all), +0.0 elsewhere;
/// with `relu`, fused with what follows in the same pass.
#[allow(clippy::too_many_arguments)]
pub(crate) fn normalize_affine<T: Element>(
    g: &Geometry,
    x: &[T],
    y: &mut [T],
    mean: &[f64],
    inv_std: Scratch<f64>,
    affine: Affine<'_, T>,
    mask: Option<&[bool]>,
    relu: Option<relu::Forward<'_, T>>,
) {
    let mut scale = inv_std;
    let mut shift = Scratch::any(g.channels);
    with_simd(|| scale_shift(affine.gamma, affine.beta, 0, &mut scale, &mut shift));
    plan::normalize_where(g, x, y, mean, &scale, &shift, mask, relu);
}

/// γ_c (1 without affine).
#[inline]
pub(crate) fn gamma_at<T: Element>(gamma: Option<&[T]>, c: usize) -> f64 {
    gamma.map_or(1.0, |g| g[c].to_f64())
}

/// β_c (0 without affine).
#[inline]
pub(crate) fn beta_at<T: Element>(beta: Option<&[T]>, c: usize) -> f64 {
    beta.map_or(0.0, |b| b[c].to_f64())
}

/// Algorithm 1, the batch-normalizing transform over a mini-batch: per channel μ_B, σ²_B (biased),
/// x̂ = (x − μ_B)/√(σ²_B + ε), y = γ·x̂ + β. `affine.gamma`/`affine.beta` = `None` means γ = 1 / β = 0.
///
/// Returns the batch statistics (for running averages) and what backward needs.
///
/// Rejects: a shape that does not fit the layout, an empty shape, `x`/`y` lengths that differ from
/// the shape's, γ/β lengths that differ from the channel count, fewer than 2 values per channel
/// ([`Error::TooFewValues`]), ε not finite and > 0. NaN/Inf in `x` propagate to the statistics and
/// the outputs of that channel.
///
/// ```
/// use batchnorm::{batch_norm_train, Affine, Layout, View};
/// let x = [1.0f32, 10.0, 3.0, 30.0]; // [N=2, C=2]
/// let mut y = [0.0f32; 4];
/// let (stats, _saved) = batch_norm_train(View::new(&x, &[2, 2], Layout::NC), Affine::NONE, 1e-5, &mut y).unwrap();
/// assert_eq!(stats.mean, vec![2.0, 20.0]);
/// assert!((y[0] + 1.0).abs() < 1e-4 && (y[3] - 1.0).abs() < 1e-4);
/// ```
pub fn batch_norm_train<T: Element>(
    x: View<'_, T>,
    affine: Affine<'_, T>,
    eps: f64,
    y: &mut [T],
) -> Result<(BatchStats, SavedStats), Error> {
    train_where(x, Scope::ALL, affine, eps, y)
}

/// [`batch_norm_train`] over the positions `mask` selects (`None`: all of them; see
/// [`crate::batch_norm_train_masked`]), +0.0 in y elsewhere; with `relu`, fused with what
/// follows (see [`crate::batch_norm_train_relu`]). Checks, in order: the shape and `x`, `y`, the
/// mask's length, γ/β, z, ε, the count of selected values per channel.
pub(crate) fn train_where<T: Element>(
    x: View<'_, T>,
    scope: Scope<'_, ReluForward<'_, T>>,
    affine: Affine<'_, T>,
    eps: f64,
    y: &mut [T],
) -> Result<(BatchStats, SavedStats), Error> {
    let Scope { mask, relu } = scope;
    let (g, count) = check_forward(x, mask, y, |_| Ok(()), affine)?;
    ReluForward::check(relu.as_ref(), &g)?;
    check::eps(eps)?;
    check::training_count(count, x.shape)?;
    let relu = relu.map(|r| r.start(&g));
    let Affine { gamma, beta } = affine;
    let m = plan::train_forward_where(&g, x.data, y, mask, relu, |first, _, scale, shift| {
        inv_std_in_place(scale, eps);
        scale_shift(gamma, beta, first, scale, shift);
    });
    let stats = BatchStats {
        count,
        mean: m.mean,
        m2: m.m2,
    };
    let saved = stats.saved(eps)?;
    Ok((stats, saved))
}

/// The normalization step given (global) statistics: y = (x − μ)·γ·inv_std + β. With statistics
/// from [`crate::batch_stats`] merged over workers, this is the second phase of synchronized batch
/// norm; with one worker it gives the same bits as [`batch_norm_train`].
///
/// Rejects: shape/length mismatches as [`batch_norm_train`], and `saved` or γ/β of the wrong channel count.
pub fn normalize<T: Element>(
    x: View<'_, T>,
    saved: &SavedStats,
    affine: Affine<'_, T>,
    y: &mut [T],
) -> Result<(), Error> {
    normalize_where(x, None, saved, affine, y)
}

/// [`normalize`] at the positions `mask` selects (`None`: all of them), +0.0 in y elsewhere.
/// Checks, in order: the shape and `x`, `y`, the mask's length, `saved`, γ/β.
pub(crate) fn normalize_where<T: Element>(
    x: View<'_, T>,
    mask: Option<&[bool]>,
    saved: &SavedStats,
    affine: Affine<'_, T>,
    y: &mut [T],
) -> Result<(), Error> {
    let (g, _) = check_forward(x, mask, y, |channels| check::saved(saved, channels), affine)?;
    let inv_std = Scratch::collect(saved.inv_std.iter().copied());
    normalize_affine(&g, x.data, y, &saved.mean, inv_std, affine, mask, None);
    Ok(())
}

/// Inference (Algorithm 2): y = γ·(x − E\[x\])/√(Var\[x\] + ε) + β with fixed statistics (running or
/// population), in one fused pass per element.
///
/// Rejects: shape/length mismatches, `stats.mean`/`stats.var`/γ/β of the wrong channel count, ε not finite
/// and > 0. A negative variance is not rejected; it gives NaN for that channel, as IEEE says.
pub fn batch_norm_eval<T: Element>(
    x: View<'_, T>,
    stats: FixedStats<'_, T>,
    affine: Affine<'_, T>,
    eps: f64,
    y: &mut [T],
) -> Result<(), Error> {
    eval_where(x, Scope::ALL, stats, affine, eps, y)
}

/// [`batch_norm_eval`] at the positions `mask` selects (`None`: all of them), +0.0 in y
/// elsewhere; with `relu`, fused with what follows (see [`crate::batch_norm_eval_relu`]).
/// Checks, in order: the shape and `x`, `y`, the mask's length, the statistics, γ/β, z, ε.
pub(crate) fn eval_where<T: Element>(
    x: View<'_, T>,
    scope: Scope<'_, ReluForward<'_, T>>,
    stats: FixedStats<'_, T>,
    affine: Affine<'_, T>,
    eps: f64,
    y: &mut [T],
) -> Result<(), Error> {
    let (Scope { mask, relu }, FixedStats { mean, var }) = (scope, stats);
    let (g, _) = check_forward(x, mask, y, |channels| check::fixed_stats(channels, mean, var), affine)?;
    ReluForward::check(relu.as_ref(), &g)?;
    check::eps(eps)?;
    let mean = Scratch::collect(mean.iter().map(|v| v.to_f64()));
    let inv_std = inv_stds(var, eps);
    let relu = relu.map(|r| r.start(&g));
    normalize_affine(&g, x.data, y, &mean, inv_std, affine, mask, relu);
    Ok(())
}
