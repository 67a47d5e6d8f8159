//! The element types the kernels accept (`f32`, `f64`, and the half types `bf16`, `f16`).

use half::{bf16, f16};
use std::fmt::Debug;

/// A floating-point element type of the tensors: `f32`, `f64`, [`bf16`](half::bf16) or
/// [`f16`](half::f16).
///
/// Statistics (means, variances, the backward sums) are always `f64` numbers. For `f64` tensors
/// every operation is done in `f64`. For `f32` tensors the per-element arithmetic is done in
/// `f32` (8 lanes per AVX2 instruction, fused multiply-adds) with the mean split in two `f32`
/// so that x − mean stays exact near the mean: each output is within 2·ε_f32 of the magnitude
/// of the terms that produce it (a couple of ulps; the `precision` example measures it).
/// Channels whose per-channel constants do not fit `f32` are computed in `f64`.
///
/// Half tensors (`bf16`, `f16`) take the `f32` path: each element is widened to `f32` exactly,
/// computed as an `f32` element is, and the `f32` result rounded once to the half type
/// (round-to-nearest-even): within 2·ε_f32 of the terms' magnitude plus half an ulp of the half
/// type. A value beyond the half type's range becomes ±Inf (IEEE 754; `f16` tops out at 65504),
/// but the statistics never overflow: they are accumulated as for `f32`, never kept in the half
/// type. Their per-channel parameters and running statistics (and dγ, dβ) are `f32`
/// ([`Element::Param`], PyTorch's convention for half inputs).
///
/// The trait is sealed: only `f32`, `f64`, `bf16` and `f16` implement it.
pub trait Element: Copy + Send + Sync + Debug + PartialEq + Default + sealed::Sealed + 'static {
    /// The type's name, for error messages and benchmark output.
    const NAME: &'static str;
    /// The type of the per-channel vectors that go with tensors of this type: γ, β, running
    /// statistics, fixed (inference) statistics, dγ and dβ. `f32` for `f32`, `bf16` and `f16`;
    /// `f64` for `f64`. It is its own parameter type.
    type Param: Element<Param = Self::Param>;
    /// Widens to `f64` (exact for every implementor).
    fn to_f64(self) -> f64;
    /// Rounds an `f64` to this type, once (round-to-nearest-even; beyond the type's range ±Inf,
    /// NaN stays NaN).
    fn from_f64(v: f64) -> Self;
}

/// Implements [`Element`] and the kernels' sealed side of it for each type listed: its parameter
/// type and [`Kind`], then its four conversions, each written as `|argument| expression`.
macro_rules! elements {
    ($($t:ident: Param = $param:ty, Kind::$kind:ident,
        to_f64 |$a:ident| $to_f64:expr, from_f64 |$b:ident| $from_f64:expr,
        to_f32 |$c:ident| $to_f32:expr, from_f32 |$d:ident| $from_f32:expr;)*) => {$(
        impl Element for $t {
            const NAME: &'static str = stringify!($t);
            type Param = $param;
            #[inline(always)]
            fn to_f64(self) -> f64 { let $a = self; $to_f64 }
            #[inline(always)]
            fn from_f64($b: f64) -> Self { $from_f64 }
        }

        impl sealed::Sealed for $t {
            const KIND: Kind = Kind::$kind;
            #[inline(always)]
            fn to_f32(self) -> f32 { let $c = self; $to_f32 }
            #[inline(always)]
            fn from_f32($d: f32) -> Self { $from_f32 }
        }
    )*};
}

elements! {
    f32: Param = f32, Kind::F32,
        to_f64 |x| x as f64, from_f64 |v| v as f32,
        to_f32 |x| x, from_f32 |v| v;
    f64: Param = f64, Kind::F64,
        to_f64 |x| x, from_f64 |v| v,
        to_f32 |x| x as f32, from_f32 |v| v as f64;
    bf16: Param = f32, Kind::Bf16,
        to_f64 |x| x.to_f32() as f64, from_f64 |v| bf16::from_f32(f32_round_to_odd(v)),
        to_f32 |x| f32::from_bits((x.to_bits() as u32) << 16), from_f32 |v| bf16::from_bits(sealed::bf16_bits(v.to_bits()));
    f16: Param = f32, Kind::F16,
        to_f64 |x| x.to_f32() as f64, from_f64 |v| f16::from_f32(f32_round_to_odd(v)),
        to_f32 |x| f16::to_f32(x), from_f32 |v| f16::from_bits(sealed::f16_bits(v.to_bits()));
}

/// `v` rounded to `f32` toward zero, with the last bit set when that was inexact (round to odd);
/// NaN and values that are exact as they are.
///
/// Rounding that once more, to nearest-even, into a type with at least 2 bits less precision
/// than `f32` at every magnitude (`bf16`, `f16`) gives `v` correctly rounded into that type: the
/// odd last bit stands for everything below it, so no tie is made up and none is lost. (`half`'s
/// own `from_f64` goes through `f32` with round-to-nearest, which rounds twice.)
#[inline(always)]
fn f32_round_to_odd(v: f64) -> f32 {
    let r = v as f32;
    if r as f64 == v || v.is_nan() {
        return r;
    }
    // Inexact: step back toward zero when rounding went away from it, then make the last bit odd.
    let bits = r.to_bits();
    let toward_zero = if (r as f64).abs() > v.abs() { bits - 1 } else { bits };
    f32::from_bits(toward_zero | 1)
}

pub(crate) use sealed::Kind;

mod sealed {
    /// How the kernels treat an element type (a constant of each type, so that a `match` on it
    /// folds away).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        /// `f64` tensors: every operation in `f64`.
        F64,
        /// `f32` tensors: the element-precision (`f32`) path.
        F32,
        /// `bf16` tensors: the `f32` path, loads widened and stores rounded.
        Bf16,
        /// `f16` tensors: as `bf16`.
        F16,
    }

    /// Seals [`super::Element`], and holds what only the kernels use: the type's [`Kind`] and its
    /// exact widening to `f32` and rounding from `f32` (identities for `f32`; meaningless for
    /// `f64`, whose kernels never call them).
    pub trait Sealed {
        /// How the kernels treat the type.
        const KIND: Kind;
        /// Widens to `f32` (exact for `f32`, `bf16`, `f16`).
        fn to_f32(self) -> f32;
        /// Rounds an `f32` to the type, round-to-nearest-even (NaN stays a quiet NaN).
        fn from_f32(v: f32) -> Self;
    }

    /// The `f16` bits of the `f32` with bits `x`, rounded to nearest-even (above the range ±Inf,
    /// below it subnormals and ±0); a NaN stays a NaN, made quiet (its payload's top bits kept):
    /// what F16C's `vcvtps2ph` gives, written out for CPUs without it.
    pub(crate) fn f16_bits(x: u32) -> u16 {
        let sign = ((x >> 16) & 0x8000) as u16;
        let abs = x & 0x7fff_ffff;
        if abs > 0x7f80_0000 {
            return sign | 0x7e00 | ((abs >> 13) & 0x3ff) as u16;
        }
        if abs >= 0x4780_0000 {
            // |v| ≥ 2¹⁶: beyond the largest f16 by more than half its ulp (or Inf).
            return sign | 0x7c00;
        }
        if abs >= 0x3880_0000 {
            // A normal f16 (|v| ≥ 2⁻¹⁴): rebias the exponent by 127 − 15, then round away the
            // low 13 bits to nearest-even (a carry into the exponent is right, up to Inf).
            let r = abs - 0x3800_0000;
            return sign | ((r + 0xfff + ((r >> 13) & 1)) >> 13) as u16;
        }
        // A subnormal f16: the value in units of 2⁻²⁴, m·2^(e − 126) with m the f32 significand.
        let e = abs >> 23;
        let shift = 126 - e;
        if e == 0 || shift > 24 {
            // Below 2⁻²⁵ (half the smallest subnormal) by a factor 2 or more: ±0.
            return sign;
        }
        let m = (abs & 0x7f_ffff) | 0x80_0000;
        let (q, rem, half) = (m >> shift, m & ((1 << shift) - 1), 1 << (shift - 1));
        let up = rem > half || (rem == half && q & 1 == 1);
        sign | (q + up as u32) as u16
    }

    /// The `bf16` bits of the `f32` with bits `x`, rounded to nearest-even; a NaN stays a NaN,
    /// made quiet (its payload's top bits kept). The vector form (`simd`) does the same steps.
    #[inline(always)]
    pub(crate) fn bf16_bits(x: u32) -> u16 {
        if x & 0x7fff_ffff > 0x7f80_0000 {
            return ((x >> 16) | 0x0040) as u16;
        }
        // Adding 0x7fff plus the last kept bit carries into bit 16 exactly when the dropped half
        // is above the midpoint, or at it with an odd last kept bit.
        (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `v` rounded to nearest-even into `H` by definition: of the two `H` values around `v`
    /// (found through `f32`), the nearer, the one with an even last bit at a tie.
    fn nearest<H: Element>(v: f64, below: H, above: H) -> H {
        let (a, b) = (below.to_f64(), above.to_f64());
        assert!(a <= v && v <= b, "{a} {v} {b}");
        let mid = a + (b - a) / 2.0; // exact: both are short in f64
        let even = |h: H| bits_of(h) & 1 == 0;
        if v < mid || (v == mid && even(below)) {
            below
        } else {
            above
        }
    }

    fn bits_of<H: Element>(h: H) -> u16 {
        // SAFETY: both half types are 16-bit wrappers around their bits.
        unsafe { std::mem::transmute_copy::<H, u16>(&h) }
    }

    fn from_bits<H: Element>(b: u16) -> H {
        // SAFETY: as `bits_of`.
        unsafe { std::mem::transmute_copy::<u16, H>(&b) }
    }

    /// `from_f64` into a half type is correctly rounded (one rounding, nearest-even) on values
    /// between consecutive half values, at their midpoints and a hair off them (where rounding
    /// through `f32` first would round twice), subnormals included; ±Inf beyond the range.
    fn rounds_once<H: Element>() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for k in 0..200_000u32 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // A finite positive half value and the next one up.
            let b = (s as u16) & 0x7fff;
            let (lo, hi) = (from_bits::<H>(b), from_bits::<H>(b + 1));
            if !(lo.to_f64().is_finite() && hi.to_f64().is_finite() && b < 0x7fff) {
                continue;
            }
            let (a, c) = (lo.to_f64(), hi.to_f64());
            let mid = a + (c - a) / 2.0;
            let off = (c - a) * f64::EPSILON * ((s >> 20) % 1000) as f64;
            let frac = ((s >> 32) as f64) / 2f64.powi(32);
            for v in [mid, mid + off, mid - off, a + (c - a) * frac, a, c] {
                let v = v.clamp(a, c);
                for (sign, w) in [(1.0, v), (-1.0, -v)] {
                    let want = nearest(v, lo, hi);
                    let got = H::from_f64(w);
                    assert_eq!(got.to_f64(), sign * want.to_f64(), "{} {k}: {w:e}", H::NAME);
                }
            }
        }
        assert_eq!(H::from_f64(1e300).to_f64(), f64::INFINITY);
        assert_eq!(H::from_f64(-1e300).to_f64(), f64::NEG_INFINITY);
        assert!(H::from_f64(f64::NAN).to_f64().is_nan());
        assert_eq!(H::from_f64(1e-300).to_f64(), 0.0);
    }

    #[test]
    fn half_from_f64_rounds_once() {
        rounds_once::<bf16>();
        rounds_once::<f16>();
        // Above the largest f16 (65504) by less than half its ulp (32): kept; from half an ulp
        // on (a tie goes to the even neighbour, Inf): Inf.
        assert_eq!(f16::from_f64(65519.99).to_f64(), 65504.0);
        assert_eq!(f16::from_f64(65520.0).to_f64(), f64::INFINITY);
    }

    /// The roundings from `f32` agree with `half`'s (F16C's `vcvtps2ph` for `f16` where the CPU
    /// has it) on every class of `f32` bit pattern: ties, subnormals of the half type and below
    /// them, NaN (made quiet), ±Inf and values that overflow to Inf.
    #[test]
    fn bits_from_f32_match_half() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let special = [
            0u32,
            0x8000_0000,
            0x0000_8000,
            0x0001_8000,
            0x0000_0001,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0xffc0_0000,
            0x7fbf_ffff,
            0x3f80_8000,
            0x3f81_8000,
            0x477f_f000,
            0x477f_efff,
            0x4780_0000,
            0x3880_0000,
            0x387f_ffff,
            0x3300_0000,
            0x3300_0001,
            0x32ff_ffff,
            0x3380_0000,
            0x33c0_0000,
            0x3430_0000,
            0x0080_0000,
        ];
        // Every f32 whose f16 is in the subnormal and low normal range, at a stride.
        let sweep = (0x3000_0000u32..0x3900_0000).step_by(97);
        let random = (0..1_000_000).map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u32
        });
        for x in special.into_iter().chain(sweep).chain(random) {
            for x in [x, x ^ 0x8000_0000] {
                let v = f32::from_bits(x);
                assert_eq!(sealed::bf16_bits(x), bf16::from_f32(v).to_bits(), "bf16 {x:#010x}");
                assert_eq!(sealed::f16_bits(x), f16::from_f32(v).to_bits(), "f16 {x:#010x}");
            }
        }
    }
}
