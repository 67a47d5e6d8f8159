//! F16 and BF16 tensors through the fused ops natively (issue 17, "Half precision"): the kernel
//! crate guarantees that its half kernels give the f32 kernels' results on the widened values,
//! rounded once to the half type, with γ, β, dγ, dβ in f32 (`Element::Param`). So, on the CPU:
//!
//! - y and dx of a half layer equal an f32 layer's on the widened input, rounded once to the half
//!   type, bit for bit; dγ, dβ equal the f32 layer's (rounded once more to the parameters' dtype
//!   when the layer's variables are half), and so do the running statistics after a step from
//!   equal ones;
//! - y, dx, dγ, dβ equal the kernel crate's half functions called on the half values themselves
//!   (`batch_norm_train::<f16>`, …), bit for bit, and keep the input's dtype: the op ran on the
//!   half storage, not on an f32 copy;
//! - against candle-nn's composed expression in f32 on the widened input (candle-nn cannot train
//!   half variables), within the sum of the two paths' tolerances against the f64 reference
//!   (`tol_fused` for the half type, which holds the final rounding to it, plus `tol_composed`
//!   for f32).
//!
//! `BatchRenorm` likewise: its half layers equal the f32 layer rounded once, in training step
//! after step and in inference.

use batchnorm::{batch_norm_backward, batch_norm_train, bf16, f16, Affine, Element};
use batchnorm_candle::{BatchNorm, BatchNormConfig};
use candle_core::{DType, ModuleT, Result, Tensor, WithDType};
use candle_nn::VarMap;

use crate::common::{
    assert_bits, assert_close, forward_backward, kernel_step, pair, running, tensor, tol_composed, tol_fused, vecs,
    Pair, OUTPUTS,
};

const C: usize = 3;
const SHAPE: [usize; 4] = [6, C, 4, 5];

/// Sets every variable of `to` to the value of `from`'s variable of the same name, widened
/// (exactly) to `dtype`.
fn copy_vars(from: &VarMap, to: &VarMap, dtype: DType) -> Result<()> {
    let values: Vec<(String, Tensor)> = {
        let data = from.data().lock().unwrap();
        data.iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect()
    };
    let mut to = to.clone();
    for (name, value) in values {
        to.set_one(name, value.to_dtype(dtype)?)?;
    }
    Ok(())
}

/// A half-type layer (its variables in `param_dtype`) and, on the same values widened to f32, our
/// f32 layer (`ours`) and candle-nn's (`theirs`).
fn layers(dtype: DType, param_dtype: DType, seed: u64) -> Result<(BatchNorm, Pair)> {
    let half = pair(C, param_dtype, BatchNormConfig::default(), seed)?;
    assert_eq!(half.ours.running_mean().dtype(), param_dtype, "{dtype:?}");
    let f32s = pair(C, DType::F32, BatchNormConfig::default(), seed)?;
    copy_vars(&half.ours_vm, &f32s.ours_vm, DType::F32)?;
    copy_vars(&half.ours_vm, &f32s.theirs_vm, DType::F32)?;
    Ok((half.ours, f32s))
}

/// Forward and backward (Σ y·w) of `bn` in training or inference mode: `[y, dx, dγ, dβ]`.
fn step(bn: &BatchNorm, x: &Tensor, w: &Tensor, train: bool, relu: bool) -> Result<Vec<Tensor>> {
    let forward = |x: &Tensor| match relu {
        true => bn.forward_t_relu(x, train),
        false => bn.forward_t(x, train),
    };
    forward_backward(forward, bn.weight_and_bias(), x, w)
}

#[test]
fn half_layers_equal_the_f32_layer_rounded_once_bit_for_bit() -> Result<()> {
    for (k, dtype) in [DType::F16, DType::BF16].into_iter().enumerate() {
        // Half variables (candle-nn's rule: the VarBuilder's dtype) and f32 ones (mixed precision).
        for param_dtype in [dtype, DType::F32] {
            for relu in [false, true] {
                let seed = 700 + 10 * k as u64;
                let (half, f32s) = layers(dtype, param_dtype, seed)?;
                for (s, train) in [false, true, true].into_iter().enumerate() {
                    let x = tensor(seed + 1 + s as u64, &SHAPE, -1.0, 3.0, dtype)?;
                    let w = tensor(seed + 5 + s as u64, &SHAPE, -1.0, 1.0, dtype)?;
                    let got = step(&half, &x, &w, train, relu)?;
                    let want = step(
                        &f32s.ours,
                        &x.to_dtype(DType::F32)?,
                        &w.to_dtype(DType::F32)?,
                        train,
                        relu,
                    )?;
                    let what = format!("{dtype:?} params {param_dtype:?} relu={relu} train={train} step {s}");
                    for (i, (g, w32)) in got.iter().zip(&want).enumerate() {
                        let want_dtype = if i < 2 { dtype } else { param_dtype };
                        assert_eq!(g.dtype(), want_dtype, "{what} {}", OUTPUTS[i]);
                        assert_bits(&format!("{what} {}", OUTPUTS[i]), g, &w32.to_dtype(want_dtype)?);
                    }
                    for (j, (a, b)) in running(&half).into_iter().zip(running(&f32s.ours)).enumerate() {
                        assert_eq!(a.dtype(), param_dtype);
                        assert_bits(&format!("{what} running statistic {j}"), a, &b.to_dtype(param_dtype)?);
                    }
                    // Half variables keep the statistics rounded: the f32 layer continues from
                    // the same values.
                    let [mean, var] = running(&half).map(|t| t.to_dtype(DType::F32));
                    f32s.ours.set_running_stats(&mean?, &var?)?;
                }
            }
        }
    }
    Ok(())
}

/// One training step of the kernel crate's half functions on the half values of `x`, `w`, with
/// the f32 γ, β of `bn`: `[y, dx, dγ, dβ]`.
fn kernel_half<T: Element<Param = f32> + WithDType>(bn: &BatchNorm, x: &Tensor, w: &Tensor) -> Result<Vec<Tensor>> {
    let (g, b) = bn.weight_and_bias().unwrap();
    let [gamma, beta] = vecs::<f32, 2>([g, b])?;
    let eps = bn.eps();
    kernel_step::<T>(x, w, |x, dy, y, grads| {
        let (_, saved) = batch_norm_train(x, Affine::new(&gamma, &beta), eps, y).unwrap();
        batch_norm_backward(x, dy, &saved, Some(&gamma), grads).unwrap();
    })
}

#[test]
fn half_input_runs_the_half_kernel_on_its_own_storage() -> Result<()> {
    for (dtype, seed) in [(DType::F16, 800), (DType::BF16, 810)] {
        let (half, _) = layers(dtype, DType::F32, seed)?;
        let x = tensor(seed + 1, &SHAPE, -1.0, 3.0, dtype)?;
        let w = tensor(seed + 2, &SHAPE, -1.0, 1.0, dtype)?;
        let got = step(&half, &x, &w, true, false)?;
        let want = match dtype {
            DType::F16 => kernel_half::<f16>(&half, &x, &w)?,
            _ => kernel_half::<bf16>(&half, &x, &w)?,
        };
        for (i, (g, k)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.dtype(), k.dtype(), "{dtype:?} {}", OUTPUTS[i]);
            assert_bits(&format!("{dtype:?} {}", OUTPUTS[i]), g, k);
        }
    }
    Ok(())
}

#[test]
fn half_layers_match_candle_nn_on_the_widened_input() -> Result<()> {
    let m = SHAPE.iter().product::<usize>() / C;
    for (dtype, seed) in [(DType::F16, 900), (DType::BF16, 910)] {
        let (half, f32s) = layers(dtype, dtype, seed)?;
        let tol = tol_fused(dtype, m) + tol_composed(DType::F32, m);
        for train in [false, true] {
            let x = tensor(seed + 1, &SHAPE, -1.0, 3.0, dtype)?;
            let w = tensor(seed + 2, &SHAPE, -1.0, 1.0, dtype)?;
            let got = step(&half, &x, &w, train, false)?;
            let x32 = x.to_dtype(DType::F32)?;
            let theirs = |x: &Tensor| candle_core::ModuleT::forward_t(&f32s.theirs, x, train);
            let (g, b) = f32s.theirs.weight_and_bias().unwrap();
            let want = forward_backward(theirs, Some((g, b)), &x32, &w.to_dtype(DType::F32)?)?;
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_close(&format!("{dtype:?} train={train} {}", OUTPUTS[i]), a, b, tol);
            }
            let theirs_running = [f32s.theirs.running_mean(), f32s.theirs.running_var()];
            for (j, (a, b)) in running(&half).into_iter().zip(theirs_running).enumerate() {
                assert_close(&format!("{dtype:?} train={train} running statistic {j}"), a, b, tol);
            }
        }
    }
    Ok(())
}

/// Batch renormalization on half tensors runs the half kernels natively: y and dx equal an f32
/// layer's on the widened values rounded once to the half type, dγ, dβ and the moving statistics
/// the f32 layer's rounded to the variables' dtype, bit for bit, over three training steps of the
/// schedule (each with other limits) and an inference step (whose backward is computed in f32).
#[test]
fn half_renorm_layers_equal_the_f32_layer_rounded_once_bit_for_bit() -> Result<()> {
    use crate::renorm::{config, layer, moving, schedule};
    for (k, dtype) in [DType::F16, DType::BF16].into_iter().enumerate() {
        for param_dtype in [dtype, DType::F32] {
            let seed = 950 + 10 * k as u64;
            let (half, half_vm) = layer(C, param_dtype, config(schedule()), seed)?;
            let (wide, wide_vm) = layer(C, DType::F32, config(schedule()), seed)?;
            for (s, train) in [true, true, true, false].into_iter().enumerate() {
                copy_vars(&half_vm, &wide_vm, DType::F32)?;
                let x = tensor(seed + 1 + s as u64, &SHAPE, -1.0, 3.0, dtype)?;
                let w = tensor(seed + 5 + s as u64, &SHAPE, -1.0, 1.0, dtype)?;
                let got = forward_backward(|x| half.forward_t(x, train), half.weight_and_bias(), &x, &w)?;
                let (x32, w32) = (x.to_dtype(DType::F32)?, w.to_dtype(DType::F32)?);
                let want = forward_backward(|x| wide.forward_t(x, train), wide.weight_and_bias(), &x32, &w32)?;
                let what = format!("renorm {dtype:?} params {param_dtype:?} train={train} step {s}");
                for (i, (g, w32)) in got.iter().zip(&want).enumerate() {
                    let want_dtype = if i < 2 { dtype } else { param_dtype };
                    assert_eq!(g.dtype(), want_dtype, "{what} {}", OUTPUTS[i]);
                    assert_bits(&format!("{what} {}", OUTPUTS[i]), g, &w32.to_dtype(want_dtype)?);
                }
                for (j, (a, b)) in moving(&half).into_iter().zip(moving(&wide)).enumerate() {
                    assert_eq!(a.dtype(), param_dtype);
                    assert_bits(&format!("{what} moving statistic {j}"), a, &b.to_dtype(param_dtype)?);
                }
            }
            assert_eq!((half.steps(), wide.steps()), (3, 3));
        }
    }
    Ok(())
}
