//! The backward through fixed statistics (inference mode, frozen batch norm) in one pass over
//! memory.
//!
//! There dx = dy·k per channel does not depend on the gradient sums, so a unit need not finish
//! its sums before it writes dx. Channels-first, each in-cache piece is summed and then the
//! planes it completes are scaled into dx (a plane longer than a piece after its last piece,
//! from L2); in the rows plan, each block of rows ([`BLOCK`]) is summed and then scaled, still
//! in cache. x and dy come from memory once and dx goes to it once: three streams, against five
//! for the sums pass followed by the dx pass.
//!
//! The units, pieces, blocks and merge order are those of [`super::grad_sums_where`], whose
//! kernels this calls on the same pieces in the same order (a rows-plan task's sums are taken
//! row by row per channel, so a task summed block after block is summed in the same order), and
//! dx is the element-wise product [`super::scale_where`] writes: the same bits as those two
//! passes, for any thread count.

use super::{
    add_block_sums, add_task_sums, for_each_piece, is_serial, map_items, map_plane_blocks, masked_lanes, prefetch_rows,
    row_blocks, rows_mask, stream_output, unmasked_if_fused, write_where, SharedOut,
};
use crate::kernels::elementwise::{self as ew, RowsScale};
use crate::kernels::mask::{segment, MaskSpans};
use crate::kernels::moments;
use crate::kernels::relu;
use crate::kernels::scratch::Scratch;
use crate::{Element, Geometry};

/// Elements of a rows-plan block summed and then scaled into dx (64 KiB of `f32`): its x and dy
/// stay in L2 between the two, with room for the unit's accumulators and output.
const BLOCK: usize = 2 * super::PIECE;

/// dx = dy·k[c] and per-channel (Σ dy, Σ dy·(x − mean)) in one pass, at (over) the positions
/// `mask` (one entry per position, `None`: all of them) has on, dx +0.0 at the others. With
/// `relu` (never with a mask), from the upstream gradient dy·\[kept\], written to dz too when it
/// has one. The sums are the same bits as [`super::grad_sums_where`], dx as
/// [`super::scale_where`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn fixed_backward_where<T: Element>(
    g: &Geometry,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    mean: &[f64],
    k: &[f64],
    mask: Option<&[bool]>,
    relu: Option<relu::Backward<'_, T>>,
) -> (Vec<f64>, Vec<f64>) {
    unmasked_if_fused(mask, relu.is_some());
    assert!(dx.len() == x.len() && dy.len() == x.len());
    let serial = is_serial(g);
    // Nothing re-reads dx, and the inputs are read once each.
    let stream = stream_output::<T>(g, 0);
    if g.inner > 1 {
        let spans = MaskSpans::new(mask, g.inner);
        let bits = relu.as_ref().map(|r| r.bits);
        let out = SharedOut::new(dx);
        let dz = relu.and_then(|r| r.dz).map(|dz| {
            assert_eq!(dz.len(), x.len());
            SharedOut::new(dz)
        });
        // dx of plane o of channel c, whose sums were just taken (its dy is in cache).
        let plane_dx = |o: usize, c: usize| {
            let start = (o * g.channels + c) * g.inner;
            // SAFETY: plane (o, c) belongs to the unit of channel c that holds plane o alone.
            let op = unsafe { out.slice(start, g.inner) };
            let gp = &dy[start..start + g.inner];
            let mut back = bits.map(|b| relu::Back {
                bits: b.at(start, g.inner),
                // SAFETY: as for dx.
                dz: dz.as_ref().map(|d| unsafe { d.slice(start, g.inner) }),
            });
            write_where(segment(&spans, o), 1, op, |r, or, nt| {
                ew::scale_plane(&gp[r], or, k[c], stream && nt, back.take())
            });
        };
        let (parts, blocks) = map_plane_blocks(g, serial, |c, planes| {
            let (mut a, mut b) = (0.0, 0.0);
            for_each_piece(g, c, planes, |runs| {
                let lanes = masked_lanes(g, spans.as_ref(), runs);
                let (s1, s2) = moments::runs_grad_sums(x, dy, runs, mean[c], lanes, bits);
                a += s1;
                b += s2;
                // The planes this piece completes: its whole planes, or the plane it ends.
                let (o, j) = (runs.first / (g.channels * g.inner), runs.first % g.inner);
                if runs.len == g.inner {
                    (o..o + runs.count).for_each(|o| plane_dx(o, c));
                } else if j + runs.len == g.inner {
                    plane_dx(o, c);
                }
            });
            if stream {
                ew::stream_fence();
            }
            (a, b)
        });
        add_block_sums(&parts, blocks)
    } else {
        let c = g.channels;
        let per_task = row_blocks(g).0;
        let (chunk, block) = (per_task * c, (BLOCK / c).clamp(1, per_task) * c);
        let pf = prefetch_rows::<T>(g);
        let scale = RowsScale::new::<T>(k);
        let backs = relu::Backward::split(relu, chunk, x.len());
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
                let first = u * chunk + i * block;
                let rows = rows_mask(g, mask, first, xb.len());
                let bits = back.as_ref().map(|b| b.bits.at(first, xb.len()));
                moments::rows_grad_sums(xb, gb, rows, mean, s1, s2, pf, bits);
                let spans = MaskSpans::new(rows, xb.len() / c);
                let mut back = back.as_mut().map(|b| b.part(first, i * block, xb.len()));
                write_where(segment(&spans, 0), c, ob, |r, or, nt| {
                    ew::scale_rows(&gb[r], or, &scale, stream && nt, back.take())
                });
            }
            if stream {
                ew::stream_fence();
            }
        });
        add_task_sums(&parts, c)
    }
}
