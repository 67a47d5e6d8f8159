//! Per-channel reductions: moments (count, mean, M2) and the two sums backward needs.
//!
//! Sums over contiguous data use two [`Simd`] vector accumulators (16 `f64` lanes: a 16-element
//! step feeds both, a last 8-element step the first) and a scalar accumulator for the last < 8
//! elements of each run; at the end lanes `l` and `l + 8` are added and folded by [`fold_lanes`],
//! and the scalar part added last. Sums across rows (channels-last) are sequential per channel,
//! vectorized across channels. All orders depend only on the shape.
//!
//! Moments of channels-first pieces use the corrected two-pass algorithm (the piece is in cache
//! for the second pass); moments of channels-last blocks one shifted pass, the shift being a
//! value of the channel (see [`rows_moments`]).
//!
//! With a mask over positions (masked batch norm), rows that are off are skipped, and a
//! channels-first run is taken part by part ([`MaskedLanes`]): stretches that are all on
//! through the same loops, the rest skipped; of a stretch with a few positions off, the moments
//! pack the values that are on into a buffer and take them through the same loops as a run of
//! their own, the gradient sums take it through them with the lanes that are off replaced by
//! +0.0. The orders then depend on the shape and the mask, still never on the thread count.

use super::fold_lanes;
use super::mask::{MaskSpans, SpanBits};
use super::relu::{BitsAt, ElementMap, Gated, MaskBits, Plain, UpstreamOut};
use super::scratch::Scratch;
use super::simd::{simd_dispatch, Simd};
use crate::stats::exact_reciprocal;
use crate::Element;

/// Count, mean and M2 = Σ(x − mean)² of a set of values: mergeable partial statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Moments {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    pub const EMPTY: Moments = Moments {
        count: 0.0,
        mean: 0.0,
        m2: 0.0,
    };

    /// Chan, Golub & LeVeque's pairwise merge: exact in real arithmetic, stable in floating point
    /// (no E[x²] − E[x]² cancellation).
    #[inline(always)]
    pub fn merge(self, other: Moments) -> Moments {
        if other.count == 0.0 {
            return self;
        }
        if self.count == 0.0 {
            return other;
        }
        let count = self.count + other.count;
        let delta = other.mean - self.mean;
        Moments {
            count,
            mean: self.mean + delta * (other.count / count),
            m2: self.m2 + other.m2 + delta * delta * (self.count * other.count / count),
        }
    }
}

/// `count` runs of `len` contiguous elements of a buffer, run `k` starting at `first + k·stride`
/// (e.g. some planes of one channel of a channels-first tensor).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Runs {
    pub first: usize,
    pub count: usize,
    pub len: usize,
    pub stride: usize,
}

/// Runs of at most this many bytes have the next run prefetched while they are read: short runs
/// far apart (small planes) are too short for the hardware prefetchers.
pub(crate) const PREFETCH_BYTES: usize = 8192;

/// Prefetches the `len` elements at `p` into the cache.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T, len: usize) {
    let (base, bytes) = (p as *const u8, len * std::mem::size_of::<T>());
    let mut off = 0;
    while off < bytes {
        prefetch_line(base.wrapping_add(off));
        off += 64;
    }
    prefetch_line(base.wrapping_add(bytes - 1));
}

/// Prefetches the lines of elements `i..i + 16` at `p` that a 16-element step starting at
/// element `i` (a multiple of 16) begins, so that a loop taking one such step at a time
/// prefetches each line once: every other step for 2-byte elements, one line per step for
/// `f32`, two for `f64`. A null `p` prefetches nothing.
#[inline(always)]
fn prefetch_step<T>(p: *const T, i: usize) {
    let size = std::mem::size_of::<T>();
    if p.is_null() || (16 * size < 64 && !(i * size).is_multiple_of(64)) {
        return;
    }
    let base = (p as *const u8).wrapping_add(i * size);
    let mut off = 0;
    while off < 16 * size {
        prefetch_line(base.wrapping_add(off));
        off += 64;
    }
}

/// The lines of a run of `len` elements that the steps of a loop over `steps` elements prefetch
/// (the loop takes fewer elements than the run has, e.g. a part's packed values): the step at
/// element i of `step` elements those lines that start in elements
/// `i·len/steps..(i + step)·len/steps`, the last whole step all up to `len`, so that the steps
/// prefetch each line of the run once and no line beyond it.
#[derive(Clone, Copy)]
struct Share {
    len: usize,
    steps: usize,
    /// len / steps in 32.32 fixed point.
    scale: u64,
}

impl Share {
    #[inline(always)]
    fn new(len: usize, steps: usize) -> Share {
        Share {
            len,
            steps,
            scale: if len == 0 {
                0
            } else {
                ((len as u64) << 32) / steps.max(1) as u64
            },
        }
    }

    /// The share of the step of `step` elements at element `i` (the steps are at 0, `step`,
    /// 2·`step`, … while a whole step remains): the multiples of `line` in the returned range
    /// are the run's elements whose lines it prefetches; and whether it is the last step, which
    /// also takes the line of element `len − 1` (the run need not start on a line).
    #[inline(always)]
    fn lines(self, i: usize, step: usize, line: usize) -> (std::ops::Range<usize>, bool) {
        let at = |i: usize| ((i as u64 * self.scale) >> 32) as usize;
        let last = i + 2 * step > self.steps;
        let end = if last { self.len } else { at(i + step).min(self.len) };
        (at(i).next_multiple_of(line)..end, last)
    }

    /// Prefetches the share ([`Share::lines`]) of the step of `step` elements at element `i` of
    /// the run at `p` (null: nothing).
    #[inline(always)]
    fn prefetch<T>(self, p: *const T, i: usize, step: usize) {
        let line = (64 / std::mem::size_of::<T>()).max(1);
        if p.is_null() {
            return;
        }
        let (lines, last) = self.lines(i, step, line);
        let mut e = lines.start;
        while e < lines.end {
            prefetch_line(p.wrapping_add(e));
            e += line;
        }
        if last && self.len > 0 {
            prefetch_line(p.wrapping_add(self.len - 1));
        }
    }
}

/// How many of the `len` elements of the next piece's part the packing pass of a long part
/// with gaps prefetches: the first half, in whole lines of `T`; the centered pass prefetches
/// the rest. Both passes then keep memory busy (the centered pass alone, over half as many
/// values as the part has, asked for the whole part in a burst that stalled it while memory
/// idled under the packing).
#[inline(always)]
fn pack_share<T>(len: usize) -> usize {
    let line = (64 / std::mem::size_of::<T>()).max(1);
    (len / 2) / line * line
}

/// Prefetches the cache line holding `p`.
#[inline(always)]
fn prefetch_line<T>(p: *const T) {
    prefetch_line_to::<false, T>(p)
}

/// Prefetches the cache line holding `p` into L2, not L1.
#[inline(always)]
pub(crate) fn prefetch_line_l2<T>(p: *const T) {
    prefetch_line_to::<true, T>(p)
}

/// Prefetches the cache line holding `p` into L1, or with `L2` into L2 only.
#[inline(always)]
fn prefetch_line_to<const L2: bool, T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        // SAFETY: prefetching never faults; the address is only computed, not dereferenced.
        unsafe {
            if L2 {
                _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
            } else {
                _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
            }
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl Runs {
    /// Whether the runs are longer than [`PREFETCH_BYTES`] (short runs have the next run
    /// prefetched while they are read, [`Runs::prefetch_next`]).
    #[inline(always)]
    fn long<T>(&self) -> bool {
        self.len * std::mem::size_of::<T>() > PREFETCH_BYTES
    }

    /// Prefetches run `k + 1` when runs are short.
    #[inline(always)]
    fn prefetch_next<T>(&self, base: *const T, k: usize) {
        if k + 1 < self.count && !self.long::<T>() {
            prefetch(base.wrapping_add(self.first + (k + 1) * self.stride), self.len);
        }
    }

    /// Where run `k` of the piece that follows these runs starts, when they are a group of
    /// whole planes (`stride` ≠ 0): the next `count` runs at the same stride, which is how a
    /// channel's planes are cut into pieces. `None` for one run of a plane (`stride` 0), whose
    /// continuation the hardware prefetchers follow. The address may lie past the buffer or in
    /// another unit's planes: it is only prefetched, never read.
    #[inline(always)]
    fn following(&self, k: usize) -> Option<usize> {
        (self.stride != 0).then(|| self.first + (self.count + k) * self.stride)
    }

    /// [`Runs::following`] in the buffer at `base`, offset by `offset` elements; null where there
    /// is none.
    #[inline(always)]
    fn ahead<T>(&self, base: *const T, k: usize, offset: usize) -> *const T {
        self.following(k)
            .map_or(std::ptr::null(), |o| base.wrapping_add(o + offset))
    }

    /// One run of `len` elements from `first`.
    #[inline(always)]
    pub fn one(first: usize, len: usize) -> Runs {
        Runs {
            first,
            count: 1,
            len,
            stride: 0,
        }
    }

    /// Number of elements.
    #[inline(always)]
    pub fn total(&self) -> usize {
        self.count * self.len
    }

    /// Panics unless every run lies inside a buffer of `len` elements.
    #[inline(always)]
    fn check(&self, len: usize) {
        assert!(self.count == 0 || self.first + (self.count - 1) * self.stride + self.len <= len);
    }
}

/// Which elements of one run enter a reduction: all of them ([`AllLanes`]) or those whose mask
/// bit is set ([`RunBits`]). The per-run reductions are written once over this; with
/// [`AllLanes`] every method is the identity and compiles away.
trait Lanes<S: Simd>: Copy {
    /// Whether some elements may be off (lanes are selected).
    const SELECTS: bool;
    /// The on/off state of 8 consecutive elements.
    type M: Copy;
    /// The state of elements `i..i + 8` of the run.
    ///
    /// # Safety
    /// Those elements must lie inside the run.
    unsafe fn mask(self, s: S, i: usize) -> Self::M;
    /// The lanes of `v` that are on, +0.0 in the others (a select).
    fn keep(self, s: S, m: Self::M, v: S::V) -> S::V;
    /// Whether element `i` of the run is on.
    ///
    /// # Safety
    /// The element must lie inside the run.
    unsafe fn on(self, i: usize) -> bool;
}

/// Every element of the run enters.
#[derive(Clone, Copy)]
struct AllLanes;

impl<S: Simd> Lanes<S> for AllLanes {
    const SELECTS: bool = false;
    type M = ();
    #[inline(always)]
    unsafe fn mask(self, _: S, _: usize) {}
    #[inline(always)]
    fn keep(self, _: S, _: (), v: S::V) -> S::V {
        v
    }
    #[inline(always)]
    unsafe fn on(self, _: usize) -> bool {
        true
    }
}

/// The elements of a run whose mask bits (one per element, the run's first element first) are
/// set.
#[derive(Clone, Copy)]
struct RunBits<'a>(BitsAt<'a>);

impl<S: Simd> Lanes<S> for RunBits<'_> {
    const SELECTS: bool = true;
    type M = S::M;
    #[inline(always)]
    unsafe fn mask(self, s: S, i: usize) -> S::M {
        // SAFETY: the run's bits were taken for all of its elements (`MaskedLanes::parts`),
        // i..i + 8 lie inside the run (caller).
        s.lane_mask(unsafe { self.0.get8(i) })
    }
    #[inline(always)]
    fn keep(self, s: S, m: S::M, v: S::V) -> S::V {
        s.keep(m, v)
    }
    #[inline(always)]
    unsafe fn on(self, i: usize) -> bool {
        // SAFETY: as in `mask`.
        unsafe { self.0.get1(i) }
    }
}

/// A mask's entries for some [`Runs`] of a channels-first tensor: run `k` has the entries
/// `offset..offset + len` of segment `first + k` of `spans` (segments are planes).
#[derive(Clone, Copy)]
pub(crate) struct MaskedLanes<'a> {
    spans: &'a MaskSpans<'a>,
    first: usize,
    offset: usize,
    len: usize,
}

/// What a mask selects of one run, part by part: `range` (relative to the run), all of it
/// (`lanes` and `bits` `None`) or lane by lane (the bits from the part's first element on, as
/// `lanes` and as `bits`).
#[derive(Clone)]
struct Part<'a> {
    range: std::ops::Range<usize>,
    lanes: Option<RunBits<'a>>,
    bits: Option<SpanBits<'a>>,
}

impl<'a> MaskedLanes<'a> {
    /// The entries of `runs` in `spans`: run k is `offset..offset + runs.len` of segment
    /// `first + k`, which must exist.
    #[inline(always)]
    pub fn new(spans: &'a MaskSpans<'a>, first: usize, offset: usize, runs: Runs) -> Self {
        assert!(runs.count == 0 || first + runs.count <= spans.segments());
        assert!(runs.count == 0 || offset + runs.len <= spans.segment(first).0.len());
        MaskedLanes {
            spans,
            first,
            offset,
            len: runs.len,
        }
    }

    /// The spans of run `k` that are on, clipped to the run, in order: (segment, start, end,
    /// gaps), `start..end` counted in the segment.
    #[inline(always)]
    fn clipped(self, k: usize) -> impl Iterator<Item = (usize, usize, usize, bool)> + 'a {
        let i = self.first + k;
        let (lo, hi) = (self.offset, self.offset + self.len);
        self.spans
            .segment(i)
            .1
            .iter()
            .filter(move |s| s.on && s.end > lo && s.start < hi)
            .map(move |s| (i, s.start.max(lo), s.end.min(hi), s.gaps))
    }

    /// The parts of run `k` that the mask selects, in order: the spans that are on, clipped to
    /// the run (those without gaps whole, those with gaps lane by lane); the rest is skipped.
    #[inline(always)]
    fn parts(self, k: usize) -> impl Iterator<Item = Part<'a>> + 'a {
        let (spans, lo) = (self.spans, self.offset);
        self.clipped(k).map(move |(i, start, end, gaps)| Part {
            range: start - lo..end - lo,
            lanes: gaps.then(|| RunBits(spans.bits_at(i, start, end))),
            bits: gaps.then(|| spans.span_bits(i, start)),
        })
    }
}

/// Runs `f(range, bits)` for each part of run `k` (of `len` elements) that `mask` (`None`: no
/// mask, the whole run) selects, in order: `bits` `None` where it selects all of the part, the
/// part's bits where it selects lane by lane.
#[inline(always)]
fn each_part(
    mask: Option<MaskedLanes>,
    k: usize,
    len: usize,
    mut f: impl FnMut(std::ops::Range<usize>, Option<SpanBits>),
) {
    match mask {
        None => f(0..len, None),
        Some(mask) => {
            for part in mask.parts(k) {
                f(part.range, part.bits);
            }
        }
    }
}

/// Runs `$body` with `$lanes` and `$r` (a range of run `$k`'s elements) for each part of the
/// run that `$mask` (`None`: no mask, the whole run) selects: [`AllLanes`] where it selects all
/// of a part, a [`RunBits`] where it selects lane by lane.
macro_rules! for_each_part {
    ($mask:expr, $k:expr, $len:expr, |$lanes:ident, $r:ident| $body:expr) => {
        match $mask {
            None => {
                let ($lanes, $r) = (AllLanes, 0..$len);
                $body
            }
            Some(mask) => {
                for part in mask.parts($k) {
                    let $r = part.range;
                    match part.lanes {
                        None => {
                            let $lanes = AllLanes;
                            $body
                        }
                        Some($lanes) => $body,
                    }
                }
            }
        }
    };
}

/// Two sums over runs, each in two vector accumulators (16 `f64` lanes: a 16-element step feeds
/// both, a last 8-element step the first) and a scalar one for the last < 8 elements of each run.
struct Sums2<S: Simd> {
    a: (S::V, S::V),
    b: (S::V, S::V),
    ta: f64,
    tb: f64,
}

impl<S: Simd> Sums2<S> {
    #[inline(always)]
    fn new(s: S) -> Self {
        Sums2 {
            a: (s.splat(0.0), s.splat(0.0)),
            b: (s.splat(0.0), s.splat(0.0)),
            ta: 0.0,
            tb: 0.0,
        }
    }

    /// Adds (Σ a, Σ a·b) over the elements of a run of `n` elements that `lanes` has on, with
    /// (a, b) of elements i..i + 8 from `terms8(i, on)` (`on`: their lanes' state, for
    /// [`Lanes::keep`]) and of element i from `terms1(i)`: 16 elements a step, then 8, then one
    /// at a time (where `lanes` selects, 8 a step into the first vector accumulators, then one
    /// at a time). The loop of both sums over runs. `ahead(i)` is called once per 16-element
    /// step (to prefetch what a later run reads; it must not change the sums).
    ///
    /// # Safety
    /// `lanes` must hold the state of the run's `n` elements.
    #[inline(always)]
    unsafe fn add_run<L: Lanes<S>>(
        &mut self,
        s: S,
        n: usize,
        lanes: L,
        terms8: impl Fn(usize, L::M) -> (S::V, S::V),
        terms1: impl Fn(usize) -> (f64, f64),
        ahead: impl Fn(usize),
    ) {
        let ((mut a0, mut a1), (mut b0, mut b1)) = (self.a, self.b);
        let mut i = 0;
        if L::SELECTS {
            // Lanes selected: 8 elements a step, into the first accumulators alone. The selects'
            // masks and values with all four accumulators live do not fit in the 16 registers
            // (one accumulator went to the stack, its chain through memory), and with two the
            // fused multiply-adds' latency is about what a step's other work takes anyway.
            while i + 8 <= n {
                if i % 16 == 0 {
                    ahead(i);
                }
                // SAFETY: as below.
                let (x0, y0) = terms8(i, unsafe { lanes.mask(s, i) });
                a0 = s.add(a0, x0);
                b0 = s.mul_add(x0, y0, b0);
                i += 8;
            }
        }
        // SAFETY (all blocks): elements i..i + 8 lie inside the run, whose state `lanes` holds.
        while i + 16 <= n {
            ahead(i);
            let (x0, y0) = terms8(i, unsafe { lanes.mask(s, i) });
            let (x1, y1) = terms8(i + 8, unsafe { lanes.mask(s, i + 8) });
            a0 = s.add(a0, x0);
            a1 = s.add(a1, x1);
            b0 = s.mul_add(x0, y0, b0);
            b1 = s.mul_add(x1, y1, b1);
            i += 16;
        }
        if i + 8 <= n {
            let (x0, y0) = terms8(i, unsafe { lanes.mask(s, i) });
            a0 = s.add(a0, x0);
            b0 = s.mul_add(x0, y0, b0);
            i += 8;
        }
        while i < n {
            // SAFETY: i < n.
            if unsafe { lanes.on(i) } {
                let (x, y) = terms1(i);
                self.ta += x;
                self.tb = x.mul_add(y, self.tb);
            }
            i += 1;
        }
        (self.a, self.b) = ((a0, a1), (b0, b1));
    }

    /// The accumulators `carry` holds.
    #[inline(always)]
    fn resume(s: S, carry: &GradCarry) -> Self {
        let at = |v: &[f64; 16], h: usize| {
            // SAFETY: lanes h·8..h·8 + 8 of a 16-lane array.
            unsafe { s.load(v.as_ptr().add(8 * h)) }
        };
        Sums2 {
            a: (at(&carry.a, 0), at(&carry.a, 1)),
            b: (at(&carry.b, 0), at(&carry.b, 1)),
            ta: carry.ta,
            tb: carry.tb,
        }
    }

    /// Stores the accumulators in `carry`, exactly.
    #[inline(always)]
    fn suspend(self, s: S, carry: &mut GradCarry) {
        let (a, b) = ([self.a.0, self.a.1], [self.b.0, self.b.1]);
        for h in 0..2 {
            // SAFETY: lanes h·8..h·8 + 8 of a 16-lane array.
            unsafe {
                s.store(carry.a.as_mut_ptr().add(8 * h), a[h]);
                s.store(carry.b.as_mut_ptr().add(8 * h), b[h]);
            }
        }
        (carry.ta, carry.tb) = (self.ta, self.tb);
    }

    /// Lanes `l` and `l + 8` added, folded by [`fold_lanes`], the scalar part added last.
    #[inline(always)]
    fn finish(self, s: S) -> (f64, f64) {
        (
            fold_lanes(s.lanes(s.add(self.a.0, self.a.1))) + self.ta,
            fold_lanes(s.lanes(s.add(self.b.0, self.b.1))) + self.tb,
        )
    }
}

/// Adds Σ x over the run of `n` elements at `p` to `acc` (two vector accumulators and a scalar
/// one).
///
/// # Safety
/// `p` must be valid for reading `n` elements.
#[inline(always)]
unsafe fn run_sum<S: Simd, T: Element>(s: S, p: *const T, n: usize, acc: &mut (S::V, S::V, f64)) {
    let (mut a0, mut a1, mut tail) = *acc;
    let mut i = 0;
    // SAFETY: every read below is of element i < n (caller's contract).
    unsafe {
        while i + 16 <= n {
            a0 = s.add(a0, s.load(p.add(i)));
            a1 = s.add(a1, s.load(p.add(i + 8)));
            i += 16;
        }
        if i + 8 <= n {
            a0 = s.add(a0, s.load(p.add(i)));
            i += 8;
        }
        while i < n {
            tail += (*p.add(i)).to_f64();
            i += 1;
        }
    }
    *acc = (a0, a1, tail);
}

/// Copies the elements of the run of `n` elements at `p` whose bits (`bits`, the run's first
/// element first) are set to `out`, in order; returns their number. `ahead(i)` is called once per
/// 56-element step (to prefetch what a later run reads; it must not change the result).
///
/// # Safety
/// `p` must be valid for reading `n` elements, `out` for writing `n`, and `bits` must hold the
/// run's `n` elements.
#[inline(always)]
unsafe fn pack_run<S: Simd, T: Element>(
    s: S,
    p: *const T,
    n: usize,
    bits: SpanBits,
    out: *mut T,
    ahead: impl Fn(usize),
) -> usize {
    let (mut i, mut k) = (0, 0);
    // SAFETY: reads of elements i..i + 8 ≤ n or i < n of the run, and of the bits of elements
    // i < n; k ≤ i, so the writes of out[k..k + 8] (k + 8 ≤ i + 8 ≤ n) and out[k] lie inside
    // `out` (caller's contract).
    unsafe {
        while i + 56 <= n {
            ahead(i);
            let word = bits.get56(i);
            for g in 0..7 {
                k += s.pack8(p.add(i + 8 * g), (word >> (8 * g)) as u8, out.add(k));
            }
            i += 56;
        }
        while i + 8 <= n {
            k += s.pack8(p.add(i), bits.get56(i) as u8, out.add(k));
            i += 8;
        }
        while i < n {
            *out.add(k) = *p.add(i);
            k += (bits.get56(i) & 1) as usize;
            i += 1;
        }
    }
    k
}

/// Where the values of the parts of some runs that a mask selects lane by lane are packed
/// (see [`runs_sum`]): room for all the runs' elements, and the number packed of each part
/// (nothing without a mask).
struct Packed<T> {
    buffers: Option<(Scratch<f64>, Scratch<u32>)>,
    _elements: std::marker::PhantomData<T>,
}

impl<T: Element> Packed<T> {
    /// Room for `n` elements with a mask (`masked`), none without.
    #[inline(always)]
    fn new(n: usize, masked: bool) -> Self {
        let words = (n * std::mem::size_of::<T>()).div_ceil(8);
        Packed {
            buffers: masked.then(|| (Scratch::any(words), Scratch::with_capacity(0))),
            _elements: std::marker::PhantomData,
        }
    }

    /// The buffer as elements (null without a mask): `f64`-aligned (more than any element type
    /// needs), with room for the `n` elements it was made for. Elements are only read where
    /// they were written.
    #[inline(always)]
    fn ptr(&mut self) -> *mut T {
        self.buffers
            .as_mut()
            .map_or(std::ptr::null_mut(), |(words, _)| words.as_mut_ptr() as *mut T)
    }

    /// Records that `n` elements of a part were packed.
    #[inline(always)]
    fn push(&mut self, n: usize) {
        self.buffers.as_mut().expect("packed with a mask").1.push(n as u32);
    }

    /// The numbers packed, part by part.
    #[inline(always)]
    fn lens(&self) -> &[u32] {
        self.buffers.as_ref().map_or(&[], |(_, lens)| &lens[..])
    }
}

/// Σ x over the elements of `runs` that `mask` (`None`: all of them) has on, widened to `f64`,
/// and their number. Parts that the mask selects whole are summed in place; the elements that
/// are on of a part with some off are first packed into `packed` (part after part, each one's
/// number pushed to its `lens`) and summed there, as a run of their own: no value of an element
/// that is off is read into the sum, and none costs a select.
///
/// # Safety
/// `runs` must lie inside the buffer at `x`; `packed` must have room for `runs.total()`
/// elements.
#[inline(always)]
unsafe fn runs_sum<S: Simd, T: Element>(
    s: S,
    x: *const T,
    runs: Runs,
    mask: Option<MaskedLanes>,
    packed: &mut Packed<T>,
) -> (f64, usize) {
    let mut acc = (s.splat(0.0), s.splat(0.0), 0.0);
    let (mut count, mut at, out) = (0, 0, packed.ptr());
    for k in 0..runs.count {
        runs.prefetch_next(x, k);
        let p = x.wrapping_add(runs.first + k * runs.stride);
        // SAFETY: run k lies inside the buffer (caller's contract), the part inside the run;
        // the parts packed hold at most the runs' elements, for which `packed` has room.
        each_part(
            mask,
            k,
            runs.len,
            #[inline(always)]
            |r, bits| unsafe {
                let (p, n) = (p.add(r.start), r.len());
                match bits {
                    None => {
                        run_sum(s, p, n, &mut acc);
                        count += n;
                    }
                    Some(bits) => {
                        // Long runs: the packing prefetches the first share of the next piece's
                        // part, the centered pass the rest (see `pack_share`); short runs have
                        // their next run prefetched whole (`prefetch_next`).
                        let kept = if runs.long::<T>() {
                            let (ahead, share) = (runs.ahead(x, k, r.start), Share::new(pack_share::<T>(n), n));
                            pack_run(
                                s,
                                p,
                                n,
                                bits,
                                out.add(at),
                                #[inline(always)]
                                |i| share.prefetch(ahead, i, 56),
                            )
                        } else {
                            pack_run(s, p, n, bits, out.add(at), |_| {})
                        };
                        run_sum(s, out.add(at), kept, &mut acc);
                        packed.push(kept);
                        (count, at) = (count + kept, at + kept);
                    }
                }
            },
        );
    }
    (fold_lanes(s.lanes(s.add(acc.0, acc.1))) + acc.2, count)
}

/// Adds (Σ(x − m), Σ(x − m)²) over the run of `n` elements at `p` to `acc`, calling
/// `ahead(i)` once per 16-element step (to prefetch what a later pass reads).
///
/// # Safety
/// `p` must be valid for reading `n` elements.
#[inline(always)]
unsafe fn run_centered<S: Simd, T: Element>(
    s: S,
    p: *const T,
    n: usize,
    m: f64,
    acc: &mut Sums2<S>,
    ahead: impl Fn(usize),
) {
    let mv = s.splat(m);
    // SAFETY: the caller's contract; the closures are called with i..i + 8 ≤ n, or i < n, so
    // they read inside the run.
    unsafe {
        acc.add_run(
            s,
            n,
            AllLanes,
            #[inline(always)]
            |i, _| {
                let d = s.sub(s.load(p.add(i)), mv);
                (d, d)
            },
            #[inline(always)]
            |i| {
                let d = (*p.add(i)).to_f64() - m;
                (d, d)
            },
            ahead,
        );
    }
}

/// (Σ(x − m), Σ(x − m)²) over the elements of `runs` that `mask` (`None`: all of them) has on:
/// the parts it selects whole in place, the others from `packed` as [`runs_sum`] left them.
///
/// # Safety
/// `runs` must lie inside the buffer at `x`; `packed` must be what [`runs_sum`] made of them
/// with the same mask.
#[inline(always)]
unsafe fn runs_centered<S: Simd, T: Element>(
    s: S,
    x: *const T,
    runs: Runs,
    m: f64,
    mask: Option<MaskedLanes>,
    packed: &mut Packed<T>,
) -> (f64, f64) {
    let mut acc = Sums2::new(s);
    let (mut at, out) = (0, packed.ptr() as *const T);
    let mut lens = packed.lens().iter();
    for k in 0..runs.count {
        let p = x.wrapping_add(runs.first + k * runs.stride);
        // SAFETY: run k lies inside the buffer (caller's contract), the part inside the run;
        // a packed part's elements were written by `runs_sum`.
        // The next piece is read from memory next: its loads overlap this pass, which reads
        // the piece the sums just brought into cache.
        each_part(
            mask,
            k,
            runs.len,
            #[inline(always)]
            |r, bits| unsafe {
                let ahead = runs.ahead(x, k, r.start);
                match bits {
                    None => run_centered(
                        s,
                        p.add(r.start),
                        r.len(),
                        m,
                        &mut acc,
                        #[inline(always)]
                        |i| prefetch_step(ahead, i),
                    ),
                    Some(_) => {
                        let n = *lens.next().expect("a part packed by the sums") as usize;
                        // The part's steps cover its packed elements, fewer than its own: each
                        // prefetches its share of what the packing left of the next piece's
                        // part (see `Share`); in short runs, `ratio` steps of that part (which
                        // may reach past it: its plane is followed by the next channel's, read
                        // soon after while the tensor is small).
                        if runs.long::<T>() {
                            let first = pack_share::<T>(r.len());
                            let (share, ahead) = (Share::new(r.len() - first, n), ahead.wrapping_add(first));
                            run_centered(
                                s,
                                out.add(at),
                                n,
                                m,
                                &mut acc,
                                #[inline(always)]
                                |i| share.prefetch(ahead, i, 16),
                            );
                        } else {
                            let ratio = r.len().div_ceil(n.max(1));
                            run_centered(
                                s,
                                out.add(at),
                                n,
                                m,
                                &mut acc,
                                #[inline(always)]
                                |i| {
                                    for j in 0..ratio {
                                        prefetch_step(ahead, ratio * i + 16 * j)
                                    }
                                },
                            );
                        }
                        at += n;
                    }
                }
            },
        );
    }
    acc.finish(s)
}

#[inline(always)]
pub(super) fn runs_moments_impl<S: Simd, T: Element>(s: S, x: &[T], runs: Runs, mask: Option<MaskedLanes>) -> Moments {
    runs.check(x.len());
    let mut packed = Packed::new(runs.total(), mask.is_some());
    // SAFETY: checked just above; `packed` has room for the runs' elements.
    let (sum, count) = unsafe { runs_sum(s, x.as_ptr(), runs, mask, &mut packed) };
    if count == 0 {
        return Moments::EMPTY;
    }
    let n = count as f64;
    let m = sum / n;
    // SAFETY: as above, `packed` as the sums left it.
    let (d1, d2) = unsafe { runs_centered(s, x.as_ptr(), runs, m, mask, &mut packed) };
    let m2 = d2 - d1 * d1 / n;
    Moments {
        count: n,
        mean: m + d1 / n,
        m2: if m2 < 0.0 { 0.0 } else { m2 },
    }
}

simd_dispatch! {
    /// Moments of `runs` of `x` (one piece of a channels-first channel) by the corrected
    /// two-pass algorithm: mean first, then centered sums with the rounding error of the mean
    /// corrected. The piece is small enough to stay in cache between the passes, so memory is
    /// read once. With `mask`, over the elements it has on, part by part ([`MaskedLanes`]):
    /// parts it selects entirely take the unmasked loop, parts with a few elements off the same
    /// loop over their elements that are on, packed (so the values of the others are never
    /// read into a sum), the rest is skipped; no element: [`Moments::EMPTY`]. With every
    /// element on, the same bits as without a mask.
    pub(crate) fn runs_moments<T>(x: &[T], runs: Runs, mask: Option<MaskedLanes>) -> Moments => runs_moments_impl
}

/// Adds (Σ g, Σ g·(x − m)) over the elements of the runs of `n` elements at `px` and `pg` that
/// `lanes` has on to `acc`, with g the upstream gradient `u` makes of dy (read at `pg`),
/// prefetching the `n` elements at `ahead.0` and `ahead.1` on the way (null: none).
///
/// # Safety
/// `px` and `pg` must be valid for reading `n` elements, and `u` made for those `n`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn run_grad_sums<S: Simd, T: Element, L: Lanes<S>, U: ElementMap<T>>(
    s: S,
    px: *const T,
    pg: *const T,
    n: usize,
    m: f64,
    lanes: L,
    u: U,
    ahead: (*const T, *const T),
    acc: &mut Sums2<S>,
) {
    let mv = s.splat(m);
    // SAFETY: the caller's contract (`lanes` is the run's); the closures are called with
    // i..i + 8 ≤ n, or i < n, so they read inside the run.
    unsafe {
        acc.add_run(
            s,
            n,
            lanes,
            #[inline(always)]
            |i, on| {
                let g = lanes.keep(s, on, u.wide8(s, i, s.load(pg.add(i))));
                (g, lanes.keep(s, on, s.sub(s.load(px.add(i)), mv)))
            },
            #[inline(always)]
            |i| (u.wide1(i, (*pg.add(i)).to_f64()), (*px.add(i)).to_f64() - m),
            #[inline(always)]
            |i| {
                prefetch_step(ahead.0, i);
                prefetch_step(ahead.1, i);
            },
        );
    }
}

/// What a gradient-sums pass over runs reads: `runs` of `x` and `dy`, the mean `m` the sums are
/// centered on, the lanes `mask` has on (`None`: all of them) and, behind a fused ReLU, the bits
/// of its mask over the whole tensor (`relu`: the sums are then of the upstream gradient).
#[derive(Clone, Copy)]
pub(crate) struct GradRuns<'a, T> {
    pub x: &'a [T],
    pub dy: &'a [T],
    pub runs: Runs,
    pub m: f64,
    pub mask: Option<MaskedLanes<'a>>,
    pub relu: Option<MaskBits<'a>>,
}

#[inline(always)]
pub(super) fn runs_grad_sums_impl<S: Simd, T: Element>(s: S, r: GradRuns<'_, T>) -> (f64, f64) {
    let mut acc = Sums2::new(s);
    runs_grad_sums_into(s, r, &mut acc);
    acc.finish(s)
}

/// Adds the terms of [`runs_grad_sums`] to `acc`.
#[inline(always)]
fn runs_grad_sums_into<S: Simd, T: Element>(s: S, r: GradRuns<'_, T>, acc: &mut Sums2<S>) {
    match r.relu {
        None => runs_grad_sums_with(s, r, |_, _| Plain, acc),
        Some(bits) => runs_grad_sums_with(s, r, |o, n| Gated::new(bits.at(o, n)), acc),
    }
}

/// [`runs_grad_sums_into`] with the upstream gradient `upstream(o, n)` makes of dy for the `n`
/// elements from element `o` on (in place of `r.relu`'s).
#[inline(always)]
fn runs_grad_sums_with<S: Simd, T: Element, U: ElementMap<T>>(
    s: S,
    r: GradRuns<'_, T>,
    upstream: impl Fn(usize, usize) -> U,
    acc: &mut Sums2<S>,
) {
    let GradRuns {
        x, dy, runs, m, mask, ..
    } = r;
    runs.check(x.len());
    runs.check(dy.len());
    let (xp, gp) = (x.as_ptr(), dy.as_ptr());
    for k in 0..runs.count {
        runs.prefetch_next(xp, k);
        runs.prefetch_next(gp, k);
        let o = runs.first + k * runs.stride;
        // SAFETY: every run lies inside both buffers (checked above), the part inside the run.
        for_each_part!(mask, k, runs.len, |lanes, r| unsafe {
            let (o, n) = (o + r.start, r.len());
            // One piece ahead: more loads in flight than the hardware prefetchers keep.
            let ahead = (runs.ahead(xp, k, r.start), runs.ahead(gp, k, r.start));
            run_grad_sums(s, xp.add(o), gp.add(o), n, m, lanes, upstream(o, n), ahead, acc)
        });
    }
}

simd_dispatch! {
    /// (Σ dy, Σ dy·(x − m)) over `r.runs` of `r.x` and `r.dy`; with `r.mask`, over the elements
    /// it has on (as [`runs_moments`]: dy and x − m of the others replaced by +0.0 lane by lane,
    /// or skipped; with every element on, the same bits as without). With `r.relu`, of the
    /// upstream gradient dy·\[kept\] instead.
    pub(crate) fn runs_grad_sums<T>(r: GradRuns<'_, T>) -> (f64, f64) => runs_grad_sums_impl
}

#[inline(always)]
pub(super) fn runs_grad_sums_upstream_impl<S: Simd, T: Element>(
    s: S,
    r: GradRuns<'_, T>,
    dz: UpstreamOut<T>,
) -> (f64, f64) {
    let bits = r.relu.expect("the sums of a fused ReLU's upstream gradient");
    assert!(r.mask.is_none(), "no fused pass takes a mask over positions");
    let (runs, gp) = (r.runs, r.dy.as_ptr());
    runs.check(r.dy.len());
    runs.check(dz.len());
    let mut acc = Sums2::new(s);
    // SAFETY (closures and the loop): the runs lie in dy and dz (checked above), whose elements
    // there are the caller's alone (`UpstreamOut::new`); without a mask each run is taken whole
    // by one map (8 elements at a time from its start, then one at a time), then finished.
    if dz.streams() {
        let gated = |o: usize, n: usize| unsafe { dz.run::<true>(o, bits.at(o, n), gp.add(o)) };
        runs_grad_sums_with(s, r, gated, &mut acc);
        for k in 0..runs.count {
            let o = runs.first + k * runs.stride;
            unsafe { dz.finish_run(o, runs.len, bits.at(o, runs.len), gp.add(o)) };
        }
    } else {
        let gated = |o: usize, n: usize| unsafe { dz.run::<false>(o, bits.at(o, n), gp.add(o)) };
        runs_grad_sums_with(s, r, gated, &mut acc);
    }
    acc.finish(s)
}

simd_dispatch! {
    /// [`runs_grad_sums`] of the upstream gradient behind a fused ReLU (`r.relu`, without a
    /// mask), which is also stored to `dz` at the elements of the runs (see
    /// [`GatedOut`]): the same sums, bit for bit.
    pub(crate) fn runs_grad_sums_upstream<T>(r: GradRuns<'_, T>, dz: UpstreamOut<T>) -> (f64, f64) => runs_grad_sums_upstream_impl
}

/// The accumulators of a [`runs_grad_sums`] reduction between two calls of
/// [`runs_grad_sums_carried`]: the lanes of its two vector accumulators and its scalar ones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GradCarry {
    a: [f64; 16],
    b: [f64; 16],
    ta: f64,
    tb: f64,
}

impl GradCarry {
    /// Nothing added yet.
    pub const ZERO: GradCarry = GradCarry {
        a: [0.0; 16],
        b: [0.0; 16],
        ta: 0.0,
        tb: 0.0,
    };

    /// (Σ dy, Σ dy·(x − m)) of everything added, folded as [`runs_grad_sums`] folds its own.
    pub fn finish(&self) -> (f64, f64) {
        let s = super::simd::Scalar;
        Sums2::resume(s, self).finish(s)
    }
}

#[inline(always)]
pub(super) fn runs_grad_sums_carried_impl<S: Simd, T: Element>(s: S, r: GradRuns<'_, T>, carry: &mut GradCarry) {
    let mut acc = Sums2::resume(s, carry);
    runs_grad_sums_into(s, r, &mut acc);
    acc.suspend(s, carry);
}

simd_dispatch! {
    /// [`runs_grad_sums`] continued from `carry` and left in it, unfolded: runs taken in
    /// several calls, each carrying on from the last, add the same terms in the same order as
    /// one call over all of them, so [`GradCarry::finish`] gives the same bits. A run may also
    /// be cut in two at a multiple of 16 elements from its start (a whole number of the loop's
    /// steps), without a mask.
    pub(crate) fn runs_grad_sums_carried<T>(r: GradRuns<'_, T>, carry: &mut GradCarry) => runs_grad_sums_carried_impl
}

/// Channels whose across-rows accumulators are updated together over all rows of a block before
/// moving to the next channels: with many channels (e.g. 4096) a whole row of `f64` accumulators
/// (two of them per channel) would not stay in L1 between rows. Each channel's sum is
/// still taken row by row, so the tile size changes no bit.
pub(crate) const CHANNEL_TILE: usize = 256;

/// Rows whose terms are added to a register copy of the accumulators before it is stored back
/// (still row by row per channel, so no bit changes): fewer stores and reloads of the
/// accumulators per row, at the cost of registers; with the one-pass moments, 4 rows beat 1 for
/// every channel count of the benchmarks (figures in `docs/tuning-log.md`).
const ROW_GROUP: usize = 4;

/// Reading `G` rows at a time interleaves `G` runs inside one or two pages when rows are short,
/// an order the hardware stream prefetchers do not follow: the reductions then prefetch the next
/// group's lines themselves (see `plan::prefetch_rows` for when).
#[derive(Clone, Copy)]
pub(crate) struct RowPrefetch {
    /// Whether to prefetch at all.
    pub on: bool,
    /// Channels per cache line (64 bytes of the element type).
    pub line: usize,
}

#[cfg(test)]
impl RowPrefetch {
    pub const OFF: RowPrefetch = RowPrefetch { on: false, line: 8 };
}

/// Accumulates over `rows` rows, in row order, vectorized across channels, tile by tile of
/// `tile` channels (a multiple of 8; each tile over all rows before the next): `step(r, c, a, b)`
/// returns the accumulators (a, b) of channels c..c+8 updated with row r, `one(r, c, a, b)` those
/// of channel c alone; `G` rows at a time per register copy of the accumulators.
/// With `pf.on`, `ahead(r, c)` (prefetch the line of row r at column c) is called for the next
/// group's rows once per `pf.line` channels (a cache line); that loop is a separate copy, so the
/// other has no trace of it. `after(r, c)` is called for each row r of a group once `step` has
/// taken channels c..c+8 of all of them (not for the channels `one` takes).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_accumulate2<S: Simd, const G: usize>(
    s: S,
    rows: usize,
    tile: usize,
    acc_a: &mut [f64],
    acc_b: &mut [f64],
    step: impl Fn(usize, usize, S::V, S::V) -> (S::V, S::V),
    one: impl Fn(usize, usize, f64, f64) -> (f64, f64),
    pf: RowPrefetch,
    ahead: impl Fn(usize, usize),
    after: impl Fn(usize, usize),
) {
    if pf.on {
        rows_accumulate2_with::<S, G, true>(s, rows, tile, acc_a, acc_b, step, one, pf.line, ahead, after);
    } else {
        rows_accumulate2_with::<S, G, false>(s, rows, tile, acc_a, acc_b, step, one, pf.line, ahead, after);
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_accumulate2_with<S: Simd, const G: usize, const PREFETCH: bool>(
    s: S,
    rows: usize,
    tile: usize,
    acc_a: &mut [f64],
    acc_b: &mut [f64],
    step: impl Fn(usize, usize, S::V, S::V) -> (S::V, S::V),
    one: impl Fn(usize, usize, f64, f64) -> (f64, f64),
    line: usize,
    ahead: impl Fn(usize, usize),
    after: impl Fn(usize, usize),
) {
    let channels = acc_a.len();
    assert_eq!(acc_b.len(), channels);
    assert!(line.is_power_of_two());
    let line_mask = line - 1;
    let c8 = channels - channels % 8;
    let (pa, pb) = (acc_a.as_mut_ptr(), acc_b.as_mut_ptr());
    let mut t = 0;
    while t < c8 {
        let te = (t + tile).min(c8);
        let mut r = 0;
        while r < rows {
            let group = G.min(rows - r);
            let prefetch = PREFETCH && r + G + group <= rows;
            let mut c = t;
            while c < te {
                if prefetch && c & line_mask == 0 {
                    for q in r + G..r + G + group {
                        ahead(q, c);
                    }
                }
                // SAFETY: c + 8 <= c8 <= channels = acc_a.len() = acc_b.len().
                unsafe {
                    let mut va = s.load(pa.add(c) as *const f64);
                    let mut vb = s.load(pb.add(c) as *const f64);
                    if group == G {
                        // A constant trip count: unrolled.
                        for k in 0..G {
                            (va, vb) = step(r + k, c, va, vb);
                        }
                    } else {
                        for q in r..r + group {
                            (va, vb) = step(q, c, va, vb);
                        }
                    }
                    s.store(pa.add(c), va);
                    s.store(pb.add(c), vb);
                }
                // After the group's reads at c, so that its stores (the epilogue's) do not come
                // between reads of the same column of the group's rows: rows a multiple of 4 KiB
                // apart would make each such read wait on the store before it (4K aliasing).
                if group == G {
                    for k in 0..G {
                        after(r + k, c);
                    }
                } else {
                    for q in r..r + group {
                        after(q, c);
                    }
                }
                c += 8;
            }
            r += group;
        }
        t = te;
    }
    for r in 0..rows {
        for c in c8..channels {
            (acc_a[c], acc_b[c]) = one(r, c, acc_a[c], acc_b[c]);
        }
    }
}

/// Which rows of a block enter a reduction, in order: all of them ([`AllRows`]) or those of a
/// list ([`OnRows`]: the rows whose mask entry is true), so that the loops over rows take only
/// the rows that enter, without a test per row. With [`AllRows`] every method folds away.
pub(crate) trait RowSet: Copy {
    /// Number of rows that enter, of a block of `rows`.
    fn count(self, rows: usize) -> usize;
    /// The `q`-th row that enters (`q` < [`RowSet::count`]).
    fn row(self, q: usize) -> usize;
    /// The row to prefetch when the loops prefetch for the `q`-th row that enters (`None`:
    /// none): that row itself, or one further ahead where the rows are scattered.
    fn prefetched(self, q: usize) -> Option<usize>;
}

/// Every row enters.
#[derive(Clone, Copy)]
pub(crate) struct AllRows;

impl RowSet for AllRows {
    #[inline(always)]
    fn count(self, rows: usize) -> usize {
        rows
    }
    #[inline(always)]
    fn row(self, q: usize) -> usize {
        q
    }
    #[inline(always)]
    fn prefetched(self, q: usize) -> Option<usize> {
        Some(q)
    }
}

/// The rows of a list enter (increasing row numbers).
#[derive(Clone, Copy)]
pub(crate) struct OnRows<'a>(&'a [u32]);

impl RowSet for OnRows<'_> {
    #[inline(always)]
    fn count(self, _: usize) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn row(self, q: usize) -> usize {
        self.0[q] as usize
    }
    #[inline(always)]
    fn prefetched(self, q: usize) -> Option<usize> {
        self.0.get(q + SCATTERED_AHEAD).map(|&r| r as usize)
    }
}

/// Rows that enter a reduction scattered among rows that do not are a pattern the hardware
/// prefetchers do not follow: the loops prefetch them this many rows (of those that enter)
/// further ahead than the next group, with [`RowPrefetch`] on whatever the row size.
const SCATTERED_AHEAD: usize = 2 * ROW_GROUP;

/// Runs `f` with the rows whose entry of `mask` is true, as an [`OnRows`], and `pf` with
/// prefetching on (see [`SCATTERED_AHEAD`]).
#[inline(always)]
fn with_on_rows<R>(mask: &[bool], pf: RowPrefetch, f: impl FnOnce(OnRows, RowPrefetch) -> R) -> R {
    let mut rows = Scratch::<u32>::with_capacity(mask.len());
    rows.extend(mask.iter().enumerate().filter(|&(_, &on)| on).map(|(r, _)| r as u32));
    f(OnRows(&rows), RowPrefetch { on: true, ..pf })
}

/// Moments of the rows of a block that `set` has on; returns their number (0: no row, and
/// `mean`, `m2` are zeros).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_moments_of<S: Simd, T: Element, R: RowSet>(
    s: S,
    x: &[T],
    channels: usize,
    mean: &mut [f64],
    m2: &mut [f64],
    shift: &mut [f64],
    pf: RowPrefetch,
    set: R,
) -> f64 {
    let rows = x.len() / channels;
    assert!(
        rows > 0
            && mean.len() == channels
            && m2.len() == channels
            && shift.len() == channels
            && rows * channels == x.len()
    );
    mean.fill(0.0);
    m2.fill(0.0);
    let n = set.count(rows);
    if n == 0 {
        return 0.0;
    }
    let first = set.row(0);
    for (k, v) in shift.iter_mut().zip(&x[first * channels..]) {
        *k = v.to_f64();
    }
    let (xp, kp) = (x.as_ptr(), shift.as_ptr());
    // The closures are inlined by force: one that is not compiles without the caller's AVX2.
    // SAFETY (closures): the row r < rows (a row of the set) and c + 8 <= channels (or
    // c < channels), so every read is inside x (asserted above) and `shift`.
    rows_accumulate2::<S, ROW_GROUP>(
        s,
        n,
        CHANNEL_TILE,
        mean,
        m2,
        #[inline(always)]
        |q: usize, c: usize, a: S::V, b: S::V| {
            let r = set.row(q);
            let d = unsafe { s.sub(s.load(xp.add(r * channels + c)), s.load(kp.add(c))) };
            (s.add(a, d), s.mul_add(d, d, b))
        },
        #[inline(always)]
        |q: usize, c: usize, a: f64, b: f64| {
            let r = set.row(q);
            let d = unsafe { (*xp.add(r * channels + c)).to_f64() - *kp.add(c) };
            (a + d, d.mul_add(d, b))
        },
        pf,
        #[inline(always)]
        |q: usize, c: usize| {
            if let Some(r) = set.prefetched(q) {
                prefetch_line(xp.wrapping_add(r * channels + c))
            }
        },
        #[inline(always)]
        |_: usize, _: usize| {},
    );
    let n = n as f64;
    // Divided by n, or multiplied by its exact reciprocal (the same bits, no division: a block
    // of a power of two of rows, as the rows plan's blocks and ghost groups usually are).
    match exact_reciprocal(n) {
        Some(r) => finish_rows(mean, m2, shift, |v| v * r),
        None => finish_rows(mean, m2, shift, |v| v / n),
    }
    n
}

/// The end of [`rows_moments_of`]: from the sums of d = x − k (in `mean`) and of d² (in `m2`),
/// mean = k + Σd/n and M2 = Σd² − (Σd)²/n (negative rounding clamped to 0), with `over_n(v)` =
/// v/n.
#[inline(always)]
fn finish_rows(mean: &mut [f64], m2: &mut [f64], shift: &[f64], over_n: impl Fn(f64) -> f64) {
    for ((m, s2), &k) in mean.iter_mut().zip(m2.iter_mut()).zip(shift.iter()) {
        let s1 = *m;
        *m = k + over_n(s1);
        let v = *s2 - over_n(s1 * s1);
        *s2 = if v < 0.0 { 0.0 } else { v };
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn rows_moments_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    mask: Option<&[bool]>,
    channels: usize,
    mean: &mut [f64],
    m2: &mut [f64],
    shift: &mut [f64],
    pf: RowPrefetch,
) -> f64 {
    match mask {
        None => rows_moments_of(s, x, channels, mean, m2, shift, pf, AllRows),
        Some(mask) => {
            assert_eq!(mask.len() * channels, x.len());
            with_on_rows(mask, pf, |on, pf| {
                rows_moments_of(s, x, channels, mean, m2, shift, pf, on)
            })
        }
    }
}

simd_dispatch! {
    /// Per-channel moments of a block of rows (`x.len() = rows × channels`, channels
    /// contiguous, rows ≥ 1) in one pass, vectorized across channels: with the shift k = the
    /// block's first row (a value of each channel), the sums of d = x − k (exact in `f64` for
    /// `f32` data) and d² give mean = k + Σd/n and M2 = Σd² − (Σd)²/n. Because k is one of the
    /// values, n·(mean − k)² ≤ n·M2, so Σd² ≤ (n + 1)·M2 and the cancellation costs at most a
    /// factor n + 1 on the `f64` rounding of Σd² (typically a few units: k is a typical value),
    /// never E[x²] − E[x]²'s (mean/σ)². Writes the block's mean and M2 per channel; `shift` is
    /// scratch of `channels` entries. Returns n.
    ///
    /// With `mask` (one entry per row), over the rows whose entry is true (the shift is the
    /// first of them); the others are skipped, so their values never reach the result; with none
    /// on, n = 0 and zeros; with every row on, the same bits as without.
    pub(crate) fn rows_moments<T>(
        x: &[T], mask: Option<&[bool]>, channels: usize, mean: &mut [f64], m2: &mut [f64], shift: &mut [f64],
        pf: RowPrefetch
    ) -> f64 => rows_moments_impl
}

/// Merges a block's per-channel moments (all with `count_b` values) into accumulators holding
/// `count_a` values per channel. Vectorized across channels; same formula as [`Moments::merge`]
/// (a block of no values changes nothing, whatever its `mean_b` and `m2_b` hold).
#[inline(always)]
pub(crate) fn merge_rows(
    count_a: f64,
    mean_a: &mut [f64],
    m2_a: &mut [f64],
    count_b: f64,
    mean_b: &[f64],
    m2_b: &[f64],
) {
    if count_b == 0.0 {
        return;
    }
    if count_a == 0.0 {
        mean_a.copy_from_slice(mean_b);
        m2_a.copy_from_slice(m2_b);
        return;
    }
    let count = count_a + count_b;
    let wb = count_b / count;
    let wab = count_a * count_b / count;
    for (((ma, sa), &mb), &sb) in mean_a.iter_mut().zip(m2_a.iter_mut()).zip(mean_b).zip(m2_b) {
        let delta = mb - *ma;
        *ma += delta * wb;
        *sa = *sa + sb + delta * delta * wab;
    }
}

/// Work a rows reduction does in its own loop on each 8 elements of a row it has just read,
/// while they are in registers or L1: the backward through fixed statistics writes dx there (see
/// `plan::fixed`), so that the block is not walked a second time.
pub(crate) trait RowsEpilogue: Copy {
    /// Called once the reduction has taken elements `i..i + 8` of the block (channels
    /// `c..c + 8` of one row), for each 8 of them exactly once, in the reduction's order (a
    /// group of rows' column c after the group's reads there).
    ///
    /// # Safety
    /// `i + 8` is at most the block's length (the caller's contract with the implementation).
    unsafe fn after8<S: Simd>(self, s: S, i: usize, c: usize);
}

/// No epilogue: the reduction alone.
#[derive(Clone, Copy)]
pub(crate) struct NoEpilogue;

impl RowsEpilogue for NoEpilogue {
    #[inline(always)]
    unsafe fn after8<S: Simd>(self, _: S, _: usize, _: usize) {}
}

/// (Σ g, Σ g·(x − m)) per channel over the rows of a block that `set` has on, accumulated
/// into `sum_dy`, `sum_dy_xmu`, with g the upstream gradient `u` (made for the block) makes of dy.
/// `e` runs after each 8 elements the vector loop takes (with an epilogue, the channels must
/// be a multiple of 8, so that the loop takes every element).
///
/// The channels go in tiles of `tile` (a multiple of 8; [`CHANNEL_TILE`] but in the frozen
/// backward's one loop): each channel's sum is taken row by row, in row order, whatever the
/// tile, so the tile changes no bit. A tile of the whole row walks the block in memory order, a
/// group of rows at a time, with the accumulators of the whole row (16 bytes per channel) read
/// and written once per group.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_grad_sums_of<S: Simd, T: Element, R: RowSet, U: ElementMap<T>, E: RowsEpilogue>(
    s: S,
    x: &[T],
    dy: &[T],
    mean: &[f64],
    sum_dy: &mut [f64],
    sum_dy_xmu: &mut [f64],
    pf: RowPrefetch,
    set: R,
    u: U,
    e: E,
    tile: usize,
) {
    let channels = mean.len();
    let rows = x.len() / channels;
    assert!(
        sum_dy.len() == channels && sum_dy_xmu.len() == channels && rows * channels == x.len() && dy.len() == x.len()
    );
    let (xp, gp, mp) = (x.as_ptr(), dy.as_ptr(), mean.as_ptr());
    // The closures are inlined by force (see `rows_moments_of`).
    // SAFETY (closures): the row r < rows (a row of the set) and c + 8 <= channels (or
    // c < channels), inside x, dy and mean (asserted above).
    rows_accumulate2::<S, ROW_GROUP>(
        s,
        set.count(rows),
        tile,
        sum_dy,
        sum_dy_xmu,
        #[inline(always)]
        |q: usize, c: usize, a: S::V, b: S::V| unsafe {
            let r = set.row(q);
            let g = u.wide8(s, r * channels + c, s.load(gp.add(r * channels + c)));
            let d = s.sub(s.load(xp.add(r * channels + c)), s.load(mp.add(c)));
            (s.add(a, g), s.mul_add(g, d, b))
        },
        #[inline(always)]
        |q: usize, c: usize, a: f64, b: f64| unsafe {
            let r = set.row(q);
            let g = u.wide1(r * channels + c, (*gp.add(r * channels + c)).to_f64());
            (a + g, g.mul_add((*xp.add(r * channels + c)).to_f64() - mean[c], b))
        },
        pf,
        #[inline(always)]
        |q: usize, c: usize| {
            if let Some(r) = set.prefetched(q) {
                prefetch_line(xp.wrapping_add(r * channels + c));
                prefetch_line(gp.wrapping_add(r * channels + c));
            }
        },
        #[inline(always)]
        // SAFETY: the row r < rows, c + 8 <= channels: r·channels + c + 8 <= x.len().
        |q: usize, c: usize| unsafe { e.after8(s, set.row(q) * channels + c, c) },
    );
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn rows_grad_sums_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    dy: &[T],
    mask: Option<&[bool]>,
    mean: &[f64],
    sum_dy: &mut [f64],
    sum_dy_xmu: &mut [f64],
    pf: RowPrefetch,
    relu: Option<BitsAt>,
) {
    match (mask, relu) {
        (None, None) => rows_grad_sums_of(
            s,
            x,
            dy,
            mean,
            sum_dy,
            sum_dy_xmu,
            pf,
            AllRows,
            Plain,
            NoEpilogue,
            CHANNEL_TILE,
        ),
        (None, Some(bits)) => {
            let u = Gated::new(bits);
            rows_grad_sums_of(
                s,
                x,
                dy,
                mean,
                sum_dy,
                sum_dy_xmu,
                pf,
                AllRows,
                u,
                NoEpilogue,
                CHANNEL_TILE,
            )
        }
        (Some(mask), None) => {
            assert_eq!(mask.len() * mean.len(), x.len());
            with_on_rows(mask, pf, |on, pf| {
                rows_grad_sums_of(
                    s,
                    x,
                    dy,
                    mean,
                    sum_dy,
                    sum_dy_xmu,
                    pf,
                    on,
                    Plain,
                    NoEpilogue,
                    CHANNEL_TILE,
                )
            })
        }
        (Some(_), Some(_)) => unreachable!("no fused pass takes a mask over positions"),
    }
}

simd_dispatch! {
    /// Per-channel (Σ dy, Σ dy·(x − m)) over a block of rows, accumulated into `sum_dy`,
    /// `sum_dy_xmu`; with `mask` (one entry per row), over the rows whose entry is true (the
    /// others are skipped, so neither their x nor their dy reaches the sums). With `relu` (a
    /// fused ReLU's mask bits of the block), of the upstream gradient dy·\[kept\] instead.
    pub(crate) fn rows_grad_sums<T>(
        x: &[T], dy: &[T], mask: Option<&[bool]>, mean: &[f64], sum_dy: &mut [f64], sum_dy_xmu: &mut [f64],
        pf: RowPrefetch, relu: Option<BitsAt>
    ) => rows_grad_sums_impl
}

#[cfg(test)]
mod tests {
    use super::Share;

    /// The steps of a loop over `steps` ≥ `step` elements (`step` a step, as the loops call
    /// them) take each line start of a run of `len` elements once, in order, none at or beyond
    /// `len`, and exactly one step is the last.
    #[test]
    fn shares_cover_each_line_once() {
        for len in [0usize, 1, 15, 16, 17, 100, 196, 3136, 4000, 8192] {
            for steps in [16usize, 17, 55, 56, 57, 98, 100, 1568, 1600, 4100, 8192] {
                for (step, line) in [(16, 16), (56, 16), (16, 8), (56, 32)] {
                    if steps < step {
                        // No whole step: the loop prefetches nothing.
                        continue;
                    }
                    let share = Share::new(len, steps);
                    let (mut starts, mut lasts, mut i) = (Vec::new(), 0, 0);
                    while i + step <= steps {
                        let (range, last) = share.lines(i, step, line);
                        starts.extend(range.step_by(line));
                        lasts += last as usize;
                        i += step;
                    }
                    let want: Vec<usize> = (0..len).step_by(line).collect();
                    assert_eq!(starts, want, "len {len}, steps {steps}, step {step}, line {line}");
                    assert_eq!(lasts, 1, "len {len}, steps {steps}, step {step}");
                }
            }
        }
    }
}
