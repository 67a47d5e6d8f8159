//! Frozen batch norm and the small-batch policy: normalizing a training batch with the running
//! statistics instead of the batch's own.
//!
//! Frozen: y = γ·(x − μ_run)/√(σ²_run + ε) + β, running statistics never updated; the backward
//! treats them as constants: dx = γ·dy/√(σ²_run + ε), dγ = Σ dy·x̂, dβ = Σ dy. Over flat buffers
//! these are exactly the inference transforms [`crate::batch_norm_eval`] and
//! [`crate::batch_norm_backward_eval`] (given the running statistics); on a [`BatchNorm`] layer it
//! is a state ([`BatchNorm::freeze`], [`BatchNorm::unfreeze`], [`BatchNorm::is_frozen`],
//! [`BatchNorm::set_frozen`]) that its training passes obey until unfrozen.
//!
//! The small-batch policy ([`SmallBatch`], in [`crate::BatchNormConfig`]) applies the same
//! frozen transform to one training call whose batch has fewer than 2 values per channel.

use crate::args::Scope;
use crate::backward::{fixed_grad_sums, GradSums};
use crate::check;
use crate::forward::{check_forward, normalize_affine};
use crate::fused::ReluForward;
use crate::kernels::scratch::Scratch;
use crate::kernels::with_simd;
use crate::stats::{inv_std_in_place, inv_stds, SavedStats};
use crate::{BatchNorm, Element, Error, FixedStats, Geometry, Grads, View};

/// What a [`BatchNorm`] layer does with a training batch of fewer than 2 values per channel
/// (e.g. the last, short batch of an epoch with one example and no spatial dimensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SmallBatch {
    /// Reject it with [`Error::TooFewValues`] (the default; PyTorch's rule).
    #[default]
    Error,
    /// Normalize it with the running statistics, frozen for that call (no running-statistics
    /// update, no `num_batches_tracked` increment), and backpropagate through them as constants.
    /// Needs running statistics ([`Error::NoRunningStats`] otherwise).
    UseRunningStats,
}

impl<T: Element> BatchNorm<T> {
    /// Freezes the layer: from now on its training passes ([`BatchNorm::forward_train`],
    /// [`BatchNorm::backward`] and their synchronized forms) normalize with the running
    /// statistics, never update them, and treat them as constants in the backward.
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Unfreezes the layer: training passes use batch statistics again.
    pub fn unfreeze(&mut self) {
        self.frozen = false;
    }

    /// Whether the layer is frozen (to save with a checkpoint).
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Sets the frozen state (to restore it from a checkpoint).
    pub fn set_frozen(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    /// Whether a training pass over statistics of `count` values per channel uses the running
    /// statistics: the layer is frozen, or the batch is too small and the policy says so.
    pub(crate) fn uses_running_stats(&self, count: u64) -> bool {
        self.frozen || (count < 2 && self.config.small_batch == SmallBatch::UseRunningStats)
    }

    /// The frozen training forward: the inference transform with the running statistics (at the
    /// positions `scope.mask` selects, +0.0 elsewhere; `None`: all of them; with `scope.relu`,
    /// fused with what follows), and the statistics it used as [`SavedStats`] (mean and
    /// 1/√(σ²_run + ε)) with `count`.
    pub(crate) fn forward_frozen(
        &self,
        x: View<'_, T>,
        scope: Scope<'_, ReluForward<'_, T>>,
        y: &mut [T],
        count: u64,
    ) -> Result<SavedStats, Error> {
        let Scope { mask, relu } = scope;
        let FixedStats { mean, var } = self.running()?;
        check::layer_input(self.num_features, x.shape, x.layout)?;
        let (eps, affine) = (self.config.eps, self.affine());
        // The checks of the inference forward (`batch_norm_eval`), in its order.
        let (g, _) = check_forward(x, mask, y, |channels| check::fixed_stats(channels, mean, var), affine)?;
        ReluForward::check(relu.as_ref(), &g)?;
        check::eps(eps)?;
        // The statistics returned are the ones the transform uses, computed once.
        let mut inv_std: Vec<f64> = var.iter().map(|v| v.to_f64()).collect();
        with_simd(|| inv_std_in_place(&mut inv_std, eps));
        let saved = SavedStats {
            count,
            mean: mean.iter().map(|v| v.to_f64()).collect(),
            inv_std,
        };
        let scale = Scratch::collect(saved.inv_std.iter().copied());
        let relu = relu.map(|r| r.start(&g));
        normalize_affine(&g, x.data, y, &saved.mean, scale, affine, mask, relu);
        Ok(saved)
    }

    /// This rank's part of the frozen synchronized backward (see [`BatchNorm::backward_sync`]),
    /// after the input's checks (`g`): checks the rest in the inference backward's way (`saved`
    /// for its channel count only) and returns this rank's Σ dy and Σ dy·x̂ over the positions
    /// `mask` selects (`None`: all of them) through the `running` statistics as constants, with
    /// each channel's 1/√(σ²_run + ε) for dx.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn frozen_local_sums(
        &self,
        g: &Geometry,
        x: &[T],
        mask: Option<&[bool]>,
        dy: &[T],
        saved: &SavedStats,
        running: FixedStats<'_, T>,
        grads: &Grads<'_, T>,
    ) -> Result<(GradSums, Scratch<f64>), Error> {
        check::len("x", g, x.len())?;
        check::len("dy", g, dy.len())?;
        check::len_opt("dx", g, grads.dx.as_deref())?;
        check::mask(g, mask)?;
        check::saved(saved, self.num_features)?;
        check::running_stats(self.num_features, running.mean, running.var)?;
        check::eps(self.config.eps)?;
        check::affine(self.num_features, self.affine().gamma, None)?;
        check::param_grads(self.num_features, grads.dgamma.as_deref(), grads.dbeta.as_deref())?;
        let eps = self.config.eps;
        let inv = inv_stds(running.var, eps);
        Ok((fixed_grad_sums(g, x, dy, mask, None, running.mean, &inv), inv))
    }
}
