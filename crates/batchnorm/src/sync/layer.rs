//! Synchronized batch norm: statistics and backward reductions over the global batch of all
//! ranks, from the kernel crate's split phases. The layer's synchronized passes are methods of
//! [`BatchNorm`] (in `layer.rs`, beside its one-process passes); [`SyncBatchNorm`] wraps it.

use super::Communicator;
use crate::check;
use crate::{BatchNorm, BatchNormConfig, BatchStats, Element, Error, GradSums, Grads, SavedStats, View};

/// Merges every rank's partial statistics into the global batch's: all-gathers (count, mean, M2)
/// and merges them in rank order with Chan's formula, so every rank gets the same bits. With one
/// rank the result is `local` itself.
///
/// Rejects a transport failure or ranks with different channel counts ([`Error::Communication`]).
pub fn sync_batch_stats(comm: &dyn Communicator, local: &BatchStats) -> Result<BatchStats, Error> {
    let c = local.channels();
    check::batch_stats(local)?;
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
    check::grad_sums(local)?;
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
    /// A fresh layer (see [`BatchNorm::new`], whose rejections it shares). Rejects, first, a
    /// configuration with a virtual batch size ([`Error::GhostNotSynchronized`]): ghost groups
    /// are local to a worker.
    pub fn new(num_features: usize, config: BatchNormConfig) -> Result<Self, Error> {
        if config.virtual_batch.is_some() {
            return Err(Error::GhostNotSynchronized);
        }
        Ok(SyncBatchNorm {
            bn: BatchNorm::new(num_features, config)?,
        })
    }

    /// See [`BatchNorm::forward_train_sync`].
    pub fn forward_train(&mut self, comm: &dyn Communicator, x: View<'_, T>, y: &mut [T]) -> Result<SavedStats, Error> {
        self.bn.forward_train_sync(comm, x, y)
    }

    /// See [`BatchNorm::backward_sync`].
    pub fn backward(
        &self,
        comm: &dyn Communicator,
        x: View<'_, T>,
        dy: &[T],
        saved: &SavedStats,
        grads: Grads<'_, T>,
    ) -> Result<GradSums, Error> {
        self.bn.backward_sync(comm, x, dy, saved, grads)
    }

    /// See [`BatchNorm::forward_train_masked_sync`].
    pub fn forward_train_masked(
        &mut self,
        comm: &dyn Communicator,
        x: View<'_, T>,
        mask: &[bool],
        y: &mut [T],
    ) -> Result<SavedStats, Error> {
        self.bn.forward_train_masked_sync(comm, x, mask, y)
    }

    /// See [`BatchNorm::backward_masked_sync`].
    pub fn backward_masked(
        &self,
        comm: &dyn Communicator,
        x: View<'_, T>,
        mask: &[bool],
        dy: &[T],
        saved: &SavedStats,
        grads: Grads<'_, T>,
    ) -> Result<GradSums, Error> {
        self.bn.backward_masked_sync(comm, x, mask, dy, saved, grads)
    }
}
