//! The forward transforms: training (Algorithm 1), inference (Algorithm 2's affine map) and the
//! normalization step of the split-phase (synchronized) form.

use crate::check;
use crate::kernels::plan;
use crate::kernels::scratch::Scratch;
use crate::kernels::with_simd;
use crate::stats::{inv_std_in_place, BatchStats, SavedStats};
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
/// layout, `y` against `x`, the statistics (`check_stats`, given the channel count), then γ and β
/// against the channel count. Returns the geometry.
pub(crate) fn check_forward<T>(
    x: View<'_, T>,
    y: &[T],
    check_stats: impl FnOnce(usize) -> Result<(), Error>,
    affine: Affine<'_, T>,
) -> Result<Geometry, Error> {
    let g = check::input("x", x.data, x.shape, x.layout)?;
    check::len("y", &g, y.len())?;
    check_stats(g.channels)?;
    check::affine(g.channels, affine.gamma, affine.beta)?;
    Ok(g)
}

/// y = (x − mean)·γ·inv_std + β per channel over `x` (already checked against `g`), the last
/// step of the forward transforms, with `inv_std` holding each channel's 1/σ (γ = 1 and β = 0
/// where `affine` has none).
pub(crate) fn normalize_affine<T: Element>(
    g: &Geometry,
    x: &[T],
    y: &mut [T],
    mean: &[f64],
    inv_std: Scratch<f64>,
    affine: Affine<'_, T>,
) {
    let mut scale = inv_std;
    let mut shift = Scratch::any(g.channels);
    with_simd(|| scale_shift(affine.gamma, affine.beta, 0, &mut scale, &mut shift));
    plan::normalize(g, x, y, mean, &scale, &shift);
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
    let g = check_forward(x, y, |_| Ok(()), affine)?;
    check::eps(eps)?;
    check::training_count(g.per_channel() as u64, x.shape)?;
    let Affine { gamma, beta } = affine;
    let m = plan::train_forward(&g, x.data, y, |first, scale, shift| {
        inv_std_in_place(scale, eps);
        scale_shift(gamma, beta, first, scale, shift);
    });
    let stats = BatchStats {
        count: g.per_channel() as u64,
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
    let g = check_forward(x, y, |channels| check::saved(saved, channels), affine)?;
    let inv_std = Scratch::collect(saved.inv_std.iter().copied());
    normalize_affine(&g, x.data, y, &saved.mean, inv_std, affine);
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
    let FixedStats { mean, var } = stats;
    let g = check_forward(x, y, |channels| check::fixed_stats(channels, mean, var), affine)?;
    check::eps(eps)?;
    let mean = Scratch::collect(mean.iter().map(|v| v.to_f64()));
    let mut inv_std = Scratch::collect(var.iter().map(|v| v.to_f64()));
    with_simd(|| inv_std_in_place(&mut inv_std, eps));
    normalize_affine(&g, x.data, y, &mean, inv_std, affine);
    Ok(())
}
