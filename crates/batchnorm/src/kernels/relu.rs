//! The pieces the passes need to fuse batch norm with what follows it: a ReLU, or the addition of
//! a residual and a ReLU (see `crate::fused` for the definitions).
//!
//! - The **mask**: one bit per element, set where the ReLU kept the value (y > 0, or NaN), laid
//!   out in segments ([`BitLayout`]) that are exactly the units the element-wise passes write,
//!   each starting at a byte: a unit writes its own bytes and no other's, whatever the thread
//!   count.
//! - The forward's **epilogue** (an [`ElementMap`]): what an element-wise pass does with a
//!   normalized value before it stores it. [`Plain`] does nothing (plain batch norm); [`Fused`] adds the
//!   residual, applies the ReLU and records its bit. Each is written for `f32` lanes (the
//!   element-precision path of `f32`, `bf16` and `f16` tensors) and for `f64` lanes; in both the
//!   value is first rounded to the element type: every operation is done in the element type
//!   (a half type's sum computed in `f32` and rounded to it), as the unfused sequence (batch norm
//!   into y, then y + z, then the ReLU) does, so the fused pass gives its bits. Only through
//!   [`crate::Element`]'s conversions, so any element type goes through.
//! - The backward's **upstream gradient**: dy itself ([`Plain`]), or behind the ReLU dy·\[kept\]
//!   from the mask's bits ([`Gated`]), stored to dz too where the pass writes it (in the
//!   gradient sums' loop, [`GatedOut`], where a channel's two backward passes are fused).
//!   A select: dy of an element the ReLU did not keep never reaches a sum or an output.

use super::moments;
use super::plan;
use super::simd::{narrow, relu_keeps, Simd};
use crate::{Element, Geometry};
use std::cell::Cell;

/// Where the bits of a ReLU mask over a geometry live: segments of `len` elements (the planes of
/// a channels-first tensor; the row tasks of the rows plan, the last one shorter), segment s in
/// bytes `s·bytes..(s + 1)·bytes` with its element e at bit e (bit e % 8 of byte e / 8); one
/// spare byte at the end, so that a reader may take two bytes at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BitLayout {
    /// Elements per segment.
    pub len: usize,
    /// Bytes per segment.
    pub bytes: usize,
    /// Number of segments.
    pub segments: usize,
}

impl BitLayout {
    /// The layout of a mask over `g`.
    pub fn new(g: &Geometry) -> BitLayout {
        let len = plan::write_segment(g);
        BitLayout {
            len,
            bytes: len.div_ceil(8),
            segments: g.len().div_ceil(len),
        }
    }

    /// Bytes of the whole mask, the spare byte included.
    pub fn total_bytes(&self) -> usize {
        self.segments * self.bytes + 1
    }

    /// The bit of element `e` of the tensor, counted from the first byte.
    #[inline(always)]
    pub fn bit(&self, e: usize) -> usize {
        (e / self.len) * self.bytes * 8 + e % self.len
    }
}

/// A ReLU mask's bytes in its layout, to read.
#[derive(Clone, Copy)]
pub(crate) struct MaskBits<'a> {
    pub bytes: &'a [u8],
    pub layout: BitLayout,
}

impl<'a> MaskBits<'a> {
    /// The bits of the `n` elements from element `e` on, which lie in one segment.
    #[inline(always)]
    pub fn at(self, e: usize, n: usize) -> BitsAt<'a> {
        let first = self.layout.bit(e);
        debug_assert!(
            n == 0 || e % self.layout.len + n <= self.layout.len,
            "bits across segments"
        );
        // The last bit read and the byte after it (a reader takes two bytes at a time).
        assert!((first + n.max(1) - 1) / 8 + 1 < self.bytes.len());
        BitsAt {
            bytes: self.bytes,
            first,
        }
    }
}

/// The bits of consecutive elements of one segment from some element on (element i at bit
/// `first + i` of the bytes), to read; made by [`MaskBits::at`], which checks that they lie in
/// the buffer with one byte to spare.
#[derive(Clone, Copy)]
pub(crate) struct BitsAt<'a> {
    bytes: &'a [u8],
    first: usize,
}

impl<'a> BitsAt<'a> {
    /// Bits of elements i..i + 8, element i as bit 0.
    ///
    /// # Safety
    /// Those elements must be among the ones [`MaskBits::at`] was given.
    #[inline(always)]
    pub unsafe fn get8(self, i: usize) -> u8 {
        let b = self.first + i;
        // SAFETY: byte b / 8 + 1 lies in the buffer (checked by `MaskBits::at`).
        let (lo, hi) = unsafe {
            let p = self.bytes.as_ptr().add(b / 8);
            (*p, *p.add(1))
        };
        (u16::from_le_bytes([lo, hi]) >> (b % 8)) as u8
    }

    /// The byte that holds element i's bit and the bit's place in it: `(byte, offset)`, the
    /// byte counted from the buffer's start.
    #[inline(always)]
    pub fn byte_of(self, i: usize) -> (usize, usize) {
        ((self.first + i) / 8, (self.first + i) % 8)
    }

    /// The buffer's bytes, to read where [`BitsAt::byte_of`] says.
    #[inline(always)]
    pub fn bytes(self) -> &'a [u8] {
        self.bytes
    }

    /// Bit of element i.
    ///
    /// # Safety
    /// As [`BitsAt::get8`].
    #[inline(always)]
    pub unsafe fn get1(self, i: usize) -> bool {
        let b = self.first + i;
        // SAFETY: as in `get8`.
        unsafe { *self.bytes.as_ptr().add(b / 8) >> (b % 8) & 1 == 1 }
    }
}

/// A segment's bytes of a ReLU mask, to write: element i at bit i.
///
/// A pass writes the bits of 8 elements at a time, and where its vectors do not start at a byte
/// (the head it peels to align its streaming stores to [`STREAM_ALIGN`](super::simd::STREAM_ALIGN)
/// bytes), each 8 bits straddle two bytes. So the bits of consecutive writes gather in a 64-bit
/// word in `carry`, stored whole once its 64 elements are written: one store per 64 elements,
/// with neither a load of the mask (which could wait on the output's pending stores) nor the
/// shifts and merges of a byte at a time; any other write, and [`BitsOut::flush`] at the end,
/// first stores what waits.
#[derive(Clone, Copy)]
struct BitsOut<'c> {
    ptr: *mut u8,
    carry: &'c Cell<Carry>,
}

/// Bits [`BitsOut::put8`] left to store: those of elements `base..next` (`base` a multiple of
/// 8, `next - base` < 64) as bits 0.. of `word`, its bits above them 0 (`next` `usize::MAX`:
/// none wait).
#[derive(Clone, Copy)]
pub(crate) struct Carry {
    base: usize,
    next: usize,
    word: u64,
}

impl Carry {
    /// No bits wait.
    pub(crate) const NONE: Carry = Carry {
        base: 0,
        next: usize::MAX,
        word: 0,
    };
}

impl<'c> BitsOut<'c> {
    /// A segment's bytes from `ptr` on, with `carry` (holding [`Carry::NONE`]) for their writes.
    #[inline(always)]
    fn new(ptr: *mut u8, carry: &'c Cell<Carry>) -> Self {
        BitsOut { ptr, carry }
    }

    /// Writes the bits of elements i..i + 8 (element i as bit 0), leaving the others of their
    /// bytes as they were (once [`BitsOut::flush`]ed).
    ///
    /// # Safety
    /// Elements i..i + 8 must lie in the segment, whose bytes the caller owns.
    #[inline(always)]
    unsafe fn put8(self, i: usize, bits: u8) {
        let carry = self.carry.get();
        // The word's elements and bits so far: the carry's when the last write was the put8
        // that ended at i; else, after storing those, a word from i's byte on, with the bits
        // there below element i as they are.
        let (base, word) = if carry.next == i {
            (carry.base, carry.word)
        } else {
            let (base, sh) = (i & !7, i % 8);
            // SAFETY: the carry's bits are the caller's segment's; byte i / 8 holds element i.
            let before = unsafe {
                self.flush_if(carry);
                match sh {
                    0 => 0,
                    _ => *self.ptr.add(base / 8) & ((1u8 << sh) - 1),
                }
            };
            (base, before as u64)
        };
        let off = i - base;
        let word = word | (bits as u64) << off;
        if off + 8 >= 64 {
            // SAFETY: bytes base / 8..base / 8 + 8 hold the bits of elements base..base + 64,
            // which lie between the first element this word holds and i + 8: in the segment.
            unsafe { self.ptr.add(base / 8).cast::<u64>().write_unaligned(word) };
            self.carry.set(Carry {
                base: base + 64,
                next: i + 8,
                // The bits of elements base + 64..i + 8 (a shift of 1 to 8).
                word: (bits as u64) >> (64 - off),
            });
        } else {
            self.carry.set(Carry {
                base,
                next: i + 8,
                word,
            });
        }
    }

    /// Writes the bit of element i.
    ///
    /// # Safety
    /// As [`BitsOut::put8`], for element i.
    #[inline(always)]
    unsafe fn put1(self, i: usize, on: bool) {
        // SAFETY: the bits that wait belong to the caller's segment; byte i / 8 holds element i's
        // bit.
        unsafe {
            self.flush_if(self.carry.get());
            let p = self.ptr.add(i / 8);
            let bit = 1u8 << (i % 8);
            *p = if on { *p | bit } else { *p & !bit };
        }
    }

    /// Stores the bits that wait, if any: the last write's.
    ///
    /// # Safety
    /// As the [`BitsOut::put8`] that left them.
    #[inline(always)]
    unsafe fn flush(self) {
        // SAFETY: the caller's contract.
        unsafe { self.flush_if(self.carry.get()) }
    }

    /// [`BitsOut::flush`] of `carry`, the carry's value.
    ///
    /// # Safety
    /// As [`BitsOut::flush`].
    #[inline(always)]
    unsafe fn flush_if(self, carry: Carry) {
        if carry.next != usize::MAX {
            let n = carry.next - carry.base;
            // SAFETY: bytes base / 8.. up to the one holding element next - 1 hold bits of the
            // elements of the put8s that left them.
            unsafe {
                let p = self.ptr.add(carry.base / 8);
                for k in 0..n / 8 {
                    *p.add(k) = (carry.word >> (8 * k)) as u8;
                }
                if !n.is_multiple_of(8) {
                    let (low, last) = ((1u8 << (n % 8)) - 1, p.add(n / 8));
                    *last = (*last & !low) | ((carry.word >> (8 * (n / 8))) as u8 & low);
                }
            }
            self.carry.set(Carry::NONE);
        }
    }
}

/// A fused forward pass's own arguments over the whole tensor: the residual (`None`: a ReLU
/// alone) and the mask's bytes in [`BitLayout::new`] of the tensor (`None`: no mask is kept).
pub(crate) struct Forward<'a, T> {
    pub z: Option<&'a [T]>,
    pub bits: Option<&'a mut [u8]>,
}

impl<'a, T> Forward<'a, T> {
    /// `relu` (`None`: plain batch norm) cut into one part per `segs` segments of `layout`, in
    /// order: a part for each unit of a pass whose units are that many whole segments.
    pub fn split(relu: Option<Self>, segs: usize, layout: BitLayout) -> Vec<Option<Self>> {
        let parts = layout.segments.div_ceil(segs);
        let Some(Forward { z, bits }) = relu else {
            return (0..parts).map(|_| None).collect();
        };
        let mut z = z.map(|z| z.chunks(segs * layout.len));
        let mut bits = bits.map(|b| b[..layout.segments * layout.bytes].chunks_mut(segs * layout.bytes));
        let mut next = move || Forward {
            z: z.as_mut().map(|c| c.next().expect("a part per unit")),
            bits: bits.as_mut().map(|c| c.next().expect("a part per unit")),
        };
        (0..parts).map(|_| Some(next())).collect()
    }

    /// The kernel call's part of segment `k` of this (which holds whole segments of `layout`
    /// from a segment boundary on): its `n` elements.
    pub fn segment(&mut self, k: usize, n: usize, layout: BitLayout) -> Act<'_, T> {
        let first = k * layout.len;
        Act {
            z: self.z.map(|z| &z[first..first + n]),
            z_ahead: 0,
            bits: self
                .bits
                .as_deref_mut()
                .map(|b| &mut b[k * layout.bytes..(k + 1) * layout.bytes]),
        }
    }
}

/// A backward pass behind a fused ReLU, over the whole tensor: the mask's bits, and dz to write
/// (the upstream gradient itself) when the pass writes it.
pub(crate) struct Backward<'a, T> {
    pub bits: MaskBits<'a>,
    pub dz: Option<&'a mut [T]>,
}

impl<'a, T> Backward<'a, T> {
    /// `relu` (`None`: plain batch norm) cut into one part per `len` elements, in order (for
    /// units of whole segments): the bits stay whole, dz is cut.
    pub fn split(relu: Option<Self>, len: usize, total: usize) -> Vec<Option<Self>> {
        let parts = total.div_ceil(len);
        let Some(Backward { bits, dz }) = relu else {
            return (0..parts).map(|_| None).collect();
        };
        let mut dz = dz.map(|d| d.chunks_mut(len));
        (0..parts)
            .map(|_| {
                Some(Backward {
                    bits,
                    dz: dz.as_mut().map(|c| c.next().expect("a part per unit")),
                })
            })
            .collect()
    }

    /// The kernel call's part of the `n` elements from element `first` of the tensor, which lie
    /// in one segment; `at` is where they start in this part's dz.
    pub fn part(&mut self, first: usize, at: usize, n: usize) -> Back<'_, T> {
        Back {
            bits: self.bits.at(first, n),
            dz: self.dz.as_deref_mut().map(|d| &mut d[at..at + n]),
        }
    }
}

/// The fused part of one forward kernel call over `n` elements: the residual's same `n`
/// elements, and the mask's bytes of those elements (element i at bit i), each when there is one.
pub(crate) struct Act<'a, T> {
    pub z: Option<&'a [T]>,
    /// Where the residual the pass reads after these `n` elements lies, as a distance in
    /// elements from them (0: right after them, the hardware prefetchers' stream): element i
    /// of z is read with element i + `z_ahead`'s line prefetched (see [`Fused`]).
    pub z_ahead: isize,
    pub bits: Option<&'a mut [u8]>,
}

/// A map a pass applies to the value of element i on its way: in a forward, to the normalized
/// value before it is stored ([`Fused`]: what follows batch norm); in a backward, to dy before
/// it is used ([`Gated`]: the upstream gradient behind a fused ReLU). By default the identity
/// ([`Plain`]: plain batch norm). Methods are `unsafe`: element i must lie in the range the map
/// was made for.
pub(crate) trait ElementMap<T: Element>: Copy {
    /// Whether [`ElementMap::narrow8`] returns values of `T` (so a store need not round them).
    const EXACT: bool = false;
    /// Whether every method returns its value as it is (plain batch norm): then a kernel may
    /// compute its lanes in any order (see `Simd::fload_pair`).
    const PLAIN: bool = false;
    /// Of elements i..i + 8, as `f32` lanes (the `f32` path: `f32`, `bf16`, `f16` tensors).
    #[inline(always)]
    unsafe fn narrow8<S: Simd>(self, _: S, _i: usize, v: S::F) -> S::F {
        v
    }
    /// Of element i, in `f32` (the `f32` path).
    #[inline(always)]
    unsafe fn narrow1(self, _i: usize, v: f32) -> f32 {
        v
    }
    /// Of elements i..i + 8, as `f64` lanes (rounded to `T` when stored).
    #[inline(always)]
    unsafe fn wide8<S: Simd>(self, _: S, _i: usize, v: S::V) -> S::V {
        v
    }
    /// Of element i, in `f64` (rounded to `T` when stored).
    #[inline(always)]
    unsafe fn wide1(self, _i: usize, v: f64) -> f64 {
        v
    }
}

/// Plain batch norm: the value as it is.
#[derive(Clone, Copy)]
pub(crate) struct Plain;

impl<T: Element> ElementMap<T> for Plain {
    const PLAIN: bool = true;
}

/// Fused: relu(v + z) with the residual `z` when `ADD`, relu(v) otherwise, each operation in the
/// element type; its mask bit written when `BITS`.
#[derive(Clone, Copy)]
pub(crate) struct Fused<'c, T, const ADD: bool, const BITS: bool> {
    z: *const T,
    z_ahead: isize,
    bits: BitsOut<'c>,
}

impl<T: Element, const ADD: bool, const BITS: bool> ElementMap<T> for Fused<'_, T, ADD, BITS> {
    // Every output is a rounded value, or +0.0.
    const EXACT: bool = true;
    #[inline(always)]
    unsafe fn narrow8<S: Simd>(self, s: S, i: usize, v: S::F) -> S::F {
        // The value batch norm would store, then the sum y + z rounded as `T` rounds it (both
        // no-ops for f32).
        // SAFETY (all blocks): element i.. lies in the range (caller).
        let (v, z) = (s.fround::<T>(v), || unsafe { s.fload(self.z.add(i)) });
        if ADD {
            self.prefetch_z(i);
        }
        let (out, bits) = s.frelu(if ADD { s.fround::<T>(s.fadd(v, z())) } else { v });
        unsafe { self.record8(i, bits) };
        out
    }
    #[inline(always)]
    unsafe fn narrow1(self, i: usize, v: f32) -> f32 {
        let round = |v: f32| T::from_f32(v).to_f32();
        let v = round(v);
        // SAFETY (all blocks): as in `narrow8`.
        let v = if ADD {
            round(v + unsafe { *self.z.add(i) }.to_f32())
        } else {
            v
        };
        let keep = relu_keeps(v as f64);
        unsafe { self.record1(i, keep) };
        if keep {
            v
        } else {
            0.0
        }
    }
    #[inline(always)]
    unsafe fn wide8<S: Simd>(self, s: S, i: usize, v: S::V) -> S::V {
        // The value batch norm would store, then the sum y + z rounded as `T` rounds it.
        let (v, z) = (s.round::<T>(v), || unsafe { s.load(self.z.add(i)) });
        if ADD {
            self.prefetch_z(i);
        }
        // SAFETY (all blocks): as in `narrow8`.
        let (out, bits) = s.relu(if ADD { s.round::<T>(s.add(v, z())) } else { v });
        unsafe { self.record8(i, bits) };
        out
    }
    #[inline(always)]
    unsafe fn wide1(self, i: usize, v: f64) -> f64 {
        let round = |v: f64| T::from_f64(v).to_f64();
        let v = round(v);
        // SAFETY (all blocks): as in `narrow8`.
        let v = if ADD {
            round(v + unsafe { *self.z.add(i) }.to_f64())
        } else {
            v
        };
        let keep = relu_keeps(v);
        unsafe { self.record1(i, keep) };
        if keep {
            v
        } else {
            0.0
        }
    }
}

/// Runs `$body` with `$e` bound to the epilogue an `Option<Act>` over `$n` elements asks for:
/// [`Plain`] for none, else the [`Fused`] one of its residual and bits (checked against `$n`).
macro_rules! with_epilogue {
    ($act:expr, $n:expr, |$e:ident| $body:expr) => {{
        let n: usize = $n;
        match $act {
            None => {
                let $e = $crate::kernels::relu::Plain;
                $body
            }
            Some($crate::kernels::relu::Act { z, z_ahead, bits }) => {
                let z = z.map(|z| {
                    assert_eq!(z.len(), n);
                    z.as_ptr()
                });
                let bits = bits.map(|b| {
                    assert!(b.len() >= n.div_ceil(8));
                    b.as_mut_ptr()
                });
                let carry = std::cell::Cell::new($crate::kernels::relu::Carry::NONE);
                match (z, bits) {
                    (None, None) => {
                        let $e = $crate::kernels::relu::Fused::<_, false, false>::new(std::ptr::null(), None, z_ahead, &carry);
                        $body
                    }
                    (None, Some(b)) => {
                        let $e = $crate::kernels::relu::Fused::<_, false, true>::new(std::ptr::null(), Some(b), z_ahead, &carry);
                        let out = $body;
                        // SAFETY: the epilogue's range, whose bits it wrote.
                        unsafe { $e.finish() };
                        out
                    }
                    (Some(z), None) => {
                        let $e = $crate::kernels::relu::Fused::<_, true, false>::new(z, None, z_ahead, &carry);
                        $body
                    }
                    (Some(z), Some(b)) => {
                        let $e = $crate::kernels::relu::Fused::<_, true, true>::new(z, Some(b), z_ahead, &carry);
                        let out = $body;
                        // SAFETY: the epilogue's range, whose bits it wrote.
                        unsafe { $e.finish() };
                        out
                    }
                }
            }
        }
    }};
}
pub(crate) use with_epilogue;

impl<'c, T, const ADD: bool, const BITS: bool> Fused<'c, T, ADD, BITS> {
    /// Records which of elements i..i + 8 the ReLU kept, when the mask is kept.
    ///
    /// # Safety
    /// Elements i..i + 8 lie in the range.
    #[inline(always)]
    unsafe fn record8(self, i: usize, bits: u8) {
        if BITS {
            // SAFETY: the caller's contract.
            unsafe { self.bits.put8(i, bits) };
        }
    }

    /// Prefetches, with element i of the residual, the line of element i + `z_ahead` into L2
    /// (not L1, where x, z and the mask's bytes are read and written), where the pass reads z
    /// in runs far apart: a channel's unit goes through its planes C planes apart, and each
    /// plane's run of z would start cold and stay behind the hardware prefetchers. Nothing where
    /// z is read as one stream (`z_ahead` 0).
    #[inline(always)]
    fn prefetch_z(self, i: usize) {
        if self.z_ahead != 0 {
            moments::prefetch_line_l2(self.z.wrapping_offset(i as isize + self.z_ahead));
        }
    }

    /// Stores the mask's bits that still wait (see [`BitsOut`]): after the pass's last write.
    ///
    /// # Safety
    /// As [`Fused::new`]'s range.
    #[inline(always)]
    pub unsafe fn finish(self) {
        if BITS {
            // SAFETY: the caller's contract.
            unsafe { self.bits.flush() };
        }
    }

    /// Records whether the ReLU kept element i, when the mask is kept.
    ///
    /// # Safety
    /// Element i lies in the range.
    #[inline(always)]
    unsafe fn record1(self, i: usize, kept: bool) {
        if BITS {
            // SAFETY: the caller's contract.
            unsafe { self.bits.put1(i, kept) };
        }
    }

    /// The epilogue over a range whose residual starts at `z` (null without `ADD`) and whose
    /// mask bytes start at `bits` (element 0 at bit 0; `None` without `BITS`), both checked by
    /// [`with_epilogue!`] to cover the range; `carry` (holding [`Carry::NONE`]) serves its
    /// writes of the mask.
    #[inline(always)]
    pub fn new(z: *const T, bits: Option<*mut u8>, z_ahead: isize, carry: &'c Cell<Carry>) -> Self {
        debug_assert!(ADD != z.is_null() && BITS == bits.is_some());
        Fused {
            z,
            z_ahead,
            bits: BitsOut::new(bits.unwrap_or(std::ptr::null_mut()), carry),
        }
    }
}

/// Behind a fused ReLU: dy where the mask's bit is set, +0.0 elsewhere; stored to `dz` too when
/// `DZ` (the dx passes that are not fused with the gradient sums, see [`GatedOut`] for those),
/// with ordinary stores even where the pass streams dx: a second stream of non-temporal stores
/// beside dx's made the pass slower, by up to 2× with 2-byte elements, depending on how dz's
/// address falls against dx's (docs/tuning-log.md).
#[derive(Clone, Copy)]
pub(crate) struct Gated<'a, T, const DZ: bool> {
    bits: BitsAt<'a>,
    dz: *mut T,
}

impl<'a, T> Gated<'a, T, false> {
    /// The upstream gradient of the elements `bits` covers.
    #[inline(always)]
    pub fn new(bits: BitsAt<'a>) -> Self {
        Gated {
            bits,
            dz: std::ptr::null_mut(),
        }
    }
}

impl<'a, T> Gated<'a, T, true> {
    /// The upstream gradient of the elements `bits` covers, stored to `dz` (the same elements).
    #[inline(always)]
    pub fn with_dz(bits: BitsAt<'a>, dz: &mut [T]) -> Self {
        Gated {
            bits,
            dz: dz.as_mut_ptr(),
        }
    }
}

impl<T: Element, const DZ: bool> ElementMap<T> for Gated<'_, T, DZ> {
    #[inline(always)]
    unsafe fn wide8<S: Simd>(self, s: S, i: usize, dy: S::V) -> S::V {
        // SAFETY (all blocks): elements i..i + 8 lie in the range (caller).
        let g = s.gate(unsafe { self.bits.get8(i) }, dy);
        if DZ {
            unsafe { s.store(self.dz.add(i), g) }
        }
        g
    }
    #[inline(always)]
    unsafe fn wide1(self, i: usize, dy: f64) -> f64 {
        // SAFETY (all blocks): element i lies in the range (caller).
        let g = if unsafe { self.bits.get1(i) } { dy } else { 0.0 };
        if DZ {
            unsafe { *self.dz.add(i) = T::from_f64(g) };
        }
        g
    }
    #[inline(always)]
    unsafe fn narrow8<S: Simd>(self, s: S, i: usize, dy: S::F) -> S::F {
        // SAFETY (all blocks): as in `wide8`.
        let g = s.fgate(unsafe { self.bits.get8(i) }, dy);
        if DZ {
            unsafe { s.fstore(self.dz.add(i), g) }
        }
        g
    }
    #[inline(always)]
    unsafe fn narrow1(self, i: usize, dy: f32) -> f32 {
        // SAFETY (all blocks): as in `wide1`.
        let g = if unsafe { self.bits.get1(i) } { dy } else { 0.0 };
        if DZ {
            unsafe { *self.dz.add(i) = T::from_f32(g) };
        }
        g
    }
}

/// The upstream gradient behind a fused ReLU written out as the gradient-sums pass reads dy: dz =
/// dy·\[kept\] of the elements of a run the pass takes, stored from the same loop that adds them
/// to the sums (the dx pass then writes dx alone). One output stream in a pass that has none, so
/// it streams where the pass's output is larger than the cache (`STREAM`). The stored values are
/// the elements of dy themselves (the `f32` path's lanes loaded again from L1 and selected, for
/// `f32`, `bf16` and `f16`), or +0.0: the bits the dx pass stored as dz.
///
/// Streaming, where the run's dz does not start at a boundary of the stores' alignment
/// ([`UpstreamOut::lag`]), the vector stored after elements i..i + 8 are read is the one `lag`
/// elements back, which starts at one and whose dy has been read already (as in
/// `elementwise::ScaleRowsAfter`); [`UpstreamOut::finish_run`] then writes the elements no vector
/// covers.
#[derive(Clone, Copy)]
pub(crate) struct GatedOut<'a, T, const STREAM: bool> {
    bits: BitsAt<'a>,
    dy: *const T,
    dz: *mut T,
    /// 0, or (streaming) the elements from the boundary before dz to it.
    lag: usize,
}

impl<T: Element, const STREAM: bool> ElementMap<T> for GatedOut<'_, T, STREAM> {
    #[inline(always)]
    unsafe fn wide8<S: Simd>(self, s: S, i: usize, dy: S::V) -> S::V {
        // SAFETY (all blocks): elements i..i + 8 lie in the run, and, streaming, the `lag` before
        // them too when i ≥ lag (the caller's, `UpstreamOut::run`'s contract).
        let bits = unsafe { self.bits.get8(i) };
        let g = s.gate(bits, dy);
        if !STREAM {
            unsafe {
                let p = self.dz.add(i);
                if narrow::<T>() {
                    s.fstore(p, s.fgate(bits, s.fload(self.dy.add(i))));
                } else {
                    s.store(p, g);
                }
            }
        } else if i >= self.lag {
            // The vector that starts at the boundary `lag` elements back.
            let j = i - self.lag;
            unsafe {
                let (p, back) = (self.dz.add(j), self.bits.get8(j));
                if narrow::<T>() {
                    s.fstream(p, s.fgate(back, s.fload(self.dy.add(j))));
                } else if self.lag == 0 {
                    s.stream(p, g);
                } else {
                    s.stream(p, s.gate(back, s.load(self.dy.add(j))));
                }
            }
        }
        g
    }
    #[inline(always)]
    unsafe fn wide1(self, i: usize, dy: f64) -> f64 {
        // SAFETY (all blocks): element i lies in the run (caller), `UpstreamOut::run`'s contract.
        let kept = unsafe { self.bits.get1(i) };
        unsafe { upstream_one(self.dy.add(i), self.dz.add(i), kept) };
        if kept {
            dy
        } else {
            0.0
        }
    }
}

/// dz = dy·\[kept\] of one element, as the dx pass stores it: dy's element through the `f32`
/// path (or `f64` for `f64`), or +0.0.
///
/// # Safety
/// `dy` must be valid for reading one element, `dz` for writing one.
#[inline(always)]
unsafe fn upstream_one<T: Element>(dy: *const T, dz: *mut T, kept: bool) {
    // SAFETY: the caller's contract.
    unsafe {
        *dz = match (narrow::<T>(), kept) {
            (true, true) => T::from_f32((*dy).to_f32()),
            (false, true) => T::from_f64((*dy).to_f64()),
            (_, false) => T::from_f64(0.0),
        };
    }
}

/// Where a gradient-sums pass over runs behind a fused ReLU writes dz (see [`GatedOut`]): the
/// whole tensor's dz, indexed as the runs index x, and whether the pass streams its output.
#[derive(Clone, Copy)]
pub(crate) struct UpstreamOut<T> {
    ptr: *mut T,
    len: usize,
    stream: bool,
}

impl<T: Element> UpstreamOut<T> {
    /// dz of `len` elements from `ptr` on, streamed where `stream`.
    ///
    /// # Safety
    /// `ptr` must be valid for writing `len` elements while the value is used, and the elements
    /// of the runs each pass is given written by that pass alone.
    pub unsafe fn new(ptr: *mut T, len: usize, stream: bool) -> Self {
        UpstreamOut { ptr, len, stream }
    }

    /// Elements of the tensor.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the stores stream.
    pub fn streams(&self) -> bool {
        self.stream
    }

    /// Streaming, the elements from the boundary before element `o` of dz to it: boundaries of
    /// the vectors' stores, [`STREAM_ALIGN`](super::simd::STREAM_ALIGN) bytes, or 16 for the
    /// half types, whose 8 elements are 16 bytes (their stores' alignment). Less than 8.
    fn lag(&self, o: usize) -> usize {
        let size = std::mem::size_of::<T>();
        let align = super::simd::STREAM_ALIGN.min(8 * size);
        (self.ptr.wrapping_add(o) as usize % align) / size
    }

    /// The map of a run of `n` elements from element `o` on, whose mask bits are `bits` and
    /// whose dy starts at `dy`.
    ///
    /// # Safety
    /// Elements `o..o + n` lie in dy and dz; the map is called for each 8 elements of the run
    /// from its start (`wide8`) and for those after them (`wide1`), and with `STREAM` the run
    /// is then finished by [`UpstreamOut::finish_run`].
    #[inline(always)]
    pub unsafe fn run<'a, const STREAM: bool>(
        &self,
        o: usize,
        bits: BitsAt<'a>,
        dy: *const T,
    ) -> GatedOut<'a, T, STREAM> {
        GatedOut {
            bits,
            dy,
            dz: self.ptr.wrapping_add(o),
            lag: if STREAM { self.lag(o) } else { 0 },
        }
    }

    /// Streaming, writes the elements of the run of `n` elements from element `o` on that the
    /// map's vectors did not (see [`GatedOut`]): the first 8 − `lag` and the `lag` before the
    /// elements `wide1` took (none when `lag` is 0).
    ///
    /// # Safety
    /// As [`UpstreamOut::run`], after the run's loop.
    #[inline(always)]
    pub unsafe fn finish_run(&self, o: usize, n: usize, bits: BitsAt<'_>, dy: *const T) {
        let (lag, n8) = (self.lag(o), n - n % 8);
        if lag == 0 || n8 == 0 {
            return;
        }
        let dz = self.ptr.wrapping_add(o);
        for i in (0..8 - lag).chain(n8 - lag..n8) {
            // SAFETY: i < n: element o + i lies in dy and dz; its bit among the run's.
            unsafe { upstream_one(dy.add(i), dz.add(i), bits.get1(i)) };
        }
    }
}

/// The backward part of one dx kernel call over `n` elements: the mask's bits of those elements
/// and the `n` elements of dz to write, when the pass has them.
pub(crate) struct Back<'a, T> {
    pub bits: BitsAt<'a>,
    pub dz: Option<&'a mut [T]>,
}

/// Runs `$body` with `$u` bound to the upstream gradient an `Option<Back>` over the `$n` elements
/// of a pass asks for: [`Plain`] (dy itself) for none, else [`Gated`], with dz (checked against
/// `$n`) when it has one.
macro_rules! with_upstream {
    ($back:expr, $n:expr, |$u:ident| $body:expr) => {{
        match $back {
            None => {
                let $u = $crate::kernels::relu::Plain;
                $body
            }
            Some($crate::kernels::relu::Back { bits, dz: None }) => {
                let $u = $crate::kernels::relu::Gated::<_, false>::new(bits);
                $body
            }
            Some($crate::kernels::relu::Back { bits, dz: Some(dz) }) => {
                assert_eq!(dz.len(), $n);
                let $u = $crate::kernels::relu::Gated::with_dz(bits, dz);
                $body
            }
        }
    }};
}
pub(crate) use with_upstream;

#[cfg(test)]
mod tests {
    use super::*;

    /// Bits written 8 and 1 at a time at every offset, runs of 24 (within a word) and 152 (two
    /// whole words stored and bits left to flush at any offset), in order (the carried bits
    /// stored whole words at a time, the rest by the next write or by the flush at the end) and
    /// out of order, read back the same, and leave the bits around them as they were.
    #[test]
    fn bits_round_trip() {
        let cases = (0..16).flat_map(|s| [24, 152].into_iter().flat_map(move |n| (0..3).map(move |o| (s, n, o))));
        for (start, count, order) in cases {
            let mut bytes = vec![0xA5u8; 26];
            let want: Vec<bool> = (0..count).map(|i| (i * 5 + start) % 3 == 0).collect();
            let carry = Cell::new(Carry::NONE);
            let out = BitsOut::new(bytes.as_mut_ptr(), &carry);
            let byte_of = |k: usize| (0..8).fold(0u8, |b, l| b | (want[k + l] as u8) << l);
            let ones = |from: usize| {
                for (k, &on) in want.iter().enumerate().skip(from) {
                    // SAFETY: bits start..start + count lie in the 26 bytes.
                    unsafe { out.put1(start + k, on) };
                }
            };
            let eights = (0..count).step_by(8);
            // SAFETY: bits start..start + count lie in the 26 bytes.
            unsafe {
                match order {
                    0 => {
                        eights.take(count / 8 - 1).for_each(|k| out.put8(start + k, byte_of(k)));
                        ones(count - 8);
                    }
                    1 => {
                        ones(count - 8);
                        eights
                            .take(count / 8 - 1)
                            .rev()
                            .for_each(|k| out.put8(start + k, byte_of(k)));
                    }
                    _ => eights.for_each(|k| out.put8(start + k, byte_of(k))),
                }
                out.flush();
            }
            let what = format!("start {start} count {count} order {order}");
            let mask = MaskBits {
                bytes: &bytes,
                layout: BitLayout {
                    len: 200,
                    bytes: 25,
                    segments: 1,
                },
            };
            let r = mask.at(start, count);
            for (k, &on) in want.iter().enumerate() {
                // SAFETY: inside the elements given to `at`.
                assert_eq!(unsafe { r.get1(k) }, on, "{what} bit {k}");
            }
            // SAFETY: as above.
            assert_eq!(unsafe { r.get8(3) }, byte_of(3), "{what}");
            let untouched = |b: usize| (0xA5u8 >> (b % 8)) & 1 == 1;
            let all = MaskBits { bytes: &bytes, ..mask }.at(0, 200);
            for b in (0..start).chain(start + count..200) {
                // SAFETY: bits 0..200 lie in the 26 bytes.
                assert_eq!(unsafe { all.get1(b) }, untouched(b), "{what}: bit {b} changed");
            }
        }
    }
}
