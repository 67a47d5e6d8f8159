//! candle custom ops over the fused `batchnorm` kernels.
//!
//! - [`TrainOp`]: Algorithm 1 forward (`CustomOp1` on x without affine, `CustomOp3` on
//!   (x, γ, β) with). It keeps the batch statistics for the running/population update and the
//!   saved statistics for its backward.
//! - [`EvalOp`]: inference forward with fixed statistics (same two arities).
//! - [`GradOp`]: the backward of either, one fused kernel call that writes dx, dγ and dβ into one
//!   packed buffer `[dx…, dγ…, dβ…]`, split afterwards into views without copying.
//!
//! All inputs are made contiguous before an op is applied; `cpu_fwd` still checks the layout and
//! returns an error (never panics) if it is handed a strided one.

use std::sync::{Arc, OnceLock};

use batchnorm::{
    batch_norm_backward, batch_norm_backward_eval, batch_norm_eval, batch_norm_train, Affine, BatchStats, Element,
    FixedStats, Grads, Layout, SavedStats, View,
};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Error, Layout as CLayout, Result, Shape, Tensor, WithDType,
};

/// Turns a kernel error into a candle error (the message is kept).
pub(crate) fn wrap(e: batchnorm::Error) -> Error {
    Error::Msg(format!("batch-norm: {e}")).bt()
}

/// The contiguous slice of `storage` that `layout` describes.
fn slice<'a, T: WithDType>(storage: &'a CpuStorage, layout: &CLayout, what: &str) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(storage)?;
    match layout.contiguous_offsets() {
        Some((start, end)) => data
            .get(start..end)
            .ok_or_else(|| Error::Msg(format!("batch-norm: `{what}` storage is shorter than its layout"))),
        None => Err(Error::Msg(format!("batch-norm: `{what}` must be contiguous"))),
    }
}

/// A per-channel vector given as `f64` in the op, converted to the element type of the data.
fn cast<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| <T as Element>::from_f64(x)).collect()
}

/// γ and β of an op applied with affine parameters (weight, bias), or none.
fn affine_of<'a, T: WithDType>(
    affine: Option<(&'a CpuStorage, &'a CLayout, &'a CpuStorage, &'a CLayout)>,
) -> Result<Affine<'a, T>> {
    Ok(match affine {
        Some((gs, gl, bs, bl)) => Affine::new(slice::<T>(gs, gl, "weight")?, slice::<T>(bs, bl, "bias")?),
        None => Affine::NONE,
    })
}

/// Calls `f::<f32>` or `f::<f64>` by the storage's dtype.
macro_rules! dispatch {
    ($storage:expr, $op:literal, |$t:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => Err(Error::Msg(format!(
                "batch-norm ({}): unsupported dtype {:?} (f32 and f64 are supported; f16/bf16 go through f32)",
                $op,
                other.dtype()
            ))),
        }
    };
}

/// What the training forward leaves behind: the batch statistics and what backward needs.
pub(crate) type TrainState = Arc<OnceLock<(BatchStats, SavedStats)>>;

/// Algorithm 1 forward through [`batch_norm_train`].
pub(crate) struct TrainOp {
    pub eps: f64,
    pub state: TrainState,
}

impl TrainOp {
    fn run<T: Element + WithDType>(
        &self,
        xs: &CpuStorage,
        xl: &CLayout,
        affine: Option<(&CpuStorage, &CLayout, &CpuStorage, &CLayout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(xs, xl, "x")?;
        let affine = affine_of::<T>(affine)?;
        let mut y = vec![T::default(); x.len()];
        let x = View::new(x, xl.shape().dims(), Layout::ChannelsFirst);
        let out = batch_norm_train(x, affine, self.eps, &mut y).map_err(wrap)?;
        // A custom op runs once per application; a second value would mean it was re-run.
        self.state
            .set(out)
            .map_err(|_| Error::Msg("batch-norm: training op applied twice".into()))?;
        Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
    }

    fn saved(&self) -> Result<&SavedStats> {
        self.state
            .get()
            .map(|(_, saved)| saved)
            .ok_or_else(|| Error::Msg("batch-norm: backward before forward".into()))
    }
}

impl CustomOp1 for TrainOp {
    fn name(&self) -> &'static str {
        "batchnorm-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &CLayout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, "train", |T| self.run::<T>(s, l, None))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = GradOp {
            mode: GradMode::Train(self.saved()?.clone()),
            want_dx: true,
            want_params: false,
        };
        let grads = op.apply(x, grad, None)?;
        Ok(grads.0)
    }
}

impl CustomOp3 for TrainOp {
    fn name(&self) -> &'static str {
        "batchnorm-train"
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
        dispatch!(s1, "train", |T| self.run::<T>(s1, l1, Some((s2, l2, s3, l3))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = GradOp {
            mode: GradMode::Train(self.saved()?.clone()),
            want_dx: x.track_op(),
            want_params: gamma.track_op() || beta.track_op(),
        };
        op.apply(x, grad, Some(gamma))
    }
}

/// Inference forward through [`batch_norm_eval`] with fixed statistics (held as `f64`, rounded
/// to the data's type, which leaves `f32`/`f64` statistics of the same type unchanged).
pub(crate) struct EvalOp {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub eps: f64,
}

impl EvalOp {
    fn run<T: Element + WithDType>(
        &self,
        xs: &CpuStorage,
        xl: &CLayout,
        affine: Option<(&CpuStorage, &CLayout, &CpuStorage, &CLayout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(xs, xl, "x")?;
        let affine = affine_of::<T>(affine)?;
        let (mean, var) = (cast::<T>(&self.mean), cast::<T>(&self.var));
        let mut y = vec![T::default(); x.len()];
        let x = View::new(x, xl.shape().dims(), Layout::ChannelsFirst);
        batch_norm_eval(x, FixedStats::new(&mean, &var), affine, self.eps, &mut y).map_err(wrap)?;
        Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
    }

    fn grad_op(&self, want_dx: bool, want_params: bool) -> GradOp {
        GradOp {
            mode: GradMode::Eval {
                mean: self.mean.clone(),
                var: self.var.clone(),
                eps: self.eps,
            },
            want_dx,
            want_params,
        }
    }
}

impl CustomOp1 for EvalOp {
    fn name(&self) -> &'static str {
        "batchnorm-eval"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &CLayout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, "eval", |T| self.run::<T>(s, l, None))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.grad_op(true, false).apply(x, grad, None)?.0)
    }
}

impl CustomOp3 for EvalOp {
    fn name(&self) -> &'static str {
        "batchnorm-eval"
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
        dispatch!(s1, "eval", |T| self.run::<T>(s1, l1, Some((s2, l2, s3, l3))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grad_op(x.track_op(), gamma.track_op() || beta.track_op())
            .apply(x, grad, Some(gamma))
    }
}

/// Which backward kernel [`GradOp`] runs.
enum GradMode {
    /// Training mode: [`batch_norm_backward`] with the forward's saved statistics.
    Train(SavedStats),
    /// Inference mode: [`batch_norm_backward_eval`] with fixed statistics.
    Eval { mean: Vec<f64>, var: Vec<f64>, eps: f64 },
}

/// The backward of [`TrainOp`]/[`EvalOp`]: `CustomOp2` on (x, dy) without affine, `CustomOp3`
/// on (x, dy, γ) with. Its output is one flat buffer `[dx (if wanted), dγ, dβ (if wanted)]`.
struct GradOp {
    mode: GradMode,
    want_dx: bool,
    want_params: bool,
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
        let packed = match gamma {
            Some(g) => x.apply_op3_no_bwd(&grad, &g.contiguous()?, &GradOp { want_params, ..self })?,
            None => x.apply_op2_no_bwd(&grad, &self)?,
        };
        let (n, c) = (x.elem_count(), x.dim(1)?);
        let mut at = 0;
        let dx = if want_dx {
            at = n;
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?)
        } else {
            None
        };
        let (dgamma, dbeta) = if want_params {
            (Some(packed.narrow(0, at, c)?), Some(packed.narrow(0, at + c, c)?))
        } else {
            (None, None)
        };
        Ok((dx, dgamma, dbeta))
    }

    fn run<T: Element + WithDType>(
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
            Some((gs, gl)) => Some(slice::<T>(gs, gl, "weight")?),
            None => None,
        };
        let shape = xl.shape().dims();
        let c = shape.get(1).copied().unwrap_or(0);
        let want_params = self.want_params && gamma.is_some();
        let n_dx = if self.want_dx { x.len() } else { 0 };
        let n_p = if want_params { c } else { 0 };
        let mut out = vec![T::default(); n_dx + 2 * n_p];
        let (dx, params) = out.split_at_mut(n_dx);
        let (dgamma, dbeta) = params.split_at_mut(n_p);
        let grads = Grads {
            dx: self.want_dx.then_some(dx),
            dgamma: want_params.then_some(dgamma),
            dbeta: want_params.then_some(dbeta),
        };
        let x = View::new(x, shape, Layout::ChannelsFirst);
        match &self.mode {
            GradMode::Train(saved) => batch_norm_backward(x, dy, saved, gamma, grads),
            GradMode::Eval { mean, var, eps } => {
                let (mean, var) = (cast::<T>(mean), cast::<T>(var));
                batch_norm_backward_eval(x, dy, FixedStats::new(&mean, &var), gamma, *eps, grads)
            }
        }
        .map_err(wrap)?;
        let len = out.len();
        Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
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
