//! The fused ops `relu(bn(x))` and `relu(bn(x) + z)` through candle (`BatchNorm::forward_t_relu`,
//! `forward_t_add_relu`): against candle-nn's composed expression `relu(bn(x) + z)` (values,
//! gradients to x, z, γ, β through `backward()`, running statistics) on both compute paths; on
//! the fused path bit for bit against the kernel crate's fused functions; the ReLU's kink at
//! exactly 0 (gradient 0 there, PyTorch's convention, on both paths); ghost and uncentred layers
//! composed of their own forward; a residual of another shape or dtype rejected. NC, NCL and NCHW (the crate takes channels second only), f32 and f64.

use crate::common::{
    assert_bits, assert_close, assert_outputs_bits, for_cases, forward_backward2, pair, paths, running, scaled_err,
    tensor, tol_composed, tol_fused, vecs, OUTPUTS,
};
use batchnorm::{
    batch_norm_backward_add_relu, batch_norm_backward_eval_add_relu, batch_norm_backward_eval_relu,
    batch_norm_backward_relu, batch_norm_eval_add_relu, batch_norm_eval_relu, batch_norm_train_add_relu,
    batch_norm_train_relu, update_running_stats, Affine, FixedStats, Grads, Layout, Momentum, ReluMask, View,
};
use batchnorm_candle::{BatchNorm, BatchNormConfig, ComputePath};
use candle_core::{DType, Device, ModuleT, Result, Tensor, Var, WithDType};

/// NC, NCL and NCHW inputs.
const SHAPES: [&[usize]; 3] = [&[16, 5], &[8, 4, 7], &[4, 3, 5, 6]];

/// Our fused op: `relu(bn(x) + z)` with a residual, `relu(bn(x))` without, in training or
/// inference.
fn ours(bn: &BatchNorm, x: &Tensor, z: Option<&Tensor>, train: bool) -> Result<Tensor> {
    match z {
        Some(z) => bn.forward_t_add_relu(x, z, train),
        None => bn.forward_t_relu(x, train),
    }
}

/// [y, dx, dγ, dβ] and dz with a residual, of our fused op on `bn` (Σ y·w backpropagated).
fn run_ours(bn: &BatchNorm, x: &Tensor, z: Option<&Tensor>, w: &Tensor, train: bool) -> Result<Vec<Tensor>> {
    forward_backward2(|x, z| ours(bn, x, z, train), bn.weight_and_bias(), x, z, w)
}

/// Equation: y = relu(BN(x) + z) (relu(BN(x)) without z), composed of candle-nn's `BatchNorm`,
/// `+` and `Tensor::relu`, differentiated by candle's autograd; our fused op on both compute
/// paths within the sum of the two paths' tolerances for sums over the values of a channel
/// (`common`'s derivation; candle-nn sums in the compute type), over three training steps
/// (running statistics compared after each) and an inference pass. The data (x in [2, 5), z in
/// [−1, 1)) hold no ReLU input within rounding of 0, where candle's `relu` and ours differ only
/// by the convention at the kink (tested below).
#[test]
fn fused_relu_ops_match_candle_nn_composed_expression() -> Result<()> {
    for_cases(&SHAPES, 9100, |dtype, shape, seed| {
        let m = shape.iter().product::<usize>() / shape[1];
        let tol = tol_fused(dtype, m) + tol_composed(dtype, m);
        for residual in [false, true] {
            let p = pair(shape[1], dtype, BatchNormConfig::default(), seed)?;
            let (fused, composed) = paths(shape[1], dtype, BatchNormConfig::default(), seed, Ok)?;
            for step in 0..4 {
                let train = step < 3;
                let x = tensor(seed + 10 + step, shape, 2.0, 5.0, dtype)?;
                let z = tensor(seed + 20 + step, shape, -1.0, 1.0, dtype)?;
                let w = tensor(seed + 30 + step, shape, -1.0, 1.0, dtype)?;
                let z = residual.then_some(&z);
                let theirs = |x: &Tensor, z: Option<&Tensor>| {
                    let y = p.theirs.forward_t(x, train)?;
                    match z {
                        Some(z) => (y + z)?.relu(),
                        None => y.relu(),
                    }
                };
                let want = forward_backward2(theirs, p.theirs.weight_and_bias(), &x, z, &w)?;
                for (path, bn) in [("fused", &fused), ("composed", &composed)] {
                    let got = run_ours(bn, &x, z, &w, train)?;
                    assert_eq!(got.len(), want.len());
                    let what = format!("{shape:?} {dtype:?} residual={residual} step {step} {path}");
                    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert_close(&format!("{what} {}", OUTPUTS[k]), a, b, tol);
                    }
                    for (k, (a, b)) in running(bn)
                        .iter()
                        .zip([p.theirs.running_mean(), p.theirs.running_var()])
                        .enumerate()
                    {
                        assert_close(&format!("{what} statistic {k}"), a, b, tol);
                    }
                }
            }
        }
        Ok(())
    })
}

/// One step of the kernel crate's fused functions on `x` with the residual `z` (if given) and
/// upstream gradient `w`: the training forward and backward (updating `mean`, `var` with
/// momentum 0.1) or, with `train` false, the inference ones with `mean`, `var`: [y, dx, dγ, dβ]
/// and dz with a residual.
#[allow(clippy::too_many_arguments)]
fn kernel_step<T: batchnorm::Element<Param = T> + WithDType>(
    x: &Tensor,
    z: Option<&Tensor>,
    w: &Tensor,
    gamma: &[T],
    beta: &[T],
    mean: &mut [T],
    var: &mut [T],
    train: bool,
) -> Result<Vec<Tensor>> {
    let (shape, dev) = (x.dims(), x.device());
    let (n, c) = (x.elem_count(), shape[1]);
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
    let (xs, dy) = (flat(x)?, flat(w)?);
    let zs = z.map(flat).transpose()?;
    let (mut y, mut dx, mut dz) = (vec![T::default(); n], vec![T::default(); n], vec![T::default(); n]);
    let (mut dgamma, mut dbeta) = (vec![T::default(); c], vec![T::default(); c]);
    let grads = Grads::new(&mut dx, &mut dgamma, &mut dbeta);
    let (xv, affine, mut mask) = (
        View::new(&xs, shape, Layout::ChannelsFirst),
        Affine::new(gamma, beta),
        ReluMask::new(),
    );
    let g = Some(gamma);
    if train {
        let (batch, saved) = match &zs {
            Some(zs) => batch_norm_train_add_relu(xv, zs, affine, 1e-5, &mut y, &mut mask),
            None => batch_norm_train_relu(xv, affine, 1e-5, &mut y, &mut mask),
        }
        .unwrap();
        match &zs {
            Some(_) => batch_norm_backward_add_relu(xv, &dy, &mask, &saved, g, grads, &mut dz),
            None => batch_norm_backward_relu(xv, &dy, &mask, &saved, g, grads),
        }
        .unwrap();
        update_running_stats(&batch, Momentum::Exponential(0.1), 1, mean, var).unwrap();
    } else {
        let fixed = FixedStats::new(mean, var);
        match &zs {
            Some(zs) => batch_norm_eval_add_relu(xv, zs, fixed, affine, 1e-5, &mut y, Some(&mut mask)),
            None => batch_norm_eval_relu(xv, fixed, affine, 1e-5, &mut y, Some(&mut mask)),
        }
        .unwrap();
        match &zs {
            Some(_) => batch_norm_backward_eval_add_relu(xv, &dy, &mask, fixed, g, 1e-5, grads, &mut dz),
            None => batch_norm_backward_eval_relu(xv, &dy, &mask, fixed, g, 1e-5, grads),
        }
        .unwrap();
    }
    let mut out = vec![
        Tensor::from_vec(y, shape, dev)?,
        Tensor::from_vec(dx, shape, dev)?,
        Tensor::from_vec(dgamma, c, dev)?,
        Tensor::from_vec(dbeta, c, dev)?,
    ];
    if z.is_some() {
        out.push(Tensor::from_vec(dz, shape, dev)?);
    }
    Ok(out)
}

/// The fused path is the kernel crate's fused functions: three training steps against
/// `batch_norm_train_relu` / `batch_norm_train_add_relu`, their backward from the 1-bit mask and
/// `update_running_stats`, then the inference pass and a frozen layer's training pass against
/// `batch_norm_eval_relu` / `batch_norm_eval_add_relu` and their backward: y, dx, dγ, dβ, dz and
/// the running statistics bit for bit (x in [−1, 3), so that the ReLU drops a share of every
/// channel, z in [−1, 1)).
#[test]
fn fused_relu_path_is_the_kernel_bit_for_bit() -> Result<()> {
    fused_matches_the_kernel::<f32>().and_then(|()| fused_matches_the_kernel::<f64>())
}

/// [`fused_relu_path_is_the_kernel_bit_for_bit`] in one element type.
fn fused_matches_the_kernel<T: batchnorm::Element<Param = T> + WithDType>() -> Result<()> {
    for (i, shape) in SHAPES.into_iter().enumerate() {
        for residual in [false, true] {
            let seed = 9300 + 10 * i as u64;
            let bn = pair(shape[1], T::DTYPE, BatchNormConfig::default(), seed)?.ours;
            let (gamma, beta) = bn.weight_and_bias().unwrap();
            let [gamma, beta, mut mean, mut var] = vecs([gamma, beta, bn.running_mean(), bn.running_var()])?;
            for step in 0..5 {
                let (train, frozen) = (step < 3, step == 4);
                bn.set_frozen(frozen);
                let x = tensor(seed + 1 + step, shape, -1.0, 3.0, T::DTYPE)?;
                let z = tensor(seed + 2 + step, shape, -1.0, 1.0, T::DTYPE)?;
                let w = tensor(seed + 3 + step, shape, -1.0, 1.0, T::DTYPE)?;
                let z = residual.then_some(&z);
                let got = run_ours(&bn, &x, z, &w, train || frozen)?;
                let want = kernel_step::<T>(&x, z, &w, &gamma, &beta, &mut mean, &mut var, train)?;
                let what = format!(
                    "{shape:?} {:?} residual={residual} step {step} frozen={frozen}",
                    T::DTYPE
                );
                assert_outputs_bits(&what, &got, &want);
                for (k, (a, b)) in running(&bn).into_iter().zip([&mean, &var]).enumerate() {
                    assert_bits(
                        &format!("{what} statistic {k}"),
                        a,
                        &Tensor::new(b.as_slice(), &Device::Cpu)?,
                    );
                }
            }
        }
    }
    Ok(())
}

/// Equation: d relu(t)/dt = 0 at t = 0 (PyTorch's convention; candle's `relu` has 1 there). With
/// γ = 0 every ReLU input is β_c (+ z): β = (0, 1, −1) puts channel 0 exactly on the kink,
/// channel 1 above it and channel 2 below; with z = 0 too the residual changes nothing. Then on
/// both paths, in training and inference: y = relu(β_c), dβ = (0, Σ dy over channel 1, 0),
/// dγ = 0 (channel 1: Σ dy·x̂ with γ = 0 is not 0 in general, so only channels 0 and 2 are
/// checked), dx = 0 (γ = 0), and dz = dy on channel 1, 0 elsewhere.
#[test]
fn relu_gradient_is_zero_at_the_kink() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64] {
        for path in [ComputePath::Auto, ComputePath::Composed] {
            for (train, residual) in [(true, false), (true, true), (false, false), (false, true)] {
                let shape = [4, 3, 2, 3];
                let beta = Tensor::new(&[0.0, 1.0, -1.0], &dev)?.to_dtype(dtype)?;
                let (gamma, beta) = (Var::zeros(3, dtype, &dev)?, Var::from_tensor(&beta)?);
                let (gamma, beta) = (gamma.as_tensor(), beta.as_tensor());
                let (mean, var) = (Tensor::zeros(3, dtype, &dev)?, Tensor::ones(3, dtype, &dev)?);
                let bn = BatchNorm::new(3, mean, var, gamma.clone(), beta.clone(), 1e-5)?.with_compute(path);
                let x = tensor(9500, &shape, -1.0, 3.0, dtype)?;
                let w = tensor(9501, &shape, -1.0, 1.0, dtype)?;
                let z = Tensor::zeros(&shape[..], dtype, &dev)?;
                let out = forward_backward2(
                    |x, z| ours(&bn, x, z, train),
                    Some((gamma, beta)),
                    &x,
                    residual.then_some(&z),
                    &w,
                )?;
                let what = format!("{dtype:?} {path:?} train={train} residual={residual}");
                let per_channel = |t: &Tensor| t.transpose(0, 1)?.flatten_from(1)?.to_dtype(DType::F64);
                let (y, wc) = (per_channel(&out[0])?, per_channel(&w)?);
                let relu_beta = [0.0, 1.0, 0.0];
                for (c, want) in relu_beta.into_iter().enumerate() {
                    let yc = y.get(c)?.to_vec1::<f64>()?;
                    assert!(yc.iter().all(|&v| v == want), "{what}: y on channel {c}: {yc:?}");
                }
                let sum_w1 = wc.get(1)?.sum_all()?.to_scalar::<f64>()?;
                let dbeta = out[3].to_dtype(DType::F64)?.to_vec1::<f64>()?;
                assert_eq!(dbeta[0], 0.0, "{what}: dβ at the kink");
                assert_eq!(dbeta[2], 0.0, "{what}: dβ below the kink");
                assert!(
                    (dbeta[1] - sum_w1).abs() <= 1e-5 * sum_w1.abs().max(1.0),
                    "{what}: dβ above"
                );
                let dgamma = out[2].to_dtype(DType::F64)?.to_vec1::<f64>()?;
                assert_eq!((dgamma[0], dgamma[2]), (0.0, 0.0), "{what}: dγ");
                let dx = out[1].abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                assert_eq!(dx, 0.0, "{what}: dx with γ = 0");
                if residual {
                    let dz = per_channel(&out[4])?;
                    let mask = Tensor::new(&[0.0, 1.0, 0.0], &dev)?.reshape((3, 1))?;
                    let want = wc.broadcast_mul(&mask)?;
                    assert_close(&format!("{what} dz"), &dz, &want, 0.0);
                }
            }
        }
    }
    Ok(())
}

/// A residual of another shape or dtype is a clear error on both paths, and changes nothing
/// (the running statistics stay as they were).
#[test]
fn residual_of_another_shape_or_dtype_is_rejected() -> Result<()> {
    let (fused, composed) = paths(3, DType::F32, BatchNormConfig::default(), 9600, Ok)?;
    let x = tensor(9601, &[4, 3, 5], -1.0, 3.0, DType::F32)?;
    for bn in [&fused, &composed] {
        let before = running(bn).map(|t| t.to_vec1::<f32>().unwrap());
        for z in [
            tensor(9602, &[4, 3, 4], -1.0, 1.0, DType::F32)?,
            tensor(9602, &[4, 3, 5], -1.0, 1.0, DType::F64)?,
        ] {
            for train in [true, false] {
                let err = bn.forward_t_add_relu(&x, &z, train).unwrap_err().to_string();
                assert!(err.contains("residual z"), "{err}");
            }
        }
        assert_eq!(running(bn).map(|t| t.to_vec1::<f32>().unwrap()), before);
    }
    Ok(())
}

/// Layers the fused kernels do not cover, ghost batch norm and candle-nn's uncentred variant
/// (`remove_mean = false`), give relu(BN(x) + z) composed of their own `forward_t`: y, dx, dγ, dβ
/// and dz bit for bit against `forward_t` then `+ z` and candle's `relu` on an equal layer (the
/// data hold no ReLU input at exactly 0, where only the gradient's convention differs), and
/// neither is plain batch norm's fused op (ghost groups and the uncentred scale change y).
#[test]
fn ghost_and_uncentred_layers_compose_their_own_forward() -> Result<()> {
    let uncentred = BatchNormConfig {
        remove_mean: false,
        ..BatchNormConfig::default()
    };
    for (name, config, virtual_batch) in [
        ("ghost", BatchNormConfig::default(), Some(2)),
        ("uncentred", uncentred, None),
    ] {
        let shape = [6, 3, 4];
        let layer = || {
            pair(3, DType::F32, config, 9700)?
                .ours
                .with_virtual_batch(virtual_batch)
        };
        let (ours_bn, theirs_bn, plain) = (
            layer()?,
            layer()?,
            pair(3, DType::F32, BatchNormConfig::default(), 9700)?.ours,
        );
        let x = tensor(9701, &shape, -1.0, 3.0, DType::F32)?;
        let z = tensor(9702, &shape, -1.0, 1.0, DType::F32)?;
        let w = tensor(9703, &shape, -1.0, 1.0, DType::F32)?;
        let got = run_ours(&ours_bn, &x, Some(&z), &w, true)?;
        let composed = |x: &Tensor, z: Option<&Tensor>| (theirs_bn.forward_t(x, true)? + z.unwrap())?.relu();
        let want = forward_backward2(composed, theirs_bn.weight_and_bias(), &x, Some(&z), &w)?;
        assert_outputs_bits(name, &got, &want);
        let fused = run_ours(&plain, &x, Some(&z), &w, true)?;
        assert!(scaled_err(&got[0], &fused[0]) > 1e-3, "{name}: the plain fused op's y");
    }
    Ok(())
}
