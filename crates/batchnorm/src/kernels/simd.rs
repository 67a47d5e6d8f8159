//! A minimal SIMD layer: vectors of [`LANES`](super::LANES) `f64` lanes, with a portable backend
//! ([`Scalar`]) and an AVX2 one ([`Avx2`]) that compute the same bits.
//!
//! Kernels are written once, generic over [`Simd`], and instantiated by [`simd_dispatch!`]: one
//! copy in a function compiled for AVX2 + FMA (picked at run time when the CPU has them) and one
//! portable copy. Both backends do lane-wise IEEE `f64` add/sub/mul, `f64` fused multiply-adds
//! (the reductions' Σd² and Σdy·d terms: one rounding per term) and round-to-nearest
//! conversions, and lane-wise IEEE `f32` add/sub/mul and fused multiply-adds (the portable ones
//! with `f64::mul_add` / `f32::mul_add`, correctly rounded; without hardware FMA they are slow
//! but exact), so every kernel gives the same bits on either path.
//!
//! Half tensors (`bf16`, `f16`) take the `f32` lanes: a load widens each element to `f32`
//! exactly (F16C's `vcvtph2ps` for `f16`; `bf16` by shifting its bits left 16), a store rounds
//! each lane once to the half type, round-to-nearest-even (`vcvtps2ph` for `f16`; for `bf16`
//! the integer rounding of `element::sealed::bf16_bits`), a NaN staying a quiet NaN. The
//! portable backend does the same per element.

use crate::element::Kind;
use crate::Element;

/// Bytes of alignment a [`Simd::stream`] store needs.
pub(crate) const STREAM_ALIGN: usize = 32;

/// Operations on vectors of 8 `f64` lanes.
pub(crate) trait Simd: Copy {
    /// A vector of 8 `f64`.
    type V: Copy;
    fn splat(self, v: f64) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// a·b + c with one rounding (fused multiply-add, as [`f64::mul_add`]).
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    fn lanes(self, v: Self::V) -> [f64; 8];
    /// Each lane rounded to `T` (round-to-nearest-even) and widened back: the value a store to
    /// `T` would keep.
    fn round<T: Element>(self, v: Self::V) -> Self::V;
    /// A ReLU: the lanes that are not ≤ 0 (those > 0, and NaN) as they are, +0.0 in the others;
    /// and which lanes it kept, lane l as bit l.
    fn relu(self, v: Self::V) -> (Self::V, u8);
    /// The lanes whose bit (lane l: bit l) is set in `bits`, +0.0 in the others (a select).
    fn gate(self, bits: u8, v: Self::V) -> Self::V;
    /// Loads 8 elements from `p` (no alignment needed), widened to `f64`.
    ///
    /// # Safety
    /// `p` must be valid for reading 8 elements.
    unsafe fn load<T: Element>(self, p: *const T) -> Self::V;
    /// Rounds the 8 lanes to `T` and stores them at `p` (no alignment needed).
    ///
    /// # Safety
    /// `p` must be valid for writing 8 elements.
    unsafe fn store<T: Element>(self, p: *mut T, v: Self::V);
    /// As [`Simd::store`], with a non-temporal (streaming) store where the backend has one. Call
    /// `elementwise::stream_fence` before the data is handed to another thread.
    ///
    /// # Safety
    /// `p` must be valid for writing 8 elements and aligned to [`STREAM_ALIGN`] bytes.
    unsafe fn stream<T: Element>(self, p: *mut T, v: Self::V);

    /// A vector of 8 `f32` (the element-precision path of `f32`, `bf16` and `f16` tensors).
    type F: Copy;
    fn fsplat(self, v: f32) -> Self::F;
    fn fadd(self, a: Self::F, b: Self::F) -> Self::F;
    fn fsub(self, a: Self::F, b: Self::F) -> Self::F;
    fn fmul(self, a: Self::F, b: Self::F) -> Self::F;
    /// a·b + c with one rounding (fused multiply-add).
    fn fmadd(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// c − a·b with one rounding.
    fn fnmadd(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// [`Simd::relu`] of 8 `f32` lanes.
    fn frelu(self, v: Self::F) -> (Self::F, u8);
    /// [`Simd::gate`] of 8 `f32` lanes.
    fn fgate(self, bits: u8, v: Self::F) -> Self::F;
    /// The loop invariant of [`Simd::fgate_at`] for bits that start at bit `offset` (< 8) of
    /// the byte read.
    type Sel: Copy;
    /// [`Simd::fgate_at`]'s invariant for bits from bit `offset` < 8 of their first byte on.
    fn sel_at(self, offset: usize) -> Self::Sel;
    /// [`Simd::fgate`] of `v` by the 8 bits from bit `offset` of the byte at `p` on (`sel` made
    /// by [`Simd::sel_at`] for `offset`): the 4 bytes from `p` read at once and each lane's bit
    /// shifted into its sign, so that a loop over consecutive bytes selects without scalar work.
    ///
    /// # Safety
    /// `p` must be valid for reading 4 bytes.
    unsafe fn fgate_at(self, sel: Self::Sel, p: *const u8, v: Self::F) -> Self::F;
    /// Loads 8 elements of a type that takes the `f32` path (`f32`, `bf16`, `f16`; see
    /// [`narrow`]) from `p` (no alignment needed), widened to `f32` exactly.
    ///
    /// # Safety
    /// `p` must be valid for reading 8 elements.
    unsafe fn fload<T: Element>(self, p: *const T) -> Self::F;
    /// Rounds the 8 lanes to `T` (a type that takes the `f32` path) and stores them at `p`.
    ///
    /// # Safety
    /// `p` must be valid for writing 8 elements.
    unsafe fn fstore<T: Element>(self, p: *mut T, v: Self::F);
    /// # Safety
    /// As [`Simd::stream`].
    unsafe fn fstream<T: Element>(self, p: *mut T, v: Self::F);
    /// [`Simd::fstore`] (with `stream`, [`Simd::fstream`]) of lanes that are already values of
    /// `T`, a NaN only a quiet one (results of [`Simd::fround`], or +0.0): the same bits, without
    /// the rounding's work where it has any (`bf16`).
    ///
    /// # Safety
    /// As [`Simd::fstore`] / [`Simd::fstream`]. Other lanes are not unsafe but stored wrong
    /// (`bf16`: truncated).
    #[inline(always)]
    unsafe fn fput_exact<T: Element>(self, p: *mut T, v: Self::F, stream: bool) {
        // SAFETY: the caller's contract.
        unsafe {
            if stream {
                self.fstream(p, v)
            } else {
                self.fstore(p, v)
            }
        }
    }
    /// Each lane rounded to `T` (a type that takes the `f32` path) and widened back: the value
    /// a store to `T` would keep.
    fn fround<T: Element>(self, v: Self::F) -> Self::F;

    /// Whether [`Simd::fload_pair`] and [`Simd::fput_pair`] of `bf16` cost less than two 8-lane
    /// loads and stores (the AVX2 backend: no shuffle at all), so that kernels take 16 `bf16`
    /// elements a step that way.
    const BF16_PAIRS: bool = false;
    /// Loads 16 elements of a type that takes the `f32` path from `p`, widened to `f32` exactly,
    /// split by parity: (elements 0, 2, …, 14; elements 1, 3, …, 15).
    ///
    /// # Safety
    /// `p` must be valid for reading 16 elements.
    unsafe fn fload_pair<T: Element>(self, p: *const T) -> (Self::F, Self::F);
    /// Rounds the lanes of `even` and `odd` to `T` (as [`Simd::fstore`]) and stores them at `p`
    /// interleaved: `even` lane l to element 2l, `odd` lane l to element 2l + 1 (the inverse of
    /// [`Simd::fload_pair`]); non-temporally with `stream`.
    ///
    /// # Safety
    /// `p` must be valid for writing 16 elements, and with `stream` aligned to [`STREAM_ALIGN`]
    /// bytes.
    unsafe fn fput_pair<T: Element>(self, p: *mut T, even: Self::F, odd: Self::F, stream: bool);

    /// Which of 8 lanes are on (a mask over positions, as masked batch norm takes it).
    type M: Copy;
    /// The lane mask of 8 bits (lane l: bit l).
    fn lane_mask(self, bits: u8) -> Self::M;
    /// The lanes of `v` that `m` has on, +0.0 in the others: a select, so a NaN or an infinity in
    /// a lane that is off never reaches the result (a product with 0 would let it through).
    fn keep(self, m: Self::M, v: Self::V) -> Self::V;

    /// Copies the elements `k` of `src[0..8]` whose bit `k` of `bits` is set to `dst`, in
    /// order, and returns their number `n`; `dst[n..8]` get elements of `src` (which ones is
    /// unspecified, so they must not be read).
    ///
    /// # Safety
    /// `src` must be valid for reading 8 elements and `dst` for writing 8.
    unsafe fn pack8<T: Element>(self, src: *const T, bits: u8, dst: *mut T) -> usize;
}

/// For each byte of bits, the positions of its set bits in increasing order, one per byte of
/// the entry (the first in the lowest byte; 0 in the bytes after the last): the lanes a
/// [`Simd::pack8`] gathers.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static PACK_INDICES: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut bits = 0;
    while bits < 256 {
        let (mut k, mut n) = (0, 0);
        while k < 8 {
            if bits >> k & 1 == 1 {
                table[bits] |= (k as u64) << (8 * n);
                n += 1;
            }
            k += 1;
        }
        bits += 1;
    }
    table
};

/// For each byte of bits, the number set (without the `popcnt` instruction, which the
/// dispatched functions are not compiled for).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static PACK_COUNTS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut bits = 0;
    while bits < 256 {
        table[bits] = (bits as u8).count_ones() as u8;
        bits += 1;
    }
    table
};

/// Whether tensors of `T` take the `f32` path (`f32`, `bf16`, `f16`; not `f64`). Folds to a
/// constant.
#[inline(always)]
pub(crate) fn narrow<T: Element>() -> bool {
    T::KIND != Kind::F64
}

/// Whether a ReLU keeps `v`: not ≤ 0, so > 0 or NaN (a NaN propagates, as IEEE 754 and
/// PyTorch's `relu` have it). The one place the fused passes' ReLU is defined.
#[inline(always)]
pub(crate) fn relu_keeps(v: f64) -> bool {
    v > 0.0 || v.is_nan()
}

/// A ReLU of one value: `v` where [`relu_keeps`], +0.0 elsewhere (−0.0 included).
#[inline(always)]
pub(crate) fn relu_one(v: f64) -> f64 {
    if relu_keeps(v) {
        v
    } else {
        0.0
    }
}

/// Which of 8 lanes a ReLU keeps, lane l as bit l.
#[inline(always)]
fn relu_bits(v: &[f64; 8]) -> u8 {
    v.iter()
        .enumerate()
        .fold(0, |b, (l, &x)| b | (relu_keeps(x) as u8) << l)
}

/// The portable backend: arrays of 8 `f64`, which the compiler vectorizes as it can.
#[derive(Clone, Copy)]
pub(crate) struct Scalar;

impl Simd for Scalar {
    type V = [f64; 8];
    #[inline(always)]
    fn splat(self, v: f64) -> Self::V {
        [v; 8]
    }
    #[inline(always)]
    fn add(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] + b[l])
    }
    #[inline(always)]
    fn sub(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] - b[l])
    }
    #[inline(always)]
    fn mul(self, a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] * b[l])
    }
    #[inline(always)]
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l].mul_add(b[l], c[l]))
    }
    #[inline(always)]
    fn lanes(self, v: Self::V) -> [f64; 8] {
        v
    }
    #[inline(always)]
    fn round<T: Element>(self, v: Self::V) -> Self::V {
        v.map(|x| T::from_f64(x).to_f64())
    }
    #[inline(always)]
    fn relu(self, v: Self::V) -> (Self::V, u8) {
        (v.map(relu_one), relu_bits(&v))
    }
    #[inline(always)]
    fn gate(self, bits: u8, v: Self::V) -> Self::V {
        std::array::from_fn(|l| if bits >> l & 1 == 1 { v[l] } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn load<T: Element>(self, p: *const T) -> Self::V {
        // SAFETY: the caller guarantees 8 readable elements.
        std::array::from_fn(|l| unsafe { *p.add(l) }.to_f64())
    }
    #[inline(always)]
    unsafe fn store<T: Element>(self, p: *mut T, v: Self::V) {
        for (l, &x) in v.iter().enumerate() {
            // SAFETY: the caller guarantees 8 writable elements.
            unsafe { *p.add(l) = T::from_f64(x) };
        }
    }
    #[inline(always)]
    unsafe fn stream<T: Element>(self, p: *mut T, v: Self::V) {
        // SAFETY: as `store`.
        unsafe { self.store(p, v) }
    }

    type F = [f32; 8];
    #[inline(always)]
    fn fsplat(self, v: f32) -> Self::F {
        [v; 8]
    }
    #[inline(always)]
    fn fadd(self, a: Self::F, b: Self::F) -> Self::F {
        std::array::from_fn(|l| a[l] + b[l])
    }
    #[inline(always)]
    fn fsub(self, a: Self::F, b: Self::F) -> Self::F {
        std::array::from_fn(|l| a[l] - b[l])
    }
    #[inline(always)]
    fn fmul(self, a: Self::F, b: Self::F) -> Self::F {
        std::array::from_fn(|l| a[l] * b[l])
    }
    #[inline(always)]
    fn fmadd(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F {
        std::array::from_fn(|l| a[l].mul_add(b[l], c[l]))
    }
    #[inline(always)]
    fn fnmadd(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F {
        std::array::from_fn(|l| (-a[l]).mul_add(b[l], c[l]))
    }
    #[inline(always)]
    fn frelu(self, v: Self::F) -> (Self::F, u8) {
        let bits = relu_bits(&v.map(f64::from));
        (v.map(|x| relu_one(x as f64) as f32), bits)
    }
    #[inline(always)]
    fn fgate(self, bits: u8, v: Self::F) -> Self::F {
        std::array::from_fn(|l| if bits >> l & 1 == 1 { v[l] } else { 0.0 })
    }
    type Sel = usize;
    #[inline(always)]
    fn sel_at(self, offset: usize) -> usize {
        debug_assert!(offset < 8);
        offset
    }
    #[inline(always)]
    unsafe fn fgate_at(self, sel: usize, p: *const u8, v: Self::F) -> Self::F {
        // SAFETY: 4 readable bytes (caller's contract).
        let word = u32::from_le(unsafe { (p as *const u32).read_unaligned() });
        self.fgate((word >> sel) as u8, v)
    }
    #[inline(always)]
    unsafe fn fload<T: Element>(self, p: *const T) -> Self::F {
        // SAFETY: the caller guarantees 8 readable elements.
        std::array::from_fn(|l| unsafe { *p.add(l) }.to_f32())
    }
    #[inline(always)]
    unsafe fn fstore<T: Element>(self, p: *mut T, v: Self::F) {
        for (l, &x) in v.iter().enumerate() {
            // SAFETY: the caller guarantees 8 writable elements.
            unsafe { *p.add(l) = T::from_f32(x) };
        }
    }
    #[inline(always)]
    unsafe fn fstream<T: Element>(self, p: *mut T, v: Self::F) {
        // SAFETY: as `fstore`.
        unsafe { self.fstore(p, v) }
    }
    #[inline(always)]
    fn fround<T: Element>(self, v: Self::F) -> Self::F {
        v.map(|x| T::from_f32(x).to_f32())
    }
    #[inline(always)]
    unsafe fn fload_pair<T: Element>(self, p: *const T) -> (Self::F, Self::F) {
        // SAFETY: the caller guarantees 16 readable elements.
        let at = |k: usize| unsafe { *p.add(k) }.to_f32();
        (
            std::array::from_fn(|l| at(2 * l)),
            std::array::from_fn(|l| at(2 * l + 1)),
        )
    }
    #[inline(always)]
    unsafe fn fput_pair<T: Element>(self, p: *mut T, even: Self::F, odd: Self::F, _stream: bool) {
        for l in 0..8 {
            // SAFETY: the caller guarantees 16 writable elements.
            unsafe {
                *p.add(2 * l) = T::from_f32(even[l]);
                *p.add(2 * l + 1) = T::from_f32(odd[l]);
            }
        }
    }

    type M = [bool; 8];
    #[inline(always)]
    fn lane_mask(self, bits: u8) -> Self::M {
        std::array::from_fn(|l| bits >> l & 1 == 1)
    }
    #[inline(always)]
    fn keep(self, m: Self::M, v: Self::V) -> Self::V {
        std::array::from_fn(|l| if m[l] { v[l] } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn pack8<T: Element>(self, src: *const T, bits: u8, dst: *mut T) -> usize {
        let mut n = 0;
        for k in 0..8 {
            // SAFETY: n ≤ k < 8, inside both (caller's contract).
            unsafe { *dst.add(n) = *src.add(k) };
            n += (bits >> k & 1) as usize;
        }
        n
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{has_avx2, Avx2};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use crate::element::Kind;
    use crate::Element;
    use std::arch::x86_64::*;

    /// Whether the CPU has AVX2, FMA and F16C (cached by the standard library). Every CPU with
    /// AVX2 has F16C; it is checked all the same, and without it the portable backend runs.
    #[inline(always)]
    pub(crate) fn has_avx2() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// Loads 8 `bf16` from `p` widened to `f32`: each placed in the high half of its lane
    /// (shifted left 16 bits), exact. The 16 bytes are broadcast to both 128-bit halves by the
    /// load itself, so one in-lane byte shuffle does the rest (rather than a lane-crossing
    /// widening plus a shift: shuffles and shifts share the same few execution ports).
    ///
    /// # Safety
    /// `p` must be valid for reading 16 bytes.
    #[inline(always)]
    unsafe fn bf16_load(p: *const u8) -> __m256 {
        unsafe {
            let h = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
            // Output lane l (bytes 4l..4l + 4): bytes 2l, 2l + 1 of the input on top, zeros below
            // (-1 selects a zero).
            let to_high = _mm256_setr_epi8(
                -1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7, //
                -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15,
            );
            _mm256_castsi256_ps(_mm256_shuffle_epi8(h, to_high))
        }
    }

    /// Each lane of `x` (the bits of an `f32` that is not a NaN) rounded to `bf16`, in the high
    /// 16 bits of the lane (the low 16 bits are not meaningful): round-to-nearest-even, the steps
    /// of `element::sealed::bf16_bits`: x + 0x7fff + (last kept bit) is written x + 0x8000 − (1
    /// where that bit is 0), which needs no shift.
    #[inline(always)]
    unsafe fn bf16_round_high_finite(x: __m256i) -> __m256i {
        unsafe {
            let kept_even =
                _mm256_cmpeq_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x1_0000)), _mm256_setzero_si256());
            _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x8000)), kept_even)
        }
    }

    /// `rounded` ([`bf16_round_high_finite`] of `v`) with the lanes where `v` is a NaN (all-ones
    /// in `nan`) replaced by the NaN truncated, its quiet bit (bit 22 of the `f32`, bit 6 of the
    /// `bf16`) set.
    #[inline(always)]
    unsafe fn bf16_quiet_nans(v: __m256, rounded: __m256i, nan: __m256) -> __m256i {
        unsafe {
            let quiet = _mm256_or_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x0040_0000));
            _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(nan))
        }
    }

    /// Each lane of `v` rounded to `bf16`, in the high 16 bits of the lane (the low 16 bits are
    /// not meaningful): round-to-nearest-even, a NaN kept a quiet NaN (as
    /// `element::sealed::bf16_bits`). The NaN select is skipped when no lane is NaN (a branch
    /// that data without NaN always predicts).
    #[inline(always)]
    unsafe fn bf16_round_high(v: __m256) -> __m256i {
        unsafe {
            let rounded = bf16_round_high_finite(_mm256_castps_si256(v));
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
            if _mm256_movemask_ps(nan) == 0 {
                return rounded;
            }
            bf16_quiet_nans(v, rounded, nan)
        }
    }

    /// Loads 16 `bf16` from `p` widened to `f32`, split by parity (see `Simd::fload_pair`): each
    /// 32-bit lane of the load holds element 2l in its low half and 2l + 1 in its high half, so
    /// a shift left and a mask widen them, with no shuffle.
    ///
    /// # Safety
    /// `p` must be valid for reading 32 bytes.
    #[inline(always)]
    unsafe fn bf16_load_pair(p: *const u8) -> (__m256, __m256) {
        unsafe {
            let x = _mm256_loadu_si256(p as *const __m256i);
            let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
            (
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(x)),
                _mm256_castsi256_ps(_mm256_and_si256(x, high)),
            )
        }
    }

    /// The `bf16` bits of `even` and `odd` rounded (as [`bf16_round_high`]), interleaved back as
    /// [`bf16_load_pair`] split them: 16 elements, `even` lane l at element 2l. One NaN test
    /// for both vectors.
    #[inline(always)]
    unsafe fn bf16_pack_pair(even: __m256, odd: __m256) -> __m256i {
        unsafe {
            let mut re = bf16_round_high_finite(_mm256_castps_si256(even));
            let mut ro = bf16_round_high_finite(_mm256_castps_si256(odd));
            let (ne, no) = (
                _mm256_cmp_ps::<_CMP_UNORD_Q>(even, even),
                _mm256_cmp_ps::<_CMP_UNORD_Q>(odd, odd),
            );
            if _mm256_movemask_ps(_mm256_or_ps(ne, no)) != 0 {
                re = bf16_quiet_nans(even, re, ne);
                ro = bf16_quiet_nans(odd, ro, no);
            }
            let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
            _mm256_or_si256(_mm256_srli_epi32::<16>(re), _mm256_and_si256(ro, high))
        }
    }

    /// Rounds 8 `f32` to `bf16` (their bits), as [`bf16_round_high`].
    #[inline(always)]
    unsafe fn f32_to_bf16(v: __m256) -> __m128i {
        unsafe { high_halves(bf16_round_high(v)) }
    }

    /// The high 16 bits of each of 8 lanes, in order: the `bf16` bits of lanes that hold a
    /// `bf16` value (low 16 bits zero), or that [`bf16_round_high`] rounded.
    #[inline(always)]
    unsafe fn high_halves(r: __m256i) -> __m128i {
        unsafe {
            let r = _mm256_srli_epi32::<16>(r);
            // Every lane is below 2¹⁶, so the saturating pack is exact.
            _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r))
        }
    }

    /// The AVX2 backend: a vector is two `__m256d` (lanes 0–3, 4–7). Only constructible where
    /// the CPU has AVX2, FMA and F16C.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(());

    impl Avx2 {
        /// # Safety
        /// The CPU must support AVX2, FMA and F16C, and the caller must be compiled with them
        /// enabled.
        #[inline(always)]
        pub(crate) unsafe fn new_unchecked() -> Avx2 {
            Avx2(())
        }
    }

    // SAFETY (all `unsafe` blocks below): an `Avx2` value exists only where the CPU has AVX2
    // (see `new_unchecked`); pointer validity is the caller's contract, as documented on `Simd`.
    impl Simd for Avx2 {
        type V = (__m256d, __m256d);
        #[inline(always)]
        fn splat(self, v: f64) -> Self::V {
            unsafe { (_mm256_set1_pd(v), _mm256_set1_pd(v)) }
        }
        #[inline(always)]
        fn add(self, a: Self::V, b: Self::V) -> Self::V {
            unsafe { (_mm256_add_pd(a.0, b.0), _mm256_add_pd(a.1, b.1)) }
        }
        #[inline(always)]
        fn sub(self, a: Self::V, b: Self::V) -> Self::V {
            unsafe { (_mm256_sub_pd(a.0, b.0), _mm256_sub_pd(a.1, b.1)) }
        }
        #[inline(always)]
        fn mul(self, a: Self::V, b: Self::V) -> Self::V {
            unsafe { (_mm256_mul_pd(a.0, b.0), _mm256_mul_pd(a.1, b.1)) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            unsafe { (_mm256_fmadd_pd(a.0, b.0, c.0), _mm256_fmadd_pd(a.1, b.1, c.1)) }
        }
        #[inline(always)]
        fn round<T: Element>(self, v: Self::V) -> Self::V {
            match T::KIND {
                Kind::F32 => unsafe {
                    (
                        _mm256_cvtps_pd(_mm256_cvtpd_ps(v.0)),
                        _mm256_cvtps_pd(_mm256_cvtpd_ps(v.1)),
                    )
                },
                Kind::F64 => v,
                // One rounding from f64 (the f64 lanes of half tensors: channels whose constants
                // leave f32's range), lane by lane as the portable backend does it.
                Kind::Bf16 | Kind::F16 => {
                    let r = self.lanes(v).map(|x| T::from_f64(x).to_f64());
                    unsafe { (_mm256_loadu_pd(r.as_ptr()), _mm256_loadu_pd(r.as_ptr().add(4))) }
                }
            }
        }
        #[inline(always)]
        fn relu(self, v: Self::V) -> (Self::V, u8) {
            unsafe {
                let zero = _mm256_setzero_pd();
                // Not ≤ 0, unordered: > 0 or NaN.
                let (m0, m1) = (
                    _mm256_cmp_pd::<_CMP_NLE_UQ>(v.0, zero),
                    _mm256_cmp_pd::<_CMP_NLE_UQ>(v.1, zero),
                );
                let bits = _mm256_movemask_pd(m0) | _mm256_movemask_pd(m1) << 4;
                ((_mm256_and_pd(m0, v.0), _mm256_and_pd(m1, v.1)), bits as u8)
            }
        }
        #[inline(always)]
        fn gate(self, bits: u8, v: Self::V) -> Self::V {
            unsafe {
                let b = _mm256_set1_epi64x(bits as i64);
                let (lo, hi) = (_mm256_setr_epi64x(1, 2, 4, 8), _mm256_setr_epi64x(16, 32, 64, 128));
                let m0 = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(b, lo), lo));
                let m1 = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(b, hi), hi));
                (_mm256_and_pd(m0, v.0), _mm256_and_pd(m1, v.1))
            }
        }
        #[inline(always)]
        fn lanes(self, v: Self::V) -> [f64; 8] {
            let mut out = [0.0; 8];
            unsafe {
                _mm256_storeu_pd(out.as_mut_ptr(), v.0);
                _mm256_storeu_pd(out.as_mut_ptr().add(4), v.1);
            }
            out
        }
        #[inline(always)]
        unsafe fn load<T: Element>(self, p: *const T) -> Self::V {
            unsafe {
                match T::KIND {
                    Kind::F32 => {
                        let p = p as *const f32;
                        (
                            _mm256_cvtps_pd(_mm_loadu_ps(p)),
                            _mm256_cvtps_pd(_mm_loadu_ps(p.add(4))),
                        )
                    }
                    Kind::F64 => {
                        let p = p as *const f64;
                        (_mm256_loadu_pd(p), _mm256_loadu_pd(p.add(4)))
                    }
                    Kind::Bf16 | Kind::F16 => {
                        let f = self.fload(p);
                        (
                            _mm256_cvtps_pd(_mm256_castps256_ps128(f)),
                            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(f)),
                        )
                    }
                }
            }
        }
        #[inline(always)]
        unsafe fn store<T: Element>(self, p: *mut T, v: Self::V) {
            unsafe {
                match T::KIND {
                    Kind::F32 => {
                        let p = p as *mut f32;
                        _mm_storeu_ps(p, _mm256_cvtpd_ps(v.0));
                        _mm_storeu_ps(p.add(4), _mm256_cvtpd_ps(v.1));
                    }
                    Kind::F64 => {
                        let p = p as *mut f64;
                        _mm256_storeu_pd(p, v.0);
                        _mm256_storeu_pd(p.add(4), v.1);
                    }
                    // As in `round`: one rounding from f64, lane by lane.
                    Kind::Bf16 | Kind::F16 => {
                        for (l, x) in self.lanes(v).into_iter().enumerate() {
                            *p.add(l) = T::from_f64(x);
                        }
                    }
                }
            }
        }
        #[inline(always)]
        unsafe fn stream<T: Element>(self, p: *mut T, v: Self::V) {
            unsafe {
                match T::KIND {
                    Kind::F32 => {
                        let lo = _mm256_castps128_ps256(_mm256_cvtpd_ps(v.0));
                        _mm256_stream_ps(p as *mut f32, _mm256_insertf128_ps::<1>(lo, _mm256_cvtpd_ps(v.1)));
                    }
                    Kind::F64 => {
                        let p = p as *mut f64;
                        _mm256_stream_pd(p, v.0);
                        _mm256_stream_pd(p.add(4), v.1);
                    }
                    Kind::Bf16 | Kind::F16 => self.store(p, v),
                }
            }
        }

        type F = __m256;
        #[inline(always)]
        fn fsplat(self, v: f32) -> Self::F {
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        fn fadd(self, a: Self::F, b: Self::F) -> Self::F {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn fsub(self, a: Self::F, b: Self::F) -> Self::F {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn fmul(self, a: Self::F, b: Self::F) -> Self::F {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn fmadd(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn fnmadd(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            unsafe { _mm256_fnmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn frelu(self, v: Self::F) -> (Self::F, u8) {
            unsafe {
                let m = _mm256_cmp_ps::<_CMP_NLE_UQ>(v, _mm256_setzero_ps());
                (_mm256_and_ps(m, v), _mm256_movemask_ps(m) as u8)
            }
        }
        #[inline(always)]
        fn fgate(self, bits: u8, v: Self::F) -> Self::F {
            unsafe {
                let lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
                let m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits as i32), lanes), lanes);
                _mm256_and_ps(_mm256_castsi256_ps(m), v)
            }
        }
        /// Lane l's shift that puts bit `offset + l` of the 32 read into its sign.
        type Sel = __m256i;
        #[inline(always)]
        fn sel_at(self, offset: usize) -> __m256i {
            debug_assert!(offset < 8);
            let o = offset as i32;
            unsafe { _mm256_sub_epi32(_mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24), _mm256_set1_epi32(o)) }
        }
        #[inline(always)]
        unsafe fn fgate_at(self, sel: __m256i, p: *const u8, v: Self::F) -> Self::F {
            unsafe {
                // One broadcast load; each lane's bit in its sign, which the blend reads.
                let word = _mm256_set1_epi32((p as *const i32).read_unaligned());
                let m = _mm256_sllv_epi32(word, sel);
                _mm256_blendv_ps(_mm256_setzero_ps(), v, _mm256_castsi256_ps(m))
            }
        }
        #[inline(always)]
        unsafe fn fload<T: Element>(self, p: *const T) -> Self::F {
            unsafe {
                match T::KIND {
                    Kind::F32 => _mm256_loadu_ps(p as *const f32),
                    Kind::Bf16 => bf16_load(p as *const u8),
                    Kind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                    Kind::F64 => unreachable!("f64 tensors do not take the f32 path"),
                }
            }
        }
        #[inline(always)]
        unsafe fn fstore<T: Element>(self, p: *mut T, v: Self::F) {
            unsafe {
                match T::KIND {
                    Kind::F32 => _mm256_storeu_ps(p as *mut f32, v),
                    Kind::Bf16 => _mm_storeu_si128(p as *mut __m128i, f32_to_bf16(v)),
                    Kind::F16 => _mm_storeu_si128(p as *mut __m128i, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)),
                    Kind::F64 => unreachable!("f64 tensors do not take the f32 path"),
                }
            }
        }
        #[inline(always)]
        unsafe fn fstream<T: Element>(self, p: *mut T, v: Self::F) {
            unsafe {
                match T::KIND {
                    Kind::F32 => _mm256_stream_ps(p as *mut f32, v),
                    // 16 bytes, aligned as `stream` requires (32 bytes).
                    Kind::Bf16 => _mm_stream_si128(p as *mut __m128i, f32_to_bf16(v)),
                    Kind::F16 => _mm_stream_si128(p as *mut __m128i, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)),
                    Kind::F64 => unreachable!("f64 tensors do not take the f32 path"),
                }
            }
        }
        #[inline(always)]
        unsafe fn fput_exact<T: Element>(self, p: *mut T, v: Self::F, stream: bool) {
            unsafe {
                match (T::KIND, stream) {
                    (Kind::Bf16, false) => _mm_storeu_si128(p as *mut __m128i, high_halves(_mm256_castps_si256(v))),
                    (Kind::Bf16, true) => _mm_stream_si128(p as *mut __m128i, high_halves(_mm256_castps_si256(v))),
                    (_, false) => self.fstore(p, v),
                    (_, true) => self.fstream(p, v),
                }
            }
        }
        #[inline(always)]
        fn fround<T: Element>(self, v: Self::F) -> Self::F {
            unsafe {
                match T::KIND {
                    Kind::F32 => v,
                    // The rounded bits in the high half, zeros below: the bf16 widened.
                    Kind::Bf16 => _mm256_castsi256_ps(_mm256_and_si256(
                        bf16_round_high(v),
                        _mm256_set1_epi32(0xffff_0000_u32 as i32),
                    )),
                    Kind::F16 => _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)),
                    Kind::F64 => unreachable!("f64 tensors do not take the f32 path"),
                }
            }
        }

        const BF16_PAIRS: bool = true;
        #[inline(always)]
        unsafe fn fload_pair<T: Element>(self, p: *const T) -> (Self::F, Self::F) {
            unsafe {
                match T::KIND {
                    Kind::Bf16 => bf16_load_pair(p as *const u8),
                    // Not taken by the kernels (they pair `bf16` alone): element by element.
                    _ => {
                        let (e, o) = super::Scalar.fload_pair(p);
                        (_mm256_loadu_ps(e.as_ptr()), _mm256_loadu_ps(o.as_ptr()))
                    }
                }
            }
        }
        #[inline(always)]
        unsafe fn fput_pair<T: Element>(self, p: *mut T, even: Self::F, odd: Self::F, stream: bool) {
            unsafe {
                match (T::KIND, stream) {
                    (Kind::Bf16, false) => _mm256_storeu_si256(p as *mut __m256i, bf16_pack_pair(even, odd)),
                    // 32 bytes, aligned as `stream` requires.
                    (Kind::Bf16, true) => _mm256_stream_si256(p as *mut __m256i, bf16_pack_pair(even, odd)),
                    // Not taken by the kernels (they pair `bf16` alone): element by element.
                    _ => {
                        let (mut e, mut o) = ([0f32; 8], [0f32; 8]);
                        _mm256_storeu_ps(e.as_mut_ptr(), even);
                        _mm256_storeu_ps(o.as_mut_ptr(), odd);
                        super::Scalar.fput_pair(p, e, o, stream)
                    }
                }
            }
        }

        /// All-ones in the lanes that are on.
        type M = (__m256d, __m256d);
        #[inline(always)]
        fn lane_mask(self, bits: u8) -> Self::M {
            unsafe {
                // Every byte of lane l holds bit l alone: the byte compare sets all 8 bytes of
                // the lanes whose bit is set.
                let b = _mm256_set1_epi8(bits as i8);
                let lane = |l: u32| (0x0101_0101_0101_0101u64 << l) as i64;
                let (lo, hi) = (
                    _mm256_setr_epi64x(lane(0), lane(1), lane(2), lane(3)),
                    _mm256_setr_epi64x(lane(4), lane(5), lane(6), lane(7)),
                );
                (
                    _mm256_castsi256_pd(_mm256_cmpeq_epi8(_mm256_and_si256(b, lo), lo)),
                    _mm256_castsi256_pd(_mm256_cmpeq_epi8(_mm256_and_si256(b, hi), hi)),
                )
            }
        }
        #[inline(always)]
        fn keep(self, m: Self::M, v: Self::V) -> Self::V {
            unsafe { (_mm256_and_pd(m.0, v.0), _mm256_and_pd(m.1, v.1)) }
        }
        #[inline(always)]
        unsafe fn pack8<T: Element>(self, src: *const T, bits: u8, dst: *mut T) -> usize {
            // The lanes to gather, one byte each (`PACK_INDICES`).
            let at = |bits: u8| unsafe { _mm_cvtsi64_si128(super::PACK_INDICES[bits as usize] as i64) };
            unsafe {
                match T::KIND {
                    Kind::F32 => {
                        let v = _mm256_loadu_ps(src as *const f32);
                        let v = _mm256_permutevar8x32_ps(v, _mm256_cvtepu8_epi32(at(bits)));
                        _mm256_storeu_ps(dst as *mut f32, v);
                    }
                    // Each half of 4 lanes, lane k as the 32-bit lanes 2k and 2k + 1.
                    Kind::F64 => {
                        let (src, dst) = (src as *const f32, dst as *mut f32);
                        let first = super::PACK_COUNTS[(bits & 15) as usize] as usize;
                        for (h, put) in [(0, 0), (1, first)] {
                            let k = _mm256_cvtepu8_epi64(at(bits >> (4 * h) & 15));
                            let k2 = _mm256_add_epi64(k, k);
                            let odd = _mm256_add_epi64(k2, _mm256_set1_epi64x(1));
                            let pairs = _mm256_or_si256(k2, _mm256_slli_epi64::<32>(odd));
                            let v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src.add(8 * h)), pairs);
                            _mm256_storeu_ps(dst.add(2 * put), v);
                        }
                    }
                    // Lane k as bytes 2k and 2k + 1.
                    Kind::Bf16 | Kind::F16 => {
                        let k = at(bits);
                        let k2 = _mm_add_epi8(k, k);
                        let pairs = _mm_unpacklo_epi8(k2, _mm_add_epi8(k2, _mm_set1_epi8(1)));
                        let v = _mm_shuffle_epi8(_mm_loadu_si128(src as *const __m128i), pairs);
                        _mm_storeu_si128(dst as *mut __m128i, v);
                    }
                }
            }
            super::PACK_COUNTS[bits as usize] as usize
        }
    }
}

/// Defines `fn $name<T: Element>(args) -> ret` that runs `$imp(simd, args…)` with the AVX2
/// backend in an AVX2 + FMA + F16C function when the CPU has them, and with [`Scalar`] otherwise.
/// `$imp` must be `#[inline(always)]` so that it is compiled into each copy.
macro_rules! simd_dispatch {
    ($(#[$attr:meta])* $vis:vis fn $name:ident<T>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $imp:path) => {
        $(#[$attr])*
        #[inline]
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<T: Element>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if $crate::kernels::simd::has_avx2() {
                    #[target_feature(enable = "avx2,fma,f16c")]
                    #[allow(clippy::too_many_arguments)]
                    unsafe fn avx2<T: Element>($($arg: $ty),*) $(-> $ret)? {
                        // SAFETY: only called where the CPU has AVX2, FMA and F16C, from a
                        // function compiled with them.
                        $imp(unsafe { $crate::kernels::simd::Avx2::new_unchecked() }, $($arg),*)
                    }
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
                    return unsafe { avx2::<T>($($arg),*) };
                }
            }
            $imp($crate::kernels::simd::Scalar, $($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::elementwise::{self as ew, DxCoeffs, DxRows, RowsAffine, RowsScale, WideAffine};
    use super::super::mask::MaskSpans;
    use super::super::moments::{self, GradRuns, MaskedLanes, RowPrefetch, Runs};
    use super::super::relu::{Act, Back, BitLayout, MaskBits};
    use crate::Element;

    fn data<T: Element>(n: usize, seed: u64) -> Vec<T> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                T::from_f64(((s >> 40) as f64 / (1u64 << 24) as f64) * 7.0 - 3.0 + 1e3)
            })
            .collect()
    }

    /// `n` values of either sign (a residual; a ReLU then keeps about half of them).
    fn signed<T: Element>(n: usize, seed: u64) -> Vec<T> {
        data::<f64>(n, seed).iter().map(|v| T::from_f64(v - 1e3)).collect()
    }

    /// The bytes of a mask over `n` elements in one segment, every other bit of each byte set
    /// from bit `seed % 8` on, and its layout.
    fn bits(n: usize, seed: u64) -> (Vec<u8>, BitLayout) {
        let layout = BitLayout {
            len: n,
            bytes: n.div_ceil(8),
            segments: 1,
        };
        let byte = 0x55u8.rotate_left(seed as u32 % 8) ^ 0x0f;
        (vec![byte; layout.total_bytes()], layout)
    }

    /// A forward kernel run by the AVX2 path and the portable one, with each epilogue (plain,
    /// ReLU, residual + ReLU, each with and without mask bits): the same outputs and bits.
    fn forward_agrees<T: Element>(n: usize, z: &[T], run: impl Fn(bool, &mut [T], Option<Act<'_, T>>)) {
        let zero = || vec![T::from_f64(0.0); n];
        for (residual, with_bits) in [(false, false), (false, true), (true, false), (true, true)] {
            let (mut y1, mut y2, mut b1, mut b2) =
                (zero(), zero(), vec![0u8; n.div_ceil(8)], vec![0xffu8; n.div_ceil(8)]);
            let zr = residual.then_some(z);
            run(
                true,
                &mut y1,
                Some(Act {
                    z: zr,
                    z_ahead: 0,
                    bits: with_bits.then_some(&mut b1[..]),
                }),
            );
            run(
                false,
                &mut y2,
                Some(Act {
                    z: zr,
                    z_ahead: 0,
                    bits: with_bits.then_some(&mut b2[..]),
                }),
            );
            assert_eq!(y1, y2, "residual {residual}, bits {with_bits}");
            if with_bits {
                // The spare bits of the last byte are not written.
                let keep = |b: &[u8]| (0..n).map(|i| b[i / 8] >> (i % 8) & 1).collect::<Vec<u8>>();
                assert_eq!(keep(&b1), keep(&b2), "residual {residual}");
            }
        }
        let (mut y1, mut y2) = (zero(), zero());
        run(true, &mut y1, None);
        run(false, &mut y2, None);
        assert_eq!(y1, y2);
    }

    /// A backward kernel run by the AVX2 path and the portable one, without a ReLU and behind one
    /// (with and without dz): the same outputs.
    fn backward_agrees<T: Element>(n: usize, run: impl Fn(bool, &mut [T], Option<Back<'_, T>>)) {
        let zero = || vec![T::from_f64(0.0); n];
        let (mask, layout) = bits(n, n as u64);
        let at = || MaskBits { bytes: &mask, layout }.at(0, n);
        let (mut d1, mut d2, mut z1, mut z2) = (zero(), zero(), zero(), zero());
        run(true, &mut d1, None);
        run(false, &mut d2, None);
        assert_eq!(d1, d2);
        run(true, &mut d1, Some(Back { bits: at(), dz: None }));
        run(false, &mut d2, Some(Back { bits: at(), dz: None }));
        assert_eq!(d1, d2);
        run(
            true,
            &mut d1,
            Some(Back {
                bits: at(),
                dz: Some(&mut z1),
            }),
        );
        run(
            false,
            &mut d2,
            Some(Back {
                bits: at(),
                dz: Some(&mut z2),
            }),
        );
        assert_eq!((d1, z1), (d2, z2));
    }

    /// An on/off pattern of `n` entries, and `v` with NaN at the elements it has off (element k
    /// of `v` having entry k / `width`).
    fn masked<T: Element>(v: &[T], n: usize, width: usize, seed: u64) -> (Vec<bool>, Vec<T>) {
        let mask: Vec<bool> = (0..n).map(|i| (i as u64 * 7 + seed) % 5 < 3).collect();
        let nan = T::from_f64(f64::NAN);
        let v = v
            .iter()
            .enumerate()
            .map(|(k, &a)| if mask[k / width] { a } else { nan })
            .collect();
        (mask, v)
    }

    /// The AVX2 path (what the dispatching functions pick here) and the portable one agree
    /// bitwise, for `f32` (the `f32` lanes with fused multiply-adds) and `f64`; the reductions
    /// also with a mask (the values that are off, NaN here, become +0.0 in both); every pass also
    /// fused with a ReLU (the forward's epilogues, the backward's gate and dz).
    fn backends_agree<T: Element>() {
        if !super::has_avx2() {
            return;
        }
        let s = super::Scalar;
        let z = |n| vec![T::from_f64(0.0); n];
        for (len, count, stride) in [(1, 3, 5), (7, 2, 9), (29, 5, 40), (200, 3, 211), (1000, 1, 0)] {
            let x = data::<T>(stride * count + len + 1, len as u64);
            let dy = data::<T>(x.len(), 99);
            let runs = Runs {
                first: 1,
                count,
                len,
                stride,
            };
            // Masks over the runs' elements (one segment per run): a short period (selected lane
            // by lane), and the first half of each run on (selected whole, the rest skipped).
            let (periodic, xp) = masked(&x, x.len(), 1, len as u64);
            let periodic: Vec<bool> = (0..count)
                .flat_map(|k| periodic[1 + k * stride..1 + k * stride + len].to_vec())
                .collect();
            let half: Vec<bool> = (0..count * len).map(|e| e % len < len / 2).collect();
            let spans = [MaskSpans::new(Some(&periodic), len), MaskSpans::new(Some(&half), len)];
            let lanes = |i: usize| Some(MaskedLanes::new(spans[i].as_ref().unwrap(), 0, 0, runs));
            for (x, lanes) in [(&x, None), (&xp, lanes(0)), (&x, lanes(1))] {
                let m = moments::runs_moments(x, runs, lanes);
                assert_eq!(m, moments::runs_moments_impl(s, x, runs, lanes));
                assert!(m.mean.is_finite() && m.m2.is_finite());
                let r = GradRuns {
                    x,
                    dy: &dy,
                    runs,
                    m: 1e3,
                    mask: lanes,
                    relu: None,
                };
                assert_eq!(moments::runs_grad_sums(r), moments::runs_grad_sums_impl(s, r));
            }
            // Behind a ReLU: each run a segment of the mask.
            let seg = stride.max(len);
            let layout = BitLayout {
                len: seg,
                bytes: seg.div_ceil(8),
                segments: x.len().div_ceil(seg),
            };
            let mask = bits(layout.segments * layout.bytes * 8, len as u64).0;
            let relu = Some(MaskBits { bytes: &mask, layout });
            let r = GradRuns {
                x: &x,
                dy: &dy,
                runs: Runs { first: 0, ..runs },
                m: 1e3,
                mask: None,
                relu,
            };
            assert_eq!(moments::runs_grad_sums(r), moments::runs_grad_sums_impl(s, r));
            let a = WideAffine {
                mean: 1e3 + 1.0 / 3.0,
                scale: 0.7,
                shift: 0.1,
            };
            let zr = signed::<T>(x.len(), 3);
            forward_agrees(x.len(), &zr, |avx, y, act| match avx {
                true => ew::normalize_plane(&x, y, a, true, act),
                false => ew::normalize_plane_impl(s, &x, y, a, false, act),
            });
            let c = DxCoeffs {
                mean: 1e3 + 1.0 / 7.0,
                k: 0.3,
                a: 0.01,
                b: 0.02,
            };
            backward_agrees(x.len(), |avx, dx, back| match avx {
                true => ew::dx_plane(&x, &dy, dx, c, false, back),
                false => ew::dx_plane_impl(s, &x, &dy, dx, c, true, back),
            });
            backward_agrees(x.len(), |avx, dx, back| match avx {
                true => ew::scale_plane(&dy, dx, 0.3, false, back),
                false => ew::scale_plane_impl(s, &dy, dx, 0.3, true, back),
            });
            // The plain passes (`bf16`: 16 elements a step, `Simd::fload_pair`) from every start
            // modulo 32 bytes, cached and streamed, normalization on data with NaN too: the same
            // bits. (dx of a NaN x is a NaN whose sign differs between the backends: the
            // portable c − a·b negates a NaN a, `vfnmadd` does not.)
            let bits_of = |v: &[T]| v.iter().map(|h| h.to_f64().to_bits()).collect::<Vec<u64>>();
            for (start, stream, x) in (0..17).flat_map(|k| [(k, false, &x), (k, true, &x), (k, false, &xp)]) {
                let (mut y1, mut y2) = (z(x.len()), z(x.len()));
                ew::normalize_plane(&x[start..], &mut y1[start..], a, stream, None);
                ew::normalize_plane_impl(s, &x[start..], &mut y2[start..], a, false, None);
                assert_eq!(bits_of(&y1), bits_of(&y2), "normalize, start {start}, stream {stream}");
                if x.iter().any(|v| v.to_f64().is_nan()) {
                    continue;
                }
                ew::dx_plane(&x[start..], &dy[start..], &mut y1[start..], c, stream, None);
                ew::dx_plane_impl(s, &x[start..], &dy[start..], &mut y2[start..], c, false, None);
                assert_eq!(bits_of(&y1), bits_of(&y2), "dx, start {start}, stream {stream}");
            }
        }
        for channels in [1, 3, 8, 13, 64, 1500] {
            let rows = 37;
            let x = data::<T>(rows * channels, channels as u64);
            let dy = data::<T>(rows * channels, 5);
            let z64 = || vec![0.0; channels];
            let (mut a, mut b, mut c) = (z64(), z64(), z64());
            let (mut d, mut e, mut f) = (z64(), z64(), z64());
            let pf = RowPrefetch {
                on: channels % 2 == 1,
                line: 64 / std::mem::size_of::<T>(),
            };
            let (mask, xm) = masked(&x, rows, channels, channels as u64);
            for (x, mask) in [(&xm, Some(&mask[..])), (&x, None)] {
                let n1 = moments::rows_moments(x, mask, channels, &mut a, &mut b, &mut c, pf);
                let n2 = moments::rows_moments_impl(s, x, mask, channels, &mut d, &mut e, &mut f, RowPrefetch::OFF);
                assert_eq!((n1, &a, &b), (n2, &d, &e));
                assert!(a.iter().chain(&b).all(|v| v.is_finite()));
                let (mut g1, mut g2, mut h1, mut h2) = (z64(), z64(), z64(), z64());
                moments::rows_grad_sums(x, &dy, mask, &a, &mut g1, &mut g2, pf, None);
                moments::rows_grad_sums_impl(s, x, &dy, mask, &a, &mut h1, &mut h2, RowPrefetch::OFF, None);
                assert_eq!((g1, g2), (h1, h2));
            }
            let (mask, layout) = bits(x.len(), channels as u64);
            let relu = || Some(MaskBits { bytes: &mask, layout }.at(0, x.len()));
            let (mut g1, mut g2, mut h1, mut h2) = (z64(), z64(), z64(), z64());
            moments::rows_grad_sums(&x, &dy, None, &a, &mut g1, &mut g2, pf, relu());
            moments::rows_grad_sums_impl(s, &x, &dy, None, &a, &mut h1, &mut h2, RowPrefetch::OFF, relu());
            assert_eq!((g1, g2), (h1, h2));
            let p = |k: f64| -> Vec<f64> { (0..channels).map(|c| k + c as f64 / 3.0).collect() };
            let (mut y1, mut y2) = (z(x.len()), z(x.len()));
            let affine = RowsAffine::new::<T>(&p(1e3), &p(0.5), &p(0.1));
            ew::normalize_rows(&x[3..], &mut y1[3..], &affine, true, None);
            ew::normalize_rows_impl(s, &x[3..], &mut y2[3..], &affine, false, None);
            assert_eq!(y1, y2);
            let zr = signed::<T>(x.len(), 4);
            forward_agrees(x.len(), &zr, |avx, y, act| match avx {
                true => ew::normalize_rows(&x, y, &affine, true, act),
                false => ew::normalize_rows_impl(s, &x, y, &affine, false, act),
            });
            let coeffs: Vec<DxCoeffs> = (0..channels)
                .map(|ch| DxCoeffs {
                    mean: a[ch],
                    k: 0.3 + ch as f64,
                    a: 0.01,
                    b: 0.02 / (1.0 + ch as f64),
                })
                .collect();
            let dxp = DxRows::new::<T>(&coeffs);
            backward_agrees(x.len(), |avx, dx, back| match avx {
                true => ew::dx_rows(&x, &dy, dx, &dxp, false, back),
                false => ew::dx_rows_impl(s, &x, &dy, dx, &dxp, true, back),
            });
            let k = RowsScale::new::<T>(&p(0.25));
            ew::scale_rows(&dy[1..], &mut y1[1..], &k, true, None);
            ew::scale_rows_impl(s, &dy[1..], &mut y2[1..], &k, false, None);
            assert_eq!(y1, y2);
            backward_agrees(x.len(), |avx, dx, back| match avx {
                true => ew::scale_rows(&dy, dx, &k, true, back),
                false => ew::scale_rows_impl(s, &dy, dx, &k, false, back),
            });
        }
    }

    /// `pack8` of every byte of bits on both backends against the definition: the elements
    /// whose bits are set, in order, and their number; a NaN among those that are off is
    /// never packed.
    fn pack8_gathers_the_set_lanes<T: Element>() {
        let mut src = vec![T::from_f64(0.0); 8];
        for bits in 0..=255u8 {
            let want: Vec<f64> = (0..8).filter(|k| bits >> k & 1 == 1).map(|k| k as f64 + 0.5).collect();
            // Elements that are off hold NaN: none must come out among the packed.
            for (k, v) in src.iter_mut().enumerate() {
                *v = T::from_f64(if bits >> k & 1 == 1 { k as f64 + 0.5 } else { f64::NAN });
            }
            let mut runs = vec![(pack8_with(super::Scalar, &src, bits), "scalar")];
            if super::has_avx2() {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
                let avx2 = unsafe { super::Avx2::new_unchecked() };
                runs.push((pack8_with(avx2, &src, bits), "avx2"));
            }
            for ((n, out), backend) in runs {
                let got: Vec<f64> = out[..n].iter().map(|v| v.to_f64()).collect();
                assert_eq!(got, want, "{backend}, bits {bits:#010b}");
            }
        }
    }

    /// `s.pack8` of the 8 elements of `src`: their number and the 8 elements written.
    fn pack8_with<S: super::Simd, T: Element>(s: S, src: &[T], bits: u8) -> (usize, Vec<T>) {
        assert_eq!(src.len(), 8);
        let mut out = vec![T::from_f64(-1.0); 8];
        // SAFETY: 8 elements each.
        let n = unsafe { s.pack8(src.as_ptr(), bits, out.as_mut_ptr()) };
        (n, out)
    }

    /// `zero_fill` on both backends, streamed and not, at every start modulo 32 bytes and over
    /// lengths around the vectors: every element of the range +0.0 (its bits all clear), the
    /// elements around it untouched.
    fn zero_fill_clears_the_range<T: Element>() {
        let nan = T::from_f64(f64::NAN);
        for (start, len, stream) in (0..17)
            .flat_map(|s| [0, 1, 7, 8, 9, 23, 64, 71].map(move |n| (s, n)))
            .flat_map(|(s, n)| [(s, n, false), (s, n, true)])
        {
            let mut runs = vec![(vec![nan; start + len + 3], "scalar")];
            ew::zero_fill_impl(super::Scalar, &mut runs[0].0[start..start + len], stream);
            if super::has_avx2() {
                let mut buf = vec![nan; start + len + 3];
                ew::zero_fill(&mut buf[start..start + len], stream);
                runs.push((buf, "avx2"));
            }
            for (buf, backend) in runs {
                for (i, v) in buf.iter().enumerate() {
                    let inside = (start..start + len).contains(&i);
                    let what = format!("{backend}, start {start}, len {len}, stream {stream}, element {i}");
                    match inside {
                        true => assert!(v.to_f64() == 0.0 && v.to_f64().is_sign_positive(), "{what}"),
                        false => assert!(v.to_f64().is_nan(), "{what}"),
                    }
                }
            }
        }
    }

    #[test]
    fn zero_fill_clears_the_range_of_each_type() {
        zero_fill_clears_the_range::<f32>();
        zero_fill_clears_the_range::<f64>();
        zero_fill_clears_the_range::<half::bf16>();
        zero_fill_clears_the_range::<half::f16>();
    }

    #[test]
    fn pack8_gathers_the_set_lanes_of_each_type() {
        pack8_gathers_the_set_lanes::<f32>();
        pack8_gathers_the_set_lanes::<f64>();
        pack8_gathers_the_set_lanes::<half::bf16>();
        pack8_gathers_the_set_lanes::<half::f16>();
    }

    #[test]
    fn backends_agree_f32() {
        backends_agree::<f32>();
    }

    #[test]
    fn backends_agree_f64() {
        backends_agree::<f64>();
    }

    #[test]
    fn backends_agree_bf16() {
        backends_agree::<half::bf16>();
    }

    #[test]
    fn backends_agree_f16() {
        backends_agree::<half::f16>();
    }

    /// The bits of 8 elements of a half type.
    fn bits16<T: Element>(v: &[T; 8]) -> [u16; 8] {
        // SAFETY: both half types are 16-bit wrappers around their bits.
        v.map(|h| unsafe { std::mem::transmute_copy::<T, u16>(&h) })
    }

    /// The conversions of the AVX2 backend (F16C for `f16`, shifts and integer rounding for
    /// `bf16`) and of the portable one give the same bits: widening every bit pattern of the
    /// half type (NaN payloads included), and rounding from `f32` and `f64` at ties (even and
    /// odd last kept bit), just off them, in the half type's subnormal range and below it, at
    /// and beyond its largest value (overflow to ±Inf), ±Inf, quiet and signalling NaN, and on
    /// random bit patterns.
    fn conversions_agree<T: Element>() {
        use super::{Avx2, Scalar, Simd};
        if !super::has_avx2() {
            return;
        }
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        let a = unsafe { Avx2::new_unchecked() };
        let f32s = |v: <Avx2 as Simd>::F| -> [u32; 8] {
            let mut out = [0f32; 8];
            // SAFETY: 8 writable f32.
            unsafe { a.fstore(out.as_mut_ptr(), v) };
            out.map(f32::to_bits)
        };
        let f64s = |v: <Avx2 as Simd>::V| a.lanes(v).map(f64::to_bits);
        let zero: [T; 8] = [T::from_f64(0.0); 8];
        for hi in 0..=u16::MAX / 8 {
            let b: [u16; 8] = std::array::from_fn(|l| hi * 8 + l as u16);
            // SAFETY: both half types are 16-bit wrappers around their bits.
            let h: [T; 8] = b.map(|b| unsafe { std::mem::transmute_copy::<u16, T>(&b) });
            // SAFETY (both): 8 readable elements.
            let (fa, fs) = unsafe { (a.fload(h.as_ptr()), Scalar.fload(h.as_ptr())) };
            assert_eq!(f32s(fa), fs.map(f32::to_bits), "{} widening {b:04x?}", T::NAME);
            // A widened value stored back without rounding, as `fput_exact` may take it (any
            // value but a signalling NaN), is its own bits, as a rounding store makes it.
            let (mut exact, mut rounded) = (zero, zero);
            // SAFETY (both): 8 writable elements.
            unsafe { a.fput_exact(exact.as_mut_ptr(), fa, false) };
            unsafe { a.fstore(rounded.as_mut_ptr(), fa) };
            let quiet_bit = if T::KIND == crate::element::Kind::Bf16 {
                0x0040
            } else {
                0x0200
            };
            for l in (0..8).filter(|&l| !h[l].to_f64().is_nan() || b[l] & quiet_bit != 0) {
                assert_eq!(bits16(&exact)[l], b[l], "{} exact store of {:04x}", T::NAME, b[l]);
                assert_eq!(bits16(&rounded)[l], b[l], "{} rounding store of {:04x}", T::NAME, b[l]);
            }
            let (wa, ws) = unsafe { (a.load(h.as_ptr()), Scalar.load(h.as_ptr())) };
            assert_eq!(f64s(wa), ws.map(f64::to_bits), "{} widening to f64 {b:04x?}", T::NAME);
        }
        // SAFETY: both half types are 16-bit wrappers around their bits.
        let bits_of = |h: &T| unsafe { std::mem::transmute_copy::<T, u16>(h) };
        for hi in 0..=u16::MAX / 16 {
            let b: [u16; 16] = std::array::from_fn(|l| hi * 16 + l as u16);
            // SAFETY: as above.
            let h: [T; 16] = b.map(|b| unsafe { std::mem::transmute_copy::<u16, T>(&b) });
            // SAFETY (both): 16 readable elements.
            let (pa, ps) = unsafe { (a.fload_pair(h.as_ptr()), Scalar.fload_pair(h.as_ptr())) };
            let want = (ps.0.map(f32::to_bits), ps.1.map(f32::to_bits));
            assert_eq!((f32s(pa.0), f32s(pa.1)), want, "{} paired widening {b:04x?}", T::NAME);
        }
        let special: Vec<u32> = [
            0u32,
            1,
            0x0080_0000,
            0x3f80_0000,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x3f80_7fff,
            0x3f80_1000,
            0x3f80_3000,
            0x3f80_0fff,
            0x3f80_1001,
            0x477f_e000,
            0x477f_efff,
            0x477f_f000,
            0x4780_0000,
            0x7f7f_ffff,
            0x7f80_0000,
            0x7f80_0001,
            0x7fc0_0000,
            0x7fbf_ffff,
            0x3880_0000,
            0x387f_f000,
            0x3380_0000,
            0x3300_0000,
            0x3300_0001,
            0x32ff_ffff,
            0x3400_0000,
            0x3420_0000,
            0x0000_8000,
            0x0001_8000,
            0x0040_0000,
        ]
        .into_iter()
        .flat_map(|x| [x, x | 0x8000_0000])
        .collect();
        let mut seed = 0x1234_5678_9abc_def1u64;
        let random = (0..40_000).map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u32
        });
        let all: Vec<u32> = special.into_iter().chain(random).collect();
        for chunk in all.chunks_exact(8) {
            let v: [f32; 8] = std::array::from_fn(|l| f32::from_bits(chunk[l]));
            let (mut ha, mut hs) = (zero, zero);
            // SAFETY (all blocks): 8 readable and writable elements each.
            let fv = unsafe { a.fload(v.as_ptr()) };
            unsafe { a.fstore(ha.as_mut_ptr(), fv) };
            unsafe { Scalar.fstore(hs.as_mut_ptr(), v) };
            assert_eq!(bits16(&ha), bits16(&hs), "{} rounding {chunk:08x?}", T::NAME);
            assert_eq!(f32s(a.fround::<T>(fv)), Scalar.fround::<T>(v).map(f32::to_bits));
            // From f64: the same values, and a hair above and below each.
            for nudge in [0.0, 1e-12, -1e-12] {
                let w: [f64; 8] = v.map(|x| x as f64 * (1.0 + nudge));
                // SAFETY: 8 readable f64.
                let wv = unsafe { a.load(w.as_ptr()) };
                let (mut ha, mut hs) = (zero, zero);
                unsafe { a.store(ha.as_mut_ptr(), wv) };
                unsafe { Scalar.store(hs.as_mut_ptr(), w) };
                assert_eq!(bits16(&ha), bits16(&hs), "{} rounding from f64 {w:?}", T::NAME);
                assert_eq!(f64s(a.round::<T>(wv)), Scalar.round::<T>(w).map(f64::to_bits));
            }
        }
        // The paired store, each half of a chunk of 16 as either parity (a NaN in one vector of
        // the two or in both), cached and streamed (to a 32-byte aligned place).
        #[repr(align(32))]
        struct Aligned<T>([T; 16]);
        for chunk in all.chunks_exact(16) {
            let v: [f32; 16] = std::array::from_fn(|l| f32::from_bits(chunk[l]));
            for ((lo, hi), stream) in [((0, 8), false), ((8, 0), false), ((0, 8), true), ((8, 0), true)] {
                let e: [f32; 8] = std::array::from_fn(|l| v[lo + l]);
                let o: [f32; 8] = std::array::from_fn(|l| v[hi + l]);
                let (mut ha, mut hs) = (Aligned([T::from_f64(0.0); 16]), [T::from_f64(0.0); 16]);
                // SAFETY (all three): 8 readable f32 each; 16 writable elements, `ha` aligned
                // to 32 bytes.
                let (ev, ov) = unsafe { (a.fload(e.as_ptr()), a.fload(o.as_ptr())) };
                unsafe { a.fput_pair(ha.0.as_mut_ptr(), ev, ov, stream) };
                unsafe { Scalar.fput_pair(hs.as_mut_ptr(), e, o, false) };
                let (got, want) = (ha.0.each_ref().map(bits_of), hs.each_ref().map(bits_of));
                assert_eq!(got, want, "{} paired rounding {chunk:08x?}, stream {stream}", T::NAME);
            }
        }
    }

    #[test]
    fn conversions_agree_bf16() {
        conversions_agree::<half::bf16>();
    }

    #[test]
    fn conversions_agree_f16() {
        conversions_agree::<half::f16>();
    }

    /// `fgate_at` on both backends at every bit offset, over words with every lane pattern
    /// around the offset: the lanes whose bit is set as they are (a NaN and −0.0 among them),
    /// +0.0 in the others, bit for bit.
    #[test]
    fn fgate_at_selects_by_the_bits_from_the_offset() {
        fn lanes<S: super::Simd>(s: S, v: S::F) -> [u32; 8] {
            let mut out = [0f32; 8];
            // SAFETY: 8 elements.
            unsafe { s.fstore(out.as_mut_ptr(), v) };
            out.map(f32::to_bits)
        }
        fn check<S: super::Simd>(s: S, name: &str) {
            let values = [1.5f32, f32::NAN, -0.0, -2.25, f32::INFINITY, 3.0, -7.5, 1e-3];
            // SAFETY: 8 elements.
            let v = unsafe { s.fload(values.as_ptr()) };
            let mut next = 0x9e37_79b9_7f4a_7c15u64;
            for offset in 0..8 {
                for k in 0..600u32 {
                    next ^= next << 13;
                    next ^= next >> 7;
                    next ^= next << 17;
                    // Every pattern of the 8 bits read, the other bits random.
                    let word = (next as u32 & !(0xff << offset)) | (k % 256) << offset;
                    let bytes = [word.to_le_bytes(), [0xa5; 4]].concat();
                    // SAFETY: 4 bytes from the first.
                    let got = lanes(s, unsafe { s.fgate_at(s.sel_at(offset), bytes.as_ptr(), v) });
                    let want: [u32; 8] = std::array::from_fn(|l| {
                        if word >> (offset + l) & 1 == 1 {
                            values[l].to_bits()
                        } else {
                            0
                        }
                    });
                    assert_eq!(got, want, "{name}, offset {offset}, word {word:#034b}");
                }
            }
        }
        check(super::Scalar, "scalar");
        if super::has_avx2() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
            check(unsafe { super::Avx2::new_unchecked() }, "avx2");
        }
    }

    /// `normalize_plane_kept` (dispatched, and the portable backend) against `normalize_plane`
    /// then +0.0 where the bits are off, bit for bit: x and y at every start modulo 8 elements
    /// (so that the streamed stores start at every place in a byte of the bits), the bits at
    /// every offset, lengths around the 8-element steps; x holds NaN where the bits are off.
    fn normalize_plane_kept_selects<T: Element>() {
        let a = WideAffine {
            mean: 1e3 + 1.0 / 3.0,
            scale: 0.7,
            shift: 0.1,
        };
        for n in [1usize, 7, 8, 9, 31, 64, 100, 203] {
            for start in 0..8 {
                for (bit0, spare) in [0usize, 3, 7].into_iter().flat_map(|b| [(b, 0), (b, 4)]) {
                    // With no spare bytes beyond the one `MaskBits` needs, the last steps' 4
                    // bytes do not fit and the kernel takes its fallback.
                    let (mut mask, layout) = bits(bit0 + n, (start + n) as u64);
                    mask.extend(std::iter::repeat_n(0xa5, spare));
                    let on = |i: usize| mask[(bit0 + i) / 8] >> ((bit0 + i) % 8) & 1 == 1;
                    let mut x = data::<T>(start + n, n as u64 + 5);
                    for i in 0..n {
                        if !on(i) {
                            x[start + i] = T::from_f64(f64::NAN);
                        }
                    }
                    let x = &x[start..];
                    let mut want = vec![T::from_f64(0.0); start + n];
                    ew::normalize_plane(x, &mut want[start..], a, false, None);
                    for (i, w) in want[start..].iter_mut().enumerate() {
                        if !on(i) {
                            *w = T::from_f64(0.0);
                        }
                    }
                    for stream in [false, true] {
                        for portable in [false, true] {
                            let mut y = vec![T::from_f64(-1.0); start + n];
                            let keep = MaskBits { bytes: &mask, layout }.at(bit0, n);
                            match portable {
                                false => ew::normalize_plane_kept(x, &mut y[start..], a, stream, keep),
                                true => {
                                    ew::normalize_plane_kept_impl(super::Scalar, x, &mut y[start..], a, stream, keep)
                                }
                            }
                            let bits_of = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits_of(&y[start..]),
                                bits_of(&want[start..]),
                                "{} n {n} start {start} bit {bit0} spare {spare} stream {stream} portable {portable}",
                                T::NAME
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn normalize_plane_kept_selects_each_type() {
        normalize_plane_kept_selects::<f32>();
        normalize_plane_kept_selects::<f64>();
        normalize_plane_kept_selects::<half::bf16>();
        normalize_plane_kept_selects::<half::f16>();
    }
}
