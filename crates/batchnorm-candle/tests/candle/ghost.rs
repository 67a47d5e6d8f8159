//! Ghost batch norm through candle (`BatchNorm::with_virtual_batch`): each group of v consecutive
//! examples normalized with its own statistics, the backward per group, the running statistics
//! updated once with the mean over groups of their means and unbiased variances (issue 16's
//! definition); against the kernel crate's layer bit for bit, the f64 reference on both compute
//! paths, and plain batch norm for v ≥ N.

use crate::common::{
    assert_bits, assert_close, assert_steps_match_kernel, check_paths, check_stats, f64s, for_cases, forward_backward,
    pair, paths, reference_outputs, running, tensor, tol_composed, vecs, OUTPUTS,
};
use batchnorm::{
    ghost_batch_norm_backward, ghost_batch_norm_train, reference, update_ghost_running_stats, Affine, Layout, Momentum,
};
use batchnorm_candle::{BatchNorm, BatchNormConfig};
use candle_core::{DType, ModuleT, Result, Tensor, WithDType};

/// (shape, virtual batch size): groups that divide N, a shorter last group, a last group of one
/// example that still holds 2 values per channel, and several spatial dimensions.
const CASES: [(&[usize], usize); 4] = [(&[12, 3], 4), (&[10, 3], 4), (&[9, 2, 5], 4), (&[6, 3, 2, 2], 3)];

fn ghost(v: usize) -> impl Fn(BatchNorm) -> Result<BatchNorm> {
    move |bn| bn.with_virtual_batch(Some(v))
}

/// Two training steps on both paths against `reference::ghost_forward_train`,
/// `ghost_backward_train` and `ghost_running_update`.
#[test]
fn ghost_training_matches_the_reference_on_both_paths() -> Result<()> {
    for_cases(&CASES, 3000, |dtype, (shape, v), seed| {
        let c = shape[1];
        let (fused, composed) = paths(c, dtype, BatchNormConfig::default(), seed, ghost(v))?;
        assert_eq!(fused.virtual_batch(), Some(v));
        let g = Layout::ChannelsFirst.geometry(shape).unwrap();
        let m = g.per_channel();
        for step in 0..2 {
            let x = tensor(seed + 5 + step, shape, -1.0, 3.0, dtype)?;
            let w = tensor(seed + 7 + step, shape, -1.0, 1.0, dtype)?;
            let (gamma, beta) = fused.weight_and_bias().map(|(g, b)| (f64s(g), f64s(b))).unwrap();
            let (rm, rv) = (f64s(fused.running_mean()), f64s(fused.running_var()));
            let (xs, ws) = (f64s(&x), f64s(&w));
            let (y, groups) = reference::ghost_forward_train(&g, shape[0], v, &xs, &gamma, &beta, 1e-5);
            let (dx, dgamma, dbeta) = reference::ghost_backward_train(&g, shape[0], v, &xs, &ws, &gamma, 1e-5);
            let want = reference_outputs(&y, &dx, &dgamma, &dbeta, shape);
            let got_fused = forward_backward(|x| fused.forward_t(x, true), fused.weight_and_bias(), &x, &w)?;
            let got_composed = forward_backward(|x| composed.forward_t(x, true), composed.weight_and_bias(), &x, &w)?;
            let what = format!("{shape:?} v={v} {dtype:?} step {step}");
            check_paths(&what, &got_fused, &got_composed, &want, dtype, m);
            let (mean, var) = reference::ghost_running_update(&rm, &rv, &groups, Some(0.1), 1);
            check_stats(&what, running(&fused), running(&composed), [&mean, &var], dtype, m);
        }
        Ok(())
    })
}

/// The fused path is the kernel crate's ghost batch norm (`ghost_batch_norm_train`,
/// `ghost_batch_norm_backward`, `update_ghost_running_stats` at momentum 0.1): outputs, gradients
/// and running statistics bit for bit.
fn ghost_matches_the_kernel<T: batchnorm::Element + WithDType>() -> Result<()> {
    for (i, (shape, v)) in CASES.into_iter().enumerate() {
        let (c, seed) = (shape[1], 3100 + 10 * i as u64);
        let bn = pair(c, T::DTYPE, BatchNormConfig::default(), seed)?
            .ours
            .with_virtual_batch(Some(v))?;
        let (gamma, beta) = bn.weight_and_bias().unwrap();
        let [gamma, beta, mut mean, mut var] = vecs([gamma, beta, bn.running_mean(), bn.running_var()])?;
        let stats = || running(&bn).map(Tensor::clone).to_vec();
        let ours = |x: &Tensor| bn.forward_t(x, true);
        assert_steps_match_kernel::<T>(ours, bn.weight_and_bias(), stats, shape, seed, |x, dy, y, grads| {
            let affine = Affine::new(&gamma, &beta);
            let (groups, saved) = ghost_batch_norm_train(x, v, affine, 1e-5, y).unwrap();
            ghost_batch_norm_backward(x, dy, &saved, Some(&gamma), grads).unwrap();
            update_ghost_running_stats(&groups, Momentum::Exponential(0.1), 1, &mut mean, &mut var).unwrap();
            vec![mean.clone(), var.clone()]
        })?;
    }
    Ok(())
}

#[test]
fn ghost_fused_path_is_the_kernel_bit_for_bit() -> Result<()> {
    ghost_matches_the_kernel::<f32>()?;
    ghost_matches_the_kernel::<f64>()
}

/// With v ≥ N there is one group: ghost batch norm is plain batch norm, bit for bit on the fused
/// path (running statistics included); and inference never uses groups.
#[test]
fn ghost_with_one_group_is_plain_batch_norm_and_inference_ignores_groups() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for v in [8, 9, 100] {
            let plain = pair(3, dtype, BatchNormConfig::default(), 3200)?.ours;
            let ghost = pair(3, dtype, BatchNormConfig::default(), 3200)?
                .ours
                .with_virtual_batch(Some(v))?;
            let x = tensor(3201, &[8, 3, 2], -1.0, 3.0, dtype)?;
            let w = tensor(3202, &[8, 3, 2], -1.0, 1.0, dtype)?;
            for train in [true, false] {
                let a = forward_backward(|x| plain.forward_t(x, train), plain.weight_and_bias(), &x, &w)?;
                let b = forward_backward(|x| ghost.forward_t(x, train), ghost.weight_and_bias(), &x, &w)?;
                for k in 0..4 {
                    assert_bits(&format!("{} v={v} train={train}", OUTPUTS[k]), &b[k], &a[k]);
                }
            }
            assert_bits("running mean", ghost.running_mean(), plain.running_mean());
            assert_bits("running var", ghost.running_var(), plain.running_var());
        }
        // Several groups: inference is still plain inference.
        let plain = pair(3, dtype, BatchNormConfig::default(), 3210)?.ours;
        let ghost = pair(3, dtype, BatchNormConfig::default(), 3210)?
            .ours
            .with_virtual_batch(Some(2))?;
        let x = tensor(3211, &[8, 3, 2], -1.0, 3.0, dtype)?;
        assert_bits("eval", &ghost.forward_t(&x, false)?, &plain.forward_t(&x, false)?);
    }
    Ok(())
}

/// Algorithm 2's population statistics of a ghost layer average its groups, each weighing one,
/// as the ghost running update does.
#[test]
fn ghost_population_statistics_average_the_groups() -> Result<()> {
    let (fused, composed) = paths(2, DType::F64, BatchNormConfig::default(), 3300, ghost(4))?;
    let shape = [10, 2, 3];
    let g = Layout::ChannelsFirst.geometry(&shape).unwrap();
    let x = tensor(3301, &shape, -1.0, 3.0, DType::F64)?;
    let (_, groups) = reference::ghost_forward_train(&g, 10, 4, &f64s(&x), &[1.0; 2], &[0.0; 2], 1e-5);
    // Cumulative averaging over all groups: the update with weight 1 from a zero start.
    let (mean, var) = reference::ghost_running_update(&[0.0; 2], &[0.0; 2], &groups, Some(1.0), 1);
    for bn in [&fused, &composed] {
        bn.begin_population_stats()?;
        bn.forward_t(&x, true)?;
        let pop = bn.finish_population_stats()?;
        assert_eq!(pop.batches(), 3, "one per group");
        let tol = tol_composed(DType::F64, 30);
        let t = |v: Vec<f64>| crate::common::from_f64s(&v, &[2]);
        assert_close("population mean", &t(pop.mean().unwrap()), &t(mean.clone()), tol);
        assert_close("population var", &t(pop.var().unwrap()), &t(var.clone()), tol);
    }
    Ok(())
}

/// Rejected: v < 2, a ghost layer of candle-nn's uncentred variant, and a group with fewer than
/// 2 values per channel (the kernel crate's `GhostGroupTooSmall`, on both paths, the running
/// statistics left alone).
#[test]
fn ghost_errors() -> Result<()> {
    let bn = || pair(3, DType::F32, BatchNormConfig::default(), 3400).map(|p| p.ours);
    for v in [0, 1] {
        let err = bn()?.with_virtual_batch(Some(v)).unwrap_err().to_string();
        assert!(
            err.contains(&batchnorm::Error::InvalidVirtualBatch(v).to_string()),
            "{err}"
        );
    }
    let uncentred = BatchNormConfig {
        remove_mean: false,
        ..Default::default()
    };
    let err = pair(3, DType::F32, uncentred, 3400)?
        .ours
        .with_virtual_batch(Some(4))
        .unwrap_err();
    assert!(err.to_string().contains("remove_mean"), "{err}");
    assert_eq!(
        bn()?
            .with_virtual_batch(Some(4))?
            .with_virtual_batch(None)?
            .virtual_batch(),
        None
    );

    let (fused, composed) = paths(3, DType::F32, BatchNormConfig::default(), 3400, ghost(4))?;
    // 9 examples of NC: groups of 4, 4 and 1; the last holds one value per channel.
    let x = tensor(3401, &[9, 3], -1.0, 3.0, DType::F32)?;
    let want = batchnorm::Error::GhostGroupTooSmall {
        group: 2,
        count: 1,
        shape: vec![9, 3],
    };
    for bn in [&fused, &composed] {
        let before = f64s(bn.running_mean());
        let err = bn.forward_t(&x, true).unwrap_err().to_string();
        assert!(err.contains(&want.to_string()), "{err}");
        assert_eq!(f64s(bn.running_mean()), before);
        // The whole batch too small is the plain error, first.
        let one = tensor(3402, &[1, 3], -1.0, 3.0, DType::F32)?;
        let err = bn.forward_t(&one, true).unwrap_err().to_string();
        assert!(err.contains("more than 1 value"), "{err}");
    }
    Ok(())
}
