//! Ghost batch norm's passes over the rows plan (`inner` = 1: NC, NHWC, channels-last): a tensor
//! cut into groups of consecutive rows (the rows of a group of consecutive examples), each with
//! its own statistics, in one pass for the statistics of every group and one element-wise pass.
//!
//! A group's units are the tasks the rows plan cuts that group into when it is a tensor of its
//! own ([`super::row_blocks`] from its first row: the plan depends only on the channel count),
//! reduced by the same kernels and merged in the same order, so each group's statistics and
//! gradient sums are the same bits as [`super::channel_moments_where`] and
//! [`super::grad_sums_where`] over the group alone; the element-wise passes write each element
//! as the plain passes do. What changes is that every group's units run in one parallel pass
//! (not one kernel call, with its own checks, temporaries and hand-over to the pool, per group).

use super::{
    add_task_sums_into, is_serial, map_items, merge_task_moments, plane_blocks, planes_grad_sums, planes_moments,
    prefetch_rows, row_blocks, rows_task_moments, stream_output, SharedOut,
};
use crate::kernels::elementwise::{self as ew, DxCoeffs, DxRows, RowsAffine, WideAffine};
use crate::kernels::moments::{self, Moments};
use crate::kernels::scratch::Scratch;
use crate::kernels::with_simd;
use crate::stats::exact_reciprocal;
use crate::{Element, Geometry};

/// One unit: rows `rows` of group `group`, a task of that group's rows plan.
#[derive(Clone)]
struct Unit {
    group: usize,
    rows: std::ops::Range<usize>,
}

/// The units of a rows-plan tensor `g` cut into groups of `group_rows` rows (the last one holds
/// the rest), group after group, each group's tasks in order.
fn units(g: &Geometry, group_rows: usize) -> Vec<Unit> {
    assert!(g.inner == 1 && group_rows > 0);
    let per_task = row_blocks(g).0;
    let mut out = Vec::with_capacity(g.outer.div_ceil(group_rows) * group_rows.div_ceil(per_task));
    for (group, first) in (0..g.outer).step_by(group_rows).enumerate() {
        let end = (first + group_rows).min(g.outer);
        let mut r = first;
        while r < end {
            let next = (r + per_task).min(end);
            out.push(Unit { group, rows: r..next });
            r = next;
        }
    }
    out
}

/// Cuts `buf` (whole rows of `channels`) into the units' slices, in order.
fn split_units<'a, T>(mut buf: &'a mut [T], units: &[Unit], channels: usize) -> Vec<&'a mut [T]> {
    units
        .iter()
        .map(|u| {
            let (head, rest) = std::mem::take(&mut buf).split_at_mut(u.rows.len() * channels);
            buf = rest;
            head
        })
        .collect()
}

/// The units of each group, as a range of indices into `units`.
fn group_ranges(units: &[Unit]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, u) in units.iter().enumerate() {
        match out.get_mut(u.group) {
            Some(r) => r.end = i + 1,
            None => out.push(i..i + 1),
        }
    }
    out
}

/// Per-channel moments of consecutive groups, packed: group k's channel c at k·C + c. The
/// passes write them into the caller's vectors (resized to groups × channels, every entry
/// written), so that a caller that keeps them between calls (a layer's saved statistics) reuses
/// their memory.
pub(crate) struct GroupMoments<'a> {
    /// Each group's means, group after group.
    pub mean: &'a mut Vec<f64>,
    /// Each group's M2, group after group.
    pub m2: &'a mut Vec<f64>,
    /// When given, each group's 1/√(σ² + ε) as the pass computed it for y, group after group.
    pub inv_std: Option<&'a mut Vec<f64>>,
}

impl GroupMoments<'_> {
    /// Resizes the vectors to `len` entries, which the pass then writes.
    fn sized(&mut self, len: usize) {
        self.mean.resize(len, 0.0);
        self.m2.resize(len, 0.0);
        if let Some(v) = self.inv_std.as_deref_mut() {
            v.resize(len, 0.0);
        }
    }
}

/// Ghost training forward over the rows plan: the moments of each group of `group_rows`
/// consecutive rows (the same bits as [`super::channel_moments_where`] over the group alone),
/// then `inv_std(v)` turns a group's biased variances into its 1/√(σ² + ε) in place and
/// `affine(first, scale, shift)` those into its (scale, shift) (together what
/// [`super::train_forward_where`]'s `affine` does), and y is written group by group with its own
/// constants, as [`super::normalize_where`] writes it. Every group's moments (and 1/√(σ² + ε))
/// go to `out`.
///
/// A group that is one unit of its own rows plan (at most a task's rows) is one unit here too:
/// its moments, constants and y back to back, while its rows are in cache. Larger groups take
/// one pass over every group's units for the statistics and one more for y.
pub(crate) fn ghost_train_forward<T: Element>(
    g: &Geometry,
    x: &[T],
    y: &mut [T],
    group_rows: usize,
    mut out: GroupMoments<'_>,
    inv_std: impl Fn(&mut [f64]) + Sync + Send,
    affine: impl Fn(usize, &mut [f64], &mut [f64]) + Sync + Send,
) {
    assert!(y.len() == x.len() && g.inner == 1 && group_rows > 0);
    let (per_task, per_block) = row_blocks(g);
    if group_rows > per_task {
        return split_train_forward(g, x, y, group_rows, out, inv_std, affine);
    }
    let c = g.channels;
    let pf = prefetch_rows::<T>(g);
    // A unit re-reads its group from its own cache, not from the last-level cache.
    let stream = stream_output::<T>(g, 0);
    let chunk = group_rows * c;
    out.sized(g.outer.div_ceil(group_rows) * c);
    let inv: Vec<Option<&mut [f64]>> = match out.inv_std {
        Some(v) => v.chunks_mut(c).map(Some).collect(),
        None => out.mean.chunks(c).map(|_| None).collect(),
    };
    let items: Vec<_> = (x.chunks(chunk).zip(y.chunks_mut(chunk)))
        .zip(out.mean.chunks_mut(c).zip(out.m2.chunks_mut(c)))
        .zip(inv)
        .collect();
    map_items(items, is_serial(g), |_, (((xs, ys), (mean, m2)), inv)| {
        // The group is one task of its own plan: its moments are that task's.
        let count = rows_task_moments(xs, None, per_block, pf, mean, m2);
        let mut inv = inv;
        // The constants made and narrowed a chunk of channels at a time, in L1.
        let p = with_simd(
            #[inline(always)]
            || {
                RowsAffine::from_chunks::<T>(
                    mean,
                    #[inline(always)]
                    |first, scale, shift| {
                        let r = first..first + scale.len();
                        let inv = inv.as_deref_mut().map(|v| &mut v[r.clone()]);
                        group_constants(first, count, &m2[r], scale, shift, inv, &inv_std, &affine)
                    },
                )
            },
        );
        ew::normalize_rows(xs, ys, &p, stream, None);
        if stream {
            ew::stream_fence();
        }
    });
}

/// One group's (scale, shift) of channels `first..first + m2.len()` from its `count` values per
/// channel and those channels' M2 `m2`: the biased variances M2/count, turned into
/// 1/√(σ² + ε) by `inv_std` (copied to `inv` when given), then into (scale, shift) by
/// `affine(first, scale, shift)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn group_constants(
    first: usize,
    count: f64,
    m2: &[f64],
    scale: &mut [f64],
    shift: &mut [f64],
    inv: Option<&mut [f64]>,
    inv_std: &impl Fn(&mut [f64]),
    affine: &impl Fn(usize, &mut [f64], &mut [f64]),
) {
    // Divided by the count, or multiplied by its exact reciprocal (the same bits, no division).
    match exact_reciprocal(count) {
        Some(r) => scale.iter_mut().zip(m2).for_each(|(s, m2)| *s = m2 * r),
        None => scale.iter_mut().zip(m2).for_each(|(s, m2)| *s = m2 / count),
    }
    inv_std(scale);
    if let Some(v) = inv {
        v.copy_from_slice(scale);
    }
    affine(first, scale, shift);
}

/// [`ghost_train_forward`] for groups of several units: every group's units' moments in one
/// parallel pass, merged per group in order, the groups' constants, then y in one more pass.
fn split_train_forward<T: Element>(
    g: &Geometry,
    x: &[T],
    y: &mut [T],
    group_rows: usize,
    mut out: GroupMoments<'_>,
    inv_std: impl Fn(&mut [f64]),
    affine: impl Fn(usize, &mut [f64], &mut [f64]) + Sync + Send,
) {
    let (c, serial) = (g.channels, is_serial(g));
    let units = units(g, group_rows);
    let per_block = row_blocks(g).1;
    let pf = prefetch_rows::<T>(g);
    // Each unit's (mean, m2) goes to its own part of one buffer of the calling thread.
    let mut parts = Scratch::any(2 * c * units.len());
    let items: Vec<(&Unit, &mut [f64])> = units.iter().zip(parts.chunks_mut(2 * c)).collect();
    let counts = map_items(items, serial, |_, (u, part)| {
        let (mean, m2) = part.split_at_mut(c);
        rows_task_moments(&x[u.rows.start * c..u.rows.end * c], None, per_block, pf, mean, m2)
    });
    let ranges = group_ranges(&units);
    out.sized(ranges.len() * c);
    let mut group_counts = Vec::with_capacity(ranges.len());
    let groups = out.mean.chunks_mut(c).zip(out.m2.chunks_mut(c));
    for (r, (mean, m2)) in ranges.into_iter().zip(groups) {
        let parts = &parts[2 * c * r.start..2 * c * r.end];
        group_counts.push(merge_task_moments(&counts[r], parts, mean, m2));
    }
    // Each group's (scale, shift), group after group.
    let (mut scale, mut shift) = (Scratch::any(out.mean.len()), Scratch::any(out.mean.len()));
    with_simd(|| {
        let groups = scale.chunks_mut(c).zip(shift.chunks_mut(c)).zip(out.m2.chunks(c));
        for (k, (((scale, shift), m2), &count)) in groups.zip(&group_counts).enumerate() {
            let inv = out.inv_std.as_deref_mut().map(|v| &mut v[k * c..(k + 1) * c]);
            group_constants(0, count, m2, scale, shift, inv, &inv_std, &affine);
        }
    });
    let stream = stream_output::<T>(g, 0);
    let outs = split_units(y, &units, c);
    // Last to first, as `normalize_where` takes its units.
    let mut items: Vec<(&Unit, &mut [T])> = units.iter().zip(outs).collect();
    items.reverse();
    map_items(items, serial, |_, (u, ys)| {
        // A unit's constants, from its group's (kept in a buffer of its own thread's, not one
        // per group at once).
        let k = u.group * c..(u.group + 1) * c;
        let p = RowsAffine::new::<T>(&out.mean[k.clone()], &scale[k.clone()], &shift[k]);
        ew::normalize_rows(&x[u.rows.start * c..u.rows.end * c], ys, &p, stream, None);
        if stream {
            ew::stream_fence();
        }
    });
}

/// Whether [`ghost_planes_forward`] takes a channels-first tensor `g` cut into groups of
/// `group_planes` planes per channel: when every group, a tensor of its own, takes the planes
/// plan's fused training forward (one unit per channel, [`super::train_forward_where`]), whose
/// bits that function reproduces.
pub(crate) fn fuses_planes(g: &Geometry, group_planes: usize) -> bool {
    let group = Geometry {
        outer: group_planes.min(g.outer),
        ..*g
    };
    g.inner > 1 && plane_blocks(&group).0 == 1
}

/// Ghost training forward over the planes plan (channels-first, [`fuses_planes`]): one unit per
/// channel, which for each group of `group_planes` consecutive planes (the last one holds the
/// rest) in turn takes the group's moments over its planes (the same pieces, merged in the same
/// order, as [`super::train_forward_where`] over the group alone), turns them into the group's
/// (scale, shift) with `inv_std` and `affine` (as [`ghost_train_forward`], channel `c` as
/// `affine(c, scale, shift)`), and writes the group's y while its planes are in cache. Every
/// group's moments (and 1/√(σ² + ε)) go to `out`; each group's statistics and y are the bits of
/// [`super::train_forward_where`] over the group alone.
pub(crate) fn ghost_planes_forward<T: Element>(
    g: &Geometry,
    group_planes: usize,
    x: &[T],
    y: &mut [T],
    mut out: GroupMoments<'_>,
    inv_std: impl Fn(&mut [f64]) + Sync + Send,
    affine: impl Fn(usize, &mut [f64], &mut [f64]) + Sync + Send,
) {
    assert!(fuses_planes(g, group_planes) && y.len() == x.len());
    let (c, groups) = (g.channels, g.outer.div_ceil(group_planes));
    let stream = stream_output::<T>(g, 0);
    let prefetch_out = !stream && g.inner * std::mem::size_of::<T>() <= moments::PREFETCH_BYTES;
    let ys = SharedOut::new(y);
    let parts = map_items((0..c).collect(), is_serial(g), |ch, _: usize| {
        let mut group_moments = Vec::with_capacity(groups);
        for first in (0..g.outer).step_by(group_planes) {
            let planes = first..(first + group_planes).min(g.outer);
            let m = planes_moments(g, x, None, ch, planes.clone());
            let (mut scale, mut shift) = ([m.m2 / m.count], [0.0]);
            inv_std(&mut scale);
            let s = scale[0];
            affine(ch, &mut scale, &mut shift);
            let a = WideAffine {
                mean: m.mean,
                scale: scale[0],
                shift: shift[0],
            };
            for o in planes.clone() {
                let start = (o * c + ch) * g.inner;
                if prefetch_out && o + 1 < planes.end {
                    moments::prefetch(ys.ptr.wrapping_add(start + c * g.inner), g.inner);
                }
                // SAFETY: plane (o, ch) belongs to unit ch alone.
                let yp = unsafe { ys.slice(start, g.inner) };
                ew::normalize_plane(&x[start..start + g.inner], yp, a, stream, None);
            }
            group_moments.push((m, s));
        }
        if stream {
            ew::stream_fence();
        }
        group_moments
    });
    out.sized(groups * c);
    for (ch, channel) in parts.iter().enumerate() {
        for (k, &(Moments { mean, m2, .. }, s)) in channel.iter().enumerate() {
            out.mean[k * c + ch] = mean;
            out.m2[k * c + ch] = m2;
            if let Some(v) = out.inv_std.as_deref_mut() {
                v[k * c + ch] = s;
            }
        }
    }
}

/// Ghost training backward over the rows plan: each group's (Σ dy, Σ dy·(x − mean)) with its
/// own `means[group]` (the same bits as [`super::grad_sums_where`] over the group alone), then,
/// when `dx` is given, `coeffs(group, first, Σdy, Σdy(x−m), out)` writes a group's dx
/// coefficients of channels `first..first + out.len()` from those channels' sums and
/// dx is written group by group with them, as [`super::input_grad_where`] writes it. Returns
/// every group's sums, packed as [`GroupMoments`] are (group k's channel c at k·C + c).
///
/// As in [`ghost_train_forward`], a group of at most a task's rows is one unit (its sums,
/// coefficients and dx back to back); larger groups take one pass for every group's sums and
/// one more for dx.
pub(crate) fn ghost_train_backward<T: Element>(
    g: &Geometry,
    x: &[T],
    dy: &[T],
    dx: Option<&mut [T]>,
    group_rows: usize,
    means: &[&[f64]],
    coeffs: impl Fn(usize, usize, &[f64], &[f64], &mut [DxCoeffs]) + Sync + Send,
) -> (Scratch<f64>, Scratch<f64>) {
    assert!(dy.len() == x.len() && g.inner == 1 && group_rows > 0);
    assert_eq!(means.len(), g.outer.div_ceil(group_rows));
    if group_rows > row_blocks(g).0 {
        return split_train_backward((g, group_rows), (x, dy, dx), means, coeffs);
    }
    let c = g.channels;
    let pf = prefetch_rows::<T>(g);
    // A unit re-reads its group from its own cache, not from the last-level cache.
    let stream = stream_output::<T>(g, 0);
    let chunk = group_rows * c;
    let (mut sum_dy, mut sum_dy_xmu) = (Scratch::any(means.len() * c), Scratch::any(means.len() * c));
    let dxs: Vec<Option<&mut [T]>> = match dx {
        Some(dx) => {
            assert_eq!(dx.len(), x.len());
            dx.chunks_mut(chunk).map(Some).collect()
        }
        None => means.iter().map(|_| None).collect(),
    };
    let items: Vec<_> = (x.chunks(chunk).zip(dy.chunks(chunk)))
        .zip(sum_dy.chunks_mut(c).zip(sum_dy_xmu.chunks_mut(c)))
        .zip(dxs)
        .collect();
    map_items(items, is_serial(g), |k, (((xs, gs), (s1, s2)), dx)| {
        // The group is one task of its own plan: its sums are that task's (added to zeros).
        s1.fill(0.0);
        s2.fill(0.0);
        moments::rows_grad_sums(xs, gs, None, means[k], s1, s2, pf, None);
        if let Some(dx) = dx {
            // The coefficients made and narrowed a chunk of channels at a time, in L1.
            let p = with_simd(
                #[inline(always)]
                || {
                    DxRows::from_chunks::<T>(
                        c,
                        #[inline(always)]
                        |first, out| {
                            let r = first..first + out.len();
                            coeffs(k, first, &s1[r.clone()], &s2[r], out)
                        },
                    )
                },
            );
            ew::dx_rows(xs, gs, dx, &p, stream, None);
            if stream {
                ew::stream_fence();
            }
        }
    });
    (sum_dy, sum_dy_xmu)
}

/// [`ghost_train_backward`] for groups of several units: every group's units' sums in one
/// parallel pass, added per group in order, the groups' coefficients, then dx in one more pass.
fn split_train_backward<T: Element>(
    (g, group_rows): (&Geometry, usize),
    (x, dy, dx): (&[T], &[T], Option<&mut [T]>),
    means: &[&[f64]],
    coeffs: impl Fn(usize, usize, &[f64], &[f64], &mut [DxCoeffs]),
) -> (Scratch<f64>, Scratch<f64>) {
    let (c, serial) = (g.channels, is_serial(g));
    let units = units(g, group_rows);
    let ranges = group_ranges(&units);
    let pf = prefetch_rows::<T>(g);
    let mut parts = Scratch::any(2 * c * units.len());
    let items: Vec<(&Unit, &mut [f64])> = units.iter().zip(parts.chunks_mut(2 * c)).collect();
    map_items(items, serial, |_, (u, part)| {
        // Zeroed here, by the task, in its own cache, rather than by the caller up front.
        part.fill(0.0);
        let (s1, s2) = part.split_at_mut(c);
        let r = u.rows.start * c..u.rows.end * c;
        moments::rows_grad_sums(&x[r.clone()], &dy[r], None, means[u.group], s1, s2, pf, None);
    });
    let (mut sum_dy, mut sum_dy_xmu) = (Scratch::any(ranges.len() * c), Scratch::any(ranges.len() * c));
    sum_dy.fill(0.0);
    sum_dy_xmu.fill(0.0);
    let groups = sum_dy.chunks_mut(c).zip(sum_dy_xmu.chunks_mut(c));
    for (r, (s1, s2)) in ranges.into_iter().zip(groups) {
        add_task_sums_into(&parts[2 * c * r.start..2 * c * r.end], s1, s2);
    }
    if let Some(dx) = dx {
        assert_eq!(dx.len(), x.len());
        // Each group's coefficients, group after group.
        let mut k = Scratch::any(sum_dy.len());
        with_simd(|| {
            let groups = sum_dy.chunks(c).zip(sum_dy_xmu.chunks(c)).zip(k.chunks_mut(c));
            for (group, ((s1, s2), out)) in groups.enumerate() {
                coeffs(group, 0, s1, s2, out);
            }
        });
        // x and dy were just read by the sums.
        let stream = stream_output::<T>(g, 2);
        let outs = split_units(dx, &units, c);
        // Last to first, as `input_grad_where` takes its units.
        let mut items: Vec<(&Unit, &mut [T])> = units.iter().zip(outs).collect();
        items.reverse();
        map_items(items, serial, |_, (u, os)| {
            // As in the forward, a unit's constants from its group's.
            let p = DxRows::new::<T>(&k[u.group * c..(u.group + 1) * c]);
            let r = u.rows.start * c..u.rows.end * c;
            ew::dx_rows(&x[r.clone()], &dy[r], os, &p, stream, None);
            if stream {
                ew::stream_fence();
            }
        });
    }
    (sum_dy, sum_dy_xmu)
}

/// Ghost training backward over the planes plan (channels-first, [`fuses_planes`]), with dx:
/// one unit per channel, which for each group of `group_planes` consecutive planes in turn takes
/// the group's (Σ dy, Σ dy·(x − mean)) with its own `means[group]` (the same pieces, added in
/// the same order, as [`super::train_backward_where`] over the group alone), its dx coefficients
/// from `coeffs(group, channel, Σdy, Σdy(x−m))`, and writes the group's dx while its planes are
/// in cache. Returns every group's sums, packed as [`GroupMoments`] are (group k's channel c at
/// k·C + c); each group's sums and dx are the bits of [`super::train_backward_where`] over the
/// group alone.
pub(crate) fn ghost_planes_backward<T: Element>(
    g: &Geometry,
    group_planes: usize,
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    means: &[&[f64]],
    coeffs: impl Fn(usize, usize, f64, f64) -> DxCoeffs + Sync + Send,
) -> (Vec<f64>, Vec<f64>) {
    assert!(fuses_planes(g, group_planes) && dx.len() == x.len() && dy.len() == x.len());
    let (c, groups) = (g.channels, g.outer.div_ceil(group_planes));
    assert_eq!(means.len(), groups);
    let stream = stream_output::<T>(g, 0);
    let prefetch_out = !stream && g.inner * std::mem::size_of::<T>() <= moments::PREFETCH_BYTES;
    let dxs = SharedOut::new(dx);
    let parts = map_items((0..c).collect(), is_serial(g), |ch, _: usize| {
        let mut sums = Vec::with_capacity(groups);
        for (k, first) in (0..g.outer).step_by(group_planes).enumerate() {
            let planes = first..(first + group_planes).min(g.outer);
            let (s1, s2) = planes_grad_sums(g, x, dy, None, None, None, ch, means[k][ch], planes.clone());
            let coeffs = coeffs(k, ch, s1, s2);
            for o in planes.clone() {
                let start = (o * c + ch) * g.inner;
                if prefetch_out && o + 1 < planes.end {
                    moments::prefetch(dxs.ptr.wrapping_add(start + c * g.inner), g.inner);
                }
                // SAFETY: plane (o, ch) belongs to unit ch alone.
                let op = unsafe { dxs.slice(start, g.inner) };
                let r = start..start + g.inner;
                ew::dx_plane(&x[r.clone()], &dy[r], op, coeffs, stream, None);
            }
            sums.push((s1, s2));
        }
        if stream {
            ew::stream_fence();
        }
        sums
    });
    let (mut sum_dy, mut sum_dy_xmu) = (vec![0.0; groups * c], vec![0.0; groups * c]);
    for (ch, channel) in parts.iter().enumerate() {
        for (k, &(s1, s2)) in channel.iter().enumerate() {
            sum_dy[k * c + ch] = s1;
            sum_dy_xmu[k * c + ch] = s2;
        }
    }
    (sum_dy, sum_dy_xmu)
}
