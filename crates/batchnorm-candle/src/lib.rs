#![doc = include_str!("../README.md")]

mod composed;
mod mask;
mod ops;
mod relu;
mod renorm;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use batchnorm::{
    fold_into_preceding, update_ghost_running_stats, update_running_stats, Affine, BatchStats, FixedStats,
    InferenceAffine, Momentum, PopulationStats,
};
pub use batchnorm::{BatchRenormConfig, RenormClip, RenormSchedule, SmallBatch};
use candle_core::{DType, Error, Module, ModuleT, Result, Tensor, Var};
pub use candle_nn::BatchNormConfig;
use candle_nn::{Conv2d, Linear, VarBuilder};

use mask::Mask;
use ops::{wrap, ForwardMode, TrainKernel};
pub use renorm::{batch_renorm, BatchRenorm, RenormEvalMode};

/// γ and β, each `[C]` (in any dtype), or none.
type Params<'a> = Option<(&'a Tensor, &'a Tensor)>;

/// Runs `f` on `x` converted to the compute dtype ([`internal_dtype`]) and returns its result in
/// `x`'s dtype; with `native` (the fused ops, which take every dtype [`check_input`] admits) on
/// `x` itself, with no copy.
fn in_compute_dtype(x: &Tensor, native: bool, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if native {
        return f(x);
    }
    f(&x.to_dtype(internal_dtype(x.dtype()))?)?.to_dtype(x.dtype())
}

/// Checks a layer's tensors, two per-channel statistics (`stats`, with their names) and γ, β
/// (given exactly when `affine`), all `[num_features]`, and makes the statistics variables (one
/// that already is a variable, e.g. from a `VarMap`, is shared, not copied).
fn stat_vars(
    num_features: usize,
    stats: [(&str, &Tensor); 2],
    weight_and_bias: &Option<(Tensor, Tensor)>,
    affine: bool,
) -> Result<(Var, Var)> {
    if affine != weight_and_bias.is_some() {
        candle_core::bail!("batch-norm: weight and bias must be given exactly when config.affine is true")
    }
    for (name, t) in stats {
        check_vector(name, t, num_features)?;
    }
    if let Some((w, b)) = weight_and_bias {
        check_vector("weight", w, num_features)?;
        check_vector("bias", b, num_features)?;
    }
    Ok((Var::from_tensor(stats[0].1)?, Var::from_tensor(stats[1].1)?))
}

/// How a layer computes: the fused kernels where they run, or ordinary candle ops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ComputePath {
    /// The fused `batchnorm` kernels (candle custom ops with their fused backward) for tensors on
    /// the CPU; on any other device the composed candle ops of [`ComputePath::Composed`], so
    /// that a layer works wherever candle-nn's does (the default).
    #[default]
    Auto,
    /// Ordinary candle tensor ops on every device, differentiated by candle's autograd. The
    /// statistics are then summed in the compute dtype, as candle-nn does.
    Composed,
}

/// Batch normalization over channel dimension 1 of an input of rank ≥ 2 (`[N, C]`,
/// `[N, C, L]`, `[N, C, H, W]`, …), with candle-nn's variables, configuration and running-statistics
/// convention, computed by the fused `batchnorm` kernels on the CPU (composed candle ops
/// elsewhere, see [`ComputePath`]).
///
/// Build it with [`batch_norm`] (from a `VarBuilder`, as `candle_nn::batch_norm`) or
/// [`BatchNorm::new`] and candle-nn's other constructors. Beyond candle-nn, a layer can be
/// frozen ([`BatchNorm::freeze`]), given a small-batch policy
/// ([`BatchNorm::with_small_batch`]) or a ghost virtual batch size
/// ([`BatchNorm::with_virtual_batch`]). Clones share the running statistics (they are candle
/// [`Var`]s), the frozen state and the population-statistics accumulator.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    num_features: usize,
    running_mean: Var,
    running_var: Var,
    weight_and_bias: Option<(Tensor, Tensor)>,
    config: BatchNormConfig,
    small_batch: SmallBatch,
    virtual_batch: Option<usize>,
    compute: ComputePath,
    frozen: Arc<AtomicBool>,
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
    let config = config.into();
    check_config(&config)?;
    let stats = [("running_mean", 0.0), ("running_var", 1.0)];
    let ([running_mean, running_var], weight_and_bias) = get_vars(&vb, num_features, stats, config.affine)?;
    BatchNorm::from_parts(num_features, running_mean, running_var, weight_and_bias, config)
}

/// A layer's variables from a `VarBuilder`, all `[num_features]`: two per-channel statistics
/// (name, initial value) and, when `affine`, `weight` (γ, initialized to 1) and `bias` (β, 0).
fn get_vars(
    vb: &VarBuilder,
    num_features: usize,
    stats: [(&str, f64); 2],
    affine: bool,
) -> Result<([Tensor; 2], Option<(Tensor, Tensor)>)> {
    let get = |name: &str, value: f64| vb.get_with_hints(num_features, name, candle_nn::Init::Const(value));
    let [(a, a0), (b, b0)] = stats;
    let stats = [get(a, a0)?, get(b, b0)?];
    let weight_and_bias = if affine {
        Some((get("weight", 1.0)?, get("bias", 0.0)?))
    } else {
        None
    };
    Ok((stats, weight_and_bias))
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

/// Checks an input before either path: rank ≥ 2, `num_features` channels in dimension 1, a
/// floating-point dtype, no zero dimension. Returns the number of values per channel.
fn check_input(x: &Tensor, num_features: usize) -> Result<usize> {
    if x.rank() < 2 {
        candle_core::bail!(
            "batch-norm input tensor must have at least two dimensions ({:?})",
            x.shape()
        )
    }
    if x.dim(1)? != num_features {
        candle_core::bail!(
            "batch-norm input doesn't have the expected number of features ({:?} <> {})",
            x.shape(),
            num_features
        )
    }
    if !matches!(x.dtype(), DType::F16 | DType::BF16 | DType::F32 | DType::F64) {
        candle_core::bail!(
            "batch-norm: unsupported dtype {:?} (f16, bf16, f32 and f64 are supported)",
            x.dtype()
        )
    }
    if x.elem_count() == 0 {
        return Err(wrap(batchnorm::Error::EmptyInput {
            shape: x.dims().to_vec(),
        }));
    }
    Ok(x.elem_count() / num_features)
}

/// Rejects a residual `z` that is not of `x`'s shape, dtype and device.
fn check_residual(z: &Tensor, x: &Tensor) -> Result<()> {
    if z.dims() != x.dims() || z.dtype() != x.dtype() {
        candle_core::bail!(
            "batch-norm: the residual z is {:?} {:?}, the input {:?} {:?} (they must match)",
            z.dtype(),
            z.dims(),
            x.dtype(),
            x.dims()
        )
    }
    check_device("residual z", z, x)
}

/// Rejects a tensor given with the input x (named `what`, e.g. `mask`) that is on another device.
fn check_device(what: &str, t: &Tensor, x: &Tensor) -> Result<()> {
    if !t.device().same_device(x.device()) {
        candle_core::bail!(
            "batch-norm {what} is on {:?}, the input on {:?}",
            t.device().location(),
            x.device().location()
        )
    }
    Ok(())
}

/// Rejects a training batch of fewer than 2 values per channel ([`batchnorm::Error::TooFewValues`]),
/// as the kernels do, before either path runs.
fn check_training_count(count: usize, x: &Tensor) -> Result<()> {
    if count < 2 {
        return Err(wrap(batchnorm::Error::TooFewValues {
            count: count as u64,
            shape: x.dims().to_vec(),
        }));
    }
    Ok(())
}

/// Rejects a ghost batch whose group of `virtual_batch` consecutive examples (the last one
/// holding the rest) has fewer than 2 values per channel
/// ([`batchnorm::Error::GhostGroupTooSmall`]), as the kernels do, before either path runs.
fn check_ghost_groups(shape: &[usize], virtual_batch: usize) -> Result<()> {
    let (n, per_example) = (shape[0], shape[2..].iter().product::<usize>());
    for (group, first) in (0..n).step_by(virtual_batch).enumerate() {
        let count = (virtual_batch.min(n - first) * per_example) as u64;
        if count < 2 {
            return Err(wrap(batchnorm::Error::GhostGroupTooSmall {
                group,
                count,
                shape: shape.to_vec(),
            }));
        }
    }
    Ok(())
}

/// Whether `x` goes through the fused kernels: on the CPU, unless the layer says otherwise.
fn fused(compute: ComputePath, x: &Tensor) -> bool {
    compute == ComputePath::Auto && x.device().is_cpu()
}

/// The type the composed path (and batch renormalization) computes in: `f32`/`f64` themselves,
/// half types in `f32` (as candle-nn).
fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// A tensor's values as `f64`, flattened, on the host (without a tensor op for `f32`/`f64`;
/// other types through `f32`, which holds them exactly and which every device converts to,
/// unlike `f64`).
fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    let t = t.flatten_all()?;
    let widen = |v: Vec<f32>| v.into_iter().map(f64::from).collect();
    match t.dtype() {
        DType::F64 => t.to_vec1::<f64>(),
        DType::F32 => Ok(widen(t.to_vec1::<f32>()?)),
        _ => Ok(widen(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)),
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
        Self::new_no_bias_with_momentum(num_features, running_mean, running_var, eps, 0.1)
    }

    /// [`BatchNorm::new`] with the given momentum (candle-nn's `BatchNorm::new_with_momentum`):
    /// running ← (1 − momentum)·running + momentum·batch. Rejects what [`BatchNorm::new`] rejects
    /// and a momentum outside [0, 1] (as candle-nn does).
    ///
    /// ```
    /// use batchnorm_candle::BatchNorm;
    /// use candle_core::{DType, Device, Tensor};
    /// let v = |x: f32| Tensor::full(x, 4, &Device::Cpu);
    /// let bn = BatchNorm::new_with_momentum(4, v(0.0)?, v(1.0)?, v(1.0)?, v(0.0)?, 1e-5, 0.01)?;
    /// assert_eq!(bn.momentum(), 0.01);
    /// assert!(BatchNorm::new_with_momentum(4, v(0.0)?, v(1.0)?, v(1.0)?, v(0.0)?, 1e-5, 1.5).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new_with_momentum(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: f64,
        momentum: f64,
    ) -> Result<Self> {
        let config = BatchNormConfig { momentum, ..eps.into() };
        Self::from_parts(num_features, running_mean, running_var, Some((weight, bias)), config)
    }

    /// [`BatchNorm::new_no_bias`] with the given momentum (candle-nn's
    /// `BatchNorm::new_no_bias_with_momentum`). Rejects what [`BatchNorm::new_with_momentum`]
    /// rejects.
    pub fn new_no_bias_with_momentum(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
        momentum: f64,
    ) -> Result<Self> {
        let config = BatchNormConfig {
            affine: false,
            momentum,
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
        let stats = [("running mean", &running_mean), ("running variance", &running_var)];
        let (running_mean, running_var) = stat_vars(num_features, stats, &weight_and_bias, config.affine)?;
        Ok(BatchNorm {
            num_features,
            running_mean,
            running_var,
            weight_and_bias,
            config,
            small_batch: SmallBatch::Error,
            virtual_batch: None,
            compute: ComputePath::Auto,
            frozen: Arc::new(AtomicBool::new(false)),
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

    /// This layer with a small-batch policy (the kernel crate's [`SmallBatch`]): with
    /// [`SmallBatch::UseRunningStats`] a training batch of fewer than 2 values per channel (the
    /// last, short batch of an epoch) is normalized with the running statistics, as in
    /// inference, which it does not update; with [`SmallBatch::Error`] (the default) it is
    /// rejected. The layer itself is not frozen: the next batch uses its own statistics.
    ///
    /// ```
    /// use batchnorm_candle::{batch_norm, BatchNormConfig, SmallBatch};
    /// use candle_core::{DType, Device, ModuleT, Tensor};
    /// use candle_nn::VarBuilder;
    /// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    /// let bn = batch_norm(3, BatchNormConfig::default(), vb)?;
    /// let last = Tensor::ones((1, 3), DType::F32, &Device::Cpu)?; // one example: no variance
    /// assert!(bn.forward_t(&last, true).is_err());
    /// let bn = bn.with_small_batch(SmallBatch::UseRunningStats);
    /// let y = bn.forward_t(&last, true)?; // = bn.forward_t(&last, false)
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_small_batch(self, policy: SmallBatch) -> Self {
        BatchNorm {
            small_batch: policy,
            ..self
        }
    }

    /// The small-batch policy.
    pub fn small_batch(&self) -> SmallBatch {
        self.small_batch
    }

    /// This layer as ghost batch norm (Hoffer et al. 2017) with virtual batch size `v`, or plain
    /// batch norm with `None`: in training, each group of `v` consecutive examples (the last one
    /// holds the rest) is normalized with its own statistics, and the running statistics are
    /// updated once per batch with the mean over groups of their means and of their unbiased
    /// variances; inference never uses groups. Each group needs at least 2 values per channel.
    ///
    /// Rejects `v < 2` ([`batchnorm::Error::InvalidVirtualBatch`]) and a layer with
    /// `remove_mean = false` (candle-nn's uncentred variant has no groups).
    ///
    /// ```
    /// use batchnorm_candle::{batch_norm, BatchNormConfig};
    /// use candle_core::{DType, Device, ModuleT, Tensor};
    /// use candle_nn::VarBuilder;
    /// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    /// let bn = batch_norm(3, BatchNormConfig::default(), vb)?.with_virtual_batch(Some(4))?;
    /// let x = Tensor::randn(0f32, 1., (32, 3, 5), &Device::Cpu)?; // 8 groups of 4 examples
    /// let y = bn.forward_t(&x, true)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_virtual_batch(self, v: Option<usize>) -> Result<Self> {
        if let Some(v) = v {
            if v < 2 {
                return Err(wrap(batchnorm::Error::InvalidVirtualBatch(v)));
            }
            if !self.config.remove_mean {
                candle_core::bail!("batch-norm: ghost batch norm needs remove_mean = true")
            }
        }
        Ok(BatchNorm {
            virtual_batch: v,
            ..self
        })
    }

    /// Ghost batch norm's virtual batch size, if set.
    pub fn virtual_batch(&self) -> Option<usize> {
        self.virtual_batch
    }

    /// This layer computing by `path` (see [`ComputePath`]).
    pub fn with_compute(self, path: ComputePath) -> Self {
        BatchNorm { compute: path, ..self }
    }

    /// How the layer computes.
    pub fn compute(&self) -> ComputePath {
        self.compute
    }

    /// Freezes the layer (frozen batch norm): from now on its training forward
    /// (`forward_t(x, true)`, [`BatchNorm::forward_train`]) normalizes with the running
    /// statistics, y = γ·(x − μ_run)/√(σ²_run + ε) + β, never updates them (nor the population
    /// statistics), and backpropagates through them as constants; γ and β still get their
    /// gradients. A state of the layer, shared by its clones, that no train flag overrides:
    /// it lasts until [`BatchNorm::unfreeze`].
    ///
    /// ```
    /// use batchnorm_candle::{batch_norm, BatchNormConfig};
    /// use candle_core::{DType, Device, ModuleT, Tensor};
    /// use candle_nn::VarBuilder;
    /// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    /// let bn = batch_norm(3, BatchNormConfig::default(), vb)?;
    /// bn.freeze();
    /// let x = Tensor::randn(5f32, 1., (8, 3), &Device::Cpu)?;
    /// bn.forward_t(&x, true)?; // the caller's train flag does not unfreeze it
    /// assert_eq!(bn.running_mean().to_vec1::<f32>()?, vec![0.0; 3]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::Relaxed);
    }

    /// Unfreezes the layer: training uses batch statistics again.
    pub fn unfreeze(&self) {
        self.frozen.store(false, Ordering::Relaxed);
    }

    /// Whether the layer is frozen (to save with a checkpoint: the state is not a variable).
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Relaxed)
    }

    /// Sets the frozen state (to restore it from a checkpoint).
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Relaxed);
    }

    /// Whether a training pass over `count` values per channel uses the running statistics: the
    /// layer is frozen, or the batch is too small and the policy says so.
    fn uses_running_stats(&self, count: usize) -> bool {
        self.is_frozen() || (count < 2 && self.small_batch == SmallBatch::UseRunningStats)
    }

    /// This layer as a [`Module`] that always runs in inference mode (a type cannot implement
    /// both `Module` and `ModuleT` in candle: `Module` implies a `ModuleT` that ignores `train`).
    pub fn eval_mode(&self) -> EvalMode<'_> {
        EvalMode(self)
    }

    /// Training forward: normalizes with the batch statistics (Algorithm 1; per group of the
    /// virtual batch size with [`BatchNorm::with_virtual_batch`]) and updates the running
    /// statistics (and the population accumulator, when one was started). Differentiable in x, γ
    /// and β. On the CPU through the fused kernels, elsewhere through composed candle ops (see
    /// [`ComputePath`]).
    ///
    /// A frozen layer ([`BatchNorm::freeze`]), and with [`SmallBatch::UseRunningStats`] a batch of
    /// fewer than 2 values per channel, is normalized as [`BatchNorm::forward_eval`] does and
    /// updates nothing.
    ///
    /// Rejects: rank < 2, a channel count that differs from `num_features`, a dtype other than
    /// f16/bf16/f32/f64, a zero dimension ([`batchnorm::Error::EmptyInput`]), fewer than 2
    /// values per channel ([`batchnorm::Error::TooFewValues`]) and, for ghost batch norm, a group
    /// with fewer ([`batchnorm::Error::GhostGroupTooSmall`]). On error the running statistics
    /// are unchanged.
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        self.train_pass(x, None)
    }

    /// The training forward, masked or not.
    fn train_pass(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let count = check_input(x, self.num_features)?;
        let mask = mask.map(|m| Mask::new(m, x)).transpose()?;
        let count = match &mask {
            Some(m) => m.count()?,
            None => count,
        };
        if self.uses_running_stats(count) {
            return self.eval_pass(x, mask.as_ref());
        }
        if mask.is_some() && (self.virtual_batch.is_some() || !self.config.remove_mean) {
            candle_core::bail!(
                "batch-norm: the masked training forward has no ghost or uncentred (remove_mean = false) form"
            )
        }
        check_training_count(count, x)?;
        if !self.config.remove_mean {
            return self.forward_train_uncentred(x);
        }
        if let Some(v) = self.virtual_batch {
            check_ghost_groups(x.dims(), v)?;
        }
        let (eps, params) = (self.config.eps, self.weight_and_bias());
        let mut stats = Vec::new();
        let y = in_compute_dtype(x, fused(self.compute, x), |xc| {
            let y;
            (y, stats) = if fused(self.compute, xc) {
                // A mask with a virtual batch was rejected above.
                let kernel = match (self.virtual_batch, &mask) {
                    (Some(v), _) => TrainKernel::Ghost(v),
                    (None, Some(m)) => TrainKernel::Masked(m.bits()?),
                    (None, None) => TrainKernel::Plain,
                };
                ops::train(xc, eps, kernel, params)?
            } else {
                let one = |(y, stats)| (y, vec![stats]);
                match (self.virtual_batch, &mask) {
                    (Some(v), _) => composed::ghost_train(xc, v, eps, params)?,
                    (None, Some(m)) => one(composed::masked_train(xc, &m.broadcast(xc)?, count, eps, params)?),
                    (None, None) => one(composed::train(xc, eps, params)?),
                }
            };
            Ok(y)
        })?;
        self.track(&stats)?;
        Ok(y)
    }

    /// Updates the running statistics with a training batch's statistics (one per ghost group)
    /// by the layer's momentum (none at momentum 0, as in candle-nn), and adds every group to the
    /// population statistics when they are being accumulated.
    fn track(&self, groups: &[BatchStats]) -> Result<()> {
        if self.config.momentum > 0.0 {
            let mut mean = to_f64_vec(self.running_mean())?;
            let mut var = to_f64_vec(self.running_var())?;
            let momentum = Momentum::Exponential(self.config.momentum);
            match groups {
                [batch] => update_running_stats(batch, momentum, 1, &mut mean, &mut var),
                _ => update_ghost_running_stats(groups, momentum, 1, &mut mean, &mut var),
            }
            .map_err(wrap)?;
            set_var(&self.running_mean, mean)?;
            set_var(&self.running_var, var)?;
        }
        if let Some(pop) = self.population()?.as_mut() {
            for batch in groups {
                pop.observe(batch).map_err(wrap)?;
            }
        }
        Ok(())
    }

    /// Inference forward: y = γ·(x − running_mean)/√(running_var + ε) + β, in one fused pass on
    /// the CPU. Differentiable in x, γ and β (statistics constant). Rejects what
    /// [`BatchNorm::forward_train`] rejects, except the two-values rules.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x, self.num_features)?;
        self.eval_pass(x, None)
    }

    /// The inference forward of a checked input, masked or not.
    fn eval_pass(&self, x: &Tensor, mask: Option<&Mask>) -> Result<Tensor> {
        let (eps, params) = (self.config.eps, self.weight_and_bias());
        let (mean, var) = (self.running_mean(), self.running_var());
        in_compute_dtype(x, fused(self.compute, x), |xc| {
            if fused(self.compute, xc) {
                let (mean, var) = (to_f64_vec(mean)?, to_f64_vec(var)?);
                let mask = mask.map(Mask::bits).transpose()?;
                ops::forward(xc, eps, ForwardMode::Eval { mean, var, mask }, params)
            } else {
                let on = mask.map(|m| m.broadcast(xc)).transpose()?;
                composed::eval(xc, mean, var, eps, params, on.as_ref())
            }
        })
    }

    /// Masked training forward (padded sequences, point clouds, ragged batches): the statistics
    /// are those of the valid positions of `mask`, the valid positions are normalized with them
    /// and the others written as 0, the backward is the exact derivative of that (dx = 0 at
    /// masked positions, which add nothing to dγ and dβ), and the running variance is updated
    /// unbiased with the valid count. What masked positions hold (NaN, 1e30) changes no output
    /// and no gradient. On the CPU through the `batchnorm` crate's masked kernels
    /// ([`batchnorm::batch_norm_train_masked`] and its fused backward,
    /// [`batchnorm::batch_norm_backward_masked`]); elsewhere, and with
    /// [`ComputePath::Composed`], through composed candle ops that select rather than multiply
    /// by the mask.
    ///
    /// `mask` holds one entry per example and position, shared by the channels: `[N]` for an
    /// input `[N, C]`, `[N, d1, …, dk]` for `[N, C, d1, …, dk]`; an integer dtype (`u8`, `u32` or
    /// `i64`), nonzero where the position is valid, on the input's device.
    ///
    /// A frozen layer, and with [`SmallBatch::UseRunningStats`] a batch of fewer than 2 valid
    /// positions, normalizes the valid positions with the running statistics
    /// ([`BatchNorm::forward_eval_masked`]) and updates nothing.
    ///
    /// Rejects what [`BatchNorm::forward_train`] rejects, a mask of another shape, dtype or
    /// device, fewer than 2 valid positions ([`batchnorm::Error::TooFewValues`] with the valid
    /// count), and a ghost or uncentred (`remove_mean = false`) layer.
    ///
    /// ```
    /// use batchnorm_candle::{batch_norm, BatchNormConfig};
    /// use candle_core::{DType, Device, ModuleT, Tensor};
    /// use candle_nn::VarBuilder;
    /// let dev = Device::Cpu;
    /// let bn = batch_norm(4, BatchNormConfig::default(), VarBuilder::zeros(DType::F32, &dev))?;
    /// // Two sequences of 3 steps ([N, C, L]), the second padded after its first step.
    /// let x = Tensor::randn(0f32, 1., (2, 4, 3), &dev)?;
    /// let mask = Tensor::new(&[[1u8, 1, 1], [1, 0, 0]], &dev)?;
    /// let y = bn.forward_train_masked(&x, &mask)?;
    /// assert_eq!(y.get(1)?.narrow(1, 1, 2)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn forward_train_masked(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.train_pass(x, Some(mask))
    }

    /// Masked inference: y = γ·(x − running_mean)/√(running_var + ε) + β at the valid positions
    /// of `mask` (as [`BatchNorm::forward_train_masked`] takes it), 0 at the others.
    /// Differentiable in x, γ and β; on the CPU through [`batchnorm::batch_norm_eval_masked`] and
    /// [`batchnorm::batch_norm_backward_eval_masked`]. Rejects what [`BatchNorm::forward_eval`] rejects and a mask
    /// of another shape, dtype or device.
    pub fn forward_eval_masked(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        check_input(x, self.num_features)?;
        self.eval_pass(x, Some(&Mask::new(mask, x)?))
    }

    /// [`BatchNorm::forward_train_masked`] or [`BatchNorm::forward_eval_masked`] by `train`, as
    /// `forward_t` chooses between the unmasked passes.
    pub fn forward_t_masked(&self, x: &Tensor, mask: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.forward_train_masked(x, mask)
        } else {
            self.forward_eval_masked(x, mask)
        }
    }

    /// Training forward of `relu(bn(x))`: [`BatchNorm::forward_train`] with a ReLU after it, the
    /// running statistics updated as it updates them. On the CPU one fused op each way
    /// ([`batchnorm::batch_norm_train_relu`], and [`batchnorm::batch_norm_backward_relu`] from
    /// the 1-bit mask of the outputs the ReLU kept): the same bits as the kernel crate's
    /// functions. Elsewhere, with [`ComputePath::Composed`], and for a ghost or uncentred
    /// (`remove_mean = false`) layer (which the fused kernels do not cover):
    /// [`BatchNorm::forward_train`] then the ReLU in candle ops.
    ///
    /// relu(t) is t where t is not ≤ 0 (NaN propagates), +0 elsewhere; its gradient is 0 where
    /// t ≤ 0, **exactly 0 included** (PyTorch's convention, on both paths; candle's own
    /// `Tensor::relu` lets the gradient through at 0). Differentiable in x, γ and β. A frozen
    /// layer, and with [`SmallBatch::UseRunningStats`] a batch of fewer than 2 values per
    /// channel, normalizes as [`BatchNorm::forward_eval_relu`] does and updates nothing.
    ///
    /// Rejects what [`BatchNorm::forward_train`] rejects.
    ///
    /// ```
    /// use batchnorm_candle::{batch_norm, BatchNormConfig};
    /// use candle_core::{DType, Device, Tensor, Var};
    /// use candle_nn::VarBuilder;
    /// let dev = Device::Cpu;
    /// let bn = batch_norm(3, BatchNormConfig::default(), VarBuilder::zeros(DType::F32, &dev))?;
    /// let x = Var::from_tensor(&Tensor::randn(0f32, 1., (8, 3, 4, 4), &dev)?)?;
    /// let z = Var::from_tensor(&Tensor::randn(0f32, 1., (8, 3, 4, 4), &dev)?)?; // the residual
    /// let y = bn.forward_train_add_relu(&x, &z)?; // relu(bn(x) + z)
    /// assert!(y.flatten_all()?.to_vec1::<f32>()?.iter().all(|&v| v >= 0.0));
    /// let grads = y.sum_all()?.backward()?;
    /// let dz = grads.get(&z).unwrap(); // 1 where the ReLU kept bn(x) + z, 0 elsewhere
    /// assert_eq!(dz.sum_all()?.to_scalar::<f32>()?, y.gt(0f32)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn forward_train_relu(&self, x: &Tensor) -> Result<Tensor> {
        self.relu_pass(x, None, true)
    }

    /// Training forward of `relu(bn(x) + z)`, z the residual branch (the shape, dtype and device
    /// of x): as [`BatchNorm::forward_train_relu`], z added to batch norm's output before the
    /// ReLU (on the CPU in the same pass, [`batchnorm::batch_norm_train_add_relu`]), and
    /// differentiable in z too (dz = dy where the ReLU kept its input, 0 elsewhere). Rejects what
    /// [`BatchNorm::forward_train`] rejects and a `z` of another shape, dtype or device.
    pub fn forward_train_add_relu(&self, x: &Tensor, z: &Tensor) -> Result<Tensor> {
        self.relu_pass(x, Some(z), true)
    }

    /// Inference forward of `relu(bn(x))` with the running statistics: [`BatchNorm::forward_eval`]
    /// and a ReLU (on the CPU one fused op each way, [`batchnorm::batch_norm_eval_relu`] and
    /// [`batchnorm::batch_norm_backward_eval_relu`]; the ReLU's convention as
    /// [`BatchNorm::forward_train_relu`] states it). Differentiable in x, γ and β. Rejects what
    /// [`BatchNorm::forward_eval`] rejects.
    pub fn forward_eval_relu(&self, x: &Tensor) -> Result<Tensor> {
        self.relu_pass(x, None, false)
    }

    /// Inference forward of `relu(bn(x) + z)` with the running statistics: as
    /// [`BatchNorm::forward_eval_relu`], z added before the ReLU, differentiable in z too.
    /// Rejects what [`BatchNorm::forward_eval`] rejects and a `z` of another shape, dtype or
    /// device.
    pub fn forward_eval_add_relu(&self, x: &Tensor, z: &Tensor) -> Result<Tensor> {
        self.relu_pass(x, Some(z), false)
    }

    /// [`BatchNorm::forward_train_relu`] or [`BatchNorm::forward_eval_relu`] by `train`.
    pub fn forward_t_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.relu_pass(x, None, train)
    }

    /// [`BatchNorm::forward_train_add_relu`] or [`BatchNorm::forward_eval_add_relu`] by `train`.
    pub fn forward_t_add_relu(&self, x: &Tensor, z: &Tensor, train: bool) -> Result<Tensor> {
        self.relu_pass(x, Some(z), train)
    }

    /// The fused forwards: `relu(bn(x) + z)` (`relu(bn(x))` without z), training or inference.
    fn relu_pass(&self, x: &Tensor, z: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let count = check_input(x, self.num_features)?;
        if let Some(z) = z {
            check_residual(z, x)?;
        }
        let fusable = fused(self.compute, x) && self.virtual_batch.is_none() && self.config.remove_mean;
        if !fusable {
            let y = if train {
                self.forward_train(x)?
            } else {
                self.forward_eval(x)?
            };
            return relu::add_relu(&y, z);
        }
        let train = train && !self.uses_running_stats(count);
        if train {
            check_training_count(count, x)?;
        }
        let (eps, params) = (self.config.eps, self.weight_and_bias());
        let mode = match train {
            true => relu::ReluMode::Train,
            false => relu::ReluMode::Eval {
                mean: to_f64_vec(self.running_mean())?,
                var: to_f64_vec(self.running_var())?,
            },
        };
        // x, z (checked to be of x's dtype) and y keep their dtype: the fused op takes them all.
        let (y, stats) = relu::forward(x, z, eps, mode, params)?;
        if let Some(stats) = stats {
            self.track(&[stats])?;
        }
        Ok(y)
    }

    /// candle-nn's `remove_mean = false` training path, op for op (generic candle ops).
    fn forward_train_uncentred(&self, x: &Tensor) -> Result<Tensor> {
        let x_dtype = x.dtype();
        let x = x.to_dtype(internal_dtype(x_dtype))?.transpose(0, 1)?;
        let dims_post_transpose = x.dims().to_vec();
        let x = x.flatten_from(1)?.contiguous()?;
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
        let affine: Affine<f64> = match &wb {
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

/// Writes `f64` values into a per-channel variable, in the variable's dtype and on its device
/// (rounded on the host: not every device holds `f64`).
fn set_var(var: &Var, values: Vec<f64>) -> Result<()> {
    let (n, cpu) = (values.len(), &candle_core::Device::Cpu);
    let t = match var.dtype() {
        DType::F64 => Tensor::from_vec(values, n, cpu)?,
        DType::F32 => Tensor::from_vec(values.into_iter().map(|v| v as f32).collect::<Vec<_>>(), n, cpu)?,
        dtype => Tensor::from_vec(values, n, cpu)?.to_dtype(dtype)?,
    };
    var.set(&t.to_device(var.device())?)
}

/// `ModuleT` for a layer with `forward_train` and `forward_eval` (`train` picks one), and a
/// wrapper type making it an inference-only [`Module`] (a type cannot implement both `Module`
/// and `ModuleT` in candle: `Module` implies a `ModuleT` that ignores `train`).
macro_rules! module_impls {
    ($layer:ident, $(#[$wrapper_doc:meta])* $wrapper:ident) => {
        impl ModuleT for $layer {
            /// `train = true`: the training forward; `false`: the inference forward.
            fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
                if train {
                    self.forward_train(x)
                } else {
                    self.forward_eval(x)
                }
            }
        }

        $(#[$wrapper_doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $wrapper<'a>(pub &'a $layer);

        impl Module for $wrapper<'_> {
            fn forward(&self, x: &Tensor) -> Result<Tensor> {
                self.0.forward_eval(x)
            }
        }
    };
}
pub(crate) use module_impls;

module_impls!(
    BatchNorm,
    /// A [`BatchNorm`] as a [`Module`]: always inference mode. From [`BatchNorm::eval_mode`].
    EvalMode
);
