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
    add_task_sums_into, is_serial, map_items, merge_task_moments, prefetch_rows, row_blocks, rows_task_moments,
    stream_output,
};
use crate::kernels::elementwise::{self as ew, DxCoeffs, DxRows, RowsAffine};
use crate::kernels::moments;
use crate::kernels::scratch::Scratch;
use crate::kernels::with_simd;
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

/// Per-channel moments of consecutive groups, packed: group k's channel c at k·C + c.
pub(crate) struct GroupMoments {
    /// Values per channel of each group.
    pub counts: Vec<f64>,
    /// Each group's means, group after group.
    pub mean: Vec<f64>,
    /// Each group's M2, group after group.
    pub m2: Vec<f64>,
}

/// Ghost training forward over the rows plan: the moments of each group of `group_rows`
/// consecutive rows (the same bits as [`super::channel_moments_where`] over the group alone),
/// then `affine(first, scale, shift)` turns a group's biased variances, given in `scale`, into
/// its (scale, shift) (as [`super::train_forward_where`]'s), and y is written group by group
/// with its own constants, as [`super::normalize_where`] writes it. Returns every group's
/// moments.
pub(crate) fn ghost_train_forward<T: Element>(
    g: &Geometry,
    x: &[T],
    y: &mut [T],
    group_rows: usize,
    affine: impl Fn(usize, &mut [f64], &mut [f64]) + Sync + Send,
) -> GroupMoments {
    assert_eq!(y.len(), x.len());
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
    let mut out = GroupMoments {
        counts: Vec::with_capacity(ranges.len()),
        mean: vec![0.0; ranges.len() * c],
        m2: vec![0.0; ranges.len() * c],
    };
    let groups = out.mean.chunks_mut(c).zip(out.m2.chunks_mut(c));
    for (r, (mean, m2)) in ranges.into_iter().zip(groups) {
        let parts = &parts[2 * c * r.start..2 * c * r.end];
        out.counts.push(merge_task_moments(&counts[r], parts, mean, m2));
    }
    // Each group's (scale, shift), group after group.
    let (mut scale, mut shift) = (Scratch::any(out.mean.len()), Scratch::any(out.mean.len()));
    with_simd(|| {
        let groups = scale.chunks_mut(c).zip(shift.chunks_mut(c)).zip(out.m2.chunks(c));
        for (((scale, shift), m2), &count) in groups.zip(&out.counts) {
            scale.iter_mut().zip(m2).for_each(|(s, m2)| *s = m2 / count);
            affine(0, scale, shift);
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
    out
}

/// Ghost training backward over the rows plan: each group's (Σ dy, Σ dy·(x − mean)) with its
/// own `means[group]` (the same bits as [`super::grad_sums_where`] over the group alone), then,
/// when `dx` is given, `coeffs(group, Σdy, Σdy(x−m), out)` writes a group's dx coefficients and
/// dx is written group by group with them, as [`super::input_grad_where`] writes it. Returns
/// every group's sums, packed as [`GroupMoments`] are.
pub(crate) fn ghost_train_backward<T: Element>(
    g: &Geometry,
    x: &[T],
    dy: &[T],
    dx: Option<&mut [T]>,
    group_rows: usize,
    means: &[&[f64]],
    coeffs: impl Fn(usize, &[f64], &[f64], &mut [DxCoeffs]) + Sync + Send,
) -> (Scratch<f64>, Scratch<f64>) {
    assert_eq!(dy.len(), x.len());
    let (c, serial) = (g.channels, is_serial(g));
    let units = units(g, group_rows);
    let ranges = group_ranges(&units);
    assert_eq!(means.len(), ranges.len());
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
                coeffs(group, s1, s2, out);
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
