//! candle custom ops over the kernel crate's fused batch norm + ReLU: `relu(bn(x))` and
//! `relu(bn(x) + z)` in one pass each way ([`batchnorm::batch_norm_train_relu`] and the others),
//! and the composed form (candle's own ops) used where the fused kernels do not run.
//!
//! [`ReluOp`] is the forward: a `CustomOp3` on (x, z, γβ), where γβ is γ and β stacked into one
//! `[2, C]` tensor (candle's custom ops take at most three inputs; the stack's backward splits
//! the gradient again), and x itself stands in for z without a residual and for γβ without
//! affine parameters (unread, and given no gradient). It keeps the ReLU's 1-bit mask (and γ, and
//! in training the saved statistics) for [`ReluGradOp`], a `CustomOp2` on (x, dy) that writes
//! dx and dz packed into one buffer (x's dtype) and dγβ into one tensor of the parameters' dtype
//! left in the op, split afterwards into views without copying. x, z and y keep their dtype
//! (f32, f64, f16 or bf16; no upcast copy), γβ is in the kernels' parameter type
//! ([`batchnorm::Element::Param`]).

use std::sync::{Arc, OnceLock};

use batchnorm::{
    batch_norm_backward_add_relu, batch_norm_backward_eval_add_relu, batch_norm_backward_eval_relu,
    batch_norm_backward_relu, batch_norm_eval_add_relu, batch_norm_eval_relu, batch_norm_train_add_relu,
    batch_norm_train_relu, Affine, BatchStats, Element, FixedStats, Grads, Layout, ReluMask, SavedStats, View,
};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Device, Error, Layout as CLayout, Result, Shape, Tensor};

use crate::ops::{cast, dispatch, param_dtype, slice, wrap, Kernel};
use crate::Params;

/// relu(t) with the kernel crate's convention, in candle ops: t where t is not ≤ 0 (NaN
/// propagates), +0 elsewhere, and gradient 0 where t ≤ 0 — exactly 0 included (PyTorch's
/// convention; candle's own `relu` lets the gradient through at 0).
pub(crate) fn relu(t: &Tensor) -> Result<Tensor> {
    t.le(0.0)?.where_cond(&t.zeros_like()?, t)
}

/// The composed form: relu(y + z), or relu(y) without a residual.
pub(crate) fn add_relu(y: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
    match z {
        Some(z) => relu(&(y + z)?),
        None => relu(y),
    }
}

/// Which statistics a [`ReluOp`] normalizes with.
pub(crate) enum ReluMode {
    /// The batch's (Algorithm 1); the op's state receives them and the saved statistics.
    Train,
    /// Fixed statistics (held as `f64`, rounded to the data's type).
    Eval { mean: Vec<f64>, var: Vec<f64> },
}

/// What a [`ReluOp`] leaves for its backward and the layer: which outputs the ReLU kept, γ (as
/// `f64`, which holds the parameter types `f32` and `f64` exactly) when affine, and in training the batch
/// statistics and the saved statistics.
pub(crate) struct ReluState {
    mask: ReluMask,
    gamma: Option<Vec<f64>>,
    trained: Option<(BatchStats, SavedStats)>,
}

/// The forward op (see the module docs): inputs x, z (x without a residual), γβ (x without
/// affine parameters).
pub(crate) struct ReluOp {
    eps: f64,
    mode: ReluMode,
    residual: bool,
    affine: bool,
    state: Arc<OnceLock<ReluState>>,
}

/// Runs the fused forward of `mode` on `x` (f32, f64, f16 or bf16) with the residual `z` (in the
/// same dtype) and γ, β if given (converted to the kernels' parameter type, [`param_dtype`]): y,
/// and in training the batch statistics.
pub(crate) fn forward(
    x: &Tensor,
    z: Option<&Tensor>,
    eps: f64,
    mode: ReluMode,
    params: Params,
) -> Result<(Tensor, Option<BatchStats>)> {
    let dtype = param_dtype(x.dtype());
    let gb = params
        .map(|(w, b)| Tensor::stack(&[w.to_dtype(dtype)?, b.to_dtype(dtype)?], 0))
        .transpose()?;
    let op = ReluOp {
        eps,
        mode,
        residual: z.is_some(),
        affine: gb.is_some(),
        state: Arc::default(),
    };
    let state = op.state.clone();
    let x = x.contiguous()?;
    let z = z.map(Tensor::contiguous).transpose()?;
    let y = x.apply_op3(z.as_ref().unwrap_or(&x), gb.as_ref().unwrap_or(&x), op)?;
    let stats = state
        .get()
        .and_then(|s| s.trained.as_ref())
        .map(|(stats, _)| stats.clone());
    Ok((y, stats))
}

impl ReluOp {
    fn op_name(&self) -> &'static str {
        match (&self.mode, self.residual) {
            (ReluMode::Train, false) => "batchnorm-relu-train",
            (ReluMode::Train, true) => "batchnorm-add-relu-train",
            (ReluMode::Eval { .. }, false) => "batchnorm-relu-eval",
            (ReluMode::Eval { .. }, true) => "batchnorm-add-relu-eval",
        }
    }

    /// The forward on the inputs x, z, γβ (those not used are x again, unread).
    fn run<T: Kernel>(&self, inputs: [(&CpuStorage, &CLayout); 3]) -> Result<(CpuStorage, Shape)> {
        let [(xs, xl), (zs, zl), (gbs, gbl)] = inputs;
        let x = slice::<T>(xs, xl, "x")?;
        let z = self.residual.then(|| slice::<T>(zs, zl, "z")).transpose()?;
        let gb = self.affine.then(|| slice::<T::Param>(gbs, gbl, "weight")).transpose()?;
        let (affine, gamma) = match gb {
            Some(gb) => {
                let (g, b) = gb.split_at(gb.len() / 2);
                (Affine::new(g, b), Some(g.iter().map(|&v| Element::to_f64(v)).collect()))
            }
            None => (Affine::NONE, None),
        };
        let (mut y, mut mask) = (vec![T::default(); x.len()], ReluMask::new());
        let x = View::new(x, xl.shape().dims(), Layout::ChannelsFirst);
        let eps = self.eps;
        let trained = match &self.mode {
            ReluMode::Train => Some(
                match z {
                    Some(z) => batch_norm_train_add_relu(x, z, affine, eps, &mut y, &mut mask),
                    None => batch_norm_train_relu(x, affine, eps, &mut y, &mut mask),
                }
                .map_err(wrap)?,
            ),
            ReluMode::Eval { mean, var } => {
                let (mean, var) = (cast::<T::Param>(mean), cast::<T::Param>(var));
                let stats = FixedStats::new(&mean, &var);
                match z {
                    Some(z) => batch_norm_eval_add_relu(x, z, stats, affine, eps, &mut y, Some(&mut mask)),
                    None => batch_norm_eval_relu(x, stats, affine, eps, &mut y, Some(&mut mask)),
                }
                .map_err(wrap)?;
                None
            }
        };
        // A custom op runs once per application; a second value would mean it was re-run.
        self.state
            .set(ReluState { mask, gamma, trained })
            .map_err(|_| Error::Msg("batch-norm: fused ReLU op applied twice".into()))?;
        Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
    }

    /// The gradients (dx, dz, dγβ) wanted, from one fused backward call.
    fn grads(&self, x: &Tensor, grad: &Tensor, want: [bool; 3]) -> Result<TensorGrads> {
        let [want_dx, want_dz, want_params] = [want[0], want[1] && self.residual, want[2] && self.affine];
        if !want_dx && !want_dz && !want_params {
            return Ok((None, None, None));
        }
        let op = ReluGradOp {
            eps: self.eps,
            eval: match &self.mode {
                ReluMode::Train => None,
                ReluMode::Eval { mean, var } => Some((mean.clone(), var.clone())),
            },
            state: self.state.clone(),
            want: [want_dx, want_dz, want_params],
            params: OnceLock::new(),
        };
        let packed = x.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let (n, c) = (x.elem_count(), x.dim(1)?);
        let mut at = 0;
        let mut take = |wanted: bool, len: usize| {
            let part = wanted.then(|| packed.narrow(0, at, len));
            at += if wanted { len } else { 0 };
            part.transpose()
        };
        let dx = take(want_dx, n)?.map(|d| d.reshape(x.shape())).transpose()?;
        let dz = take(want_dz, n)?.map(|d| d.reshape(x.shape())).transpose()?;
        let dgb = match op.params.get() {
            Some(p) if want_params => Some(p.reshape((2, c))?),
            _ => None,
        };
        Ok((dx, dz, dgb))
    }
}

/// dx, dz, dγβ (each `None` when not wanted).
type TensorGrads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl CustomOp3 for ReluOp {
    fn name(&self) -> &'static str {
        self.op_name()
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &CLayout,
        zs: &CpuStorage,
        zl: &CLayout,
        gbs: &CpuStorage,
        gbl: &CLayout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(xs, self.op_name(), |T| self.run::<T>([(xs, xl), (zs, zl), (gbs, gbl)]))
    }

    fn bwd(&self, x: &Tensor, z: &Tensor, gb: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<TensorGrads> {
        self.grads(x, grad, [x.track_op(), z.track_op(), gb.track_op()])
    }
}

/// The backward of [`ReluOp`]: `CustomOp2` on (x, dy), γ from the forward's state. Its output is
/// one flat buffer `[dx, dz]` (x's dtype), each part present when wanted; dγ and dβ, when wanted,
/// are left in `params` as one `[dγ…, dβ…]` tensor of the parameters' dtype.
struct ReluGradOp {
    eps: f64,
    /// The fixed statistics of an inference forward; `None`: training (the saved statistics).
    eval: Option<(Vec<f64>, Vec<f64>)>,
    state: Arc<OnceLock<ReluState>>,
    /// dx, dz, dγ and dβ.
    want: [bool; 3],
    /// dγ and dβ, once the op ran with them wanted.
    params: OnceLock<Tensor>,
}

impl ReluGradOp {
    fn run<T: Kernel>(
        &self,
        (xs, xl): (&CpuStorage, &CLayout),
        (dys, dyl): (&CpuStorage, &CLayout),
    ) -> Result<(CpuStorage, Shape)> {
        let state = self
            .state
            .get()
            .ok_or_else(|| Error::Msg("batch-norm: backward before forward".into()))?;
        let x = slice::<T>(xs, xl, "x")?;
        let dy = slice::<T>(dys, dyl, "grad")?;
        let shape = xl.shape().dims();
        let c = shape[1];
        let gamma = state.gamma.as_deref().map(cast::<T::Param>);
        let gamma = gamma.as_deref();
        let [want_dx, want_dz, want_params] = self.want;
        let part = |wanted: bool, len: usize| if wanted { len } else { 0 };
        let mut out = vec![T::default(); part(want_dx, x.len()) + part(want_dz, x.len())];
        let (dx, dz) = out.split_at_mut(part(want_dx, x.len()));
        let mut params = vec![T::Param::default(); part(want_params, 2 * c)];
        let (dgamma, dbeta) = params.split_at_mut(part(want_params, c));
        let grads = Grads {
            dx: want_dx.then_some(dx),
            dgamma: want_params.then_some(dgamma),
            dbeta: want_params.then_some(dbeta),
        };
        let (x, mask) = (View::new(x, shape, Layout::ChannelsFirst), &state.mask);
        // Without dz wanted, the ReLU alone's backward: the mask is the same, dz is not written.
        match (&self.eval, &state.trained) {
            (Some((mean, var)), _) => {
                let (mean, var) = (cast::<T::Param>(mean), cast::<T::Param>(var));
                let stats = FixedStats::new(&mean, &var);
                match want_dz {
                    true => batch_norm_backward_eval_add_relu(x, dy, mask, stats, gamma, self.eps, grads, dz),
                    false => batch_norm_backward_eval_relu(x, dy, mask, stats, gamma, self.eps, grads),
                }
            }
            (None, Some((_, saved))) => match want_dz {
                true => batch_norm_backward_add_relu(x, dy, mask, saved, gamma, grads, dz),
                false => batch_norm_backward_relu(x, dy, mask, saved, gamma, grads),
            },
            (None, None) => {
                return Err(Error::Msg(
                    "batch-norm: training backward without saved statistics".into(),
                ))
            }
        }
        .map_err(wrap)?;
        if want_params {
            // A custom op runs once per application; a second value would mean it was re-run.
            self.params
                .set(Tensor::from_vec(params, 2 * c, &Device::Cpu)?)
                .map_err(|_| Error::Msg("batch-norm: fused ReLU backward applied twice".into()))?;
        }
        let len = out.len();
        Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
    }
}

impl CustomOp2 for ReluGradOp {
    fn name(&self) -> &'static str {
        "batchnorm-relu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &CLayout, s2: &CpuStorage, l2: &CLayout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, "relu-grad", |T| self.run::<T>((s1, l1), (s2, l2)))
    }
}
