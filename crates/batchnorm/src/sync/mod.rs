//! Synchronized (multi-worker) batch norm: a [`Communicator`] abstraction, an in-process
//! implementation over threads ([`ThreadComm`]), the one-process [`SingleProcess`], and
//! [`SyncBatchNorm`], whose statistics and backward reductions cover the global batch spread over
//! all workers.
//!
//! The kernel crate knows nothing of MPI: an MPI communicator implements [`Communicator`]
//! elsewhere (`bnlab`'s `mpi` feature). Every merge gathers all workers' partials and combines
//! them in rank order (Chan's formula for statistics, addition for gradient sums), so every
//! worker computes the same bits.

mod comm;
mod counted;
mod layer;
mod threads;

pub use comm::{check_gather, Communicator, SingleProcess};
pub use counted::{Counted, Traffic};
pub use layer::{sync_batch_stats, sync_grad_sums, SyncBatchNorm};
pub use threads::ThreadComm;
