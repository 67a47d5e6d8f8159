//! `bnlab`: a lab that reproduces the experiments of Ioffe & Szegedy (2015), "Batch Normalization:
//! Accelerating Deep Network Training by Reducing Internal Covariate Shift", on an explicit
//! forward/backward training engine built over the `batchnorm` kernel crate.
//!
//! Layout (data flows one way):
//! - [`data`]: IDX reader, datasets and deterministic batching.
//! - [`engine`]: one file per layer, explicit `forward`/`backward` over flat buffers; optimizer, schedules.
//! - [`dist`]: data-parallel training over a communicator (MPI with the `mpi` feature).
//! - [`monitor`]: distribution monitoring (percentiles of a layer's input during training).
//! - [`experiments`]: the paper's experiments as settings plus a training loop.
//! - [`report`]: plots (SVG/PNG) and the self-contained HTML page.
//! - [`bench`](mod@bench): the kernel benchmark behind `bnlab bench`.
//! - [`atomic`]: atomic file replacement (checkpoints, rewritten metrics).

pub mod atomic;
pub mod bench;
pub mod data;
pub mod dist;
pub mod engine;
pub mod experiments;
pub mod monitor;
pub mod report;
