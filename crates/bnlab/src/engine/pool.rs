//! Max pooling over square windows, no padding (PyTorch's `MaxPool2d(kernel, stride)`, floor mode).
//!
//! ```text
//! Shapes, per example: x [c, ih, iw] → y [c, oh, ow], oh = (ih − kernel) / stride + 1.
//! forward:  y[c, oy, ox] = max over the window at (oy·stride, ox·stride); the flat index of the
//!           winner within the example is kept (argmax [batch, c, oh, ow]).
//! backward: dx = 0, then dx[argmax] += dy (overlapping windows, stride < kernel, accumulate).
//! ```
//! Ties: the first maximum in row-major window order wins; NaN wins over numbers (as PyTorch's CPU
//! kernel: `v > best || v.is_nan()`).

use super::{Layer, Mode, Param};
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// `MaxPool2d`: square `kernel` windows every `stride` positions.
pub struct MaxPool2d {
    /// Channels.
    pub channels: usize,
    /// Input height and width.
    pub in_hw: (usize, usize),
    /// Output height and width.
    pub out_hw: (usize, usize),
    /// Window side.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    argmax: Vec<u32>,
}

impl MaxPool2d {
    /// Pooling of `[channels, in_h, in_w]` inputs.
    pub fn new(channels: usize, in_h: usize, in_w: usize, kernel: usize, stride: usize) -> Result<Self> {
        ensure!(channels > 0 && kernel > 0 && stride > 0, "pool sizes must be positive");
        ensure!(
            in_h >= kernel && in_w >= kernel,
            "a {kernel}×{kernel} window does not fit {in_h}×{in_w}"
        );
        ensure!(
            channels * in_h * in_w <= u32::MAX as usize,
            "example too large for u32 indices"
        );
        Ok(MaxPool2d {
            channels,
            in_hw: (in_h, in_w),
            out_hw: ((in_h - kernel) / stride + 1, (in_w - kernel) / stride + 1),
            kernel,
            stride,
            argmax: Vec::new(),
        })
    }
}

/// The common 2×2, stride-2 window of one example, row pair by row pair (same winners as the
/// general loop: the first maximum in order x00, x01, x10, x11; the last NaN wins). Written
/// without branches (selects on comparisons) so that the compiler vectorizes it across the row.
fn pool2x2(xn: &[f32], (ih, iw): (usize, usize), (oh, ow): (usize, usize), yn: &mut [f32], an: &mut [u32]) {
    let below = iw as u32;
    let rows = yn.chunks_exact_mut(ow).zip(an.chunks_exact_mut(ow));
    for (r, (yr, ar)) in rows.enumerate() {
        // Output row r is row oy of channel c; its window rows start at input row (c·ih + 2·oy).
        let (c, oy) = (r / oh, r % oh);
        let top = (c * ih + 2 * oy) * iw;
        let (xt, xb) = (&xn[top..][..2 * ow], &xn[top + iw..][..2 * ow]);
        for ox in 0..ow {
            let (mut best, mut at) = (xt[2 * ox], 0u32);
            for (v, off) in [(xt[2 * ox + 1], 1), (xb[2 * ox], below), (xb[2 * ox + 1], below + 1)] {
                #[allow(clippy::eq_op)] // v != v: v is NaN
                let take = v > best || v != v;
                best = if take { v } else { best };
                at = if take { off } else { at };
            }
            yr[ox] = best;
            ar[ox] = (top + 2 * ox) as u32 + at;
        }
    }
}

impl Layer for MaxPool2d {
    fn name(&self) -> String {
        format!("maxpool{}s{}", self.kernel, self.stride)
    }
    fn input_size(&self) -> usize {
        self.channels * self.in_hw.0 * self.in_hw.1
    }
    fn output_size(&self) -> usize {
        self.channels * self.out_hw.0 * self.out_hw.1
    }

    fn forward(&mut self, x: &[f32], batch: usize, y: &mut [f32], _mode: Mode) -> Result<()> {
        let (isz, osz) = (self.input_size(), self.output_size());
        ensure!(
            x.len() == batch * isz && y.len() == batch * osz,
            "pool buffers do not match the batch"
        );
        self.argmax.resize(batch * osz, 0);
        let ((ih, iw), (oh, ow), k, s) = (self.in_hw, self.out_hw, self.kernel, self.stride);
        let work = y.par_chunks_mut(osz).zip(self.argmax.par_chunks_mut(osz));
        x.par_chunks(isz).zip(work).for_each(|(xn, (yn, an))| {
            if k == 2 && s == 2 {
                return pool2x2(xn, (ih, iw), (oh, ow), yn, an);
            }
            for c in 0..self.channels {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let (mut best, mut at) = (f32::NEG_INFINITY, (c * ih + oy * s) * iw + ox * s);
                        for i in 0..k {
                            let row = (c * ih + oy * s + i) * iw + ox * s;
                            for (j, &v) in xn[row..row + k].iter().enumerate() {
                                if v > best || v.is_nan() {
                                    (best, at) = (v, row + j);
                                }
                            }
                        }
                        let o = (c * oh + oy) * ow + ox;
                        (yn[o], an[o]) = (xn[at], at as u32);
                    }
                }
            }
        });
        Ok(())
    }

    fn backward(&mut self, _x: &[f32], _y: &[f32], dy: &[f32], batch: usize, dx: Option<&mut [f32]>) -> Result<()> {
        let (isz, osz) = (self.input_size(), self.output_size());
        ensure!(
            self.argmax.len() == batch * osz,
            "pool backward without a forward of this batch"
        );
        ensure!(dy.len() == batch * osz, "pool dy does not match the batch");
        if let Some(dx) = dx {
            ensure!(dx.len() == batch * isz, "pool dx does not match the batch");
            let work = dy.par_chunks(osz).zip(self.argmax.par_chunks(osz));
            dx.par_chunks_mut(isz).zip(work).for_each(|(dxn, (dyn_, an))| {
                dxn.fill(0.0);
                for (&g, &a) in dyn_.iter().zip(an) {
                    dxn[a as usize] += g;
                }
            });
        }
        Ok(())
    }

    fn params(&mut self) -> Vec<Param<'_>> {
        Vec::new()
    }
}
