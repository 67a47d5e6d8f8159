#![doc = include_str!("../README.md")]

mod ops;

use std::sync::{Arc, Mutex, MutexGuard};

use batchnorm::{
    fold_into_preceding, update_running_stats, Affine, FixedStats, InferenceAffine, Momentum, PopulationStats,
};
use candle_core::{DType, Error, Module, ModuleT, Result, Tensor, Var};
pub use candle_nn::BatchNormConfig;
use candle_nn::{Conv2d, Linear, VarBuilder};

use ops::{wrap, EvalOp, TrainOp, TrainState};

/// Batch normalization over channel dimension 1 of an input of rank ≥ 2 (`[N, C]`,
/// `[N, C, L]`, `[N, C, H, W]`, …), with candle-nn's variables, configuration and running-statistics
/// convention, computed by the fused `batchnorm` kernels.
///
/// Build it with [`batch_norm`] (from a `VarBuilder`, as `candle_nn::batch_norm`) or
/// [`BatchNorm::new`]. Clones share the running statistics (they are candle [`Var`]s) and the
/// population-statistics accumulator.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    num_features: usize,
    running_mean: Var,
    running_var: Var,
    weight_and_bias: Option<(Tensor, Tensor)>,
    config: BatchNormConfig,
    population: Arc<Mutex<Option<PopulationStats>>>,
}

/// Builds a [`BatchNorm`] over `num_features` channels from a `VarBuilder`, exactly as
/// `candle_nn::batch_norm` does: `running_mean` (initialized to 0), `running_var` (1) and, when
/// `config.affine`, `weight` (γ, 1) and `bias` (β, 0), all of shape `[num_features]`.
///
/// Rejects ε that is not finite and > 0, a momentum outside [0, 1], and variables of the wrong
/// shape.
///
/// ```
/// use batchnorm_candle::batch_norm;
/// use candle_core::{DType, Device};
/// use candle_nn::VarBuilder;
/// let vb = VarBuilder::zeros(DType::F64, &Device::Cpu);
/// let bn = batch_norm(16, 1e-5, vb).unwrap(); // an eps converts into a config, as in candle-nn
/// assert_eq!(bn.num_features(), 16);
/// assert!(batch_norm(16, 0.0, VarBuilder::zeros(DType::F64, &Device::Cpu)).is_err());
/// ```
pub fn batch_norm<C: Into<BatchNormConfig>>(num_features: usize, config: C, vb: VarBuilder) -> Result<BatchNorm> {
    use candle_nn::Init;
    let config = config.into();
    check_config(&config)?;
    let running_mean = vb.get_with_hints(num_features, "running_mean", Init::Const(0.))?;
    let running_var = vb.get_with_hints(num_features, "running_var", Init::Const(1.))?;
    let weight_and_bias = if config.affine {
        let weight = vb.get_with_hints(num_features, "weight", Init::Const(1.))?;
        let bias = vb.get_with_hints(num_features, "bias", Init::Const(0.))?;
        Some((weight, bias))
    } else {
        None
    };
    BatchNorm::from_parts(num_features, running_mean, running_var, weight_and_bias, config)
}

fn check_config(config: &BatchNormConfig) -> Result<()> {
    if !(config.eps.is_finite() && config.eps > 0.0) {
        candle_core::bail!("batch-norm eps must be finite and > 0, got {}", config.eps)
    }
    if !(0.0..=1.0).contains(&config.momentum) {
        candle_core::bail!("batch-norm momentum must be between 0 and 1, is {}", config.momentum)
    }
    Ok(())
}

fn check_vector(name: &str, t: &Tensor, num_features: usize) -> Result<()> {
    if t.dims() != [num_features] {
        candle_core::bail!(
            "batch-norm {name} has unexpected shape {:?} should have shape [{num_features}]",
            t.shape()
        )
    }
    Ok(())
}

/// The type the kernels compute in: `f32`/`f64` themselves, half types in `f32` (as candle-nn).
fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// A per-channel tensor as `f64` values (without a tensor op for `f32`/`f64`).
fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    match t.dtype() {
        DType::F64 => t.to_vec1::<f64>(),
        DType::F32 => Ok(t.to_vec1::<f32>()?.into_iter().map(f64::from).collect()),
        _ => t.to_dtype(DType::F64)?.to_vec1::<f64>(),
    }
}

impl BatchNorm {
    /// From existing tensors, with `remove_mean = true`, momentum 0.1 (candle-nn's
    /// `BatchNorm::new`). Rejects tensors whose shape is not `[num_features]` and a bad `eps`.
    pub fn new(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    ) -> Result<Self> {
        Self::from_parts(
            num_features,
            running_mean,
            running_var,
            Some((weight, bias)),
            eps.into(),
        )
    }

    /// Without γ and β (candle-nn's `BatchNorm::new_no_bias`).
    pub fn new_no_bias(num_features: usize, running_mean: Tensor, running_var: Tensor, eps: f64) -> Result<Self> {
        let config = BatchNormConfig {
            affine: false,
            ..eps.into()
        };
        Self::from_parts(num_features, running_mean, running_var, None, config)
    }

    /// The general constructor: any configuration; `weight_and_bias` must be `Some` exactly when
    /// `config.affine`. A running statistic that is already a candle variable (e.g. from a
    /// `VarMap`) is shared, not copied, so updates show in the `VarMap` (and in what it saves).
    pub fn from_parts(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight_and_bias: Option<(Tensor, Tensor)>,
        config: BatchNormConfig,
    ) -> Result<Self> {
        check_config(&config)?;
        if config.affine != weight_and_bias.is_some() {
            candle_core::bail!("batch-norm: weight and bias must be given exactly when config.affine is true")
        }
        check_vector("running mean", &running_mean, num_features)?;
        check_vector("running variance", &running_var, num_features)?;
        if let Some((w, b)) = &weight_and_bias {
            check_vector("weight", w, num_features)?;
            check_vector("bias", b, num_features)?;
        }
        Ok(BatchNorm {
            num_features,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            weight_and_bias,
            config,
            population: Arc::new(Mutex::new(None)),
        })
    }

    /// Wraps an existing `candle_nn::BatchNorm`, sharing its running-statistics variables and its
    /// weight and bias. candle-nn does not expose `remove_mean`; it is taken to be `true` (what
    /// every candle-nn constructor but `batch_norm` with such a config sets).
    pub fn from_candle(bn: &candle_nn::BatchNorm) -> Result<Self> {
        let num_features = bn.running_mean().dim(0)?;
        let config = BatchNormConfig {
            eps: bn.eps(),
            remove_mean: true,
            affine: bn.weight_and_bias().is_some(),
            momentum: bn.momentum(),
        };
        let wb = bn.weight_and_bias().map(|(w, b)| (w.clone(), b.clone()));
        Self::from_parts(
            num_features,
            bn.running_mean().clone(),
            bn.running_var().clone(),
            wb,
            config,
        )
    }

    /// Number of channels.
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// The configuration (candle-nn's type).
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// Running mean, shape `[num_features]`.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// Running (unbiased) variance, shape `[num_features]`.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// ε.
    pub fn eps(&self) -> f64 {
        self.config.eps
    }

    /// Momentum: running ← (1 − momentum)·running + momentum·batch.
    pub fn momentum(&self) -> f64 {
        self.config.momentum
    }

    /// γ and β, when the layer is affine.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.weight_and_bias.as_ref().map(|(w, b)| (w, b))
    }

    /// This layer as a [`Module`] that always runs in inference mode (a type cannot implement
    /// both `Module` and `ModuleT` in candle: `Module` implies a `ModuleT` that ignores `train`).
    pub fn eval_mode(&self) -> EvalMode<'_> {
        EvalMode(self)
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        if x.rank() < 2 {
            candle_core::bail!(
                "batch-norm input tensor must have at least two dimensions ({:?})",
                x.shape()
            )
        }
        if x.dim(1)? != self.num_features {
            candle_core::bail!(
                "batch-norm input doesn't have the expected number of features ({:?} <> {})",
                x.shape(),
                self.num_features
            )
        }
        Ok(())
    }

    /// γ and β in the compute type, contiguous.
    fn affine_in(&self, dtype: DType) -> Result<Option<(Tensor, Tensor)>> {
        self.weight_and_bias
            .as_ref()
            .map(|(w, b)| Ok((w.to_dtype(dtype)?.contiguous()?, b.to_dtype(dtype)?.contiguous()?)))
            .transpose()
    }

    /// Training forward (Algorithm 1): normalizes with the batch statistics through the fused
    /// kernel and updates the running statistics (and the population accumulator, when one was
    /// started). Differentiable in x, γ and β.
    ///
    /// Rejects: rank < 2, a channel count that differs from `num_features`, a zero dimension,
    /// fewer than 2 values per channel, a dtype other than f16/bf16/f32/f64, a non-CPU device.
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        if !self.config.remove_mean {
            return self.forward_train_uncentred(x);
        }
        let x_dtype = x.dtype();
        let dtype = internal_dtype(x_dtype);
        let xc = x.to_dtype(dtype)?.contiguous()?;
        let state = TrainState::default();
        let op = TrainOp {
            eps: self.config.eps,
            state: state.clone(),
        };
        let y = match self.affine_in(dtype)? {
            Some((w, b)) => xc.apply_op3(&w, &b, op)?,
            None => xc.apply_op1(op)?,
        };
        let (stats, _) = state
            .get()
            .ok_or_else(|| Error::Msg("batch-norm: the training op left no statistics".into()))?;
        if self.config.momentum > 0.0 {
            let mut mean = to_f64_vec(self.running_mean())?;
            let mut var = to_f64_vec(self.running_var())?;
            let momentum = Momentum::Exponential(self.config.momentum);
            update_running_stats(stats, momentum, 1, &mut mean, &mut var).map_err(wrap)?;
            set_var(&self.running_mean, mean)?;
            set_var(&self.running_var, var)?;
        }
        if let Some(pop) = self.population()?.as_mut() {
            pop.observe(stats).map_err(wrap)?;
        }
        y.to_dtype(x_dtype)
    }

    /// Inference forward: y = γ·(x − running_mean)/√(running_var + ε) + β in one fused pass.
    /// Differentiable in x, γ and β (statistics constant). Rejects what
    /// [`BatchNorm::forward_train`] rejects, except the two-values rule.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let x_dtype = x.dtype();
        let dtype = internal_dtype(x_dtype);
        let xc = x.to_dtype(dtype)?.contiguous()?;
        let op = EvalOp {
            mean: to_f64_vec(self.running_mean())?,
            var: to_f64_vec(self.running_var())?,
            eps: self.config.eps,
        };
        let y = match self.affine_in(dtype)? {
            Some((w, b)) => xc.apply_op3(&w, &b, op)?,
            None => xc.apply_op1(op)?,
        };
        y.to_dtype(x_dtype)
    }

    /// candle-nn's `remove_mean = false` training path, op for op (generic candle ops).
    fn forward_train_uncentred(&self, x: &Tensor) -> Result<Tensor> {
        let x_dtype = x.dtype();
        let x = x.to_dtype(internal_dtype(x_dtype))?.transpose(0, 1)?;
        let dims_post_transpose = x.dims().to_vec();
        let x = x.flatten_from(1)?.contiguous()?;
        if x.dim(1)? < 2 {
            candle_core::bail!(
                "batch-norm training needs more than 1 value per channel ({:?})",
                dims_post_transpose
            )
        }
        let norm_x = x.sqr()?.mean_keepdim(1)?;
        let m = self.config.momentum;
        let batch_size = x.dim(1)? as f64;
        let updated = ((self.running_var.as_tensor() * (1.0 - m))?
            + (norm_x.flatten_all()?.to_dtype(self.running_var.dtype())? * (m * batch_size / (batch_size - 1.0)))?)?;
        self.running_var.set(&updated)?;
        let x = x
            .broadcast_div(&(norm_x + self.config.eps)?.sqrt()?)?
            .to_dtype(x_dtype)?;
        let x = match &self.weight_and_bias {
            None => x,
            Some((w, b)) => x
                .broadcast_mul(&w.reshape(((), 1))?)?
                .broadcast_add(&b.reshape(((), 1))?)?,
        };
        x.reshape(dims_post_transpose)?.transpose(0, 1)
    }

    /// Replaces the running statistics (shape `[num_features]` each; converted to the variables'
    /// dtype).
    pub fn set_running_stats(&self, mean: &Tensor, var: &Tensor) -> Result<()> {
        check_vector("running mean", mean, self.num_features)?;
        check_vector("running variance", var, self.num_features)?;
        self.running_mean
            .set(&mean.to_dtype(self.running_mean.dtype())?.contiguous()?)?;
        self.running_var
            .set(&var.to_dtype(self.running_var.dtype())?.contiguous()?)
    }

    fn population(&self) -> Result<MutexGuard<'_, Option<PopulationStats>>> {
        self.population
            .lock()
            .map_err(|_| Error::Msg("batch-norm: population statistics lock poisoned".into()))
    }

    /// Starts (or restarts) Algorithm 2's population statistics: from now on every training
    /// forward also adds its batch statistics to an equal-weight average (E\[x\] = mean of μ_B,
    /// Var\[x\] = mean of the unbiased batch variances) until
    /// [`BatchNorm::finish_population_stats`]. Run the training mini-batches through the model
    /// with `forward_t(x, true)` (no backward or optimizer step needed) in between.
    ///
    /// Rejects a layer with `remove_mean = false` (it has no batch mean to average).
    ///
    /// ```
    /// use batchnorm_candle::{batch_norm, BatchNormConfig};
    /// use candle_core::{DType, Device, ModuleT, Tensor};
    /// use candle_nn::VarBuilder;
    /// let bn = batch_norm(2, BatchNormConfig::default(), VarBuilder::zeros(DType::F64, &Device::Cpu))?;
    /// bn.begin_population_stats()?;
    /// for shift in [0.0, 4.0] {
    ///     let x = Tensor::new(&[[shift, 1.0], [shift + 2.0, 3.0]], &Device::Cpu)?; // [N=2, C=2]
    ///     bn.forward_t(&x, true)?;
    /// }
    /// let pop = bn.finish_population_stats()?; // now the running statistics
    /// assert_eq!(bn.running_mean().to_vec1::<f64>()?, vec![3.0, 2.0]);
    /// assert_eq!(bn.running_var().to_vec1::<f64>()?, vec![2.0, 2.0]);
    /// assert_eq!(pop.batches(), 2);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn begin_population_stats(&self) -> Result<()> {
        if !self.config.remove_mean {
            candle_core::bail!("batch-norm: population statistics need remove_mean = true")
        }
        *self.population()? = Some(PopulationStats::new(self.num_features));
        Ok(())
    }

    /// The population statistics accumulated so far (`None` when not started).
    pub fn population_stats(&self) -> Result<Option<PopulationStats>> {
        Ok(self.population()?.clone())
    }

    /// Stops accumulating and makes the population estimate the running statistics; returns it.
    /// Rejects (and keeps accumulating) when not started or when no batch was observed.
    pub fn finish_population_stats(&self) -> Result<PopulationStats> {
        let mut guard = self.population()?;
        let pop = guard
            .as_ref()
            .ok_or_else(|| Error::Msg("batch-norm: population statistics were not started".into()))?;
        self.set_population_stats(pop)?;
        let pop = pop.clone();
        *guard = None;
        Ok(pop)
    }

    /// Makes a population estimate (e.g. one accumulated elsewhere with
    /// [`batchnorm::PopulationStats::observe`]) the running statistics. Rejects an estimate of
    /// another channel count or with no batches.
    pub fn set_population_stats(&self, pop: &PopulationStats) -> Result<()> {
        let (mean, var) = (pop.mean().map_err(wrap)?, pop.var().map_err(wrap)?);
        if mean.len() != self.num_features {
            candle_core::bail!(
                "batch-norm: population statistics of {} channels for a layer of {}",
                mean.len(),
                self.num_features
            )
        }
        set_var(&self.running_mean, mean)?;
        set_var(&self.running_var, var)
    }

    /// The inference transform as one affine map per channel: scale = γ/√(running_var + ε),
    /// shift = β − running_mean·scale (in `f64`).
    pub fn inference_affine(&self) -> Result<InferenceAffine> {
        let (mean, var) = (to_f64_vec(self.running_mean())?, to_f64_vec(self.running_var())?);
        let wb = match &self.weight_and_bias {
            Some((w, b)) => Some((to_f64_vec(w)?, to_f64_vec(b)?)),
            None => None,
        };
        let affine = match &wb {
            Some((w, b)) => Affine::new(w, b),
            None => Affine::NONE,
        };
        InferenceAffine::new(FixedStats::new(&mean, &var), affine, self.config.eps).map_err(wrap)
    }

    /// Folds this layer (inference mode) into the preceding weight `[out, …]` and optional bias:
    /// returns W' = diag(scale)·W and b' = scale·b + shift, computed in `f64` and rounded once to
    /// the weight's dtype.
    fn fold_weight(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        if weight.rank() < 2 || weight.dim(0)? != self.num_features {
            candle_core::bail!(
                "batch-norm fold: the preceding layer's weight {:?} must have {} output channels (dimension 0)",
                weight.shape(),
                self.num_features
            )
        }
        if let Some(b) = bias {
            check_vector("preceding bias", b, self.num_features)?;
        }
        let affine = self.inference_affine()?;
        let mut w = weight.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let b = bias.map(to_f64_vec).transpose()?;
        let folded_b = fold_into_preceding(&affine, b.as_deref(), &mut w).map_err(wrap)?;
        let dev = weight.device();
        let w = Tensor::from_vec(w, weight.shape(), dev)?.to_dtype(weight.dtype())?;
        let b = Tensor::from_vec(folded_b, self.num_features, dev)?.to_dtype(weight.dtype())?;
        Ok((w, b))
    }

    /// A [`Linear`] equal to this layer (inference mode) applied after `linear`: weight
    /// `[num_features, in]` scaled per output row, bias folded (always present in the result).
    ///
    /// ```
    /// use batchnorm_candle::BatchNorm;
    /// use candle_core::{Device, Module, Tensor};
    /// use candle_nn::Linear;
    /// let dev = Device::Cpu;
    /// let lin = Linear::new(Tensor::new(&[[1.0f64, 2.0], [3.0, 4.0]], &dev)?, None);
    /// let bn = BatchNorm::new(2, Tensor::new(&[1.0f64, -1.0], &dev)?, Tensor::new(&[4.0f64, 1.0], &dev)?,
    ///     Tensor::new(&[2.0f64, 1.0], &dev)?, Tensor::new(&[0.5f64, 0.0], &dev)?, 1e-12)?;
    /// let fused = bn.fold_into_linear(&lin)?;
    /// let x = Tensor::new(&[[1.0f64, 1.0]], &dev)?;
    /// let want = bn.eval_mode().forward(&lin.forward(&x)?)?;
    /// let diff = (fused.forward(&x)? - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
    /// assert!(diff < 1e-12);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn fold_into_linear(&self, linear: &Linear) -> Result<Linear> {
        let (w, b) = self.fold_weight(linear.weight(), linear.bias())?;
        Ok(Linear::new(w, Some(b)))
    }

    /// A [`Conv2d`] equal to this layer (inference mode) applied after `conv`: weight
    /// `[num_features, in/groups, kh, kw]` scaled per output channel, bias folded (always present
    /// in the result), same configuration.
    pub fn fold_into_conv2d(&self, conv: &Conv2d) -> Result<Conv2d> {
        let (w, b) = self.fold_weight(conv.weight(), conv.bias())?;
        Ok(Conv2d::new(w, Some(b), *conv.config()))
    }
}

/// Writes `f64` values into a per-channel variable, in the variable's dtype and on its device.
fn set_var(var: &Var, values: Vec<f64>) -> Result<()> {
    let (n, dev) = (values.len(), var.device());
    let t = match var.dtype() {
        DType::F64 => Tensor::from_vec(values, n, dev)?,
        DType::F32 => Tensor::from_vec(values.into_iter().map(|v| v as f32).collect::<Vec<_>>(), n, dev)?,
        dtype => Tensor::from_vec(values, n, dev)?.to_dtype(dtype)?,
    };
    var.set(&t)
}

impl ModuleT for BatchNorm {
    /// `train = true`: [`BatchNorm::forward_train`]; `false`: [`BatchNorm::forward_eval`].
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.forward_train(x)
        } else {
            self.forward_eval(x)
        }
    }
}

/// A [`BatchNorm`] as a [`Module`]: always inference mode. From [`BatchNorm::eval_mode`].
#[derive(Clone, Copy, Debug)]
pub struct EvalMode<'a>(pub &'a BatchNorm);

impl Module for EvalMode<'_> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward_eval(x)
    }
}
