//! Work plans: how a tensor is cut into units, and the passes that run over them.
//!
//! Two plans cover every layout:
//! - **planes** (`inner > 1`, channels-first): a unit is one channel's planes (or, when there are
//!   fewer than [`MIN_PARALLEL_CHANNELS`] channels, a fixed block of them). A channel's planes are
//!   cut into pieces of at most [`PIECE`] elements (part of a large plane, or several small planes
//!   together) whose moments come from a two-pass scan in cache.
//!   With one unit per channel, training passes are *fused*: a channel's statistics and its
//!   normalization (or its gradient sums and dx) run back to back while its data is still in
//!   cache, so memory is streamed twice instead of three (five) times.
//! - **rows** (`inner == 1`: `NC`, `NHWC`, channels-last): a unit is a fixed block of
//!   [`TASK`] / channels rows, itself scanned in cache-sized blocks of rows ([`ROWS_BLOCK`]),
//!   vectorized across channels.
//!
//! Unit boundaries and merge order depend only on the geometry, so results are bitwise identical
//! for any thread count. Outputs of [`STREAM_BYTES`] or more are written with non-temporal stores
//! (no read-for-ownership, no eviction of the inputs); short runs far apart are prefetched.

use super::elementwise::{self as ew, DxCoeffs, DxRows, RowsAffine, RowsScale, WideAffine};
use super::mask::{self, segment, MaskSpans, Span};
use super::moments::{self, GradRuns, MaskedLanes, Moments, RowPrefetch, Runs};
use super::relu::{self, Act, BitLayout, BitsAt, MaskBits, UpstreamOut};
use super::scratch::Scratch;
use super::with_simd;
use crate::args::Scope;
use crate::{Element, Geometry};
use rayon::prelude::*;

mod fixed;
mod groups;
pub(crate) use fixed::{fixed_backward_where, FixedBackward};
pub(crate) use groups::{
    fuses_planes, ghost_planes_backward, ghost_planes_forward, ghost_train_backward, ghost_train_forward, GroupMoments,
};

/// Elements of one in-cache piece (32 KiB of `f32`).
pub(crate) const PIECE: usize = 8192;
/// Elements of one parallel task (1 MiB of `f32`).
pub(crate) const TASK: usize = 1 << 18;
/// Below this many elements everything runs on the calling thread.
pub(crate) const SERIAL_BELOW: usize = 1 << 15;
/// With at least this many channels, channels-first units are whole channels (and passes fuse).
pub(crate) const MIN_PARALLEL_CHANNELS: usize = 16;
/// Fewest rows of a block of the rows plan: each block costs a few operations per channel (shift,
/// finish, merge), which for wide rows weigh against few rows of work, so wide rows want more
/// rows per block; the one-pass moments' cancellation bound grows with the block's rows
/// (n + 1 ≤ 65, on `f64` rounding), which caps it.
const MIN_BLOCK_ROWS: usize = 64;
/// Elements of a block of the rows plan (128 KiB of `f32`), whose moments are computed in one
/// shifted pass and merged with Chan's formula: 4× fewer per-block merges than with
/// [`PIECE`]-sized blocks.
const ROWS_BLOCK: usize = 1 << 15;
/// Outputs of at least this many bytes are written with streaming (non-temporal) stores: they do
/// not fit in the last-level cache beside their inputs, so caching them only evicts the inputs.
const STREAM_BYTES: usize = LAST_LEVEL_CACHE_BYTES / 2;

/// Rows of this many bytes up to [`PREFETCH_ROW_BELOW`] have the rows plan's reductions prefetch
/// the next group of rows, when the tensor has at least [`PREFETCH_ROWS_BYTES`] (see
/// [`RowPrefetch`]). Shorter rows make a group one contiguous run, which the hardware prefetchers
/// follow; rows of a page or more are one page-long run each, which they follow too, and
/// prefetching more lines at a multiple of the page stride only crowds the same L1 sets.
const PREFETCH_ROW_MIN: usize = 512;
/// See [`PREFETCH_ROW_MIN`].
const PREFETCH_ROW_BELOW: usize = 4096;
/// Tensors of at least this many bytes come from the last-level cache or memory, not the
/// private L2, in the rows plan's reductions.
const PREFETCH_ROWS_BYTES: usize = 8 << 20;

/// Whether the rows plan's reductions over `g` prefetch the next group of rows: only for rows
/// the hardware prefetchers do not follow (see [`PREFETCH_ROW_MIN`]) of tensors that come from
/// beyond L2; elsewhere the extra instructions cost more than they hide.
fn prefetch_rows<T>(g: &Geometry) -> RowPrefetch {
    let size = std::mem::size_of::<T>();
    let row = g.channels * size;
    RowPrefetch {
        on: (PREFETCH_ROW_MIN..PREFETCH_ROW_BELOW).contains(&row) && g.len() * size >= PREFETCH_ROWS_BYTES,
        line: 64 / size,
    }
}

/// The size of the last-level cache the work plans assume, in bytes: a tunable of the machine,
/// not of the algorithm (results are the same bits for any value).
///
/// It decides one thing: whether a pass whose inputs an earlier pass has just read writes its
/// output with streaming (non-temporal) stores, because output and re-read inputs together
/// would not fit in this cache (caching the output would evict the inputs while the pass reads
/// them). Set too small, mid-sized outputs bypass a cache they would have fit in and the next
/// pass reads them back from memory; set too large, outputs evict the inputs the pass is
/// reading. The default, 32 MiB, is the L3 of the machine the kernels were tuned on; set it to
/// the L3 (or the share of it one process gets) of the machine they run on.
pub const LAST_LEVEL_CACHE_BYTES: usize = 32 << 20;

/// Whether the output of a pass over `g` is written with streaming stores: when it alone is
/// [`STREAM_BYTES`] or more, or when it and the `reread` inputs, which an earlier pass has just
/// read, overflow the last-level cache ([`LAST_LEVEL_CACHE_BYTES`]; caching the output would
/// evict the inputs while the pass reads them).
fn stream_output<T>(g: &Geometry, reread: usize) -> bool {
    let bytes = g.len() * std::mem::size_of::<T>();
    bytes >= STREAM_BYTES || (reread + 1) * bytes > LAST_LEVEL_CACHE_BYTES
}

/// Prefetches the bytes of a ReLU mask (`bits`, in `layout` over the channels-first `g`) that
/// hold plane (`o`, `c`): a channel's unit goes through its planes `C` segments apart, so each
/// plane's few lines would start cold, and a store that misses holds up the stores behind it.
#[inline(always)]
fn prefetch_mask_plane(bits: *const u8, layout: BitLayout, g: &Geometry, o: usize, c: usize) {
    moments::prefetch(bits.wrapping_add((o * g.channels + c) * layout.bytes), layout.bytes);
}

/// Asserts that a pass is not both masked (masked batch norm) and fused with a ReLU: no public
/// function combines them, and the mask's spans and the ReLU's bits are not written for it.
fn unmasked_if_fused(mask: Option<&[bool]>, fused: bool) {
    assert!(mask.is_none() || !fused, "no fused pass takes a mask over positions");
}

/// The start of an element-wise pass over `g` that writes its output at the positions `mask`
/// has on, or fused with a ReLU (`fused`), never both ([`unmasked_if_fused`]): whether it runs on
/// the calling thread ([`is_serial`]) and whether it streams its output ([`stream_output`] after
/// `reread` inputs): `(serial, stream)`.
fn begin_pass<T>(g: &Geometry, mask: Option<&[bool]>, fused: bool, reread: usize) -> (bool, bool) {
    unmasked_if_fused(mask, fused);
    (is_serial(g), stream_output::<T>(g, reread))
}

/// A mutable buffer written by parallel units at disjoint places.
struct SharedOut<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: units get disjoint sub-slices (see `slice`), as with `chunks_mut`.
unsafe impl<T: Send> Sync for SharedOut<'_, T> {}

impl<'a, T> SharedOut<'a, T> {
    fn new(buf: &'a mut [T]) -> Self {
        SharedOut {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// `buf[start..start + len]`.
    ///
    /// # Safety
    /// No two slices alive at the same time may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start <= self.len && len <= self.len - start);
        // SAFETY: in bounds (asserted); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Per-channel statistics as computed by the kernels: `count` values per channel.
pub(crate) struct ChannelMoments {
    pub count: f64,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

/// Maps `f` over `items` on the rayon pool, or serially for small tensors; results keep item order.
fn map_items<I: Send, R: Send>(items: Vec<I>, serial: bool, f: impl Fn(usize, I) -> R + Sync + Send) -> Vec<R> {
    if serial {
        items
            .into_iter()
            .enumerate()
            .map(|(u, it)| with_simd(|| f(u, it)))
            .collect()
    } else {
        items
            .into_par_iter()
            .enumerate()
            .map(|(u, it)| with_simd(|| f(u, it)))
            .collect()
    }
}

fn is_serial(g: &Geometry) -> bool {
    g.len() < SERIAL_BELOW
}

/// Planes plan: blocks per channel and planes per block.
fn plane_blocks(g: &Geometry) -> (usize, usize) {
    let blocks = if g.channels >= MIN_PARALLEL_CHANNELS {
        1
    } else {
        MIN_PARALLEL_CHANNELS.div_ceil(g.channels).min(g.outer)
    };
    let per_block = g.outer.div_ceil(blocks);
    (g.outer.div_ceil(per_block), per_block)
}

/// Rows plan: rows per task and rows per in-cache block.
fn row_blocks(g: &Geometry) -> (usize, usize) {
    let per_task = (TASK / g.channels).max(1);
    let per_block = (ROWS_BLOCK / g.channels).max(MIN_BLOCK_ROWS).min(per_task);
    (per_task, per_block)
}

/// Elements of the segments every element-wise pass over `g` writes as wholes, each in one
/// unit: a plane (channels-first), or a task's rows (rows plan; the last one may be shorter).
/// A fused ReLU's mask is laid out in them (`relu::BitLayout`), so that no two units write into
/// one byte of it.
pub(crate) fn write_segment(g: &Geometry) -> usize {
    match g.inner {
        1 => row_blocks(g).0 * g.channels,
        inner => inner,
    }
}

/// The in-cache pieces of planes `planes` of channel `c`, in order: runs of at most [`PIECE`]
/// elements of one plane, or as many whole planes as fit in [`PIECE`] elements.
#[inline(always)]
fn for_each_piece(g: &Geometry, c: usize, planes: std::ops::Range<usize>, mut f: impl FnMut(Runs)) {
    if g.inner >= PIECE {
        for o in planes {
            let start = (o * g.channels + c) * g.inner;
            let mut j = 0;
            while j < g.inner {
                let len = PIECE.min(g.inner - j);
                f(Runs {
                    first: start + j,
                    count: 1,
                    len,
                    stride: 0,
                });
                j += len;
            }
        }
    } else {
        let per_piece = PIECE / g.inner;
        let mut o = planes.start;
        while o < planes.end {
            let count = per_piece.min(planes.end - o);
            f(Runs {
                first: (o * g.channels + c) * g.inner,
                count,
                len: g.inner,
                stride: g.channels * g.inner,
            });
            o += count;
        }
    }
}

/// `f(c, planes)` for every channel `c` and block of its planes (see [`plane_blocks`]), through
/// [`map_items`]; returns the results, channel after channel with its blocks in order, and the
/// number of blocks per channel.
fn map_plane_blocks<R: Send>(
    g: &Geometry,
    serial: bool,
    f: impl Fn(usize, std::ops::Range<usize>) -> R + Sync + Send,
) -> (Vec<R>, usize) {
    let (blocks, per_block) = plane_blocks(g);
    let units: Vec<usize> = (0..g.channels * blocks).collect();
    let parts = map_items(units, serial, |_, u| {
        let (c, b) = (u / blocks, u % blocks);
        f(c, b * per_block..((b + 1) * per_block).min(g.outer))
    });
    (parts, blocks)
}

/// The mask entries (`None`: no mask) of `runs` of a channels-first tensor (see
/// [`for_each_piece`]): segment o of `spans` holds plane o's, entry i for element `(o, c, i)`.
#[inline(always)]
fn masked_lanes<'a>(g: &Geometry, spans: Option<&'a MaskSpans<'a>>, runs: Runs) -> Option<MaskedLanes<'a>> {
    let (o, i) = (runs.first / (g.channels * g.inner), runs.first % g.inner);
    // Several runs are whole consecutive planes of the channel.
    debug_assert!(runs.count <= 1 || (i == 0 && runs.stride == g.channels * g.inner));
    spans.map(|s| MaskedLanes::new(s, o, i, runs))
}

/// The entries of a mask over positions (`None`: no mask) that the `len` elements from element
/// `start` of a rows-plan tensor (whole rows, `inner` = 1) use: one per row.
#[inline(always)]
fn rows_mask<'a>(g: &Geometry, mask: Option<&'a [bool]>, start: usize, len: usize) -> Option<&'a [bool]> {
    mask.map(|m| &m[start / g.channels..(start + len) / g.channels])
}

/// Writes `out` where a mask allows (`mask`: a segment's entries and [`Span`]s, entry k covering
/// elements `k·width..(k + 1)·width`; `None`: all of `out` at once): `f(range, &mut out[range],
/// stream)` over each span that is on, then +0.0 over the elements of the entries that are off
/// inside it (a select: nothing computed there is kept; `stream` is false for such spans, so that
/// the kernel's stores are ordinary ones); +0.0 over each span that is off, whose inputs are not
/// read, streamed where the pass streams (`stream`, as in [`write_gated`]).
#[inline(always)]
fn write_where<T: Element>(
    mask: Option<(&[bool], &[Span])>,
    width: usize,
    out: &mut [T],
    stream: bool,
    mut f: impl FnMut(std::ops::Range<usize>, &mut [T], bool),
) {
    let Some((mask, spans)) = mask else {
        let n = out.len();
        return f(0..n, out, stream);
    };
    let zero = T::from_f64(0.0);
    for &Span { start, end, on, gaps } in spans {
        let r = start * width..end * width;
        if !on {
            ew::zero_fill(&mut out[r], stream);
            continue;
        }
        f(r.clone(), &mut out[r.clone()], stream && !gaps);
        match (gaps, width) {
            (false, _) => {}
            // Branch-free, so that it vectorizes: one entry per element.
            (true, 1) => {
                for (o, &on) in out[r].iter_mut().zip(&mask[start..end]) {
                    *o = if on { *o } else { zero };
                }
            }
            (true, _) => {
                for (o, &on) in out[r].chunks_mut(width).zip(&mask[start..end]) {
                    if !on {
                        o.fill(zero);
                    }
                }
            }
        }
    }
}

/// A segment of a mask over positions as [`write_gated`] takes it: its spans and the bits of its
/// entries, or (`rows`) one entry per row of `width` elements.
#[derive(Clone, Copy)]
struct GatedSegment<'a> {
    spans: &'a MaskSpans<'a>,
    segment: usize,
    width: usize,
}

/// The segment `i` of `spans` (`None`: no mask) for [`write_gated`], each entry covering `width`
/// elements.
fn gated_segment<'a>(spans: &'a Option<MaskSpans<'a>>, i: usize, width: usize) -> Option<GatedSegment<'a>> {
    spans.as_ref().map(|spans| GatedSegment {
        spans,
        segment: i,
        width,
    })
}

/// Writes `out` where a mask allows (`mask`: a segment, entry k covering elements
/// `k·width..(k + 1)·width`; `None`: all of `out` at once): `f(range, &mut out[range], keep)`
/// over each span that is on, with `keep` the bits of the range's elements where it has gaps
/// (the kernel then writes +0.0 at the elements that are off in the same stores, so nothing
/// computed there is kept) and `None` where it has none; +0.0 over each span that is off, whose
/// inputs are not read, with streaming stores where the pass streams (`stream`: its output would
/// not stay in cache, so ordinary stores would read each line from memory first).
#[inline(always)]
fn write_gated<T: Element>(
    mask: Option<GatedSegment>,
    out: &mut [T],
    stream: bool,
    mut f: impl FnMut(std::ops::Range<usize>, &mut [T], Option<BitsAt>),
) {
    let Some(GatedSegment { spans, segment, width }) = mask else {
        let n = out.len();
        return f(0..n, out, None);
    };
    let (entries, list) = spans.segment(segment);
    let mut rows = Vec::new();
    for &Span { start, end, on, gaps } in list {
        let r = start * width..end * width;
        match (on, gaps, width) {
            (false, ..) => ew::zero_fill(&mut out[r], stream),
            (true, false, _) => f(r.clone(), &mut out[r], None),
            (true, true, 1) => f(r.clone(), &mut out[r], Some(spans.bits_at(segment, start, end))),
            (true, true, _) => {
                mask::row_bits(&entries[start..end], width, &mut rows);
                let layout = BitLayout {
                    len: r.len(),
                    bytes: r.len().div_ceil(8),
                    segments: 1,
                };
                let keep = MaskBits { bytes: &rows, layout }.at(0, r.len());
                f(r.clone(), &mut out[r], Some(keep))
            }
        }
    }
}

/// Moments of planes `planes` of channel `c` (of the positions `mask` has on, when given; its
/// segments are the planes), pieces merged left in order.
#[inline(always)]
fn planes_moments<T: Element>(
    g: &Geometry,
    x: &[T],
    mask: Option<&MaskSpans>,
    c: usize,
    planes: std::ops::Range<usize>,
) -> Moments {
    let mut acc = Moments::EMPTY;
    for_each_piece(g, c, planes, |runs| {
        acc = acc.merge(moments::runs_moments(x, runs, masked_lanes(g, mask, runs)))
    });
    acc
}

/// Moments of one rows task (`x` holds whole rows; `mask`, when given, one entry per row
/// saying which enter), blocks merged left in order into `mean` and `m2` (one entry per
/// channel); returns the task's count of rows that entered (with none, `mean` and `m2` hold
/// zeros).
#[inline(always)]
fn rows_task_moments<T: Element>(
    x: &[T],
    mask: Option<&[bool]>,
    per_block: usize,
    pf: RowPrefetch,
    mean: &mut [f64],
    m2: &mut [f64],
) -> f64 {
    let channels = mean.len();
    let mut count = 0.0;
    // Every entry is written by `rows_moments`.
    let mut block = Scratch::any(3 * channels);
    let (bm, rest) = block.split_at_mut(channels);
    let (bm2, shift) = rest.split_at_mut(channels);
    for (b, rows) in x.chunks(per_block * channels).enumerate() {
        let first = b * per_block;
        let mask = mask.map(|m| &m[first..first + rows.len() / channels]);
        if count == 0.0 {
            // Merged into nothing, a block's moments are copied: written in place instead.
            count = moments::rows_moments(rows, mask, channels, mean, m2, shift, pf);
            continue;
        }
        let n = moments::rows_moments(rows, mask, channels, bm, bm2, shift, pf);
        moments::merge_rows(count, mean, m2, n, bm, bm2);
        count += n;
    }
    count
}

/// Per-channel moments of the positions `mask` (one entry per position, `o·inner + i`) has on,
/// or of the whole tensor without a mask; with every position on, the same bits as without.
/// A channel with no position on has count, mean and M2 0.
pub(crate) fn channel_moments_where<T: Element>(g: &Geometry, x: &[T], mask: Option<&[bool]>) -> ChannelMoments {
    let serial = is_serial(g);
    if g.inner > 1 {
        let spans = MaskSpans::new(mask, g.inner);
        let (parts, blocks) = map_plane_blocks(g, serial, |c, planes| planes_moments(g, x, spans.as_ref(), c, planes));
        let mut out = ChannelMoments {
            count: 0.0,
            mean: Vec::with_capacity(g.channels),
            m2: Vec::with_capacity(g.channels),
        };
        for chunk in parts.chunks(blocks) {
            let m = chunk.iter().fold(Moments::EMPTY, |a, &b| a.merge(b));
            out.count = m.count;
            out.mean.push(m.mean);
            out.m2.push(m.m2);
        }
        out
    } else {
        let (per_task, per_block) = row_blocks(g);
        let pf = prefetch_rows::<T>(g);
        let c = g.channels;
        // Each task's (mean, m2) goes to its own part of one buffer of the calling thread.
        let mut parts = Scratch::any(2 * c * g.outer.div_ceil(per_task));
        let tasks: Vec<(&[T], &mut [f64])> = x.chunks(per_task * c).zip(parts.chunks_mut(2 * c)).collect();
        let counts = map_items(tasks, serial, |u, (t, part)| {
            let (mean, m2) = part.split_at_mut(c);
            let rows = u * per_task..u * per_task + t.len() / c;
            rows_task_moments(t, mask.map(|m| &m[rows]), per_block, pf, mean, m2)
        });
        let (mut mean, mut m2) = (vec![0.0; c], vec![0.0; c]);
        let count = merge_task_moments(&counts, &parts, &mut mean, &mut m2);
        ChannelMoments { count, mean, m2 }
    }
}

/// The moments of a rows-plan tensor from its tasks' (`counts`, and `parts`: per task, the mean
/// and then the M2 of every channel), the tasks merged left in order into `mean` and `m2` (one
/// entry per channel, zeros); returns the count.
fn merge_task_moments(counts: &[f64], parts: &[f64], mean: &mut [f64], m2: &mut [f64]) -> f64 {
    let channels = mean.len();
    let mut total = 0.0;
    for (&count, part) in counts.iter().zip(parts.chunks(2 * channels)) {
        let (part_mean, part_m2) = part.split_at(channels);
        moments::merge_rows(total, mean, m2, count, part_mean, part_m2);
        total += count;
    }
    total
}

/// y = (x − mean[c])·scale[c] + shift[c] over the whole tensor.
///
/// Units are taken last to first: after a pass over x in order (the statistics), the data read
/// last is what the caches still hold, and a second pass in the same order would evict it just
/// before reaching it when x is about the size of the last-level cache. Element-wise, so no bit
/// changes.
pub(crate) fn normalize<T: Element>(g: &Geometry, x: &[T], y: &mut [T], mean: &[f64], scale: &[f64], shift: &[f64]) {
    normalize_where(g, x, y, mean, scale, shift, None, None)
}

/// [`normalize`] at the positions `mask` (one entry per position) has on, +0.0 at the others
/// (see [`write_gated`]); each element that is on computed as without a mask. With `relu`
/// (never with a mask), fused with what follows batch norm in the same pass (see `relu`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn normalize_where<T: Element>(
    g: &Geometry,
    x: &[T],
    y: &mut [T],
    mean: &[f64],
    scale: &[f64],
    shift: &[f64],
    mask: Option<&[bool]>,
    relu: Option<relu::Forward<'_, T>>,
) {
    let (serial, stream) = begin_pass::<T>(g, mask, relu.is_some(), 0);
    let layout = BitLayout::new(g);
    if g.inner > 1 {
        let chunk = (TASK / g.inner).max(1) * g.inner;
        let spans = MaskSpans::new(mask, g.inner);
        let acts = relu::Forward::split(relu, chunk / g.inner, layout);
        let mut items: Vec<_> = x.chunks(chunk).zip(y.chunks_mut(chunk)).zip(acts).enumerate().collect();
        items.reverse();
        map_items(items, serial, |_, (u, ((xs, ys), mut act))| {
            let first_plane = u * (chunk / g.inner);
            for (i, (xp, yp)) in xs.chunks(g.inner).zip(ys.chunks_mut(g.inner)).enumerate() {
                let (o, c) = ((first_plane + i) / g.channels, (first_plane + i) % g.channels);
                let a = WideAffine {
                    mean: mean[c],
                    scale: scale[c],
                    shift: shift[c],
                };
                let mut act = act.as_mut().map(|f| f.segment(i, g.inner, layout));
                write_gated(gated_segment(&spans, o, 1), yp, stream, |r, yr, keep| match keep {
                    Some(keep) => ew::normalize_plane_kept(&xp[r], yr, a, stream, keep),
                    None => ew::normalize_plane(&xp[r], yr, a, stream, act.take()),
                });
            }
            if stream {
                ew::stream_fence();
            }
        });
    } else {
        let p = with_simd(|| RowsAffine::new::<T>(mean, scale, shift));
        let chunk = row_blocks(g).0 * g.channels;
        let spans = MaskSpans::new(mask, chunk / g.channels);
        let acts = relu::Forward::split(relu, 1, layout);
        let mut items: Vec<_> = x.chunks(chunk).zip(y.chunks_mut(chunk)).zip(acts).enumerate().collect();
        items.reverse();
        map_items(items, serial, |_, (u, ((xs, ys), mut act))| {
            let mut act = act.as_mut().map(|f| f.segment(0, xs.len(), layout));
            write_gated(
                gated_segment(&spans, u, g.channels),
                ys,
                stream,
                |r, yr, keep| match keep {
                    Some(keep) => ew::normalize_rows_kept(&xs[r], yr, &p, stream, keep),
                    None => ew::normalize_rows(&xs[r], yr, &p, stream, act.take()),
                },
            );
            if stream {
                ew::stream_fence();
            }
        });
    }
}

/// Training forward over the positions `mask` (one entry per position, `None`: all of them) has
/// on: per-channel moments as [`channel_moments_where`], then `affine(first, mean, scale, shift)`
/// turns the biased variances of channels `first..first + scale.len()`, given in `scale`, into
/// their (scale, shift), given their means (batch renormalization's constants depend on them),
/// and y is written as [`normalize_where`] (+0.0 where the mask is off; with `relu`, fused with
/// what follows). Fused per channel when the plan allows (see module docs); the statistics are
/// the same bits as [`channel_moments_where`] either way. There must be at least one position on.
pub(crate) fn train_forward_where<T: Element>(
    g: &Geometry,
    x: &[T],
    y: &mut [T],
    mask: Option<&[bool]>,
    relu: Option<relu::Forward<'_, T>>,
    affine: impl Fn(usize, &[f64], &mut [f64], &mut [f64]) + Sync + Send,
) -> ChannelMoments {
    if g.inner > 1 && plane_blocks(g).0 == 1 {
        assert_eq!(y.len(), x.len());
        unmasked_if_fused(mask, relu.is_some());
        // A fused unit re-reads its channel from L2, not from the last-level cache.
        let stream = stream_output::<T>(g, 0);
        let prefetch_out = !stream && g.inner * std::mem::size_of::<T>() <= moments::PREFETCH_BYTES;
        let spans = MaskSpans::new(mask, g.inner);
        let out = SharedOut::new(y);
        let layout = BitLayout::new(g);
        let fused = relu.is_some();
        let (z, bits) = match relu {
            Some(relu::Forward { z, bits }) => (z, bits.map(SharedOut::new)),
            None => (None, None),
        };
        let parts = map_items((0..g.channels).collect(), is_serial(g), |c, _: usize| {
            let m = planes_moments(g, x, spans.as_ref(), c, 0..g.outer);
            let (mut scale, mut shift) = ([m.m2 / m.count], [0.0]);
            affine(c, &[m.mean], &mut scale, &mut shift);
            let a = WideAffine {
                mean: m.mean,
                scale: scale[0],
                shift: shift[0],
            };
            for o in 0..g.outer {
                let start = (o * g.channels + c) * g.inner;
                if prefetch_out && o + 1 < g.outer {
                    moments::prefetch(out.ptr.wrapping_add(start + g.channels * g.inner), g.inner);
                }
                if let (Some(b), true) = (&bits, o + 1 < g.outer) {
                    prefetch_mask_plane(b.ptr, layout, g, o + 1, c);
                }
                // SAFETY: plane (o, c) belongs to unit c alone.
                let yp = unsafe { out.slice(start, g.inner) };
                let xp = &x[start..start + g.inner];
                let mut act = fused.then(|| Act {
                    z: z.map(|z| &z[start..start + g.inner]),
                    // The channel's next plane, C planes on, where z comes from memory (a tensor
                    // that streams its output); the last plane and a tensor in cache: none.
                    z_ahead: match stream && o + 1 < g.outer {
                        true => (g.channels * g.inner) as isize,
                        false => 0,
                    },
                    // SAFETY: plane (o, c) is segment o·C + c; its bytes belong to unit c alone.
                    bits: bits
                        .as_ref()
                        .map(|b| unsafe { b.slice((o * g.channels + c) * layout.bytes, layout.bytes) }),
                });
                write_gated(gated_segment(&spans, o, 1), yp, stream, |r, yr, keep| match keep {
                    Some(keep) => ew::normalize_plane_kept(&xp[r], yr, a, stream, keep),
                    None => ew::normalize_plane(&xp[r], yr, a, stream, act.take()),
                });
            }
            if stream {
                ew::stream_fence();
            }
            m
        });
        ChannelMoments {
            count: parts[0].count,
            mean: parts.iter().map(|m| m.mean).collect(),
            m2: parts.iter().map(|m| m.m2).collect(),
        }
    } else {
        let m = channel_moments_where(g, x, mask);
        let mut scale = Scratch::collect(m.m2.iter().map(|s| s / m.count));
        let mut shift = Scratch::any(g.channels);
        with_simd(|| affine(0, &m.mean, &mut scale, &mut shift));
        normalize_where(g, x, y, &m.mean, &scale, &shift, mask, relu);
        m
    }
}

/// (Σ dy, Σ dy·(x − m)) of planes `planes` of channel `c` (of the positions `mask` has on, when
/// given; its segments are the planes; with `relu`, of dy·\[kept\], also stored to `dz` at
/// those planes when given), piece sums added in order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn planes_grad_sums<T: Element>(
    g: &Geometry,
    x: &[T],
    dy: &[T],
    mask: Option<&MaskSpans>,
    relu: Option<MaskBits>,
    dz: Option<UpstreamOut<T>>,
    c: usize,
    m: f64,
    planes: std::ops::Range<usize>,
) -> (f64, f64) {
    let (mut a, mut b) = (0.0, 0.0);
    for_each_piece(g, c, planes, |runs| {
        let mask = masked_lanes(g, mask, runs);
        let r = GradRuns {
            x,
            dy,
            runs,
            m,
            mask,
            relu,
        };
        let (s1, s2) = match dz {
            None => moments::runs_grad_sums(r),
            Some(dz) => moments::runs_grad_sums_upstream(r, dz),
        };
        a += s1;
        b += s2;
    });
    (a, b)
}

/// Per-channel (Σ dy, Σ dy·(x − mean)) over the positions `mask` (one entry per position,
/// `None`: all of them) has on: neither x nor dy of the others is read into the sums. With every
/// position on, the same bits as without a mask. With `relu` (a fused ReLU's mask bits; never
/// with a mask), of the upstream gradient dy·\[kept\].
pub(crate) fn grad_sums_where<T: Element>(
    g: &Geometry,
    x: &[T],
    dy: &[T],
    mean: &[f64],
    mask: Option<&[bool]>,
    relu: Option<MaskBits>,
) -> (Vec<f64>, Vec<f64>) {
    let serial = is_serial(g);
    if g.inner > 1 {
        let spans = MaskSpans::new(mask, g.inner);
        let (parts, blocks) = map_plane_blocks(g, serial, |c, planes| {
            planes_grad_sums(g, x, dy, spans.as_ref(), relu, None, c, mean[c], planes)
        });
        add_block_sums(&parts, blocks)
    } else {
        let c = g.channels;
        let chunk = row_blocks(g).0 * c;
        let pf = prefetch_rows::<T>(g);
        // Each task's (Σ dy, Σ dy(x − m)) goes to its own part of one buffer of the calling thread.
        let mut parts = Scratch::any(2 * c * x.len().div_ceil(chunk));
        let items: Vec<((&[T], &[T]), &mut [f64])> = x
            .chunks(chunk)
            .zip(dy.chunks(chunk))
            .zip(parts.chunks_mut(2 * c))
            .collect();
        map_items(items, serial, |u, ((xs, gs), part)| {
            // Zeroed here, by the task, in its own cache, rather than by the caller up front.
            part.fill(0.0);
            let (s1, s2) = part.split_at_mut(c);
            let rows = rows_mask(g, mask, u * chunk, xs.len());
            let bits = relu.map(|b| b.at(u * chunk, xs.len()));
            moments::rows_grad_sums(xs, gs, rows, mean, s1, s2, pf, bits);
        });
        add_task_sums(&parts, c)
    }
}

/// The per-channel (Σ dy, Σ dy·(x − m)) of the planes plan from its units' (`blocks` per
/// channel, channel after channel), each channel's blocks added in order.
fn add_block_sums(parts: &[(f64, f64)], blocks: usize) -> (Vec<f64>, Vec<f64>) {
    parts
        .chunks(blocks)
        .map(|ch| ch.iter().fold((0.0, 0.0), |(a, b), &(p, q)| (a + p, b + q)))
        .unzip()
}

/// The per-channel (Σ dy, Σ dy·(x − m)) of the rows plan from its tasks' (`parts`: per task,
/// `channels` of each), the tasks added in order.
fn add_task_sums(parts: &[f64], channels: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut s1, mut s2) = (vec![0.0; channels], vec![0.0; channels]);
    add_task_sums_into(parts, &mut s1, &mut s2);
    (s1, s2)
}

/// [`add_task_sums`] into `s1` and `s2` (one entry per channel, zeros).
fn add_task_sums_into(parts: &[f64], s1: &mut [f64], s2: &mut [f64]) {
    let channels = s1.len();
    for part in parts.chunks(2 * channels) {
        let (p, q) = part.split_at(channels);
        s1.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        s2.iter_mut().zip(q).for_each(|(a, b)| *a += b);
    }
}

/// Training-mode dx from per-channel coefficients, at the positions `mask` (one entry per
/// position, `None`: all of them) has on, +0.0 at the others (see [`write_gated`]). It
/// always follows a pass over x and dy (the gradient sums), so both count as re-read for the
/// streaming decision, and it takes its units last to first (see [`normalize`]). With `relu`
/// (never with a mask), from the upstream gradient dy·\[kept\], written to dz too when it has one.
pub(crate) fn input_grad_where<T: Element>(
    g: &Geometry,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    coeffs: &[DxCoeffs],
    scope: Scope<'_, relu::Backward<'_, T>>,
) {
    let (serial, stream) = begin_pass::<T>(g, scope.mask, scope.relu.is_some(), 2);
    let (chunk, segment_len) = match g.inner {
        1 => (row_blocks(g).0 * g.channels, row_blocks(g).0),
        _ => ((TASK / g.inner).max(1) * g.inner, g.inner),
    };
    let spans = MaskSpans::new(scope.mask, segment_len);
    let backs = relu::Backward::split(scope.relu, chunk, x.len());
    let mut items: Vec<_> = x
        .chunks(chunk)
        .zip(dy.chunks(chunk))
        .zip(dx.chunks_mut(chunk))
        .zip(backs)
        .enumerate()
        .collect();
    items.reverse();
    if g.inner > 1 {
        map_items(items, serial, |_, (u, (((xs, gs), os), mut back))| {
            let first_plane = u * (chunk / g.inner);
            let planes = xs.chunks(g.inner).zip(gs.chunks(g.inner)).zip(os.chunks_mut(g.inner));
            for (i, ((xp, gp), op)) in planes.enumerate() {
                let (o, c) = ((first_plane + i) / g.channels, (first_plane + i) % g.channels);
                let mut back = back
                    .as_mut()
                    .map(|b| b.part(u * chunk + i * g.inner, i * g.inner, g.inner));
                write_gated(gated_segment(&spans, o, 1), op, stream, |r, or, keep| match keep {
                    Some(keep) => ew::dx_plane_kept(&xp[r.clone()], &gp[r], or, coeffs[c], stream, keep),
                    None => ew::dx_plane(&xp[r.clone()], &gp[r], or, coeffs[c], stream, back.take()),
                });
            }
            if stream {
                ew::stream_fence();
            }
        });
    } else {
        let p = with_simd(|| DxRows::new::<T>(coeffs));
        map_items(items, serial, |_, (u, (((xs, gs), os), mut back))| {
            let mut back = back.as_mut().map(|b| b.part(u * chunk, 0, xs.len()));
            write_gated(
                gated_segment(&spans, u, g.channels),
                os,
                stream,
                |r, or, keep| match keep {
                    Some(keep) => ew::dx_rows_kept(&xs[r.clone()], &gs[r], or, &p, stream, keep),
                    None => ew::dx_rows(&xs[r.clone()], &gs[r], or, &p, stream, back.take()),
                },
            );
            if stream {
                ew::stream_fence();
            }
        });
    }
}

/// Training backward: per-channel gradient sums, then `coeffs(first, Σdy, Σdy(x−m), out)` writes
/// the dx coefficients of channels `first..first + out.len()` and, when `dx` is given, dx is
/// written. Fused per channel when the plan allows; the sums are the same bits as
/// [`grad_sums_where`] either way. Returns (Σdy, Σdy(x−m)).
pub(crate) fn train_backward<T: Element>(
    g: &Geometry,
    x: &[T],
    dy: &[T],
    dx: Option<&mut [T]>,
    mean: &[f64],
    coeffs: impl Fn(usize, &[f64], &[f64], &mut [DxCoeffs]) + Sync + Send,
) -> (Vec<f64>, Vec<f64>) {
    train_backward_where(g, x, dy, dx, mean, None, None, coeffs)
}

/// [`train_backward`] over the positions `mask` (one entry per position) has on: sums as
/// [`grad_sums_where`], dx as [`input_grad_where`] (+0.0 where the mask is off). With `relu`
/// (never with a mask), from the upstream gradient dy·\[kept\]; its dz is written by the passes
/// that write dx (the gradient sums' loop where a channel's passes are fused, else the dx pass),
/// and must come with it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_backward_where<T: Element>(
    g: &Geometry,
    x: &[T],
    dy: &[T],
    dx: Option<&mut [T]>,
    mean: &[f64],
    mask: Option<&[bool]>,
    relu: Option<relu::Backward<'_, T>>,
    coeffs: impl Fn(usize, &[f64], &[f64], &mut [DxCoeffs]) + Sync + Send,
) -> (Vec<f64>, Vec<f64>) {
    unmasked_if_fused(mask, relu.is_some());
    assert!(
        dx.is_some() || relu.as_ref().is_none_or(|r| r.dz.is_none()),
        "dz comes with dx"
    );
    let bits = relu.as_ref().map(|r| r.bits);
    match dx {
        Some(dx) if g.inner > 1 && plane_blocks(g).0 == 1 => {
            assert!(dx.len() == x.len() && dy.len() == x.len());
            // A fused unit re-reads its channel from L2, not from the last-level cache.
            let stream = stream_output::<T>(g, 0);
            let prefetch_out = !stream && g.inner * std::mem::size_of::<T>() <= moments::PREFETCH_BYTES;
            let spans = MaskSpans::new(mask, g.inner);
            let out = SharedOut::new(dx);
            let dz = relu.and_then(|r| r.dz).map(|dz| {
                assert_eq!(dz.len(), x.len());
                SharedOut::new(dz)
            });
            // dz out of the sums' loop, which reads dy and the mask already (see
            // `relu::GatedOut`), the dx pass then writing dx alone; except for the half types
            // where the pass streams (their 16-byte streaming stores there measured slower than
            // dz stored by the dx pass, docs/tuning-log.md).
            let dz_in_sums = !stream || 8 * std::mem::size_of::<T>() >= super::simd::STREAM_ALIGN;
            let parts = map_items((0..g.channels).collect(), is_serial(g), |c, _: usize| {
                // SAFETY: the planes of channel c belong to unit c alone.
                let upstream = match dz_in_sums {
                    true => dz.as_ref().map(|d| unsafe { UpstreamOut::new(d.ptr, d.len, stream) }),
                    false => None,
                };
                let (s1, s2) = planes_grad_sums(g, x, dy, spans.as_ref(), bits, upstream, c, mean[c], 0..g.outer);
                let mut k = [DxCoeffs::default()];
                coeffs(c, &[s1], &[s2], &mut k);
                let k = k[0];
                for o in 0..g.outer {
                    let start = (o * g.channels + c) * g.inner;
                    if prefetch_out && o + 1 < g.outer {
                        moments::prefetch(out.ptr.wrapping_add(start + g.channels * g.inner), g.inner);
                    }
                    if let (Some(b), true) = (bits, o + 1 < g.outer) {
                        prefetch_mask_plane(b.bytes.as_ptr(), b.layout, g, o + 1, c);
                    }
                    // SAFETY: plane (o, c) belongs to unit c alone.
                    let op = unsafe { out.slice(start, g.inner) };
                    let (xp, gp) = (&x[start..start + g.inner], &dy[start..start + g.inner]);
                    let mut back = bits.map(|b| relu::Back {
                        bits: b.at(start, g.inner),
                        // SAFETY: as for dx.
                        dz: dz
                            .as_ref()
                            .filter(|_| !dz_in_sums)
                            .map(|d| unsafe { d.slice(start, g.inner) }),
                    });
                    write_gated(gated_segment(&spans, o, 1), op, stream, |r, or, keep| match keep {
                        Some(keep) => ew::dx_plane_kept(&xp[r.clone()], &gp[r], or, k, stream, keep),
                        None => ew::dx_plane(&xp[r.clone()], &gp[r], or, k, stream, back.take()),
                    });
                }
                if stream {
                    ew::stream_fence();
                }
                (s1, s2)
            });
            parts.into_iter().unzip()
        }
        dx => {
            let (s1, s2) = grad_sums_where(g, x, dy, mean, mask, bits);
            if let Some(dx) = dx {
                let mut k = Scratch::any(g.channels);
                with_simd(|| coeffs(0, &s1, &s2, &mut k));
                input_grad_where(g, x, dy, dx, &k, Scope { mask, relu });
            }
            (s1, s2)
        }
    }
}

/// dx = dy·k[c] (inference-mode backward) at the positions `mask` (one entry per position,
/// `None`: all of them) has on, +0.0 at the others (see [`write_where`]). With `relu` (never
/// with a mask), from the upstream gradient dy·\[kept\], written to dz too when it has one.
pub(crate) fn scale_where<T: Element>(
    g: &Geometry,
    dy: &[T],
    dx: &mut [T],
    k: &[f64],
    scope: Scope<'_, relu::Backward<'_, T>>,
) {
    let (serial, stream) = begin_pass::<T>(g, scope.mask, scope.relu.is_some(), 0);
    if g.inner > 1 {
        let chunk = (TASK / g.inner).max(1) * g.inner;
        let spans = MaskSpans::new(scope.mask, g.inner);
        let backs = relu::Backward::split(scope.relu, chunk, dy.len());
        let items: Vec<_> = dy.chunks(chunk).zip(dx.chunks_mut(chunk)).zip(backs).collect();
        map_items(items, serial, |u, ((gs, os), mut back)| {
            let first_plane = u * (chunk / g.inner);
            for (i, (gp, op)) in gs.chunks(g.inner).zip(os.chunks_mut(g.inner)).enumerate() {
                let (o, c) = ((first_plane + i) / g.channels, (first_plane + i) % g.channels);
                let mut back = back
                    .as_mut()
                    .map(|b| b.part(u * chunk + i * g.inner, i * g.inner, g.inner));
                write_where(segment(&spans, o), 1, op, stream, |r, or, stream| {
                    ew::scale_plane(&gp[r], or, k[c], stream, back.take())
                });
            }
            if stream {
                ew::stream_fence();
            }
        });
    } else {
        let k = RowsScale::new::<T>(k);
        let chunk = row_blocks(g).0 * g.channels;
        let spans = MaskSpans::new(scope.mask, chunk / g.channels);
        let backs = relu::Backward::split(scope.relu, chunk, dy.len());
        let items: Vec<_> = dy.chunks(chunk).zip(dx.chunks_mut(chunk)).zip(backs).collect();
        map_items(items, serial, |u, ((gs, os), mut back)| {
            let mut back = back.as_mut().map(|b| b.part(u * chunk, 0, gs.len()));
            write_where(segment(&spans, u), g.channels, os, stream, |r, or, stream| {
                ew::scale_rows(&gs[r], or, &k, stream, back.take())
            });
            if stream {
                ew::stream_fence();
            }
        });
    }
}
