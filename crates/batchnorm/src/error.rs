//! The one error type of the crate.

use thiserror::Error;

/// Everything a batch-norm call can reject. No function of this crate panics on bad input; each
/// documents which of these it returns.
///
/// NaN and infinite *values* are not errors: they propagate as IEEE 754 says (a NaN anywhere in a
/// channel makes that channel's mean, variance and every output of it NaN).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Error {
    /// The shape has a zero dimension (or no dimensions).
    #[error("empty input: shape {shape:?} has no elements")]
    EmptyInput {
        /// The offending shape.
        shape: Vec<usize>,
    },
    /// The shape's rank does not fit the layout (e.g. `NCHW` needs 4 dimensions).
    #[error("layout {layout} needs {expected} dimensions, got shape {shape:?}")]
    RankMismatch {
        /// The layout's name.
        layout: &'static str,
        /// What the layout needs, in words ("4", "at least 2").
        expected: &'static str,
        /// The offending shape.
        shape: Vec<usize>,
    },
    /// The number of elements overflows `usize`.
    #[error("shape {shape:?} has more elements than fit in memory")]
    ShapeOverflow {
        /// The offending shape.
        shape: Vec<usize>,
    },
    /// A flat buffer's length does not match the shape it is said to have.
    #[error("buffer `{name}` has {actual} elements, the shape needs {expected}")]
    BufferLength {
        /// Which argument (`x`, `y`, `dy`, `dx`, `weight`, …).
        name: &'static str,
        /// Elements the shape needs.
        expected: usize,
        /// Elements given.
        actual: usize,
    },
    /// A per-channel vector (γ, β, running statistics, saved statistics) has the wrong length.
    #[error("`{name}` has {actual} features, the input has {expected} channels")]
    FeatureMismatch {
        /// Which argument.
        name: &'static str,
        /// Channels of the input (or of the layer).
        expected: usize,
        /// Length given.
        actual: usize,
    },
    /// Training mode needs at least two values per channel to estimate a variance (PyTorch's rule).
    #[error("training needs more than 1 value per channel, got {count} (shape {shape:?})")]
    TooFewValues {
        /// Values per channel (N·spatial, or the global count for synchronized batch norm).
        count: u64,
        /// The offending shape.
        shape: Vec<usize>,
    },
    /// ε must be a finite number > 0.
    #[error("eps must be finite and > 0, got {0}")]
    InvalidEps(f64),
    /// Momentum must be finite and in (0, 1].
    #[error("momentum must be in (0, 1], got {0}")]
    InvalidMomentum(f64),
    /// The layer was built with `track_running_stats = false` but running statistics were needed.
    #[error("this layer does not track running statistics (track_running_stats = false)")]
    NoRunningStats,
    /// The population-statistics estimator has seen no mini-batch yet.
    #[error("no mini-batch has been observed yet")]
    NoBatches,
    /// Partial statistics of different channel counts cannot be merged.
    #[error("cannot merge statistics of {left} and {right} channels")]
    MergeMismatch {
        /// Channels on the left.
        left: usize,
        /// Channels on the right.
        right: usize,
    },
    /// A collective exchange between workers failed (a rank has gone, the transport failed, or
    /// ranks disagreed on what to exchange).
    #[error("communication failed: {message}")]
    Communication {
        /// What went wrong, in words.
        message: String,
    },
    /// A batch-renormalization clipping limit is out of range: `r_max` must be finite and ≥ 1,
    /// `d_max` finite and ≥ 0 (Ioffe 2017: r ∈ [1/r_max, r_max], d ∈ [−d_max, d_max]).
    #[error("batch renorm: `{name}` must be finite and {bound}, got {value}")]
    InvalidRenormLimit {
        /// Which limit (`r_max`, `d_max`, `r_max_final`, `d_max_final`).
        name: &'static str,
        /// The bound it breaks, in words ("≥ 1", "≥ 0").
        bound: &'static str,
        /// The value given.
        value: f64,
    },
    /// A batch-renormalization schedule whose steps do not fit in a `u64` step counter.
    #[error("batch renorm schedule does not fit: {reason}")]
    InvalidRenormSchedule {
        /// What does not fit, in words.
        reason: String,
    },
    /// Ghost batch norm's virtual batch size must be at least 2 examples.
    #[error("ghost batch norm: the virtual batch size must be ≥ 2, got {0}")]
    InvalidVirtualBatch(usize),
    /// A ghost batch norm group (virtual batch) holds fewer than 2 values per channel (e.g. the
    /// last, short group of an `NC` batch with one example).
    #[error("ghost batch norm: virtual batch {group} has {count} value(s) per channel, training needs at least 2 (shape {shape:?})")]
    GhostGroupTooSmall {
        /// The group's index in the batch (0 for the first).
        group: usize,
        /// Values per channel in that group.
        count: u64,
        /// The whole input's shape.
        shape: Vec<usize>,
    },
    /// Saved ghost statistics hold another number of groups than the input makes (they come
    /// from another batch or another virtual batch size).
    #[error("ghost batch norm: the saved statistics hold {actual} virtual batches, the input makes {expected}")]
    GhostGroupsMismatch {
        /// Groups the input makes with the virtual batch size.
        expected: usize,
        /// Groups in the saved statistics.
        actual: usize,
    },
    /// Ghost batch norm's groups are local to a worker: the synchronized passes reject a layer
    /// with a virtual batch size.
    #[error("ghost batch norm is local to a worker: the synchronized passes reject a layer with `virtual_batch` set")]
    GhostNotSynchronized,
    /// Ghost batch norm's groups are whole examples and masked batch norm selects positions: the
    /// layer's masked training passes reject a layer with a virtual batch size.
    #[error("ghost batch norm takes no mask: the masked training passes reject a layer with `virtual_batch` set")]
    GhostNotMasked,
    /// The fused batch norm + ReLU passes normalize the whole batch in one pass: the layer's fused
    /// training passes reject a layer with a virtual batch size (ghost batch norm).
    #[error("ghost batch norm is not fused: the fused training passes reject a layer with `virtual_batch` set")]
    GhostNotFused,
    /// A fused backward was given a [`crate::ReluMask`] that its forward wrote for another tensor
    /// geometry than the input's (or that no forward wrote).
    #[error("the ReLU mask was written for {actual:?}, the input is {expected:?}")]
    ReluMaskMismatch {
        /// The input's geometry.
        expected: crate::Geometry,
        /// The geometry the mask was written for (`None`: it was never written).
        actual: Option<crate::Geometry>,
    },
}
