//! Local response normalization across channels (AlexNet; PyTorch's `LocalResponseNorm`).
//!
//! ```text
//! Shapes, per example: x, y, scale [c, spatial]. With n = size and the window
//! W(c) = {c − ⌊n/2⌋, …, c + ⌊(n−1)/2⌋} ∩ [0, C) (PyTorch pads n/2 channels before, (n−1)/2 after):
//!   s_c = k + α/n · Σ_{c'∈W(c)} x_{c'}²          (α divided by n, as PyTorch; zero padding counts in n)
//!   y_c = x_c · s_c^(−β)
//! backward (j ∈ W(c) ⇔ c ∈ [j − ⌊(n−1)/2⌋, j + ⌊n/2⌋]):
//!   dx_j = dy_j · s_j^(−β) − (2αβ/n) · x_j · Σ_{c: j∈W(c)} dy_c · y_c / s_c
//! ```

use super::{Layer, Mode, Param};
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// `Lrn` over `channels` channels of `spatial` positions each.
pub struct Lrn {
    /// Channels.
    pub channels: usize,
    /// Positions per channel (H·W).
    pub spatial: usize,
    /// Channels in a window (n).
    pub size: usize,
    /// α (divided by n in the formula).
    pub alpha: f32,
    /// β.
    pub beta: f32,
    /// k.
    pub k: f32,
    /// s `[batch, channels, spatial]` of the last forward.
    scale: Vec<f32>,
    /// s^(−β) `[batch, channels, spatial]` of the last forward (backward needs it again).
    inv: Vec<f32>,
    /// t = dy·y/s `[batch, channels, spatial]`, scratch for backward.
    tmp: Vec<f32>,
}

impl Lrn {
    /// LRN with window `size`, `alpha`, `beta`, `k`.
    pub fn new(channels: usize, spatial: usize, size: usize, alpha: f32, beta: f32, k: f32) -> Result<Self> {
        ensure!(channels > 0 && spatial > 0 && size > 0, "lrn sizes must be positive");
        Ok(Lrn {
            channels,
            spatial,
            size,
            alpha,
            beta,
            k,
            scale: Vec::new(),
            inv: Vec::new(),
            tmp: Vec::new(),
        })
    }

    /// AlexNet's constants (size 5, α 1e-4, β 0.75, k 2) in PyTorch's formula, which divides α by n
    /// (PyTorch's own default k is 1; AlexNet's paper does not divide: its α = 1e-4 is α = 5e-4 here).
    pub fn alexnet(channels: usize, spatial: usize) -> Self {
        Self::new(channels, spatial, 5, 1e-4, 0.75, 2.0).expect("positive sizes")
    }

    /// Channels [lo, hi] of the window W(c).
    fn window(&self, c: usize) -> (usize, usize) {
        (
            c.saturating_sub(self.size / 2),
            (c + (self.size - 1) / 2).min(self.channels - 1),
        )
    }

    /// Channels [lo, hi] of the c with j ∈ W(c).
    fn reverse_window(&self, j: usize) -> (usize, usize) {
        (
            j.saturating_sub((self.size - 1) / 2),
            (j + self.size / 2).min(self.channels - 1),
        )
    }
}

/// s^(−β); AlexNet's β = 0.75 as 1/(√s·√√s), two square roots being cheaper than `powf`
/// (within a few ulp of it). Forward keeps the result for backward.
fn pow_neg(s: f32, beta: f32) -> f32 {
    if beta == 0.75 {
        let r = s.sqrt();
        1.0 / (r * r.sqrt())
    } else {
        s.powf(-beta)
    }
}

impl Layer for Lrn {
    fn name(&self) -> String {
        format!("lrn{}", self.size)
    }
    fn input_size(&self) -> usize {
        self.channels * self.spatial
    }

    fn forward(&mut self, x: &[f32], batch: usize, y: &mut [f32], _mode: Mode) -> Result<()> {
        let sz = self.input_size();
        ensure!(
            x.len() == batch * sz && y.len() == x.len(),
            "lrn buffers do not match the batch"
        );
        let (mut scale, mut inv) = (std::mem::take(&mut self.scale), std::mem::take(&mut self.inv));
        scale.resize(x.len(), 0.0);
        inv.resize(x.len(), 0.0);
        let (hw, a, b, k) = (self.spatial, self.alpha / self.size as f32, self.beta, self.k);
        let work = y
            .par_chunks_mut(sz)
            .zip(scale.par_chunks_mut(sz))
            .zip(inv.par_chunks_mut(sz));
        x.par_chunks(sz).zip(work).for_each(|(xn, ((yn, sn), pn))| {
            for c in 0..self.channels {
                let (lo, hi) = self.window(c);
                let s = &mut sn[c * hw..][..hw];
                s.fill(0.0);
                for xc in xn[lo * hw..(hi + 1) * hw].chunks_exact(hw) {
                    s.iter_mut().zip(xc).for_each(|(s, &v)| *s += v * v);
                }
                s.iter_mut().for_each(|s| *s = k + a * *s);
                let (xc, yc, pc) = (&xn[c * hw..][..hw], &mut yn[c * hw..][..hw], &mut pn[c * hw..][..hw]);
                for ((o, p), (&v, &s)) in yc.iter_mut().zip(pc).zip(xc.iter().zip(s.iter())) {
                    *p = pow_neg(s, b);
                    *o = v * *p;
                }
            }
        });
        (self.scale, self.inv) = (scale, inv);
        Ok(())
    }

    fn backward(&mut self, x: &[f32], y: &[f32], dy: &[f32], batch: usize, dx: Option<&mut [f32]>) -> Result<()> {
        let sz = self.input_size();
        ensure!(
            self.scale.len() == batch * sz,
            "lrn backward without a forward of this batch"
        );
        ensure!(
            x.len() == batch * sz && y.len() == x.len() && dy.len() == x.len(),
            "lrn buffers do not match"
        );
        let Some(dx) = dx else { return Ok(()) };
        ensure!(dx.len() == x.len(), "lrn dx does not match the batch");
        let mut tmp = std::mem::take(&mut self.tmp);
        tmp.resize(x.len(), 0.0);
        let (hw, coef) = (self.spatial, 2.0 * self.alpha * self.beta / self.size as f32);
        let inputs = x.par_chunks(sz).zip(y.par_chunks(sz)).zip(dy.par_chunks(sz));
        let outputs = dx.par_chunks_mut(sz).zip(tmp.par_chunks_mut(sz));
        let saved = self.scale.par_chunks(sz).zip(self.inv.par_chunks(sz));
        inputs
            .zip(saved)
            .zip(outputs)
            .for_each(|((((xn, yn), dyn_), (sn, pn)), (dxn, tn))| {
                // t_c = dy_c · y_c / s_c
                tn.iter_mut()
                    .zip(dyn_.iter().zip(yn).zip(sn))
                    .for_each(|(t, ((&g, &v), &s))| *t = g * v / s);
                for j in 0..self.channels {
                    let (lo, hi) = self.reverse_window(j);
                    let d = &mut dxn[j * hw..][..hw];
                    d.fill(0.0);
                    for tc in tn[lo * hw..(hi + 1) * hw].chunks_exact(hw) {
                        d.iter_mut().zip(tc).for_each(|(d, &t)| *d += t);
                    }
                    let (xj, gj, pj) = (&xn[j * hw..][..hw], &dyn_[j * hw..][..hw], &pn[j * hw..][..hw]);
                    d.iter_mut()
                        .zip(xj.iter().zip(gj).zip(pj))
                        .for_each(|(d, ((&v, &g), &p))| *d = g * p - coef * v * *d);
                }
            });
        self.tmp = tmp;
        Ok(())
    }

    fn params(&mut self) -> Vec<Param<'_>> {
        Vec::new()
    }
}
