//! The inner loops. They take slices and trust them: every shape was checked by the public API
//! before control gets here (see `shape.rs`). Nothing in this module returns an error.
//!
//! Numerics: per-channel statistics are sums of elements widened to `f64`; contiguous sums use
//! two vectors of [`LANES`] `f64` accumulators folded in a fixed order (see `moments`).
//! Element-wise passes compute in the element type (`f32` with a two-piece mean, see
//! `elementwise`; `bf16` and `f16` widened to `f32` and each output rounded back once). All of it is written with explicit SIMD (`simd`: an AVX2 backend and a
//! portable one that give the same bits), so the result is the same bits on every CPU path and
//! for every thread count.
//!
//! Work is split into units whose boundaries depend only on the shape, never on the thread
//! count; partial results are merged in unit order. Rayon only decides who computes which unit.

pub(crate) mod elementwise;
pub(crate) mod mask;
pub(crate) mod moments;
pub(crate) mod plan;
pub(crate) mod relu;
pub(crate) mod scratch;
pub(crate) mod simd;

/// `f64` lanes of one SIMD vector (one AVX2 register pair).
pub(crate) const LANES: usize = 8;

/// Folds lane accumulators in a fixed order.
#[inline(always)]
pub(crate) fn fold_lanes(a: [f64; LANES]) -> f64 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// Runs `f` in a function compiled for AVX2 + FMA + F16C when the CPU has them, otherwise as is.
///
/// The hot loops dispatch on their own (`simd::simd_dispatch!`); this covers the glue (merges).
/// Rust never contracts `a * b + c` into a fused multiply-add on its own, so both copies round
/// identically.
#[inline(always)]
pub(crate) fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::has_avx2() {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
            return unsafe { run_avx2(f) };
        }
    }
    f()
}
