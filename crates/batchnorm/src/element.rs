//! The element types the kernels accept (`f32`, `f64`).

use std::fmt::Debug;

/// A floating-point element type of the tensors (`f32` or `f64`).
///
/// Every kernel reads elements, widens them to `f64`, does all of its arithmetic (sums, means,
/// normalization) in `f64` and rounds once when it stores a result. For `f32` data that makes the
/// statistics and the normalized output exact to the last bit of `f32` in practice; for `f64` it
/// is the natural precision. The trait is sealed: only `f32` and `f64` implement it.
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
