//! Batch normalization (Ioffe & Szegedy, ICML 2015) as exact, fast kernels over flat buffers.
//!
//! - Training transform (Algorithm 1): [`batch_norm_train`], [`batch_norm_backward`].
//! - Inference transform (Algorithm 2): [`batch_norm_eval`], [`batch_norm_backward_eval`],
//!   population statistics [`PopulationStats`], running averages [`update_running_stats`].
//! - Split phases for synchronized (multi-worker) batch norm: [`batch_stats`] + [`BatchStats::merge`]
//!   + [`normalize`]; [`grad_sums`] + [`GradSums::add`] + [`input_grad`].
//! - Folding into the preceding layer: [`InferenceAffine`], [`fold_into_preceding`].
//! - Variants (see `docs/variants.md`): frozen batch norm ([`BatchNorm::freeze`]; over flat
//!   buffers it is [`batch_norm_eval`] + [`batch_norm_backward_eval`]), the small-batch policy
//!   ([`SmallBatch`]), batch renormalization ([`batch_renorm_train`], [`BatchRenorm`]).
//! - A stateful layer: [`BatchNorm`]; synchronized over workers: [`SyncBatchNorm`] with a
//!   [`Communicator`] ([`SingleProcess`], [`ThreadComm`]; MPI lives outside this crate).
//!
//! Layouts `NC`, `NCHW`, `NHWC` and any-rank channels-first/last ([`Layout`]); elements `f32` and
//! `f64` ([`Element`]). All arithmetic is carried out in `f64`; statistics use a two-pass scheme on
//! cache-sized pieces merged with Chan's formula (never E\[x²\] − E\[x\]²); results are bitwise
//! identical for any number of threads. Work runs on the current rayon pool.
//!
//! Shapes are checked once at each public function (see each function's "Rejects"); every error
//! is an [`Error`], never a panic. NaN and ±Inf values are data, not errors: they propagate per
//! IEEE 754 to the statistics and outputs of their channel.
//!
//! ```
//! use batchnorm::{batch_norm_backward, batch_norm_train, Layout};
//! let shape = [4, 2, 3, 3]; // NCHW
//! let x: Vec<f32> = (0..72).map(|i| (i as f32).sin()).collect();
//! let (gamma, beta) = (vec![1.5f32, 0.5], vec![0.0f32, 1.0]);
//! let mut y = vec![0.0; 72];
//! let (_stats, saved) = batch_norm_train(&x, &shape, Layout::NCHW, Some(&gamma), Some(&beta), 1e-5, &mut y).unwrap();
//! let dy = vec![1.0f32; 72];
//! let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; 72], vec![0.0; 2], vec![0.0; 2]);
//! batch_norm_backward(&x, &dy, &shape, Layout::NCHW, &saved, Some(&gamma), Some(&mut dx), Some(&mut dgamma), Some(&mut dbeta)).unwrap();
//! assert_eq!(dbeta, vec![36.0, 36.0]);
//! assert!(dx.iter().all(|v| v.abs() < 1e-5)); // a constant dy has no effect through the mean
//! ```

mod backward;
mod check;
mod element;
mod error;
mod fold;
mod forward;
mod frozen;
mod kernels;
mod layer;
pub mod reference;
mod renorm;
mod shape;
mod stats;
mod sync;

pub use backward::{batch_norm_backward, batch_norm_backward_eval, grad_sums, input_grad, GradSums};
pub use element::Element;
pub use error::Error;
pub use fold::{fold_into_preceding, InferenceAffine};
pub use forward::{batch_norm_eval, batch_norm_train, normalize};
pub use frozen::SmallBatch;
pub use layer::{BatchNorm, BatchNormConfig};
pub use renorm::{
    batch_renorm_backward, batch_renorm_eval, batch_renorm_train, update_renorm_stats, BatchRenorm, BatchRenormConfig,
    RenormClip, RenormSaved, RenormSchedule,
};
pub use shape::{Geometry, Layout};
pub use stats::{batch_stats, update_running_stats, BatchStats, Momentum, PopulationStats, SavedStats};
pub use sync::{
    check_gather, sync_batch_stats, sync_grad_sums, Communicator, Counted, SingleProcess, SyncBatchNorm, ThreadComm,
    Traffic,
};
