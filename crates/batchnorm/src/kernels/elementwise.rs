//! Element-wise passes: normalization and the input gradient. Each comes in a `plane` form (one
//! channel, its parameters are scalars) and a `rows` form (rows of all channels, parameters are
//! per-channel vectors).
//!
//! Precision: the per-channel constants are computed in `f64` from the `f64` statistics; the
//! per-element arithmetic is done in the element type:
//! - `f64` tensors: `f64` throughout (a handful of roundings, ~1e-15 relative).
//! - `f32` tensors: `f32` vectors (8 lanes) with fused multiply-adds. The mean is split as
//!   `mean_hi + mean_lo` (`mean_hi` = the mean rounded to `f32`) and `mean_lo` is folded into the
//!   constant term, so `x − mean_hi` is exact whenever x lies within a factor 2 of the mean
//!   (Sterbenz) — in particular when the mean is large against the spread, where a plain
//!   `x·scale + (β − mean·scale)` (what PyTorch computes) cancels catastrophically. Each output is
//!   then within 2·ε_f32 of the magnitude of the terms that produce it (see [`NarrowAffine`],
//!   [`NarrowDx`]), against ½ ulp for an `f64` computation rounded once: the price of twice the
//!   lanes per instruction and half the bytes of per-channel constants.
//! - `bf16` and `f16` tensors: the `f32` path, each element widened to `f32` as it is loaded and
//!   each `f32` result rounded once to the half type as it is stored (see `simd`): the `f32`
//!   bound plus ½ ulp of the half type.
//!
//! Every element is computed by the same formula whether it falls in a vector step or a scalar
//! one, so where the vectors start (e.g. an alignment peel before streaming stores, or a column
//! tile) does not change any bit.

use super::moments::RowsEpilogue;
use super::relu::{with_epilogue, with_upstream, Act, Back, BitsAt, ElementMap, Gated, Plain};
use super::scratch::{Pooled, Scratch};
use super::simd::{narrow, simd_dispatch, Simd, STREAM_ALIGN};
use crate::element::Kind;
use crate::Element;

/// Rows wider than this many channels are processed in column tiles of this many channels, all
/// rows of a tile before the next, so that the tile's per-channel constants stay in L1 (with
/// 4096 channels a whole row of them would be re-read from L2 for every row).
pub(crate) const ROW_TILE: usize = 1024;

/// Per-channel constants for the `rows` kernels: `channels` values followed by the first 8 again
/// (cyclically), so that 8 consecutive elements of a row-major buffer starting at any channel
/// read their constants contiguously.
pub(crate) struct RowParam<F: Pooled>(Scratch<F>);

impl<F: Pooled + Default> RowParam<F> {
    /// `f(c)` for each of `channels` channels.
    pub fn from_fn(channels: usize, mut f: impl FnMut(usize) -> F) -> RowParam<F> {
        let mut v = RowParam::room(channels);
        for (c, slot) in v[..channels].iter_mut().enumerate() {
            *slot = f(c);
        }
        RowParam::with_tail(v)
    }

    /// A buffer for `channels` values and the 8 repeated after them.
    fn room(channels: usize) -> Scratch<F> {
        Scratch::any(channels + 8)
    }

    /// From a [`RowParam::room`] whose first `len − 8` entries (one per channel) are written.
    fn with_tail(mut v: Scratch<F>) -> RowParam<F> {
        let channels = v.len() - 8;
        for j in 0..8 {
            v[channels + j] = v[j % channels];
        }
        RowParam(v)
    }
}

impl<F: Pooled> RowParam<F> {
    /// Number of channels.
    #[inline(always)]
    fn channels(&self) -> usize {
        self.0.len() - 8
    }

    #[inline(always)]
    fn ptr(&self) -> *const F {
        self.0.as_ptr()
    }
}

/// Whether `v` rounds to `f32` without overflow or underflow: 0, or a normal `f32` magnitude.
/// (False for NaN and infinities, which the `f64` path then propagates as IEEE says.)
#[inline(always)]
fn fits(v: f64) -> bool {
    v == 0.0 || (f32::MIN_POSITIVE as f64..=f32::MAX as f64).contains(&v.abs())
}

/// [`fits`] for a mean, with room left for x − mean (≤ 2¹⁰⁰, so only inputs within 2⁻²⁸ of
/// `f32::MAX` could overflow it).
#[inline(always)]
fn fits_mean(v: f64) -> bool {
    fits(v) && v.abs() <= 2f64.powi(100)
}

/// y = (x − mean)·scale + shift for one channel, in `f64`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WideAffine {
    pub mean: f64,
    pub scale: f64,
    pub shift: f64,
}

impl WideAffine {
    #[inline(always)]
    fn apply(self, x: f64) -> f64 {
        (x - self.mean) * self.scale + self.shift
    }
}

/// The `f32` form of a [`WideAffine`]: y = fma(x − mean_hi, scale, shift) with
/// mean_hi = mean rounded to `f32` and shift = β − (mean − mean_hi)·scale (from `f64`).
///
/// Error: x − mean_hi is exact when x is within a factor 2 of mean_hi (otherwise it has relative
/// error ≤ u = 2⁻²⁴); rounding scale and shift to `f32` and the fused multiply-add each cost ≤ u
/// of their terms, so |y − y_exact| ≤ 2u·(|x − mean|·|scale|) + u·|shift| + u·|y| ≤ 2·ε_f32·S
/// with S = |x − mean|·|scale| + |shift|, up to O(u²).
#[derive(Debug, Clone, Copy)]
pub(crate) struct NarrowAffine {
    pub mean_hi: f32,
    pub scale: f32,
    pub shift: f32,
}

impl NarrowAffine {
    /// The `f32` constants, or `None` when one of them would leave `f32`'s normal range (the
    /// caller then computes in `f64`).
    #[inline(always)]
    pub fn new(a: WideAffine) -> Option<NarrowAffine> {
        let (n, ok) = NarrowAffine::checked(a);
        ok.then_some(n)
    }

    /// The `f32` constants (zeros unless they fit) and whether they fit; branch-free, so that
    /// a loop over channels vectorizes.
    #[inline(always)]
    fn checked(a: WideAffine) -> (NarrowAffine, bool) {
        let mean_hi = a.mean as f32;
        let mean_lo = a.mean - mean_hi as f64;
        let shift = a.shift - mean_lo * a.scale;
        let ok = fits_mean(a.mean) & fits(a.scale) & fits(shift);
        let keep = |v: f32| if ok { v } else { 0.0 };
        let n = NarrowAffine {
            mean_hi: keep(mean_hi),
            scale: keep(a.scale as f32),
            shift: keep(shift as f32),
        };
        (n, ok)
    }

    #[inline(always)]
    fn apply(self, x: f32) -> f32 {
        (x - self.mean_hi).mul_add(self.scale, self.shift)
    }
}

/// Calls `put(i, c, stream)` for i = `start`, `start` + 8, … while 8 elements remain before
/// `end`, then `one(i, c)` for the rest, with `c` the channel of element i (`first_c` at `start`,
/// counting modulo `cycle`). With `stream`, `one` first covers a head up to the [`STREAM_ALIGN`]
/// boundary of `out + i`, so that every `put` may store non-temporally.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn map_range<T>(
    out: *mut T,
    start: usize,
    end: usize,
    first_c: usize,
    cycle: usize,
    stream: bool,
    mut put: impl FnMut(usize, usize, bool),
    mut one: impl FnMut(usize, usize),
) {
    map_range_with::<T, _, _, 8>(out, start, end, first_c, cycle, stream, &mut put, &mut one)
}

/// Ranges of at least this many elements taken in steps of [`STREAM_ALIGN`] bytes start their
/// steps at an aligned output (the elements before it one by one); shorter ones (the planes of
/// small images) would spend more on those elements than the aligned steps save.
const ALIGN_STEPS_FROM: usize = 512;

/// [`map_range`] with steps of `STEP` elements: `put(i, c, stream)` covers elements
/// i..i + `STEP` (the kernels that take 16 `bf16` a step, see [`Simd::fload_pair`]). With
/// `stream`, every `put` starts at a [`STREAM_ALIGN`] boundary of `out + i`, as `STEP`·size
/// is a multiple of it or divides it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn map_range_by<T, const STEP: usize>(
    out: *mut T,
    start: usize,
    end: usize,
    first_c: usize,
    cycle: usize,
    stream: bool,
    mut put: impl FnMut(usize, usize, bool),
    mut one: impl FnMut(usize, usize),
) {
    map_range_with::<T, _, _, STEP>(out, start, end, first_c, cycle, stream, &mut put, &mut one)
}

/// Whether [`map_range_with`] in steps of `STEP` elements over `start..end` starts its steps at
/// a [`STREAM_ALIGN`] boundary even when it does not stream: steps of 32 bytes or more on long
/// ranges, where an unaligned 32-byte access would cross a cache line every other step.
#[inline(always)]
fn aligns_wide_steps<T, const STEP: usize>(start: usize, end: usize) -> bool {
    STEP * std::mem::size_of::<T>() >= STREAM_ALIGN && end - start >= ALIGN_STEPS_FROM
}

/// The element at which [`map_range_with`] in steps of `STEP` over `start..end` of `out` makes
/// its first call of `put` (`end` or beyond when it makes none): `start`, or, with `stream` or
/// where [`aligns_wide_steps`], the first element at a [`STREAM_ALIGN`] boundary from `start`
/// on (capped at `end`). Its calls of `put` are at this element and every `STEP` after it.
#[inline(always)]
fn first_put<T, const STEP: usize>(out: *mut T, start: usize, end: usize, stream: bool) -> usize {
    if !stream && !aligns_wide_steps::<T, STEP>(start, end) {
        return start;
    }
    let size = std::mem::size_of::<T>();
    let misalign = out.wrapping_add(start) as usize % STREAM_ALIGN;
    // A `T`-aligned address is a whole number of elements away from the next boundary.
    debug_assert!(misalign.is_multiple_of(size));
    (start + ((STREAM_ALIGN - misalign) % STREAM_ALIGN) / size).min(end)
}

/// [`map_range`] with the closures borrowed. They are called directly (`(*put)(…)`), not through
/// the `FnMut` impl of `&mut F`: the closures are `#[inline(always)]`, so they do not take the
/// target features (AVX2) of the function that defines them, and must be inlined into it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn map_range_with<T, P: FnMut(usize, usize, bool), O: FnMut(usize, usize), const STEP: usize>(
    out: *mut T,
    start: usize,
    end: usize,
    first_c: usize,
    cycle: usize,
    stream: bool,
    put: &mut P,
    one: &mut O,
) {
    let (mut i, mut c) = (start, first_c);
    #[inline(always)]
    fn advance(c: &mut usize, k: usize, cycle: usize) {
        *c += k;
        while *c >= cycle {
            *c -= cycle;
        }
    }
    let head = first_put::<T, STEP>(out, start, end, stream);
    while i < head {
        (*one)(i, c);
        i += 1;
        advance(&mut c, 1, cycle);
    }
    // One loop for each value of `stream`, so that it is a constant in `put`'s body.
    if stream {
        while i + STEP <= end {
            (*put)(i, c, true);
            i += STEP;
            advance(&mut c, STEP, cycle);
        }
    } else {
        while i + STEP <= end {
            (*put)(i, c, false);
            i += STEP;
            advance(&mut c, STEP, cycle);
        }
    }
    while i < end {
        (*one)(i, c);
        i += 1;
        advance(&mut c, 1, cycle);
    }
}

/// [`map_range`] over the whole of `out` (`len` elements of whole rows of `channels`), in column
/// tiles of [`ROW_TILE`] channels when rows are wider (every element still gets the same
/// formula, so tiling changes no bit).
#[inline(always)]
fn map_rows<T>(
    out: *mut T,
    len: usize,
    channels: usize,
    stream: bool,
    mut put: impl FnMut(usize, usize, bool),
    mut one: impl FnMut(usize, usize),
) {
    // One call of `map_range` in the code (its loops are inlined once): untiled, the whole buffer
    // as one range; tiled, each row's part of each tile.
    let tiled = channels > ROW_TILE;
    let rows = if tiled { len / channels } else { 1 };
    let mut t = 0;
    loop {
        let te = (t + ROW_TILE).min(channels);
        for r in 0..rows {
            let (start, end) = if tiled {
                (r * channels + t, r * channels + te)
            } else {
                (0, len)
            };
            map_range_with::<T, _, _, 8>(out, start, end, t, channels, stream, &mut put, &mut one);
        }
        if !tiled || te == channels {
            return;
        }
        t = te;
    }
}

/// Stores 8 `f64` lanes at `p` as `T`, non-temporally with `stream`.
///
/// # Safety
/// As [`Simd::store`] / [`Simd::stream`].
#[inline(always)]
unsafe fn put_wide<S: Simd, T: Element>(s: S, p: *mut T, v: S::V, stream: bool) {
    // SAFETY: the caller's contract.
    unsafe {
        if stream {
            s.stream(p, v)
        } else {
            s.store(p, v)
        }
    }
}

/// Stores 8 `f32` lanes at `p` as `T` (a type that takes the `f32` path), non-temporally with
/// `stream`.
///
/// # Safety
/// As [`Simd::fstore`] / [`Simd::fstream`].
#[inline(always)]
unsafe fn put_narrow<S: Simd, T: Element>(s: S, p: *mut T, v: S::F, stream: bool) {
    // SAFETY: the caller's contract.
    unsafe {
        if stream {
            s.fstream(p, v)
        } else {
            s.fstore(p, v)
        }
    }
}

/// Whether a narrow kernel over `T` with the epilogue `E` takes 16 elements a step through
/// [`Simd::fload_pair`] / [`Simd::fput_pair`]: `bf16` on a backend where that costs less
/// ([`Simd::BF16_PAIRS`]), plain batch norm (lanes in any order, see [`ElementMap::PLAIN`]).
/// Every element gets the same `f32` operations and the same one rounding either way, so this
/// changes no bit. Folds to a constant.
#[inline(always)]
fn takes_pairs<S: Simd, T: Element, E: ElementMap<T>>() -> bool {
    S::BF16_PAIRS && T::KIND == Kind::Bf16 && E::PLAIN
}

/// [`put_narrow`] of `e`'s output: without rounding again where `e`'s outputs are values of `T`
/// already ([`ElementMap::EXACT`]).
///
/// # Safety
/// As [`put_narrow`].
#[inline(always)]
unsafe fn put_mapped<S: Simd, T: Element, E: ElementMap<T>>(s: S, p: *mut T, v: S::F, stream: bool) {
    // SAFETY: the caller's contract; with `E::EXACT` the lanes are values of `T`.
    unsafe {
        if E::EXACT {
            s.fput_exact(p, v, stream)
        } else {
            put_narrow(s, p, v, stream)
        }
    }
}

#[inline(always)]
pub(super) fn normalize_plane_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    y: &mut [T],
    a: WideAffine,
    stream: bool,
    act: Option<Act<'_, T>>,
) {
    assert_eq!(x.len(), y.len());
    with_epilogue!(act, y.len(), |e| normalize_plane_with(s, x, y, a, stream, e))
}

#[inline(always)]
fn normalize_plane_with<S: Simd, T: Element, E: ElementMap<T>>(
    s: S,
    x: &[T],
    y: &mut [T],
    a: WideAffine,
    stream: bool,
    e: E,
) {
    let n = y.len();
    if let (true, Some(a)) = (narrow::<T>(), NarrowAffine::new(a)) {
        let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
        let (mv, sv, bv) = (s.fsplat(a.mean_hi), s.fsplat(a.scale), s.fsplat(a.shift));
        if takes_pairs::<S, T, E>() {
            map_range_by::<T, 16>(
                yp,
                0,
                n,
                0,
                usize::MAX,
                stream,
                // SAFETY: i + 16 <= n = x.len() = y.len().
                #[inline(always)]
                |i, _, stream| unsafe {
                    let (xe, xo) = s.fload_pair(xp.add(i));
                    let ye = s.fmadd(s.fsub(xe, mv), sv, bv);
                    let yo = s.fmadd(s.fsub(xo, mv), sv, bv);
                    s.fput_pair(yp.add(i), ye, yo, stream)
                },
                // SAFETY: i < n.
                #[inline(always)]
                |i, _| unsafe { *yp.add(i) = T::from_f32(e.narrow1(i, a.apply((*xp.add(i)).to_f32()))) },
            );
            return;
        }
        map_range(
            yp,
            0,
            n,
            0,
            usize::MAX,
            stream,
            // SAFETY: i + 8 <= n = x.len() = y.len().
            #[inline(always)]
            |i, _, stream| unsafe {
                let v = s.fmadd(s.fsub(s.fload(xp.add(i)), mv), sv, bv);
                put_mapped::<S, T, E>(s, yp.add(i), e.narrow8(s, i, v), stream)
            },
            // SAFETY: i < n.
            #[inline(always)]
            |i, _| unsafe { *yp.add(i) = T::from_f32(e.narrow1(i, a.apply((*xp.add(i)).to_f32()))) },
        );
        return;
    }
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    let (mv, sv, bv) = (s.splat(a.mean), s.splat(a.scale), s.splat(a.shift));
    map_range(
        yp,
        0,
        n,
        0,
        usize::MAX,
        stream,
        // SAFETY: i + 8 <= n = x.len() = y.len().
        #[inline(always)]
        |i, _, stream| unsafe {
            let v = s.add(s.mul(s.sub(s.load(xp.add(i)), mv), sv), bv);
            put_wide(s, yp.add(i), e.wide8(s, i, v), stream)
        },
        // SAFETY: i < n.
        #[inline(always)]
        |i, _| unsafe { *yp.add(i) = T::from_f64(e.wide1(i, a.apply((*xp.add(i)).to_f64()))) },
    );
}

#[inline(always)]
pub(super) fn normalize_plane_kept_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    y: &mut [T],
    a: WideAffine,
    stream: bool,
    keep: BitsAt<'_>,
) {
    assert_eq!(x.len(), y.len());
    let n = y.len();
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    let first = first_put::<T, 8>(yp, 0, n, stream);
    // Every 8-element step's bits: 4 bytes from the byte of its first element, which lie in the
    // buffer (checked here for the last step); each step's bits start at the same place in
    // their byte, so the selects' shifts are made once.
    let (byte, offset) = keep.byte_of(first);
    let steps_fit = n < first + 8 || keep.byte_of(n - 8).0 + 4 <= keep.bytes().len();
    if let (true, true, Some(a)) = (narrow::<T>(), steps_fit, NarrowAffine::new(a)) {
        let (mv, sv, bv) = (s.fsplat(a.mean_hi), s.fsplat(a.scale), s.fsplat(a.shift));
        let (sel, bits) = (s.sel_at(offset), keep.bytes().as_ptr().wrapping_add(byte));
        map_range(
            yp,
            0,
            n,
            0,
            usize::MAX,
            stream,
            // SAFETY: i + 8 <= n = x.len() = y.len(), i = first + 8·k, so the byte of element i
            // is `byte + k` and its 4 bytes lie in the bits (`steps_fit`).
            #[inline(always)]
            |i, _, stream| unsafe {
                let v = s.fmadd(s.fsub(s.fload(xp.add(i)), mv), sv, bv);
                let v = s.fgate_at(sel, bits.add((i - first) / 8), v);
                put_narrow(s, yp.add(i), v, stream)
            },
            // SAFETY: i < n, for which `keep` was made.
            #[inline(always)]
            |i, _| unsafe {
                let v = if keep.get1(i) {
                    a.apply((*xp.add(i)).to_f32())
                } else {
                    0.0
                };
                *yp.add(i) = T::from_f32(v)
            },
        );
        return;
    }
    normalize_plane_with(s, x, y, a, stream, Gated::new(keep))
}

simd_dispatch! {
    /// [`normalize_plane`] at the elements whose bit is set in `keep` (made for the plane's
    /// elements), +0.0 at the others: each value selected before its one store, so that no
    /// value computed at an element that is off (a NaN or an infinity from x there) is kept.
    pub(crate) fn normalize_plane_kept<T>(
        x: &[T], y: &mut [T], a: WideAffine, stream: bool, keep: BitsAt<'_>
    ) => normalize_plane_kept_impl
}

simd_dispatch! {
    /// y = (x − mean)·scale + shift over one plane of one channel; with `act`, fused with what
    /// follows (see `relu`).
    ///
    /// With scale = γ/√(σ²+ε) and shift = β this is Algorithm 1's x̂ and y in one pass.
    /// Subtracting the mean first (rather than x·scale + (β − mean·scale)) keeps full precision
    /// when the mean is large against the spread.
    pub(crate) fn normalize_plane<T>(
        x: &[T], y: &mut [T], a: WideAffine, stream: bool, act: Option<Act<'_, T>>
    ) => normalize_plane_impl
}

/// Per-channel constants of y = (x − mean[c])·scale[c] + shift[c] for the `rows` kernels, in the
/// form the element type uses.
pub(crate) enum RowsAffine {
    Wide {
        mean: RowParam<f64>,
        scale: RowParam<f64>,
        shift: RowParam<f64>,
    },
    /// `f32` constants; the channels in `wide` (whose constants do not fit `f32`) are computed
    /// in `f64` afterwards.
    Narrow {
        mean_hi: RowParam<f32>,
        scale: RowParam<f32>,
        shift: RowParam<f32>,
        wide: Vec<(usize, WideAffine)>,
    },
}

impl RowsAffine {
    /// The constants of every channel, for elements of type `T`.
    #[inline(always)]
    pub fn new<T: Element>(mean: &[f64], scale: &[f64], shift: &[f64]) -> RowsAffine {
        let wide_of = |c: usize| WideAffine {
            mean: mean[c],
            scale: scale[c],
            shift: shift[c],
        };
        if !narrow::<T>() {
            return RowsAffine::Wide {
                mean: RowParam::from_fn(mean.len(), |c| mean[c]),
                scale: RowParam::from_fn(mean.len(), |c| scale[c]),
                shift: RowParam::from_fn(mean.len(), |c| shift[c]),
            };
        }
        let channels = mean.len();
        let (mut mean_hi, mut scale_f, mut shift_f) = (
            RowParam::room(channels),
            RowParam::room(channels),
            RowParam::room(channels),
        );
        let mut all_fit = true;
        let (m, k, b) = (
            &mut mean_hi[..channels],
            &mut scale_f[..channels],
            &mut shift_f[..channels],
        );
        for c in 0..channels {
            let (a, ok) = NarrowAffine::checked(wide_of(c));
            all_fit &= ok;
            (m[c], k[c], b[c]) = (a.mean_hi, a.scale, a.shift);
        }
        let wide = match all_fit {
            true => Vec::new(),
            false => (0..channels)
                .filter(|&c| !NarrowAffine::checked(wide_of(c)).1)
                .map(|c| (c, wide_of(c)))
                .collect(),
        };
        RowsAffine::Narrow {
            mean_hi: RowParam::with_tail(mean_hi),
            scale: RowParam::with_tail(scale_f),
            shift: RowParam::with_tail(shift_f),
            wide,
        }
    }
}

impl RowsAffine {
    /// [`RowsAffine::new`] of the channels whose means are `mean`, their (scale, shift) made
    /// [`CONSTANT_CHUNK`] channels at a time by `fill(first, scale, shift)` (channels
    /// `first..first + scale.len()`, both slices to be written whole): each chunk narrowed while
    /// it is in L1, rather than every channel's constants written to memory and read back. The
    /// same constants as `new` given what `fill` writes.
    #[inline(always)]
    pub fn from_chunks<T: Element>(mean: &[f64], mut fill: impl FnMut(usize, &mut [f64], &mut [f64])) -> RowsAffine {
        let channels = mean.len();
        let (mut scale, mut shift) = ([0.0; CONSTANT_CHUNK], [0.0; CONSTANT_CHUNK]);
        if !narrow::<T>() {
            let (mut scale_w, mut shift_w) = (RowParam::room(channels), RowParam::room(channels));
            for first in (0..channels).step_by(CONSTANT_CHUNK) {
                let end = (first + CONSTANT_CHUNK).min(channels);
                fill(first, &mut scale_w[first..end], &mut shift_w[first..end]);
            }
            return RowsAffine::Wide {
                mean: RowParam::from_fn(channels, |c| mean[c]),
                scale: RowParam::with_tail(scale_w),
                shift: RowParam::with_tail(shift_w),
            };
        }
        let (mut mean_hi, mut scale_f, mut shift_f) = (
            RowParam::room(channels),
            RowParam::room(channels),
            RowParam::room(channels),
        );
        let mut wide = Vec::new();
        for first in (0..channels).step_by(CONSTANT_CHUNK) {
            let len = CONSTANT_CHUNK.min(channels - first);
            let (scale, shift) = (&mut scale[..len], &mut shift[..len]);
            fill(first, scale, shift);
            let mut all_fit = true;
            let r = first..first + len;
            let (m, k, b) = (&mut mean_hi[r.clone()], &mut scale_f[r.clone()], &mut shift_f[r]);
            for i in 0..len {
                let wide_of = WideAffine {
                    mean: mean[first + i],
                    scale: scale[i],
                    shift: shift[i],
                };
                let (a, ok) = NarrowAffine::checked(wide_of);
                all_fit &= ok;
                (m[i], k[i], b[i]) = (a.mean_hi, a.scale, a.shift);
            }
            if !all_fit {
                for i in 0..len {
                    let wide_of = WideAffine {
                        mean: mean[first + i],
                        scale: scale[i],
                        shift: shift[i],
                    };
                    if !NarrowAffine::checked(wide_of).1 {
                        wide.push((first + i, wide_of));
                    }
                }
            }
        }
        RowsAffine::Narrow {
            mean_hi: RowParam::with_tail(mean_hi),
            scale: RowParam::with_tail(scale_f),
            shift: RowParam::with_tail(shift_f),
            wide,
        }
    }
}

/// Channels whose constants [`RowsAffine::from_chunks`] and [`DxRows::from_chunks`] make at a
/// time: a few KiB of `f64` temporaries, which stay in L1.
pub(crate) const CONSTANT_CHUNK: usize = 256;

/// After a narrow pass over `len` elements of whole rows of `channels`, recomputes the elements
/// of each channel in `wide` with `f(i, constants)`.
#[inline(always)]
fn redo_channels<P: Copy>(len: usize, channels: usize, stream: bool, wide: &[(usize, P)], f: impl Fn(usize, P)) {
    if wide.is_empty() {
        return;
    }
    if stream {
        // The streaming stores of the narrow pass land before these.
        stream_fence();
    }
    for &(c, p) in wide {
        let mut i = c;
        while i < len {
            f(i, p);
            i += channels;
        }
    }
}

#[inline(always)]
pub(super) fn normalize_rows_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    y: &mut [T],
    p: &RowsAffine,
    stream: bool,
    act: Option<Act<'_, T>>,
) {
    assert_eq!(x.len(), y.len());
    with_epilogue!(act, y.len(), |e| normalize_rows_with(s, x, y, p, stream, e))
}

#[inline(always)]
fn normalize_rows_with<S: Simd, T: Element, E: ElementMap<T>>(
    s: S,
    x: &[T],
    y: &mut [T],
    p: &RowsAffine,
    stream: bool,
    e: E,
) {
    let n = y.len();
    match (p, narrow::<T>()) {
        (
            RowsAffine::Narrow {
                mean_hi,
                scale,
                shift,
                wide,
            },
            true,
        ) => {
            let channels = mean_hi.channels();
            assert!(scale.channels() == channels && shift.channels() == channels);
            let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
            let (mp, sp, bp) = (mean_hi.ptr(), scale.ptr(), shift.ptr());
            map_rows(
                yp,
                n,
                channels,
                stream,
                // SAFETY: i + 8 <= n and c < channels, so c + 8 <= the constants' length.
                #[inline(always)]
                |i, c, stream| unsafe {
                    let d = s.fsub(s.fload(xp.add(i)), s.fload(mp.add(c)));
                    let v = s.fmadd(d, s.fload(sp.add(c)), s.fload(bp.add(c)));
                    put_mapped::<S, T, E>(s, yp.add(i), e.narrow8(s, i, v), stream)
                },
                // SAFETY: i < n and c < channels.
                #[inline(always)]
                |i, c| unsafe {
                    let a = NarrowAffine {
                        mean_hi: *mp.add(c),
                        scale: *sp.add(c),
                        shift: *bp.add(c),
                    };
                    *yp.add(i) = T::from_f32(e.narrow1(i, a.apply((*xp.add(i)).to_f32())));
                },
            );
            // SAFETY: i < n.
            redo_channels(n, channels, stream, wide, |i, a| unsafe {
                *yp.add(i) = T::from_f64(e.wide1(i, a.apply((*xp.add(i)).to_f64())))
            });
        }
        (RowsAffine::Wide { mean, scale, shift }, _) => {
            let channels = mean.channels();
            assert!(scale.channels() == channels && shift.channels() == channels);
            let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
            let (mp, sp, bp) = (mean.ptr(), scale.ptr(), shift.ptr());
            map_rows(
                yp,
                n,
                channels,
                stream,
                // SAFETY: i + 8 <= n and c < channels, so c + 8 <= the constants' length.
                #[inline(always)]
                |i, c, stream| unsafe {
                    let d = s.sub(s.load(xp.add(i)), s.load(mp.add(c)));
                    let v = s.add(s.mul(d, s.load(sp.add(c))), s.load(bp.add(c)));
                    put_wide(s, yp.add(i), e.wide8(s, i, v), stream)
                },
                // SAFETY: i < n and c < channels.
                #[inline(always)]
                |i, c| unsafe {
                    let a = WideAffine {
                        mean: *mp.add(c),
                        scale: *sp.add(c),
                        shift: *bp.add(c),
                    };
                    *yp.add(i) = T::from_f64(e.wide1(i, a.apply((*xp.add(i)).to_f64())));
                },
            );
        }
        _ => unreachable!("RowsAffine built for another element type"),
    }
}

simd_dispatch! {
    /// y = (x − mean[c])·scale[c] + shift[c] over whole rows of all channels; with `act`, fused
    /// with what follows (see `relu`).
    pub(crate) fn normalize_rows<T>(
        x: &[T], y: &mut [T], p: &RowsAffine, stream: bool, act: Option<Act<'_, T>>
    ) => normalize_rows_impl
}

#[inline(always)]
pub(super) fn normalize_rows_kept_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    y: &mut [T],
    p: &RowsAffine,
    stream: bool,
    keep: BitsAt<'_>,
) {
    assert_eq!(x.len(), y.len());
    normalize_rows_with(s, x, y, p, stream, Gated::new(keep))
}

simd_dispatch! {
    /// [`normalize_rows`] at the elements whose bit is set in `keep`, +0.0 at the others (as
    /// [`normalize_plane_kept`]).
    pub(crate) fn normalize_rows_kept<T>(
        x: &[T], y: &mut [T], p: &RowsAffine, stream: bool, keep: BitsAt<'_>
    ) => normalize_rows_kept_impl
}

/// Per-channel constants of the training-mode input gradient.
///
/// dx = k·(dy − a − (x − mean)·b) with k = γ·inv_std, a = Σdy/m, b = inv_std²·Σdy(x − mean)/m:
/// the paper's chain rule for ∂ℓ/∂xᵢ with ∂ℓ/∂σ² and ∂ℓ/∂μ substituted in.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DxCoeffs {
    pub mean: f64,
    pub k: f64,
    pub a: f64,
    pub b: f64,
}

impl DxCoeffs {
    #[inline(always)]
    fn apply(self, x: f64, dy: f64) -> f64 {
        self.k * (dy - self.a - (x - self.mean) * self.b)
    }
}

/// The `f32` form of [`DxCoeffs`]: dx = fma(−(x − mean_hi), kb, fma(dy, k, c0)) with
/// mean_hi = mean rounded to `f32`, kb = k·b and c0 = k·(b·(mean − mean_hi) − a) (from `f64`).
///
/// Error, as for [`NarrowAffine`]: ≤ 2·ε_f32·S with S = |k|·(|dy| + |a| + |x − mean|·|b|), the
/// magnitude of the terms (dx itself may cancel to ~0).
#[derive(Debug, Clone, Copy)]
pub(crate) struct NarrowDx {
    pub mean_hi: f32,
    pub k: f32,
    pub kb: f32,
    pub c0: f32,
}

impl NarrowDx {
    /// The `f32` constants, or `None` when one of them would leave `f32`'s normal range.
    #[inline(always)]
    pub fn new(c: DxCoeffs) -> Option<NarrowDx> {
        let (n, ok) = NarrowDx::checked(c);
        ok.then_some(n)
    }

    /// As [`NarrowAffine::checked`].
    #[inline(always)]
    fn checked(c: DxCoeffs) -> (NarrowDx, bool) {
        let mean_hi = c.mean as f32;
        let mean_lo = c.mean - mean_hi as f64;
        let (kb, c0) = (c.k * c.b, c.k * (c.b * mean_lo - c.a));
        let ok = fits_mean(c.mean) & fits(c.k) & fits(kb) & fits(c0);
        let keep = |v: f32| if ok { v } else { 0.0 };
        let n = NarrowDx {
            mean_hi: keep(mean_hi),
            k: keep(c.k as f32),
            kb: keep(kb as f32),
            c0: keep(c0 as f32),
        };
        (n, ok)
    }

    #[inline(always)]
    fn apply(self, x: f32, dy: f32) -> f32 {
        (-(x - self.mean_hi)).mul_add(self.kb, dy.mul_add(self.k, self.c0))
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn dx_plane_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    c: DxCoeffs,
    stream: bool,
    back: Option<Back<'_, T>>,
) {
    assert!(x.len() == dx.len() && dy.len() == dx.len());
    with_upstream!(back, dx.len(), |u| dx_plane_with(s, x, dy, dx, c, stream, u, Plain))
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn dx_plane_kept_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    c: DxCoeffs,
    stream: bool,
    keep: BitsAt<'_>,
) {
    assert!(x.len() == dx.len() && dy.len() == dx.len());
    dx_plane_with(s, x, dy, dx, c, stream, Plain, Gated::new(keep))
}

/// dx over one plane from the upstream gradient `u` makes of dy, each value through `o` before
/// it is stored.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dx_plane_with<S: Simd, T: Element, U: ElementMap<T>, O: ElementMap<T>>(
    s: S,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    c: DxCoeffs,
    stream: bool,
    u: U,
    o: O,
) {
    let n = dx.len();
    if let (true, Some(c)) = (narrow::<T>(), NarrowDx::new(c)) {
        let (xp, gp, op) = (x.as_ptr(), dy.as_ptr(), dx.as_mut_ptr());
        let (mv, kv, kbv, c0v) = (s.fsplat(c.mean_hi), s.fsplat(c.k), s.fsplat(c.kb), s.fsplat(c.c0));
        if takes_pairs::<S, T, U>() && O::PLAIN {
            map_range_by::<T, 16>(
                op,
                0,
                n,
                0,
                usize::MAX,
                stream,
                // SAFETY: i + 16 <= n, the length of all three buffers.
                #[inline(always)]
                |i, _, stream| unsafe {
                    let ((xe, xo), (ge, go)) = (s.fload_pair(xp.add(i)), s.fload_pair(gp.add(i)));
                    let ve = s.fnmadd(s.fsub(xe, mv), kbv, s.fmadd(ge, kv, c0v));
                    let vo = s.fnmadd(s.fsub(xo, mv), kbv, s.fmadd(go, kv, c0v));
                    s.fput_pair(op.add(i), ve, vo, stream)
                },
                // SAFETY: i < n.
                #[inline(always)]
                |i, _| unsafe {
                    let g = u.narrow1(i, (*gp.add(i)).to_f32());
                    *op.add(i) = T::from_f32(o.narrow1(i, c.apply((*xp.add(i)).to_f32(), g)))
                },
            );
            return;
        }
        map_range(
            op,
            0,
            n,
            0,
            usize::MAX,
            stream,
            // SAFETY: i + 8 <= n, the length of all three buffers.
            #[inline(always)]
            |i, _, stream| unsafe {
                let d = s.fsub(s.fload(xp.add(i)), mv);
                let g = u.narrow8(s, i, s.fload(gp.add(i)));
                put_narrow(
                    s,
                    op.add(i),
                    o.narrow8(s, i, s.fnmadd(d, kbv, s.fmadd(g, kv, c0v))),
                    stream,
                )
            },
            // SAFETY: i < n.
            #[inline(always)]
            |i, _| unsafe {
                let g = u.narrow1(i, (*gp.add(i)).to_f32());
                *op.add(i) = T::from_f32(o.narrow1(i, c.apply((*xp.add(i)).to_f32(), g)))
            },
        );
        return;
    }
    let (xp, gp, op) = (x.as_ptr(), dy.as_ptr(), dx.as_mut_ptr());
    let (mv, kv, av, bv) = (s.splat(c.mean), s.splat(c.k), s.splat(c.a), s.splat(c.b));
    map_range(
        op,
        0,
        n,
        0,
        usize::MAX,
        stream,
        // SAFETY: i + 8 <= n, the length of all three buffers.
        #[inline(always)]
        |i, _, stream| unsafe {
            let xm = s.mul(s.sub(s.load(xp.add(i)), mv), bv);
            let g = u.wide8(s, i, s.load(gp.add(i)));
            put_wide(s, op.add(i), o.wide8(s, i, s.mul(kv, s.sub(s.sub(g, av), xm))), stream)
        },
        // SAFETY: i < n.
        #[inline(always)]
        |i, _| unsafe {
            let g = u.wide1(i, (*gp.add(i)).to_f64());
            *op.add(i) = T::from_f64(o.wide1(i, c.apply((*xp.add(i)).to_f64(), g)))
        },
    );
}

simd_dispatch! {
    /// dx over one plane of one channel (training mode); with `back`, from the upstream gradient
    /// behind a fused ReLU (see `relu`).
    pub(crate) fn dx_plane<T>(
        x: &[T], dy: &[T], dx: &mut [T], c: DxCoeffs, stream: bool, back: Option<Back<'_, T>>
    ) => dx_plane_impl
}

simd_dispatch! {
    /// [`dx_plane`] at the elements whose bit is set in `keep`, +0.0 at the others (as
    /// [`normalize_plane_kept`]).
    pub(crate) fn dx_plane_kept<T>(
        x: &[T], dy: &[T], dx: &mut [T], c: DxCoeffs, stream: bool, keep: BitsAt<'_>
    ) => dx_plane_kept_impl
}

/// [`DxCoeffs`] of all channels for the `rows` kernels, in the form the element type uses.
pub(crate) enum DxRows {
    Wide {
        mean: RowParam<f64>,
        k: RowParam<f64>,
        a: RowParam<f64>,
        b: RowParam<f64>,
    },
    /// `f32` constants; the channels in `wide` are computed in `f64` afterwards.
    Narrow {
        mean_hi: RowParam<f32>,
        k: RowParam<f32>,
        kb: RowParam<f32>,
        c0: RowParam<f32>,
        wide: Vec<(usize, DxCoeffs)>,
    },
}

impl DxRows {
    /// The constants of every channel, for elements of type `T`.
    #[inline(always)]
    pub fn new<T: Element>(coeffs: &[DxCoeffs]) -> DxRows {
        if !narrow::<T>() {
            return DxRows::Wide {
                mean: RowParam::from_fn(coeffs.len(), |c| coeffs[c].mean),
                k: RowParam::from_fn(coeffs.len(), |c| coeffs[c].k),
                a: RowParam::from_fn(coeffs.len(), |c| coeffs[c].a),
                b: RowParam::from_fn(coeffs.len(), |c| coeffs[c].b),
            };
        }
        let channels = coeffs.len();
        let room = || RowParam::room(channels);
        let (mut mean_hi, mut k, mut kb, mut c0) = (room(), room(), room(), room());
        let mut all_fit = true;
        let (m, kv, kbv, c0v) = (
            &mut mean_hi[..channels],
            &mut k[..channels],
            &mut kb[..channels],
            &mut c0[..channels],
        );
        for (ch, &c) in coeffs.iter().enumerate() {
            let (q, ok) = NarrowDx::checked(c);
            all_fit &= ok;
            (m[ch], kv[ch], kbv[ch], c0v[ch]) = (q.mean_hi, q.k, q.kb, q.c0);
        }
        let wide = match all_fit {
            true => Vec::new(),
            false => (0..channels)
                .filter(|&ch| !NarrowDx::checked(coeffs[ch]).1)
                .map(|ch| (ch, coeffs[ch]))
                .collect(),
        };
        DxRows::Narrow {
            mean_hi: RowParam::with_tail(mean_hi),
            k: RowParam::with_tail(k),
            kb: RowParam::with_tail(kb),
            c0: RowParam::with_tail(c0),
            wide,
        }
    }
}

impl DxRows {
    /// [`DxRows::new`] of `channels` channels whose coefficients `fill(first, out)` writes
    /// [`CONSTANT_CHUNK`] channels at a time (channels `first..first + out.len()`, `out` to be
    /// written whole): each chunk narrowed while it is in L1, rather than every channel's
    /// coefficients written to memory and read back. The same constants as `new` given what
    /// `fill` writes.
    #[inline(always)]
    pub fn from_chunks<T: Element>(channels: usize, mut fill: impl FnMut(usize, &mut [DxCoeffs])) -> DxRows {
        let mut chunk = [DxCoeffs::default(); CONSTANT_CHUNK];
        if !narrow::<T>() {
            let mut all = Scratch::<DxCoeffs>::any(channels);
            for first in (0..channels).step_by(CONSTANT_CHUNK) {
                let end = (first + CONSTANT_CHUNK).min(channels);
                fill(first, &mut all[first..end]);
            }
            return DxRows::new::<T>(&all);
        }
        let room = || RowParam::room(channels);
        let (mut mean_hi, mut k, mut kb, mut c0) = (room(), room(), room(), room());
        let mut wide = Vec::new();
        for first in (0..channels).step_by(CONSTANT_CHUNK) {
            let len = CONSTANT_CHUNK.min(channels - first);
            let coeffs = &mut chunk[..len];
            fill(first, coeffs);
            let mut all_fit = true;
            let r = first..first + len;
            let (m, kv, kbv, c0v) = (
                &mut mean_hi[r.clone()],
                &mut k[r.clone()],
                &mut kb[r.clone()],
                &mut c0[r],
            );
            for (ch, &c) in coeffs.iter().enumerate() {
                let (q, ok) = NarrowDx::checked(c);
                all_fit &= ok;
                (m[ch], kv[ch], kbv[ch], c0v[ch]) = (q.mean_hi, q.k, q.kb, q.c0);
            }
            if !all_fit {
                let off = coeffs.iter().enumerate().filter(|&(_, &c)| !NarrowDx::checked(c).1);
                wide.extend(off.map(|(ch, &c)| (first + ch, c)));
            }
        }
        DxRows::Narrow {
            mean_hi: RowParam::with_tail(mean_hi),
            k: RowParam::with_tail(k),
            kb: RowParam::with_tail(kb),
            c0: RowParam::with_tail(c0),
            wide,
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn dx_rows_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    p: &DxRows,
    stream: bool,
    back: Option<Back<'_, T>>,
) {
    assert!(x.len() == dx.len() && dy.len() == dx.len());
    with_upstream!(back, dx.len(), |u| dx_rows_with(s, x, dy, dx, p, stream, u, Plain))
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn dx_rows_kept_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    p: &DxRows,
    stream: bool,
    keep: BitsAt<'_>,
) {
    assert!(x.len() == dx.len() && dy.len() == dx.len());
    dx_rows_with(s, x, dy, dx, p, stream, Plain, Gated::new(keep))
}

/// dx over whole rows from the upstream gradient `u` makes of dy, each value through `o`
/// before it is stored.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dx_rows_with<S: Simd, T: Element, U: ElementMap<T>, O: ElementMap<T>>(
    s: S,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    p: &DxRows,
    stream: bool,
    u: U,
    o: O,
) {
    let n = dx.len();
    match (p, narrow::<T>()) {
        (
            DxRows::Narrow {
                mean_hi,
                k,
                kb,
                c0,
                wide,
            },
            true,
        ) => {
            let channels = mean_hi.channels();
            assert!(k.channels() == channels && kb.channels() == channels && c0.channels() == channels);
            let (xp, gp, op) = (x.as_ptr(), dy.as_ptr(), dx.as_mut_ptr());
            let (mp, kp, kbp, cp) = (mean_hi.ptr(), k.ptr(), kb.ptr(), c0.ptr());
            map_rows(
                op,
                n,
                channels,
                stream,
                // SAFETY: i + 8 <= n and c < channels, so c + 8 <= the constants' length.
                #[inline(always)]
                |i, c, stream| unsafe {
                    let d = s.fsub(s.fload(xp.add(i)), s.fload(mp.add(c)));
                    let g = u.narrow8(s, i, s.fload(gp.add(i)));
                    let t = s.fmadd(g, s.fload(kp.add(c)), s.fload(cp.add(c)));
                    put_narrow(
                        s,
                        op.add(i),
                        o.narrow8(s, i, s.fnmadd(d, s.fload(kbp.add(c)), t)),
                        stream,
                    )
                },
                // SAFETY: i < n and c < channels.
                #[inline(always)]
                |i, c| unsafe {
                    let q = NarrowDx {
                        mean_hi: *mp.add(c),
                        k: *kp.add(c),
                        kb: *kbp.add(c),
                        c0: *cp.add(c),
                    };
                    let g = u.narrow1(i, (*gp.add(i)).to_f32());
                    *op.add(i) = T::from_f32(o.narrow1(i, q.apply((*xp.add(i)).to_f32(), g)));
                },
            );
            // SAFETY: i < n.
            redo_channels(n, channels, stream, wide, |i, q| unsafe {
                let v = q.apply((*xp.add(i)).to_f64(), u.wide1(i, (*gp.add(i)).to_f64()));
                *op.add(i) = T::from_f64(o.wide1(i, v))
            });
        }
        (DxRows::Wide { mean, k, a, b }, _) => {
            let channels = mean.channels();
            assert!(k.channels() == channels && a.channels() == channels && b.channels() == channels);
            let (xp, gp, op) = (x.as_ptr(), dy.as_ptr(), dx.as_mut_ptr());
            let (mp, kp, ap, bp) = (mean.ptr(), k.ptr(), a.ptr(), b.ptr());
            map_rows(
                op,
                n,
                channels,
                stream,
                // SAFETY: i + 8 <= n and c < channels, so c + 8 <= the constants' length.
                #[inline(always)]
                |i, c, stream| unsafe {
                    let xm = s.mul(s.sub(s.load(xp.add(i)), s.load(mp.add(c))), s.load(bp.add(c)));
                    let g = u.wide8(s, i, s.load(gp.add(i)));
                    let v = s.mul(s.load(kp.add(c)), s.sub(s.sub(g, s.load(ap.add(c))), xm));
                    put_wide(s, op.add(i), o.wide8(s, i, v), stream)
                },
                // SAFETY: i < n and c < channels.
                #[inline(always)]
                |i, c| unsafe {
                    let q = DxCoeffs {
                        mean: *mp.add(c),
                        k: *kp.add(c),
                        a: *ap.add(c),
                        b: *bp.add(c),
                    };
                    let g = u.wide1(i, (*gp.add(i)).to_f64());
                    *op.add(i) = T::from_f64(o.wide1(i, q.apply((*xp.add(i)).to_f64(), g)));
                },
            );
        }
        _ => unreachable!("DxRows built for another element type"),
    }
}

simd_dispatch! {
    /// dx over whole rows of all channels (training mode); with `back`, from the upstream
    /// gradient behind a fused ReLU (see `relu`).
    pub(crate) fn dx_rows<T>(
        x: &[T], dy: &[T], dx: &mut [T], p: &DxRows, stream: bool, back: Option<Back<'_, T>>
    ) => dx_rows_impl
}

simd_dispatch! {
    /// [`dx_rows`] at the elements whose bit is set in `keep`, +0.0 at the others (as
    /// [`normalize_plane_kept`]).
    pub(crate) fn dx_rows_kept<T>(
        x: &[T], dy: &[T], dx: &mut [T], p: &DxRows, stream: bool, keep: BitsAt<'_>
    ) => dx_rows_kept_impl
}

#[inline(always)]
pub(super) fn scale_plane_impl<S: Simd, T: Element>(
    s: S,
    dy: &[T],
    dx: &mut [T],
    k: f64,
    stream: bool,
    back: Option<Back<'_, T>>,
) {
    assert_eq!(dy.len(), dx.len());
    with_upstream!(back, dx.len(), |u| scale_plane_with(s, dy, dx, k, stream, u))
}

#[inline(always)]
fn scale_plane_with<S: Simd, T: Element, U: ElementMap<T>>(s: S, dy: &[T], dx: &mut [T], k: f64, stream: bool, u: U) {
    let n = dx.len();
    if narrow::<T>() && fits(k) {
        let k = k as f32;
        let (gp, op) = (dy.as_ptr(), dx.as_mut_ptr());
        let kv = s.fsplat(k);
        map_range(
            op,
            0,
            n,
            0,
            usize::MAX,
            stream,
            // SAFETY: i + 8 <= n = dy.len() = dx.len().
            #[inline(always)]
            |i, _, stream| unsafe { put_narrow(s, op.add(i), s.fmul(u.narrow8(s, i, s.fload(gp.add(i))), kv), stream) },
            // SAFETY: i < n.
            #[inline(always)]
            |i, _| unsafe { *op.add(i) = T::from_f32(u.narrow1(i, (*gp.add(i)).to_f32()) * k) },
        );
        return;
    }
    let (gp, op) = (dy.as_ptr(), dx.as_mut_ptr());
    let kv = s.splat(k);
    map_range(
        op,
        0,
        n,
        0,
        usize::MAX,
        stream,
        // SAFETY: i + 8 <= n = dy.len() = dx.len().
        #[inline(always)]
        |i, _, stream| unsafe { put_wide(s, op.add(i), s.mul(u.wide8(s, i, s.load(gp.add(i))), kv), stream) },
        // SAFETY: i < n.
        #[inline(always)]
        |i, _| unsafe { *op.add(i) = T::from_f64(u.wide1(i, (*gp.add(i)).to_f64()) * k) },
    );
}

simd_dispatch! {
    /// dx = dy·k over one plane (inference-mode backward: the statistics are constants). For
    /// `f32`, k is rounded to `f32` first (≤ 1 ulp from the exact product). With `back`, from the
    /// upstream gradient behind a fused ReLU (see `relu`).
    pub(crate) fn scale_plane<T>(
        dy: &[T], dx: &mut [T], k: f64, stream: bool, back: Option<Back<'_, T>>
    ) => scale_plane_impl
}

/// Per-channel factors of the inference-mode backward for the `rows` kernels.
pub(crate) enum RowsScale {
    Wide(RowParam<f64>),
    /// `f32` factors; the channels in the list (whose factor does not fit `f32`) are computed in
    /// `f64` afterwards.
    Narrow(RowParam<f32>, Vec<(usize, f64)>),
}

impl RowsScale {
    /// The factors of every channel, for elements of type `T`.
    pub fn new<T: Element>(k: &[f64]) -> RowsScale {
        if !narrow::<T>() {
            return RowsScale::Wide(RowParam::from_fn(k.len(), |c| k[c]));
        }
        let wide = k
            .iter()
            .enumerate()
            .filter(|(_, &v)| !fits(v))
            .map(|(c, &v)| (c, v))
            .collect();
        RowsScale::Narrow(
            RowParam::from_fn(k.len(), |c| if fits(k[c]) { k[c] as f32 } else { 0.0 }),
            wide,
        )
    }
}

#[inline(always)]
pub(super) fn scale_rows_impl<S: Simd, T: Element>(
    s: S,
    dy: &[T],
    dx: &mut [T],
    k: &RowsScale,
    stream: bool,
    back: Option<Back<'_, T>>,
) {
    assert_eq!(dy.len(), dx.len());
    with_upstream!(back, dx.len(), |u| scale_rows_with(s, dy, dx, k, stream, u))
}

#[inline(always)]
fn scale_rows_with<S: Simd, T: Element, U: ElementMap<T>>(
    s: S,
    dy: &[T],
    dx: &mut [T],
    k: &RowsScale,
    stream: bool,
    u: U,
) {
    let n = dx.len();
    match (k, narrow::<T>()) {
        (RowsScale::Narrow(k, wide), true) => {
            let (gp, op, kp) = (dy.as_ptr(), dx.as_mut_ptr(), k.ptr());
            map_rows(
                op,
                n,
                k.channels(),
                stream,
                // SAFETY: i + 8 <= n; c + 8 <= k's length.
                #[inline(always)]
                |i, c, stream| unsafe {
                    let g = u.narrow8(s, i, s.fload(gp.add(i)));
                    put_narrow(s, op.add(i), s.fmul(g, s.fload(kp.add(c))), stream)
                },
                // SAFETY: i < n and c < channels.
                #[inline(always)]
                |i, c| unsafe { *op.add(i) = T::from_f32(u.narrow1(i, (*gp.add(i)).to_f32()) * *kp.add(c)) },
            );
            // SAFETY: i < n.
            redo_channels(n, k.channels(), stream, wide, |i, kc| unsafe {
                *op.add(i) = T::from_f64(u.wide1(i, (*gp.add(i)).to_f64()) * kc)
            });
        }
        (RowsScale::Wide(k), _) => {
            let (gp, op, kp) = (dy.as_ptr(), dx.as_mut_ptr(), k.ptr());
            map_rows(
                op,
                n,
                k.channels(),
                stream,
                // SAFETY: i + 8 <= n; c + 8 <= k's length.
                #[inline(always)]
                |i, c, stream| unsafe {
                    let g = u.wide8(s, i, s.load(gp.add(i)));
                    put_wide(s, op.add(i), s.mul(g, s.load(kp.add(c))), stream)
                },
                // SAFETY: i < n and c < channels.
                #[inline(always)]
                |i, c| unsafe { *op.add(i) = T::from_f64(u.wide1(i, (*gp.add(i)).to_f64()) * *kp.add(c)) },
            );
        }
        _ => unreachable!("RowsScale built for another element type"),
    }
}

simd_dispatch! {
    /// dx = dy·k[c] over whole rows of all channels; with `back`, from the upstream gradient
    /// behind a fused ReLU (see `relu`).
    pub(crate) fn scale_rows<T>(
        dy: &[T], dx: &mut [T], k: &RowsScale, stream: bool, back: Option<Back<'_, T>>
    ) => scale_rows_impl
}

/// [`scale_rows`] written from inside a rows reduction over dy, as it reads each 8 elements
/// (a [`RowsEpilogue`]): dx = dy·k\[c\] of the same bits, without a second walk over dy. With
/// streaming stores (`STREAM`) and dx not at a [`STREAM_ALIGN`] boundary, the vector stored
/// after elements i..i + 8 are read is the one `lag` elements back, which starts at a boundary
/// (every element is computed by the same formula wherever the vectors start) and has been read
/// already; [`ScaleRowsAfter::finish`] then writes the elements no vector covers (the first
/// 8 − `lag` and the last `lag`).
#[derive(Clone, Copy)]
pub(crate) struct ScaleRowsAfter<'a, T, const STREAM: bool> {
    gp: *const T,
    op: *mut T,
    /// The factors of [`RowsScale::Narrow`] (`f32` elements) or of [`RowsScale::Wide`].
    narrow: *const f32,
    wide: *const f64,
    channels: usize,
    n: usize,
    /// 0, or the elements from the boundary before the vectors the reduction reads to them.
    lag: usize,
    _buf: std::marker::PhantomData<&'a mut [T]>,
}

impl<'a, T: Element, const STREAM: bool> ScaleRowsAfter<'a, T, STREAM> {
    /// dx = dy·k over `dx` (whole rows of k's channels, a multiple of 8 of them), or `None`
    /// where the kernel cannot write it this way: factors that need the `f64` path
    /// ([`RowsScale::Narrow`]'s list), or, streaming, element types whose 8 elements are less
    /// than [`STREAM_ALIGN`] bytes (vectors 8 elements apart would not all be aligned).
    pub fn new(dy: &'a [T], dx: &'a mut [T], k: &'a RowsScale) -> Option<Self> {
        let size = std::mem::size_of::<T>();
        if !Self::takes(k) {
            return None;
        }
        let (narrow, wide, channels) = match k {
            RowsScale::Narrow(k, _) => (k.ptr(), std::ptr::null(), k.channels()),
            RowsScale::Wide(k) => (std::ptr::null(), k.ptr(), k.channels()),
        };
        let n = dx.len();
        if dy.len() != n || n < 8 || !n.is_multiple_of(channels) {
            return None;
        }
        // Elements from the boundary before dx (8 · size ≥ STREAM_ALIGN, and rows are whole
        // vectors, so every vector that starts `lag` back from one the reduction reads starts at
        // one).
        let lag = if STREAM {
            dx.as_ptr() as usize % STREAM_ALIGN / size
        } else {
            0
        };
        Some(ScaleRowsAfter {
            gp: dy.as_ptr(),
            op: dx.as_mut_ptr(),
            narrow,
            wide,
            channels,
            n,
            lag,
            _buf: std::marker::PhantomData,
        })
    }

    /// Whether [`ScaleRowsAfter::new`] takes blocks of whole rows with these factors: channels
    /// a multiple of 8, factors of the element type's path that all fit it, and, streaming,
    /// vectors of 8 elements of at least [`STREAM_ALIGN`] bytes.
    pub fn takes(k: &RowsScale) -> bool {
        let channels = match (k, narrow::<T>()) {
            (RowsScale::Narrow(k, wide), true) if wide.is_empty() => k.channels(),
            (RowsScale::Wide(k), false) => k.channels(),
            _ => return false,
        };
        channels.is_multiple_of(8) && (!STREAM || 8 * std::mem::size_of::<T>() >= STREAM_ALIGN)
    }

    /// dx\[i\] for element i of channel c, as [`scale_rows`]'s scalar step writes it.
    ///
    /// # Safety
    /// i < n, c < channels.
    #[inline(always)]
    unsafe fn one(self, i: usize, c: usize) {
        // SAFETY: the caller's contract; the factors hold `channels` entries (and 8 more).
        unsafe {
            let g = *self.gp.add(i);
            *self.op.add(i) = if narrow::<T>() {
                T::from_f32(g.to_f32() * *self.narrow.add(c))
            } else {
                T::from_f64(g.to_f64() * *self.wide.add(c))
            };
        }
    }

    /// Writes the elements no vector covers: the first 8 − `lag` and the last `lag` (none when
    /// `lag` is 0). Call after the reduction, before [`stream_fence`].
    pub fn finish(self) {
        if self.lag == 0 {
            return;
        }
        for i in (0..8 - self.lag).chain(self.n - self.lag..self.n) {
            // SAFETY: i < n, and i % channels < channels.
            unsafe { self.one(i, i % self.channels) }
        }
    }
}

impl<T: Element, const STREAM: bool> RowsEpilogue for ScaleRowsAfter<'_, T, STREAM> {
    #[inline(always)]
    unsafe fn after8<S: Simd>(self, s: S, i: usize, c: usize) {
        if i < self.lag {
            // The first vector, moved back before the start: `finish` writes its elements.
            return;
        }
        // Channel c − lag, or at a row's first channels the previous row's last ones, from
        // channels − lag on (a `RowParam` repeats its first 8 after the last channel).
        let j = i - self.lag;
        let c = if c >= self.lag {
            c - self.lag
        } else {
            c + self.channels - self.lag
        };
        // SAFETY: j + 8 <= i + 8 <= n = dy.len() = dx.len() (the caller's contract); c + 8 <=
        // channels + 8, inside the factors; with STREAM, op + j is at a STREAM_ALIGN boundary
        // (see `new`).
        unsafe {
            if narrow::<T>() {
                let g = s.fload(self.gp.add(j));
                put_narrow(s, self.op.add(j), s.fmul(g, s.fload(self.narrow.add(c))), STREAM)
            } else {
                let g = s.load(self.gp.add(j));
                put_wide(s, self.op.add(j), s.mul(g, s.load(self.wide.add(c))), STREAM)
            }
        }
    }
}

/// `out` = +0.0, with streaming stores where `stream` (from the [`STREAM_ALIGN`] boundary on):
/// the positions a masked pass writes as 0, where the rest of its output streams, so that their
/// lines are not read from memory before they are overwritten.
/// Half types store their zeros through the `f32` lanes (+0.0 is a value of every type, stored
/// exactly), not lane by lane as the `f64` lanes' stores of them do.
#[inline(always)]
pub(super) fn zero_fill_impl<S: Simd, T: Element>(s: S, out: &mut [T], stream: bool) {
    let zero = T::from_f64(0.0);
    if !stream {
        return out.fill(zero);
    }
    let (p, n, v, f) = (out.as_mut_ptr(), out.len(), s.splat(0.0), s.fsplat(0.0));
    map_range(
        p,
        0,
        n,
        0,
        usize::MAX,
        true,
        // SAFETY: i + 8 <= n, and p + i is aligned to `STREAM_ALIGN` (`map_range`'s head).
        #[inline(always)]
        |i, _, stream| unsafe {
            match narrow::<T>() {
                true => s.fput_exact(p.add(i), f, stream),
                false => put_wide(s, p.add(i), v, stream),
            }
        },
        // SAFETY: i < n.
        #[inline(always)]
        |i, _| unsafe { *p.add(i) = zero },
    );
}

simd_dispatch! {
    /// [`zero_fill_impl`]: +0.0 over `out`, streamed where `stream`.
    pub(crate) fn zero_fill<T>(out: &mut [T], stream: bool) => zero_fill_impl
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
