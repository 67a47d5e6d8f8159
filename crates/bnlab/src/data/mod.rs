//! IDX reader, datasets and deterministic batching.
//!
//! - [`idx`]: reads MNIST-format (IDX) files, raw or gzip, into a [`Dataset`] of pixels scaled
//!   to `[0, 1]` plus labels, checking every header against the data; [`load`] reads the
//!   train and test splits of a directory such as [`DEFAULT_DATA_DIR`] (Fashion-MNIST, from
//!   `apt-get install dataset-fashion-mnist`).
//! - [`batches`]: [`EpochShuffler`] gives the example indices of any global training step
//!   (a per-epoch permutation that depends only on the seed and the epoch), and [`gather`]
//!   copies those examples into flat batch buffers.

pub mod batches;
pub mod idx;

pub use batches::{gather, EpochShuffler, ShuffleError};
pub use idx::{
    load, load_split, parse_images, parse_labels, DataError, Dataset, Images, Labels, Split, DEFAULT_DATA_DIR,
    MAX_DECODED_BYTES, MAX_LABEL,
};
