//! Masked batch norm: batch norm over the positions a mask selects (padded sequences, point
//! clouds, ragged batches).
//!
//! A mask holds one `bool` per value of a channel, shared by all channels: for an input of shape
//! `[N, C]` (NC) it has N entries, for `[N, C, d1, …, dk]` (channels-first, NCHW included) and
//! `[N, d1, …, dk, C]` (channels-last, NHWC included) it is a row-major `[N, d1, …, dk]`
//! (N·d1·…·dk entries), true where the position enters the statistics. Per channel, over the m
//! positions that are on:
//!
//! - μ_B and σ²_B (biased) of their values;
//! - y = γ·(x − μ_B)/√(σ²_B + ε) + β at those positions, y = 0 at the others;
//! - the backward is the exact derivative of that forward: at the positions that are on, plain
//!   batch norm's dx over those m values; dx = 0 at the others, whose dy adds nothing to
//!   dγ = Σ dy·x̂ and dβ = Σ dy;
//! - the running variance is updated with the unbiased m/(m − 1)·σ²_B of the m valid values.
//!
//! Masked values never leak: no value (of x or dy) at a position that is off reaches a
//! statistic or an output, and none is multiplied by 0. The reductions skip whole rows and
//! stretches that are off; inside a stretch with a few positions off, the moments gather the
//! values that are on into a buffer and sum them there, the gradient sums replace the others by
//! +0.0 lane by lane (both from the mask packed to one bit per position, once per call);
//! the element-wise passes write +0.0 at the positions that are off (long stretches of them are
//! not computed at all, in the others each value is selected before its one store). So a NaN or
//! 1e30 in padding changes no bit of any output.
//!
//! The statistics are computed with `f64` accumulation in the plain kernels' pieces and Chan
//! merges, a stretch that is all on through the plain loop itself: with a mask of all ones every
//! function here gives the same bits as its plain counterpart; with any mask, the same bits for
//! any number of threads.
//!
//! Free functions over flat buffers, in the crate's argument order with the mask right after the
//! input: [`batch_norm_train_masked`], [`batch_norm_backward_masked`], [`batch_norm_eval_masked`],
//! [`batch_norm_backward_eval_masked`], and the split phases of the synchronized form
//! ([`batch_stats_masked`], [`normalize_masked`], [`grad_sums_masked`], [`input_grad_masked`]);
//! the running-statistics update is [`crate::update_running_stats`] with the masked batch
//! statistics. On a [`BatchNorm`] layer: [`BatchNorm::forward_train_masked`],
//! [`BatchNorm::backward_masked`], [`BatchNorm::forward_eval_masked`],
//! [`BatchNorm::backward_eval_masked`] and the synchronized
//! [`BatchNorm::forward_train_masked_sync`] and [`BatchNorm::backward_masked_sync`] (also on
//! [`crate::SyncBatchNorm`]).

use crate::args::Scope;
use crate::backward::{backward_eval_where, backward_where, grad_sums_where, input_grad_where, GradSums};
use crate::forward::{eval_where, normalize_where, train_where};
use crate::stats::{batch_stats_where, BatchStats, SavedStats};
use crate::sync::Communicator;
use crate::{Affine, BatchNorm, Element, Error, FixedStats, Grads, View};

/// Masked training forward: per channel μ_B and σ²_B (biased) of the values at the positions
/// `mask` selects, y = γ·(x − μ_B)/√(σ²_B + ε) + β there and +0.0 at the other positions.
/// Returns the batch statistics (`count` = the number of selected values per channel, for
/// [`crate::update_running_stats`], which then makes the variance unbiased with that count) and
/// what [`batch_norm_backward_masked`] needs.
///
/// The mask holds one `bool` per value of a channel, shared by all channels, true where the
/// position enters: N entries for an NC input `[N, C]`, and a row-major `[N, d1, …, dk]` for a
/// channels-first `[N, C, d1, …, dk]` or channels-last `[N, d1, …, dk, C]` input (NCHW, NHWC).
/// No value of x at a position that is off is read into a statistic or an output: a NaN or an
/// infinity there changes nothing.
///
/// Rejects, in order: a shape that does not fit the layout, an empty shape, `x`/`y` lengths that
/// differ from the shape's, a mask whose length is not the number of values per channel
/// ([`Error::BufferLength`] named `mask`), γ/β lengths that differ from the channel count, ε not
/// finite and > 0, fewer than 2 selected values per channel ([`Error::TooFewValues`] with that
/// count). With a mask of all ones, the same bits as [`crate::batch_norm_train`].
///
/// ```
/// use batchnorm::{batch_norm_train_masked, Affine, Layout, View};
/// // [N=3, C=1]: the last example is padding, whatever it holds.
/// let x = [1.0f64, 3.0, f64::NAN];
/// let mut y = [0.0; 3];
/// let x = View::new(&x, &[3, 1], Layout::NC);
/// let (stats, _) = batch_norm_train_masked(x, &[true, true, false], Affine::NONE, 1e-12, &mut y).unwrap();
/// assert_eq!((stats.count, stats.mean[0]), (2, 2.0));
/// assert!((y[0] + 1.0).abs() < 1e-9 && (y[1] - 1.0).abs() < 1e-9 && y[2] == 0.0);
/// ```
pub fn batch_norm_train_masked<T: Element>(
    x: View<'_, T>,
    mask: &[bool],
    affine: Affine<'_, T>,
    eps: f64,
    y: &mut [T],
) -> Result<(BatchStats, SavedStats), Error> {
    train_where(x, Scope::masked(mask), affine, eps, y)
}

/// Masked training backward, the exact derivative of [`batch_norm_train_masked`]: at the
/// positions `mask` selects, plain batch norm's dx over the `saved.count` selected values; +0.0
/// at the others. dγ = Σ dy·x̂ and dβ = Σ dy over the selected positions only. Writes whichever of
/// dx, dγ, dβ `grads` holds.
///
/// Rejects, in order: shape/length mismatches between the shape and `x`, `dy`; a mask of the wrong
/// length ([`Error::BufferLength`] named `mask`); a `dx` of the wrong length; `saved`, γ, `dgamma`,
/// `dbeta` of the wrong channel count; saved statistics of fewer than 2 values per channel ([`Error::TooFewValues`]).
/// `saved.count` must be the number of selected values (what the forward returned).
pub fn batch_norm_backward_masked<T: Element>(
    x: View<'_, T>,
    mask: &[bool],
    dy: &[T],
    saved: &SavedStats,
    gamma: Option<&[T::Param]>,
    grads: Grads<'_, T>,
) -> Result<(), Error> {
    backward_where(x, Scope::masked(mask), dy, saved, gamma, grads)
}

/// Masked inference: y = γ·(x − E\[x\])/√(Var\[x\] + ε) + β with fixed statistics at the positions
/// `mask` selects, +0.0 at the others.
///
/// Rejects, in order: shape/length mismatches of `x` and `y`, a mask of the wrong length
/// ([`Error::BufferLength`] named `mask`), `stats.mean`/`stats.var`/γ/β of the wrong channel count,
/// ε not finite and > 0.
pub fn batch_norm_eval_masked<T: Element>(
    x: View<'_, T>,
    mask: &[bool],
    stats: FixedStats<'_, T>,
    affine: Affine<'_, T>,
    eps: f64,
    y: &mut [T],
) -> Result<(), Error> {
    eval_where(x, Scope::masked(mask), stats, affine, eps, y)
}

/// Masked inference-mode backward (fixed statistics as constants): dx = dy·γ/√(Var + ε) at the
/// positions `mask` selects, +0.0 at the others; dγ = Σ dy·x̂ and dβ = Σ dy over the selected
/// positions. The backward of a frozen layer's masked training pass.
///
/// Rejects, in order: shape/length mismatches of `x` and `dy`, a mask of the wrong length
/// ([`Error::BufferLength`] named `mask`), `stats.mean`/`stats.var`/γ/`dgamma`/`dbeta` of the
/// wrong channel count, ε not finite and > 0, a `dx` of the wrong length.
pub fn batch_norm_backward_eval_masked<T: Element>(
    x: View<'_, T>,
    mask: &[bool],
    dy: &[T],
    stats: FixedStats<'_, T>,
    gamma: Option<&[T::Param]>,
    eps: f64,
    grads: Grads<'_, T>,
) -> Result<(), Error> {
    backward_eval_where(x, Scope::masked(mask), dy, stats, gamma, eps, grads)
}

/// Count, mean and M2 per channel of the values at the positions `mask` selects: the first
/// phase of synchronized masked batch norm, merged over workers weighted by their counts
/// ([`BatchStats::merge`], [`crate::sync_batch_stats`]). A shard with no selected position has
/// `count` 0 and mean and M2 0, and contributes nothing to a merge.
///
/// Rejects: a shape that does not fit the layout, an empty shape, `x` of the wrong length, a mask
/// of the wrong length ([`Error::BufferLength`] named `mask`). Does not itself require two values
/// per channel; the training functions check the (global) count.
pub fn batch_stats_masked<T: Element>(x: View<'_, T>, mask: &[bool]) -> Result<BatchStats, Error> {
    batch_stats_where(x, Some(mask))
}

/// The masked normalization step given (global) statistics: y = (x − μ)·γ·inv_std + β at the
/// positions `mask` selects, +0.0 at the others; the second phase of synchronized masked batch
/// norm. With one worker, the same bits as [`batch_norm_train_masked`].
///
/// Rejects, in order: shape/length mismatches of `x` and `y`, a mask of the wrong length
/// ([`Error::BufferLength`] named `mask`), `saved` or γ/β of the wrong channel count.
pub fn normalize_masked<T: Element>(
    x: View<'_, T>,
    mask: &[bool],
    saved: &SavedStats,
    affine: Affine<'_, T>,
    y: &mut [T],
) -> Result<(), Error> {
    normalize_where(x, Some(mask), saved, affine, y)
}

/// Phase 1 of the split-phase masked backward: this worker's Σ dy and Σ dy·x̂ per channel over
/// the positions `mask` selects, to be added over workers ([`GradSums::add`]).
///
/// Rejects, in order: shape/length mismatches of `x` and `dy`, a mask of the wrong length
/// ([`Error::BufferLength`] named `mask`), `saved` of the wrong channel count, saved statistics of
/// fewer than 2 values per channel (`saved.count` is the global count of selected values).
pub fn grad_sums_masked<T: Element>(
    x: View<'_, T>,
    mask: &[bool],
    dy: &[T],
    saved: &SavedStats,
) -> Result<GradSums, Error> {
    grad_sums_where(x, Some(mask), dy, saved)
}

/// Phase 2 of the split-phase masked backward: dx from the merged (global) sums and the global
/// count of selected values in `saved.count`, at the positions `mask` selects, +0.0 at the
/// others. With one worker, the same bits as [`batch_norm_backward_masked`].
///
/// Rejects, in order: shape/length mismatches of `x` and `dy`, a mask of the wrong length
/// ([`Error::BufferLength`] named `mask`), a `dx` of the wrong length, `saved`, `sums` or γ of the
/// wrong channel count, saved statistics of fewer than 2 values per channel.
pub fn input_grad_masked<T: Element>(
    x: View<'_, T>,
    mask: &[bool],
    dy: &[T],
    saved: &SavedStats,
    sums: &GradSums,
    gamma: Option<&[T::Param]>,
    dx: &mut [T],
) -> Result<(), Error> {
    input_grad_where(x, Some(mask), dy, saved, sums, gamma, dx)
}

impl<T: Element> BatchNorm<T> {
    /// Masked training forward ([`batch_norm_train_masked`]) and, when tracked, a running-statistics
    /// update with the selected values' statistics (the variance unbiased with their count).
    ///
    /// Rejects what [`BatchNorm::forward_train`] rejects, and a mask of the wrong length
    /// ([`Error::BufferLength`] named `mask`, checked right after the input's channel count); fewer
    /// than 2 selected values per channel is [`Error::TooFewValues`] with that count. On error
    /// nothing (running statistics included) is changed. A layer with `config.virtual_batch` set
    /// (ghost batch norm) is rejected first, frozen or not: an invalid size as
    /// [`BatchNorm::forward_train`] rejects it, any other with [`Error::GhostNotMasked`].
    ///
    /// A frozen layer, and with [`crate::SmallBatch::UseRunningStats`] a batch of fewer than 2
    /// selected values per channel, is normalized with the running statistics at the selected
    /// positions (+0.0 at the others), which are not updated ([`batch_norm_eval_masked`]'s
    /// transform).
    ///
    /// ```
    /// use batchnorm::{BatchNorm, BatchNormConfig, Grads, Layout, View};
    /// let mut bn = BatchNorm::<f32>::new(2, BatchNormConfig::default()).unwrap();
    /// // Two sequences of length 3 (NCL [2, 2, 3]), the second padded after 1 step.
    /// let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
    /// let mask = [true, true, true, true, false, false];
    /// let x = View::new(&x, &[2, 2, 3], Layout::ChannelsFirst);
    /// let mut y = vec![0.0; 12];
    /// let saved = bn.forward_train_masked(x, &mask, &mut y).unwrap();
    /// assert_eq!(saved.count, 4);
    /// assert_eq!(&y[7..9], &[0.0, 0.0]);
    /// let (dy, mut dx) = (vec![1.0; 12], vec![0.0; 12]);
    /// let (mut dgamma, mut dbeta) = (vec![0.0; 2], vec![0.0; 2]);
    /// bn.backward_masked(x, &mask, &dy, &saved, Grads::new(&mut dx, &mut dgamma, &mut dbeta)).unwrap();
    /// assert_eq!(dbeta, vec![4.0; 2]);
    /// ```
    pub fn forward_train_masked(&mut self, x: View<'_, T>, mask: &[bool], y: &mut [T]) -> Result<SavedStats, Error> {
        self.forward_train_where(x, Scope::masked(mask), y)
    }

    /// Masked training backward ([`batch_norm_backward_masked`]): writes whichever of dx, dγ, dβ
    /// `grads` holds (dγ and dβ are ignored without affine). Rejects what
    /// [`batch_norm_backward_masked`] rejects and an input whose channel count differs from
    /// `num_features`; a ghost layer first, as [`BatchNorm::forward_train_masked`] does.
    ///
    /// A frozen layer, and with [`crate::SmallBatch::UseRunningStats`] saved statistics of fewer
    /// than 2 values per channel, backpropagates through the running statistics as constants
    /// ([`batch_norm_backward_eval_masked`]'s transform; `saved` is then only checked for its
    /// channel count): it rejects what that function rejects and [`Error::NoRunningStats`].
    pub fn backward_masked(
        &self,
        x: View<'_, T>,
        mask: &[bool],
        dy: &[T],
        saved: &SavedStats,
        grads: Grads<'_, T>,
    ) -> Result<(), Error> {
        self.backward_where(x, Scope::masked(mask), dy, saved, grads)
    }

    /// Masked inference with the running statistics ([`batch_norm_eval_masked`]). Rejects
    /// [`Error::NoRunningStats`] when they are not tracked, an input whose channel count differs
    /// from `num_features`, and what [`batch_norm_eval_masked`] rejects.
    pub fn forward_eval_masked(&self, x: View<'_, T>, mask: &[bool], y: &mut [T]) -> Result<(), Error> {
        self.forward_eval_where(x, Scope::masked(mask), y)
    }

    /// Masked inference-mode backward with the running statistics as constants
    /// ([`batch_norm_backward_eval_masked`]). Rejects [`Error::NoRunningStats`] when they are not
    /// tracked, an input whose channel count differs from `num_features`, and what
    /// [`batch_norm_backward_eval_masked`] rejects.
    pub fn backward_eval_masked(
        &self,
        x: View<'_, T>,
        mask: &[bool],
        dy: &[T],
        grads: Grads<'_, T>,
    ) -> Result<(), Error> {
        self.backward_eval_where(x, Scope::masked(mask), dy, grads)
    }

    /// Synchronized masked training forward of this rank's shard `x` and its `mask`: every rank's
    /// partial statistics of its selected values ([`batch_stats_masked`]) are merged weighted by
    /// their counts (Chan's formula, in rank order: the same bits on every rank; a rank with no
    /// selected position contributes nothing), the selected positions are normalized with the
    /// global statistics and the others written +0.0, and the running statistics (when tracked)
    /// are updated from the global batch, unbiased with the global count of selected values.
    /// Collective: every rank must call it.
    ///
    /// Rejects, before any communication, what [`BatchNorm::forward_train_sync`] rejects there and
    /// a mask of the wrong length ([`Error::BufferLength`] named `mask`); after the merge, a global
    /// batch with fewer than 2 selected values per channel ([`Error::TooFewValues`], with the
    /// global count, the same on every rank, and this rank's shape). Transport failures are
    /// [`Error::Communication`]. On error `y` and the running statistics are unchanged.
    ///
    /// A frozen layer normalizes its shard with the running statistics, without communicating;
    /// with [`crate::SmallBatch::UseRunningStats`] a global batch of fewer than 2 selected values
    /// per channel is normalized so too.
    pub fn forward_train_masked_sync(
        &mut self,
        comm: &dyn Communicator,
        x: View<'_, T>,
        mask: &[bool],
        y: &mut [T],
    ) -> Result<SavedStats, Error> {
        self.forward_train_sync_where(comm, x, Some(mask), y)
    }

    /// Synchronized masked training backward of this rank's shard: Σ dy and Σ dy·x̂ over the
    /// selected positions are added over all ranks of `comm`; writes dx (at the selected positions,
    /// +0.0 at the others) through the global statistics and, with affine, dγ and dβ of the
    /// *global* batch (identical on every rank). Returns this rank's own sums. Collective: every
    /// rank must call it.
    ///
    /// Rejects what [`grad_sums_masked`] and [`input_grad_masked`] reject, an input whose channels
    /// differ from `num_features`, `dgamma`/`dbeta` of the wrong channel count (before anything is
    /// written), and transport failures ([`Error::Communication`]). A frozen layer (or the
    /// small-batch policy) backpropagates through the running statistics as
    /// [`BatchNorm::backward_sync`] does, over the selected positions. A layer with
    /// `config.virtual_batch` set is rejected before anything else
    /// ([`Error::GhostNotSynchronized`]).
    pub fn backward_masked_sync(
        &self,
        comm: &dyn Communicator,
        x: View<'_, T>,
        mask: &[bool],
        dy: &[T],
        saved: &SavedStats,
        grads: Grads<'_, T>,
    ) -> Result<GradSums, Error> {
        self.backward_sync_where(comm, x, Some(mask), dy, saved, grads)
    }
}
