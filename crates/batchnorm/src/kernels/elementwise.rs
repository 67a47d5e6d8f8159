//! Element-wise passes: normalization and the input gradient. Each comes in a `plane` form (one
//! channel, its parameters are scalars) and a `rows` form (rows of all channels, parameters are
//! per-channel vectors). All arithmetic is in `f64`, rounded once on store.

use crate::Element;

/// y = (x − mean)·scale + shift over one plane of one channel.
///
/// With scale = γ/√(σ²+ε) and shift = β this is Algorithm 1's x̂ and y in one pass. Subtracting
/// the mean first (rather than x·scale + (β − mean·scale)) keeps full precision when the mean is
/// large against the spread.
#[inline(always)]
pub(crate) fn normalize_plane<T: Element>(x: &[T], y: &mut [T], mean: f64, scale: f64, shift: f64) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = T::from_f64((v.to_f64() - mean) * scale + shift);
    }
}

/// y = (x − mean[c])·scale[c] + shift[c] over rows of `mean.len()` channels.
#[inline(always)]
pub(crate) fn normalize_rows<T: Element>(x: &[T], y: &mut [T], mean: &[f64], scale: &[f64], shift: &[f64]) {
    let channels = mean.len();
    for (orow, row) in y.chunks_exact_mut(channels).zip(x.chunks_exact(channels)) {
        for ((((o, &v), &m), &s), &b) in orow.iter_mut().zip(row).zip(mean).zip(scale).zip(shift) {
            *o = T::from_f64((v.to_f64() - m) * s + b);
        }
    }
}

/// Per-channel constants of the training-mode input gradient.
///
/// dx = k·(dy − a − (x − mean)·b) with k = γ·inv_std, a = Σdy/m, b = inv_std²·Σdy(x − mean)/m:
/// the paper's chain rule for ∂ℓ/∂xᵢ with ∂ℓ/∂σ² and ∂ℓ/∂μ substituted in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DxCoeffs {
    pub mean: f64,
    pub k: f64,
    pub a: f64,
    pub b: f64,
}

/// dx over one plane of one channel (training mode).
#[inline(always)]
pub(crate) fn dx_plane<T: Element>(x: &[T], dy: &[T], dx: &mut [T], c: DxCoeffs) {
    for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        *o = T::from_f64(c.k * (g.to_f64() - c.a - (v.to_f64() - c.mean) * c.b));
    }
}

/// dx over rows of all channels (training mode); the coefficient vectors have one entry per channel.
#[inline(always)]
pub(crate) fn dx_rows<T: Element>(x: &[T], dy: &[T], dx: &mut [T], mean: &[f64], k: &[f64], a: &[f64], b: &[f64]) {
    let channels = mean.len();
    let rows = dx
        .chunks_exact_mut(channels)
        .zip(x.chunks_exact(channels))
        .zip(dy.chunks_exact(channels));
    for ((orow, row), grow) in rows {
        for (c, o) in orow.iter_mut().enumerate() {
            *o = T::from_f64(k[c] * (grow[c].to_f64() - a[c] - (row[c].to_f64() - mean[c]) * b[c]));
        }
    }
}

/// dx = dy·k over one plane (inference-mode backward: the statistics are constants).
#[inline(always)]
pub(crate) fn scale_plane<T: Element>(dy: &[T], dx: &mut [T], k: f64) {
    for (o, &g) in dx.iter_mut().zip(dy) {
        *o = T::from_f64(g.to_f64() * k);
    }
}

/// dx = dy·k[c] over rows of all channels.
#[inline(always)]
pub(crate) fn scale_rows<T: Element>(dy: &[T], dx: &mut [T], k: &[f64]) {
    let channels = k.len();
    for (orow, grow) in dx.chunks_exact_mut(channels).zip(dy.chunks_exact(channels)) {
        for ((o, &g), &kc) in orow.iter_mut().zip(grow).zip(k) {
            *o = T::from_f64(g.to_f64() * kc);
        }
    }
}
