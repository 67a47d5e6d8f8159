//! Data-parallel training: each rank of a [`Communicator`] trains on a contiguous shard of every
//! global mini-batch; gradients are summed over ranks (deterministically, the same bits on every
//! rank) so that the parameters stay identical everywhere, which [`DataParallel::check_replicas`]
//! verifies.
//!
//! Gradient convention: rank r scales its loss gradient by n_r/N (its shard's share of the global
//! batch of N), so every backward quantity is the derivative of the *global* mean loss through
//! rank r's examples, and the global gradient is the plain sum over ranks. With synchronized batch
//! norm this is exactly the one-process gradient of the global batch.
//!
//! The MPI communicator lives in `mpi` (the module `parallel::mpi`, cargo feature `mpi`).

#[cfg(feature = "mpi")]
pub mod mpi;

use crate::engine::{Layer, Sequential, StateValue};
use anyhow::{bail, ensure, Result};
use batchnorm::{Communicator, Counted, Traffic};
use std::ops::Range;
use std::sync::Arc;

/// The examples of a global batch of `n` that rank `rank` of `size` trains on: contiguous, in
/// rank order, sizes differing by at most one (`rank·n/size .. (rank+1)·n/size`).
pub fn shard(n: usize, rank: usize, size: usize) -> Range<usize> {
    let size = size.max(1);
    rank * n / size..(rank + 1) * n / size
}

/// A rank's view of data-parallel training: the communicator (counted, for the traffic figures)
/// and the gradient buffer.
pub struct DataParallel {
    comm: Arc<Counted<Arc<dyn Communicator>>>,
    grads: Vec<f32>,
}

impl DataParallel {
    /// Wraps `comm`; its traffic is counted from now on.
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        DataParallel {
            comm: Arc::new(Counted::new(comm)),
            grads: Vec::new(),
        }
    }

    /// The (counted) communicator, to hand to synchronized batch-norm layers.
    pub fn comm(&self) -> Arc<dyn Communicator> {
        self.comm.clone()
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Traffic since the previous call.
    pub fn take_traffic(&self) -> Traffic {
        self.comm.take()
    }

    /// Sums every parameter gradient of `net` and this rank's `loss_share` (its shard's loss
    /// weighted by n_r/N) over the ranks in one all-reduce; returns the global loss. The summed
    /// gradients are then available from [`DataParallel::grads`]. One collective call.
    pub fn all_reduce(&mut self, net: &mut Sequential, loss_share: f32) -> Result<f32> {
        self.grads.clear();
        for p in net.params() {
            self.grads.extend_from_slice(p.grad);
        }
        self.grads.push(loss_share);
        self.comm.all_reduce_sum_f32(&mut self.grads)?;
        Ok(self.grads.pop().unwrap_or(f32::NAN))
    }

    /// The gradients summed by the last [`DataParallel::all_reduce`], in parameter order.
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    /// Fails loudly unless every rank holds the same bits of the parameters (and, when
    /// `running_stats`, of the BN running statistics): all-gathers a 64-bit hash of them. One
    /// collective call; every rank reaches the same verdict.
    pub fn check_replicas(&self, net: &mut Sequential, running_stats: bool, step: u64) -> Result<()> {
        let mut h = Fnv::default();
        for p in net.params() {
            h.floats(p.value);
        }
        if running_stats {
            // The f32 states are the running (or, for renorm, moving) statistics; the f64
            // population accumulators are rank 0's alone.
            for bn in net.batchnorms() {
                for st in bn.state() {
                    if let StateValue::F32(v) = &st.value {
                        h.floats(v);
                    }
                }
            }
        }
        // Four 16-bit pieces, each exact in an f64.
        let mine: Vec<f64> = (0..4).map(|i| ((h.0 >> (16 * i)) & 0xffff) as f64).collect();
        let mut all = vec![0.0; 4 * self.size()];
        self.comm.all_gather_f64(&mine, &mut all)?;
        let hashes: Vec<u64> = all
            .chunks_exact(4)
            .map(|c| {
                c.iter()
                    .enumerate()
                    .fold(0u64, |acc, (i, &v)| acc | ((v as u64) << (16 * i)))
            })
            .collect();
        if hashes.iter().any(|&x| x != hashes[0]) {
            let list: Vec<String> = hashes.iter().map(|x| format!("{x:016x}")).collect();
            bail!(
                "the model replicas differ between ranks after step {step} (hash per rank: {}): data-parallel training is broken",
                list.join(", ")
            );
        }
        Ok(())
    }
}

/// FNV-1a over the bits of f32 values.
#[derive(Debug)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn floats(&mut self, v: &[f32]) {
        for x in v {
            for b in x.to_bits().to_le_bytes() {
                self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
}

/// Checks that a global batch of `batch` can be split over `size` ranks: every shard non-empty,
/// and with per-worker batch norm (`bn_sync` off) at least 2 examples per shard.
pub fn check_split(batch: usize, size: usize, bn_sync: bool) -> Result<()> {
    let smallest = batch / size.max(1);
    ensure!(
        smallest >= 1,
        "--batch {batch} cannot be split over {size} processes (each needs at least one example)"
    );
    ensure!(
        bn_sync || smallest >= 2,
        "--batch {batch} over {size} processes leaves shards of {smallest} example; batch norm with \
         --bn-sync off needs at least 2 per process"
    );
    Ok(())
}
