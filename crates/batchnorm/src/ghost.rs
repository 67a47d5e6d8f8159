//! Ghost batch norm (Hoffer, Hubara & Soudry, NeurIPS 2017, "Train longer, generalize better:
//! closing the generalization gap in large batch training of neural networks"), as issue 16
//! defines it.
//!
//! With a virtual batch size v, the examples of a training batch are cut into consecutive groups
//! of v (the last one holds the rest, N mod v, when v does not divide N); each group is
//! normalized with its own statistics (Algorithm 1 of Ioffe & Szegedy 2015 on the group) and
//! backpropagated through them, so dx of a group depends on that group alone, and dγ, dβ are the
//! sums over groups. Every group needs at least 2 values per channel. The running statistics are
//! updated once per mini-batch, with the mean over groups of their means and of their unbiased
//! variances (every group weighing the same, as Ioffe & Szegedy's Algorithm 2 averages batches);
//! inference uses the running statistics, never groups.
//!
//! A group of consecutive examples is a contiguous slice of the buffer in every layout (the batch
//! dimension comes first). In the rows plan (NC, channels-last) a group is a run of consecutive
//! rows, and every group's statistics come from one pass over the rows, y from one more (the
//! backward likewise), each group cut into the units the plain kernels would cut it into alone
//! (`kernels::plan::ghost_train_forward`). Channels-first, where the plain kernels fuse each
//! channel's statistics and y (the sums and dx), one unit per channel takes every group's in
//! turn, each over the group's planes as the plain kernels take them
//! (`kernels::plan::ghost_planes_forward`); with fewer channels than that plan needs, each group
//! runs the plain kernels on its own slice, groups in parallel (several small groups to a task;
//! on the calling thread when they all make one task). Either way each group's results are the
//! bits of plain batch norm over that group alone, for any thread count (with v ≥ N exactly plain
//! batch norm's), and the groups' gradient sums are added in batch order.
//!
//! The layer's training forward fills the caller's [`SavedStats`] in place with
//! [`BatchNorm::forward_train_into`]: a ghost layer's statistics are groups × channels values per
//! vector, and a caller that keeps them between steps saves their allocation every step.
//!
//! Free functions: [`ghost_batch_norm_train`], [`ghost_batch_norm_backward`],
//! [`update_ghost_running_stats`]; on a [`BatchNorm`] layer, `BatchNormConfig::virtual_batch`.
//! Groups are local to a worker: the synchronized passes reject a ghost layer
//! ([`Error::GhostNotSynchronized`]), and groups are whole examples: the layer's masked training
//! passes reject a ghost layer too ([`Error::GhostNotMasked`]).

use crate::args::Scope;
use crate::backward::{centered_dx_coeffs, train_backward_sums, GradSums, StatsView};
use crate::check;
use crate::forward::{batch_norm_train, check_forward, scale_shift};
use crate::kernels::elementwise::DxCoeffs;
use crate::kernels::plan::{self, GroupMoments};
use crate::kernels::scratch::Scratch;
use crate::kernels::with_simd;
use crate::stats::{blend_running, exact_reciprocal, inv_std_in_place, BatchStats, Momentum, SavedStats};
use crate::{Affine, BatchNorm, Element, Error, Geometry, Grads, Layout, View};
use rayon::prelude::*;

/// What [`ghost_batch_norm_backward`] needs from [`ghost_batch_norm_train`]: the virtual batch
/// size and one [`SavedStats`] per group, in batch order (count, μ and 1/√(σ² + ε) of that group).
///
/// A [`BatchNorm`] layer keeps the same numbers in the one [`SavedStats`] its `forward_train`
/// returns: `count` the whole batch's values per channel, `mean` and `inv_std` G·C values, group
/// k's channel c at k·C + c (the group sizes follow from the input's shape and the layer's
/// virtual batch size). The layer packs them rather than returning a new type so that its
/// training passes keep their signatures: code that holds a layer's `SavedStats` between
/// `forward_train` and `backward` (a training engine, the candle drop-in) trains a ghost layer
/// unchanged, and a plain backward given packed statistics of more than one group rejects them
/// (their length is not C).
#[derive(Debug, Clone, PartialEq)]
pub struct GhostSaved {
    /// Examples per group (v ≥ 2); the last group holds the rest.
    pub virtual_batch: usize,
    /// Each group's saved statistics, in batch order.
    pub groups: Vec<SavedStats>,
}

/// A batch cut into groups of consecutive examples: each group's element range and shape.
struct Groups<'a> {
    /// The whole input's shape (dimension 0 is the batch).
    shape: &'a [usize],
    /// Elements of one example.
    per_example: usize,
    /// Values per channel of one example.
    values_per_example: u64,
    /// Examples per group.
    virtual_batch: usize,
}

impl<'a> Groups<'a> {
    /// The groups of a checked input of geometry `g`.
    fn new(shape: &'a [usize], g: &Geometry, virtual_batch: usize) -> Self {
        let batch = shape[0];
        Groups {
            shape,
            per_example: g.len() / batch,
            values_per_example: (g.per_channel() / batch) as u64,
            virtual_batch,
        }
    }

    /// Rows (rows plan, `g.inner` = 1) or planes per channel (channels-first) of a full group of
    /// the input, whose geometry is `g`.
    fn rows(&self, g: &Geometry) -> usize {
        self.virtual_batch * (g.outer / self.shape[0])
    }

    /// Number of groups: ⌈N / v⌉.
    fn len(&self) -> usize {
        self.shape[0].div_ceil(self.virtual_batch)
    }

    /// Examples of group `k`.
    fn examples(&self, k: usize) -> usize {
        self.virtual_batch.min(self.shape[0] - k * self.virtual_batch)
    }

    /// Values per channel of group `k`.
    fn count(&self, k: usize) -> u64 {
        self.examples(k) as u64 * self.values_per_example
    }

    /// Elements of a full group: the buffer is cut into chunks of this many, one per group
    /// (the last may be shorter).
    fn chunk(&self) -> usize {
        self.virtual_batch.min(self.shape[0]) * self.per_example
    }

    /// Groups per parallel task: enough for a task to reach the kernels' serial size, so that
    /// small groups are not spread one by one over threads.
    fn per_task(&self) -> usize {
        (plan::SERIAL_BELOW / self.chunk()).max(1)
    }

    /// `f` over one item per group (`items`, in batch order), the results in that order: on the
    /// calling thread when all the groups make one task (handing it to the pool would only add
    /// the hand-over), else in parallel, [`Groups::per_task`] groups to a task. Each group's
    /// result is the same bits on any thread.
    fn map<I: Send, R: Send>(&self, items: Vec<I>, f: impl Fn(I) -> R + Sync + Send) -> Vec<R> {
        if self.len() <= self.per_task() {
            items.into_iter().map(f).collect()
        } else {
            items.into_par_iter().with_min_len(self.per_task()).map(f).collect()
        }
    }

    /// The shape of a group of `len` elements: the input's, with its examples as the batch.
    fn shape_of(&self, len: usize) -> Vec<usize> {
        let mut shape = self.shape.to_vec();
        shape[0] = len / self.per_example;
        shape
    }

    /// Checks that every group holds at least 2 values per channel (only the last can hold
    /// fewer than the first): [`Error::GhostGroupTooSmall`].
    fn check_counts(&self) -> Result<(), Error> {
        (0..self.len()).try_for_each(|k| self.check_count(k, self.count(k)))
    }

    /// Checks that `count` values per channel are enough for group `k`.
    fn check_count(&self, k: usize, count: u64) -> Result<(), Error> {
        if count < 2 {
            return Err(Error::GhostGroupTooSmall {
                group: k,
                count,
                shape: self.shape.to_vec(),
            });
        }
        Ok(())
    }
}

/// Ghost batch norm's training forward: cuts the batch into groups of `virtual_batch`
/// consecutive examples (the last one holds the rest) and writes each group's
/// y = γ·(x − μ_g)/√(σ²_g + ε) + β with its own mean μ_g and biased variance σ²_g. Returns each
/// group's statistics, in batch order (for [`update_ghost_running_stats`]), and what
/// [`ghost_batch_norm_backward`] needs. `affine`'s `None`s mean γ = 1 / β = 0.
///
/// Rejects: what [`crate::batch_norm_train`] rejects (fewer than 2 values per channel in the
/// whole batch included, [`Error::TooFewValues`]), then a virtual batch size below 2
/// ([`Error::InvalidVirtualBatch`]) and a group with fewer than 2 values per channel
/// ([`Error::GhostGroupTooSmall`], e.g. a last group of one example without spatial dimensions).
///
/// ```
/// use batchnorm::{ghost_batch_norm_train, Affine, Layout, View};
/// let x = [1.0f64, 3.0, 10.0, 30.0, 5.0, 7.0]; // [N=6, C=1]
/// let mut y = [0.0; 6];
/// let (stats, saved) = ghost_batch_norm_train(View::new(&x, &[6, 1], Layout::NC), 4, Affine::NONE, 1e-5, &mut y).unwrap();
/// assert_eq!(saved.groups.len(), 2); // 4 examples, then 2
/// assert_eq!((stats[0].mean[0], stats[1].mean[0]), (11.0, 6.0));
/// assert!((y[4] + 1.0).abs() < 1e-4 && (y[5] - 1.0).abs() < 1e-4); // the last group's own statistics
/// ```
pub fn ghost_batch_norm_train<T: Element>(
    x: View<'_, T>,
    virtual_batch: usize,
    affine: Affine<'_, T>,
    eps: f64,
    y: &mut [T],
) -> Result<(Vec<BatchStats>, GhostSaved), Error> {
    let (mut mean, mut m2) = (Vec::new(), Vec::new());
    let out = GroupMoments {
        mean: &mut mean,
        m2: &mut m2,
        inv_std: None,
    };
    let counts = train_packed(x, virtual_batch, affine, eps, y, out)?;
    let (stats, saved) = packed_groups(&counts, &mean, &m2)
        .map(|(count, mean, m2)| {
            let stats = BatchStats {
                count,
                mean: mean.to_vec(),
                m2: m2.to_vec(),
            };
            let saved = stats.saved(eps)?;
            Ok((stats, saved))
        })
        .collect::<Result<Vec<_>, Error>>()?
        .into_iter()
        .unzip();
    Ok((
        stats,
        GhostSaved {
            virtual_batch,
            groups: saved,
        },
    ))
}

/// Each group's (count, means, M2) of a ghost training forward's statistics packed group after
/// group (group k's channel c at k·C + c), given each group's count, in batch order.
fn packed_groups<'a>(
    counts: &'a [u64],
    mean: &'a [f64],
    m2: &'a [f64],
) -> impl Iterator<Item = (u64, &'a [f64], &'a [f64])> {
    let channels = mean.len() / counts.len();
    let vectors = mean.chunks(channels).zip(m2.chunks(channels));
    counts.iter().zip(vectors).map(|(&n, (mean, m2))| (n, mean, m2))
}

/// [`ghost_batch_norm_train`]'s checks and work, the statistics left packed in `out` (written
/// only once every check has passed); returns each group's count, in batch order.
fn train_packed<T: Element>(
    x: View<'_, T>,
    virtual_batch: usize,
    affine: Affine<'_, T>,
    eps: f64,
    y: &mut [T],
    out: GroupMoments<'_>,
) -> Result<Vec<u64>, Error> {
    let (g, _) = check_forward(x, None, y, |_| Ok(()), affine)?;
    check::eps(eps)?;
    let View { data, shape, layout } = x;
    check::training_count(g.per_channel() as u64, shape)?;
    check::virtual_batch(virtual_batch)?;
    let groups = Groups::new(shape, &g, virtual_batch);
    groups.check_counts()?;
    let counts = (0..groups.len()).map(|k| groups.count(k)).collect();
    // The groups' 1/√(σ² + ε) from their biased variances, then (scale, shift) of channels
    // `first..`, as `batch_norm_train` makes them.
    let Affine { gamma, beta } = affine;
    let inv_std = |v: &mut [f64]| inv_std_in_place(v, eps);
    let constants = |first: usize, scale: &mut [f64], shift: &mut [f64]| scale_shift(gamma, beta, first, scale, shift);
    if g.inner == 1 {
        // The rows plan: every group's statistics in one pass over the rows, y in one more,
        // each group's the bits of `batch_norm_train` over the group alone.
        plan::ghost_train_forward(&g, data, y, groups.rows(&g), out, inv_std, constants);
        return Ok(counts);
    }
    if plan::fuses_planes(&g, groups.rows(&g)) {
        // Channels-first, where `batch_norm_train` fuses each channel's statistics and y: one
        // unit per channel takes every group's in turn, each group's the bits of
        // `batch_norm_train` over the group alone.
        plan::ghost_planes_forward(&g, groups.rows(&g), data, y, out, inv_std, constants);
        return Ok(counts);
    }
    // Channels-first with few channels: each group of planes runs the plain kernel on its slice
    // (the same bits whichever thread runs it), in parallel; the results come back in batch order.
    let items = data.chunks(groups.chunk()).zip(y.chunks_mut(groups.chunk())).collect();
    let stats = groups
        .map(items, |(xk, yk)| {
            let group_shape = groups.shape_of(xk.len());
            batch_norm_train(View::new(xk, &group_shape, layout), affine, eps, yk)
        })
        .into_iter()
        .collect::<Result<Vec<_>, Error>>()?;
    let GroupMoments { mean, m2, mut inv_std } = out;
    mean.clear();
    m2.clear();
    inv_std.iter_mut().for_each(|v| v.clear());
    for (stats, saved) in &stats {
        mean.extend_from_slice(&stats.mean);
        m2.extend_from_slice(&stats.m2);
        inv_std.iter_mut().for_each(|v| v.extend_from_slice(&saved.inv_std));
    }
    Ok(counts)
}

/// Ghost batch norm's training backward: each group's training-mode backward through its own
/// statistics (dx of a group from that group alone), and dγ = Σ dy·x̂, dβ = Σ dy summed over
/// every group; writes whichever of dx, dγ, dβ `grads` holds. The groups are cut as the forward
/// cut them, by `saved.virtual_batch`.
///
/// Rejects: shape/length mismatches between the shape and `x`, `dy`, `dx`; a virtual batch size
/// below 2 ([`Error::InvalidVirtualBatch`]); saved statistics of another number of groups than
/// the input makes ([`Error::GhostGroupsMismatch`]); a group's saved statistics of the wrong
/// channel count ([`Error::FeatureMismatch`]) or with fewer than 2 values per channel
/// ([`Error::GhostGroupTooSmall`]); γ, `dgamma`, `dbeta` of the wrong channel count.
pub fn ghost_batch_norm_backward<T: Element>(
    x: View<'_, T>,
    dy: &[T],
    saved: &GhostSaved,
    gamma: Option<&[T::Param]>,
    grads: Grads<'_, T>,
) -> Result<(), Error> {
    let views: Vec<StatsView> = saved.groups.iter().map(StatsView::from).collect();
    backward_views(x, dy, saved.virtual_batch, &views, gamma, grads)
}

/// [`ghost_batch_norm_backward`] given each group's saved statistics as views (checked here, in
/// the order that function documents).
fn backward_views<T: Element>(
    x: View<'_, T>,
    dy: &[T],
    virtual_batch: usize,
    saved: &[StatsView],
    gamma: Option<&[T::Param]>,
    grads: Grads<'_, T>,
) -> Result<(), Error> {
    let Grads { dx, dgamma, dbeta } = grads;
    let View { data, shape, layout } = x;
    let g = check::input("x", data, shape, layout)?;
    check::len("dy", &g, dy.len())?;
    check::len_opt("dx", &g, dx.as_deref())?;
    check::virtual_batch(virtual_batch)?;
    let groups = Groups::new(shape, &g, virtual_batch);
    check::ghost_groups(groups.len(), saved.len())?;
    for (k, s) in saved.iter().enumerate() {
        check::channels("saved.mean", g.channels, s.mean.len())?;
        check::channels("saved.inv_std", g.channels, s.inv_std.len())?;
        groups.check_count(k, s.count)?;
    }
    check::affine(g.channels, gamma, None)?;
    check::param_grads(g.channels, dgamma.as_deref(), dbeta.as_deref())?;
    let c = g.channels;
    let group_rows = groups.rows(&g);
    let total = match dx {
        // The rows plan: every group's sums in one pass over the rows, dx in one more, each
        // group's the bits of the plain backward over the group alone.
        dx if g.inner == 1 => {
            let means: Vec<&[f64]> = saved.iter().map(|s| s.mean).collect();
            // Inlined by force: the kernel calls it in its AVX2 code, once per group.
            let (s1, s2) = plan::ghost_train_backward(
                &g,
                data,
                dy,
                dx,
                group_rows,
                &means,
                #[inline(always)]
                |k, first, s1, s2, out| centered_dx_coeffs(gamma, saved[k], first, s1, s2, out),
            );
            group_totals(c, &s1, &s2, saved)
        }
        // Channels-first, where the plain backward fuses each channel's sums and dx: one unit
        // per channel takes every group's in turn, each group's the bits of the plain backward
        // over the group alone.
        Some(dx) if plan::fuses_planes(&g, group_rows) => {
            let means: Vec<&[f64]> = saved.iter().map(|s| s.mean).collect();
            let (s1, s2) = plan::ghost_planes_backward(&g, group_rows, data, dy, dx, &means, |k, ch, s1, s2| {
                let mut out = [DxCoeffs::default()];
                centered_dx_coeffs(gamma, saved[k], ch, &[s1], &[s2], &mut out);
                out[0]
            });
            group_totals(c, &s1, &s2, saved)
        }
        dx => {
            // Channels-first otherwise: each group's dx and sums on its own slices, in
            // parallel as in the forward.
            let chunk = groups.chunk();
            let dxs: Vec<Option<&mut [T]>> = match dx {
                Some(dx) => dx.chunks_mut(chunk).map(Some).collect(),
                None => (0..groups.len()).map(|_| None).collect(),
            };
            let items = data.chunks(chunk).zip(dy.chunks(chunk)).zip(dxs).zip(saved).collect();
            let sums = groups
                .map(items, |(((xk, dyk), dxk), s)| {
                    let group_g = layout.geometry(&groups.shape_of(xk.len()))?;
                    Ok(train_backward_sums(&group_g, xk, None, None, dyk, dxk, *s, gamma))
                })
                .into_iter()
                .collect::<Result<Vec<GradSums>, Error>>()?;
            // Added in batch order, so the bits do not depend on the threads.
            let mut sums = sums.into_iter();
            // At least one group: the input is not empty.
            let mut total = sums.next().expect("at least one group");
            for s in sums {
                total.add(&s)?;
            }
            total
        }
    };
    total.write_param_grads(dgamma, dbeta)
}

/// The sums over groups of each group's Σ dy and Σ dy·x̂ = inv_std·Σ dy·(x − μ), from the
/// groups' packed (Σ dy, Σ dy·(x − μ)) (group k's channel c at k·C + c), added in batch order
/// (as [`GradSums::add`] adds them). The channels are taken a chunk at a time, every group's
/// part of the chunk before the next, the chunks in parallel when there are many groups ×
/// channels: each channel's sums are the same bits either way.
fn group_totals(c: usize, sum_dy: &[f64], sum_dy_xmu: &[f64], saved: &[StatsView]) -> GradSums {
    let mut total = GradSums {
        sum_dy: vec![0.0; c],
        sum_dy_xhat: vec![0.0; c],
    };
    let chunk = |(k, (s1, s2)): (usize, (&mut [f64], &mut [f64]))| {
        with_simd(
            #[inline(always)]
            || totals_chunk(c, sum_dy, sum_dy_xmu, saved, k * ESTIMATE_CHUNK, s1, s2),
        )
    };
    let (t1, t2) = (&mut total.sum_dy, &mut total.sum_dy_xhat);
    if sum_dy.len() < plan::SERIAL_BELOW {
        t1.chunks_mut(ESTIMATE_CHUNK)
            .zip(t2.chunks_mut(ESTIMATE_CHUNK))
            .enumerate()
            .for_each(chunk);
    } else {
        let chunks = t1.par_chunks_mut(ESTIMATE_CHUNK).zip(t2.par_chunks_mut(ESTIMATE_CHUNK));
        chunks.enumerate().for_each(chunk);
    }
    total
}

/// [`group_totals`] of channels `start..start + t1.len()` into `t1` (Σ dy) and `t2` (Σ dy·x̂).
#[inline(always)]
fn totals_chunk(
    c: usize,
    sum_dy: &[f64],
    sum_dy_xmu: &[f64],
    saved: &[StatsView],
    start: usize,
    t1: &mut [f64],
    t2: &mut [f64],
) {
    let r = start..start + t1.len();
    let parts = sum_dy.chunks(c).zip(sum_dy_xmu.chunks(c)).zip(saved);
    for (k, ((s1, s2), s)) in parts.enumerate() {
        let xhat = s2[r.clone()].iter().zip(&s.inv_std[r.clone()]).map(|(v, s)| v * s);
        if k == 0 {
            t1.copy_from_slice(&s1[r.clone()]);
            t2.iter_mut().zip(xhat).for_each(|(a, b)| *a = b);
        } else {
            t1.iter_mut().zip(&s1[r.clone()]).for_each(|(a, b)| *a += b);
            t2.iter_mut().zip(xhat).for_each(|(a, b)| *a += b);
        }
    }
}

/// The ghost running-statistics estimate of a mini-batch: per channel the mean over groups of
/// their means and of their unbiased variances M2/(m − 1), every group weighing 1/G. Groups
/// checked and not empty. With one group, exactly that group's mean and unbiased variance.
///
/// Each channel's sums run over the groups in batch order; the channels are taken a chunk at a
/// time, every group's part of the chunk before the next chunk (so that the chunk's sums stay in
/// L1 rather than every group's pass reading and writing the whole vectors), the chunks in
/// parallel when there are many groups × channels. Each channel's result is the same bits either
/// way.
fn ghost_estimate<'a>(groups: impl Iterator<Item = (u64, &'a [f64], &'a [f64])>) -> (Vec<f64>, Vec<f64>) {
    let groups: Vec<_> = groups.collect();
    let channels = groups.first().expect("at least one group").1.len();
    let (mut mean, mut var) = (vec![0.0; channels], vec![0.0; channels]);
    let chunk = |(k, (mean, var)): (usize, (&mut [f64], &mut [f64]))| {
        with_simd(
            #[inline(always)]
            || estimate_chunk(&groups, k * ESTIMATE_CHUNK, mean, var),
        )
    };
    let chunks = mean.chunks_mut(ESTIMATE_CHUNK).zip(var.chunks_mut(ESTIMATE_CHUNK));
    if groups.len() * channels < plan::SERIAL_BELOW {
        chunks.enumerate().for_each(chunk);
    } else {
        let chunks = mean
            .par_chunks_mut(ESTIMATE_CHUNK)
            .zip(var.par_chunks_mut(ESTIMATE_CHUNK));
        chunks.enumerate().for_each(chunk);
    }
    (mean, var)
}

/// [`ghost_estimate`] of channels `start..start + mean.len()` into `mean` and `var`.
#[inline(always)]
fn estimate_chunk(groups: &[(u64, &[f64], &[f64])], start: usize, mean: &mut [f64], var: &mut [f64]) {
    // M2/(m − 1), as `BatchStats::var_unbiased`.
    let unbiased = |count: u64, m2: f64| m2 / (count as f64 - 1.0);
    let r = start..start + mean.len();
    let (first, rest) = groups.split_first().expect("at least one group");
    let &(count, m, m2) = first;
    mean.copy_from_slice(&m[r.clone()]);
    var.iter_mut()
        .zip(&m2[r.clone()])
        .for_each(|(a, &s)| *a = unbiased(count, s));
    for &(count, m, m2) in rest {
        mean.iter_mut().zip(&m[r.clone()]).for_each(|(a, b)| *a += b);
        var.iter_mut()
            .zip(&m2[r.clone()])
            .for_each(|(a, &s)| *a += unbiased(count, s));
    }
    // The number of groups (exact): divided by it, or multiplied by its exact reciprocal (the
    // same bits, no division).
    let n = groups.len() as f64;
    match exact_reciprocal(n) {
        Some(inv) => mean.iter_mut().chain(var.iter_mut()).for_each(|v| *v *= inv),
        None => mean.iter_mut().chain(var.iter_mut()).for_each(|v| *v /= n),
    }
}

/// Channels [`ghost_estimate`] takes at a time.
const ESTIMATE_CHUNK: usize = 512;

/// Updates running statistics with one ghost mini-batch, given its groups' statistics: the
/// running mean with the mean over groups of μ_g, the running variance with the mean over groups
/// of the unbiased m_g/(m_g − 1)·σ²_g (groups weigh equally, as in Algorithm 2), averaged as
/// [`crate::update_running_stats`] averages one batch (`batches_seen` counts mini-batches,
/// this one included). With one group it is [`crate::update_running_stats`] of that group.
///
/// Rejects: no groups ([`Error::NoBatches`]), groups of different channel counts
/// ([`Error::MergeMismatch`]) or whose vectors differ in length, running vectors whose length
/// differs from the channel count, an invalid momentum, a group with fewer than 2 values per
/// channel ([`Error::TooFewValues`]).
pub fn update_ghost_running_stats<T: Element>(
    groups: &[BatchStats],
    momentum: Momentum,
    batches_seen: u64,
    running_mean: &mut [T],
    running_var: &mut [T],
) -> Result<(), Error> {
    let first = groups.first().ok_or(Error::NoBatches)?;
    for s in groups {
        check::batch_stats(s)?;
        if s.channels() != first.channels() {
            return Err(Error::MergeMismatch {
                left: first.channels(),
                right: s.channels(),
            });
        }
    }
    check::running_stats(first.channels(), running_mean, running_var)?;
    check::momentum(momentum)?;
    for s in groups {
        check::training_count(s.count, &[])?;
    }
    let (mean, var) = ghost_estimate(groups.iter().map(|s| (s.count, &s.mean[..], &s.m2[..])));
    blend_running(&mean, &var, momentum, batches_seen, running_mean, running_var);
    Ok(())
}

impl GhostSaved {
    /// The groups of a layer's packed statistics (see the type's docs) for an input of `shape`
    /// in `layout`, as views into them. Rejects the shape as [`Layout::geometry`] does and
    /// packed vectors of another length than groups × channels ([`Error::FeatureMismatch`],
    /// named `saved.mean` or `saved.inv_std`).
    fn views<'a>(
        saved: &'a SavedStats,
        shape: &[usize],
        layout: Layout,
        virtual_batch: usize,
    ) -> Result<Vec<StatsView<'a>>, Error> {
        let g = layout.geometry(shape)?;
        let groups = Groups::new(shape, &g, virtual_batch);
        let c = g.channels;
        check::channels("saved.mean", groups.len() * c, saved.mean.len())?;
        check::channels("saved.inv_std", groups.len() * c, saved.inv_std.len())?;
        Ok((0..groups.len())
            .map(|k| StatsView {
                count: groups.count(k),
                mean: &saved.mean[k * c..(k + 1) * c],
                inv_std: &saved.inv_std[k * c..(k + 1) * c],
            })
            .collect())
    }
}

impl<T: Element> BatchNorm<T> {
    /// The layer's virtual batch size, checked ([`Error::InvalidVirtualBatch`] below 2).
    pub(crate) fn virtual_batch(&self) -> Result<Option<usize>, Error> {
        if let Some(v) = self.config.virtual_batch {
            check::virtual_batch(v)?;
        }
        Ok(self.config.virtual_batch)
    }

    /// The layer's virtual batch size as [`BatchNorm::virtual_batch`] checks it, then
    /// [`Error::GhostNotMasked`] when it is set and `scope` has a mask, [`Error::GhostNotFused`]
    /// when it is set and `scope` fuses a ReLU: what the layer's training passes check first,
    /// frozen or not.
    pub(crate) fn ghost_for<R>(&self, scope: &Scope<'_, R>) -> Result<Option<usize>, Error> {
        let virtual_batch = self.virtual_batch()?;
        if virtual_batch.is_some() && scope.mask.is_some() {
            return Err(Error::GhostNotMasked);
        }
        if virtual_batch.is_some() && scope.relu.is_some() {
            return Err(Error::GhostNotFused);
        }
        Ok(virtual_batch)
    }

    /// [`Error::GhostNotSynchronized`] when the layer has a virtual batch size: what the
    /// synchronized passes check first.
    pub(crate) fn reject_ghost(&self) -> Result<(), Error> {
        match self.config.virtual_batch {
            Some(_) => Err(Error::GhostNotSynchronized),
            None => Ok(()),
        }
    }

    /// The ghost training forward and, when tracked, one running-statistics update for the
    /// mini-batch; writes the groups' statistics packed (see [`GhostSaved`]) into `saved`,
    /// reusing its vectors' memory. On error `saved` is unchanged. The caller has checked what
    /// the running update could reject.
    pub(crate) fn forward_ghost(
        &mut self,
        x: View<'_, T>,
        virtual_batch: usize,
        y: &mut [T],
        saved: &mut SavedStats,
    ) -> Result<(), Error> {
        let eps = self.config.eps;
        // The groups' M2, only for the running estimate: a buffer of this thread's, of the
        // packed length (the input's shape was checked by the caller).
        let mut m2 = Scratch::any(x.shape[0].div_ceil(virtual_batch) * self.num_features);
        let out = GroupMoments {
            mean: &mut saved.mean,
            m2: &mut m2,
            inv_std: Some(&mut saved.inv_std),
        };
        let counts = train_packed(x, virtual_batch, self.affine(), eps, y, out)?;
        if self.config.track_running_stats {
            let seen = self.num_batches_tracked + 1;
            let (mean, var) = ghost_estimate(packed_groups(&counts, &saved.mean, &m2));
            let momentum = self.config.momentum;
            blend_running(
                &mean,
                &var,
                momentum,
                seen,
                &mut self.running_mean,
                &mut self.running_var,
            );
            self.num_batches_tracked = seen;
        }
        // `saved.inv_std` holds each group's 1/√(σ² + ε) as y used it: the bits
        // `BatchStats::saved` computes from the group's M2.
        saved.count = counts.iter().sum();
        Ok(())
    }

    /// The ghost training backward from the layer's packed statistics.
    pub(crate) fn backward_ghost(
        &self,
        x: View<'_, T>,
        dy: &[T],
        saved: &SavedStats,
        virtual_batch: usize,
        grads: Grads<'_, T>,
    ) -> Result<(), Error> {
        let views = GhostSaved::views(saved, x.shape, x.layout, virtual_batch)?;
        backward_views(
            x,
            dy,
            virtual_batch,
            &views,
            self.affine().gamma,
            self.param_grads(grads),
        )
    }
}
