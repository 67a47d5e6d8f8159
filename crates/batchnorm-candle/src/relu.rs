//! candle custom ops over the kernel crate's fused batch norm + ReLU: `relu(bn(x))` and
//! `relu(bn(x) + z)` in one pass each way ([`batchnorm::batch_norm_train_relu`] and the others),
//! and the composed form (candle's own ops) used where the fused kernels do not run.
//!
//! [`ReluOp`] is the forward: a `CustomOp1` on x, a `CustomOp2` on (x, z) or (x, γβ), a
//! `CustomOp3` on (x, z, γβ), where γβ is γ and β stacked into one `[2, C]` tensor (candle's
//! custom ops take at most three inputs; the stack's backward splits the gradient again). It
//! keeps the ReLU's 1-bit mask (and in training the saved statistics) for [`ReluGradOp`], which
//! writes dx, dz and dγβ packed into one buffer, split afterwards into views without copying.

use std::sync::{Arc, OnceLock};

use batchnorm::{
    batch_norm_backward_add_relu, batch_norm_backward_eval_add_relu, batch_norm_backward_eval_relu,
    batch_norm_backward_relu, batch_norm_eval_add_relu, batch_norm_eval_relu, batch_norm_train_add_relu,
    batch_norm_train_relu, Affine, BatchStats, Element, FixedStats, Grads, Layout, ReluMask, SavedStats, View,
};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Error, Layout as CLayout, Result, Shape, Tensor, WithDType,
};

use crate::ops::{cast, dispatch, slice, wrap};
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

/// What a [`ReluOp`] leaves for its backward and the layer: which outputs the ReLU kept, and in
/// training the batch statistics and the saved statistics.
pub(crate) struct ReluState {
    mask: ReluMask,
    trained: Option<(BatchStats, SavedStats)>,
}

/// The forward op (see the module docs). Inputs in order: x, z when `residual`, γβ when `affine`.
pub(crate) struct ReluOp {
    eps: f64,
    mode: ReluMode,
    residual: bool,
    affine: bool,
    state: Arc<OnceLock<ReluState>>,
}

/// Runs the fused forward of `mode` on `x` (in the compute dtype) with the residual `z` (in the
/// same dtype) and γ, β if given (converted to `x`'s dtype): y, and in training the batch
/// statistics.
pub(crate) fn forward(
    x: &Tensor,
    z: Option<&Tensor>,
    eps: f64,
    mode: ReluMode,
    params: Params,
) -> Result<(Tensor, Option<BatchStats>)> {
    let gb = params
        .map(|(w, b)| Tensor::stack(&[w.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?], 0))
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
    let y = match (z, gb) {
        (None, None) => x.apply_op1(op),
        (Some(z), None) => x.apply_op2(&z, op),
        (None, Some(gb)) => x.apply_op2(&gb, op),
        (Some(z), Some(gb)) => x.apply_op3(&z, &gb, op),
    }?;
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

    /// The forward on the inputs in order (x, z when `residual`, γβ when `affine`).
    fn run<T: Element + WithDType>(&self, inputs: &[(&CpuStorage, &CLayout)]) -> Result<(CpuStorage, Shape)> {
        let (xs, xl) = inputs[0];
        let x = slice::<T>(xs, xl, "x")?;
        let z = match self.residual {
            true => Some(slice::<T>(inputs[1].0, inputs[1].1, "z")?),
            false => None,
        };
        let gb = match self.affine {
            true => Some(slice::<T>(
                inputs[inputs.len() - 1].0,
                inputs[inputs.len() - 1].1,
                "weight",
            )?),
            false => None,
        };
        let affine = match gb {
            Some(gb) => {
                let (g, b) = gb.split_at(gb.len() / 2);
                Affine::new(g, b)
            }
            None => Affine::NONE,
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
                let (mean, var) = (cast::<T>(mean), cast::<T>(var));
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
            .set(ReluState { mask, trained })
            .map_err(|_| Error::Msg("batch-norm: fused ReLU op applied twice".into()))?;
        Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
    }

    fn cpu_fwd(&self, inputs: &[(&CpuStorage, &CLayout)]) -> Result<(CpuStorage, Shape)> {
        dispatch!(inputs[0].0, self.op_name(), |T| self.run::<T>(inputs))
    }

    /// The gradients (dx, dz, dγβ) wanted, from one fused backward call.
    fn grads(&self, x: &Tensor, grad: &Tensor, gb: Option<&Tensor>, want: [bool; 3]) -> Result<TensorGrads> {
        let [want_dx, want_dz, want_params] = [want[0], want[1] && self.residual, want[2] && gb.is_some()];
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
        };
        let grad = grad.contiguous()?;
        let packed = match gb {
            Some(gb) => x.apply_op3_no_bwd(&grad, gb, &op)?,
            None => x.apply_op2_no_bwd(&grad, &op)?,
        };
        let (n, c) = (x.elem_count(), x.dim(1)?);
        let mut at = 0;
        let mut take = |wanted: bool, len: usize| {
            let part = wanted.then(|| packed.narrow(0, at, len));
            at += if wanted { len } else { 0 };
            part.transpose()
        };
        let dx = take(want_dx, n)?.map(|d| d.reshape(x.shape())).transpose()?;
        let dz = take(want_dz, n)?.map(|d| d.reshape(x.shape())).transpose()?;
        let dgb = take(want_params, 2 * c)?.map(|d| d.reshape((2, c))).transpose()?;
        Ok((dx, dz, dgb))
    }
}

/// dx, dz, dγβ (each `None` when not wanted).
type TensorGrads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        self.op_name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &CLayout) -> Result<(CpuStorage, Shape)> {
        ReluOp::cpu_fwd(self, &[(s, l)])
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.grads(x, grad, None, [true, false, false])?.0)
    }
}

impl CustomOp2 for ReluOp {
    fn name(&self) -> &'static str {
        self.op_name()
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &CLayout, s2: &CpuStorage, l2: &CLayout) -> Result<(CpuStorage, Shape)> {
        ReluOp::cpu_fwd(self, &[(s1, l1), (s2, l2)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        second: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let want = [x.track_op(), second.track_op()];
        if self.residual {
            let (dx, dz, _) = self.grads(x, grad, None, [want[0], want[1], false])?;
            Ok((dx, dz))
        } else {
            let (dx, _, dgb) = self.grads(x, grad, Some(second), [want[0], false, want[1]])?;
            Ok((dx, dgb))
        }
    }
}

impl CustomOp3 for ReluOp {
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
        ReluOp::cpu_fwd(self, &[(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        z: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, grad, Some(gb), [x.track_op(), z.track_op(), gb.track_op()])
    }
}

/// The backward of [`ReluOp`]: `CustomOp2` on (x, dy), `CustomOp3` on (x, dy, γβ) (only γ is
/// read). Its output is one flat buffer `[dx, dz, dγ, dβ]`, each part present when wanted.
struct ReluGradOp {
    eps: f64,
    /// The fixed statistics of an inference forward; `None`: training (the saved statistics).
    eval: Option<(Vec<f64>, Vec<f64>)>,
    state: Arc<OnceLock<ReluState>>,
    /// dx, dz, dγ and dβ.
    want: [bool; 3],
}

impl ReluGradOp {
    fn run<T: Element + WithDType>(&self, inputs: &[(&CpuStorage, &CLayout)]) -> Result<(CpuStorage, Shape)> {
        let state = self
            .state
            .get()
            .ok_or_else(|| Error::Msg("batch-norm: backward before forward".into()))?;
        let (xs, xl) = inputs[0];
        let x = slice::<T>(xs, xl, "x")?;
        let dy = slice::<T>(inputs[1].0, inputs[1].1, "grad")?;
        let shape = xl.shape().dims();
        let c = shape[1];
        let gamma = match inputs.get(2) {
            Some(&(gs, gl)) => Some(&slice::<T>(gs, gl, "weight")?[..c]),
            None => None,
        };
        let [want_dx, want_dz, want_params] = self.want;
        let part = |wanted: bool, len: usize| if wanted { len } else { 0 };
        let mut out = vec![T::default(); part(want_dx, x.len()) + part(want_dz, x.len()) + part(want_params, 2 * c)];
        let (dx, rest) = out.split_at_mut(part(want_dx, x.len()));
        let (dz, params) = rest.split_at_mut(part(want_dz, x.len()));
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
                let (mean, var) = (cast::<T>(mean), cast::<T>(var));
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
        let len = out.len();
        Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
    }
}

impl CustomOp2 for ReluGradOp {
    fn name(&self) -> &'static str {
        "batchnorm-relu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &CLayout, s2: &CpuStorage, l2: &CLayout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, "relu-grad", |T| self.run::<T>(&[(s1, l1), (s2, l2)]))
    }
}

impl CustomOp3 for ReluGradOp {
    fn name(&self) -> &'static str {
        "batchnorm-relu-grad"
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
        dispatch!(s1, "relu-grad", |T| self.run::<T>(&[(s1, l1), (s2, l2), (s3, l3)]))
    }
}
