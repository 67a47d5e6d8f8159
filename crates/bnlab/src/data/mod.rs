//! IDX reader, datasets and deterministic batching.
