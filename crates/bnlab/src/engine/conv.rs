//! 2-D convolution (cross-correlation, as in PyTorch's `Conv2d`) by im2col + GEMM; a 1-D
//! convolution over sequences is one over a single row ([`Conv2d::conv1d`]).
//!
//! ```text
//! Shapes, per example (batch-major, NCHW flattened):
//!   x   [in_c, in_h, in_w]              y   [out_c, out_h, out_w]
//!   W   [out_c, in_c, kh, kw]  (OIHW)   b   [out_c]
//!   col [in_c·kh·kw, out_h·out_w]       im2col of one example: row (c, i, j), column (oy, ox) holds
//!                                       x[c, oy·s + i − ph, ox·s + j − pw] (0 outside the image;
//!                                       ph, pw: the zero padding of rows and columns)
//! forward:  y_n = W·col_n + b
//! backward: dW = Σ_n dy_n·col_nᵀ,  db = Σ_n Σ_(oy,ox) dy_n,  dx_n = col2im(Wᵀ·dy_n)
//! ```
//!
//! The batch is cut into at most `CHUNKS` (16) runs of consecutive examples (the cut depends only on
//! the batch size) that run on the rayon pool; a run's products stay on its thread (the runs are
//! the parallelism). Each run owns im2col buffers and a dW partial sum;
//! the partial sums are added in run order, so outputs and gradients are bitwise identical for any
//! number of threads.

use super::gemm::{matmul_nt_acc, matmul_serial as matmul, Mat};
use super::{Layer, Mode, Param};
use anyhow::{ensure, Result};
use rand::Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

/// Most runs of examples a batch is cut into.
const CHUNKS: usize = 16;

/// How the weights are initialised (biases start at zero).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConvInit {
    /// N(0, std²).
    Normal(f32),
    /// He et al. (2015): N(0, 2/fan_in), fan_in = in_c·kh·kw.
    He,
}

/// The geometry of one convolution (all sizes per example).
#[derive(Debug, Clone, Copy)]
struct Geom {
    ic: usize,
    ih: usize,
    iw: usize,
    kh: usize,
    kw: usize,
    s: usize,
    ph: usize,
    pw: usize,
    oh: usize,
    ow: usize,
}

/// Per-run scratch: one example's im2col, its gradient dcol and a dW partial sum.
#[derive(Default)]
struct Scratch {
    /// im2col of one example. Its padding entries (outside the image) are the same for every
    /// example: zero from the allocation on, [`Geom::im2col`] writes only the others.
    col: Vec<f32>,
    dcol: Vec<f32>,
    grad_weight: Vec<f32>,
}

/// `Conv2d`: weight `[out, in, kh, kw]`, optional bias `[out]`, square stride, zero padding.
pub struct Conv2d {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Input height and width.
    pub in_hw: (usize, usize),
    /// Output height and width: (in + 2·padding − kernel) / stride + 1, per direction.
    pub out_hw: (usize, usize),
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding of the rows (top and bottom) and of the columns (left and right).
    pub padding: (usize, usize),
    /// Weight `[out, in, kh, kw]`.
    pub weight: Vec<f32>,
    /// Bias `[out]`, if any.
    pub bias: Option<Vec<f32>>,
    grad_weight: Vec<f32>,
    grad_bias: Vec<f32>,
    scratch: Vec<Scratch>,
}

impl Conv2d {
    /// A convolution of `[in_c, in_h, in_w]` inputs with `padding` zeros on every side; weights
    /// from `init`, zero bias (when `bias`). Rejects zero sizes and a kernel larger than the
    /// padded input.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_c: usize,
        out_c: usize,
        in_h: usize,
        in_w: usize,
        kernel: (usize, usize),
        stride: usize,
        padding: usize,
        bias: bool,
        init: ConvInit,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        Self::with_padding(
            in_c,
            out_c,
            (in_h, in_w),
            kernel,
            stride,
            (padding, padding),
            bias,
            init,
            rng,
        )
    }

    /// A 1-D convolution over sequences `[in_c, len]` (stored as `[in_c, 1, len]`), kernel `k`
    /// (odd), stride 1 and "same" zero padding, (k − 1)/2 on each end: the output is `[out_c,
    /// len]`. Weights from `init` (He: fan_in = in_c·k), zero bias (when `bias`). Rejects zero
    /// sizes and an even kernel.
    pub fn conv1d(
        in_c: usize,
        out_c: usize,
        len: usize,
        k: usize,
        bias: bool,
        init: ConvInit,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        ensure!(
            k % 2 == 1,
            "a 1-D convolution with \"same\" padding needs an odd kernel, not {k}"
        );
        Self::with_padding(in_c, out_c, (1, len), (1, k), 1, (0, k / 2), bias, init, rng)
    }

    /// [`Conv2d::new`] with the zero padding `(ph, pw)` of rows and columns.
    #[allow(clippy::too_many_arguments)]
    fn with_padding(
        in_c: usize,
        out_c: usize,
        (in_h, in_w): (usize, usize),
        kernel: (usize, usize),
        stride: usize,
        (ph, pw): (usize, usize),
        bias: bool,
        init: ConvInit,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        let (kh, kw) = kernel;
        ensure!(
            in_c > 0 && out_c > 0 && kh > 0 && kw > 0 && stride > 0,
            "conv sizes must be positive"
        );
        ensure!(
            in_h + 2 * ph >= kh && in_w + 2 * pw >= kw,
            "a {kh}×{kw} kernel does not fit a padded {in_h}×{in_w} input"
        );
        let out_hw = ((in_h + 2 * ph - kh) / stride + 1, (in_w + 2 * pw - kw) / stride + 1);
        let std = match init {
            ConvInit::Normal(std) => std,
            ConvInit::He => (2.0 / (in_c * kh * kw) as f32).sqrt(),
        };
        let normal = Normal::new(0.0f32, std)?;
        let n = out_c * in_c * kh * kw;
        Ok(Conv2d {
            in_channels: in_c,
            out_channels: out_c,
            in_hw: (in_h, in_w),
            out_hw,
            kernel,
            stride,
            padding: (ph, pw),
            weight: (0..n).map(|_| normal.sample(rng)).collect(),
            bias: bias.then(|| vec![0.0; out_c]),
            grad_weight: vec![0.0; n],
            grad_bias: vec![0.0; if bias { out_c } else { 0 }],
            scratch: Vec::new(),
        })
    }

    /// Folds inference batch norm that follows this convolution into it (one affine map per
    /// output channel, over all its positions): W ← diag(scale)·W row by output channel,
    /// b ← scale·b + shift (b = 0 when the layer has none); afterwards the layer has a bias.
    /// Rejects a map whose channel count is not this layer's output channel count.
    pub fn fold_batchnorm(&mut self, bn: &::batchnorm::InferenceAffine) -> anyhow::Result<()> {
        let params = (&mut self.weight[..], &mut self.bias, &mut self.grad_bias);
        super::fold_batchnorm_into(bn, params, self.out_channels, ("a convolution", "output channels"))
    }

    fn geom(&self) -> Geom {
        Geom {
            ic: self.in_channels,
            ih: self.in_hw.0,
            iw: self.in_hw.1,
            kh: self.kernel.0,
            kw: self.kernel.1,
            s: self.stride,
            ph: self.padding.0,
            pw: self.padding.1,
            oh: self.out_hw.0,
            ow: self.out_hw.1,
        }
    }

    /// Checks a batch's buffers (x, and y or dy as `out`) against the layer's sizes and sizes the
    /// scratch buffers: returns the geometry, the input and output sizes of one example, the
    /// examples per run and the number of runs.
    fn batch_pass(&mut self, x: &[f32], out: &[f32], batch: usize) -> Result<(Geom, usize, usize, usize, usize)> {
        let (isz, osz) = (self.input_size(), self.output_size());
        ensure!(
            x.len() == batch * isz && out.len() == batch * osz,
            "conv buffers do not match the batch"
        );
        let (per, runs) = self.runs(batch);
        Ok((self.geom(), isz, osz, per, runs))
    }

    /// Examples per run and number of runs for `batch`; sizes the scratch buffers.
    fn runs(&mut self, batch: usize) -> (usize, usize) {
        let per = batch.div_ceil(CHUNKS).max(1);
        let runs = batch.div_ceil(per);
        let g = self.geom();
        let col = g.ic * g.kh * g.kw * g.oh * g.ow;
        if self.scratch.len() < runs {
            self.scratch.resize_with(runs, Scratch::default);
        }
        for s in &mut self.scratch[..runs] {
            s.col.resize(col, 0.0);
            s.dcol.resize(col, 0.0);
            s.grad_weight.resize(self.weight.len(), 0.0);
        }
        (per, runs)
    }
}

impl Geom {
    /// Output columns ox whose input column ox·s + j − pw lies inside [0, iw).
    fn valid_cols(&self, j: usize) -> (usize, usize) {
        let lo = self.pw.saturating_sub(j).div_ceil(self.s).min(self.ow);
        let hi = (self.iw + self.pw).saturating_sub(j).div_ceil(self.s).min(self.ow);
        (lo, hi.max(lo))
    }

    /// Calls `f(col_at, x_at, len)` for each stretch of `len` entries of a row of col
    /// `[ic·kh·kw, oh·ow]` whose input positions lie inside the image: col entries
    /// `col_at..col_at + len` and the input entries `x_at`, `x_at + s`, … of one example
    /// `[ic, ih, iw]`. Rows of col in order, output rows in order within each.
    #[inline(always)]
    fn for_each_stretch(&self, mut f: impl FnMut(usize, usize, usize)) {
        let p = self.oh * self.ow;
        for r in 0..self.ic * self.kh * self.kw {
            let (c, i, j) = (r / (self.kh * self.kw), r / self.kw % self.kh, r % self.kw);
            let (lo, hi) = self.valid_cols(j);
            for oy in 0..self.oh {
                let iy = (oy * self.s + i).wrapping_sub(self.ph);
                if iy >= self.ih || lo == hi {
                    continue;
                }
                let x0 = lo * self.s + j - self.pw;
                f(r * p + oy * self.ow + lo, (c * self.ih + iy) * self.iw + x0, hi - lo);
            }
        }
    }

    /// col `[ic·kh·kw, oh·ow]` from one example x `[ic, ih, iw]`: writes the entries inside the
    /// image only; the padding entries must be zero already (they are in [`Scratch::col`]).
    /// Skipping them saves a `memset` call per few elements.
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        self.for_each_stretch(|col_at, x_at, len| {
            let out = &mut col[col_at..col_at + len];
            if self.s == 1 {
                out.copy_from_slice(&x[x_at..x_at + len]);
            } else {
                for (o, &v) in out.iter_mut().zip(x[x_at..].iter().step_by(self.s)) {
                    *o = v;
                }
            }
        });
    }

    /// dx `[ic, ih, iw]` = the sum of dcol `[ic·kh·kw, oh·ow]` back onto the input positions.
    fn col2im(&self, col: &[f32], dx: &mut [f32]) {
        dx.fill(0.0);
        self.for_each_stretch(|col_at, x_at, len| {
            let src = &col[col_at..col_at + len];
            if self.s == 1 {
                // Contiguous: the same adds as below, in a form the compiler vectorizes.
                let d = &mut dx[x_at..x_at + len];
                d.iter_mut().zip(src).for_each(|(d, &v)| *d += v);
            } else {
                for (d, &v) in dx[x_at..].iter_mut().step_by(self.s).zip(src) {
                    *d += v;
                }
            }
        });
    }
}

impl Layer for Conv2d {
    fn as_conv(&mut self) -> Option<&mut Conv2d> {
        Some(self)
    }

    fn name(&self) -> String {
        let ((kh, kw), (ph, pw)) = (self.kernel, self.padding);
        let padding = match ph == pw {
            true => format!("{ph}"),
            false => format!("{ph}x{pw}"),
        };
        format!(
            "conv{}x{}k{kh}x{kw}s{}p{padding}",
            self.in_channels, self.out_channels, self.stride
        )
    }
    fn input_size(&self) -> usize {
        self.in_channels * self.in_hw.0 * self.in_hw.1
    }
    fn output_size(&self) -> usize {
        self.out_channels * self.out_hw.0 * self.out_hw.1
    }

    /// x `[batch, in_c, in_h, in_w]` → y `[batch, out_c, out_h, out_w]`.
    fn forward(&mut self, x: &[f32], batch: usize, y: &mut [f32], _mode: Mode) -> Result<()> {
        let (g, isz, osz, per, runs) = self.batch_pass(x, y, batch)?;
        let (k, p, oc) = (g.ic * g.kh * g.kw, g.oh * g.ow, self.out_channels);
        let (w, bias) = (&self.weight, self.bias.as_deref());
        let work = x.par_chunks(per * isz).zip(y.par_chunks_mut(per * osz));
        self.scratch[..runs].par_iter_mut().zip(work).for_each(|(s, (xr, yr))| {
            for (xn, yn) in xr.chunks_exact(isz).zip(yr.chunks_exact_mut(osz)) {
                g.im2col(xn, &mut s.col);
                let beta = match bias {
                    Some(b) => {
                        yn.chunks_exact_mut(p).zip(b).for_each(|(row, &bo)| row.fill(bo));
                        1.0
                    }
                    None => 0.0,
                };
                matmul(oc, k, p, Mat::rows(w, k), Mat::rows(&s.col, p), beta, yn);
            }
        });
        Ok(())
    }

    /// dW = Σ dy_n·col_nᵀ (per run, runs summed in order), db = Σ dy, dx_n = col2im(Wᵀ·dy_n).
    fn backward(&mut self, x: &[f32], _y: &[f32], dy: &[f32], batch: usize, dx: Option<&mut [f32]>) -> Result<()> {
        let (g, isz, osz, per, runs) = self.batch_pass(x, dy, batch)?;
        let (k, p, oc) = (g.ic * g.kh * g.kw, g.oh * g.ow, self.out_channels);
        let w = &self.weight;
        // One run: accumulate its dW partial; with dx, dcol = Wᵀ·dy_n and its col2im.
        // dW_n = dy_n·col_nᵀ contracts over the p output positions: where p is long against the
        // k = in_c·kh·kw outputs per filter (the first layer: p 784, k 25), row-by-row dot products
        // beat sgemm, which would pack the transposed col; with p and k alike (the second layer:
        // p 196, k 200) sgemm is faster (figures in docs/tuning-log.md).
        let run = |s: &mut Scratch, xr: &[f32], dyr: &[f32], mut dxr: Option<&mut [f32]>| {
            s.grad_weight.fill(0.0);
            for (n, (xn, dyn_)) in xr.chunks_exact(isz).zip(dyr.chunks_exact(osz)).enumerate() {
                g.im2col(xn, &mut s.col);
                if p >= 4 * k {
                    matmul_nt_acc(oc, k, p, dyn_, &s.col, &mut s.grad_weight);
                } else {
                    matmul(
                        oc,
                        p,
                        k,
                        Mat::rows(dyn_, p),
                        Mat::transposed(&s.col, p),
                        1.0,
                        &mut s.grad_weight,
                    );
                }
                if let Some(dxr) = dxr.as_deref_mut() {
                    matmul(k, oc, p, Mat::transposed(w, k), Mat::rows(dyn_, p), 0.0, &mut s.dcol);
                    g.col2im(&s.dcol, &mut dxr[n * isz..][..isz]);
                }
            }
        };
        let scratch = &mut self.scratch[..runs];
        let pairs = x.par_chunks(per * isz).zip(dy.par_chunks(per * osz));
        match dx {
            Some(dx) => {
                ensure!(dx.len() == batch * isz, "conv dx does not match the batch");
                let work = pairs.zip(dx.par_chunks_mut(per * isz));
                scratch
                    .par_iter_mut()
                    .zip(work)
                    .for_each(|(s, ((xr, dyr), dxr))| run(s, xr, dyr, Some(dxr)));
            }
            None => scratch
                .par_iter_mut()
                .zip(pairs)
                .for_each(|(s, (xr, dyr))| run(s, xr, dyr, None)),
        }
        self.grad_weight.copy_from_slice(&self.scratch[0].grad_weight);
        for s in &self.scratch[1..runs] {
            self.grad_weight
                .iter_mut()
                .zip(&s.grad_weight)
                .for_each(|(g, v)| *g += v);
        }
        if self.bias.is_some() {
            self.grad_bias.fill(0.0);
            for dyn_ in dy.chunks_exact(osz) {
                for (gb, row) in self.grad_bias.iter_mut().zip(dyn_.chunks_exact(p)) {
                    *gb += row.iter().sum::<f32>();
                }
            }
        }
        Ok(())
    }

    fn params(&mut self) -> Vec<Param<'_>> {
        super::weight_and_bias(&mut self.weight, &self.grad_weight, self.bias.as_mut(), &self.grad_bias)
    }
}
