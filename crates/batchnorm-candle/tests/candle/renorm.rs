//! Batch renormalization through candle (`batch_renorm`, `BatchRenorm`): Ioffe 2017's
//! Algorithm 1 as issue 16 defines it (σ_B = √(σ²_B + ε), r = clip(σ_B/σ, 1/r_max, r_max),
//! d = clip((μ_B − μ)/σ, −d_max, d_max) constants for the backward, y = γ·((x − μ_B)/σ_B·r + d) + β,
//! μ ← μ + α(μ_B − μ), σ ← σ + α(σ_B − σ); inference y = γ·(x − μ)/σ + β), against the kernel
//! crate's layer bit for bit and the f64 reference on both compute paths; identity limits give
//! plain batch norm; the schedule follows the step counter.

use crate::common::{
    assert_bits, assert_close, assert_outputs_close, assert_steps_match_kernel, check_paths, check_stats, f64s,
    for_cases, forward_backward, from_f64s, init_vars, pair, reference_outputs, tensor, tol_composed, tol_fused, vecs,
};
use batchnorm::{reference, Layout};
use batchnorm_candle::{
    batch_renorm, BatchNormConfig, BatchRenorm, BatchRenormConfig, ComputePath, RenormClip, RenormSchedule,
};
use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, WithDType};
use candle_nn::{VarBuilder, VarMap};

const SHAPES: [&[usize]; 3] = [&[12, 3], &[4, 3, 5], &[3, 2, 4, 2]];

/// (1, 0) at step 0 and 1, then r_max ramps to 2 over 2 steps and d_max jumps to 1: every step of
/// a short test sees other limits.
pub(crate) fn schedule() -> RenormSchedule {
    RenormSchedule::new(1, 2, 1, 2.0, 1.0).unwrap()
}

pub(crate) fn config(limits: RenormSchedule) -> BatchRenormConfig {
    BatchRenormConfig {
        momentum: 0.1, // moves the statistics visibly in a few steps
        limits,
        ..Default::default()
    }
}

/// A renorm layer on its own `VarMap`: moving mean in [−0.5, 0.5), moving σ in [0.5, 2), γ, β as
/// `common::init_vars` sets them.
pub(crate) fn layer(c: usize, dtype: DType, config: BatchRenormConfig, seed: u64) -> Result<(BatchRenorm, VarMap)> {
    let vm = VarMap::new();
    let bn = batch_renorm(c, config, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu))?;
    let stats = [("moving_mean", -0.5, 0.5), ("moving_std", 0.5, 2.0)];
    init_vars(&vm, &stats, config.affine, c, dtype, seed)?;
    Ok((bn, vm))
}

/// The moving mean and standard deviation of a layer.
pub(crate) fn moving(bn: &BatchRenorm) -> [&Tensor; 2] {
    [bn.moving_mean(), bn.moving_std()]
}

/// Four training steps on both paths against `reference::renorm_forward_train`,
/// `renorm_backward` and `renorm_update`, with the limits of each step.
#[test]
fn renorm_training_matches_the_reference_on_both_paths() -> Result<()> {
    for_cases(&SHAPES, 4000, |dtype, shape, seed| {
        let c = shape[1];
        let fused = layer(c, dtype, config(schedule()), seed)?.0;
        let composed = layer(c, dtype, config(schedule()), seed)?
            .0
            .with_compute(ComputePath::Composed);
        let g = Layout::ChannelsFirst.geometry(shape).unwrap();
        let m = g.per_channel();
        for step in 0..4u64 {
            let clip = schedule().at(step);
            assert_eq!((fused.clip(), composed.clip()), (clip, clip));
            let x = tensor(seed + 5 + step, shape, -1.0, 3.0, dtype)?;
            let w = tensor(seed + 7 + step, shape, -1.0, 1.0, dtype)?;
            let (gamma, beta) = fused.weight_and_bias().map(|(g, b)| (f64s(g), f64s(b))).unwrap();
            let (mm, ms) = (f64s(fused.moving_mean()), f64s(fused.moving_std()));
            let (xs, ws) = (f64s(&x), f64s(&w));
            let (r_max, d_max) = (clip.r_max(), clip.d_max());
            let (y, mean_b, sigma_b, r, d) =
                reference::renorm_forward_train(&g, &xs, &mm, &ms, &gamma, &beta, 1e-5, r_max, d_max);
            let (dx, dgamma, dbeta) = reference::renorm_backward(&g, &xs, &ws, &r, &d, &gamma, 1e-5);
            let want = reference_outputs(&y, &dx, &dgamma, &dbeta, shape);
            let got_fused = forward_backward(|x| fused.forward_t(x, true), fused.weight_and_bias(), &x, &w)?;
            let got_composed = forward_backward(|x| composed.forward_t(x, true), composed.weight_and_bias(), &x, &w)?;
            let what = format!("{shape:?} {dtype:?} step {step}");
            check_paths(&what, &got_fused, &got_composed, &want, dtype, m);
            let (mean, std) = reference::renorm_update(&mm, &ms, &mean_b, &sigma_b, 0.1);
            check_stats(&what, moving(&fused), moving(&composed), [&mean, &std], dtype, m);
            assert_eq!((fused.steps(), composed.steps()), (step + 1, step + 1));
        }
        Ok(())
    })
}

/// The fused path is the kernel crate's `BatchRenorm` layer: outputs, gradients, moving
/// statistics and step counter bit for bit, step after step of the schedule.
#[test]
fn renorm_fused_path_is_the_kernel_layer_bit_for_bit() -> Result<()> {
    renorm_matches_the_kernel_layer::<f32>()?;
    renorm_matches_the_kernel_layer::<f64>()
}

/// [`renorm_fused_path_is_the_kernel_layer_bit_for_bit`] on `T` tensors.
fn renorm_matches_the_kernel_layer<T: batchnorm::Element<Param = T> + WithDType>() -> Result<()> {
    for (i, shape) in SHAPES.into_iter().enumerate() {
        let (c, seed) = (shape[1], 4100 + 10 * i as u64);
        let bn = layer(c, T::DTYPE, config(schedule()), seed)?.0;
        let mut kernel = batchnorm::BatchRenorm::<T>::new(c, config(schedule())).unwrap();
        let (gamma, beta) = bn.weight_and_bias().unwrap();
        [kernel.gamma, kernel.beta, kernel.moving_mean, kernel.moving_std] =
            vecs([gamma, beta, bn.moving_mean(), bn.moving_std()])?;
        let stats = || moving(&bn).map(Tensor::clone).to_vec();
        assert_steps_match_kernel::<T>(
            |x| bn.forward_t(x, true),
            bn.weight_and_bias(),
            stats,
            shape,
            seed,
            |x, dy, y, grads| {
                let saved = kernel.forward_train(x, y).unwrap();
                kernel.backward(x, dy, &saved, grads).unwrap();
                vec![kernel.moving_mean.clone(), kernel.moving_std.clone()]
            },
        )?;
        assert_eq!((bn.steps(), kernel.steps), (3, 3));
    }
    Ok(())
}

/// With r_max = 1 and d_max = 0 (r = 1, d = 0) training outputs and gradients are plain batch
/// norm's, whatever the moving statistics: each path against our `BatchNorm` on the same path and
/// the same γ, β, within the sum of both sides' tolerances.
#[test]
fn renorm_with_identity_limits_is_plain_batch_norm() -> Result<()> {
    for_cases(&SHAPES, 4200, |dtype, shape, seed| {
        let c = shape[1];
        let m = Layout::ChannelsFirst.geometry(shape).unwrap().per_channel();
        let identity = config(RenormSchedule::constant(RenormClip::identity()));
        for (path, tol) in [
            (ComputePath::Auto, 2.0 * tol_fused(dtype, m)),
            (ComputePath::Composed, 2.0 * tol_composed(dtype, m)),
        ] {
            let renorm = layer(c, dtype, identity, seed)?.0.with_compute(path);
            // The same γ and β (init_vars' order: the two statistics, then weight and bias).
            let plain = pair(c, dtype, BatchNormConfig::default(), seed)?
                .ours
                .with_compute(path);
            let x = tensor(seed + 5, shape, -1.0, 3.0, dtype)?;
            let w = tensor(seed + 6, shape, -1.0, 1.0, dtype)?;
            let a = forward_backward(|x| renorm.forward_t(x, true), renorm.weight_and_bias(), &x, &w)?;
            let b = forward_backward(|x| plain.forward_t(x, true), plain.weight_and_bias(), &x, &w)?;
            assert_outputs_close(&format!("{shape:?} {dtype:?} {path:?}"), &a, &b, tol);
        }
        Ok(())
    })
}

/// Inference y = γ·(x − μ)/σ + β against `reference::renorm_eval`, and its gradients against the
/// fixed-statistics backward (dx = γ·dy/σ, dγ = Σ dy·(x − μ)/σ, dβ = Σ dy: `reference::frozen_backward`
/// with σ² as the variance and ε = 0), on both paths; the `Module` view is the same pass.
#[test]
fn renorm_inference_and_its_gradients() -> Result<()> {
    for_cases(&SHAPES, 4300, |dtype, shape, seed| {
        let c = shape[1];
        let g = Layout::ChannelsFirst.geometry(shape).unwrap();
        let fused = layer(c, dtype, config(schedule()), seed)?.0;
        let composed = layer(c, dtype, config(schedule()), seed)?
            .0
            .with_compute(ComputePath::Composed);
        let x = tensor(seed + 5, shape, -1.0, 3.0, dtype)?;
        let w = tensor(seed + 6, shape, -1.0, 1.0, dtype)?;
        let (gamma, beta) = fused.weight_and_bias().map(|(g, b)| (f64s(g), f64s(b))).unwrap();
        let (mm, ms) = (f64s(fused.moving_mean()), f64s(fused.moving_std()));
        let (xs, ws) = (f64s(&x), f64s(&w));
        let y = reference::renorm_eval(&g, &xs, &mm, &ms, &gamma, &beta);
        let var: Vec<f64> = ms.iter().map(|s| s * s).collect();
        let (dx, dgamma, dbeta) = reference::frozen_backward(&g, &xs, &ws, &mm, &var, &gamma, 0.0);
        let want = reference_outputs(&y, &dx, &dgamma, &dbeta, shape);
        let got_fused = forward_backward(|x| fused.forward_t(x, false), fused.weight_and_bias(), &x, &w)?;
        let got_composed = forward_backward(|x| composed.forward_t(x, false), composed.weight_and_bias(), &x, &w)?;
        check_paths(
            &format!("eval {shape:?} {dtype:?}"),
            &got_fused,
            &got_composed,
            &want,
            dtype,
            g.per_channel(),
        );
        assert_bits("eval_mode", &fused.eval_mode().forward(&x)?, &got_fused[0]);
        assert_eq!(fused.steps(), 0, "inference takes no step");
        // Without γ and β.
        let bare = BatchRenormConfig {
            affine: false,
            ..config(schedule())
        };
        let (bn, _) = layer(c, dtype, bare, seed)?;
        let y = reference::renorm_eval(&g, &xs, &mm, &ms, &vec![1.0; c], &vec![0.0; c]);
        let tol = tol_fused(dtype, 1);
        assert_close(
            "eval without affine",
            &bn.forward_t(&x, false)?,
            &from_f64s(&y, shape),
            tol,
        );
        let dx_bare = forward_backward(|x| bn.forward_t(x, false), None, &x, &w)?.remove(1);
        let (dx, _, _) = reference::frozen_backward(&g, &xs, &ws, &mm, &var, &vec![1.0; c], 0.0);
        assert_close("dx without affine", &dx_bare, &from_f64s(&dx, shape), tol);
        Ok(())
    })
}

/// The step counter: advanced by each training forward (not by inference), shared by clones,
/// settable for a checkpoint; at `u64::MAX` training is an error that changes nothing.
#[test]
fn renorm_step_counter_drives_the_schedule() -> Result<()> {
    let (bn, vm) = layer(3, DType::F32, config(schedule()), 4400)?;
    let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    for name in ["moving_mean", "moving_std", "weight", "bias"] {
        assert!(names.iter().any(|n| n == name), "{name} not a variable: {names:?}");
    }
    let clone = bn.clone();
    let x = tensor(4401, &[6, 3, 2], -1.0, 3.0, DType::F32)?;
    for step in 0..3 {
        assert_eq!(bn.clip(), schedule().at(step));
        bn.forward_t(&x, true)?;
        bn.forward_t(&x, false)?;
    }
    assert_eq!((bn.steps(), clone.steps()), (3, 3));
    clone.set_steps(1000);
    assert_eq!((bn.steps(), bn.clip()), (1000, schedule().last()));
    bn.set_steps(u64::MAX);
    let before = (f64s(bn.moving_mean()), f64s(bn.moving_std()));
    let err = bn.forward_t(&x, true).unwrap_err().to_string();
    assert!(err.contains("u64::MAX"), "{err}");
    assert_eq!((f64s(bn.moving_mean()), f64s(bn.moving_std())), before);
    assert_eq!(bn.steps(), u64::MAX);
    Ok(())
}

/// Rejected, with the kernel crate's error where it has one: ε and α out of range, variables of
/// the wrong shape, γ/β given against `affine`, an input of the wrong rank, channel count or
/// dtype, an empty input, fewer than 2 values per channel (nothing changed).
#[test]
fn renorm_errors() -> Result<()> {
    let dev = Device::Cpu;
    let vb = || VarBuilder::zeros(DType::F32, &dev);
    let contains = |r: Result<BatchRenorm>, want: &str| {
        let err = r.expect_err("must be rejected").to_string();
        assert!(err.contains(want), "{err} should name {want}");
    };
    for eps in [0.0, -1.0, f64::NAN] {
        let c = BatchRenormConfig {
            eps,
            ..Default::default()
        };
        contains(batch_renorm(3, c, vb()), &batchnorm::Error::InvalidEps(eps).to_string());
    }
    for momentum in [0.0, 1.5, f64::NAN] {
        let c = BatchRenormConfig {
            momentum,
            ..Default::default()
        };
        contains(
            batch_renorm(3, c, vb()),
            &batchnorm::Error::InvalidMomentum(momentum).to_string(),
        );
    }
    let v = |n: usize| Tensor::ones(n, DType::F32, &dev);
    let c = BatchRenormConfig::default();
    contains(
        BatchRenorm::new(3, v(2)?, v(3)?, Some((v(3)?, v(3)?)), c),
        "moving mean",
    );
    contains(BatchRenorm::new(3, v(3)?, v(4)?, Some((v(3)?, v(3)?)), c), "moving std");
    contains(BatchRenorm::new(3, v(3)?, v(3)?, Some((v(3)?, v(2)?)), c), "bias");
    contains(BatchRenorm::new(3, v(3)?, v(3)?, None, c), "affine");

    let (bn, _) = layer(3, DType::F32, c, 4500)?;
    let msg = |r: Result<Tensor>| r.expect_err("must be rejected").to_string();
    for train in [true, false] {
        assert!(msg(bn.forward_t(&Tensor::zeros(3, DType::F32, &dev)?, train)).contains("at least two dimensions"));
        assert!(msg(bn.forward_t(&Tensor::zeros((4, 2), DType::F32, &dev)?, train)).contains("number of features"));
        assert!(msg(bn.forward_t(&Tensor::zeros((4, 3), DType::U8, &dev)?, train)).contains("dtype"));
        let empty = batchnorm::Error::EmptyInput { shape: vec![0, 3] };
        assert!(msg(bn.forward_t(&Tensor::zeros((0, 3), DType::F32, &dev)?, train)).contains(&empty.to_string()));
    }
    let before = f64s(bn.moving_std());
    let few = batchnorm::Error::TooFewValues {
        count: 1,
        shape: vec![1, 3, 1],
    };
    assert!(msg(bn.forward_t(&Tensor::ones((1, 3, 1), DType::F32, &dev)?, true)).contains(&few.to_string()));
    assert_eq!((f64s(bn.moving_std()), bn.steps()), (before, 0));
    Ok(())
}
