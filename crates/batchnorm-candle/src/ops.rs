//! candle custom ops over the fused `batchnorm` kernels.
//!
//! - [`ForwardOp`]: the forward (`CustomOp1` on x without affine, `CustomOp3` on (x, γ, β)
//!   with), in one of three modes: a training forward ([`TrainKernel`]: Algorithm 1, masked
//!   batch norm, ghost batch norm or batch renormalization), which keeps the batch statistics for
//!   the running update and the saved statistics for its backward; batch norm's inference
//!   forward with fixed statistics, masked or not (also the frozen and small-batch training
//!   passes); batch renormalization's inference.
//! - [`GradOp`]: the backward of the training modes and of batch norm's inference, one fused
//!   kernel call that writes dx (the op's output, in x's dtype) and dγ, dβ (one `[2·C]` tensor
//!   in the parameters' dtype, left in the op, split afterwards into views without copying).
//!   Batch renormalization's inference, an affine map per channel, is differentiated by candle
//!   ops.
//!
//! The ops take x in f32, f64, f16 or bf16 storage as it is (no upcast copy); γ and β come in
//! the kernels' parameter type ([`Element::Param`]: f32 for f16/bf16 tensors), which
//! [`forward`] converts them to.
//!
//! All inputs are made contiguous before an op is applied; `cpu_fwd` still checks the layout and
//! returns an error (never panics) if it is handed a strided one.

use std::sync::{Arc, OnceLock};

use crate::Params;
use batchnorm::{
    batch_norm_backward, batch_norm_backward_eval, batch_norm_backward_eval_masked, batch_norm_backward_masked,
    batch_norm_eval, batch_norm_eval_masked, batch_norm_train, batch_norm_train_masked, batch_renorm_backward,
    batch_renorm_eval, batch_renorm_train, ghost_batch_norm_backward, ghost_batch_norm_train, Affine, BatchStats,
    Element, FixedStats, GhostSaved, Grads, Layout, RenormClip, RenormSaved, RenormStats, SavedStats, View,
};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Error, Layout as CLayout, Result, Shape, Tensor,
    WithDType,
};

/// Turns a kernel error into a candle error (the message is kept).
pub(crate) fn wrap(e: batchnorm::Error) -> Error {
    Error::Msg(format!("batch-norm: {e}")).bt()
}

/// The contiguous slice of `storage` that `layout` describes.
pub(crate) fn slice<'a, T: WithDType>(storage: &'a CpuStorage, layout: &CLayout, what: &str) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(storage)?;
    match layout.contiguous_offsets() {
        Some((start, end)) => data
            .get(start..end)
            .ok_or_else(|| Error::Msg(format!("batch-norm: `{what}` storage is shorter than its layout"))),
        None => Err(Error::Msg(format!("batch-norm: `{what}` must be contiguous"))),
    }
}

/// A per-channel vector given as `f64` in the op, converted to the element type of the data.
pub(crate) fn cast<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| <T as Element>::from_f64(x)).collect()
}

/// γ and β of an op applied with affine parameters (weight, bias), or none.
fn affine_of<'a, T: Kernel>(
    affine: Option<(&'a CpuStorage, &'a CLayout, &'a CpuStorage, &'a CLayout)>,
) -> Result<Affine<'a, T>> {
    Ok(match affine {
        Some((gs, gl, bs, bl)) => Affine::new(slice::<T::Param>(gs, gl, "weight")?, slice::<T::Param>(bs, bl, "bias")?),
        None => Affine::NONE,
    })
}

/// An element type the ops run the kernels on: a candle dtype whose parameter type
/// ([`Element::Param`]) is one too.
pub(crate) trait Kernel: Element<Param: WithDType> + WithDType {}

impl<T: Element<Param: WithDType> + WithDType> Kernel for T {}

/// Calls `f::<T>` by the storage's dtype, `T` one of `f32`, `f64`, `f16` and `bf16`.
macro_rules! dispatch {
    ($storage:expr, $op:expr, |$t:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            CpuStorage::F16(_) => {
                type $t = batchnorm::f16;
                $body
            }
            CpuStorage::BF16(_) => {
                type $t = batchnorm::bf16;
                $body
            }
            other => Err(Error::Msg(format!(
                "batch-norm ({}): unsupported dtype {:?} (f32, f64, f16 and bf16 are supported)",
                $op,
                other.dtype()
            ))),
        }
    };
}
pub(crate) use dispatch;

/// A mask of masked batch norm as the kernels take it: one `bool` per value of a channel,
/// row-major over `[N, d1, …, dk]`, shared by a forward op and its backward.
pub(crate) type MaskBits = Arc<[bool]>;

/// The backward's inputs a training forward saves: per variant what its backward kernel takes.
#[derive(Clone)]
pub(crate) enum Saved {
    /// Algorithm 1 ([`batch_norm_backward`]).
    Plain(SavedStats),
    /// Masked batch norm over the positions of this mask ([`batch_norm_backward_masked`]).
    Masked(SavedStats, MaskBits),
    /// Ghost batch norm, per group ([`ghost_batch_norm_backward`]).
    Ghost(GhostSaved),
    /// Batch renormalization, with r and d ([`batch_renorm_backward`]).
    Renorm(RenormSaved),
}

/// What a training forward leaves behind: the batch statistics (one per ghost group, in batch
/// order), for the layer's running update, and what its backward needs.
pub(crate) struct Trained {
    pub stats: Vec<BatchStats>,
    pub saved: Saved,
}

/// Where a training op leaves its [`Trained`] (set once, when the op runs).
pub(crate) type TrainState = Arc<OnceLock<Trained>>;

/// Which training kernel a [`ForwardOp`] in [`ForwardMode::Train`] runs.
pub(crate) enum TrainKernel {
    /// Algorithm 1, [`batch_norm_train`].
    Plain,
    /// Masked batch norm over the positions of this mask, [`batch_norm_train_masked`].
    Masked(MaskBits),
    /// Ghost batch norm with this virtual batch size, [`ghost_batch_norm_train`].
    Ghost(usize),
    /// Batch renormalization against these moving statistics (held as `f64`, rounded to the
    /// data's type) with these limits, [`batch_renorm_train`].
    Renorm {
        mean: Vec<f64>,
        std: Vec<f64>,
        clip: RenormClip,
    },
}

/// Which forward kernel a [`ForwardOp`] runs.
pub(crate) enum ForwardMode {
    /// A training forward; the state receives the batch statistics and the saved statistics
    /// for the backward.
    Train(TrainKernel, TrainState),
    /// Inference (or frozen) forward through [`batch_norm_eval`] with fixed statistics (held as
    /// `f64`, rounded to the data's type, which leaves `f32`/`f64` statistics of the same type
    /// unchanged); with a mask, through [`batch_norm_eval_masked`] at its positions.
    Eval {
        mean: Vec<f64>,
        var: Vec<f64>,
        mask: Option<MaskBits>,
    },
    /// Batch renormalization's inference through [`batch_renorm_eval`] with the moving mean and
    /// standard deviation (as `f64`). Its backward is composed of candle ops
    /// ([`renorm_eval_grads`]).
    RenormEval { mean: Vec<f64>, std: Vec<f64> },
}

/// The forward op of every mode: `CustomOp1` on x without affine, `CustomOp3` on (x, γ, β)
/// with.
pub(crate) struct ForwardOp {
    pub eps: f64,
    pub mode: ForwardMode,
}

impl ForwardOp {
    /// Applies the op to the contiguous `x`, with the affine parameters (weight, bias) if given.
    fn apply(self, x: &Tensor, affine: Option<(Tensor, Tensor)>) -> Result<Tensor> {
        match affine {
            Some((w, b)) => x.apply_op3(&w, &b, self),
            None => x.apply_op1(self),
        }
    }

    /// The op's name, as candle reports it.
    fn op_name(&self) -> &'static str {
        match self.mode {
            ForwardMode::Train(TrainKernel::Plain, _) => "batchnorm-train",
            ForwardMode::Train(TrainKernel::Masked(_), _) => "batchnorm-masked-train",
            ForwardMode::Train(TrainKernel::Ghost(_), _) => "batchnorm-ghost-train",
            ForwardMode::Train(TrainKernel::Renorm { .. }, _) => "batchrenorm-train",
            ForwardMode::Eval { mask: None, .. } => "batchnorm-eval",
            ForwardMode::Eval { mask: Some(_), .. } => "batchnorm-masked-eval",
            ForwardMode::RenormEval { .. } => "batchrenorm-eval",
        }
    }

    fn run<T: Kernel>(
        &self,
        xs: &CpuStorage,
        xl: &CLayout,
        affine: Option<(&CpuStorage, &CLayout, &CpuStorage, &CLayout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(xs, xl, "x")?;
        let affine = affine_of::<T>(affine)?;
        let mut y = vec![T::default(); x.len()];
        let x = View::new(x, xl.shape().dims(), Layout::ChannelsFirst);
        let eps = self.eps;
        match &self.mode {
            ForwardMode::Train(kernel, state) => {
                let trained = match kernel {
                    TrainKernel::Plain => {
                        let (stats, saved) = batch_norm_train(x, affine, eps, &mut y).map_err(wrap)?;
                        Trained {
                            stats: vec![stats],
                            saved: Saved::Plain(saved),
                        }
                    }
                    TrainKernel::Masked(mask) => {
                        let (stats, saved) = batch_norm_train_masked(x, mask, affine, eps, &mut y).map_err(wrap)?;
                        Trained {
                            stats: vec![stats],
                            saved: Saved::Masked(saved, mask.clone()),
                        }
                    }
                    TrainKernel::Ghost(v) => {
                        let (stats, saved) = ghost_batch_norm_train(x, *v, affine, eps, &mut y).map_err(wrap)?;
                        Trained {
                            stats,
                            saved: Saved::Ghost(saved),
                        }
                    }
                    TrainKernel::Renorm { mean, std, clip } => {
                        let (mean, std) = (cast::<T::Param>(mean), cast::<T::Param>(std));
                        let moving = RenormStats::new(&mean, &std);
                        let (stats, saved) = batch_renorm_train(x, moving, affine, eps, *clip, &mut y).map_err(wrap)?;
                        Trained {
                            stats: vec![stats],
                            saved: Saved::Renorm(saved),
                        }
                    }
                };
                // A custom op runs once per application; a second value would mean it was re-run.
                state
                    .set(trained)
                    .map_err(|_| Error::Msg("batch-norm: training op applied twice".into()))?;
            }
            ForwardMode::Eval { mean, var, mask } => {
                let (mean, var) = (cast::<T::Param>(mean), cast::<T::Param>(var));
                let stats = FixedStats::new(&mean, &var);
                match mask {
                    Some(mask) => batch_norm_eval_masked(x, mask, stats, affine, eps, &mut y),
                    None => batch_norm_eval(x, stats, affine, eps, &mut y),
                }
                .map_err(wrap)?;
            }
            ForwardMode::RenormEval { mean, std } => {
                let (mean, std) = (cast::<T::Param>(mean), cast::<T::Param>(std));
                batch_renorm_eval(x, RenormStats::new(&mean, &std), affine, &mut y).map_err(wrap)?;
            }
        }
        Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
    }

    /// The backward of this op for the given upstream gradient: the fused backward of the
    /// training modes and of batch norm's inference, candle ops for batch renormalization's
    /// inference.
    fn grads(
        &self,
        x: &Tensor,
        grad: &Tensor,
        gamma: Option<&Tensor>,
        want_dx: bool,
        want_params: bool,
    ) -> Result<TensorGrads> {
        let mode = match &self.mode {
            ForwardMode::Train(_, state) => GradMode::Train(
                state
                    .get()
                    .map(|t| t.saved.clone())
                    .ok_or_else(|| Error::Msg("batch-norm: backward before forward".into()))?,
            ),
            ForwardMode::Eval { mean, var, mask } => GradMode::Eval {
                mean: mean.clone(),
                var: var.clone(),
                eps: self.eps,
                mask: mask.clone(),
            },
            ForwardMode::RenormEval { mean, std } => {
                return renorm_eval_grads(x, grad, gamma, mean, std, want_dx, want_params)
            }
        };
        GradOp {
            mode,
            want_dx,
            want_params,
            params: OnceLock::new(),
        }
        .apply(x, grad, gamma)
    }
}

/// Runs the fused op of `mode` on `x` (f32, f64, f16 or bf16, any layout) with γ and β if
/// given (converted to the kernels' parameter type for `x`, [`param_dtype`]; the conversion's
/// backward returns dγ, dβ in the parameters' own dtype).
pub(crate) fn forward(x: &Tensor, eps: f64, mode: ForwardMode, params: Params) -> Result<Tensor> {
    let dtype = param_dtype(x.dtype());
    let affine = params
        .map(|(w, b)| Ok::<_, Error>((w.to_dtype(dtype)?.contiguous()?, b.to_dtype(dtype)?.contiguous()?)))
        .transpose()?;
    ForwardOp { eps, mode }.apply(&x.contiguous()?, affine)
}

/// Runs a training forward through the fused op, as [`forward`] does: y, and the batch
/// statistics (one per ghost group).
pub(crate) fn train(x: &Tensor, eps: f64, kernel: TrainKernel, params: Params) -> Result<(Tensor, Vec<BatchStats>)> {
    let state = TrainState::default();
    let y = forward(x, eps, ForwardMode::Train(kernel, state.clone()), params)?;
    let stats = state
        .get()
        .map(|t| t.stats.clone())
        .ok_or_else(|| Error::Msg("batch-norm: the training op left no statistics".into()))?;
    Ok((y, stats))
}

/// The backward of batch renormalization's inference y = γ·(x − μ)/σ + β (μ, σ constants), in
/// candle ops: dx = dy·γ/σ, dγ = Σ dy·(x − μ)/σ, dβ = Σ dy (sums over every dimension but the
/// channel one).
fn renorm_eval_grads(
    x: &Tensor,
    grad: &Tensor,
    gamma: Option<&Tensor>,
    mean: &[f64],
    std: &[f64],
    want_dx: bool,
    want_params: bool,
) -> Result<TensorGrads> {
    // Half types are computed in f32 (their sums would lose the half type's few bits), and the
    // results rounded once to the dtypes of x and γ.
    let (dtype, dev) = (crate::internal_dtype(x.dtype()), x.device());
    let (xw, gw) = (x.to_dtype(dtype)?, grad.to_dtype(dtype)?);
    let mut channel_shape = vec![1; x.rank()];
    channel_shape[1] = mean.len();
    let per_channel = |v: &[f64]| Tensor::new(v, dev)?.to_dtype(dtype)?.reshape(channel_shape.as_slice());
    let std = per_channel(std)?;
    let dx = if want_dx {
        let k = match gamma {
            Some(g) => g
                .to_dtype(dtype)?
                .reshape(channel_shape.as_slice())?
                .broadcast_div(&std)?,
            None => std.recip()?,
        };
        Some(gw.broadcast_mul(&k)?.to_dtype(x.dtype())?)
    } else {
        None
    };
    let (dgamma, dbeta) = match gamma {
        Some(g) if want_params => {
            let per_channel_sum = |t: &Tensor| t.transpose(0, 1)?.flatten_from(1)?.sum(1)?.to_dtype(g.dtype());
            let xhat = xw.broadcast_sub(&per_channel(mean)?)?.broadcast_div(&std)?;
            (Some(per_channel_sum(&(&gw * xhat)?)?), Some(per_channel_sum(&gw)?))
        }
        _ => (None, None),
    };
    Ok((dx, dgamma, dbeta))
}

impl CustomOp1 for ForwardOp {
    fn name(&self) -> &'static str {
        self.op_name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &CLayout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, self.op_name(), |T| self.run::<T>(s, l, None))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.grads(x, grad, None, true, false)?.0)
    }
}

impl CustomOp3 for ForwardOp {
    fn name(&self) -> &'static str {
        self.op_name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
        s3: &CpuStorage,
        l3: &CLayout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.op_name(), |T| self.run::<T>(s1, l1, Some((s2, l2, s3, l3))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want_params = gamma.track_op() || beta.track_op();
        self.grads(x, grad, Some(gamma), x.track_op(), want_params)
    }
}

/// Which backward kernel [`GradOp`] runs.
enum GradMode {
    /// Training mode: the variant's backward with the forward's saved statistics.
    Train(Saved),
    /// Inference mode: [`batch_norm_backward_eval`] with fixed statistics; with a mask,
    /// [`batch_norm_backward_eval_masked`].
    Eval {
        mean: Vec<f64>,
        var: Vec<f64>,
        eps: f64,
        mask: Option<MaskBits>,
    },
}

/// The dtype of the per-channel vectors the kernels take with tensors of `dtype` (γ, β, dγ,
/// dβ): [`Element::Param`], f32 for the half types.
pub(crate) fn param_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// The backward of [`ForwardOp`]: `CustomOp2` on (x, dy) without affine, `CustomOp3`
/// on (x, dy, γ) with. Its output is dx (x's dtype; empty when not wanted); dγ and dβ, when
/// wanted, are left in `params` as one `[dγ…, dβ…]` tensor of the parameters' dtype (a custom
/// op has one output storage, of one dtype).
struct GradOp {
    mode: GradMode,
    want_dx: bool,
    want_params: bool,
    params: OnceLock<Tensor>,
}

type TensorGrads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl GradOp {
    /// Runs the fused backward once and splits the packed result into views of one storage.
    fn apply(self, x: &Tensor, grad: &Tensor, gamma: Option<&Tensor>) -> Result<TensorGrads> {
        let (want_dx, want_params) = (self.want_dx, self.want_params && gamma.is_some());
        if !want_dx && !want_params {
            return Ok((None, None, None));
        }
        let grad = grad.contiguous()?;
        let op = GradOp { want_params, ..self };
        let dx = match gamma {
            Some(g) => x.apply_op3_no_bwd(&grad, &g.contiguous()?, &op)?,
            None => x.apply_op2_no_bwd(&grad, &op)?,
        };
        let dx = want_dx.then(|| dx.reshape(x.shape())).transpose()?;
        let (dgamma, dbeta) = match op.params.get() {
            Some(p) if want_params => {
                let c = x.dim(1)?;
                (Some(p.narrow(0, 0, c)?), Some(p.narrow(0, c, c)?))
            }
            _ => (None, None),
        };
        Ok((dx, dgamma, dbeta))
    }

    fn run<T: Kernel>(
        &self,
        xs: &CpuStorage,
        xl: &CLayout,
        dys: &CpuStorage,
        dyl: &CLayout,
        gamma: Option<(&CpuStorage, &CLayout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(xs, xl, "x")?;
        let dy = slice::<T>(dys, dyl, "grad")?;
        let gamma = match gamma {
            Some((gs, gl)) => Some(slice::<T::Param>(gs, gl, "weight")?),
            None => None,
        };
        let shape = xl.shape().dims();
        let c = shape.get(1).copied().unwrap_or(0);
        let want_params = self.want_params && gamma.is_some();
        let n_dx = if self.want_dx { x.len() } else { 0 };
        let n_p = if want_params { c } else { 0 };
        let mut dx = vec![T::default(); n_dx];
        let mut params = vec![T::Param::default(); 2 * n_p];
        let (dgamma, dbeta) = params.split_at_mut(n_p);
        let grads = Grads {
            dx: self.want_dx.then_some(&mut dx),
            dgamma: want_params.then_some(dgamma),
            dbeta: want_params.then_some(dbeta),
        };
        let x = View::new(x, shape, Layout::ChannelsFirst);
        match &self.mode {
            GradMode::Train(Saved::Plain(saved)) => batch_norm_backward(x, dy, saved, gamma, grads),
            GradMode::Train(Saved::Masked(saved, mask)) => batch_norm_backward_masked(x, mask, dy, saved, gamma, grads),
            GradMode::Train(Saved::Ghost(saved)) => ghost_batch_norm_backward(x, dy, saved, gamma, grads),
            GradMode::Train(Saved::Renorm(saved)) => batch_renorm_backward(x, dy, saved, gamma, grads),
            GradMode::Eval { mean, var, eps, mask } => {
                let (mean, var) = (cast::<T::Param>(mean), cast::<T::Param>(var));
                let stats = FixedStats::new(&mean, &var);
                match mask {
                    Some(mask) => batch_norm_backward_eval_masked(x, mask, dy, stats, gamma, *eps, grads),
                    None => batch_norm_backward_eval(x, dy, stats, gamma, *eps, grads),
                }
            }
        }
        .map_err(wrap)?;
        if want_params {
            // A custom op runs once per application; a second value would mean it was re-run.
            self.params
                .set(Tensor::from_vec(params, 2 * c, &Device::Cpu)?)
                .map_err(|_| Error::Msg("batch-norm: backward op applied twice".into()))?;
        }
        Ok((T::to_cpu_storage_owned(dx), Shape::from(n_dx)))
    }
}

impl CustomOp2 for GradOp {
    fn name(&self) -> &'static str {
        "batchnorm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &CLayout, s2: &CpuStorage, l2: &CLayout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, "grad", |T| self.run::<T>(s1, l1, s2, l2, None))
    }
}

impl CustomOp3 for GradOp {
    fn name(&self) -> &'static str {
        "batchnorm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
        s3: &CpuStorage,
        l3: &CLayout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, "grad", |T| self.run::<T>(s1, l1, s2, l2, Some((s3, l3))))
    }
}
