//! Runtime detection of the vector instructions the engine's hand-written kernels use
//! ([`super::gemm`], [`super::activation`]).

/// Whether the CPU has AVX2 and FMA (detected once and cached by the standard library).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}
