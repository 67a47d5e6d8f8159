//! Synchronized batch norm: statistics and backward reductions over the global batch of all
//! ranks, from the kernel crate's split phases.

use super::Communicator;
use crate::shape::check_channels;
use crate::{
    batch_stats, grad_sums, input_grad, normalize, update_running_stats, BatchNorm, BatchNormConfig, BatchStats,
    Element, Error, GradSums, Layout, SavedStats,
};

/// Merges every rank's partial statistics into the global batch's: all-gathers (count, mean, M2)
/// and merges them in rank order with Chan's formula, so every rank gets the same bits. With one
/// rank the result is `local` itself.
///
/// Rejects a transport failure or ranks with different channel counts ([`Error::Communication`]).
pub fn sync_batch_stats(comm: &dyn Communicator, local: &BatchStats) -> Result<BatchStats, Error> {
    let c = local.channels();
    check_channels("m2", c, local.m2.len())?;
    let mut send = Vec::with_capacity(1 + 2 * c);
    send.push(local.count as f64); // exact below 2^53 values per channel
    send.extend_from_slice(&local.mean);
    send.extend_from_slice(&local.m2);
    let mut all = vec![0.0; send.len() * comm.size()];
    comm.all_gather_f64(&send, &mut all)?;
    let mut global = BatchStats {
        count: 0,
        mean: vec![0.0; c],
        m2: vec![0.0; c],
    };
    for part in all.chunks_exact(send.len()) {
        global.merge(&BatchStats {
            count: part[0] as u64,
            mean: part[1..1 + c].to_vec(),
            m2: part[1 + c..].to_vec(),
        })?;
    }
    Ok(global)
}

/// Adds every rank's backward sums (Σ dy, Σ dy·x̂) in rank order: the global sums, the same bits
/// on every rank. Rejects a transport failure or ranks with different channel counts.
pub fn sync_grad_sums(comm: &dyn Communicator, local: &GradSums) -> Result<GradSums, Error> {
    let c = local.sum_dy.len();
    check_channels("sum_dy_xhat", c, local.sum_dy_xhat.len())?;
    let send = [&local.sum_dy[..], &local.sum_dy_xhat[..]].concat();
    let mut all = vec![0.0; send.len() * comm.size()];
    comm.all_gather_f64(&send, &mut all)?;
    let mut parts = all.chunks_exact(send.len()).map(|p| GradSums {
        sum_dy: p[..c].to_vec(),
        sum_dy_xhat: p[c..].to_vec(),
    });
    let mut global = parts.next().ok_or_else(|| Error::Communication {
        message: "a communicator of no ranks".into(),
    })?;
    for p in parts {
        global.add(&p)?;
    }
    Ok(global)
}

/// Synchronized batch norm (PyTorch's `SyncBatchNorm`): each rank holds a shard of the global
/// mini-batch (shards may differ in size); the layer normalizes with the statistics of the whole
/// global batch, updates the running statistics from it (unbiased with the global count), and
/// backpropagates through the global statistics. γ, β and the running statistics live in `bn`
/// and stay identical on every rank when every rank applies the same updates.
///
/// The same operations are available on a plain [`BatchNorm`] as
/// [`BatchNorm::forward_train_sync`] and [`BatchNorm::backward_sync`]. With
/// [`crate::SingleProcess`] they compute the same bits as [`BatchNorm::forward_train`] and
/// [`BatchNorm::backward`] (tested for every layout).
#[derive(Debug, Clone, PartialEq)]
pub struct SyncBatchNorm<T: Element> {
    /// Parameters, running statistics and settings (shared with the one-process layer).
    pub bn: BatchNorm<T>,
}

impl<T: Element> SyncBatchNorm<T> {
    /// A fresh layer (see [`BatchNorm::new`], whose rejections it shares).
    pub fn new(num_features: usize, config: BatchNormConfig) -> Result<Self, Error> {
        Ok(SyncBatchNorm {
            bn: BatchNorm::new(num_features, config)?,
        })
    }

    /// See [`BatchNorm::forward_train_sync`].
    pub fn forward_train(
        &mut self,
        comm: &dyn Communicator,
        x: &[T],
        shape: &[usize],
        layout: Layout,
        y: &mut [T],
    ) -> Result<SavedStats, Error> {
        self.bn.forward_train_sync(comm, x, shape, layout, y)
    }

    /// See [`BatchNorm::backward_sync`].
    pub fn backward(
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
        self.bn.backward_sync(comm, x, dy, shape, layout, saved, dx, dparams)
    }
}

impl<T: Element> BatchNorm<T> {
    /// Training forward of this rank's shard `x` with the global batch's statistics (merged over
    /// `comm`); updates the running statistics (when tracked) from the global batch, unbiased
    /// with the global count. Collective: every rank must call it.
    ///
    /// Rejects, before any communication, what [`crate::batch_stats`] rejects (an empty shard
    /// included), a `y` of the wrong length, an input whose channels differ from `num_features`,
    /// an invalid momentum and running statistics of the wrong length; after the merge, a global
    /// batch with fewer than 2 values per channel ([`Error::TooFewValues`], with the global count
    /// and this rank's shape). Transport failures are [`Error::Communication`]. On error `y` and
    /// the running statistics are unchanged.
    pub fn forward_train_sync(
        &mut self,
        comm: &dyn Communicator,
        x: &[T],
        shape: &[usize],
        layout: Layout,
        y: &mut [T],
    ) -> Result<SavedStats, Error> {
        let g = layout.geometry(shape)?;
        check_channels("input", self.num_features, g.channels)?;
        crate::shape::check_len("y", &g, y.len())?;
        if self.config.track_running_stats {
            self.config.momentum.check()?;
            check_channels("running_mean", self.num_features, self.running_mean.len())?;
            check_channels("running_var", self.num_features, self.running_var.len())?;
        }
        let local = batch_stats(x, shape, layout)?;
        let global = sync_batch_stats(comm, &local)?;
        if global.count < 2 {
            return Err(Error::TooFewValues {
                count: global.count,
                shape: shape.to_vec(),
            });
        }
        let saved = global.saved(self.config.eps)?;
        let (gamma, beta) = self.gamma_beta();
        normalize(x, shape, layout, &saved, gamma, beta, y)?;
        if self.config.track_running_stats {
            let seen = self.num_batches_tracked + 1;
            update_running_stats(
                &mut self.running_mean,
                &mut self.running_var,
                &global,
                self.config.momentum,
                seen,
            )?;
            self.num_batches_tracked = seen;
        }
        Ok(saved)
    }

    /// Training backward of this rank's shard: merges Σ dy and Σ dy·x̂ over all ranks of `comm`,
    /// writes dx (when given) through the global statistics and, with affine, dγ and dβ of the
    /// *global* batch (identical on every rank). Returns this rank's own sums (its share of
    /// dγ = Σ dy·x̂ and dβ = Σ dy), for callers that sum parameter gradients over ranks themselves
    /// (data-parallel training). Collective: every rank must call it.
    ///
    /// Rejects what [`crate::grad_sums`] and [`crate::input_grad`] reject, an input whose channels
    /// differ from `num_features`, and transport failures ([`Error::Communication`]).
    pub fn backward_sync(
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
        let g = layout.geometry(shape)?;
        check_channels("input", self.num_features, g.channels)?;
        let local = grad_sums(x, dy, shape, layout, saved)?;
        let global = sync_grad_sums(comm, &local)?;
        let (gamma, _) = self.gamma_beta();
        if let Some(dx) = dx {
            input_grad(x, dy, shape, layout, saved, &global, gamma, dx)?;
        }
        if let (true, Some((dg, db))) = (self.config.affine, dparams) {
            global.write_param_grads(Some(dg), Some(db))?;
        }
        Ok(local)
    }
}
