//! `BatchNorm`: a layer holding γ, β and running statistics over the stateless functions.

use crate::backward::{batch_norm_backward, batch_norm_backward_eval};
use crate::fold::InferenceAffine;
use crate::forward::{batch_norm_eval, batch_norm_train};
use crate::shape::check_eps;
use crate::stats::{update_running_stats, Momentum, PopulationStats, SavedStats};
use crate::{Element, Error, Layout};

/// Settings of a [`BatchNorm`] layer (PyTorch's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormConfig {
    /// ε added to the variance (default 1e-5); must be finite and > 0.
    pub eps: f64,
    /// How running statistics average over batches (default `Exponential(0.1)`).
    pub momentum: Momentum,
    /// Learn γ and β (default true). Without, γ = 1 and β = 0 and no parameter gradients exist.
    pub affine: bool,
    /// Keep running statistics for inference (default true). Without, `forward_eval` is an error
    /// and inference must use batch statistics or a [`PopulationStats`] estimate.
    pub track_running_stats: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig {
            eps: 1e-5,
            momentum: Momentum::Exponential(0.1),
            affine: true,
            track_running_stats: true,
        }
    }
}

/// A batch-norm layer over `num_features` channels: learned γ (`gamma`, initialized to 1) and β
/// (`beta`, 0), running mean (0) and running variance (1).
///
/// ```
/// use batchnorm::{BatchNorm, BatchNormConfig, Layout};
/// let mut bn = BatchNorm::<f32>::new(3, BatchNormConfig::default()).unwrap();
/// let x: Vec<f32> = (0..2 * 3 * 4).map(|i| i as f32).collect(); // NCHW [2, 3, 2, 2]
/// let mut y = vec![0.0; x.len()];
/// let saved = bn.forward_train(&x, &[2, 3, 2, 2], Layout::NCHW, &mut y).unwrap();
/// let (dy, mut dx) = (vec![1.0; x.len()], vec![0.0; x.len()]);
/// let (mut dgamma, mut dbeta) = (vec![0.0; 3], vec![0.0; 3]);
/// bn.backward(&x, &dy, &[2, 3, 2, 2], Layout::NCHW, &saved, Some(&mut dx), Some((&mut dgamma, &mut dbeta))).unwrap();
/// assert_eq!(dbeta, vec![8.0; 3]);
/// bn.forward_eval(&x, &[2, 3, 2, 2], Layout::NCHW, &mut y).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm<T: Element> {
    /// The layer's settings.
    pub config: BatchNormConfig,
    /// Number of channels.
    pub num_features: usize,
    /// γ, one per channel; empty when `affine` is false.
    pub gamma: Vec<T>,
    /// β, one per channel; empty when `affine` is false.
    pub beta: Vec<T>,
    /// Running mean; empty when `track_running_stats` is false.
    pub running_mean: Vec<T>,
    /// Running (unbiased) variance; empty when `track_running_stats` is false.
    pub running_var: Vec<T>,
    /// Training batches seen (drives [`Momentum::Cumulative`]).
    pub num_batches_tracked: u64,
}

impl<T: Element> BatchNorm<T> {
    /// A fresh layer. Rejects ε not finite and > 0 and a momentum outside (0, 1].
    pub fn new(num_features: usize, config: BatchNormConfig) -> Result<Self, Error> {
        check_eps(config.eps)?;
        config.momentum.check()?;
        let (params, stats) = (config.affine as usize, config.track_running_stats as usize);
        Ok(BatchNorm {
            config,
            num_features,
            gamma: vec![T::from_f64(1.0); num_features * params],
            beta: vec![T::from_f64(0.0); num_features * params],
            running_mean: vec![T::from_f64(0.0); num_features * stats],
            running_var: vec![T::from_f64(1.0); num_features * stats],
            num_batches_tracked: 0,
        })
    }

    pub(crate) fn gamma_beta(&self) -> (Option<&[T]>, Option<&[T]>) {
        if self.config.affine {
            (Some(&self.gamma), Some(&self.beta))
        } else {
            (None, None)
        }
    }

    fn check_features(&self, shape: &[usize], layout: Layout) -> Result<(), Error> {
        let g = layout.geometry(shape)?;
        crate::shape::check_channels("input", self.num_features, g.channels)
    }

    /// Training forward (Algorithm 1) and, when tracked, a running-statistics update.
    /// Rejects what [`batch_norm_train`] rejects and an input whose channel count differs from
    /// `num_features`; on error nothing (running statistics included) is changed.
    pub fn forward_train(
        &mut self,
        x: &[T],
        shape: &[usize],
        layout: Layout,
        y: &mut [T],
    ) -> Result<SavedStats, Error> {
        self.check_features(shape, layout)?;
        if self.config.track_running_stats {
            // Everything the running-statistics update could reject is checked before y is written.
            self.config.momentum.check()?;
            crate::shape::check_channels("running_mean", self.num_features, self.running_mean.len())?;
            crate::shape::check_channels("running_var", self.num_features, self.running_var.len())?;
        }
        let (gamma, beta) = self.gamma_beta();
        let (stats, saved) = batch_norm_train(x, shape, layout, gamma, beta, self.config.eps, y)?;
        if self.config.track_running_stats {
            let seen = self.num_batches_tracked + 1;
            update_running_stats(
                &mut self.running_mean,
                &mut self.running_var,
                &stats,
                self.config.momentum,
                seen,
            )?;
            self.num_batches_tracked = seen;
        }
        Ok(saved)
    }

    /// Inference forward with the running statistics. Rejects [`Error::NoRunningStats`] when they
    /// are not tracked, and what [`batch_norm_eval`] rejects.
    pub fn forward_eval(&self, x: &[T], shape: &[usize], layout: Layout, y: &mut [T]) -> Result<(), Error> {
        if !self.config.track_running_stats {
            return Err(Error::NoRunningStats);
        }
        self.check_features(shape, layout)?;
        let (gamma, beta) = self.gamma_beta();
        batch_norm_eval(
            x,
            shape,
            layout,
            &self.running_mean,
            &self.running_var,
            gamma,
            beta,
            self.config.eps,
            y,
        )
    }

    /// Training backward: writes dx and/or (dγ, dβ) when given. Without affine, `dparams` must be
    /// `None`-equivalent: it is ignored. Rejects what [`batch_norm_backward`] rejects.
    pub fn backward(
        &self,
        x: &[T],
        dy: &[T],
        shape: &[usize],
        layout: Layout,
        saved: &SavedStats,
        dx: Option<&mut [T]>,
        dparams: Option<(&mut [T], &mut [T])>,
    ) -> Result<(), Error> {
        self.check_features(shape, layout)?;
        let (gamma, _) = self.gamma_beta();
        let (dg, db) = match (self.config.affine, dparams) {
            (true, Some((dg, db))) => (Some(dg), Some(db)),
            _ => (None, None),
        };
        batch_norm_backward(x, dy, shape, layout, saved, gamma, dx, dg, db)
    }

    /// Inference-mode backward (running statistics as constants). Rejects
    /// [`Error::NoRunningStats`] when they are not tracked, and what [`batch_norm_backward_eval`] rejects.
    pub fn backward_eval(
        &self,
        x: &[T],
        dy: &[T],
        shape: &[usize],
        layout: Layout,
        dx: Option<&mut [T]>,
        dparams: Option<(&mut [T], &mut [T])>,
    ) -> Result<(), Error> {
        if !self.config.track_running_stats {
            return Err(Error::NoRunningStats);
        }
        self.check_features(shape, layout)?;
        let (gamma, _) = self.gamma_beta();
        let (dg, db) = match (self.config.affine, dparams) {
            (true, Some((dg, db))) => (Some(dg), Some(db)),
            _ => (None, None),
        };
        let (m, v, eps) = (&self.running_mean, &self.running_var, self.config.eps);
        batch_norm_backward_eval(x, dy, shape, layout, m, v, eps, gamma, dx, dg, db)
    }

    /// Replaces the running statistics by Algorithm 2's population estimate (and starts tracking
    /// them if the layer did not). Rejects an estimator of another channel count or with no batches.
    pub fn set_population_stats(&mut self, pop: &PopulationStats) -> Result<(), Error> {
        let (mean, var) = pop.finish::<T>()?;
        crate::shape::check_channels("population", self.num_features, mean.len())?;
        self.running_mean = mean;
        self.running_var = var;
        self.config.track_running_stats = true;
        Ok(())
    }

    /// The inference transform as one affine map per channel (for folding into the previous layer).
    /// Rejects [`Error::NoRunningStats`] when running statistics are not tracked.
    pub fn inference_affine(&self) -> Result<InferenceAffine, Error> {
        if !self.config.track_running_stats {
            return Err(Error::NoRunningStats);
        }
        let (gamma, beta) = self.gamma_beta();
        InferenceAffine::new(&self.running_mean, &self.running_var, gamma, beta, self.config.eps)
    }
}
