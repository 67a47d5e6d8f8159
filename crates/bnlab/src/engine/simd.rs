//! Runtime dispatch to code compiled for AVX2 and FMA, for the engine's hand-written kernels
//! ([`super::gemm`], [`super::activation`]) and its plain element-wise loops.

/// Whether the CPU has AVX2 and FMA (detected once and cached by the standard library); false
/// off x86-64.
#[inline(always)]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Runs `f` compiled for AVX2 and FMA where the CPU has them, otherwise as it is: the
/// element-wise loops inside it are vectorized eight floats wide instead of four. Rust never
/// contracts `a * b + c` into a fused multiply-add on its own, so both copies give the same bits.
#[inline(always)]
pub(crate) fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { run(f) };
    }
    f()
}
