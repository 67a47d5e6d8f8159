//! Padded sequences: which positions of a batch hold data ([`PositionMask`]), and the layers that
//! respect it.
//!
//! A batch of sequences `[batch, channels, positions]` (NCL: the engine's NCHW with one row) whose
//! examples are shorter than `positions` is padded; the mask says, per example and position,
//! whether the position holds data (shared by all channels: the kernel crate's masked batch norm
//! takes the same `[batch, positions]` layout). [`super::Sequential::set_mask`] hands the mask of
//! the next forward pass to every layer ([`super::Layer::set_mask`]); a masked layer keeps the
//! mask of its forward for its backward.
//!
//! ```text
//! ZeroMasked       y[n, c, t] = x[n, c, t] where mask[n, t], +0.0 elsewhere
//!                  dx[n, c, t] = dy[n, c, t] where mask[n, t], +0.0 elsewhere
//! MaskedMeanPool   y[n, c] = (1/m_n)·Σ_{t: mask[n, t]} x[n, c, t],  m_n = #{t: mask[n, t]} ≥ 1
//!                  dx[n, c, t] = dy[n, c]/m_n where mask[n, t], +0.0 elsewhere
//! ```
//!
//! Padding never leaks: both layers select (they never multiply a padded value by 0, which would
//! keep a NaN or an infinity), so whatever the padded positions of x or dy hold (1e30, NaN) no
//! output or gradient changes.

use super::{Layer, Mode, Param};
use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// Which positions of a batch of sequences hold data: `[batch, positions]` row-major, `true`
/// where the position holds data. Cheap to clone (the values are shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PositionMask {
    positions: usize,
    valid: Arc<[bool]>,
}

impl PositionMask {
    /// The mask of `valid` (`[batch, positions]`, row-major). Rejects `positions` = 0 and a
    /// length that is not a whole number of examples.
    pub fn new(valid: Vec<bool>, positions: usize) -> Result<Self> {
        ensure!(positions > 0, "a position mask needs at least one position per example");
        ensure!(
            valid.len().is_multiple_of(positions),
            "a position mask of {} values is not a whole number of examples of {positions} positions",
            valid.len()
        );
        Ok(PositionMask {
            positions,
            valid: valid.into(),
        })
    }

    /// The mask of sequences of `lengths` (one per example) padded at the end to `positions`:
    /// position t of example n holds data iff t < `lengths[n]`. Rejects `positions` = 0 and a
    /// length above `positions`.
    pub fn from_lengths(lengths: &[usize], positions: usize) -> Result<Self> {
        if let Some(&len) = lengths.iter().find(|&&len| len > positions) {
            anyhow::bail!("a sequence of length {len} does not fit {positions} positions");
        }
        let valid = lengths
            .iter()
            .flat_map(|&len| (0..positions).map(move |t| t < len))
            .collect();
        PositionMask::new(valid, positions)
    }

    /// Positions per example.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Examples.
    pub fn examples(&self) -> usize {
        self.valid.len() / self.positions
    }

    /// The mask, `[batch, positions]` row-major.
    pub fn valid(&self) -> &[bool] {
        &self.valid
    }

    /// The mask of example `n`. Panics if `n` is not below [`PositionMask::examples`].
    pub fn example(&self, n: usize) -> &[bool] {
        &self.valid[n * self.positions..(n + 1) * self.positions]
    }

    /// This mask if it fits a forward pass of `batch` examples of `positions` positions through
    /// the layer named `layer`; an error naming the layer otherwise.
    pub fn check_fits(&self, batch: usize, positions: usize, layer: &str) -> Result<&Self> {
        ensure!(
            self.positions == positions && self.examples() == batch,
            "{layer} takes {batch} examples of {positions} positions, but the mask is [{}, {}]",
            self.examples(),
            self.positions
        );
        Ok(self)
    }
}

/// The masks of a masked layer over `[channels, positions]` examples: the one it was given for
/// its next forward pass, and the one its last forward used (kept for the backward). Also held by
/// a masked [`super::BatchNormLayer`].
#[derive(Debug, Clone)]
pub(super) struct Masks {
    channels: usize,
    positions: usize,
    given: Option<PositionMask>,
    used: Option<PositionMask>,
}

impl Masks {
    /// For `[channels, positions]` examples; rejects zero sizes, naming the layer `what`.
    pub(super) fn new(channels: usize, positions: usize, what: &str) -> Result<Self> {
        ensure!(channels > 0 && positions > 0, "{what} sizes must be positive");
        Ok(Masks {
            channels,
            positions,
            given: None,
            used: None,
        })
    }

    /// Receives the mask of the next forward pass ([`super::Layer::set_mask`]).
    pub(super) fn give(&mut self, mask: &PositionMask) {
        self.given = Some(mask.clone());
    }

    /// The layer's name: `{kind}{channels}x{positions}`.
    fn name(&self, kind: &str) -> String {
        format!("{kind}{}x{}", self.channels, self.positions)
    }

    /// Values per example: channels × positions.
    fn size(&self) -> usize {
        self.channels * self.positions
    }

    /// The given mask, checked to fit a forward pass of `batch` examples through the layer named
    /// `layer`, now the one the backward uses.
    pub(super) fn for_forward(&mut self, batch: usize, layer: &str) -> Result<PositionMask> {
        let mask = (self.given.as_ref())
            .with_context(|| format!("{layer} needs a position mask (Sequential::set_mask) before its forward pass"))?;
        mask.check_fits(batch, self.positions, layer)?;
        self.used = Some(mask.clone());
        Ok(mask.clone())
    }

    /// The mask of the last forward pass, checked to fit a backward of `batch` examples.
    pub(super) fn for_backward(&self, batch: usize, layer: &str) -> Result<&PositionMask> {
        let mask = (self.used.as_ref()).with_context(|| format!("{layer} backward before a forward"))?;
        mask.check_fits(batch, self.positions, layer)
    }
}

/// Writes the values of `x` at the positions `valid` (one per position of a channel's row) and +0.0
/// at the others, row by row of `positions` values: `y` and `x` hold whole examples `[channels,
/// positions]`, one example per `valid` row.
fn select_rows(x: &[f32], valid: &[bool], positions: usize, y: &mut [f32]) {
    let example = y.len() / (valid.len() / positions);
    y.par_chunks_mut(example)
        .zip(x.par_chunks(example))
        .zip(valid.par_chunks(positions))
        .for_each(|((yn, xn), vn)| {
            for (yr, xr) in yn.chunks_exact_mut(positions).zip(xn.chunks_exact(positions)) {
                for ((y, &x), &v) in yr.iter_mut().zip(xr).zip(vn) {
                    *y = if v { x } else { 0.0 };
                }
            }
        });
}

/// Zeroes the padded positions of `[channels, positions]` examples (see the module docs): what a
/// convolution over padded sequences reads, so that a sequence's end is zero-padded whatever its
/// padding held.
pub struct ZeroMasked {
    masks: Masks,
}

impl ZeroMasked {
    /// The layer for `[channels, positions]` examples. Rejects zero sizes.
    pub fn new(channels: usize, positions: usize) -> Result<Self> {
        Ok(ZeroMasked {
            masks: Masks::new(channels, positions, "masking")?,
        })
    }
}

impl Layer for ZeroMasked {
    fn name(&self) -> String {
        self.masks.name("zeromasked")
    }
    fn input_size(&self) -> usize {
        self.masks.size()
    }

    fn forward(&mut self, x: &[f32], batch: usize, y: &mut [f32], _mode: Mode) -> Result<()> {
        let size = self.input_size();
        ensure!(
            x.len() == batch * size && y.len() == batch * size,
            "masking buffers do not match the batch"
        );
        let mask = self.masks.for_forward(batch, &self.name())?;
        select_rows(x, mask.valid(), mask.positions(), y);
        Ok(())
    }

    fn backward(&mut self, _x: &[f32], _y: &[f32], dy: &[f32], batch: usize, dx: Option<&mut [f32]>) -> Result<()> {
        ensure!(
            dy.len() == batch * self.input_size(),
            "masking dy does not match the batch"
        );
        let mask = self.masks.for_backward(batch, "masking")?;
        if let Some(dx) = dx {
            ensure!(dx.len() == dy.len(), "masking dx does not match the batch");
            select_rows(dy, mask.valid(), mask.positions(), dx);
        }
        Ok(())
    }

    fn params(&mut self) -> Vec<Param<'_>> {
        Vec::new()
    }

    fn set_mask(&mut self, mask: &PositionMask) {
        self.masks.give(mask);
    }
}

/// The mean of each channel over an example's valid positions: `[channels, positions]` →
/// `[channels]` (see the module docs). Every example needs at least one valid position.
pub struct MaskedMeanPool {
    masks: Masks,
}

impl MaskedMeanPool {
    /// The pooling of `[channels, positions]` examples. Rejects zero sizes.
    pub fn new(channels: usize, positions: usize) -> Result<Self> {
        Ok(MaskedMeanPool {
            masks: Masks::new(channels, positions, "pooling")?,
        })
    }
}

/// The number of valid positions of each example of `mask`; rejects an example without one.
fn valid_counts(mask: &PositionMask) -> Result<Vec<usize>> {
    (0..mask.examples())
        .map(|n| {
            let m = mask.example(n).iter().filter(|&&v| v).count();
            ensure!(m > 0, "example {n} of the batch has no valid position to average");
            Ok(m)
        })
        .collect()
}

impl Layer for MaskedMeanPool {
    fn name(&self) -> String {
        self.masks.name("maskedmeanpool")
    }
    fn input_size(&self) -> usize {
        self.masks.size()
    }
    fn output_size(&self) -> usize {
        self.masks.channels
    }

    fn forward(&mut self, x: &[f32], batch: usize, y: &mut [f32], _mode: Mode) -> Result<()> {
        let (isz, p, channels) = (self.input_size(), self.masks.positions, self.masks.channels);
        ensure!(
            x.len() == batch * isz && y.len() == batch * channels,
            "pooling buffers do not match the batch"
        );
        let name = self.name();
        let mask = self.masks.for_forward(batch, &name)?;
        let counts = valid_counts(&mask)?;
        y.par_chunks_mut(channels)
            .zip(x.par_chunks(isz))
            .enumerate()
            .for_each(|(n, (yn, xn))| {
                let valid = mask.example(n);
                for (y, row) in yn.iter_mut().zip(xn.chunks_exact(p)) {
                    let sum: f32 = row.iter().zip(valid).filter(|(_, &v)| v).map(|(&x, _)| x).sum();
                    *y = sum / counts[n] as f32;
                }
            });
        Ok(())
    }

    fn backward(&mut self, _x: &[f32], _y: &[f32], dy: &[f32], batch: usize, dx: Option<&mut [f32]>) -> Result<()> {
        let (isz, p, channels) = (self.input_size(), self.masks.positions, self.masks.channels);
        ensure!(dy.len() == batch * channels, "pooling dy does not match the batch");
        let mask = self.masks.for_backward(batch, "pooling")?;
        if let Some(dx) = dx {
            ensure!(dx.len() == batch * isz, "pooling dx does not match the batch");
            let counts = valid_counts(mask)?;
            dx.par_chunks_mut(isz)
                .zip(dy.par_chunks(channels))
                .enumerate()
                .for_each(|(n, (dxn, dyn_))| {
                    let valid = mask.example(n);
                    for (row, &d) in dxn.chunks_exact_mut(p).zip(dyn_) {
                        let g = d / counts[n] as f32;
                        for (dx, &v) in row.iter_mut().zip(valid) {
                            *dx = if v { g } else { 0.0 };
                        }
                    }
                });
        }
        Ok(())
    }

    fn params(&mut self) -> Vec<Param<'_>> {
        Vec::new()
    }

    fn set_mask(&mut self, mask: &PositionMask) {
        self.masks.give(mask);
    }
}
