//! IDX reader, datasets and deterministic batching.
//!
//! - [`idx`]: reads MNIST-format (IDX) files, raw or gzip, into a [`Dataset`] of pixel bytes
//!   plus labels, checking every header against the data; [`load`] and [`load_with_classes`]
//!   read the train and test splits of a directory such as [`DEFAULT_DATA_DIR`] (Fashion-MNIST,
//!   from `apt-get install dataset-fashion-mnist`).
//! - [`batches`]: [`EpochShuffler`] gives the example indices of any global training step
//!   (a per-epoch permutation that depends only on the seed and the epoch), and [`gather`]
//!   copies those examples into flat batch buffers, converting pixels to `f32`
//!   ([`pixel_value`]); [`BatchOrder`] is what the training loop asks for a step's examples
//!   (an experiment may draw its batches otherwise).

pub mod batches;
pub mod idx;

pub use batches::{gather, BatchOrder, ClassGroupedBatches, EpochShuffler, GroupedBatchError, ShuffleError};
pub use idx::{
    load, load_split, load_with_classes, parse_images, parse_labels, pixel_value, pixels_to_f32, DataError, Dataset,
    Images, Labels, Split, DEFAULT_DATA_DIR, MAX_DECODED_BYTES, MAX_LABEL,
};
