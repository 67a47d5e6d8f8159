#![doc = include_str!("../README.md")]

mod args;
mod backward;
mod check;
mod element;
mod error;
mod fold;
mod forward;
mod frozen;
mod fused;
mod ghost;
mod kernels;
mod layer;
mod masked;
pub mod reference;
mod renorm;
mod shape;
mod stats;
mod sync;

pub use args::{Affine, FixedStats, Grads, View};
pub use backward::{batch_norm_backward, batch_norm_backward_eval, grad_sums, input_grad, GradSums};
pub use element::Element;
pub use error::Error;
pub use fold::{fold_into_preceding, InferenceAffine};
pub use forward::{batch_norm_eval, batch_norm_train, normalize};
pub use frozen::SmallBatch;
pub use fused::{
    batch_norm_backward_add_relu, batch_norm_backward_eval_add_relu, batch_norm_backward_eval_relu,
    batch_norm_backward_relu, batch_norm_eval_add_relu, batch_norm_eval_relu, batch_norm_train_add_relu,
    batch_norm_train_relu, ReluMask,
};
pub use ghost::{ghost_batch_norm_backward, ghost_batch_norm_train, update_ghost_running_stats, GhostSaved};
pub use kernels::plan::LAST_LEVEL_CACHE_BYTES;
pub use layer::{BatchNorm, BatchNormConfig};
pub use masked::{
    batch_norm_backward_eval_masked, batch_norm_backward_masked, batch_norm_eval_masked, batch_norm_train_masked,
    batch_stats_masked, grad_sums_masked, input_grad_masked, normalize_masked,
};
pub use renorm::{
    batch_renorm_backward, batch_renorm_eval, batch_renorm_train, update_renorm_stats, BatchRenorm, BatchRenormConfig,
    RenormClip, RenormSaved, RenormSchedule, RenormStats,
};
pub use shape::{Geometry, Layout};
pub use stats::{batch_stats, update_running_stats, BatchStats, Momentum, PopulationStats, SavedStats};
pub use sync::{
    check_gather, sync_batch_stats, sync_grad_sums, Communicator, Counted, SingleProcess, SyncBatchNorm, ThreadComm,
    Traffic,
};
