//! The kernel crate's integration tests, in one test binary (one link instead of one per file).
//! Each module checks one part against its definition; `common` holds the shared data, reference
//! and tolerance helpers (its docs derive every tolerance).

// Index loops over (element, channel) mirror the paper's formulas.
#![allow(clippy::needless_range_loop)]

#[path = "../common/mod.rs"]
mod common;

mod adversarial;
mod backward;
mod determinism;
mod errors;
mod fold;
mod forward;
mod fused;
mod ghost;
mod layouts;
mod masked;
mod renorm_sync;
mod stats;
mod sync;
mod variants;
