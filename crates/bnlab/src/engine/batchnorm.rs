//! Batch norm in the engine: the `batchnorm` crate's layers behind the [`Layer`] interface.
//!
//! Convolutional BN (the paper's Section 3.2: one γ, β and one mean/variance per feature map,
//! over N·H·W values) uses the NCHW layout, i.e. examples `[channels, spatial]`. Why NCHW rather
//! than NHWC: [`super::Conv2d`]'s im2col + GEMM writes each example as `W·col = [out_c, oh·ow]`,
//! which *is* NCHW, and pooling and LRN index NCHW too, so NHWC would cost a transpose of every
//! conv output and gradient; and on this engine's feature-map shapes (8 channels of 28×28, 16 of
//! 14×14) the kernels are not faster in NHWC anyway: NHWC pays off only from wide planes with more
//! channels (the figures are in docs/tuning-log.md).
//!
//! # Variants
//!
//! A [`BatchNormLayer`] computes one [`BnVariant`] (docs/variants.md has the definitions):
//!
//! - [`BnVariant::Plain`]: batch norm as the paper defines it, with the config's small-batch
//!   policy ([`BatchNormConfig::small_batch`]): the kernel crate's [`BatchNorm`];
//! - [`BnVariant::Frozen`]: the same layer, plain for a number of training steps and then in the
//!   kernel layer's frozen state ([`BatchNorm::freeze`]), which [`BatchNormLayer::set_frozen`]
//!   also switches;
//! - [`BnVariant::Renorm`]: batch renormalization, the kernel crate's [`BatchRenorm`], whose step
//!   counter drives its [`RenormSchedule`].
//!
//! The layer keeps the variant's own state beside the kernel layer `bn` (a private enum with one
//! case per variant). Ghost batch norm (virtual batches) is a setting of the kernel's
//! [`BatchNormConfig`].
//!
//! # Masked batch norm
//!
//! A plain or frozen layer can be made masked ([`BatchNormLayer::masked`]), for padded
//! sequences: each forward pass takes the position mask of its batch ([`Layer::set_mask`],
//! `[batch, spatial]`, shared by the channels; see [`super::mask`]) and keeps it for its backward,
//! and every pass is the kernel crate's masked form of the unmasked one: statistics over the
//! valid positions only, padded positions written as +0.0 and given dx = +0.0, running variance
//! unbiased with the valid count, synchronized over ranks weighted by their valid counts
//! ([`BatchNorm::forward_train_masked_sync`]); Algorithm 2 averages the masked batch means and
//! unbiased masked variances. No padded value reaches an output or a gradient. A masked layer
//! refuses a forward without a mask; batch renorm and ghost batch norm have no masked form in the
//! kernel crate and are refused.
//!
//! # Fused ReLU
//!
//! A layer made with [`BatchNormLayer::with_relu`] computes relu(bn(x)) (the ReLU as
//! [`super::Relu`] defines it), the pair of layers batch norm → ReLU in one: in the kernel
//! crate's fused passes ([`BatchNorm::forward_train_relu`], [`BatchNorm::backward_relu`],
//! [`BatchNorm::forward_eval_relu`], [`batch_norm_eval_relu`]; the ReLU applied in the pass that
//! writes y, and the backward reading a 1-bit [`ReluMask`] instead of a stored pre-activation)
//! where the kernel crate has them: plain and frozen batch norm, unmasked, unsynchronized and
//! without a virtual batch, in `Mode::Train` and `Mode::Eval`. Elsewhere (renorm, ghost and
//! masked batch norm, synchronized training, `Mode::Collect`) it runs batch norm and then the
//! ReLU over its output, and its backward recomputes from the output which values the ReLU
//! kept. Both give the bits of the two layers in sequence, and the checkpoint of the unfused
//! pair ([`Layer::fused_layers`]).
//!
//! # What each mode does per variant
//!
//! | | `Mode::Train` | `Mode::Collect` (Algorithm 2) | `Mode::Eval` |
//! |---|---|---|---|
//! | plain | batch statistics, running update | batch statistics, observed | running statistics (replaced by [`BatchNormLayer::use_population`]) |
//! | frozen, while not frozen | as plain | as plain | running statistics, or the population estimate after `use_population` |
//! | frozen | running statistics, no update | running statistics, nothing observed | running statistics |
//! | renorm | Algorithm 1 of Ioffe 2017, moving update, step + 1 | the training transform at the current step, the plain batch statistics observed, nothing updated | moving μ, σ, or the population estimate after `use_population` |
//!
//! Why the population estimate replaces the running statistics only for plain batch norm: a
//! frozen layer trains with its running statistics (frozen now, or from its freezing step on) and
//! a renorm layer computes r and d from its moving statistics, so in both they are training
//! state, and an evaluation must not change how training continues (nor make ranks differ, as
//! the run driver evaluates on rank 0 only). A frozen layer keeps its statistics for inference
//! too: the network was trained with them, and Algorithm 2 estimates the statistics the training
//! network uses.

use super::activation::{relu_backward_from_output, relu_in_place};
use super::mask::{Masks, PositionMask};
use super::{Layer, Mode, Param, Relu, State, StateValue};
use ::batchnorm::{
    batch_norm_eval, batch_norm_eval_masked, batch_norm_eval_relu, batch_norm_train, batch_norm_train_masked,
    batch_renorm_eval, batch_renorm_train, Affine, BatchNorm, BatchNormConfig, BatchRenorm, BatchRenormConfig,
    BatchStats, Communicator, FixedStats, Grads, InferenceAffine, Layout, PopulationStats, ReluMask, RenormSaved,
    RenormSchedule, RenormStats, SavedStats, SmallBatch, View,
};
use anyhow::{bail, ensure, Context, Result};
use std::sync::Arc;

/// Which batch norm a [`BatchNormLayer`] computes, with the settings the variant adds to the
/// layer's [`BatchNormConfig`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BnVariant {
    /// Batch norm as the paper defines it (with the config's small-batch policy).
    Plain,
    /// Frozen batch norm: plain for the first `after` training steps (Train-mode forwards), then
    /// frozen from the step with index `after` on (0: from the first step): statistics fixed to
    /// the running ones, γ and β still trained.
    Frozen {
        /// Training steps taken before the layer freezes.
        after: u64,
    },
    /// Batch renormalization (Ioffe 2017, Algorithm 1).
    Renorm {
        /// α, the weight of the batch in the moving averages, in (0, 1] (the config's `momentum`
        /// is for running statistics and does not apply).
        momentum: f64,
        /// r_max and d_max by training step.
        limits: RenormSchedule,
    },
}

impl BnVariant {
    /// The variant's short name: `bn`, `frozen` or `renorm` (as `bnlab bench` names its rows).
    pub fn name(&self) -> &'static str {
        match self {
            BnVariant::Plain => "bn",
            BnVariant::Frozen { .. } => "frozen",
            BnVariant::Renorm { .. } => "renorm",
        }
    }
}

/// What a layer computes beyond `bn`, with the state that goes with it: one case per variant.
enum Kind {
    /// Plain batch norm: `bn` is all there is.
    Plain,
    /// Frozen batch norm: `bn`'s frozen state is switched on before the training step `after`.
    Frozen {
        /// The step the layer freezes at.
        after: u64,
        /// Training steps taken.
        steps: u64,
    },
    /// Batch renormalization: the renorm layer holds γ, β, the moving statistics and the step
    /// counter; `bn` holds only ε and the channel count.
    Renorm(BatchRenorm<f32>),
}

/// What the backward needs from the training forward, per kernel layer.
enum Saved {
    /// The batch-norm kernel's saved statistics.
    Bn(SavedStats),
    /// Batch renorm's saved statistics, r and d.
    Renorm(RenormSaved),
}

/// The ReLU of a layer made with [`BatchNormLayer::with_relu`], with what its backward needs.
#[derive(Default)]
struct FusedRelu {
    /// Which outputs the last training forward's ReLU kept, when it ran fused.
    mask: ReluMask,
    /// Whether the last training forward ran fused (the backward then reads `mask`); otherwise
    /// it ran batch norm and then the ReLU, and the backward finds the kept outputs from y.
    fused: bool,
    /// dy through the ReLU, for the backward of the unfused sequence (reused across steps).
    dy: Vec<f32>,
}

/// Algorithm 2's estimate in the form the layer's inference pass takes: mean and variance for the
/// batch-norm kernel, mean and σ = √(Var + ε) for batch renorm.
struct Population {
    mean: Vec<f32>,
    spread: Vec<f32>,
}

/// Batch norm over `channels` features; each example is `[channels]` (fully connected) or
/// `[channels, spatial]` (feature maps, NCHW: statistics per channel over N·H·W). It computes one
/// [`BnVariant`] (see the module docs for what each [`Mode`] does per variant).
///
/// With a communicator set ([`BatchNormLayer::synchronize`]) training forward and backward are
/// synchronized batch norm over all ranks' shards of the global batch, and the parameter
/// gradients are this rank's share (summed over ranks by the data-parallel loop); for renorm, r
/// and d come from the global batch's statistics too.
///
/// A layer made masked ([`BatchNormLayer::masked`]) computes masked batch norm over the positions
/// its batch's mask selects (see the module docs).
pub struct BatchNormLayer {
    /// The kernel crate's batch-norm layer: γ, β, running statistics, settings and frozen state,
    /// for every variant but renorm. For [`BnVariant::Renorm`] it holds only ε and the channel
    /// count (no γ, β or running statistics, which the renorm layer has:
    /// [`BatchNormLayer::renorm`]). Freezing it directly is not saved in checkpoints unless the
    /// layer is [`BnVariant::Frozen`] (use [`BatchNormLayer::set_frozen`]).
    pub bn: BatchNorm<f32>,
    /// Spatial size per channel (1 for fully connected).
    pub spatial: usize,
    kind: Kind,
    saved: Option<Saved>,
    population: PopulationStats,
    /// Set by [`BatchNormLayer::use_population`] where it does not replace the layer's own
    /// statistics; used by `Mode::Eval` until [`BatchNormLayer::reset_population`].
    estimate: Option<Population>,
    grad_gamma: Vec<f32>,
    grad_beta: Vec<f32>,
    sync: Option<Arc<dyn Communicator>>,
    /// The position masks of a masked layer (`None`: not masked).
    masks: Option<Masks>,
    /// The ReLU after batch norm of a layer made with [`BatchNormLayer::with_relu`].
    relu: Option<FusedRelu>,
}

/// γ and β as the kernel functions take them: none without affine.
fn affine_of<'a>(affine: bool, gamma: &'a [f32], beta: &'a [f32]) -> Affine<'a, f32> {
    if affine {
        Affine::new(gamma, beta)
    } else {
        Affine::NONE
    }
}

/// The batch-norm kernel's training forward, synchronized over `comm` when given, masked when
/// `mask` is given; fused with a ReLU that records its kept outputs in `relu` when given (which
/// callers do only where [`BatchNormLayer::fuses`], i.e. without `comm` and `mask`). Writes the
/// statistics for the backward into `saved` (the plain pass refills it in place, so that a ghost
/// layer's groups × channels values keep their memory from step to step); on error `saved` is
/// unchanged.
fn train_bn(
    bn: &mut BatchNorm<f32>,
    comm: Option<&dyn Communicator>,
    x: View<'_, f32>,
    mask: Option<&[bool]>,
    relu: Option<&mut ReluMask>,
    y: &mut [f32],
    saved: &mut SavedStats,
) -> Result<(), ::batchnorm::Error> {
    *saved = match (comm, mask) {
        (Some(comm), Some(mask)) => bn.forward_train_masked_sync(comm, x, mask, y)?,
        (Some(comm), None) => bn.forward_train_sync(comm, x, y)?,
        (None, Some(mask)) => bn.forward_train_masked(x, mask, y)?,
        (None, None) => match relu {
            Some(relu) => bn.forward_train_relu(x, y, relu)?,
            None => return bn.forward_train_into(x, y, saved),
        },
    };
    Ok(())
}

/// The batch-norm kernel's inference with its running statistics, masked when `mask` is given,
/// fused with a ReLU when `relu` (only without `mask`, as for [`train_bn`]).
fn eval_bn(bn: &BatchNorm<f32>, x: View<'_, f32>, mask: Option<&[bool]>, relu: bool, y: &mut [f32]) -> Result<()> {
    match (mask, relu) {
        (Some(mask), _) => bn.forward_eval_masked(x, mask, y)?,
        (None, true) => bn.forward_eval_relu(x, y, None)?,
        (None, false) => bn.forward_eval(x, y)?,
    }
    Ok(())
}

impl BatchNormLayer {
    /// A fresh plain layer (γ = 1, β = 0, running mean 0 and variance 1). Rejects what
    /// [`BatchNorm::new`] rejects.
    pub fn new(channels: usize, spatial: usize, config: BatchNormConfig) -> Result<Self> {
        Self::with_variant(channels, spatial, config, BnVariant::Plain)
    }

    /// A fresh layer of `variant`: γ = 1, β = 0, and running mean 0 and variance 1 (renorm:
    /// moving mean 0 and σ 1, step 0).
    ///
    /// Rejects what [`BatchNorm::new`] rejects (ε not finite and > 0, a momentum outside (0, 1]);
    /// a frozen layer without running statistics (`track_running_stats = false`); for renorm, a
    /// momentum α outside (0, 1], `track_running_stats = false` (its moving statistics always
    /// exist) and the small-batch policy [`SmallBatch::UseRunningStats`] (renorm has none).
    pub fn with_variant(channels: usize, spatial: usize, config: BatchNormConfig, variant: BnVariant) -> Result<Self> {
        let kind = match variant {
            BnVariant::Plain => Kind::Plain,
            BnVariant::Frozen { after } => {
                ensure!(
                    config.track_running_stats,
                    "frozen batch norm needs running statistics (track_running_stats = false)"
                );
                Kind::Frozen { after, steps: 0 }
            }
            BnVariant::Renorm { momentum, limits } => {
                ensure!(
                    config.track_running_stats,
                    "batch renorm always keeps moving statistics: track_running_stats = false does not apply"
                );
                ensure!(
                    config.small_batch == SmallBatch::Error,
                    "batch renorm has no small-batch policy: it needs 2 or more values per channel"
                );
                let renorm_config = BatchRenormConfig {
                    eps: config.eps,
                    momentum,
                    limits,
                    affine: config.affine,
                };
                Kind::Renorm(BatchRenorm::new(channels, renorm_config).context("batch renorm")?)
            }
        };
        let bn = match kind {
            // ε and the channel count only.
            Kind::Renorm(_) => BatchNorm::new(
                channels,
                BatchNormConfig {
                    affine: false,
                    track_running_stats: false,
                    ..config
                },
            )?,
            _ => BatchNorm::new(channels, config)?,
        };
        Ok(BatchNormLayer {
            bn,
            spatial,
            kind,
            saved: None,
            population: PopulationStats::new(channels),
            estimate: None,
            grad_gamma: vec![0.0; channels],
            grad_beta: vec![0.0; channels],
            sync: None,
            masks: None,
            relu: None,
        })
    }

    /// This layer followed by a ReLU: relu(bn(x)), with the ReLU as [`super::Relu`] defines it,
    /// fused into batch norm's passes where the kernel crate has a fused form and otherwise
    /// applied after them (see the module docs), the bits of the two layers in sequence either
    /// way. A checkpoint lists the ReLU as the layer after this one ([`Layer::fused_layers`]),
    /// as for the unfused pair. Rejects nothing: every variant has at least the unfused form.
    pub fn with_relu(mut self) -> Self {
        self.relu = Some(FusedRelu::default());
        self
    }

    /// Whether the layer applies a ReLU to its output ([`BatchNormLayer::with_relu`]).
    pub fn has_relu(&self) -> bool {
        self.relu.is_some()
    }

    /// Whether a forward pass in `mode` (masked over `mask` when given) runs fused with the
    /// layer's ReLU: the kernel crate's fused forms are of [`BatchNorm`] (plain and frozen),
    /// unmasked, unsynchronized and without a virtual batch ([`::batchnorm::Error::GhostNotFused`]),
    /// for training and inference.
    fn fuses(&self, mode: Mode, mask: Option<&[bool]>) -> bool {
        self.relu.is_some()
            && mode != Mode::Collect
            && !matches!(self.kind, Kind::Renorm(_))
            && self.sync.is_none()
            && mask.is_none()
            && self.bn.config.virtual_batch.is_none()
    }

    /// This layer as masked batch norm (see the module docs): its forward passes take the
    /// position mask of their batch (`[batch, spatial]`, [`Layer::set_mask`]) and refuse to run
    /// without one. Saved in checkpoints' architecture (`masked` in [`Layer::settings`]), so that
    /// a checkpoint of an unmasked layer is refused and the other way round.
    ///
    /// Rejects a [`BnVariant::Renorm`] layer and a config with a virtual batch size (ghost batch
    /// norm), for which the kernel crate has no masked form, and a layer of 0 positions
    /// (`spatial`).
    pub fn masked(mut self) -> Result<Self> {
        ensure!(
            !matches!(self.kind, Kind::Renorm(_)),
            "batch renorm has no masked form: masked batch norm is plain or frozen"
        );
        ensure!(
            self.bn.config.virtual_batch.is_none(),
            "ghost batch norm (a virtual batch size) has no masked form"
        );
        self.masks = Some(Masks::new(self.bn.num_features, self.spatial, "masked batch norm")?);
        Ok(self)
    }

    /// Whether the layer is masked batch norm ([`BatchNormLayer::masked`]).
    pub fn is_masked(&self) -> bool {
        self.masks.is_some()
    }

    /// The variant this layer computes.
    pub fn variant(&self) -> BnVariant {
        match &self.kind {
            Kind::Plain => BnVariant::Plain,
            Kind::Frozen { after, .. } => BnVariant::Frozen { after: *after },
            Kind::Renorm(r) => BnVariant::Renorm {
                momentum: r.config.momentum,
                limits: r.config.limits,
            },
        }
    }

    /// The kernel crate's renorm layer (γ, β, moving mean and σ, step counter) of a
    /// [`BnVariant::Renorm`] layer; `None` for the other variants.
    pub fn renorm(&self) -> Option<&BatchRenorm<f32>> {
        match &self.kind {
            Kind::Renorm(r) => Some(r),
            _ => None,
        }
    }

    /// [`BatchNormLayer::renorm`], mutable (to set γ, β or the moving statistics).
    pub fn renorm_mut(&mut self) -> Option<&mut BatchRenorm<f32>> {
        match &mut self.kind {
            Kind::Renorm(r) => Some(r),
            _ => None,
        }
    }

    /// Training steps (Train-mode forwards) this layer has taken, for the variants that count
    /// them (frozen: to know when to freeze; renorm: its schedule's step); `None` for plain.
    pub fn train_steps(&self) -> Option<u64> {
        match &self.kind {
            Kind::Plain => None,
            Kind::Frozen { steps, .. } => Some(*steps),
            Kind::Renorm(r) => Some(r.steps),
        }
    }

    /// Whether the layer's training passes normalize with its running statistics now (frozen).
    pub fn is_frozen(&self) -> bool {
        !matches!(self.kind, Kind::Renorm(_)) && self.bn.is_frozen()
    }

    /// Freezes (`true`) or unfreezes a [`BnVariant::Frozen`] layer now; the state is saved in
    /// checkpoints. The layer still freezes itself before its training step `after` (unfreezing
    /// it after that step lasts). Rejects the other variants, whose checkpoints have no frozen
    /// state.
    pub fn set_frozen(&mut self, frozen: bool) -> Result<()> {
        match self.kind {
            Kind::Frozen { .. } => {
                self.bn.set_frozen(frozen);
                Ok(())
            }
            _ => bail!(
                "only a frozen-variant batch-norm layer can be frozen or unfrozen (this one is `{}`)",
                self.variant().name()
            ),
        }
    }

    fn shape(&self, batch: usize) -> ([usize; 3], Layout) {
        ([batch, self.bn.num_features, self.spatial], Layout::ChannelsFirst)
    }

    /// Synchronizes training statistics and backward reductions over `comm` (`None`: this
    /// process's batch alone). A renorm layer then refuses to train (see [`BatchNormLayer`]).
    pub fn synchronize(&mut self, comm: Option<Arc<dyn Communicator>>) {
        self.sync = comm;
    }

    /// Forgets the population estimate (before collecting a new one); inference uses the layer's
    /// own statistics again until [`BatchNormLayer::use_population`].
    pub fn reset_population(&mut self) {
        self.population = PopulationStats::new(self.bn.num_features);
        self.estimate = None;
    }

    /// Uses the population estimate collected in [`Mode::Collect`] for inference: a plain layer's
    /// running statistics are replaced by it; a frozen-variant layer that is not frozen yet and a
    /// renorm layer (mean E\[x\] and σ = √(Var\[x\] + ε)) infer with it while their own
    /// statistics, which training uses, are left alone; a frozen layer keeps its statistics (it
    /// collected nothing). Rejects an estimate without batches.
    pub fn use_population(&mut self) -> Result<()> {
        if self.is_frozen() {
            return Ok(());
        }
        let estimate = match &self.kind {
            Kind::Plain => {
                self.bn
                    .set_population_stats(&self.population)
                    .context("population statistics")?;
                return Ok(());
            }
            Kind::Frozen { .. } => {
                let (mean, var) = self.population.finish::<f32>().context("population statistics")?;
                Population { mean, spread: var }
            }
            Kind::Renorm(r) => {
                let eps = r.config.eps;
                let (mean, var) = self.population.finish::<f64>().context("population statistics")?;
                Population {
                    mean: mean.into_iter().map(|m| m as f32).collect(),
                    spread: var.into_iter().map(|v| (v + eps).sqrt() as f32).collect(),
                }
            }
        };
        self.estimate = Some(estimate);
        Ok(())
    }

    /// The inference transform as one affine map per channel, y = x·scale + shift (for folding
    /// into the layer before): with the statistics `Mode::Eval` uses now. For renorm,
    /// scale = γ/σ and shift = β − μ·γ/σ. Rejects a plain or frozen layer without running
    /// statistics, and a masked layer (it writes 0 at padded positions, which no affine map of
    /// its input does).
    pub fn inference_affine(&self) -> Result<InferenceAffine> {
        ensure!(
            !self.is_masked(),
            "masked batch norm writes 0 at the padded positions, which no affine map does: it cannot be folded"
        );
        let eps = self.bn.config.eps;
        Ok(match (&self.kind, &self.estimate) {
            (Kind::Renorm(r), estimate) => {
                let (mean, std) = match estimate {
                    Some(p) => (&p.mean, &p.spread),
                    None => (&r.moving_mean, &r.moving_std),
                };
                let at = |v: &[f32], c: usize, none: f64| v.get(c).map_or(none, |&v| v as f64);
                let scale: Vec<f64> = (0..r.num_features)
                    .map(|c| at(&r.gamma, c, 1.0) / std[c] as f64)
                    .collect();
                let shift = (0..r.num_features)
                    .map(|c| at(&r.beta, c, 0.0) - mean[c] as f64 * scale[c])
                    .collect();
                InferenceAffine { scale, shift }
            }
            (_, Some(p)) => {
                let bn = &self.bn;
                let stats = FixedStats::new(&p.mean, &p.spread);
                InferenceAffine::new(stats, affine_of(bn.config.affine, &bn.gamma, &bn.beta), eps)?
            }
            (_, None) => self.bn.inference_affine()?,
        })
    }

    /// Training forward of the layer's variant (masked over `mask` when given; never for renorm),
    /// fused with the ReLU when `fused` ([`BatchNormLayer::fuses`]); what the backward needs goes
    /// to `self.saved` (the batch-norm kernel's statistics refilled in place, see [`train_bn`]).
    /// On error `self.saved` is unchanged.
    fn forward_train(&mut self, x: View<'_, f32>, mask: Option<&[bool]>, fused: bool, y: &mut [f32]) -> Result<()> {
        let comm = self.sync.as_deref();
        let relu = (self.relu.as_mut()).filter(|_| fused).map(|r| &mut r.mask);
        let mut fresh = None;
        let saved = match &mut self.saved {
            Some(Saved::Bn(saved)) => saved,
            _ => fresh.insert(SavedStats {
                count: 0,
                mean: Vec::new(),
                inv_std: Vec::new(),
            }),
        };
        match &mut self.kind {
            Kind::Plain => train_bn(&mut self.bn, comm, x, mask, relu, y, saved)?,
            Kind::Frozen { after, steps } => {
                let was_frozen = self.bn.is_frozen();
                if *steps == *after {
                    self.bn.freeze();
                }
                match train_bn(&mut self.bn, comm, x, mask, relu, y, saved) {
                    Ok(()) => *steps = steps.saturating_add(1),
                    Err(e) => {
                        self.bn.set_frozen(was_frozen);
                        return Err(e.into());
                    }
                }
            }
            Kind::Renorm(r) => {
                let saved = match comm {
                    Some(comm) => r.forward_train_sync(comm, x, y)?,
                    None => r.forward_train(x, y)?,
                };
                self.saved = Some(Saved::Renorm(saved));
                return Ok(());
            }
        }
        if let Some(saved) = fresh {
            self.saved = Some(Saved::Bn(saved));
        }
        Ok(())
    }

    /// Algorithm 2's pass: the training transform without any update, observing the batch
    /// statistics it normalizes with (none when it uses the running statistics); masked over
    /// `mask` when given: the statistics of the valid positions, with their count.
    fn forward_collect(&mut self, x: View<'_, f32>, mask: Option<&[bool]>, y: &mut [f32]) -> Result<()> {
        let stats: BatchStats = match &self.kind {
            Kind::Renorm(r) => {
                let moving = RenormStats::new(&r.moving_mean, &r.moving_std);
                let affine = affine_of(r.config.affine, &r.gamma, &r.beta);
                batch_renorm_train(x, moving, affine, r.config.eps, r.clip(), y)?.0
            }
            _ if self.trains_with_running_stats(x, mask) => return eval_bn(&self.bn, x, mask, false, y),
            _ => {
                let bn = &self.bn;
                let (affine, eps) = (affine_of(bn.config.affine, &bn.gamma, &bn.beta), bn.config.eps);
                match mask {
                    Some(mask) => batch_norm_train_masked(x, mask, affine, eps, y)?.0,
                    None => batch_norm_train(x, affine, eps, y)?.0,
                }
            }
        };
        self.population.observe(&stats)?;
        Ok(())
    }

    /// Whether the batch-norm kernel's training forward would normalize `x` (over `mask` when
    /// given) with the running statistics: the layer is frozen, or fewer than 2 values per channel
    /// enter the statistics and the small-batch policy is [`SmallBatch::UseRunningStats`]
    /// (docs/variants.md).
    fn trains_with_running_stats(&self, x: View<'_, f32>, mask: Option<&[bool]>) -> bool {
        let per_channel = match mask {
            Some(mask) => mask.iter().filter(|&&v| v).count(),
            None => x.data.len() / self.bn.num_features.max(1),
        };
        self.bn.is_frozen() || (per_channel < 2 && self.bn.config.small_batch == SmallBatch::UseRunningStats)
    }

    /// Inference forward: the layer's own statistics, or the population estimate
    /// [`BatchNormLayer::use_population`] set; masked over `mask` when given; fused with the
    /// ReLU when `fused` ([`BatchNormLayer::fuses`]).
    fn forward_eval(&self, x: View<'_, f32>, mask: Option<&[bool]>, fused: bool, y: &mut [f32]) -> Result<()> {
        match (&self.kind, &self.estimate) {
            (Kind::Renorm(r), Some(p)) => {
                let stats = RenormStats::new(&p.mean, &p.spread);
                batch_renorm_eval(x, stats, affine_of(r.config.affine, &r.gamma, &r.beta), y)?
            }
            (Kind::Renorm(r), None) => r.forward_eval(x, y)?,
            (_, Some(p)) => {
                let bn = &self.bn;
                let (stats, eps) = (FixedStats::new(&p.mean, &p.spread), bn.config.eps);
                let affine = affine_of(bn.config.affine, &bn.gamma, &bn.beta);
                match (mask, fused) {
                    (Some(mask), _) => batch_norm_eval_masked(x, mask, stats, affine, eps, y)?,
                    (None, true) => batch_norm_eval_relu(x, stats, affine, eps, y, None)?,
                    (None, false) => batch_norm_eval(x, stats, affine, eps, y)?,
                }
            }
            (_, None) => eval_bn(&self.bn, x, mask, fused, y)?,
        }
        Ok(())
    }

    /// The running-statistics state of the batch-norm kernel (plain and frozen variants).
    fn running_state(&self) -> [State; 3] {
        [
            state("running_mean", StateValue::F32(self.bn.running_mean.clone())),
            state("running_var", StateValue::F32(self.bn.running_var.clone())),
            state(
                "num_batches_tracked",
                StateValue::U64(vec![self.bn.num_batches_tracked]),
            ),
        ]
    }

    /// Algorithm 2's accumulators.
    fn population_state(&self) -> [State; 3] {
        let (batches, mean, var) = self.population.parts();
        [
            state("population_batches", StateValue::U64(vec![batches])),
            state("population_mean", StateValue::F64(mean.to_vec())),
            state("population_var", StateValue::F64(var.to_vec())),
        ]
    }
}

/// A named state tensor.
fn state(name: &'static str, value: StateValue) -> State {
    State { name, value }
}

impl Layer for BatchNormLayer {
    /// `batchnorm{C}`, or `batchrenorm{C}` for renorm (the checkpoint's tensor names start so).
    fn name(&self) -> String {
        match self.kind {
            Kind::Renorm(_) => format!("batchrenorm{}", self.bn.num_features),
            _ => format!("batchnorm{}", self.bn.num_features),
        }
    }
    fn input_size(&self) -> usize {
        self.bn.num_features * self.spatial
    }
    fn output_size(&self) -> usize {
        self.input_size()
    }

    /// Masked: rejects a pass without a mask, or with one of another batch or length.
    fn forward(&mut self, x: &[f32], batch: usize, y: &mut [f32], mode: Mode) -> Result<()> {
        let mask: Option<PositionMask> = match self.masks.is_some() {
            true => {
                let name = self.name();
                self.masks.as_mut().map(|m| m.for_forward(batch, &name)).transpose()?
            }
            false => None,
        };
        let mask = mask.as_ref().map(PositionMask::valid);
        let (shape, layout) = self.shape(batch);
        let x = View::new(x, &shape, layout);
        let fused = self.fuses(mode, mask);
        match mode {
            Mode::Train => self.forward_train(x, mask, fused, y)?,
            Mode::Eval => self.forward_eval(x, mask, fused, y)?,
            Mode::Collect => self.forward_collect(x, mask, y)?,
        }
        if let Some(relu) = &mut self.relu {
            if mode == Mode::Train {
                relu.fused = fused;
            }
            if !fused {
                relu_in_place(y);
            }
        }
        Ok(())
    }

    /// Masked: through the mask of the last forward pass. With a ReLU: through the ReLU of the
    /// last training forward (its mask when it ran fused, else the kept outputs of `y`).
    fn backward(&mut self, x: &[f32], y: &[f32], dy: &[f32], batch: usize, dx: Option<&mut [f32]>) -> Result<()> {
        let (shape, layout) = self.shape(batch);
        let x = View::new(x, &shape, layout);
        let saved = self
            .saved
            .as_ref()
            .context("batch norm backward before a training forward")?;
        let name = self.name();
        let mask = (self.masks.as_ref())
            .map(|m| m.for_backward(batch, &name))
            .transpose()?
            .map(PositionMask::valid);
        // dy and the ReLU mask for batch norm's backward: as given without a ReLU; with the mask
        // of a fused forward; or through the ReLU here when it ran after batch norm.
        let (dy, relu): (&[f32], Option<&ReluMask>) = match &mut self.relu {
            None => (dy, None),
            Some(r) if r.fused => (dy, Some(&r.mask)),
            Some(r) => {
                ensure!(y.len() == dy.len(), "{name}: dy and y have different lengths");
                relu_backward_from_output(y, dy, &mut r.dy);
                (&r.dy, None)
            }
        };
        match (&self.kind, saved, &self.sync) {
            (Kind::Renorm(r), Saved::Renorm(saved), Some(comm)) => {
                // This rank's share of dγ, dβ, as for plain batch norm below.
                let dx_only = Grads { dx, ..Grads::default() };
                let local = r.backward_sync(comm.as_ref(), x, dy, saved, dx_only)?;
                local.write_param_grads(Some(&mut self.grad_gamma[..]), Some(&mut self.grad_beta[..]))?;
            }
            (Kind::Renorm(r), Saved::Renorm(saved), None) => {
                let grads = Grads {
                    dx,
                    ..Grads::params(&mut self.grad_gamma, &mut self.grad_beta)
                };
                r.backward(x, dy, saved, grads)?
            }
            (Kind::Plain | Kind::Frozen { .. }, Saved::Bn(saved), Some(comm)) => {
                // This rank's share of dγ, dβ: the data-parallel loop sums the shares over ranks.
                let (bn, comm) = (&self.bn, comm.as_ref());
                let dx_only = Grads { dx, ..Grads::default() };
                let local = match mask {
                    Some(mask) => bn.backward_masked_sync(comm, x, mask, dy, saved, dx_only)?,
                    None => bn.backward_sync(comm, x, dy, saved, dx_only)?,
                };
                local.write_param_grads(Some(&mut self.grad_gamma[..]), Some(&mut self.grad_beta[..]))?;
            }
            (Kind::Plain | Kind::Frozen { .. }, Saved::Bn(saved), None) => {
                let grads = Grads {
                    dx,
                    ..Grads::params(&mut self.grad_gamma, &mut self.grad_beta)
                };
                match (mask, relu) {
                    (Some(mask), _) => self.bn.backward_masked(x, mask, dy, saved, grads)?,
                    (None, Some(relu)) => self.bn.backward_relu(x, dy, relu, saved, grads)?,
                    (None, None) => self.bn.backward(x, dy, saved, grads)?,
                }
            }
            _ => bail!("batch norm backward after a training forward of another variant"),
        }
        Ok(())
    }

    fn params(&mut self) -> Vec<Param<'_>> {
        let (affine, gamma, beta) = match &mut self.kind {
            Kind::Renorm(r) => (r.config.affine, &mut r.gamma, &mut r.beta),
            _ => (self.bn.config.affine, &mut self.bn.gamma, &mut self.bn.beta),
        };
        if !affine {
            return Vec::new();
        }
        vec![
            Param {
                name: "gamma",
                value: gamma,
                grad: &self.grad_gamma,
                decay: false,
            },
            Param {
                name: "beta",
                value: beta,
                grad: &self.grad_beta,
                decay: false,
            },
        ]
    }

    fn as_batchnorm(&mut self) -> Option<&mut BatchNormLayer> {
        Some(self)
    }

    /// `relu` for a layer made with [`BatchNormLayer::with_relu`].
    fn fused_layers(&self) -> Vec<String> {
        match self.relu {
            Some(_) => vec![Relu {
                size: self.input_size(),
            }
            .name()],
            None => Vec::new(),
        }
    }

    /// Frozen: `frozen(after=N)`; renorm: its α and schedule; plain: none; then `masked` for a
    /// masked layer (after a comma).
    fn settings(&self) -> Option<String> {
        let variant = match self.variant() {
            BnVariant::Plain => None,
            BnVariant::Frozen { after } => Some(format!("frozen(after={after})")),
            BnVariant::Renorm { momentum, limits } => Some(format!(
                "renorm(momentum={momentum:?},warmup={},r_ramp={},d_ramp={},r_max={:?},d_max={:?})",
                limits.warmup_steps(),
                limits.r_ramp_steps(),
                limits.d_ramp_steps(),
                limits.last().r_max(),
                limits.last().d_max()
            )),
        };
        match (variant, self.is_masked()) {
            (variant, false) => variant,
            (None, true) => Some("masked".into()),
            (Some(variant), true) => Some(format!("{variant},masked")),
        }
    }

    fn set_mask(&mut self, mask: &PositionMask) {
        if let Some(masks) = &mut self.masks {
            masks.give(mask);
        }
    }

    /// Plain: running mean and variance, batches tracked, and Algorithm 2's accumulators. Frozen:
    /// the same, then the frozen state (`frozen`, 0 or 1) and `train_steps`. Renorm: moving mean
    /// and σ, `train_steps` (the schedule's step), and Algorithm 2's accumulators.
    fn state(&self) -> Vec<State> {
        let mut out = Vec::new();
        match &self.kind {
            Kind::Plain => out.extend(self.running_state()),
            Kind::Frozen { steps, .. } => {
                out.extend(self.running_state());
                out.push(state("frozen", StateValue::U64(vec![self.bn.is_frozen() as u64])));
                out.push(state("train_steps", StateValue::U64(vec![*steps])));
            }
            Kind::Renorm(r) => {
                out.push(state("moving_mean", StateValue::F32(r.moving_mean.clone())));
                out.push(state("moving_std", StateValue::F32(r.moving_std.clone())));
                out.push(state("train_steps", StateValue::U64(vec![r.steps])));
            }
        }
        out.extend(self.population_state());
        out
    }

    /// Restores one tensor of [`Layer::state`]; also rejects a `frozen` other than 0 or 1.
    fn set_state(&mut self, name: &str, value: StateValue) -> Result<()> {
        let channels = self.bn.num_features;
        let (batches, mean, var) = self.population.parts();
        let (mut batches, mut mean, mut var) = (batches, mean.to_vec(), var.to_vec());
        let bn_kernel = !matches!(self.kind, Kind::Renorm(_));
        match (&mut self.kind, name, value) {
            (_, "running_mean", StateValue::F32(v)) if bn_kernel && v.len() == channels => self.bn.running_mean = v,
            (_, "running_var", StateValue::F32(v)) if bn_kernel && v.len() == channels => self.bn.running_var = v,
            (_, "num_batches_tracked", StateValue::U64(v)) if bn_kernel && v.len() == 1 => {
                self.bn.num_batches_tracked = v[0]
            }
            (Kind::Frozen { .. }, "frozen", StateValue::U64(v)) if v.len() == 1 && v[0] <= 1 => {
                self.bn.set_frozen(v[0] == 1)
            }
            (Kind::Frozen { .. }, "frozen", StateValue::U64(v)) if v.len() == 1 => {
                bail!("frozen state {} is neither 0 nor 1", v[0])
            }
            (Kind::Frozen { steps, .. }, "train_steps", StateValue::U64(v)) if v.len() == 1 => *steps = v[0],
            (Kind::Renorm(r), "moving_mean", StateValue::F32(v)) if v.len() == channels => r.moving_mean = v,
            (Kind::Renorm(r), "moving_std", StateValue::F32(v)) if v.len() == channels => r.moving_std = v,
            (Kind::Renorm(r), "train_steps", StateValue::U64(v)) if v.len() == 1 => r.steps = v[0],
            (_, "population_batches", StateValue::U64(v)) if v.len() == 1 => batches = v[0],
            (_, "population_mean", StateValue::F64(v)) if v.len() == channels => mean = v,
            (_, "population_var", StateValue::F64(v)) if v.len() == channels => var = v,
            (_, name, v) => bail!(
                "{} has no state `{name}` of {} {} values",
                self.name(),
                v.len(),
                v.dtype_name()
            ),
        }
        self.population = PopulationStats::from_parts(batches, mean, var)?;
        Ok(())
    }
}
