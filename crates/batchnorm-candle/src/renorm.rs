//! Batch renormalization (Ioffe, NeurIPS 2017) as a candle layer: [`BatchRenorm`], built with
//! [`batch_renorm`] from a `VarBuilder`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use batchnorm::{update_renorm_stats, BatchRenormConfig, RenormClip};
use candle_core::{Module, ModuleT, Result, Tensor, Var};
use candle_nn::VarBuilder;

use crate::ops::{self, wrap, ForwardMode, TrainKernel};
use crate::{
    check_input, check_training_count, composed, fused, get_vars, in_compute_dtype, set_var, stat_vars, to_f64_vec,
    ComputePath,
};

/// Batch renormalization over channel dimension 1 of an input of rank ≥ 2 (Ioffe, NeurIPS 2017,
/// Algorithm 1; the kernel crate's `batch_renorm_*` functions on the CPU, composed candle ops
/// elsewhere, see [`ComputePath`]).
///
/// Per channel, with moving mean μ and moving standard deviation σ (variables `moving_mean`,
/// initialised to 0, and `moving_std`, to 1), training computes σ_B = √(σ²_B + ε) (biased batch
/// variance), r = clip(σ_B/σ, 1/r_max, r_max) and d = clip((μ_B − μ)/σ, −d_max, d_max), both
/// constants for the backward, y = γ·((x − μ_B)/σ_B·r + d) + β, then μ ← μ + α(μ_B − μ) and
/// σ ← σ + α(σ_B − σ); inference computes y = γ·(x − μ)/σ + β. The limits (r_max, d_max) follow
/// the configuration's [`crate::RenormSchedule`] by the layer's step counter
/// ([`BatchRenorm::steps`]), which each training forward advances by one. With r_max = 1 and
/// d_max = 0 training is plain batch norm.
///
/// Clones share the variables and the step counter.
///
/// ```
/// use batchnorm_candle::{batch_renorm, BatchRenormConfig, RenormSchedule};
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let config = BatchRenormConfig {
///     limits: RenormSchedule::new(100, 1000, 500, 3.0, 5.0)?, // (1, 0) for 100 steps, then ramps
///     ..Default::default()
/// };
/// let bn = batch_renorm(8, config, vb)?;
/// let x = Tensor::randn(0f32, 1., (16, 8, 4, 4), &Device::Cpu)?;
/// let y = bn.forward_t(&x, true)?;
/// y.sqr()?.sum_all()?.backward()?;
/// assert_eq!(bn.steps(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct BatchRenorm {
    num_features: usize,
    moving_mean: Var,
    moving_std: Var,
    weight_and_bias: Option<(Tensor, Tensor)>,
    config: BatchRenormConfig,
    steps: Arc<AtomicU64>,
    compute: ComputePath,
}

/// Builds a [`BatchRenorm`] over `num_features` channels from a `VarBuilder`: `moving_mean`
/// (initialized to 0), `moving_std` (1) and, when `config.affine`, `weight` (γ, 1) and `bias`
/// (β, 0), all of shape `[num_features]`. The step counter starts at 0.
///
/// Rejects ε not finite and > 0 and a momentum α outside (0, 1] (the kernel crate's
/// [`batchnorm::Error::InvalidEps`], [`batchnorm::Error::InvalidMomentum`]), and variables of the
/// wrong shape.
pub fn batch_renorm(num_features: usize, config: BatchRenormConfig, vb: VarBuilder) -> Result<BatchRenorm> {
    check_renorm_config(&config)?;
    let stats = [("moving_mean", 0.0), ("moving_std", 1.0)];
    let ([moving_mean, moving_std], weight_and_bias) = get_vars(&vb, num_features, stats, config.affine)?;
    BatchRenorm::new(num_features, moving_mean, moving_std, weight_and_bias, config)
}

/// The checks the kernel crate's layer makes on a configuration: ε and α.
fn check_renorm_config(config: &BatchRenormConfig) -> Result<()> {
    batchnorm::BatchRenorm::<f32>::new(0, *config).map_err(wrap)?;
    Ok(())
}

impl BatchRenorm {
    /// From existing tensors; `weight_and_bias` must be `Some` exactly when `config.affine`. A
    /// moving statistic that is already a candle variable (e.g. from a `VarMap`) is shared, not
    /// copied. Rejects what [`batch_renorm`] rejects.
    pub fn new(
        num_features: usize,
        moving_mean: Tensor,
        moving_std: Tensor,
        weight_and_bias: Option<(Tensor, Tensor)>,
        config: BatchRenormConfig,
    ) -> Result<Self> {
        check_renorm_config(&config)?;
        let stats = [("moving mean", &moving_mean), ("moving std", &moving_std)];
        let (moving_mean, moving_std) = stat_vars(num_features, stats, &weight_and_bias, config.affine)?;
        Ok(BatchRenorm {
            num_features,
            moving_mean,
            moving_std,
            weight_and_bias,
            config,
            steps: Arc::new(AtomicU64::new(0)),
            compute: ComputePath::Auto,
        })
    }

    /// This layer computing by `path` (see [`ComputePath`]).
    pub fn with_compute(self, path: ComputePath) -> Self {
        BatchRenorm { compute: path, ..self }
    }

    /// How the layer computes.
    pub fn compute(&self) -> ComputePath {
        self.compute
    }

    /// Number of channels.
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// The configuration (the kernel crate's type).
    pub fn config(&self) -> &BatchRenormConfig {
        &self.config
    }

    /// Moving mean μ, shape `[num_features]`.
    pub fn moving_mean(&self) -> &Tensor {
        self.moving_mean.as_tensor()
    }

    /// Moving standard deviation σ (ε included), shape `[num_features]`.
    pub fn moving_std(&self) -> &Tensor {
        self.moving_std.as_tensor()
    }

    /// γ and β, when the layer is affine.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.weight_and_bias.as_ref().map(|(w, b)| (w, b))
    }

    /// Training steps taken: the step of the next training forward in the schedule. Not a
    /// variable: save it with a checkpoint yourself.
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    /// Sets the step counter (to restore it from a checkpoint).
    pub fn set_steps(&self, steps: u64) {
        self.steps.store(steps, Ordering::Relaxed);
    }

    /// The limits the next training forward uses.
    pub fn clip(&self) -> RenormClip {
        self.config.limits.at(self.steps())
    }

    /// This layer as a [`Module`] that always runs in inference mode.
    pub fn eval_mode(&self) -> RenormEvalMode<'_> {
        RenormEvalMode(self)
    }

    /// Training forward with the limits of step [`BatchRenorm::steps`], then the moving update
    /// and the step counter advanced by one. Differentiable in x, γ and β (r and d constants).
    ///
    /// Rejects: rank < 2, a channel count that differs from `num_features`, a dtype other than
    /// f16/bf16/f32/f64, a zero dimension ([`batchnorm::Error::EmptyInput`]), fewer than 2
    /// values per channel ([`batchnorm::Error::TooFewValues`]), a step counter at `u64::MAX`
    /// ([`batchnorm::Error::InvalidRenormSchedule`]). On error nothing is changed.
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let count = check_input(x, self.num_features)?;
        check_training_count(count, x)?;
        let step = self.steps();
        let next = step.checked_add(1).ok_or_else(|| {
            wrap(batchnorm::Error::InvalidRenormSchedule {
                reason: "the step counter is at u64::MAX".into(),
            })
        })?;
        let clip = self.config.limits.at(step);
        let (eps, alpha) = (self.config.eps, self.config.momentum);
        let mut mean = to_f64_vec(self.moving_mean())?;
        let mut std = to_f64_vec(self.moving_std())?;
        let mut batch = Vec::new();
        let y = in_compute_dtype(x, fused(self.compute, x), |xc| {
            let y;
            (y, batch) = if fused(self.compute, xc) {
                let (mean, std) = (mean.clone(), std.clone());
                ops::train(xc, eps, TrainKernel::Renorm { mean, std, clip }, self.weight_and_bias())?
            } else {
                let (moving_mean, moving_std) = (self.moving_mean(), self.moving_std());
                let (y, stats) =
                    composed::renorm_train(xc, moving_mean, moving_std, eps, clip, self.weight_and_bias())?;
                (y, vec![stats])
            };
            Ok(y)
        })?;
        update_renorm_stats(&batch[0], eps, alpha, &mut mean, &mut std).map_err(wrap)?;
        set_var(&self.moving_mean, mean)?;
        set_var(&self.moving_std, std)?;
        self.steps.store(next, Ordering::Relaxed);
        Ok(y)
    }

    /// Inference forward: y = γ·(x − μ)/σ + β with the moving statistics (constants).
    /// Differentiable in x, γ and β. Rejects what [`BatchRenorm::forward_train`] rejects, except
    /// the two-values rule and the step counter.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x, self.num_features)?;
        let (mean, std) = (self.moving_mean(), self.moving_std());
        in_compute_dtype(x, fused(self.compute, x), |xc| {
            if fused(self.compute, xc) {
                let (mean, std) = (to_f64_vec(mean)?, to_f64_vec(std)?);
                ops::forward(
                    xc,
                    self.config.eps,
                    ForwardMode::RenormEval { mean, std },
                    self.weight_and_bias(),
                )
            } else {
                composed::renorm_eval(xc, mean, std, self.weight_and_bias())
            }
        })
    }
}

crate::module_impls!(
    BatchRenorm,
    /// A [`BatchRenorm`] as a [`Module`]: always inference mode. From [`BatchRenorm::eval_mode`].
    RenormEvalMode
);
