//! The paper's experiments: each is a settings struct plus a training loop over the engine.

pub mod accelerate;
pub mod common;
pub mod eval;
pub mod metrics_log;
pub mod paper_mlp;
pub mod progress;
