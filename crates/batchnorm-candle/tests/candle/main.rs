//! The candle adapter's integration tests, in one test binary (one link instead of one per
//! file): parity with candle-nn's `BatchNorm`, the extras (safetensors, folding, population
//! statistics, rejected inputs) and the README's example. `common` holds the shared helpers.

#[path = "../common/mod.rs"]
mod common;

mod constructors;
mod extras;
mod fallback;
mod frozen;
mod ghost;
mod half;
mod masked;
mod parity;
mod readme;
mod relu;
mod renorm;
