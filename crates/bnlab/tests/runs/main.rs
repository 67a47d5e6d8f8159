//! End-to-end tests that run the built `bnlab` binary: `paper-mlp`, `accelerate`, `small-batch`,
//! `padded`, checkpoints, `--resume` and `eval`, the run driver's guards, a closed output pipe, and
//! report pages rendered in headless Chromium. One binary, so the library is linked into one test
//! executable; each module is one former test file.

#[path = "../common/mod.rs"]
mod common;

mod accelerate_checkpoint;
mod accelerate_cli;
mod bench_variants;
mod checkpoint_cli;
mod cli_pipe;
mod padded_cli;
mod paper_mlp_cli;
mod report_browser;
mod run_guards;
mod small_batch_cli;
