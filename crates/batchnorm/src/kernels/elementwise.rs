//! Element-wise passes: normalization and the input gradient. Each comes in a `plane` form (one
//! channel, its parameters are scalars) and a `rows` form (rows of all channels, parameters are
//! per-channel vectors). All arithmetic is in `f64`, rounded once on store.
//!
//! Every element is computed by the same formula whether it falls in a vector step or a scalar
//! one, so where the vectors start (e.g. an alignment peel before streaming stores) does not
//! change any bit.

use super::simd::{is_f32, simd_dispatch, Simd, STREAM_ALIGN};
use crate::Element;

/// Per-channel parameters for the `rows` kernels: `channels` values followed by the first 8 again
/// (cyclically), so that 8 consecutive elements of a row-major buffer starting at any channel
/// read their parameters contiguously.
pub(crate) struct RowParam(Vec<f64>);

impl RowParam {
    pub fn new(v: impl IntoIterator<Item = f64>) -> RowParam {
        let mut v: Vec<f64> = v.into_iter().collect();
        let channels = v.len();
        for j in 0..8 {
            v.push(v[j % channels]);
        }
        RowParam(v)
    }
}

/// Writes `out[i] = f(i)` for every i. `vec(i, c)` computes elements i..i+8 and `one(i, c)`
/// element i, with `c` = i mod `cycle` (the channel of element i in the rows kernels).
/// With `stream`, stores are non-temporal after a scalar peel up to the alignment they need.
#[inline(always)]
fn map_out<S: Simd, T: Element>(
    s: S,
    out: &mut [T],
    cycle: usize,
    stream: bool,
    vec: impl Fn(usize, usize) -> S::V,
    one: impl Fn(usize, usize) -> f64,
) {
    let n = out.len();
    let p = out.as_mut_ptr();
    let (mut i, mut c) = (0, 0);
    #[inline(always)]
    fn advance(c: &mut usize, k: usize, cycle: usize) {
        *c += k;
        while *c >= cycle {
            *c -= cycle;
        }
    }
    let size = std::mem::size_of::<T>();
    let misalign = p as usize % STREAM_ALIGN;
    if stream && misalign.is_multiple_of(size) {
        let head = (((STREAM_ALIGN - misalign) % STREAM_ALIGN) / size).min(n);
        while i < head {
            out[i] = T::from_f64(one(i, c));
            i += 1;
            advance(&mut c, 1, cycle);
        }
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, and p + i is STREAM_ALIGN-aligned (peeled above; 8 elements
            // are 32 or 64 bytes, multiples of STREAM_ALIGN).
            unsafe { s.stream(p.add(i), vec(i, c)) };
            i += 8;
            advance(&mut c, 8, cycle);
        }
    } else {
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            unsafe { s.store(p.add(i), vec(i, c)) };
            i += 8;
            advance(&mut c, 8, cycle);
        }
    }
    while i < n {
        out[i] = T::from_f64(one(i, c));
        i += 1;
        advance(&mut c, 1, cycle);
    }
    debug_assert!(is_f32::<T>() || size == 8);
}

#[inline(always)]
pub(super) fn normalize_plane_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    y: &mut [T],
    mean: f64,
    scale: f64,
    shift: f64,
    stream: bool,
) {
    assert_eq!(x.len(), y.len());
    let xp = x.as_ptr();
    let (mv, sv, bv) = (s.splat(mean), s.splat(scale), s.splat(shift));
    map_out(
        s,
        y,
        usize::MAX,
        stream,
        // SAFETY: map_out asks for i + 8 <= y.len() = x.len().
        #[inline(always)]
        |i, _| s.add(s.mul(s.sub(unsafe { s.load(xp.add(i)) }, mv), sv), bv),
        #[inline(always)]
        |i, _| (x[i].to_f64() - mean) * scale + shift,
    );
}

simd_dispatch! {
    /// y = (x − mean)·scale + shift over one plane of one channel.
    ///
    /// With scale = γ/√(σ²+ε) and shift = β this is Algorithm 1's x̂ and y in one pass.
    /// Subtracting the mean first (rather than x·scale + (β − mean·scale)) keeps full precision
    /// when the mean is large against the spread.
    pub(crate) fn normalize_plane<T>(x: &[T], y: &mut [T], mean: f64, scale: f64, shift: f64, stream: bool)
        => normalize_plane_impl
}

#[inline(always)]
pub(super) fn normalize_rows_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    y: &mut [T],
    mean: &RowParam,
    scale: &RowParam,
    shift: &RowParam,
    stream: bool,
) {
    let channels = mean.0.len() - 8;
    assert!(x.len() == y.len() && scale.0.len() == channels + 8 && shift.0.len() == channels + 8);
    let (xp, mp, sp, bp) = (x.as_ptr(), mean.0.as_ptr(), scale.0.as_ptr(), shift.0.as_ptr());
    map_out(
        s,
        y,
        channels,
        stream,
        // SAFETY: i + 8 <= x.len() and c < channels, so c + 8 <= channels + 8 = the params' length.
        #[inline(always)]
        |i, c| unsafe {
            let d = s.sub(s.load(xp.add(i)), s.load(mp.add(c)));
            s.add(s.mul(d, s.load(sp.add(c))), s.load(bp.add(c)))
        },
        #[inline(always)]
        |i, c| (x[i].to_f64() - mean.0[c]) * scale.0[c] + shift.0[c],
    );
}

simd_dispatch! {
    /// y = (x − mean[c])·scale[c] + shift[c] over whole rows of all channels.
    pub(crate) fn normalize_rows<T>(
        x: &[T], y: &mut [T], mean: &RowParam, scale: &RowParam, shift: &RowParam, stream: bool
    ) => normalize_rows_impl
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

#[inline(always)]
pub(super) fn dx_plane_impl<S: Simd, T: Element>(s: S, x: &[T], dy: &[T], dx: &mut [T], c: DxCoeffs, stream: bool) {
    assert!(x.len() == dx.len() && dy.len() == dx.len());
    let (xp, gp) = (x.as_ptr(), dy.as_ptr());
    let (mv, kv, av, bv) = (s.splat(c.mean), s.splat(c.k), s.splat(c.a), s.splat(c.b));
    map_out(
        s,
        dx,
        usize::MAX,
        stream,
        // SAFETY: i + 8 <= dx.len() = x.len() = dy.len().
        #[inline(always)]
        |i, _| unsafe {
            let xm = s.mul(s.sub(s.load(xp.add(i)), mv), bv);
            s.mul(kv, s.sub(s.sub(s.load(gp.add(i)), av), xm))
        },
        #[inline(always)]
        |i, _| c.k * (dy[i].to_f64() - c.a - (x[i].to_f64() - c.mean) * c.b),
    );
}

simd_dispatch! {
    /// dx over one plane of one channel (training mode).
    pub(crate) fn dx_plane<T>(x: &[T], dy: &[T], dx: &mut [T], c: DxCoeffs, stream: bool) => dx_plane_impl
}

/// [`DxCoeffs`] of all channels, as [`RowParam`]s.
pub(crate) struct DxRows {
    pub mean: RowParam,
    pub k: RowParam,
    pub a: RowParam,
    pub b: RowParam,
}

impl DxRows {
    pub fn new(coeffs: &[DxCoeffs]) -> DxRows {
        DxRows {
            mean: RowParam::new(coeffs.iter().map(|c| c.mean)),
            k: RowParam::new(coeffs.iter().map(|c| c.k)),
            a: RowParam::new(coeffs.iter().map(|c| c.a)),
            b: RowParam::new(coeffs.iter().map(|c| c.b)),
        }
    }
}

#[inline(always)]
fn dx_rows_impl<S: Simd, T: Element>(s: S, x: &[T], dy: &[T], dx: &mut [T], p: &DxRows, stream: bool) {
    let channels = p.mean.0.len() - 8;
    assert!(x.len() == dx.len() && dy.len() == dx.len());
    assert!(p.k.0.len() == channels + 8 && p.a.0.len() == channels + 8 && p.b.0.len() == channels + 8);
    let (xp, gp) = (x.as_ptr(), dy.as_ptr());
    let (mp, kp, ap, bp) = (p.mean.0.as_ptr(), p.k.0.as_ptr(), p.a.0.as_ptr(), p.b.0.as_ptr());
    map_out(
        s,
        dx,
        channels,
        stream,
        // SAFETY: i + 8 <= dx.len() = x.len() = dy.len(); c + 8 <= the params' length.
        #[inline(always)]
        |i, c| unsafe {
            let xm = s.mul(s.sub(s.load(xp.add(i)), s.load(mp.add(c))), s.load(bp.add(c)));
            s.mul(
                s.load(kp.add(c)),
                s.sub(s.sub(s.load(gp.add(i)), s.load(ap.add(c))), xm),
            )
        },
        #[inline(always)]
        |i, c| p.k.0[c] * (dy[i].to_f64() - p.a.0[c] - (x[i].to_f64() - p.mean.0[c]) * p.b.0[c]),
    );
}

simd_dispatch! {
    /// dx over whole rows of all channels (training mode).
    pub(crate) fn dx_rows<T>(x: &[T], dy: &[T], dx: &mut [T], p: &DxRows, stream: bool) => dx_rows_impl
}

#[inline(always)]
fn scale_plane_impl<S: Simd, T: Element>(s: S, dy: &[T], dx: &mut [T], k: f64, stream: bool) {
    assert_eq!(dy.len(), dx.len());
    let gp = dy.as_ptr();
    let kv = s.splat(k);
    map_out(
        s,
        dx,
        usize::MAX,
        stream,
        // SAFETY: i + 8 <= dx.len() = dy.len().
        #[inline(always)]
        |i, _| s.mul(unsafe { s.load(gp.add(i)) }, kv),
        #[inline(always)]
        |i, _| dy[i].to_f64() * k,
    );
}

simd_dispatch! {
    /// dx = dy·k over one plane (inference-mode backward: the statistics are constants).
    pub(crate) fn scale_plane<T>(dy: &[T], dx: &mut [T], k: f64, stream: bool) => scale_plane_impl
}

#[inline(always)]
fn scale_rows_impl<S: Simd, T: Element>(s: S, dy: &[T], dx: &mut [T], k: &RowParam, stream: bool) {
    let channels = k.0.len() - 8;
    assert_eq!(dy.len(), dx.len());
    let (gp, kp) = (dy.as_ptr(), k.0.as_ptr());
    map_out(
        s,
        dx,
        channels,
        stream,
        // SAFETY: i + 8 <= dx.len() = dy.len(); c + 8 <= k's length.
        #[inline(always)]
        |i, c| unsafe { s.mul(s.load(gp.add(i)), s.load(kp.add(c))) },
        #[inline(always)]
        |i, c| dy[i].to_f64() * k.0[c],
    );
}

simd_dispatch! {
    /// dx = dy·k[c] over whole rows of all channels.
    pub(crate) fn scale_rows<T>(dy: &[T], dx: &mut [T], k: &RowParam, stream: bool) => scale_rows_impl
}

/// Makes earlier streaming stores of this thread visible before anything it stores later.
#[inline]
pub(crate) fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    }
}
