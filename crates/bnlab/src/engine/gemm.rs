//! Matrix products for the layers.
//!
//! - The fully connected layer's ([`matmul_nt_bias`], [`matmul_nn`]): kernels of their own that
//!   read the operands where they lie (no packing), AVX2 + FMA where the CPU has them, each
//!   element computed in a fixed order whatever the tiling, the thread split or the CPU path.
//! - The convolution's ([`matmul_serial`], [`matmul_nt_acc`]) and [`matmul`]: over
//!   `matrixmultiply`'s `sgemm` (chosen over `gemm`: as fast on these shapes, builds in a fraction
//!   of the time, and is deterministic), and a dot-product kernel for conv's weight gradient.
//!
//! Large products are split over the rayon pool by a rule that depends only on the shape, so
//! results are identical for any thread count.

use rayon::prelude::*;

/// A row-major or transposed view of a matrix for [`matmul`] and [`matmul_nn`].
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

    /// Whether the view holds every element of a `rows × cols` matrix (strides ≥ 0).
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (self.rs >= 0
                && self.cs >= 0
                && ((rows - 1) as isize * self.rs + (cols - 1) as isize * self.cs) < self.data.len() as isize)
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
    assert!(
        c.len() == m * n && a.covers(m, k) && b.covers(k, n),
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

// -------------------------------------------------------------------------------------------
// The fully connected layer's products, without packing: at a batch of 60 and widths of 100 the
// packing that `sgemm` does on every call costs as much as a good part of the multiplication.

/// Rows of `a` per tile of [`matmul_nt_bias`] (each tile: 3 rows of `a` against 4 rows of `b`).
const NT_ROWS: usize = 3;
/// Rows of `b` per tile of [`matmul_nt_bias`]: their four dot products with one row of `a` are
/// reduced together into four adjacent outputs.
const NT_COLS: usize = 4;
/// Partial sums of one dot product in [`matmul_nt_bias`] (one AVX register of `f32`).
const DOT_LANES: usize = 8;
/// Rows of `c` per tile of [`matmul_nn`].
const NN_ROWS: usize = 6;
/// Columns of `c` per full tile of [`matmul_nn`] (two AVX registers).
const NN_COLS: usize = 16;
/// Work (multiply-adds) from which [`matmul_nt_bias`] and [`matmul_nn`] split their output rows
/// into two halves computed on the rayon pool. Set above the paper MLP's largest product
/// (60·784·100): on the development machine's two vCPUs, which share their vector units
/// (BENCHMARKS.md), a split of it is slower than one thread, the hand-off costing more than the
/// second thread adds.
const DENSE_SPLIT_WORK: usize = 1 << 23;

/// c[m × n] = a[m × k]·b[n × k]ᵀ + bias, with `a` and `b` row-major and `bias` (when given) added
/// to every row: the fully connected layer's forward x·Wᵀ + b (W is `[out, in]`).
///
/// Every element is a dot product of two contiguous rows in `DOT_LANES` = 8 partial sums: lane
/// l adds the products at positions p ≡ l (mod 8) in order by fused multiply-add, starting from 0;
/// the lanes are then added as ((s₀ + s₁) + (s₂ + s₃)) + ((s₄ + s₅) + (s₆ + s₇)), and the bias
/// last. So the bits depend neither on how the product is tiled or split over threads nor on
/// whether the AVX2 path runs. Panics when the buffers do not have the shapes' lengths.
pub fn matmul_nt_bias(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], bias: Option<&[f32]>, c: &mut [f32]) {
    assert!(
        a.len() == m * k && b.len() == n * k && c.len() == m * n && bias.is_none_or(|v| v.len() == n),
        "matmul_nt_bias: buffers do not match the shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    split_rows(m, k, n, NT_ROWS, c, &|rows, c| {
        let a = &a[rows.start * k..rows.end * k];
        #[cfg(target_arch = "x86_64")]
        if super::simd::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA; the slices have the lengths the kernel reads and
            // writes (checked above, `a` and `c` cut to the same rows).
            unsafe { avx2::nt_bias(rows.len(), k, n, a, b, bias, c) };
            return;
        }
        nt_bias_portable(rows.len(), k, n, a, b, bias, c);
    });
}

/// c[m × n] = a·b, with `a` an `m × k` view (any strides: the fully connected layer's dyᵀ or dy)
/// and `b` row-major `k × n`: the layer's dW = dyᵀ·x and dx = dy·W.
///
/// Every element is the chain of fused multiply-adds over p = 0, 1, …, k − 1 in order, starting
/// from 0: the bits depend neither on the tiling, the thread split nor on whether the AVX2 path
/// runs. Panics when the buffers do not hold the shapes.
pub fn matmul_nn(m: usize, k: usize, n: usize, a: Mat, b: &[f32], c: &mut [f32]) {
    assert!(
        a.covers(m, k) && b.len() == k * n && c.len() == m * n,
        "matmul_nn: buffers do not match the shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    split_rows(m, k, n, NN_ROWS, c, &|rows, c| {
        // The rows' part of `a`, as a view starting at their first row.
        let a = Mat {
            data: &a.data[rows.start * a.rs as usize..],
            ..a
        };
        #[cfg(target_arch = "x86_64")]
        if super::simd::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA; `a` covers rows.len() × k (it covers m × k from
            // row 0), `b` is k × n and `c` rows.len() × n (checked above).
            unsafe { avx2::nn(rows.len(), k, n, a, b, c) };
            return;
        }
        nn_portable(rows.len(), k, n, a, b, c);
    });
}

/// Runs `f` on the output rows of an m × n product: all at once, or, from [`DENSE_SPLIT_WORK`]
/// multiply-adds on, as two halves (the split a multiple of `tile` rows) on the rayon pool.
fn split_rows(
    m: usize,
    k: usize,
    n: usize,
    tile: usize,
    c: &mut [f32],
    f: &(dyn Fn(std::ops::Range<usize>, &mut [f32]) + Sync),
) {
    let half = (m / 2).div_ceil(tile) * tile;
    if m * k * n < DENSE_SPLIT_WORK || half == 0 || half >= m || rayon::current_num_threads() < 2 {
        f(0..m, c);
        return;
    }
    let (top, bottom) = c.split_at_mut(half * n);
    rayon::join(|| f(0..half, top), || f(half..m, bottom));
}

/// The eight lane sums of a dot product added in [`matmul_nt_bias`]'s order.
fn fold_lanes(s: [f32; DOT_LANES]) -> f32 {
    ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))
}

/// [`matmul_nt_bias`] element by element, in its arithmetic.
fn nt_bias_portable(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], bias: Option<&[f32]>, c: &mut [f32]) {
    for i in 0..m {
        for j in 0..n {
            let mut lanes = [0.0f32; DOT_LANES];
            for p in 0..k {
                let s = &mut lanes[p % DOT_LANES];
                *s = a[i * k + p].mul_add(b[j * k + p], *s);
            }
            let dot = fold_lanes(lanes);
            c[i * n + j] = bias.map_or(dot, |bias| dot + bias[j]);
        }
    }
}

/// [`matmul_nn`] element by element, in its arithmetic.
fn nn_portable(m: usize, k: usize, n: usize, a: Mat, b: &[f32], c: &mut [f32]) {
    for (i, cr) in c.chunks_exact_mut(n).enumerate().take(m) {
        for (j, o) in cr.iter_mut().enumerate() {
            *o = (0..k).fold(0.0f32, |acc, p| {
                let x = a.data[i * a.rs as usize + p * a.cs as usize];
                x.mul_add(b[p * n + j], acc)
            });
        }
    }
}

/// The AVX2 + FMA kernels of [`matmul_nt_bias`] and [`matmul_nn`].
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Mat, DOT_LANES, NN_COLS, NN_ROWS, NT_COLS, NT_ROWS};
    use std::arch::x86_64::*;

    /// A mask of the first `len` (< 8) lanes, for `_mm256_maskload_ps`.
    #[inline(always)]
    unsafe fn lanes_mask(len: usize) -> __m256i {
        let i = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), i)
    }

    /// See [`super::matmul_nt_bias`]: tiles of `NT_ROWS` rows of `a` against `NT_COLS` rows of
    /// `b` (a last partial tile of `b` repeats its last row and stores only the real outputs).
    ///
    /// # Safety
    /// AVX2 and FMA; `a` is m × k, `b` n × k, `c` m × n, `bias` n long.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn nt_bias(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        b: &[f32],
        bias: Option<&[f32]>,
        c: &mut [f32],
    ) {
        let full = k / DOT_LANES * DOT_LANES;
        let tail = lanes_mask(k - full);
        for j in (0..n).step_by(NT_COLS) {
            let cols = NT_COLS.min(n - j);
            // SAFETY (pointers): every row index is below n, so each row pointer has k elements.
            let rows: [*const f32; NT_COLS] =
                std::array::from_fn(|q| unsafe { b.as_ptr().add((j + q.min(cols - 1)) * k) });
            let mut add = [0.0f32; NT_COLS];
            if let Some(bias) = bias {
                add[..cols].copy_from_slice(&bias[j..j + cols]);
            }
            let mut i = 0;
            while i < m {
                let tile = NT_ROWS.min(m - i);
                let (a_i, c_i) = (unsafe { a.as_ptr().add(i * k) }, unsafe {
                    c.as_mut_ptr().add(i * n + j)
                });
                // SAFETY: `tile` rows of a from row i and of c from row i, `cols` outputs from
                // column j, all inside the buffers.
                unsafe {
                    match tile {
                        3 => nt_tile::<3>(k, full, tail, a_i, rows, bias.is_some(), &add, c_i, n, cols),
                        2 => nt_tile::<2>(k, full, tail, a_i, rows, bias.is_some(), &add, c_i, n, cols),
                        _ => nt_tile::<1>(k, full, tail, a_i, rows, bias.is_some(), &add, c_i, n, cols),
                    }
                }
                i += tile;
            }
        }
    }

    /// `R` rows of `a` (from `a`, row stride k) against the four rows `b`: c[r][q] for q < cols.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn nt_tile<const R: usize>(
        k: usize,
        full: usize,
        tail: __m256i,
        a: *const f32,
        b: [*const f32; NT_COLS],
        with_bias: bool,
        bias: &[f32; NT_COLS],
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NT_COLS]; R];
        let mut p = 0;
        while p < full {
            // SAFETY: p + 8 ≤ k for every row of a and b.
            let x: [__m256; R] = std::array::from_fn(|r| unsafe { _mm256_loadu_ps(a.add(r * k + p)) });
            for (q, row) in b.iter().enumerate() {
                let y = unsafe { _mm256_loadu_ps(row.add(p)) };
                for r in 0..R {
                    acc[r][q] = _mm256_fmadd_ps(x[r], y, acc[r][q]);
                }
            }
            p += DOT_LANES;
        }
        if full < k {
            // SAFETY: the masked loads read only positions full..k of each row; the zeros in the
            // other lanes leave the sums as they are (a lane sum is never −0).
            let x: [__m256; R] = std::array::from_fn(|r| unsafe { _mm256_maskload_ps(a.add(r * k + full), tail) });
            for (q, row) in b.iter().enumerate() {
                let y = unsafe { _mm256_maskload_ps(row.add(full), tail) };
                for r in 0..R {
                    acc[r][q] = _mm256_fmadd_ps(x[r], y, acc[r][q]);
                }
            }
        }
        let bias = unsafe { _mm_loadu_ps(bias.as_ptr()) };
        for (r, acc) in acc.iter().enumerate() {
            // hadd∘hadd then the two halves: lane q = ((s₀+s₁)+(s₂+s₃)) + ((s₄+s₅)+(s₆+s₇)) of acc[q].
            let h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
            let mut sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            if with_bias {
                sums = _mm_add_ps(sums, bias);
            }
            let out = unsafe { c.add(r * ldc) };
            if cols == NT_COLS {
                // SAFETY: four outputs from column j of row r exist.
                unsafe { _mm_storeu_ps(out, sums) };
            } else {
                let mut v = [0.0f32; NT_COLS];
                unsafe { _mm_storeu_ps(v.as_mut_ptr(), sums) };
                // SAFETY: `cols` outputs from column j of row r exist.
                unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out, cols) };
            }
        }
    }

    /// See [`super::matmul_nn`]: column panels of 16 (then 8, then the rest, masked), each
    /// against all rows in tiles of `NN_ROWS`.
    ///
    /// # Safety
    /// AVX2 and FMA; `a` covers m × k, `b` is k × n, `c` m × n.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn nn(m: usize, k: usize, n: usize, a: Mat, b: &[f32], c: &mut [f32]) {
        let mut j = 0;
        while j < n {
            let cols = match n - j {
                left if left >= NN_COLS => NN_COLS,
                left if left >= 8 => 8,
                left => left,
            };
            // SAFETY: each call reads columns j..j + cols of b and writes them in c.
            unsafe {
                match cols {
                    NN_COLS => nn_panel::<2, false>(m, k, n, a, b, c, j, cols),
                    8 => nn_panel::<1, false>(m, k, n, a, b, c, j, cols),
                    _ => nn_panel::<1, true>(m, k, n, a, b, c, j, cols),
                }
            }
            j += cols;
        }
    }

    /// Columns j..j + cols of c (V vectors; the last masked to `cols` when `MASKED`), all rows.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn nn_panel<const V: usize, const MASKED: bool>(
        m: usize,
        k: usize,
        n: usize,
        a: Mat,
        b: &[f32],
        c: &mut [f32],
        j: usize,
        cols: usize,
    ) {
        let mut i = 0;
        while i < m {
            let rows = NN_ROWS.min(m - i);
            // SAFETY: rows i.. of a and c, columns j.. of b and c, as the caller guarantees.
            unsafe {
                match rows {
                    6 => nn_tile::<6, V, MASKED>(k, n, a, b, c, i, j, cols),
                    5 => nn_tile::<5, V, MASKED>(k, n, a, b, c, i, j, cols),
                    4 => nn_tile::<4, V, MASKED>(k, n, a, b, c, i, j, cols),
                    3 => nn_tile::<3, V, MASKED>(k, n, a, b, c, i, j, cols),
                    2 => nn_tile::<2, V, MASKED>(k, n, a, b, c, i, j, cols),
                    _ => nn_tile::<1, V, MASKED>(k, n, a, b, c, i, j, cols),
                }
            }
            i += rows;
        }
    }

    /// c[i..i + R][j..j + 8V] (the last vector masked to `cols` when `MASKED`) = Σₚ a[·][p]·b[p][·].
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn nn_tile<const R: usize, const V: usize, const MASKED: bool>(
        k: usize,
        n: usize,
        a: Mat,
        b: &[f32],
        c: &mut [f32],
        i: usize,
        j: usize,
        cols: usize,
    ) {
        let mask = lanes_mask(cols % 8);
        let (rs, cs) = (a.rs as usize, a.cs as usize);
        let a0 = unsafe { a.data.as_ptr().add(i * rs) };
        let b0 = unsafe { b.as_ptr().add(j) };
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for p in 0..k {
            // SAFETY: row p of b has columns j..j + 8V (or j..j + cols, masked); a covers
            // rows i..i + R at column p.
            let y: [__m256; V] = std::array::from_fn(|v| unsafe {
                let at = b0.add(p * n + 8 * v);
                if MASKED {
                    _mm256_maskload_ps(at, mask)
                } else {
                    _mm256_loadu_ps(at)
                }
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(unsafe { *a0.add(r * rs + p * cs) });
                for v in 0..V {
                    acc[v] = _mm256_fmadd_ps(x, y[v], acc[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let out = unsafe { c.as_mut_ptr().add((i + r) * n + j) };
            for (v, &acc) in acc.iter().enumerate() {
                if MASKED {
                    let mut t = [0.0f32; 8];
                    unsafe { _mm256_storeu_ps(t.as_mut_ptr(), acc) };
                    // SAFETY: `cols` outputs from column j of row i + r exist.
                    unsafe { std::ptr::copy_nonoverlapping(t.as_ptr(), out, cols) };
                } else {
                    // SAFETY: eight outputs from column j + 8v of row i + r exist.
                    unsafe { _mm256_storeu_ps(out.add(8 * v), acc) };
                }
            }
        }
    }
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

    /// f32 rounding unit u = 2⁻²⁴.
    const U: f64 = 1.0 / (1u64 << 24) as f64;

    /// Asserts |got − Σ terms| ≤ (roundings + 1)·u·Σ|terms| for each element: a result built by
    /// `roundings` fused multiply-adds and additions in sequence, each with relative error ≤ u,
    /// is within γ = roundings·u/(1 − roundings·u) < (roundings + 1)·u of the exact sum, relative
    /// to the sum of the absolute values of its terms (Higham, Accuracy and Stability, §3.1).
    fn assert_sums_close(what: &str, got: &[f32], terms: impl Fn(usize) -> Vec<f64>, roundings: usize) {
        for (e, &g) in got.iter().enumerate() {
            let t = terms(e);
            let (exact, scale) = (t.iter().sum::<f64>(), t.iter().map(|v| v.abs()).sum::<f64>());
            let tol = (roundings + 1) as f64 * U * scale;
            assert!(
                (g as f64 - exact).abs() <= tol,
                "{what}: element {e}: {g} vs {exact} (tolerance {tol:e})"
            );
        }
    }

    /// Shapes that leave a partial tile in every direction (m: 3 and 6 rows per tile; n: 4, 16
    /// and 8 columns; k: 8 lanes), and the paper MLP's.
    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (3, 0, 5),
        (2, 7, 3),
        (5, 9, 10),
        (7, 17, 23),
        (13, 100, 37),
        (60, 100, 100),
        (60, 784, 100),
        SPLIT_SHAPE,
    ];

    /// A product from [`DENSE_SPLIT_WORK`] on, split in two.
    const SPLIT_SHAPE: (usize, usize, usize) = (200, 784, 100);

    /// c = a·bᵀ + bias (the fully connected forward) against the f64 sums, with and without bias:
    /// k/8 + 4 roundings per element along its longest chain (a lane's fused multiply-adds, the
    /// three levels of the lane sum, the bias).
    #[test]
    fn nt_bias_matches_f64_sums() {
        for (m, k, n) in SHAPES {
            let (a, b, bias) = (values(m * k, 1), values(n * k, 2), values(n, 3));
            for with_bias in [false, true] {
                let mut c = vec![f32::NAN; m * n];
                matmul_nt_bias(m, k, n, &a, &b, with_bias.then_some(&bias[..]), &mut c);
                let terms = |e: usize| {
                    let (i, j) = (e / n, e % n);
                    let mut t: Vec<f64> = (0..k).map(|p| a[i * k + p] as f64 * b[j * k + p] as f64).collect();
                    if with_bias {
                        t.push(bias[j] as f64);
                    }
                    t
                };
                let what = format!("nt {m}x{k}x{n} bias={with_bias}");
                assert_sums_close(&what, &c, terms, k.div_ceil(DOT_LANES) + 4);
            }
        }
    }

    /// c = a·b with a given transposed (dyᵀ·x, the weight gradient) and row-major (dy·W, dx)
    /// against the f64 sums: k fused multiply-adds per element.
    #[test]
    fn nn_matches_f64_sums_for_both_orientations_of_a() {
        for (m, k, n) in SHAPES {
            let (at, ar, b) = (values(k * m, 4), values(m * k, 5), values(k * n, 6));
            for (name, a) in [("transposed", Mat::transposed(&at, m)), ("rows", Mat::rows(&ar, k))] {
                let mut c = vec![f32::NAN; m * n];
                matmul_nn(m, k, n, a, &b, &mut c);
                let a_ip = |i: usize, p: usize| a.data[i * a.rs as usize + p * a.cs as usize] as f64;
                let terms = |e: usize| (0..k).map(|p| a_ip(e / n, p) * b[p * n + e % n] as f64).collect();
                assert_sums_close(&format!("nn {name} {m}x{k}x{n}"), &c, terms, k);
            }
        }
    }

    /// The bits of both products in a pool of `threads` threads (the shapes split their rows in
    /// two from [`DENSE_SPLIT_WORK`] on), and of the portable paths.
    fn dense_bits(threads: usize, portable: bool) -> Vec<u32> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut bits = Vec::new();
            for (m, k, n) in [SPLIT_SHAPE, (100, 200, 784), (60, 784, 100), (61, 300, 70), (7, 17, 23)] {
                let (a, b, bias) = (values(m * k, 7), values(n * k, 8), values(n, 9));
                let mut c = vec![0.0; m * n];
                if portable {
                    nt_bias_portable(m, k, n, &a, &b, Some(&bias), &mut c);
                } else {
                    matmul_nt_bias(m, k, n, &a, &b, Some(&bias), &mut c);
                }
                bits.extend(c.iter().map(|v| v.to_bits()));
                let b = values(k * n, 10);
                for a in [Mat::transposed(&a, m), Mat::rows(&a, k)] {
                    if portable {
                        nn_portable(m, k, n, a, &b, &mut c);
                    } else {
                        matmul_nn(m, k, n, a, &b, &mut c);
                    }
                    bits.extend(c.iter().map(|v| v.to_bits()));
                }
            }
            bits
        })
    }

    #[test]
    fn dense_products_have_the_same_bits_for_any_threads_and_path() {
        let (m, k, n) = SPLIT_SHAPE;
        assert!(m * k * n >= DENSE_SPLIT_WORK, "the test's large shapes must split");
        let one = dense_bits(1, false);
        assert_eq!(one, dense_bits(2, false), "1 vs 2 threads");
        assert_eq!(one, dense_bits(3, false), "1 vs 3 threads");
        assert_eq!(one, dense_bits(1, true), "the vectorized vs the portable path");
    }

    #[test]
    fn dense_products_reject_buffers_of_other_shapes() {
        let (a, b) = (values(6, 1), values(6, 2));
        let mut c = vec![0.0; 4];
        let short = std::panic::catch_unwind(move || matmul_nt_bias(2, 3, 2, &a[..5], &b, None, &mut c));
        assert!(short.is_err(), "a too short for 2 × 3");
        let (a, b) = (values(6, 1), values(6, 2));
        let mut c = vec![0.0; 4];
        let wide = std::panic::catch_unwind(move || matmul_nn(2, 3, 2, Mat::rows(&a, 4), &b, &mut c));
        assert!(
            wide.is_err(),
            "a view of 2 × 4 cut to 6 values does not cover 2 × 3 with stride 4"
        );
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
