//! Batch norm fused with what follows it: `relu(bn(x))` and `relu(bn(x) + z)` (z the residual
//! branch, the shape of x), in training and inference, forward and backward.
//!
//! **Definition**, per element, each step rounded to the element type as the unfused sequence
//! (batch norm into y, then y + z, then the ReLU) rounds it:
//!
//! - t = bn(x), or t = bn(x) + z; y = relu(t) = t where t is not ≤ 0 (t > 0, or NaN, which
//!   propagates as IEEE 754 and PyTorch's `relu` have it), +0.0 elsewhere (−0.0 included);
//! - backward: g = dy where the ReLU kept t, 0 elsewhere — **gradient 0 at exactly t = 0**
//!   (PyTorch's convention; t = 0 happens, e.g. with γ = 0 and β = 0, or β = −γ·x̂); then batch
//!   norm's backward with g in place of dy; for the residual, dz = g.
//!
//! The fused passes give **the unfused sequence's bits**: the same statistics, the same
//! per-element operations in the same order, and the ReLU and its backward are selects.
//!
//! **One pass**: the addition and the ReLU are applied in the element-wise pass that writes y,
//! which also records which outputs the ReLU kept in a [`ReluMask`]; the backward applies the
//! mask in the passes that read dy (the gradient sums and the dx pass), and dz comes out of one
//! of them (the gradient sums where a channel's two passes run back to back, else the dx pass).
//! Nothing is read or written an extra time: the unfused sequence reads y back and writes
//! it again in the forward, and reads y and dy and writes dy·\[y > 0\] in the backward.
//!
//! **Saved state: a 1-bit mask, not y.** The backward needs to know where t > 0. Recomputing it
//! from the saved output y costs a third read stream (x, dy and y) in each backward pass; the
//! mask costs one bit per element (x, dy and 1/32 of an `f32` stream), written by the forward
//! for 1/32 of a stream more. Batch norm is memory-bound: measured side by side
//! (`docs/numerics.md` in the repository), the mask's backward was the faster on tensors larger
//! than the last-level cache, the case fusion is for; in cache, where bandwidth is not the limit,
//! recomputing from y was slightly faster. The mask is laid out in the units the passes write, so
//! each unit owns its bytes and the result is the same bits for any thread count.
//!
//! Free functions in the crate's argument order (the residual z right after x, the mask after y
//! in a forward and after dy in a backward, dz last): [`batch_norm_train_relu`],
//! [`batch_norm_train_add_relu`], [`batch_norm_eval_relu`], [`batch_norm_eval_add_relu`],
//! [`batch_norm_backward_relu`], [`batch_norm_backward_add_relu`],
//! [`batch_norm_backward_eval_relu`], [`batch_norm_backward_eval_add_relu`]; and on a
//! [`BatchNorm`] layer (running statistics updated as [`BatchNorm::forward_train`] updates them,
//! the frozen state and the small-batch policy obeyed): [`BatchNorm::forward_train_relu`],
//! [`BatchNorm::forward_train_add_relu`], [`BatchNorm::forward_eval_relu`],
//! [`BatchNorm::forward_eval_add_relu`], [`BatchNorm::backward_relu`],
//! [`BatchNorm::backward_add_relu`], [`BatchNorm::backward_eval_relu`],
//! [`BatchNorm::backward_eval_add_relu`].

use crate::args::Scope;
use crate::backward::{backward_eval_where, backward_where};
use crate::check;
use crate::forward::{eval_where, train_where};
use crate::kernels::relu::{self, BitLayout, MaskBits};
use crate::stats::{BatchStats, SavedStats};
use crate::{Affine, BatchNorm, Element, Error, FixedStats, Geometry, Grads, View};

/// Which outputs of a fused batch norm + ReLU the ReLU kept (t > 0, or NaN): one bit per element,
/// written by the forward ([`batch_norm_train_relu`] and the others), read by the backward
/// ([`batch_norm_backward_relu`] and the others), which rejects a mask written for another
/// geometry ([`Error::ReluMaskMismatch`]).
///
/// A forward resizes it to its input and writes every bit, reusing the allocation: keep one per
/// layer across training steps. One bit per element, each plane of a channels-first tensor
/// starting at a byte (a plane of fewer than 8 elements takes a whole byte).
///
/// ```
/// use batchnorm::{batch_norm_train_relu, Affine, Layout, ReluMask, View};
/// let x = [1.0f32, 2.0, 3.0, 4.0]; // [N=4, C=1]
/// let (mut y, mut mask) = ([0.0; 4], ReluMask::new());
/// batch_norm_train_relu(View::new(&x, &[4, 1], Layout::NC), Affine::NONE, 1e-5, &mut y, &mut mask).unwrap();
/// assert_eq!((mask.len(), mask.kept(0), mask.kept(3), mask.kept(4)), (4, Some(false), Some(true), None));
/// assert_eq!(y[0], 0.0);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ReluMask {
    /// The bits, in `BitLayout::new` of `geometry`.
    bits: Vec<u8>,
    /// The geometry the last forward wrote it for.
    geometry: Option<Geometry>,
}

impl ReluMask {
    /// An empty mask, for a forward to write.
    pub fn new() -> ReluMask {
        ReluMask::default()
    }

    /// The geometry of the tensor it was last written for (`None` before the first write).
    pub fn geometry(&self) -> Option<Geometry> {
        self.geometry
    }

    /// Number of elements it holds a bit for (0 before the first write).
    pub fn len(&self) -> usize {
        self.geometry.map_or(0, |g| g.len())
    }

    /// Whether it holds no bit (before the first write).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the ReLU kept output `k` (its index in the flat buffer): t > 0 or NaN, so that the
    /// backward lets dy through there. `None` past the end.
    pub fn kept(&self, k: usize) -> Option<bool> {
        let g = self.geometry?;
        if k >= g.len() {
            return None;
        }
        let bit = BitLayout::new(&g).bit(k);
        Some(self.bits[bit / 8] >> (bit % 8) & 1 == 1)
    }

    /// The mask sized for a forward over `g`, as the kernels write it: the forward writes the
    /// bit of every element, so only the bits no element has are zeroed here (those past the
    /// last element of each segment, and the spare byte), so that the bytes depend on the
    /// outputs alone, not on what the buffer held; not the whole mask, which would be one more
    /// write of it (and for a mask larger than the caches, a write back to memory) per forward.
    fn start(&mut self, g: &Geometry) -> &mut [u8] {
        let layout = BitLayout::new(g);
        self.bits.resize(layout.total_bytes(), 0);
        self.geometry = Some(*g);
        // The byte holding segment s's element `len` on, if any: its bits from there on.
        let mut clear_past = |s: usize, len: usize| {
            if !len.is_multiple_of(8) {
                self.bits[s * layout.bytes + len / 8] &= (1u8 << (len % 8)) - 1;
            }
        };
        let Some(last) = layout.segments.checked_sub(1) else {
            return &mut self.bits;
        };
        if !layout.len.is_multiple_of(8) {
            (0..last).for_each(|s| clear_past(s, layout.len));
        }
        // The last segment holds the elements left (fewer than `len` in the rows plan), then its
        // bytes past them and the spare byte.
        let rest = g.len() - last * layout.len;
        clear_past(last, rest);
        let first_free = last * layout.bytes + rest.div_ceil(8);
        self.bits[first_free..].fill(0);
        &mut self.bits
    }

    /// The mask as the kernels read it (checked against `g` by [`check::relu_mask`]).
    fn bits(&self, g: &Geometry) -> MaskBits<'_> {
        MaskBits {
            bytes: &self.bits,
            layout: BitLayout::new(g),
        }
    }
}

impl std::fmt::Debug for ReluMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = (0..self.len()).filter(|&k| self.kept(k) == Some(true)).count();
        f.debug_struct("ReluMask")
            .field("geometry", &self.geometry)
            .field("kept", &kept)
            .finish()
    }
}

/// What a fused forward adds to batch norm: the residual (`None`: a ReLU alone) and the mask to
/// record which outputs the ReLU kept in (`None`: not recorded, inference).
pub(crate) struct ReluForward<'a, T> {
    pub z: Option<&'a [T]>,
    pub mask: Option<&'a mut ReluMask>,
}

impl<'a, T> ReluForward<'a, T> {
    /// A forward's checks of `relu` against the input's geometry: z's length
    /// ([`Error::BufferLength`] named `z`).
    pub(crate) fn check(relu: Option<&Self>, g: &Geometry) -> Result<(), Error> {
        match relu.and_then(|r| r.z) {
            Some(z) => check::len("z", g, z.len()),
            None => Ok(()),
        }
    }

    /// The kernels' arguments, once every check passed: the mask is sized for `g`.
    pub(crate) fn start(self, g: &Geometry) -> relu::Forward<'a, T> {
        relu::Forward {
            z: self.z,
            bits: self.mask.map(|m| m.start(g)),
        }
    }
}

/// What a fused backward adds to batch norm's: the mask its forward wrote, and dz to write (the
/// upstream gradient dy·\[kept\], the residual's gradient; `None`: a ReLU alone).
pub(crate) struct ReluBackward<'a, T> {
    pub mask: &'a ReluMask,
    pub dz: Option<&'a mut [T]>,
}

impl<'a, T> ReluBackward<'a, T> {
    /// A backward's checks of `relu` against the input's geometry, in order: the mask
    /// ([`Error::ReluMaskMismatch`]), dz's length ([`Error::BufferLength`] named `dz`).
    pub(crate) fn check(relu: Option<&Self>, g: &Geometry) -> Result<(), Error> {
        let Some(relu) = relu else { return Ok(()) };
        check::relu_mask(relu.mask, g)?;
        check::len_opt("dz", g, relu.dz.as_deref())
    }

    /// The kernels' arguments, once every check passed.
    pub(crate) fn start(self, g: &Geometry) -> relu::Backward<'a, T> {
        relu::Backward {
            bits: self.mask.bits(g),
            dz: self.dz,
        }
    }
}

/// A fused forward's scope: every position, through the ReLU over the residual when given,
/// recording into the mask.
fn forward<'a, T>(z: Option<&'a [T]>, mask: Option<&'a mut ReluMask>) -> Scope<'a, ReluForward<'a, T>> {
    Scope::relu(ReluForward { z, mask })
}

/// A fused backward's scope: every position, through the ReLU the mask recorded, writing dz
/// when given.
fn backward<'a, T>(mask: &'a ReluMask, dz: Option<&'a mut [T]>) -> Scope<'a, ReluBackward<'a, T>> {
    Scope::relu(ReluBackward { mask, dz })
}

/// Training forward of `relu(bn(x))`: Algorithm 1 as [`crate::batch_norm_train`] (the same
/// statistics, returned the same way), its output through a ReLU in the same pass, and which
/// outputs the ReLU kept written to `mask` (for [`batch_norm_backward_relu`]). The same bits as
/// [`crate::batch_norm_train`] followed by y = relu(y) (see "Fused BN + activation" in the
/// crate's documentation): relu(t) is t where t > 0 or NaN, +0.0 elsewhere.
///
/// Rejects what [`crate::batch_norm_train`] rejects, in its order; on error neither `y` nor
/// `mask` is written.
///
/// ```
/// use batchnorm::{batch_norm_train_relu, Affine, Layout, ReluMask, View};
/// let x = [1.0f64, 10.0, 3.0, 30.0]; // [N=2, C=2]
/// let (mut y, mut mask) = ([f64::NAN; 4], ReluMask::new());
/// let (stats, _saved) = batch_norm_train_relu(View::new(&x, &[2, 2], Layout::NC), Affine::NONE, 1e-5, &mut y, &mut mask).unwrap();
/// assert_eq!(stats.mean, vec![2.0, 20.0]);
/// assert!(y[0] == 0.0 && y[1] == 0.0 && (y[3] - 1.0).abs() < 1e-4);
/// ```
pub fn batch_norm_train_relu<T: Element>(
    x: View<'_, T>,
    affine: Affine<'_, T>,
    eps: f64,
    y: &mut [T],
    mask: &mut ReluMask,
) -> Result<(BatchStats, SavedStats), Error> {
    train_where(x, forward(None, Some(mask)), affine, eps, y)
}

/// Training forward of `relu(bn(x) + z)` (z the residual, the shape of x): as
/// [`batch_norm_train_relu`], with z added to batch norm's output (rounded to the element type)
/// before the ReLU. The same bits as [`crate::batch_norm_train`], then y = y + z, then
/// y = relu(y).
///
/// Rejects, in order: what [`crate::batch_norm_train`] rejects up to γ/β, then a `z` whose length
/// is not the shape's ([`Error::BufferLength`] named `z`), then ε and the count of values per
/// channel; on error neither `y` nor `mask` is written.
pub fn batch_norm_train_add_relu<T: Element>(
    x: View<'_, T>,
    z: &[T],
    affine: Affine<'_, T>,
    eps: f64,
    y: &mut [T],
    mask: &mut ReluMask,
) -> Result<(BatchStats, SavedStats), Error> {
    train_where(x, forward(Some(z), Some(mask)), affine, eps, y)
}

/// Inference forward of `relu(bn(x))` with fixed statistics ([`crate::batch_norm_eval`]'s
/// transform, then the ReLU in the same pass); with `mask`, which outputs the ReLU kept are
/// written to it (for [`batch_norm_backward_eval_relu`]).
///
/// Rejects what [`crate::batch_norm_eval`] rejects, in its order; on error neither `y` nor `mask`
/// is written.
pub fn batch_norm_eval_relu<T: Element>(
    x: View<'_, T>,
    stats: FixedStats<'_, T>,
    affine: Affine<'_, T>,
    eps: f64,
    y: &mut [T],
    mask: Option<&mut ReluMask>,
) -> Result<(), Error> {
    eval_where(x, forward(None, mask), stats, affine, eps, y)
}

/// Inference forward of `relu(bn(x) + z)` with fixed statistics; with `mask`, which outputs the
/// ReLU kept are written to it (for [`batch_norm_backward_eval_add_relu`]).
///
/// Rejects, in order: what [`crate::batch_norm_eval`] rejects up to γ/β, then a `z` whose length
/// is not the shape's ([`Error::BufferLength`] named `z`), then ε; on error neither `y` nor `mask`
/// is written.
pub fn batch_norm_eval_add_relu<T: Element>(
    x: View<'_, T>,
    z: &[T],
    stats: FixedStats<'_, T>,
    affine: Affine<'_, T>,
    eps: f64,
    y: &mut [T],
    mask: Option<&mut ReluMask>,
) -> Result<(), Error> {
    eval_where(x, forward(Some(z), mask), stats, affine, eps, y)
}

/// Training backward of `relu(bn(x))`: [`crate::batch_norm_backward`] with dy·\[kept\] (gradient
/// 0 where the forward's ReLU output was ≤ 0, exactly 0 included) in place of dy, from the
/// `mask` [`batch_norm_train_relu`] wrote and the statistics it returned; the mask is applied in
/// the passes that read dy. Writes whichever of dx, dγ, dβ `grads` holds.
///
/// Rejects, in order: shape/length mismatches between the shape and `x`, `dy`; a `mask` written
/// for another geometry ([`Error::ReluMaskMismatch`]); then what [`crate::batch_norm_backward`]
/// rejects after `dy` (`dx`, `saved`, γ, dγ, dβ, the saved count).
pub fn batch_norm_backward_relu<T: Element>(
    x: View<'_, T>,
    dy: &[T],
    mask: &ReluMask,
    saved: &SavedStats,
    gamma: Option<&[T::Param]>,
    grads: Grads<'_, T>,
) -> Result<(), Error> {
    backward_where(x, backward(mask, None), dy, saved, gamma, grads)
}

/// Training backward of `relu(bn(x) + z)`: as [`batch_norm_backward_relu`], and the residual's
/// gradient dz = dy·\[kept\] written to `dz` (out of a pass that reads dy for dx, or its own pass
/// when `grads` holds no dx).
///
/// Rejects, in order: shape/length mismatches between the shape and `x`, `dy`; a `mask` written
/// for another geometry ([`Error::ReluMaskMismatch`]); a `dz` whose length is not the shape's
/// ([`Error::BufferLength`] named `dz`); then what [`crate::batch_norm_backward`] rejects after
/// `dy`.
pub fn batch_norm_backward_add_relu<T: Element>(
    x: View<'_, T>,
    dy: &[T],
    mask: &ReluMask,
    saved: &SavedStats,
    gamma: Option<&[T::Param]>,
    grads: Grads<'_, T>,
    dz: &mut [T],
) -> Result<(), Error> {
    backward_where(x, backward(mask, Some(dz)), dy, saved, gamma, grads)
}

/// Inference-mode backward of `relu(bn(x))` (fixed statistics as constants):
/// [`crate::batch_norm_backward_eval`] with dy·\[kept\] in place of dy, from the `mask`
/// [`batch_norm_eval_relu`] wrote.
///
/// Rejects, in order: shape/length mismatches of `x` and `dy`; a `mask` written for another
/// geometry ([`Error::ReluMaskMismatch`]); then what [`crate::batch_norm_backward_eval`] rejects
/// after `dy` (the statistics, γ, dγ, dβ, ε, `dx`).
pub fn batch_norm_backward_eval_relu<T: Element>(
    x: View<'_, T>,
    dy: &[T],
    mask: &ReluMask,
    stats: FixedStats<'_, T>,
    gamma: Option<&[T::Param]>,
    eps: f64,
    grads: Grads<'_, T>,
) -> Result<(), Error> {
    backward_eval_where(x, backward(mask, None), dy, stats, gamma, eps, grads)
}

/// Inference-mode backward of `relu(bn(x) + z)`: as [`batch_norm_backward_eval_relu`], and
/// dz = dy·\[kept\] written to `dz`.
///
/// Rejects, in order: shape/length mismatches of `x` and `dy`; a `mask` written for another
/// geometry ([`Error::ReluMaskMismatch`]); a `dz` whose length is not the shape's
/// ([`Error::BufferLength`] named `dz`); then what [`crate::batch_norm_backward_eval`] rejects
/// after `dy`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward_eval_add_relu<T: Element>(
    x: View<'_, T>,
    dy: &[T],
    mask: &ReluMask,
    stats: FixedStats<'_, T>,
    gamma: Option<&[T::Param]>,
    eps: f64,
    grads: Grads<'_, T>,
    dz: &mut [T],
) -> Result<(), Error> {
    backward_eval_where(x, backward(mask, Some(dz)), dy, stats, gamma, eps, grads)
}

impl<T: Element> BatchNorm<T> {
    /// Training forward of `relu(bn(x))` ([`batch_norm_train_relu`]) and, when tracked, the
    /// running-statistics update [`BatchNorm::forward_train`] makes; which outputs the ReLU kept
    /// are written to `mask` (for [`BatchNorm::backward_relu`]).
    ///
    /// Rejects what [`BatchNorm::forward_train`] rejects, in its order, except that a layer with
    /// `config.virtual_batch` set (ghost batch norm) is rejected first with
    /// [`Error::GhostNotFused`] (after an invalid size, [`Error::InvalidVirtualBatch`]). On error
    /// nothing (running statistics, `y`, `mask`) is changed. A frozen layer, and with
    /// [`crate::SmallBatch::UseRunningStats`] a batch of fewer than 2 values per channel, is
    /// normalized with the running statistics ([`batch_norm_eval_relu`]'s transform, the mask
    /// written), which are not updated.
    ///
    /// ```
    /// use batchnorm::{BatchNorm, BatchNormConfig, Grads, Layout, ReluMask, View};
    /// let mut bn = BatchNorm::<f32>::new(2, BatchNormConfig::default()).unwrap();
    /// let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.7).sin()).collect(); // NCHW [2, 2, 2, 2]
    /// let x = View::new(&x, &[2, 2, 2, 2], Layout::NCHW);
    /// let (mut y, mut mask) = (vec![0.0; 16], ReluMask::new());
    /// let saved = bn.forward_train_relu(x, &mut y, &mut mask).unwrap();
    /// assert!(y.iter().all(|&v| v >= 0.0));
    /// let (dy, mut dx) = (vec![1.0; 16], vec![0.0; 16]);
    /// let (mut dgamma, mut dbeta) = (vec![0.0; 2], vec![0.0; 2]);
    /// bn.backward_relu(x, &dy, &mask, &saved, Grads::new(&mut dx, &mut dgamma, &mut dbeta)).unwrap();
    /// let kept = (0..16).filter(|&k| mask.kept(k) == Some(true)).count();
    /// assert_eq!(dbeta.iter().sum::<f32>(), kept as f32); // dβ = Σ dy·\[y > 0\]
    /// ```
    pub fn forward_train_relu(
        &mut self,
        x: View<'_, T>,
        y: &mut [T],
        mask: &mut ReluMask,
    ) -> Result<SavedStats, Error> {
        self.forward_train_where(x, forward(None, Some(mask)), y)
    }

    /// Training forward of `relu(bn(x) + z)` ([`batch_norm_train_add_relu`]), otherwise as
    /// [`BatchNorm::forward_train_relu`]; a `z` whose length is not the shape's is
    /// [`Error::BufferLength`] named `z`, checked after γ/β.
    pub fn forward_train_add_relu(
        &mut self,
        x: View<'_, T>,
        z: &[T],
        y: &mut [T],
        mask: &mut ReluMask,
    ) -> Result<SavedStats, Error> {
        self.forward_train_where(x, forward(Some(z), Some(mask)), y)
    }

    /// Inference forward of `relu(bn(x))` with the running statistics ([`batch_norm_eval_relu`]);
    /// with `mask`, which outputs the ReLU kept are written to it. Rejects what
    /// [`BatchNorm::forward_eval`] rejects. A ghost layer normalizes with the running statistics
    /// too.
    pub fn forward_eval_relu(&self, x: View<'_, T>, y: &mut [T], mask: Option<&mut ReluMask>) -> Result<(), Error> {
        self.forward_eval_where(x, forward(None, mask), y)
    }

    /// Inference forward of `relu(bn(x) + z)` with the running statistics
    /// ([`batch_norm_eval_add_relu`]); otherwise as [`BatchNorm::forward_eval_relu`], and a `z`
    /// whose length is not the shape's is [`Error::BufferLength`] named `z`.
    pub fn forward_eval_add_relu(
        &self,
        x: View<'_, T>,
        z: &[T],
        y: &mut [T],
        mask: Option<&mut ReluMask>,
    ) -> Result<(), Error> {
        self.forward_eval_where(x, forward(Some(z), mask), y)
    }

    /// Training backward of `relu(bn(x))` ([`batch_norm_backward_relu`]) from the `mask` and the
    /// statistics [`BatchNorm::forward_train_relu`] gave: writes whichever of dx, dγ, dβ `grads`
    /// holds (dγ and dβ are ignored without affine).
    ///
    /// Rejects what [`batch_norm_backward_relu`] rejects and an input whose channel count differs
    /// from `num_features`; a ghost layer first, as [`BatchNorm::forward_train_relu`] does. A
    /// frozen layer, and with [`crate::SmallBatch::UseRunningStats`] saved statistics of fewer
    /// than 2 values per channel, backpropagates through the running statistics as constants
    /// ([`batch_norm_backward_eval_relu`]'s transform; `saved` is then only checked for its
    /// channel count): it rejects what that function rejects and [`Error::NoRunningStats`].
    pub fn backward_relu(
        &self,
        x: View<'_, T>,
        dy: &[T],
        mask: &ReluMask,
        saved: &SavedStats,
        grads: Grads<'_, T>,
    ) -> Result<(), Error> {
        self.backward_where(x, backward(mask, None), dy, saved, grads)
    }

    /// Training backward of `relu(bn(x) + z)` ([`batch_norm_backward_add_relu`]): as
    /// [`BatchNorm::backward_relu`], and dz = dy·\[kept\] written to `dz`, whose length is checked
    /// after the mask ([`Error::BufferLength`] named `dz`).
    pub fn backward_add_relu(
        &self,
        x: View<'_, T>,
        dy: &[T],
        mask: &ReluMask,
        saved: &SavedStats,
        grads: Grads<'_, T>,
        dz: &mut [T],
    ) -> Result<(), Error> {
        self.backward_where(x, backward(mask, Some(dz)), dy, saved, grads)
    }

    /// Inference-mode backward of `relu(bn(x))` with the running statistics as constants
    /// ([`batch_norm_backward_eval_relu`]). Rejects [`Error::NoRunningStats`] when they are not
    /// tracked, an input whose channel count differs from `num_features`, and what
    /// [`batch_norm_backward_eval_relu`] rejects.
    pub fn backward_eval_relu(
        &self,
        x: View<'_, T>,
        dy: &[T],
        mask: &ReluMask,
        grads: Grads<'_, T>,
    ) -> Result<(), Error> {
        self.backward_eval_where(x, backward(mask, None), dy, grads)
    }

    /// Inference-mode backward of `relu(bn(x) + z)` ([`batch_norm_backward_eval_add_relu`]): as
    /// [`BatchNorm::backward_eval_relu`], and dz = dy·\[kept\] written to `dz`.
    pub fn backward_eval_add_relu(
        &self,
        x: View<'_, T>,
        dy: &[T],
        mask: &ReluMask,
        grads: Grads<'_, T>,
        dz: &mut [T],
    ) -> Result<(), Error> {
        self.backward_eval_where(x, backward(mask, Some(dz)), dy, grads)
    }
}
