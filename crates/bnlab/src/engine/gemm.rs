//! Matrix products for the layers, over `matrixmultiply`'s `sgemm` (chosen over `gemm`: on the
//! paper's small shapes (batch 60) it was as fast, builds in a fraction of the time, and is
//! deterministic). Large products are split into a fixed number of column blocks that run on the
//! rayon pool; the split depends only on the shape, so results are identical for any thread count.

use rayon::prelude::*;

/// A row-major or transposed view of a matrix for [`matmul`].
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: isize,
    /// Column stride.
    pub cs: isize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols as isize,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols as isize,
        }
    }
}

/// Work (multiply-adds) below which a product runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 18;

/// c[m × n] (row-major) = a[m × k]·b[k × n] + beta·c; large products split over the rayon pool.
pub fn matmul(m: usize, k: usize, n: usize, a: Mat, b: Mat, beta: f32, c: &mut [f32]) {
    let blocks = if m * k * n >= PARALLEL_WORK && n >= 32 { 4 } else { 1 };
    product(m, k, n, a, b, beta, c, blocks);
}

/// [`matmul`] on the calling thread, for callers that already run in parallel (conv's runs of
/// examples): splitting their small products again only cuts them into ragged column blocks.
pub fn matmul_serial(m: usize, k: usize, n: usize, a: Mat, b: Mat, beta: f32, c: &mut [f32]) {
    product(m, k, n, a, b, beta, c, 1);
}

/// c = a·b + beta·c in `blocks` column blocks.
#[allow(clippy::too_many_arguments)]
fn product(m: usize, k: usize, n: usize, a: Mat, b: Mat, beta: f32, c: &mut [f32], blocks: usize) {
    // The sgemm call below is unsafe: these checks keep this safe function sound.
    let extent = |v: &Mat, rows: usize, cols: usize| {
        rows == 0 || cols == 0 || ((rows - 1) as isize * v.rs + (cols - 1) as isize * v.cs) < v.data.len() as isize
    };
    assert!(
        c.len() == m * n && extent(&a, m, k) && extent(&b, k, n),
        "matmul: buffers too short for the shapes"
    );
    let width = n.div_ceil(blocks);
    let run = |j0: usize, cols: usize, c: *mut f32| {
        // SAFETY: the views cover the accessed elements: a is m × k, b is k × n (offset to column
        // j0), c is m × n (offset to column j0) with row stride n, as the callers guarantee.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                cols,
                1.0,
                a.data.as_ptr(),
                a.rs,
                a.cs,
                b.data.as_ptr().offset(j0 as isize * b.cs),
                b.rs,
                b.cs,
                beta,
                c.add(j0),
                n as isize,
                1,
            )
        }
    };
    if blocks == 1 {
        run(0, n, c.as_mut_ptr());
        return;
    }
    let ptr = SendPtr(c.as_mut_ptr());
    (0..blocks).into_par_iter().for_each(|bi| {
        let j0 = bi * width;
        let cols = width.min(n.saturating_sub(j0));
        if cols == 0 {
            return;
        }
        // Blocks write disjoint column ranges of c through the raw pointer (no aliasing references).
        run(j0, cols, ptr.get());
    });
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint column blocks from different threads.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// c[m × n] += a[m × p]·b[n × p]ᵀ with a and b row-major: every element is a dot product of two
/// contiguous rows. For conv's weight gradient (dy·colᵀ, contracted over the output positions),
/// where the long contraction and tiny output make `sgemm` spend its time packing a transposed
/// col. Each dot keeps 16 lane sums (lane l adds the products at k ≡ l mod 16 in order, then the
/// lanes and the tail are added in order): the bits depend neither on the threads nor on whether
/// the AVX path runs (it multiplies and adds, never fuses).
pub fn matmul_nt_acc(m: usize, n: usize, p: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(
        a.len() == m * p && b.len() == n * p && c.len() == m * n,
        "matmul_nt_acc: buffers do not match the shapes"
    );
    #[cfg(target_arch = "x86_64")]
    let avx = std::arch::is_x86_feature_detected!("avx");
    #[cfg(not(target_arch = "x86_64"))]
    let avx = false;
    for (ar, cr) in a.chunks_exact(p).zip(c.chunks_exact_mut(n)) {
        // Four rows of b at a time (the last rows repeat one row, its sum kept once).
        for (j0, cq) in (0..n).step_by(4).zip(cr.chunks_mut(4)) {
            let row = |j: usize| &b[j.min(n - 1) * p..][..p];
            let rows = [row(j0), row(j0 + 1), row(j0 + 2), row(j0 + 3)];
            let lanes = if avx {
                // SAFETY: the CPU has AVX (checked above).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    lane_sums_avx(ar, rows)
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!()
            } else {
                lane_sums(ar, rows)
            };
            let full = p / LANES * LANES;
            for ((c, lanes), r) in cq.iter_mut().zip(&lanes).zip(rows) {
                let tail: f32 = ar[full..].iter().zip(&r[full..]).map(|(x, y)| x * y).sum();
                *c += lanes.iter().sum::<f32>() + tail;
            }
        }
    }
}

/// Lanes of the partial sums of one dot product.
const LANES: usize = 16;

/// Lane sums of `a` against four rows over the whole blocks of [`LANES`].
fn lane_sums(a: &[f32], b: [&[f32]; 4]) -> [[f32; LANES]; 4] {
    let mut acc = [[0.0f32; LANES]; 4];
    for (k, x) in a.chunks_exact(LANES).enumerate() {
        for (acc, row) in acc.iter_mut().zip(b) {
            for ((s, &x), &y) in acc.iter_mut().zip(x).zip(&row[k * LANES..][..LANES]) {
                *s += x * y;
            }
        }
    }
    acc
}

/// [`lane_sums`] with AVX: each row's 16 lanes are two 8-lane registers.
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn lane_sums_avx(a: &[f32], b: [&[f32]; 4]) -> [[f32; LANES]; 4] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    for (k, x) in a.chunks_exact(LANES).enumerate() {
        // SAFETY: x and each row's block hold LANES = 16 floats: two unaligned 8-float loads.
        let (x0, x1) = unsafe { (_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(x.as_ptr().add(8))) };
        for (acc, row) in acc.iter_mut().zip(b) {
            let y = &row[k * LANES..][..LANES];
            let (y0, y1) = unsafe { (_mm256_loadu_ps(y.as_ptr()), _mm256_loadu_ps(y.as_ptr().add(8))) };
            acc[0] = _mm256_add_ps(acc[0], _mm256_mul_ps(x0, y0));
            acc[1] = _mm256_add_ps(acc[1], _mm256_mul_ps(x1, y1));
        }
    }
    let mut out = [[0.0f32; LANES]; 4];
    for (o, acc) in out.iter_mut().zip(&acc) {
        // SAFETY: o holds 16 floats: two unaligned 8-float stores.
        unsafe {
            _mm256_storeu_ps(o.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), acc[1]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [−1, 1) from a fixed integer hash.
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn nt_matches_f64_reference_for_ragged_shapes() {
        // p with and without a 16-lane tail; n with and without a multiple of 4 rows.
        for (m, n, p) in [(3, 6, 72), (2, 4, 16), (1, 7, 5), (8, 25, 784)] {
            let (a, b) = (values(m * p, 1), values(n * p, 2));
            let mut c = values(m * n, 3);
            let before = c.clone();
            matmul_nt_acc(m, n, p, &a, &b, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..p).map(|k| a[i * p + k] as f64 * b[j * p + k] as f64).sum();
                    let want = before[i * n + j] as f64 + dot;
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "({m},{n},{p}) [{i},{j}]"
                    );
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn nt_avx_lanes_have_the_portable_bits() {
        if !std::arch::is_x86_feature_detected!("avx") {
            return;
        }
        let p = 200;
        let (a, b) = (values(p, 4), values(4 * p, 5));
        let rows = [&b[..p], &b[p..2 * p], &b[2 * p..3 * p], &b[3 * p..]];
        // SAFETY: the CPU has AVX (checked above).
        let fast = unsafe { lane_sums_avx(&a, rows) };
        assert_eq!(
            fast.map(|r| r.map(f32::to_bits)),
            lane_sums(&a, rows).map(|r| r.map(f32::to_bits))
        );
    }
}
