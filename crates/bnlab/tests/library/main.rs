//! Tests of the `bnlab` library in process, without running the built binary: the engine's layers
//! against finite differences, its training machinery, checkpoints, the IDX reader and batching,
//! the defences against damaged input, and the Figure 3 table. One binary, so the library is
//! linked into one test executable; each module is one former test file.

#[path = "../common/mod.rs"]
mod common;

mod alloc_tracking;

mod accelerate_table;
mod checkpoint;
mod data_idx;
mod engine_conv;
mod engine_fused;
mod engine_grad;
mod engine_masked;
mod engine_train;
mod engine_variants;
mod hardening;
mod padded;
