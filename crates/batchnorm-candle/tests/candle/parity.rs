//! Outputs, gradients and running statistics against candle-nn's own `BatchNorm`, differentiated
//! by candle's autograd through its chain of generic ops.
//!
//! Tolerances (error = max |ours − reference| / max |reference|, see `common::scaled_err`):
//! - f64 against candle-nn in f64: 1e-13. Both sides compute in f64 and differ only in
//!   summation order (candle sums sequentially, the kernels in cache-sized pieces merged by
//!   Chan's formula) and in the algebraic form of dx; measured ≤ 1e-14 (≈ 45 ulps of 2.2e-16,
//!   from candle's sequential sums over up to 2 048 values per channel).
//! - f32 against candle-nn in f32: 2e-5. candle-nn accumulates means, variances and gradient
//!   sums in f32, so its own error grows with the values per channel and is amplified by the
//!   cancellation in dx and dγ; measured ≤ 3.3e-6.
//! - f32 against candle-nn run in f64 on the same (f32-representable) data and variables, i.e.
//!   against the exact answer: 1.2e-7 ≈ 2^-23, one f32 ulp at the reference's scale. The kernels
//!   accumulate in f64 and round each result once (≤ half an ulp); measured ≤ 4.8e-8.

use crate::common::{forward_backward, pair, scaled_err, tensor};
use batchnorm_candle::BatchNormConfig;
use candle_core::{DType, ModuleT, Result, Tensor, Var};

const SHAPES: [&[usize]; 4] = [&[16, 5], &[8, 4, 7], &[4, 3, 5, 6], &[32, 2, 8, 8]];

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-13
    } else {
        2e-5
    }
}

/// Forward in the given mode and backward of Σ y·w: (y, dx, dγ, dβ) from either module.
fn run(bn: &dyn ModuleT, wb: Option<(&Tensor, &Tensor)>, x: &Tensor, w: &Tensor, train: bool) -> Result<Vec<Tensor>> {
    assert!(wb.is_some(), "affine");
    forward_backward(|x| bn.forward_t(x, train), wb, x, w)
}

fn check_case(shape: &[usize], dtype: DType, train: bool, seed: u64) -> Result<()> {
    let c = shape[1];
    let p = pair(c, dtype, BatchNormConfig::default(), seed)?;
    let x = tensor(seed + 10, shape, 2.0, 5.0, dtype)?; // a mean far from 0 tests the centring
    let w = tensor(seed + 11, shape, -1.0, 1.0, dtype)?;
    let ours = run(&p.ours, p.ours.weight_and_bias(), &x, &w, train)?;
    let theirs = run(&p.theirs, p.theirs.weight_and_bias(), &x, &w, train)?;
    for (name, (a, b)) in ["y", "dx", "dgamma", "dbeta"].iter().zip(ours.iter().zip(&theirs)) {
        assert_eq!(a.dims(), b.dims(), "{name} {shape:?}");
        assert_eq!(a.dtype(), dtype);
        let e = scaled_err(a, b);
        assert!(e <= tol(dtype), "{name} {shape:?} {dtype:?} train={train}: error {e:e}");
    }
    if dtype == DType::F32 {
        // Against the f64 answer on the same data.
        let p64 = pair(c, DType::F64, BatchNormConfig::default(), seed)?;
        let (x64, w64) = (x.to_dtype(DType::F64)?, w.to_dtype(DType::F64)?);
        // Equal variables: the f32 ones, widened.
        let mut vm = p64.theirs_vm.clone();
        for (name, var) in p.theirs_vm.data().lock().unwrap().iter() {
            vm.set_one(name, var.as_tensor().to_dtype(DType::F64)?)?;
        }
        let exact = run(&p64.theirs, p64.theirs.weight_and_bias(), &x64, &w64, train)?;
        for (name, (a, b)) in ["y", "dx", "dgamma", "dbeta"].iter().zip(ours.iter().zip(&exact)) {
            let e = scaled_err(a, b);
            assert!(e <= 1.2e-7, "{name} {shape:?} f32 vs exact, train={train}: error {e:e}");
        }
    }
    Ok(())
}

/// [`check_case`] over every dtype and shape, in training or inference mode, seeds from `seed0`.
fn check_all_cases(train: bool, seed0: u64) -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for (i, shape) in SHAPES.iter().enumerate() {
            check_case(shape, dtype, train, seed0 + i as u64)?;
        }
    }
    Ok(())
}

#[test]
fn training_outputs_and_gradients_match_candle_nn() -> Result<()> {
    check_all_cases(true, 100)
}

#[test]
fn inference_outputs_and_gradients_match_candle_nn() -> Result<()> {
    check_all_cases(false, 200)
}

#[test]
fn running_statistics_match_candle_nn_after_training_steps() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for momentum in [0.1, 0.5, 1.0, 0.0] {
            let config = BatchNormConfig {
                momentum,
                ..Default::default()
            };
            let shape = [6, 3, 4, 5];
            let p = pair(3, dtype, config, 300)?;
            let before = p.ours.running_var().to_vec1::<f32>().ok();
            for step in 0..4 {
                let x = tensor(310 + step, &shape, -1.0 + step as f64, 3.0 + 2.0 * step as f64, dtype)?;
                p.ours.forward_t(&x, true)?;
                p.theirs.forward_t(&x, true)?;
            }
            // The running statistics carry the batch statistics' rounding; candle-nn's f32 sums
            // dominate (see the tolerance note at the top).
            let t = tol(dtype);
            let e_mean = scaled_err(p.ours.running_mean(), p.theirs.running_mean());
            let e_var = scaled_err(p.ours.running_var(), p.theirs.running_var());
            assert!(
                e_mean <= t && e_var <= t,
                "momentum {momentum} {dtype:?}: {e_mean:e} {e_var:e}"
            );
            if momentum == 0.0 && dtype == DType::F32 {
                assert_eq!(p.ours.running_var().to_vec1::<f32>().ok(), before);
            }
            // The VarMap holds the very same (updated) variables.
            let vm = p.ours_vm.data().lock().unwrap();
            assert_eq!(scaled_err(vm["running_mean"].as_tensor(), p.ours.running_mean()), 0.0);
        }
    }
    Ok(())
}

#[test]
fn layer_without_affine_and_uncentred_variant_match_candle_nn() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for (affine, remove_mean) in [(false, true), (true, false), (false, false)] {
            let config = BatchNormConfig {
                affine,
                remove_mean,
                ..Default::default()
            };
            let p = pair(4, dtype, config, 400)?;
            assert_eq!(p.ours.weight_and_bias().is_some(), affine);
            for step in 0..3 {
                let x = Var::from_tensor(&tensor(410 + step, &[5, 4, 6], 1.0, 4.0, dtype)?)?;
                let w = tensor(420 + step, &[5, 4, 6], -1.0, 1.0, dtype)?;
                for train in [true, false] {
                    let ya = p.ours.forward_t(x.as_tensor(), train)?;
                    let yb = p.theirs.forward_t(x.as_tensor(), train)?;
                    let ga = (&ya * &w)?.sum_all()?.backward()?;
                    let gb = (&yb * &w)?.sum_all()?.backward()?;
                    let t = tol(dtype);
                    assert!(scaled_err(&ya, &yb) <= t, "y affine={affine} remove_mean={remove_mean}");
                    let (dxa, dxb) = (ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap());
                    assert!(
                        scaled_err(dxa, dxb) <= t,
                        "dx affine={affine} remove_mean={remove_mean}"
                    );
                }
            }
            assert!(scaled_err(p.ours.running_mean(), p.theirs.running_mean()) <= tol(dtype));
            assert!(scaled_err(p.ours.running_var(), p.theirs.running_var()) <= tol(dtype));
        }
    }
    Ok(())
}

#[test]
fn non_contiguous_input_and_untracked_input() -> Result<()> {
    let p = pair(5, DType::F64, BatchNormConfig::default(), 500)?;
    // [C, N] transposed to a strided [N, C].
    let xt = tensor(501, &[5, 16], -2.0, 2.0, DType::F64)?.t()?;
    assert!(!xt.is_contiguous());
    let w = tensor(502, &[16, 5], -1.0, 1.0, DType::F64)?;
    let ours = run(&p.ours, p.ours.weight_and_bias(), &xt, &w, true)?;
    let theirs = run(&p.theirs, p.theirs.weight_and_bias(), &xt, &w, true)?;
    for (a, b) in ours.iter().zip(&theirs) {
        assert!(scaled_err(a, b) <= tol(DType::F64));
    }
    // x not tracked (a network's input): parameter gradients only, still from the fused op.
    let x = xt.contiguous()?;
    let y = p.ours.forward_t(&x, true)?;
    let grads = (&y * &w)?.sum_all()?.backward()?;
    let (g, b) = p.ours.weight_and_bias().unwrap();
    assert!(grads.get(g).is_some() && grads.get(b).is_some() && grads.get(&x).is_none());
    Ok(())
}

#[test]
fn half_precision_agrees_with_candle_nn_in_f32() -> Result<()> {
    // candle-nn itself cannot train with half-type variables (its running-mean update adds an
    // f16 tensor to an f32 one), so the reference is candle-nn in f32 on the same, widened values.
    for dtype in [DType::F16, DType::BF16] {
        let p = pair(3, dtype, BatchNormConfig::default(), 600)?;
        let p32 = pair(3, DType::F32, BatchNormConfig::default(), 600)?;
        let mut vm = p32.theirs_vm.clone();
        for (name, var) in p.ours_vm.data().lock().unwrap().iter() {
            vm.set_one(name, var.as_tensor().to_dtype(DType::F32)?)?;
        }
        let x = tensor(601, &[8, 3, 4], -1.0, 1.0, dtype)?;
        for train in [false, true] {
            let a = p.ours.forward_t(&x, train)?;
            let b = p32.theirs.forward_t(&x.to_dtype(DType::F32)?, train)?;
            assert_eq!(a.dtype(), dtype);
            // One rounding of the output to the half type: ≤ 2^-8 relative for bf16.
            assert!(scaled_err(&a, &b) <= 1e-2, "{dtype:?} train={train}");
        }
        assert_eq!(p.ours.running_mean().dtype(), dtype);
        assert!(scaled_err(p.ours.running_mean(), p32.theirs.running_mean()) <= 1e-2);
        assert!(scaled_err(p.ours.running_var(), p32.theirs.running_var()) <= 1e-2);
    }
    Ok(())
}
