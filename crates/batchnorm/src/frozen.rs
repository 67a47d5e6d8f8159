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

use crate::backward::{batch_norm_backward_eval, GradSums};
use crate::check;
use crate::forward::{batch_norm_eval, gamma_at};
use crate::kernels::plan;
use crate::kernels::scratch::Scratch;
use crate::stats::{inv_std, SavedStats};
use crate::sync::{sync_grad_sums, Communicator};
use crate::{BatchNorm, Element, Error, Layout};

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

    /// The frozen training forward: the inference transform with the running statistics, and the
    /// statistics it used as [`SavedStats`] (mean and 1/√(σ²_run + ε)) with `count`.
    pub(crate) fn forward_frozen(
        &self,
        x: &[T],
        shape: &[usize],
        layout: Layout,
        y: &mut [T],
        count: u64,
    ) -> Result<SavedStats, Error> {
        if !self.config.track_running_stats {
            return Err(Error::NoRunningStats);
        }
        check::layer_input(self.num_features, shape, layout)?;
        let (gamma, beta) = self.gamma_beta();
        let (m, v, eps) = (&self.running_mean, &self.running_var, self.config.eps);
        batch_norm_eval(x, shape, layout, m, v, gamma, beta, eps, y)?;
        Ok(SavedStats {
            count,
            mean: m.iter().map(|a| a.to_f64()).collect(),
            inv_std: v.iter().map(|a| inv_std(a.to_f64(), eps)).collect(),
        })
    }

    /// The frozen backward with the running statistics as constants. `saved` is checked for its
    /// channel count only.
    pub(crate) fn backward_frozen(
        &self,
        x: &[T],
        dy: &[T],
        shape: &[usize],
        layout: Layout,
        saved: &SavedStats,
        dx: Option<&mut [T]>,
        dparams: Option<(&mut [T], &mut [T])>,
    ) -> Result<(), Error> {
        if !self.config.track_running_stats {
            return Err(Error::NoRunningStats);
        }
        check::layer_input(self.num_features, shape, layout)?;
        check::saved(saved, self.num_features)?;
        let (gamma, _) = self.gamma_beta();
        let (dg, db) = match (self.config.affine, dparams) {
            (true, Some((dg, db))) => (Some(dg), Some(db)),
            _ => (None, None),
        };
        let (m, v, eps) = (&self.running_mean, &self.running_var, self.config.eps);
        batch_norm_backward_eval(x, dy, shape, layout, m, v, eps, gamma, dx, dg, db)
    }

    /// The frozen backward of one rank's shard: dx locally (it needs no other rank), dγ and dβ of
    /// the global batch from the sums merged over `comm`; returns this rank's own sums.
    pub(crate) fn backward_frozen_sync(
        &self,
        comm: &dyn Communicator,
        x: &[T],
        dy: &[T],
        shape: &[usize],
        layout: Layout,
        saved: &SavedStats,
        dx: Option<&mut [T]>,
        dparams: Option<(&mut [T], &mut [T])>,
    ) -> Result<GradSums, Error> {
        if !self.config.track_running_stats {
            return Err(Error::NoRunningStats);
        }
        let g = check::layer_input(self.num_features, shape, layout)?;
        check::len("x", &g, x.len())?;
        check::len("dy", &g, dy.len())?;
        check::len_opt("dx", &g, dx.as_deref())?;
        check::saved(saved, self.num_features)?;
        check::running_stats(self.num_features, &self.running_mean, &self.running_var)?;
        check::eps(self.config.eps)?;
        let (gamma, _) = self.gamma_beta();
        if let Some(gm) = gamma {
            check::channels("gamma", self.num_features, gm.len())?;
        }
        if let (true, Some((dg, db))) = (self.config.affine, &dparams) {
            check::param_grads(self.num_features, Some(&**dg), Some(&**db))?;
        }
        let eps = self.config.eps;
        let inv = Scratch::collect(self.running_var.iter().map(|v| inv_std(v.to_f64(), eps)));
        let mean = Scratch::collect(self.running_mean.iter().map(|v| v.to_f64()));
        let (sum_dy, sum_dy_xmu) = plan::grad_sums(&g, x, dy, &mean);
        let local = GradSums {
            sum_dy_xhat: sum_dy_xmu.iter().zip(inv.iter()).map(|(v, s)| v * s).collect(),
            sum_dy,
        };
        let global = sync_grad_sums(comm, &local)?;
        if let Some(dx) = dx {
            let k = Scratch::collect((0..g.channels).map(|c| gamma_at(gamma, c) * inv[c]));
            plan::scale(&g, dy, dx, &k);
        }
        if let (true, Some((dg, db))) = (self.config.affine, dparams) {
            global.write_param_grads(Some(dg), Some(db))?;
        }
        Ok(local)
    }
}
