//! Composed candle implementations of every variant: ordinary candle tensor ops, differentiated
//! by candle's autograd. The fallback on devices other than the CPU, where the
//! fused kernels do not run, and with [`crate::ComputePath::Composed`] the path on every device.
//!
//! Each works on the input as a `[C, M]` matrix (the M = N·spatial values of a channel along a
//! row), as candle-nn's `BatchNorm` does, in the compute dtype (`f32` for half types; the caller
//! converts). The batch statistics come back to the host as [`BatchStats`] (C numbers each), so
//! that the running statistics are updated by the kernel crate's functions on either path.

use batchnorm::{BatchStats, RenormClip};
use candle_core::{DType, Result, Tensor};

use crate::{to_f64_vec, Params};

/// A forward's output and the batch statistics behind it.
type WithStats = (Tensor, BatchStats);

/// `x` `[N, C, rest…]` as `[C, M]`.
fn to_cm(x: &Tensor) -> Result<Tensor> {
    x.transpose(0, 1)?.flatten_from(1)?.contiguous()
}

/// A `[C, M]` tensor back in the layout of an input of shape `shape`.
fn from_cm(t: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let mut dims = shape.to_vec();
    dims.swap(0, 1);
    t.reshape(dims)?.transpose(0, 1)
}

/// A per-channel vector `[C]` as a column `[C, 1]` in `dtype`, detached: a constant.
fn constant(v: &Tensor, dtype: DType) -> Result<Tensor> {
    v.detach().to_dtype(dtype)?.reshape(((), 1))
}

/// A per-channel parameter `[C]` as a column `[C, 1]` in `dtype`, differentiable.
fn column(v: &Tensor, dtype: DType) -> Result<Tensor> {
    v.to_dtype(dtype)?.reshape(((), 1))
}

/// γ·x̂ + β on `[C, M]`.
fn affine(xhat: &Tensor, params: Params) -> Result<Tensor> {
    match params {
        None => Ok(xhat.clone()),
        Some((w, b)) => {
            let dtype = xhat.dtype();
            xhat.broadcast_mul(&column(w, dtype)?)?
                .broadcast_add(&column(b, dtype)?)
        }
    }
}

/// The statistics of `count` values per channel given their mean and biased variance (`[C, 1]`
/// columns), on the host in `f64`, with M2 = count·σ²_B.
fn host_stats(count: usize, mean: &Tensor, var: &Tensor) -> Result<BatchStats> {
    let n = count as f64;
    Ok(BatchStats {
        count: count as u64,
        mean: to_f64_vec(mean)?,
        m2: to_f64_vec(var)?.into_iter().map(|v| v * n).collect(),
    })
}

/// x − μ_B, μ_B and the biased σ²_B of a `[C, M]` input (Algorithm 1's first steps).
fn centre(xcm: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let mean = xcm.mean_keepdim(1)?;
    let xc = xcm.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(1)?;
    Ok((xc, mean, var))
}

/// Algorithm 1: y = γ·(x − μ_B)/√(σ²_B + ε) + β, and the batch statistics.
pub(crate) fn train(x: &Tensor, eps: f64, params: Params) -> Result<WithStats> {
    let xcm = to_cm(x)?;
    let (xc, mean, var) = centre(&xcm)?;
    let xhat = xc.broadcast_div(&(&var + eps)?.sqrt()?)?;
    let y = affine(&xhat, params)?;
    Ok((from_cm(&y, x.dims())?, host_stats(xcm.dim(1)?, &mean, &var)?))
}

/// Ghost batch norm: [`train`] on each group of `virtual_batch` consecutive examples (the last
/// one holds the rest), and each group's statistics in batch order. Group sizes checked by the
/// caller.
pub(crate) fn ghost_train(
    x: &Tensor,
    virtual_batch: usize,
    eps: f64,
    params: Params,
) -> Result<(Tensor, Vec<BatchStats>)> {
    let n = x.dim(0)?;
    let (mut ys, mut stats) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(virtual_batch) {
        let (y, s) = train(&x.narrow(0, start, virtual_batch.min(n - start))?, eps, params)?;
        ys.push(y);
        stats.push(s);
    }
    Ok((Tensor::cat(&ys, 0)?, stats))
}

/// Batch renormalization's training forward (Ioffe 2017, Algorithm 1): σ_B = √(σ²_B + ε),
/// r = clip(σ_B/σ, 1/r_max, r_max) and d = clip((μ_B − μ)/σ, −d_max, d_max) detached (constants
/// for the backward), y = γ·((x − μ_B)/σ_B·r + d) + β; and the batch statistics.
pub(crate) fn renorm_train(
    x: &Tensor,
    moving_mean: &Tensor,
    moving_std: &Tensor,
    eps: f64,
    clip: RenormClip,
    params: Params,
) -> Result<WithStats> {
    let xcm = to_cm(x)?;
    let dtype = xcm.dtype();
    let (xc, mean, var) = centre(&xcm)?;
    let sigma_b = (&var + eps)?.sqrt()?;
    let (mu, sigma) = (constant(moving_mean, dtype)?, constant(moving_std, dtype)?);
    let (r_max, d_max) = (clip.r_max(), clip.d_max());
    let r = sigma_b.broadcast_div(&sigma)?.clamp(1.0 / r_max, r_max)?.detach();
    let d = mean
        .broadcast_sub(&mu)?
        .broadcast_div(&sigma)?
        .clamp(-d_max, d_max)?
        .detach();
    let xhat = xc.broadcast_div(&sigma_b)?.broadcast_mul(&r)?.broadcast_add(&d)?;
    let y = affine(&xhat, params)?;
    Ok((from_cm(&y, x.dims())?, host_stats(xcm.dim(1)?, &mean, &var)?))
}

/// A mask broadcast over the channels (`[N, C, …]`, `u8`) as `[C, M]`, with the zeros that
/// masked positions take: `where_cond(on, v, zeros)` selects, so what padding holds (NaN, 1e30)
/// reaches no value and no gradient, as a product with the mask would.
struct Select {
    on: Tensor,
    zeros: Tensor,
}

impl Select {
    fn new(on: &Tensor, xcm: &Tensor) -> Result<Self> {
        Ok(Select {
            on: to_cm(on)?,
            zeros: xcm.zeros_like()?,
        })
    }

    /// `v` at the valid positions, 0 at the others.
    fn keep(&self, v: &Tensor) -> Result<Tensor> {
        self.on.where_cond(v, &self.zeros)
    }
}

/// y = γ·(x − μ)/s + β with fixed per-channel μ and s (constants); with a mask (`[N, C, …]`),
/// at the valid positions only, 0 at the others.
fn fixed(x: &Tensor, mean: &Tensor, std: &Tensor, params: Params, mask: Option<&Tensor>) -> Result<Tensor> {
    let xcm = to_cm(x)?;
    let select = mask.map(|on| Select::new(on, &xcm)).transpose()?;
    let mut xc = xcm.broadcast_sub(mean)?;
    if let Some(s) = &select {
        xc = s.keep(&xc)?;
    }
    let mut y = affine(&xc.broadcast_div(std)?, params)?;
    if let Some(s) = &select {
        y = s.keep(&y)?;
    }
    from_cm(&y, x.dims())
}

/// Inference (and frozen training): y = γ·(x − μ_run)/√(σ²_run + ε) + β, the running
/// statistics constants; with a mask (`[N, C, …]`, `u8`), at the valid positions only, 0 at the
/// others.
pub(crate) fn eval(
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    params: Params,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let std = (constant(var, dtype)? + eps)?.sqrt()?;
    fixed(x, &constant(mean, dtype)?, &std, params, mask)
}

/// Batch renormalization's inference: y = γ·(x − μ)/σ + β, the moving statistics constants.
pub(crate) fn renorm_eval(x: &Tensor, mean: &Tensor, std: &Tensor, params: Params) -> Result<Tensor> {
    let dtype = x.dtype();
    fixed(x, &constant(mean, dtype)?, &constant(std, dtype)?, params, None)
}

/// Masked batch norm's training forward: μ_B and the biased σ²_B of the `count` values per
/// channel at the valid positions of the mask (`[N, C, …]`, `u8`), y = γ·(x − μ_B)/√(σ²_B + ε) + β
/// there and 0 at the others; and the statistics of the valid values.
pub(crate) fn masked_train(x: &Tensor, mask: &Tensor, count: usize, eps: f64, params: Params) -> Result<WithStats> {
    let xcm = to_cm(x)?;
    let select = Select::new(mask, &xcm)?;
    let n = count as f64;
    let mean = (select.keep(&xcm)?.sum_keepdim(1)? / n)?;
    let xc = select.keep(&xcm.broadcast_sub(&mean)?)?;
    let var = (xc.sqr()?.sum_keepdim(1)? / n)?;
    let xhat = xc.broadcast_div(&(&var + eps)?.sqrt()?)?;
    let y = select.keep(&affine(&xhat, params)?)?;
    Ok((from_cm(&y, x.dims())?, host_stats(count, &mean, &var)?))
}
