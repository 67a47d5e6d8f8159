//! The backward through fixed statistics (inference mode, frozen batch norm) in one pass over
//! memory.
//!
//! There dx = dy·k per channel does not depend on the gradient sums, so a unit need not finish
//! its sums before it writes dx. Channels-first, the tensor is walked in memory order: a unit is
//! a row of planes (the planes of one piece of each channel, see [`plane_rows`]) over a run of
//! channels, each plane (`o`, `c`) read once, its sums added to its piece's accumulators
//! (carried from one plane of the piece to the next) and its dx written part by part while the
//! part is in L1. Walking each channel's planes instead (strided across the tensor, one short
//! run per plane where planes are small) left the hardware prefetchers little to follow. In
//! the rows plan, rows of at most [`ONE_LOOP_CHANNELS`] channels, a multiple of 8, without mask or ReLU, are one
//! loop over each task's rows: dx is written 8 elements at a time inside the sums' loop, as
//! their dy is read ([`rows_fixed_backward`]); otherwise each block of rows ([`BLOCK`]) is
//! summed and then scaled, still in cache. x
//! and dy come from memory once and dx goes to it once: three streams, against five for the
//! sums pass followed by the dx pass.
//!
//! The pieces, their terms and the order they are added in are those of
//! [`super::grad_sums_where`] (channels-first, each piece's terms in its order, pieces added per
//! channel in order; a rows-plan task's sums are taken row by row per channel, so a task summed
//! block after block is summed in the same order), and dx is the element-wise product
//! [`super::scale_where`] writes: the same bits as those two passes, for any thread count.

use super::{
    add_block_sums, add_task_sums, begin_pass, is_serial, map_items, masked_lanes, plane_blocks, prefetch_rows,
    row_blocks, rows_mask, write_where, SharedOut, PIECE, TASK,
};
use crate::kernels::elementwise::{self as ew, RowsScale};
use crate::kernels::mask::{segment, MaskSpans};
use crate::kernels::moments::{self, AllRows, GradCarry, GradRuns, RowPrefetch, Runs};
use crate::kernels::relu::{self, MaskBits, Plain};
use crate::kernels::scratch::Scratch;
use crate::kernels::simd::{simd_dispatch, Simd};
use crate::{Element, Geometry};
use std::ops::Range;

/// Elements of a rows-plan block summed and then scaled into dx (64 KiB of `f32`): its x and dy
/// stay in L2 between the two, with room for the unit's accumulators and output.
const BLOCK: usize = 2 * super::PIECE;

/// Most channels of the rows plan's one loop ([`rows_fixed_backward`]): its sums walk a task's
/// rows in memory order, 4 rows at a time across the whole row, with the accumulators of the
/// whole row (16 bytes per channel, 64 KiB here) read and written once per 4 rows from L2.
/// Wider rows keep the two steps (sums, then dx, per block of rows).
const ONE_LOOP_CHANNELS: usize = 4096;

/// Fewest rows of a small rows-plan block (see [`rows_per_block`]): the rows sums take 4 rows
/// at a time.
const MIN_BLOCK_ROWS: usize = 4;

/// Rows of the rows plan's blocks (at most `per_task`) for rows of `g`, with dx written with
/// streaming stores (`stream`) and the sums prefetching the next group of rows (`pf`). A block
/// of [`BLOCK`] elements holds x and dy in L2 while dx is written. When dx is streamed and the
/// rows are too short for the rows prefetch, blocks of [`SUB`] elements (at least
/// [`MIN_BLOCK_ROWS`] rows) instead: x and dy are read back from L1, and the pass alternates
/// between reading the inputs and streaming dx out a few KiB at a time, as the channels-first
/// walk does, rather than 128 KiB of reads and then 64 KiB of writes. With the rows prefetch on,
/// a block must hold more than one group of rows for it to reach the next one.
fn rows_per_block(g: &Geometry, per_task: usize, stream: bool, pf: RowPrefetch) -> usize {
    let elements = if stream && !pf.on { SUB } else { BLOCK };
    let least = if stream && !pf.on { MIN_BLOCK_ROWS } else { 1 };
    (elements / g.channels).max(least).min(per_task)
}

/// What the backward through fixed statistics reads: x and dy, the per-channel mean and factor
/// k of dx = dy·k, the positions it covers (`mask`, one entry per position; `None`: all of them)
/// and, fused with a ReLU (never with a mask), the ReLU's backward.
pub(crate) struct FixedBackward<'a, T> {
    pub x: &'a [T],
    pub dy: &'a [T],
    pub mean: &'a [f64],
    pub k: &'a [f64],
    pub mask: Option<&'a [bool]>,
    pub relu: Option<relu::Backward<'a, T>>,
}

/// dx = dy·k[c] and per-channel (Σ dy, Σ dy·(x − mean)) in one pass, at (over) the positions
/// `pass.mask` has on, dx +0.0 at the others. With `pass.relu`, from the upstream gradient
/// dy·\[kept\], written to dz too when it has one. The sums are the same bits as
/// [`super::grad_sums_where`], dx as [`super::scale_where`].
pub(crate) fn fixed_backward_where<T: Element>(
    g: &Geometry,
    pass: FixedBackward<'_, T>,
    dx: &mut [T],
) -> (Vec<f64>, Vec<f64>) {
    // Nothing re-reads dx, and the inputs are read once each. The rows plan streams dx when x,
    // dy and dx together overflow the last-level cache (x and dy counted as the 2 inputs read
    // with it): dx's lines are then not in cache when they are written, and ordinary stores
    // would read each one from memory first. The planes plan streams by dx's size alone: it
    // writes dx plane by plane, and planes that are not whole cache lines (NCHW [64,256,14,14]:
    // 784 bytes) share their end lines with the next plane's call, which writes them in part
    // with ordinary stores.
    let reread = if g.inner > 1 { 0 } else { 2 };
    let (serial, stream) = begin_pass::<T>(g, pass.mask, pass.relu.is_some(), reread);
    assert!(dx.len() == pass.x.len() && pass.dy.len() == pass.x.len());
    if g.inner > 1 {
        planes_fixed_backward(g, pass, dx, stream)
    } else {
        let (x, dy, mean, mask) = (pass.x, pass.dy, pass.mean, pass.mask);
        let c = g.channels;
        let per_task = row_blocks(g).0;
        let pf = prefetch_rows::<T>(g);
        let (chunk, block) = (per_task * c, rows_per_block(g, per_task, stream, pf) * c);
        let scale = RowsScale::new::<T>(pass.k);
        // Plain (no mask, no ReLU), rows of whole vectors and at most `ONE_LOOP_CHANNELS`
        // channels: dx is written inside the sums' loop (see `rows_fixed_backward`), 8 elements
        // at a time as their dy is read, the task's rows in one call (one walk in memory order,
        // the sums' tile the whole row; its few elements outside the aligned vectors are at the
        // task's ends).
        let takes = match stream {
            true => ew::ScaleRowsAfter::<T, true>::takes(&scale),
            false => ew::ScaleRowsAfter::<T, false>::takes(&scale),
        };
        let fused = mask.is_none() && pass.relu.is_none() && takes && c <= ONE_LOOP_CHANNELS;
        let block = if fused { chunk } else { block };
        let backs = relu::Backward::split(pass.relu, chunk, x.len());
        // Each task's (Σ dy, Σ dy(x − m)) goes to its own part of one buffer of the calling thread.
        let mut parts = Scratch::any(2 * c * x.len().div_ceil(chunk));
        let items: Vec<_> = x
            .chunks(chunk)
            .zip(dy.chunks(chunk))
            .zip(dx.chunks_mut(chunk))
            .zip(backs)
            .zip(parts.chunks_mut(2 * c))
            .collect();
        map_items(items, serial, |u, ((((xs, gs), os), mut back), part)| {
            part.fill(0.0);
            let (s1, s2) = part.split_at_mut(c);
            let blocks = xs.chunks(block).zip(gs.chunks(block)).zip(os.chunks_mut(block));
            for (i, ((xb, gb), ob)) in blocks.enumerate() {
                // (It takes every block here; were it to refuse one, the two steps below give the
                // same bits over a block of any rows.)
                if fused && rows_fixed_backward(xb, gb, ob, mean, s1, s2, &scale, pf, stream) {
                    continue;
                }
                let first = u * chunk + i * block;
                let rows = rows_mask(g, mask, first, xb.len());
                let bits = back.as_ref().map(|b| b.bits.at(first, xb.len()));
                moments::rows_grad_sums(xb, gb, rows, mean, s1, s2, pf, bits);
                let spans = MaskSpans::new(rows, xb.len() / c);
                let mut back = back.as_mut().map(|b| b.part(first, i * block, xb.len()));
                write_where(segment(&spans, 0), c, ob, stream, |r, or, stream| {
                    ew::scale_rows(&gb[r], or, &scale, stream, back.take())
                });
            }
            if stream {
                ew::stream_fence();
            }
        });
        add_task_sums(&parts, c)
    }
}

/// Elements of x and dy summed before their dx is written (the part of a plane that has just
/// been read, still in L1): a multiple of the sums' 16-element step, so that cutting a plane
/// there changes no bit (see `moments::runs_grad_sums_carried`).
const SUB: usize = 512;

/// The planes plan's rows: ranges of planes (`o`) that hold whole pieces of every channel (see
/// `super::for_each_piece`), in order, each with the block of planes (`super::plane_blocks`) it
/// lies in. Small planes: a row is one piece's planes (pieces restart at each block); planes of
/// a piece or more: a row is one plane, cut into pieces of its own.
fn plane_rows(g: &Geometry) -> Vec<(Range<usize>, usize)> {
    let (blocks, per_block) = plane_blocks(g);
    let per_row = if g.inner >= PIECE { 1 } else { PIECE / g.inner };
    let mut rows = Vec::new();
    for b in 0..blocks {
        let end = ((b + 1) * per_block).min(g.outer);
        let mut o = b * per_block;
        while o < end {
            let next = (o + per_row).min(end);
            rows.push((o..next, b));
            o = next;
        }
    }
    rows
}

/// [`fixed_backward_where`] channels-first: the tensor walked in memory order, a unit being a
/// row of planes (see [`plane_rows`]) of a run of channels, each plane summed into its piece's
/// accumulators (carried from plane to plane of the piece) and scaled into dx while it is in
/// cache. Each piece's sums are those `super::planes_grad_sums` takes (the same terms added in
/// the same order), and they are added per channel in its order: the same bits.
fn planes_fixed_backward<T: Element>(
    g: &Geometry,
    pass: FixedBackward<'_, T>,
    dx: &mut [T],
    stream: bool,
) -> (Vec<f64>, Vec<f64>) {
    let (x, dy, mean, k) = (pass.x, pass.dy, pass.mean, pass.k);
    let (c_all, inner) = (g.channels, g.inner);
    let rows = plane_rows(g);
    // Pieces per row and channel.
    let per_row = if inner >= PIECE { inner.div_ceil(PIECE) } else { 1 };
    // Channels per unit: about a task's elements, the channels split evenly.
    let widest = rows.iter().map(|(o, _)| o.len()).max().unwrap_or(1) * inner;
    let split = c_all.div_ceil((TASK / widest).max(1));
    let width = c_all.div_ceil(split);
    let spans = MaskSpans::new(pass.mask, inner);
    let bits = pass.relu.as_ref().map(|r| r.bits);
    let out = SharedOut::new(dx);
    let dz = pass.relu.and_then(|r| r.dz).map(|dz| {
        assert_eq!(dz.len(), x.len());
        SharedOut::new(dz)
    });
    // Each piece's (Σ dy, Σ dy(x − m)): channel after channel, row after row.
    let mut sums = Scratch::any(2 * c_all * rows.len() * per_row);
    let piece_sums = SharedOut::new(&mut sums);
    let finish = |c: usize, r: usize, j: usize, carry: &GradCarry| {
        let (s1, s2) = carry.finish();
        // SAFETY: piece j of channel c in row r belongs to one unit alone.
        unsafe { piece_sums.slice(2 * ((c * rows.len() + r) * per_row + j), 2) }.copy_from_slice(&[s1, s2]);
    };
    let units: Vec<(usize, usize)> = (0..rows.len()).flat_map(|r| (0..split).map(move |q| (r, q))).collect();
    map_items(units, is_serial(g), |_, (r, q)| {
        let (planes, channels) = (rows[r].0.clone(), q * width..((q + 1) * width).min(c_all));
        let mut carries = vec![GradCarry::ZERO; channels.len()];
        for o in planes.clone() {
            // Planes (o, c) of the unit's channels, one after the other in memory.
            let first = (o * c_all + channels.start) * inner;
            let n = channels.len() * inner;
            // SAFETY: these planes belong to this unit alone.
            let (op, zp) = unsafe { (out.slice(first, n), dz.as_ref().map(|d| d.slice(first, n))) };
            if let Some(spans) = &spans {
                for ((c, carry), op) in channels.clone().zip(&mut carries).zip(op.chunks_mut(inner)) {
                    let start = (o * c_all + c) * inner;
                    for (j, len) in pieces(inner) {
                        let runs = Runs::one(start + j, len);
                        let mask = masked_lanes(g, Some(spans), runs);
                        let sums = GradRuns {
                            x,
                            dy,
                            runs,
                            m: mean[c],
                            mask,
                            relu: None,
                        };
                        moments::runs_grad_sums_carried(sums, carry);
                        if inner >= PIECE {
                            finish(c, r, j / PIECE, carry);
                            *carry = GradCarry::ZERO;
                        }
                    }
                    write_where(Some(spans.segment(o)), 1, op, stream, |r, or, stream| {
                        ew::scale_plane(&dy[start..start + inner][r], or, k[c], stream, None)
                    });
                }
            } else if inner >= PIECE {
                let (mut op, mut zp) = (op, zp);
                for c in channels.clone() {
                    let start = (o * c_all + c) * inner;
                    for (j, len) in pieces(inner) {
                        let (o1, rest) = op.split_at_mut(len);
                        let (z1, rest_z) = split_opt(zp, len);
                        let mut carry = [GradCarry::ZERO];
                        let (runs, ck) = (Runs::one(start + j, len), (&mean[c..=c], &k[c..=c]));
                        runs_fixed_backward(x, dy, o1, z1, runs, ck.0, ck.1, &mut carry, stream, bits);
                        finish(c, r, j / PIECE, &carry[0]);
                        (op, zp) = (rest, rest_z);
                    }
                }
            } else {
                let runs = Runs {
                    first,
                    count: channels.len(),
                    len: inner,
                    stride: inner,
                };
                let ch = channels.clone();
                runs_fixed_backward(
                    x,
                    dy,
                    op,
                    zp,
                    runs,
                    &mean[ch.clone()],
                    &k[ch],
                    &mut carries,
                    stream,
                    bits,
                );
            }
            if inner < PIECE && o + 1 == planes.end {
                channels
                    .clone()
                    .zip(&carries)
                    .for_each(|(c, carry)| finish(c, r, 0, carry));
            }
        }
        if stream {
            ew::stream_fence();
        }
    });
    // Each block's pieces added in order from zero, as `super::planes_grad_sums` adds them.
    let blocks = plane_blocks(g).0;
    let mut parts = Vec::with_capacity(c_all * blocks);
    for piece_sums in sums.chunks(2 * rows.len() * per_row) {
        let mut acc = (0.0, 0.0);
        for (r, row) in piece_sums.chunks(2 * per_row).enumerate() {
            for p in row.chunks(2) {
                acc = (acc.0 + p[0], acc.1 + p[1]);
            }
            if r + 1 == rows.len() || rows[r + 1].1 != rows[r].1 {
                parts.push(std::mem::take(&mut acc));
            }
        }
    }
    add_block_sums(&parts, blocks)
}

/// The pieces of a plane of `inner` elements as (start, length): pieces of [`PIECE`] elements of
/// a large plane, or the whole of a small one.
fn pieces(inner: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..inner).step_by(PIECE).map(move |j| (j, PIECE.min(inner - j)))
}

/// `buf` cut after `mid` elements, when there is one.
#[allow(clippy::type_complexity)]
fn split_opt<T>(buf: Option<&mut [T]>, mid: usize) -> (Option<&mut [T]>, Option<&mut [T]>) {
    match buf.map(|b| b.split_at_mut(mid)) {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn runs_fixed_backward_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    mut dz: Option<&mut [T]>,
    runs: Runs,
    mean: &[f64],
    k: &[f64],
    carries: &mut [GradCarry],
    stream: bool,
    relu: Option<MaskBits>,
) {
    assert!(runs.count <= 1 || runs.stride == runs.len);
    assert!(dx.len() == runs.total() && dz.as_ref().is_none_or(|d| d.len() == dx.len()));
    assert!(mean.len() == runs.count && k.len() == runs.count && carries.len() == runs.count);
    let size = std::mem::size_of::<T>();
    for (i, carry) in carries.iter_mut().enumerate() {
        let (start, base) = (runs.first + i * runs.stride, i * runs.len);
        // dx of elements ..done of the run is written.
        let mut done = 0;
        for sub in (0..runs.len).step_by(SUB) {
            let end = (sub + SUB).min(runs.len);
            let sums = GradRuns {
                x,
                dy,
                runs: Runs::one(start + sub, end - sub),
                m: mean[i],
                mask: None,
                relu,
            };
            moments::runs_grad_sums_carried_impl(s, sums, carry);
            // dx up to the last cache line of dx these sums complete (all of the run at its
            // end), so that no line is written by two calls: a line written in part by
            // streaming stores and in part by ordinary ones costs a read of it.
            let line = (dx.as_ptr().wrapping_add(base + end) as usize % 64) / size;
            let upto = if end == runs.len { end } else { (end - line).max(done) };
            let (o, n) = (base + done, upto - done);
            let back = relu.map(|b| relu::Back {
                bits: b.at(start + done, n),
                dz: dz.as_deref_mut().map(|d| &mut d[o..o + n]),
            });
            ew::scale_plane_impl(
                s,
                &dy[start + done..start + upto],
                &mut dx[o..o + n],
                k[i],
                stream,
                back,
            );
            done = upto;
        }
    }
}

simd_dispatch! {
    /// The one pass of the backward through fixed statistics over `runs` of x and dy (one run,
    /// or consecutive runs, as planes of consecutive channels): run i's (Σ dy, Σ dy·(x − m))
    /// with m = `mean[i]` added to `carries[i]` (as `moments::runs_grad_sums_carried` adds
    /// them), and its dx = dy·`k[i]` written to `dx` (and dz to `dz`, the runs' elements one
    /// after the other) as `ew::scale_plane` writes it, each part of a run while it is in cache.
    /// With `relu`, from the upstream gradient dy·\[kept\].
    fn runs_fixed_backward<T>(
        x: &[T], dy: &[T], dx: &mut [T], dz: Option<&mut [T]>, runs: Runs, mean: &[f64], k: &[f64],
        carries: &mut [GradCarry], stream: bool, relu: Option<MaskBits>
    ) => runs_fixed_backward_impl
}

/// The rows plan's one pass over a block of whole rows (channels a multiple of 8), without mask
/// or ReLU: (Σ dy, Σ dy·(x − m)) added to `s1`, `s2` as `moments::rows_grad_sums` adds them, and
/// dx = dy·k written as `ew::scale_rows` writes it, each 8 elements of dx inside the sums' loop
/// as their dy is read (`ew::ScaleRowsAfter`), streamed with `stream`. Returns false, having
/// done nothing, where dx cannot be written so (see `ScaleRowsAfter::new`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_fixed_backward_impl<S: Simd, T: Element>(
    s: S,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    mean: &[f64],
    s1: &mut [f64],
    s2: &mut [f64],
    k: &RowsScale,
    pf: RowPrefetch,
    stream: bool,
) -> bool {
    assert!(x.len() == dy.len() && dx.len() == dy.len());
    match stream {
        true => one_loop::<S, T, true>(s, x, dy, dx, mean, (s1, s2), k, pf),
        false => one_loop::<S, T, false>(s, x, dy, dx, mean, (s1, s2), k, pf),
    }
}

/// [`rows_fixed_backward_impl`] with streaming stores or not (`STREAM`, a constant in the loop).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn one_loop<S: Simd, T: Element, const STREAM: bool>(
    s: S,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    mean: &[f64],
    (s1, s2): (&mut [f64], &mut [f64]),
    k: &RowsScale,
    pf: RowPrefetch,
) -> bool {
    let Some(after) = ew::ScaleRowsAfter::<T, STREAM>::new(dy, dx, k) else {
        return false;
    };
    // (ScaleRowsAfter takes channels of whole vectors only, as the epilogue needs.)
    // The whole row is one tile, so that the block is walked in memory order: tiles of
    // `moments::CHANNEL_TILE` would jump from row to row every KiB (slower where measured, see
    // docs/tuning-log.md).
    let tile = mean.len();
    moments::rows_grad_sums_of(s, x, dy, mean, s1, s2, pf, AllRows, Plain, after, tile);
    after.finish();
    true
}

simd_dispatch! {
    /// The rows plan's backward through fixed statistics over a block of whole rows in one loop
    /// (see [`rows_fixed_backward_impl`]); false where it cannot take the block.
    fn rows_fixed_backward<T>(
        x: &[T], dy: &[T], dx: &mut [T], mean: &[f64], s1: &mut [f64], s2: &mut [f64], k: &RowsScale,
        pf: RowPrefetch, stream: bool
    ) -> bool => rows_fixed_backward_impl
}

#[cfg(test)]
mod tests {
    use super::{rows_fixed_backward, rows_fixed_backward_impl};
    use crate::kernels::elementwise::{self as ew, RowsScale};
    use crate::kernels::moments::{self, RowPrefetch};
    use crate::kernels::simd::{Scalar, STREAM_ALIGN};
    use crate::{bf16, Element};

    /// `n` values in [−3, 4.8): a few hundred distinct ones, in an order that `seed` shifts.
    fn data<T: Element>(n: usize, seed: u64) -> Vec<T> {
        (0..n as u64)
            .map(|i| T::from_f64(((i * 37 + seed) % 389) as f64 / 50.0 - 3.0))
            .collect()
    }

    /// The one pass over a block of rows against the sums (`moments::rows_grad_sums`) and then
    /// dx (`ew::scale_rows`), bit for bit: dx at every element offset from a [`STREAM_ALIGN`]
    /// boundary (streamed, the stores move back to the boundary and the block's ends are
    /// written apart), streamed or not, with the rows prefetch or not, through the AVX2 path
    /// and the portable one. Outputs start as NaN, so an element left unwritten fails.
    fn one_pass_agrees<T: Element>() {
        let size = std::mem::size_of::<T>();
        for (channels, rows) in [(8, 1), (8, 13), (64, 7), (256, 9), (24, 4), (1032, 6), (4096, 5)] {
            let n = rows * channels;
            let (x, dy) = (data::<T>(n, channels as u64), data::<T>(n, 7));
            let mean: Vec<f64> = (0..channels).map(|c| 0.1 * c as f64 - 1.0).collect();
            let k: Vec<f64> = (0..channels).map(|c| 0.3 + c as f64 / 7.0).collect();
            let scale = RowsScale::new::<T>(&k);
            let z = || vec![0.5; channels];
            let (mut w1, mut w2) = (z(), z());
            let pf = RowPrefetch {
                on: channels == 64,
                line: 64 / size,
            };
            moments::rows_grad_sums(&x, &dy, None, &mean, &mut w1, &mut w2, pf, None);
            let mut want = vec![T::from_f64(f64::NAN); n];
            ew::scale_rows(&dy, &mut want, &scale, false, None);
            let mut buf = vec![T::from_f64(f64::NAN); n + STREAM_ALIGN / size];
            let base = buf.as_ptr() as usize % STREAM_ALIGN / size;
            for off in 0..STREAM_ALIGN / size {
                let at = (off + STREAM_ALIGN / size - base) % (STREAM_ALIGN / size);
                for (stream, avx) in [(false, false), (false, true), (true, false), (true, true)] {
                    let dx = &mut buf[at..at + n];
                    dx.fill(T::from_f64(f64::NAN));
                    let (mut s1, mut s2) = (z(), z());
                    let done = match avx {
                        true => rows_fixed_backward(&x, &dy, dx, &mean, &mut s1, &mut s2, &scale, pf, stream),
                        false => {
                            rows_fixed_backward_impl(Scalar, &x, &dy, dx, &mean, &mut s1, &mut s2, &scale, pf, stream)
                        }
                    };
                    ew::stream_fence();
                    // Streamed, 8 elements of 2 bytes are less than STREAM_ALIGN: refused.
                    assert_eq!(done, !stream || 8 * size >= STREAM_ALIGN);
                    if !done {
                        continue;
                    }
                    let what = format!("{channels} channels, {rows} rows, offset {off}, stream {stream}, avx {avx}");
                    assert_eq!((&s1, &s2), (&w1, &w2), "{what}: sums");
                    let bits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(dx), bits(&want), "{what}: dx");
                }
            }
        }
    }

    #[test]
    fn rows_fixed_backward_same_bits_as_two_passes() {
        one_pass_agrees::<f32>();
        one_pass_agrees::<f64>();
        one_pass_agrees::<bf16>();
    }
}
