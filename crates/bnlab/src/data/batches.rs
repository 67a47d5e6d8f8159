//! Deterministic shuffled mini-batches, addressable by global step.
//!
//! Training runs in epochs; each epoch visits the examples in a fresh random order, cut into
//! `len / batch` batches (the last partial batch is dropped, so every batch is full). The order
//! of epoch `e` depends only on `(seed, e)`: it is a Fisher–Yates shuffle of `0..len` driven by a
//! [`ChaCha8Rng`] keyed by [`epoch_key`]`(seed, e)`. The batch of any global step can therefore be
//! computed directly, without replaying the steps before it, which is what resuming from a
//! checkpoint needs, and what lets data-parallel workers agree on the same global batch.
//!
//! ```
//! use bnlab::data::batches::EpochShuffler;
//!
//! let mut shuffler = EpochShuffler::new(10, 3, 42).unwrap();
//! assert_eq!(shuffler.batches_per_epoch(), 3); // 9 of the 10 examples per epoch
//! let step_4 = shuffler.batch_indices(4).to_vec(); // epoch 1, second batch
//! let mut fresh = EpochShuffler::new(10, 3, 42).unwrap();
//! assert_eq!(fresh.batch_indices(4), step_4.as_slice());
//! ```

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::idx::{pixels_to_f32, Dataset};

/// Why an [`EpochShuffler`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShuffleError {
    /// The batch size is zero.
    #[error("batch size must be at least 1")]
    ZeroBatch,
    /// The batch size exceeds the number of examples, so not even one full batch exists.
    #[error("batch size {batch} is larger than the {len} examples available")]
    BatchTooLarge {
        /// The batch size asked for.
        batch: usize,
        /// The number of examples.
        len: usize,
    },
}

/// The 32-byte ChaCha8 key of epoch `epoch` under `seed`: `seed` as 8 little-endian bytes,
/// `epoch` as 8 little-endian bytes, then the 16 ASCII bytes `"bnlab-epoch-perm"`.
///
/// Distinct `(seed, epoch)` pairs give distinct keys, hence independent streams.
pub fn epoch_key(seed: u64, epoch: u64) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..].copy_from_slice(b"bnlab-epoch-perm");
    key
}

/// A uniform integer in `0..n` (`n > 0`), by Lemire's multiply-and-reject method on 64-bit
/// draws: unbiased, and fixed here rather than borrowed from `rand`, so the permutations do not
/// change with `rand`'s version.
pub(crate) fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    debug_assert!(n > 0);
    let mut m = u128::from(rng.next_u64()) * u128::from(n);
    if (m as u64) < n {
        let threshold = n.wrapping_neg() % n;
        while (m as u64) < threshold {
            m = u128::from(rng.next_u64()) * u128::from(n);
        }
    }
    (m >> 64) as u64
}

/// Writes the permutation of epoch `epoch` of `0..len` under `seed` into `perm`.
///
/// Fisher–Yates from the back: for `i` from `len - 1` down to 1, swap `perm[i]` with
/// `perm[j]`, `j` uniform in `0..=i`.
pub fn epoch_permutation_into(len: usize, seed: u64, epoch: u64, perm: &mut Vec<usize>) {
    perm.clear();
    perm.extend(0..len);
    let mut rng = ChaCha8Rng::from_seed(epoch_key(seed, epoch));
    for i in (1..len).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        perm.swap(i, j);
    }
}

/// The batches of a training run: which examples make up the batch of each global step.
///
/// Step `s` (0-based) belongs to epoch `s / batches_per_epoch`, and is batch
/// `s % batches_per_epoch` of that epoch's permutation. The current epoch's permutation is
/// cached, so consecutive steps cost a slice; moving to another epoch recomputes it (`O(len)`).
#[derive(Debug, Clone)]
pub struct EpochShuffler {
    len: usize,
    batch: usize,
    seed: u64,
    batches_per_epoch: usize,
    /// The epoch whose permutation `perm` holds, if any.
    cached: Option<u64>,
    perm: Vec<usize>,
}

impl EpochShuffler {
    /// A shuffler over `len` examples in batches of `batch`, with permutations drawn from
    /// `seed`.
    ///
    /// # Errors
    /// [`ShuffleError::ZeroBatch`] if `batch == 0`, [`ShuffleError::BatchTooLarge`] if
    /// `batch > len`.
    pub fn new(len: usize, batch: usize, seed: u64) -> Result<Self, ShuffleError> {
        if batch == 0 {
            return Err(ShuffleError::ZeroBatch);
        }
        if batch > len {
            return Err(ShuffleError::BatchTooLarge { batch, len });
        }
        Ok(Self {
            len,
            batch,
            seed,
            batches_per_epoch: len / batch,
            cached: None,
            perm: Vec::new(),
        })
    }

    /// Number of examples shuffled.
    pub fn examples(&self) -> usize {
        self.len
    }

    /// Examples per batch.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// The seed the permutations are drawn from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Full batches per epoch: `len / batch` (at least 1).
    pub fn batches_per_epoch(&self) -> usize {
        self.batches_per_epoch
    }

    /// The epoch global step `step` falls in.
    pub fn epoch_of(&self, step: u64) -> u64 {
        step / self.batches_per_epoch as u64
    }

    /// The permutation of `0..len` used in epoch `epoch`.
    pub fn permutation(&mut self, epoch: u64) -> &[usize] {
        if self.cached != Some(epoch) {
            epoch_permutation_into(self.len, self.seed, epoch, &mut self.perm);
            self.cached = Some(epoch);
        }
        &self.perm
    }

    /// The example indices (`batch` of them, distinct) of global training step `step`
    /// (0-based).
    pub fn batch_indices(&mut self, step: u64) -> &[usize] {
        let per_epoch = self.batches_per_epoch as u64;
        let epoch = step / per_epoch;
        // `< batches_per_epoch`, so it fits in usize and the slice ends within `len`.
        let start = (step % per_epoch) as usize * self.batch;
        let batch = self.batch;
        &self.permutation(epoch)[start..start + batch]
    }
}

/// Which examples make up the batch of each global training step. The batch of a step must
/// depend on the step alone (and on what the order was built from), never on the steps asked for
/// before it: a resumed run asks from its checkpoint's step on and must get the same batches.
pub trait BatchOrder: Send {
    /// The example indices of global training step `step` (0-based).
    fn batch_indices(&mut self, step: u64) -> &[usize];
}

impl BatchOrder for EpochShuffler {
    fn batch_indices(&mut self, step: u64) -> &[usize] {
        EpochShuffler::batch_indices(self, step)
    }
}

/// Why a [`ClassGroupedBatches`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupedBatchError {
    /// The batch size or the classes per batch is zero.
    #[error("batch size and classes per batch must be at least 1")]
    Zero,
    /// Fewer classes have enough examples than a batch draws from.
    #[error(
        "a batch of {batch} from {classes_per_batch} classes needs {classes_per_batch} classes with at least {per_class} \
         examples each; the data has {usable}"
    )]
    TooFewClasses {
        /// The batch size.
        batch: usize,
        /// Classes per batch.
        classes_per_batch: usize,
        /// Examples the batch takes from one class (at most).
        per_class: usize,
        /// Classes with at least that many examples.
        usable: usize,
    },
}

/// Non-i.i.d. batches, as in the non-i.i.d. experiment of Ioffe (2017, Batch Renormalization,
/// Section 4.3), where each batch drew pairs of examples of the same label: every batch holds
/// examples of `k = min(classes_per_batch, batch)` classes only. For global step `s`, a
/// [`ChaCha8Rng`] keyed by `(seed, s)` chooses `k` distinct classes uniformly among those with
/// enough examples, then `batch / k` distinct examples of each uniformly within its class (the
/// first `batch % k` chosen classes give one more), then shuffles the batch (so consecutive
/// examples are not grouped by class). The batch of a step depends on `(seed, s)` alone.
///
/// ```
/// use bnlab::data::batches::{BatchOrder, ClassGroupedBatches};
/// let labels = [0u8, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2];
/// let mut order = ClassGroupedBatches::new(&labels, 4, 2, 7).unwrap();
/// let batch = order.batch_indices(3).to_vec();
/// let mut classes: Vec<u8> = batch.iter().map(|&i| labels[i]).collect();
/// classes.sort();
/// classes.dedup();
/// assert_eq!((batch.len(), classes.len()), (4, 2));
/// ```
#[derive(Debug, Clone)]
pub struct ClassGroupedBatches {
    /// Example indices of each class with enough examples.
    by_class: Vec<Vec<usize>>,
    batch: usize,
    classes_per_batch: usize,
    seed: u64,
    indices: Vec<usize>,
}

impl ClassGroupedBatches {
    /// Batches of `batch` examples from `classes_per_batch` classes of `labels` (one per example),
    /// drawn from `seed`. Rejects a zero batch or class count and data with fewer than
    /// `min(classes_per_batch, batch)` classes holding `ceil(batch / k)` examples.
    pub fn new(labels: &[u8], batch: usize, classes_per_batch: usize, seed: u64) -> Result<Self, GroupedBatchError> {
        if batch == 0 || classes_per_batch == 0 {
            return Err(GroupedBatchError::Zero);
        }
        let k = classes_per_batch.min(batch);
        let per_class = batch.div_ceil(k);
        let mut by_class = vec![Vec::new(); 256];
        for (i, &l) in labels.iter().enumerate() {
            by_class[l as usize].push(i);
        }
        by_class.retain(|c| c.len() >= per_class);
        if by_class.len() < k {
            return Err(GroupedBatchError::TooFewClasses {
                batch,
                classes_per_batch: k,
                per_class,
                usable: by_class.len(),
            });
        }
        Ok(ClassGroupedBatches {
            by_class,
            batch,
            classes_per_batch: k,
            seed,
            indices: Vec::with_capacity(batch),
        })
    }
}

/// `n` distinct values of `0..len` (`n ≤ len`), by Floyd's algorithm with [`below`].
fn distinct_below(rng: &mut ChaCha8Rng, len: usize, n: usize, out: &mut Vec<usize>) {
    let start = out.len();
    for j in len - n..len {
        let t = below(rng, j as u64 + 1) as usize;
        let pick = if out[start..].contains(&t) { j } else { t };
        out.push(pick);
    }
}

impl BatchOrder for ClassGroupedBatches {
    fn batch_indices(&mut self, step: u64) -> &[usize] {
        let mut key = epoch_key(self.seed, step);
        key[16..].copy_from_slice(b"bnlab-cls-groups");
        let mut rng = ChaCha8Rng::from_seed(key);
        let k = self.classes_per_batch;
        let mut classes = Vec::with_capacity(k);
        distinct_below(&mut rng, self.by_class.len(), k, &mut classes);
        self.indices.clear();
        for (j, &c) in classes.iter().enumerate() {
            let n = self.batch / k + usize::from(j < self.batch % k);
            let first = self.indices.len();
            distinct_below(&mut rng, self.by_class[c].len(), n, &mut self.indices);
            for i in &mut self.indices[first..] {
                *i = self.by_class[c][*i];
            }
        }
        for i in (1..self.indices.len()).rev() {
            let j = below(&mut rng, i as u64 + 1) as usize;
            self.indices.swap(i, j);
        }
        &self.indices
    }
}

/// Copies the examples `indices` of `ds` into flat buffers: `x` gets their pixels as `f32`
/// ([`pixel_value`](super::idx::pixel_value) of each byte; `indices.len() × ds.features()`, row-major, in the order of
/// `indices`), `y` their labels.
///
/// ```
/// use bnlab::data::{batches::gather, idx::Dataset};
///
/// let ds = Dataset {
///     pixels: vec![0, 51, 102, 153, 204, 255],
///     labels: vec![0, 1, 2],
///     len: 3,
///     rows: 1,
///     cols: 2,
///     classes: 3,
/// };
/// let (mut x, mut y) = (vec![0.0; 4], vec![0; 2]);
/// gather(&ds, &[2, 0], &mut x, &mut y);
/// assert_eq!((x.as_slice(), y.as_slice()), (&[0.8, 1.0, 0.0, 0.2][..], &[2, 0][..]));
/// ```
///
/// # Panics
/// If `x.len() != indices.len() * ds.features()`, `y.len() != indices.len()`, or an index is
/// not below `ds.len` (or `ds`'s buffers are shorter than its `len` says): these are caller
/// bugs, not data errors.
pub fn gather(ds: &Dataset, indices: &[usize], x: &mut [f32], y: &mut [u8]) {
    let f = ds.features();
    assert_eq!(
        x.len(),
        indices.len() * f,
        "gather: x holds {} values, {} examples of {f} features need {}",
        x.len(),
        indices.len(),
        indices.len() * f
    );
    assert_eq!(
        y.len(),
        indices.len(),
        "gather: y holds {} labels, {} examples need as many",
        y.len(),
        indices.len()
    );
    for (k, &i) in indices.iter().enumerate() {
        assert!(i < ds.len, "gather: index {i} out of range for {} examples", ds.len);
        pixels_to_f32(&ds.pixels[i * f..(i + 1) * f], &mut x[k * f..(k + 1) * f]);
        y[k] = ds.labels[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_is_in_range_and_covers_it() {
        let mut rng = ChaCha8Rng::from_seed([7; 32]);
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            let v = below(&mut rng, 7);
            assert!(v < 7);
            seen[v as usize] += 1;
        }
        // Each value ~1000 times; a biased or broken draw would miss this band.
        assert!(seen.iter().all(|&c| (850..1150).contains(&c)), "{seen:?}");
        assert_eq!(below(&mut rng, 1), 0);
        let big = u64::MAX - 3;
        assert!((0..100).all(|_| below(&mut rng, big) < big));
    }

    #[test]
    fn epoch_keys_are_distinct() {
        assert_ne!(epoch_key(1, 0), epoch_key(0, 1));
        assert_ne!(epoch_key(0, 0), epoch_key(0, 1));
        assert_eq!(&epoch_key(3, 4)[16..], b"bnlab-epoch-perm");
    }

    #[test]
    fn single_batch_epoch() {
        let mut s = EpochShuffler::new(5, 5, 0).unwrap();
        assert_eq!(s.batches_per_epoch(), 1);
        let mut b = s.batch_indices(3).to_vec();
        b.sort_unstable();
        assert_eq!(b, [0, 1, 2, 3, 4]);
        assert_eq!(s.epoch_of(3), 3);
    }
}
