//! The element types the kernels accept (`f32`, `f64`).

use std::fmt::Debug;

/// A floating-point element type of the tensors (`f32` or `f64`).
///
/// Statistics (means, variances, the backward sums) are always `f64` numbers. For `f64` tensors
/// every operation is done in `f64`. For `f32` tensors the per-element arithmetic is done in
/// `f32` (8 lanes per AVX2 instruction, fused multiply-adds) with the mean split in two `f32`
/// so that x − mean stays exact near the mean: each output is within 2·ε_f32 of the magnitude
/// of the terms that produce it (a couple of ulps; the `precision` example measures it).
/// Channels whose per-channel constants do not fit `f32` are computed in `f64`. The trait is
/// sealed: only `f32` and `f64` implement it.
pub trait Element: Copy + Send + Sync + Debug + PartialEq + Default + sealed::Sealed + 'static {
    /// The type's name, for error messages and benchmark output.
    const NAME: &'static str;
    /// Widens to `f64` (exact for both implementors).
    fn to_f64(self) -> f64;
    /// Rounds an `f64` to this type (round-to-nearest-even).
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f64 {
    const NAME: &'static str = "f64";
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}
