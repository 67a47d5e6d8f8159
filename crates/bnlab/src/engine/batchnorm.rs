//! Batch norm in the engine: the `batchnorm` crate's kernels behind the [`Layer`] interface.
//!
//! Convolutional BN (the paper's Section 3.2: one γ, β and one mean/variance per feature map,
//! over N·H·W values) uses the NCHW layout, i.e. examples `[channels, spatial]`. Why NCHW rather
//! than NHWC: [`super::Conv2d`]'s im2col + GEMM writes each example as `W·col = [out_c, oh·ow]`,
//! which *is* NCHW, and pooling and LRN index NCHW too, so NHWC would cost a transpose of every
//! conv output and gradient; and on this engine's feature-map shapes (8 channels of 28×28, 16 of
//! 14×14) the kernels are not faster in NHWC anyway: NHWC pays off only from wide planes with more
//! channels (the figures are in docs/tuning-log.md).

use super::{Layer, Mode, Param, State, StateValue};
use ::batchnorm::{
    batch_norm_train, Affine, BatchNorm, BatchNormConfig, Communicator, Grads, Layout, PopulationStats, SavedStats,
    View,
};
use anyhow::{bail, Context, Result};
use std::sync::Arc;

/// Batch norm over `channels` features; each example is `[channels]` (fully connected) or
/// `[channels, spatial]` (feature maps, NCHW: statistics per channel over N·H·W).
///
/// With a communicator set ([`BatchNormLayer::synchronize`]) training forward and backward are
/// synchronized batch norm over all ranks' shards of the global batch, and the parameter
/// gradients are this rank's share (summed over ranks by the data-parallel loop).
pub struct BatchNormLayer {
    /// The kernel crate's layer: γ, β, running statistics, settings.
    pub bn: BatchNorm<f32>,
    /// Spatial size per channel (1 for fully connected).
    pub spatial: usize,
    saved: Option<SavedStats>,
    population: PopulationStats,
    grad_gamma: Vec<f32>,
    grad_beta: Vec<f32>,
    sync: Option<Arc<dyn Communicator>>,
}

impl BatchNormLayer {
    /// A fresh layer (γ = 1, β = 0, running mean 0 and variance 1).
    pub fn new(channels: usize, spatial: usize, config: BatchNormConfig) -> Result<Self> {
        Ok(BatchNormLayer {
            bn: BatchNorm::new(channels, config)?,
            spatial,
            saved: None,
            population: PopulationStats::new(channels),
            grad_gamma: vec![0.0; channels],
            grad_beta: vec![0.0; channels],
            sync: None,
        })
    }

    fn shape(&self, batch: usize) -> ([usize; 3], Layout) {
        ([batch, self.bn.num_features, self.spatial], Layout::ChannelsFirst)
    }

    /// Synchronizes training statistics and backward reductions over `comm` (`None`: this
    /// process's batch alone).
    pub fn synchronize(&mut self, comm: Option<Arc<dyn Communicator>>) {
        self.sync = comm;
    }

    /// Forgets the population estimate (before collecting a new one).
    pub fn reset_population(&mut self) {
        self.population = PopulationStats::new(self.bn.num_features);
    }

    /// Replaces the running statistics by the population estimate collected in [`Mode::Collect`].
    pub fn use_population(&mut self) -> Result<()> {
        self.bn
            .set_population_stats(&self.population)
            .context("population statistics")?;
        Ok(())
    }
}

impl Layer for BatchNormLayer {
    fn name(&self) -> String {
        format!("batchnorm{}", self.bn.num_features)
    }
    fn input_size(&self) -> usize {
        self.bn.num_features * self.spatial
    }
    fn output_size(&self) -> usize {
        self.input_size()
    }

    fn forward(&mut self, x: &[f32], batch: usize, y: &mut [f32], mode: Mode) -> Result<()> {
        let (shape, layout) = self.shape(batch);
        let x = View::new(x, &shape, layout);
        match mode {
            Mode::Train => {
                self.saved = Some(match &self.sync {
                    Some(comm) => self.bn.forward_train_sync(comm.as_ref(), x, y)?,
                    None => self.bn.forward_train(x, y)?,
                })
            }
            Mode::Eval => self.bn.forward_eval(x, y)?,
            Mode::Collect => {
                let affine = if self.bn.config.affine {
                    Affine::new(&self.bn.gamma, &self.bn.beta)
                } else {
                    Affine::NONE
                };
                let (stats, _) = batch_norm_train(x, affine, self.bn.config.eps, y)?;
                self.population.observe(&stats)?;
            }
        }
        Ok(())
    }

    fn backward(&mut self, x: &[f32], _y: &[f32], dy: &[f32], batch: usize, dx: Option<&mut [f32]>) -> Result<()> {
        let (shape, layout) = self.shape(batch);
        let x = View::new(x, &shape, layout);
        let saved = self
            .saved
            .as_ref()
            .context("batch norm backward before a training forward")?;
        match &self.sync {
            Some(comm) => {
                // This rank's share of dγ, dβ: the data-parallel loop sums the shares over ranks.
                let dx_only = Grads { dx, ..Grads::default() };
                let local = self.bn.backward_sync(comm.as_ref(), x, dy, saved, dx_only)?;
                local.write_param_grads(Some(&mut self.grad_gamma[..]), Some(&mut self.grad_beta[..]))?;
            }
            None => {
                let grads = Grads {
                    dx,
                    ..Grads::params(&mut self.grad_gamma, &mut self.grad_beta)
                };
                self.bn.backward(x, dy, saved, grads)?
            }
        }
        Ok(())
    }

    fn params(&mut self) -> Vec<Param<'_>> {
        if !self.bn.config.affine {
            return Vec::new();
        }
        vec![
            Param {
                name: "gamma",
                value: &mut self.bn.gamma,
                grad: &self.grad_gamma,
                decay: false,
            },
            Param {
                name: "beta",
                value: &mut self.bn.beta,
                grad: &self.grad_beta,
                decay: false,
            },
        ]
    }

    fn as_batchnorm(&mut self) -> Option<&mut BatchNormLayer> {
        Some(self)
    }

    /// Running mean and variance, batches tracked, and Algorithm 2's accumulators.
    fn state(&self) -> Vec<State> {
        let (batches, mean, var) = self.population.parts();
        let state = |name, value| State { name, value };
        vec![
            state("running_mean", StateValue::F32(self.bn.running_mean.clone())),
            state("running_var", StateValue::F32(self.bn.running_var.clone())),
            state(
                "num_batches_tracked",
                StateValue::U64(vec![self.bn.num_batches_tracked]),
            ),
            state("population_batches", StateValue::U64(vec![batches])),
            state("population_mean", StateValue::F64(mean.to_vec())),
            state("population_var", StateValue::F64(var.to_vec())),
        ]
    }

    fn set_state(&mut self, name: &str, value: StateValue) -> Result<()> {
        let channels = self.bn.num_features;
        let (batches, mean, var) = self.population.parts();
        let (mut batches, mut mean, mut var) = (batches, mean.to_vec(), var.to_vec());
        match (name, value) {
            ("running_mean", StateValue::F32(v)) if v.len() == channels => self.bn.running_mean = v,
            ("running_var", StateValue::F32(v)) if v.len() == channels => self.bn.running_var = v,
            ("num_batches_tracked", StateValue::U64(v)) if v.len() == 1 => self.bn.num_batches_tracked = v[0],
            ("population_batches", StateValue::U64(v)) if v.len() == 1 => batches = v[0],
            ("population_mean", StateValue::F64(v)) if v.len() == channels => mean = v,
            ("population_var", StateValue::F64(v)) if v.len() == channels => var = v,
            (name, v) => bail!(
                "batch norm has no state `{name}` of {} {} values",
                v.len(),
                v.dtype_name()
            ),
        }
        self.population = PopulationStats::from_parts(batches, mean, var)?;
        Ok(())
    }
}
