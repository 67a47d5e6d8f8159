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

/// c[m × n] (row-major) = a[m × k]·b[k × n] + beta·c.
pub fn matmul(m: usize, k: usize, n: usize, a: Mat, b: Mat, beta: f32, c: &mut [f32]) {
    // The sgemm call below is unsafe: these checks keep this safe function sound.
    let extent = |v: &Mat, rows: usize, cols: usize| {
        rows == 0 || cols == 0 || ((rows - 1) as isize * v.rs + (cols - 1) as isize * v.cs) < v.data.len() as isize
    };
    assert!(
        c.len() == m * n && extent(&a, m, k) && extent(&b, k, n),
        "matmul: buffers too short for the shapes"
    );
    let blocks = if m * k * n >= PARALLEL_WORK && n >= 32 { 4 } else { 1 };
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
