//! The lab's experiments, each an [`Experiment`](crate::driver::Experiment) of the run driver:
//! its settings, its variants, its networks and its outputs.
//!
//! - [`paper_mlp`]: the paper's MNIST experiment (Section 4.1, Figure 1).
//! - [`accelerate`]: the "accelerating BN networks" study (Section 4.2, Figure 3) on a small conv net.
//! - [`small_batch`]: small and non-i.i.d. mini-batches, plain BN against its variants.
//! - [`padded`]: padded sequences, batch norm over every position against masked batch norm.
//! - [`convnet`]: the conv net both conv studies build.
//! - [`eval`]: test accuracy of a checkpoint of either (`bnlab eval`).

pub mod accelerate;
pub mod convnet;
pub mod eval;
pub mod padded;
pub mod paper_mlp;
pub mod small_batch;
