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

use crate::backward::{backward_eval_where, fixed_grad_sums, fixed_input_grad, GradSums};
use crate::check;
use crate::forward::{check_forward, normalize_affine};
use crate::fused::{ReluBackward, ReluForward};
use crate::kernels::scratch::Scratch;
use crate::kernels::with_simd;
use crate::stats::{inv_std, inv_std_in_place, SavedStats};
use crate::sync::{sync_grad_sums, Communicator};
use crate::{BatchNorm, Element, Error, FixedStats, Grads, View};

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
    /// positions `mask` selects, +0.0 elsewhere; `None`: all of them; with `relu`, fused with what
    /// follows), and the statistics it used as [`SavedStats`] (mean and 1/√(σ²_run + ε)) with
    /// `count`.
    pub(crate) fn forward_frozen(
        &self,
        x: View<'_, T>,
        mask: Option<&[bool]>,
        relu: Option<ReluForward<'_, T>>,
        y: &mut [T],
        count: u64,
    ) -> Result<SavedStats, Error> {
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

    /// The frozen backward with the running statistics as constants (over the positions `mask`
    /// selects, dx +0.0 elsewhere; `None`: all of them; with `relu`, through a fused ReLU).
    /// `saved` is checked for its channel count only.
    pub(crate) fn backward_frozen(
        &self,
        x: View<'_, T>,
        mask: Option<&[bool]>,
        relu: Option<ReluBackward<'_, T>>,
        dy: &[T],
        saved: &SavedStats,
        grads: Grads<'_, T>,
    ) -> Result<(), Error> {
        let running = self.running()?;
        check::layer_input(self.num_features, x.shape, x.layout)?;
        check::saved(saved, self.num_features)?;
        let (gamma, eps) = (self.affine().gamma, self.config.eps);
        backward_eval_where(x, mask, relu, dy, running, gamma, eps, self.param_grads(grads))
    }

    /// The frozen backward of one rank's shard (over the positions `mask` selects; `None`: all of
    /// them): dx locally (it needs no other rank), dγ and dβ of the global batch from the sums
    /// merged over `comm`; returns this rank's own sums.
    pub(crate) fn backward_frozen_sync(
        &self,
        comm: &dyn Communicator,
        x: View<'_, T>,
        mask: Option<&[bool]>,
        dy: &[T],
        saved: &SavedStats,
        grads: Grads<'_, T>,
    ) -> Result<GradSums, Error> {
        let running = self.running()?;
        let g = check::layer_input(self.num_features, x.shape, x.layout)?;
        let Grads { dx, dgamma, dbeta } = self.param_grads(grads);
        check::len("x", &g, x.data.len())?;
        check::len("dy", &g, dy.len())?;
        check::len_opt("dx", &g, dx.as_deref())?;
        check::mask(&g, mask)?;
        check::saved(saved, self.num_features)?;
        check::running_stats(self.num_features, running.mean, running.var)?;
        check::eps(self.config.eps)?;
        let gamma = self.affine().gamma;
        check::affine(self.num_features, gamma, None)?;
        check::param_grads(self.num_features, dgamma.as_deref(), dbeta.as_deref())?;
        let eps = self.config.eps;
        let inv = Scratch::collect(running.var.iter().map(|v| inv_std(v.to_f64(), eps)));
        let local = fixed_grad_sums(&g, x.data, dy, mask, None, running.mean, &inv);
        let global = sync_grad_sums(comm, &local)?;
        if let Some(dx) = dx {
            fixed_input_grad(&g, dy, mask, None, gamma, &inv, dx);
        }
        global.write_param_grads(dgamma, dbeta)?;
        Ok(local)
    }
}
