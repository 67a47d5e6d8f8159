//! Element-wise nonlinearities.

use super::{Layer, Mode, Param};

/// Logistic sigmoid σ(x) = 1/(1 + e⁻ˣ), computed as 1/(1 + e) for x ≥ 0 and e/(1 + e) for x < 0
/// with e = e^(−|x|), so that e never overflows: within 4 ulps of σ(x) (the exponential within
/// 1 ulp, then one rounding each for the sum and the quotient; the tests derive the bound),
/// σ(NaN) = NaN; vectorized with AVX2 and FMA where the CPU has them, with the same bits as
/// without. Backward uses the saved output: dx = dy·y·(1 − y).
pub struct Sigmoid {
    /// Features per example.
    pub size: usize,
}

/// Rectified linear unit: y = x where x > 0 or x is NaN, +0.0 elsewhere (−0.0 included), so
/// that a NaN propagates as IEEE 754 and PyTorch's `relu` have it (a diverged network does not
/// hide behind a finite loss); backward: dx = dy where the forward kept x (x > 0 or NaN), +0.0
/// elsewhere, gradient 0 at exactly x = 0 (PyTorch's convention). The same selects as the
/// kernel crate's fused batch norm + ReLU ([`::batchnorm::batch_norm_train_relu`]), so a fused
/// layer gives this layer's bits.
pub struct Relu {
    /// Features per example.
    pub size: usize,
}

/// `impl Layer` for an element-wise layer of `size` features: forward maps the input slice `x`
/// to the output slice `y` by `forward`; backward maps each `dy` (as `g`) to `grad`, where `s` is
/// the saved output when `from_output` is true and the saved input otherwise. No parameters.
macro_rules! elementwise_layer {
    ($layer:ident, $name:literal, |$x:ident, $y:ident| $forward:expr, from_output: $from_output:literal, |$s:ident, $g:ident| $grad:expr) => {
        impl Layer for $layer {
            fn name(&self) -> String {
                $name.into()
            }
            fn input_size(&self) -> usize {
                self.size
            }
            fn output_size(&self) -> usize {
                self.size
            }
            fn forward(&mut self, $x: &[f32], _batch: usize, $y: &mut [f32], _mode: Mode) -> anyhow::Result<()> {
                $forward;
                Ok(())
            }
            fn backward(
                &mut self,
                x: &[f32],
                y: &[f32],
                dy: &[f32],
                _batch: usize,
                dx: Option<&mut [f32]>,
            ) -> anyhow::Result<()> {
                let saved = if $from_output { y } else { x };
                if let Some(dx) = dx {
                    dx.iter_mut()
                        .zip(saved)
                        .zip(dy)
                        .for_each(|((o, &$s), &$g)| *o = $grad);
                }
                Ok(())
            }
            fn params(&mut self) -> Vec<Param<'_>> {
                Vec::new()
            }
        }
    };
}

elementwise_layer!(Sigmoid, "sigmoid", |x, y| sigmoid(x, y), from_output: true, |s, g| g * s * (1.0 - s));
elementwise_layer!(Relu, "relu", |x, y| relu(x, y), from_output: false, |v, g| if relu_keeps(v) { g } else { 0.0 });

/// Whether the ReLU keeps `v`: v > 0 or NaN.
fn relu_keeps(v: f32) -> bool {
    v > 0.0 || v.is_nan()
}

/// relu(v) as [`Relu`] defines it.
fn relu_one(v: f32) -> f32 {
    if relu_keeps(v) {
        v
    } else {
        0.0
    }
}

/// y = relu(x) element by element (over the shorter of the two).
fn relu(x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(o, &v)| *o = relu_one(v));
}

/// y = relu(y) in place, as [`Relu`] defines it.
pub(crate) fn relu_in_place(y: &mut [f32]) {
    y.iter_mut().for_each(|v| *v = relu_one(*v));
}

/// `dx` (resized to dy's length) = dy where the ReLU kept its input, found from its output `y`:
/// a kept input (> 0 or NaN) is its own output, which is not 0, and every other input became
/// +0.0; so kept ⇔ y ≠ 0, and dx has the bits [`Relu`]'s backward gives from the input.
pub(crate) fn relu_backward_from_output(y: &[f32], dy: &[f32], dx: &mut Vec<f32>) {
    dx.clear();
    dx.extend(y.iter().zip(dy).map(|(&v, &g)| if v != 0.0 { g } else { 0.0 }));
}

/// y = σ(x) element by element (over the shorter of the two), as [`Sigmoid`] defines it, eight
/// at a time with AVX2 and FMA where the CPU has them; both paths do the same operations and give
/// the same bits.
///
/// e^(−|x|) is SLEEF's single-precision `expf` (reduction by ln 2 in two parts, a degree-6
/// polynomial, scaling by 2^q in two steps so that results below 2⁻¹²⁶ round once into the
/// subnormals, and 0 below −104), within `EXP_ULPS` ulps of e^(−|x|); the addition and the
/// division add one rounding each. σ(NaN) is NaN, σ(+∞) = 1, σ(−∞) = 0.
fn sigmoid(x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { avx2::sigmoid(x, y) };
        return;
    }
    y.iter_mut().zip(x).for_each(|(o, &v)| *o = sigmoid_one(v));
}

/// Relative error of [`exp_nonpositive`] against e^t, in units of 2⁻²³ (ulps of a value in [1, 2)),
/// for results of at least 2⁻¹²⁶: SLEEF's bound for its `expf`, which the tests measure.
#[cfg(test)]
const EXP_ULPS: f64 = 1.0;

/// 1/ln 2 and ln 2 in two parts (the high part with its last 12 bits zero, so that q·high is exact).
const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HIGH: f32 = 0.693_145_75;
const LN2_LOW: f32 = 1.428_606_8e-6;
/// The polynomial's coefficients, highest degree first (e^s ≈ 1 + s + s²·u(s)).
const EXP_POLY: [f32; 6] = [
    1.985_276_2e-4,
    1.393_043_6e-3,
    8.333_361e-3,
    4.166_648_5e-2,
    0.166_666_67,
    0.5,
];
/// Below this e^t is under half the smallest subnormal: the result is 0.
const EXP_ZERO_BELOW: f32 = -104.0;

/// 2^q for q in [−126, 127] (the exponent field of q + 127).
fn pow2i(q: i32) -> f32 {
    f32::from_bits((q.wrapping_add(127) << 23) as u32)
}

/// e^t for t ≤ 0 (or NaN), in the operations of the AVX2 path.
fn exp_nonpositive(t: f32) -> f32 {
    let qf = (t * LOG2_E).round_ties_even();
    let s = qf.mul_add(-LN2_LOW, qf.mul_add(-LN2_HIGH, t));
    let u = EXP_POLY[1..].iter().fold(EXP_POLY[0], |u, &c| u.mul_add(s, c));
    let u = 1.0 + (s * s).mul_add(u, s);
    let q = qf as i32;
    let half = q >> 1;
    let e = u * pow2i(half) * pow2i(q.wrapping_sub(half));
    if t < EXP_ZERO_BELOW {
        0.0
    } else {
        e
    }
}

/// σ(v) in the operations of the AVX2 path.
fn sigmoid_one(v: f32) -> f32 {
    let e = exp_nonpositive(-v.abs());
    let numerator = if v < 0.0 { e } else { 1.0 };
    numerator / (1.0 + e)
}

/// The AVX2 + FMA path of [`sigmoid`].
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{sigmoid_one, EXP_POLY, EXP_ZERO_BELOW, LN2_HIGH, LN2_LOW, LOG2_E};
    use std::arch::x86_64::*;

    /// 2^q per lane, for q in [−126, 127].
    #[inline(always)]
    fn pow2i(q: __m256i) -> __m256 {
        // SAFETY: integer adds and shifts (AVX2, enabled in the only caller).
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q, _mm256_set1_epi32(127)), 23)) }
    }

    /// [`super::exp_nonpositive`] per lane.
    #[inline(always)]
    fn exp_nonpositive(t: __m256) -> __m256 {
        // SAFETY: AVX2 and FMA arithmetic (enabled in the only caller).
        unsafe {
            let qf = _mm256_round_ps(
                _mm256_mul_ps(t, _mm256_set1_ps(LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-LN2_HIGH), t);
            let s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-LN2_LOW), s);
            let mut u = _mm256_set1_ps(EXP_POLY[0]);
            for &c in &EXP_POLY[1..] {
                u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(c));
            }
            let u = _mm256_add_ps(_mm256_set1_ps(1.0), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
            let q = _mm256_cvttps_epi32(qf);
            let half = _mm256_srai_epi32(q, 1);
            let e = _mm256_mul_ps(_mm256_mul_ps(u, pow2i(half)), pow2i(_mm256_sub_epi32(q, half)));
            let zero = _mm256_cmp_ps(t, _mm256_set1_ps(EXP_ZERO_BELOW), _CMP_LT_OQ);
            _mm256_andnot_ps(zero, e)
        }
    }

    /// [`super::sigmoid`] with AVX2 and FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sigmoid(x: &[f32], y: &mut [f32]) {
        let len = x.len().min(y.len());
        let (x, y) = (&x[..len], &mut y[..len]);
        let sign = _mm256_set1_ps(-0.0);
        let (one, zero) = (_mm256_set1_ps(1.0), _mm256_setzero_ps());
        let mut xs = x.chunks_exact(8);
        let mut ys = y.chunks_exact_mut(8);
        for (x, y) in (&mut xs).zip(&mut ys) {
            // SAFETY: both chunks hold eight floats.
            let v = unsafe { _mm256_loadu_ps(x.as_ptr()) };
            let e = exp_nonpositive(_mm256_or_ps(v, sign));
            let negative = _mm256_cmp_ps(v, zero, _CMP_LT_OQ);
            let numerator = _mm256_blendv_ps(one, e, negative);
            let s = _mm256_div_ps(numerator, _mm256_add_ps(one, e));
            unsafe { _mm256_storeu_ps(y.as_mut_ptr(), s) };
        }
        for (o, &v) in ys.into_remainder().iter_mut().zip(xs.remainder()) {
            *o = sigmoid_one(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spacing of f32 values at |r| (2⁻¹⁴⁹ among the subnormals).
    fn ulp(r: f64) -> f64 {
        let r = r.abs();
        if r < f32::MIN_POSITIVE as f64 {
            2f64.powi(-149)
        } else {
            2f64.powi(r.log2().floor() as i32 - 23)
        }
    }

    /// Every `stride`-th f32 from `from` towards −∞ down to `to` (bit patterns of negative floats
    /// grow with the magnitude), with both ends.
    fn negatives(from: f32, to: f32, stride: u32) -> impl Iterator<Item = f32> {
        let (lo, hi) = ((-from.abs()).to_bits(), to.to_bits());
        (lo..=hi).step_by(stride as usize).map(f32::from_bits).chain([from, to])
    }

    /// e^t against f64 over [−104, 0] (a few million points, the subnormal results included):
    /// within `EXP_ULPS` ulps of the exact value, measured in ulps of the f32 spacing at the
    /// result; below −104 exactly 0.
    #[test]
    fn exp_is_within_its_ulps_of_f64() {
        let mut worst = 0.0f64;
        for t in negatives(-0.0, -104.0, 397) {
            let (got, want) = (exp_nonpositive(t) as f64, (t as f64).exp());
            let err = (got - want).abs() / ulp(want);
            worst = worst.max(err);
            assert!(err <= EXP_ULPS, "e^{t}: {got:e} vs {want:e}: {err} ulps");
        }
        println!("e^t on [−104, 0]: worst {worst:.3} ulps");
        for t in [-104.000_01, -200.0, f32::MIN, f32::NEG_INFINITY] {
            assert_eq!(exp_nonpositive(t).to_bits(), 0, "e^{t}");
        }
        assert!(exp_nonpositive(f32::NAN).is_nan());
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    /// σ against 1/(1 + e^(−x)) in f64 within 2·EXP_ULPS + 2 ulps. Derivation: with e within
    /// E = EXP_ULPS ulps, i.e. relative error ≤ 2E·u (u = 2⁻²⁴; an ulp is at most 2u relative),
    /// and each of 1 + e and the quotient rounded (≤ u each): for x ≥ 0, σ = 1/(1 + e) with
    /// e ≤ 1 carries e's error scaled by e/(1 + e) ≤ ½, in all (E + 2)·u; for x < 0,
    /// σ = e/(1 + e) carries it scaled by 1/(1 + e) ≤ 1, in all (2E + 2)·u. An ulp at σ is at
    /// least σ·u, so (2E + 2)·u relative is at most 2E + 2 ulps. Among the subnormal results
    /// (x < −87.3) 1 + e = 1, σ = e, within E ulps.
    #[test]
    fn sigmoid_is_within_its_derived_ulps_of_f64() {
        let bound = 2.0 * EXP_ULPS + 2.0;
        let mut worst = 0.0f64;
        let xs: Vec<f32> = negatives(-0.0, -110.0, 397).flat_map(|v| [v, -v]).collect();
        let mut ys = vec![0.0; xs.len()];
        sigmoid(&xs, &mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            let err = (y as f64 - want).abs() / ulp(want);
            worst = worst.max(err);
            assert!(err <= bound, "σ({x}) = {y:e} vs {want:e}: {err} ulps > {bound}");
        }
        println!("σ: worst {worst:.3} ulps (bound {bound})");
    }

    #[test]
    fn sigmoid_of_special_values() {
        let xs = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            200.0,
            -200.0,
            f32::NAN,
            -f32::NAN,
            1.0,
        ];
        let mut ys = [f32::NAN; 9];
        sigmoid(&xs, &mut ys);
        assert_eq!(ys[..6], [0.5, 0.5, 1.0, 0.0, 1.0, 0.0]);
        assert!(ys[6].is_nan() && ys[7].is_nan());
    }

    /// The vectorized path gives the portable path's bits, over lengths with and without a
    /// remainder of eight, special values included.
    #[test]
    fn sigmoid_paths_have_the_same_bits() {
        let mut xs: Vec<f32> = negatives(-0.0, -110.0, 7919).flat_map(|v| [v, -v]).collect();
        xs.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-30,
            -1e-30,
            f32::MIN_POSITIVE,
        ]);
        for len in [xs.len(), xs.len() - 3, 5] {
            let mut fast = vec![0.0; len];
            sigmoid(&xs[..len], &mut fast);
            for (&x, &y) in xs.iter().zip(&fast) {
                let slow = sigmoid_one(x);
                let same = y.to_bits() == slow.to_bits() || (y.is_nan() && slow.is_nan());
                assert!(same, "σ({x}): {y:e} vs portable {slow:e}");
            }
        }
    }
}
