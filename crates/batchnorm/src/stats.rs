//! Per-channel statistics: mergeable batch statistics, what backward needs, running averages and
//! the population estimator of Algorithm 2.

use crate::check;
use crate::kernels::scratch::Scratch;
use crate::kernels::{plan, with_simd};
use crate::{Element, Error, View};

/// Statistics of one mini-batch (or one worker's shard of it): per channel the count, mean and
/// M2 = Σ(x − mean)². Mergeable without loss of precision ([`BatchStats::merge`], Chan's formula):
/// the first phase of synchronized batch norm.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Values per channel (`m` in the paper).
    pub count: u64,
    /// Per-channel mean μ_B.
    pub mean: Vec<f64>,
    /// Per-channel sum of squared deviations from the mean.
    pub m2: Vec<f64>,
}

impl BatchStats {
    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// Biased variance σ²_B = M2 / m (Algorithm 1). NaN where `count` is 0.
    pub fn var_biased(&self) -> Vec<f64> {
        self.m2.iter().map(|&s| s / self.count as f64).collect()
    }

    /// Unbiased variance M2 / (m − 1) (what running statistics track, as in Algorithm 2).
    pub fn var_unbiased(&self) -> Vec<f64> {
        self.m2.iter().map(|&s| s / (self.count as f64 - 1.0)).collect()
    }

    /// Merges `other` into `self` (Chan, Golub & LeVeque): the statistics of the union of the two
    /// sets of values. Merging in a fixed order gives deterministic bits.
    ///
    /// Rejects statistics of a different channel count ([`Error::MergeMismatch`]).
    ///
    /// ```
    /// use batchnorm::{batch_stats, Layout, View};
    /// let a = batch_stats(View::new(&[1.0f64, 2.0, 3.0, 4.0], &[2, 2], Layout::NC)).unwrap();
    /// let b = batch_stats(View::new(&[5.0f64, 6.0], &[1, 2], Layout::NC)).unwrap();
    /// let mut all = a.clone();
    /// all.merge(&b).unwrap();
    /// let direct = batch_stats(View::new(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2], Layout::NC)).unwrap();
    /// assert_eq!(all.count, 3);
    /// assert!((all.mean[0] - direct.mean[0]).abs() < 1e-12 && (all.m2[1] - direct.m2[1]).abs() < 1e-12);
    /// ```
    pub fn merge(&mut self, other: &BatchStats) -> Result<(), Error> {
        check::batch_stats(self)?;
        check::batch_stats(other)?;
        if self.channels() != other.channels() {
            return Err(Error::MergeMismatch {
                left: self.channels(),
                right: other.channels(),
            });
        }
        if other.count == 0 {
            return Ok(());
        }
        if self.count == 0 {
            *self = other.clone();
            return Ok(());
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        for c in 0..self.channels() {
            let delta = other.mean[c] - self.mean[c];
            self.mean[c] += delta * (nb / n);
            self.m2[c] += other.m2[c] + delta * delta * (na * nb / n);
        }
        self.count += other.count;
        Ok(())
    }

    /// What the normalization and backward need: the mean and 1/√(σ²_B + ε).
    ///
    /// Rejects ε that is not finite and > 0 ([`Error::InvalidEps`]).
    pub fn saved(&self, eps: f64) -> Result<SavedStats, Error> {
        check::eps(eps)?;
        let mut saved = SavedStats {
            count: self.count,
            mean: self.mean.clone(),
            inv_std: self.var_biased(),
        };
        with_simd(|| inv_std_in_place(&mut saved.inv_std, eps));
        Ok(saved)
    }
}

/// 1/d when it is exact (d a power of two, 1/d normal): then v·(1/d) is v/d in the same bits
/// (both round the same exact quotient once), and a loop that divides by d can multiply
/// instead. `None` otherwise.
#[inline(always)]
pub(crate) fn exact_reciprocal(d: f64) -> Option<f64> {
    let r = 1.0 / d;
    // A positive normal d with no mantissa bits is a power of two.
    (d.is_normal() && d > 0.0 && d.to_bits() & ((1 << 52) - 1) == 0 && r.is_normal()).then_some(r)
}

/// 1/√(σ² + ε): the one place this formula lives.
#[inline]
pub(crate) fn inv_std(var: f64, eps: f64) -> f64 {
    1.0 / (var + eps).sqrt()
}

/// [`inv_std`] of each variance of `var` (fixed or running statistics), computed as
/// [`inv_std_in_place`] computes it: the same bits as `inv_std` one by one.
pub(crate) fn inv_stds<P: Element>(var: &[P], eps: f64) -> Scratch<f64> {
    let mut inv = Scratch::collect(var.iter().map(|v| v.to_f64()));
    with_simd(|| inv_std_in_place(&mut inv, eps));
    inv
}

/// [`inv_std`] of every entry of `var`, in place: a slice loop, which vectorizes (4 square roots
/// and divisions at a time in an AVX2 function, see `kernels::with_simd`).
#[inline]
pub(crate) fn inv_std_in_place(var: &mut [f64], eps: f64) {
    for v in var {
        *v = inv_std(*v, eps);
    }
}

/// What training-mode backward needs from the forward pass, kept in `f64` (a few numbers per
/// channel) so that backward sees exactly the statistics forward used. A ghost
/// [`crate::BatchNorm`] layer keeps every group's in one, packed group after group (see
/// [`crate::GhostSaved`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SavedStats {
    /// Values per channel the statistics were taken over (global count for synchronized BN).
    pub count: u64,
    /// Per-channel batch mean μ_B.
    pub mean: Vec<f64>,
    /// Per-channel 1/√(σ²_B + ε).
    pub inv_std: Vec<f64>,
}

/// Per-channel mean and M2 of `x`, the first phase of the training forward.
///
/// Rejects: a shape that does not fit the layout, an empty shape, `x` of the wrong length.
/// Does not itself require two values per channel (a worker's shard may hold one); the training
/// functions check the (global) count.
pub fn batch_stats<T: Element>(x: View<'_, T>) -> Result<BatchStats, Error> {
    batch_stats_where(x, None)
}

/// [`batch_stats`] of the positions `mask` selects (`None`: all of them): `count` is their
/// number, and with none the mean and M2 are 0. Checks the shape and `x`, then the mask's length.
pub(crate) fn batch_stats_where<T: Element>(x: View<'_, T>, mask: Option<&[bool]>) -> Result<BatchStats, Error> {
    let View { data: x, shape, layout } = x;
    let g = check::input("x", x, shape, layout)?;
    let count = check::mask(&g, mask)?;
    let m = plan::channel_moments_where(&g, x, mask);
    Ok(BatchStats {
        count,
        mean: m.mean,
        m2: m.m2,
    })
}

/// How running statistics average over mini-batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Momentum {
    /// Exponential moving average: running ← (1 − m)·running + m·batch (PyTorch's convention:
    /// `m` is the weight of the new batch, 0.1 by default).
    Exponential(f64),
    /// Cumulative (equal-weight) average over all batches seen (PyTorch's `momentum=None`).
    Cumulative,
}

/// Updates running statistics with one batch: the mean with μ_B, the variance with the
/// *unbiased* batch variance m/(m−1)·σ²_B, as Algorithm 2 does (and PyTorch, Keras, candle).
/// `batches_seen` counts batches including this one (used by [`Momentum::Cumulative`]).
/// `running_mean` and `running_var` are updated in place (outputs last, as everywhere).
///
/// Rejects: vectors whose length differs from the batch's channels, an invalid momentum, a batch
/// with fewer than 2 values per channel.
pub fn update_running_stats<T: Element>(
    batch: &BatchStats,
    momentum: Momentum,
    batches_seen: u64,
    running_mean: &mut [T],
    running_var: &mut [T],
) -> Result<(), Error> {
    check::batch_stats(batch)?;
    check::running_stats(batch.channels(), running_mean, running_var)?;
    check::momentum(momentum)?;
    check::training_count(batch.count, &[])?;
    blend_running(
        &batch.mean,
        &batch.var_unbiased(),
        momentum,
        batches_seen,
        running_mean,
        running_var,
    );
    Ok(())
}

/// The running-statistics average itself: running ← (1 − w)·running + w·batch per channel, with
/// w the momentum or, cumulative, 1/`batches_seen`; `mean` and `var` are the batch's estimates
/// (the variance already unbiased). Arguments already checked (lengths, momentum).
pub(crate) fn blend_running<T: Element>(
    mean: &[f64],
    var: &[f64],
    momentum: Momentum,
    batches_seen: u64,
    running_mean: &mut [T],
    running_var: &mut [T],
) {
    let w = match momentum {
        Momentum::Exponential(m) => m,
        Momentum::Cumulative => 1.0 / batches_seen.max(1) as f64,
    };
    for c in 0..mean.len() {
        let (rm, rv) = (running_mean[c].to_f64(), running_var[c].to_f64());
        // (1 − w)·r + w·b: exact for w = 1 (the first cumulative batch, or momentum 1).
        running_mean[c] = T::from_f64((1.0 - w) * rm + w * mean[c]);
        running_var[c] = T::from_f64((1.0 - w) * rv + w * var[c]);
    }
}

/// Algorithm 2's population statistics, accumulated over any number of mini-batches after
/// training: E\[x\] = mean over batches of μ_B, Var\[x\] = m/(m−1)·(mean over batches of σ²_B).
///
/// With batches of unequal sizes each batch's variance is made unbiased with its own m before
/// averaging (identical to the paper's formula when all batches have the same m). Batches are
/// weighted equally, as in the paper.
///
/// ```
/// use batchnorm::{batch_stats, Layout, PopulationStats, View};
/// let mut pop = PopulationStats::new(1);
/// pop.observe(&batch_stats(View::new(&[0.0f64, 2.0], &[2, 1], Layout::NC)).unwrap()).unwrap();
/// pop.observe(&batch_stats(View::new(&[4.0f64, 6.0], &[2, 1], Layout::NC)).unwrap()).unwrap();
/// assert_eq!(pop.mean().unwrap(), vec![3.0]);      // mean of batch means 1 and 5
/// assert_eq!(pop.var().unwrap(), vec![2.0]);       // 2/(2−1) · mean of σ²_B = 1
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PopulationStats {
    batches: u64,
    mean: Vec<f64>,
    var: Vec<f64>,
}

impl PopulationStats {
    /// An estimator for `channels` channels that has seen nothing.
    pub fn new(channels: usize) -> Self {
        PopulationStats {
            batches: 0,
            mean: vec![0.0; channels],
            var: vec![0.0; channels],
        }
    }

    /// Number of mini-batches observed.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// The raw accumulators `(batches, running mean of batch means, running mean of unbiased batch
    /// variances)`, to save with a checkpoint; [`PopulationStats::from_parts`] restores them.
    pub fn parts(&self) -> (u64, &[f64], &[f64]) {
        (self.batches, &self.mean, &self.var)
    }

    /// An estimator in the state [`PopulationStats::parts`] returned. Rejects vectors of different
    /// lengths ([`Error::FeatureMismatch`]).
    pub fn from_parts(batches: u64, mean: Vec<f64>, var: Vec<f64>) -> Result<Self, Error> {
        check::channels("population var", mean.len(), var.len())?;
        Ok(PopulationStats { batches, mean, var })
    }

    /// Adds one mini-batch's statistics. Rejects a channel-count mismatch and a batch with
    /// fewer than 2 values per channel.
    pub fn observe(&mut self, batch: &BatchStats) -> Result<(), Error> {
        check::batch_stats(batch)?;
        check::channels("batch", self.mean.len(), batch.channels())?;
        check::training_count(batch.count, &[])?;
        self.batches += 1;
        let w = 1.0 / self.batches as f64;
        for (c, v) in batch.var_unbiased().into_iter().enumerate() {
            self.mean[c] = (1.0 - w) * self.mean[c] + w * batch.mean[c];
            self.var[c] = (1.0 - w) * self.var[c] + w * v;
        }
        Ok(())
    }

    /// Computes the statistics of `x` and adds them (see [`batch_stats`] for what it rejects).
    pub fn observe_batch<T: Element>(&mut self, x: View<'_, T>) -> Result<(), Error> {
        let s = batch_stats(x)?;
        check::training_count(s.count, x.shape)?;
        self.observe(&s)
    }

    /// E\[x\] per channel. [`Error::NoBatches`] before the first batch.
    pub fn mean(&self) -> Result<Vec<f64>, Error> {
        if self.batches == 0 {
            return Err(Error::NoBatches);
        }
        Ok(self.mean.clone())
    }

    /// Var\[x\] = m/(m−1)·E_B\[σ²_B\] per channel. [`Error::NoBatches`] before the first batch.
    pub fn var(&self) -> Result<Vec<f64>, Error> {
        if self.batches == 0 {
            return Err(Error::NoBatches);
        }
        Ok(self.var.clone())
    }

    /// Both, rounded to the element type (e.g. to replace a layer's running statistics).
    pub fn finish<T: Element>(&self) -> Result<(Vec<T>, Vec<T>), Error> {
        let (m, v) = (self.mean()?, self.var()?);
        Ok((
            m.into_iter().map(T::from_f64).collect(),
            v.into_iter().map(T::from_f64).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::exact_reciprocal;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Multiplying by the reciprocal it gives is dividing, bit for bit, over values from
    /// subnormal to huge, NaN and infinities; it gives none where 1/d is not exact.
    #[test]
    fn exact_reciprocal_divides_in_the_same_bits() {
        let mut values = vec![
            0.0,
            -0.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE / 3.0,
        ];
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9);
        for _ in 0..2000 {
            // Any finite bit pattern: every exponent, subnormals included.
            let v = f64::from_bits(rng.gen::<u64>() >> 1);
            if v.is_finite() {
                values.extend([v, -v]);
            }
        }
        for k in 0..=1022 {
            let d = 2f64.powi(k);
            let r = exact_reciprocal(d).unwrap_or_else(|| panic!("2^{k}"));
            for &v in &values {
                assert_eq!((v * r).to_bits(), (v / d).to_bits(), "{v:e} / 2^{k}");
            }
        }
        for d in [
            0.0,
            -2.0,
            3.0,
            15.0,
            12.0,
            0.5,
            2f64.powi(1023),
            f64::INFINITY,
            f64::NAN,
            1e-310,
        ] {
            let r = exact_reciprocal(d);
            // 0.5 is a power of two whose reciprocal is exact too.
            assert_eq!(r.is_some(), d == 0.5, "{d:e}");
        }
    }
}
