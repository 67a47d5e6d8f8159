//! Data-parallel training of `paper-mlp`, `accelerate` and `padded`: in-process ranks (threads)
//! always, real `mpirun` launches with the `mpi` feature. One binary, so the library is linked into
//! one test executable; each module is one former test file.

#[path = "../common/mod.rs"]
mod common;

mod accelerate_distributed;
mod distributed;
mod padded_distributed;
