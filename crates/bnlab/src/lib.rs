//! `bnlab`: a lab that reproduces the experiments of Ioffe & Szegedy (2015), "Batch Normalization:
//! Accelerating Deep Network Training by Reducing Internal Covariate Shift", on an explicit
//! forward/backward training engine built over the `batchnorm` kernel crate.
//!
//! Layout (data flows one way):
//! - [`data`]: IDX reader, datasets and deterministic batching.
//! - [`engine`]: one file per layer, explicit `forward`/`backward` over flat buffers; optimizer, schedules.
//! - [`parallel`]: data-parallel training over a communicator (MPI with the `mpi` feature).
//! - [`monitor`]: distribution monitoring (percentiles of a layer's input during training).
//! - [`driver`]: the run driver: start, resume, training loop, evaluation, lanes, outputs.
//! - [`experiments`]: the paper's experiments as plug-ins of the driver.
//! - [`report`]: plots (SVG/PNG) and the self-contained HTML page.
//! - [`bench`](mod@bench): the kernel benchmark behind `bnlab bench`.
//! - [`atomic`]: atomic file replacement (checkpoints, rewritten metrics).

pub mod atomic;
pub mod bench;
pub mod data;
pub mod driver;
pub mod engine;
pub mod experiments;
pub mod monitor;
pub mod parallel;
pub mod report;
