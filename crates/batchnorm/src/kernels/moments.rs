//! Per-channel reductions: moments (count, mean, M2) and the two sums backward needs.

use super::{fold_lanes, LANES};
use crate::Element;

/// Count, mean and M2 = Σ(x − mean)² of a set of values: mergeable partial statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Moments {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    pub const EMPTY: Moments = Moments {
        count: 0.0,
        mean: 0.0,
        m2: 0.0,
    };

    /// Chan, Golub & LeVeque's pairwise merge: exact in real arithmetic, stable in floating point
    /// (no E[x²] − E[x]² cancellation).
    #[inline(always)]
    pub fn merge(self, other: Moments) -> Moments {
        if other.count == 0.0 {
            return self;
        }
        if self.count == 0.0 {
            return other;
        }
        let count = self.count + other.count;
        let delta = other.mean - self.mean;
        Moments {
            count,
            mean: self.mean + delta * (other.count / count),
            m2: self.m2 + other.m2 + delta * delta * (self.count * other.count / count),
        }
    }
}

/// Sum of a slice, widened to `f64`, in lanes.
#[inline(always)]
fn sum<T: Element>(x: &[T]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += c[l].to_f64();
        }
    }
    let mut s = fold_lanes(acc);
    for &v in chunks.remainder() {
        s += v.to_f64();
    }
    s
}

/// (Σ(x − m), Σ(x − m)²) in lanes.
#[inline(always)]
fn centered_sums<T: Element>(x: &[T], m: f64) -> (f64, f64) {
    let mut s1 = [0.0f64; LANES];
    let mut s2 = [0.0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let d = c[l].to_f64() - m;
            s1[l] += d;
            s2[l] += d * d;
        }
    }
    let (mut a, mut b) = (fold_lanes(s1), fold_lanes(s2));
    for &v in chunks.remainder() {
        let d = v.to_f64() - m;
        a += d;
        b += d * d;
    }
    (a, b)
}

/// Moments of a contiguous slice (one piece of a channels-first plane) by the corrected two-pass
/// algorithm: mean first, then centered sums with the rounding error of the mean corrected. The
/// slice is small enough to stay in L1/L2 between the passes, so memory is read once.
#[inline(always)]
pub(crate) fn slice_moments<T: Element>(x: &[T]) -> Moments {
    let n = x.len() as f64;
    let m = sum(x) / n;
    let (d1, d2) = centered_sums(x, m);
    let m2 = d2 - d1 * d1 / n;
    Moments {
        count: n,
        mean: m + d1 / n,
        m2: if m2 < 0.0 { 0.0 } else { m2 },
    }
}

/// Per-channel moments of a block of rows (`x.len() = rows × channels`, channels contiguous), by
/// the same corrected two-pass algorithm, vectorized across channels. Writes the block's mean and
/// M2 per channel; `corr` is scratch of `channels` entries.
#[inline(always)]
pub(crate) fn rows_moments<T: Element>(x: &[T], channels: usize, mean: &mut [f64], m2: &mut [f64], corr: &mut [f64]) {
    let rows = (x.len() / channels) as f64;
    mean.fill(0.0);
    for row in x.chunks_exact(channels) {
        for (acc, &v) in mean.iter_mut().zip(row) {
            *acc += v.to_f64();
        }
    }
    for v in mean.iter_mut() {
        *v /= rows;
    }
    m2.fill(0.0);
    corr.fill(0.0);
    for row in x.chunks_exact(channels) {
        for (((s2, s1), &m), &v) in m2.iter_mut().zip(corr.iter_mut()).zip(mean.iter()).zip(row) {
            let d = v.to_f64() - m;
            *s1 += d;
            *s2 += d * d;
        }
    }
    for ((m, s2), &s1) in mean.iter_mut().zip(m2.iter_mut()).zip(corr.iter()) {
        *m += s1 / rows;
        let v = *s2 - s1 * s1 / rows;
        *s2 = if v < 0.0 { 0.0 } else { v };
    }
}

/// Merges a block's per-channel moments (all with `count_b` values) into accumulators holding
/// `count_a` values per channel. Vectorized across channels; same formula as [`Moments::merge`].
#[inline(always)]
pub(crate) fn merge_rows(
    count_a: f64,
    mean_a: &mut [f64],
    m2_a: &mut [f64],
    count_b: f64,
    mean_b: &[f64],
    m2_b: &[f64],
) {
    if count_a == 0.0 {
        mean_a.copy_from_slice(mean_b);
        m2_a.copy_from_slice(m2_b);
        return;
    }
    let count = count_a + count_b;
    let wb = count_b / count;
    let wab = count_a * count_b / count;
    for (((ma, sa), &mb), &sb) in mean_a.iter_mut().zip(m2_a.iter_mut()).zip(mean_b).zip(m2_b) {
        let delta = mb - *ma;
        *ma += delta * wb;
        *sa = *sa + sb + delta * delta * wab;
    }
}

/// (Σ dy, Σ dy·(x − m)) over one contiguous slice of a channels-first plane.
#[inline(always)]
pub(crate) fn slice_grad_sums<T: Element>(x: &[T], dy: &[T], m: f64) -> (f64, f64) {
    let mut s1 = [0.0f64; LANES];
    let mut s2 = [0.0f64; LANES];
    let mut xc = x.chunks_exact(LANES);
    let mut gc = dy.chunks_exact(LANES);
    for (cx, cg) in (&mut xc).zip(&mut gc) {
        for l in 0..LANES {
            let g = cg[l].to_f64();
            s1[l] += g;
            s2[l] += g * (cx[l].to_f64() - m);
        }
    }
    let (mut a, mut b) = (fold_lanes(s1), fold_lanes(s2));
    for (&v, &g) in xc.remainder().iter().zip(gc.remainder()) {
        let g = g.to_f64();
        a += g;
        b += g * (v.to_f64() - m);
    }
    (a, b)
}

/// Per-channel (Σ dy, Σ dy·(x − m)) over a block of rows, accumulated into `sum_dy`, `sum_dy_xmu`.
#[inline(always)]
pub(crate) fn rows_grad_sums<T: Element>(x: &[T], dy: &[T], mean: &[f64], sum_dy: &mut [f64], sum_dy_xmu: &mut [f64]) {
    let channels = mean.len();
    for (row, grow) in x.chunks_exact(channels).zip(dy.chunks_exact(channels)) {
        for ((((s1, s2), &m), &v), &g) in sum_dy
            .iter_mut()
            .zip(sum_dy_xmu.iter_mut())
            .zip(mean)
            .zip(row)
            .zip(grow)
        {
            let g = g.to_f64();
            *s1 += g;
            *s2 += g * (v.to_f64() - m);
        }
    }
}
