//! Weights through safetensors, folding into Linear/Conv2d, Algorithm 2 population statistics,
//! sharing with a candle-nn module, and rejected inputs.

use crate::common::{pair, scaled_err, tensor, values};
use batchnorm_candle::{batch_norm, BatchNorm, BatchNormConfig};
use candle_core::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("batchnorm-candle-{}-{name}.safetensors", std::process::id()))
}

#[test]
fn weights_round_trip_through_safetensors_into_both_modules() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let dev = Device::Cpu;
        // Train ours a little so that every variable differs from its initial value, then save.
        let p = pair(4, dtype, BatchNormConfig::default(), 700)?;
        for step in 0..3 {
            p.ours
                .forward_t(&tensor(710 + step, &[6, 4, 3], 0.0, 3.0, dtype)?, true)?;
        }
        let path = temp_path(&format!("ours-{dtype:?}"));
        p.ours_vm.save(&path)?;
        let bytes = std::fs::read(&path)?;
        std::fs::remove_file(&path)?;
        let names: Vec<String> = candle_core::safetensors::load_buffer(&bytes, &dev)?
            .into_keys()
            .collect();
        for name in ["weight", "bias", "running_mean", "running_var"] {
            assert!(names.iter().any(|n| n == name), "{name} not saved: {names:?}");
        }

        let config = BatchNormConfig::default();
        let vb = || VarBuilder::from_buffered_safetensors(bytes.clone(), dtype, &dev);
        let ours = batch_norm(4, config, vb()?)?;
        let theirs = candle_nn::batch_norm(4, config, vb()?)?;
        assert_eq!(
            ours.running_mean().to_vec1::<f64>().ok(),
            p.ours.running_mean().to_vec1::<f64>().ok()
        );
        let x = tensor(720, &[5, 4, 3], 0.0, 3.0, dtype)?;
        let want = p.ours.forward_t(&x, false)?;
        assert_eq!(scaled_err(&ours.forward_t(&x, false)?, &want), 0.0);
        let tol = if dtype == DType::F64 { 1e-13 } else { 2e-5 };
        assert!(scaled_err(&theirs.forward_t(&x, false)?, &want) <= tol);

        // And the other way: weights saved from candle-nn's module load into ours.
        for step in 0..2 {
            p.theirs
                .forward_t(&tensor(730 + step, &[6, 4, 3], 0.0, 3.0, dtype)?, true)?;
        }
        let path = temp_path(&format!("theirs-{dtype:?}"));
        p.theirs_vm.save(&path)?;
        let bytes = std::fs::read(&path)?;
        std::fs::remove_file(&path)?;
        let ours = batch_norm(4, config, VarBuilder::from_buffered_safetensors(bytes, dtype, &dev)?)?;
        assert_eq!(scaled_err(ours.running_var(), p.theirs.running_var()), 0.0);
        assert!(scaled_err(&ours.forward_t(&x, false)?, &p.theirs.forward_t(&x, false)?) <= tol);
    }
    Ok(())
}

#[test]
fn from_candle_shares_the_variables() -> Result<()> {
    let p = pair(3, DType::F64, BatchNormConfig::default(), 800)?;
    let shared = BatchNorm::from_candle(&p.theirs)?;
    assert_eq!(shared.momentum(), 0.1);
    shared.forward_t(&tensor(801, &[4, 3, 2], 5.0, 6.0, DType::F64)?, true)?;
    // The update went into candle-nn's own variables.
    assert_eq!(scaled_err(p.theirs.running_mean(), shared.running_mean()), 0.0);
    assert!(p.theirs.running_mean().to_vec1::<f64>()?.iter().all(|&m| m > 0.4));
    Ok(())
}

#[test]
fn fold_into_linear_equals_linear_then_batch_norm() -> Result<()> {
    let dev = Device::Cpu;
    for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-6)] {
        for with_bias in [true, false] {
            let p = pair(4, dtype, BatchNormConfig::default(), 900)?;
            for step in 0..2 {
                p.ours
                    .forward_t(&tensor(901 + step, &[8, 4], -3.0, 1.0, dtype)?, true)?;
            }
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, dtype, &dev);
            let lin = if with_bias {
                candle_nn::linear(6, 4, vb)?
            } else {
                candle_nn::linear_no_bias(6, 4, vb)?
            };
            let folded = p.ours.fold_into_linear(&lin)?;
            assert!(folded.bias().is_some());
            let x = tensor(910, &[5, 6], -1.0, 1.0, dtype)?;
            let want = p.ours.forward_t(&lin.forward(&x)?, false)?;
            let got = folded.forward(&x)?;
            // Both sides round at different points (the fold once in f64 then to the dtype, the
            // reference after the matmul and after the normalization): a few ulps.
            assert!(scaled_err(&got, &want) <= tol, "{dtype:?} bias={with_bias}");
            assert_eq!(got.dtype(), dtype);
        }
    }
    Ok(())
}

#[test]
fn fold_into_conv2d_equals_conv_then_batch_norm() -> Result<()> {
    let dev = Device::Cpu;
    for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-6)] {
        for groups in [1, 2] {
            let config = BatchNormConfig {
                affine: groups == 1, // also the layer without γ, β
                ..Default::default()
            };
            let p = pair(4, dtype, config, 1000)?;
            p.ours.forward_t(&tensor(1001, &[3, 4, 5, 5], 1.0, 2.0, dtype)?, true)?;
            let vm = VarMap::new();
            let cfg = Conv2dConfig {
                padding: 1,
                stride: 1,
                groups,
                ..Default::default()
            };
            let conv = candle_nn::conv2d(2, 4, 3, cfg, VarBuilder::from_varmap(&vm, dtype, &dev))?;
            let folded = p.ours.fold_into_conv2d(&conv)?;
            assert_eq!(folded.config().groups, groups);
            let x = tensor(1010, &[2, 2, 6, 6], -1.0, 1.0, dtype)?;
            let want = p.ours.eval_mode().forward(&conv.forward(&x)?)?;
            assert!(
                scaled_err(&folded.forward(&x)?, &want) <= tol,
                "{dtype:?} groups={groups}"
            );
        }
    }
    Ok(())
}

#[test]
fn population_statistics_follow_algorithm_2() -> Result<()> {
    let (shape, batches) = ([10, 3, 4], 5u64);
    for dtype in [DType::F64, DType::F32] {
        let p = pair(3, dtype, BatchNormConfig::default(), 1100)?;
        assert!(p.ours.population_stats()?.is_none());
        assert!(p.ours.finish_population_stats().is_err()); // not started
        p.ours.begin_population_stats()?;
        assert!(p.ours.finish_population_stats().is_err()); // no batch yet
        let (mut sum_mean, mut sum_var) = (vec![0.0; 3], vec![0.0; 3]);
        for b in 0..batches {
            let x = tensor(1110 + b, &shape, b as f64, 2.0 + 2.0 * b as f64, dtype)?;
            p.ours.forward_t(&x, true)?;
            // Reference per batch: μ_B and the biased σ²_B, in f64 on the same values.
            let xf = x.to_dtype(DType::F64)?.transpose(0, 1)?.flatten_from(1)?;
            let mu = xf.mean_keepdim(1)?;
            let var = xf.broadcast_sub(&mu)?.sqr()?.mean(1)?;
            for (c, (m, v)) in mu
                .flatten_all()?
                .to_vec1::<f64>()?
                .iter()
                .zip(var.to_vec1::<f64>()?)
                .enumerate()
            {
                sum_mean[c] += m;
                sum_var[c] += v;
            }
        }
        assert_eq!(p.ours.population_stats()?.unwrap().batches(), batches);
        let pop = p.ours.finish_population_stats()?;
        assert!(p.ours.population_stats()?.is_none());
        let m = (shape[0] * shape[2]) as f64;
        let want_mean: Vec<f64> = sum_mean.iter().map(|s| s / batches as f64).collect();
        let want_var: Vec<f64> = sum_var.iter().map(|s| m / (m - 1.0) * s / batches as f64).collect();
        let (got_mean, got_var) = (pop.mean().unwrap(), pop.var().unwrap());
        for c in 0..3 {
            assert!((got_mean[c] - want_mean[c]).abs() <= 1e-12 * want_mean[c].abs().max(1.0));
            assert!((got_var[c] - want_var[c]).abs() <= 1e-12 * want_var[c]);
        }
        // The running statistics are now the estimate (rounded to the dtype).
        let dev = Device::Cpu;
        let rm = Tensor::new(want_mean.as_slice(), &dev)?;
        let rv = Tensor::new(want_var.as_slice(), &dev)?;
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-7 };
        assert!(scaled_err(p.ours.running_mean(), &rm) <= tol && scaled_err(p.ours.running_var(), &rv) <= tol);
        // … and inference uses them.
        let x = tensor(1200, &shape, 0.0, 1.0, dtype)?;
        let y = p.ours.forward_t(&x, false)?;
        let p2 = pair(3, dtype, BatchNormConfig::default(), 1100)?;
        p2.ours.set_running_stats(&rm, &rv)?;
        assert!(scaled_err(&y, &p2.ours.forward_t(&x, false)?) <= tol);
        // An estimate kept elsewhere can be set directly.
        p2.ours.set_population_stats(&pop)?;
        assert!(p2
            .ours
            .set_population_stats(&batchnorm::PopulationStats::new(3))
            .is_err());
        assert!(p2
            .ours
            .set_population_stats(&batchnorm::PopulationStats::new(2))
            .is_err());
    }
    // The uncentred variant has no mean to average.
    let config = BatchNormConfig {
        remove_mean: false,
        ..Default::default()
    };
    assert!(pair(3, DType::F32, config, 1)?.ours.begin_population_stats().is_err());
    Ok(())
}

#[test]
fn bad_shapes_and_settings_are_errors_not_panics() -> Result<()> {
    let dev = Device::Cpu;
    let p = pair(3, DType::F32, BatchNormConfig::default(), 1300)?;
    let bn = &p.ours;
    let msg = |r: Result<Tensor>| r.expect_err("must be rejected").to_string();
    for train in [true, false] {
        // Rank 1, wrong channel count, zero dimension, integer dtype.
        assert!(msg(bn.forward_t(&Tensor::zeros(3, DType::F32, &dev)?, train)).contains("at least two dimensions"));
        assert!(msg(bn.forward_t(&Tensor::zeros((4, 2), DType::F32, &dev)?, train)).contains("number of features"));
        assert!(msg(bn.forward_t(&Tensor::zeros((0, 3), DType::F32, &dev)?, train)).contains("empty"));
        assert!(msg(bn.forward_t(&Tensor::zeros((4, 3), DType::U32, &dev)?, train)).contains("dtype"));
    }
    // One value per channel: no variance to estimate in training; fine in inference.
    let one = Tensor::ones((1, 3), DType::F32, &dev)?;
    assert!(msg(bn.forward_t(&one, true)).contains("more than 1 value"));
    assert_eq!(bn.forward_t(&one, false)?.dims(), [1, 3]);
    assert!(bn
        .eval_mode()
        .forward(&Tensor::zeros((2, 4, 1), DType::F32, &dev)?)
        .is_err());
    // A rejected training batch leaves the running statistics alone.
    assert_eq!(scaled_err(bn.running_mean(), p.theirs.running_mean()), 0.0);

    // Settings and variables.
    let vb = || VarBuilder::zeros(DType::F32, &dev);
    for (eps, momentum) in [(0.0, 0.1), (-1e-5, 0.1), (f64::NAN, 0.1), (1e-5, 1.5), (1e-5, -0.1)] {
        let config = BatchNormConfig {
            eps,
            momentum,
            ..Default::default()
        };
        assert!(batch_norm(3, config, vb()).is_err(), "eps {eps} momentum {momentum}");
    }
    let v = |n: usize| Tensor::ones(n, DType::F32, &dev);
    assert!(BatchNorm::new(3, v(2)?, v(3)?, v(3)?, v(3)?, 1e-5).is_err());
    assert!(BatchNorm::new(3, v(3)?, v(3)?, v(3)?, v(4)?, 1e-5).is_err());
    assert!(BatchNorm::new_no_bias(3, v(3)?, v(3)?, 1e-5).is_ok());
    assert!(BatchNorm::from_parts(3, v(3)?, v(3)?, None, BatchNormConfig::default()).is_err());
    assert!(bn.set_running_stats(&v(2)?, &v(3)?).is_err());

    // Folding into a layer with another output count.
    let lin = candle_nn::Linear::new(Tensor::ones((5, 2), DType::F32, &dev)?, None);
    assert!(bn.fold_into_linear(&lin).is_err());
    let lin = candle_nn::Linear::new(Tensor::ones((3, 2), DType::F32, &dev)?, Some(v(4)?));
    assert!(bn.fold_into_linear(&lin).is_err());
    let conv = candle_nn::Conv2d::new(Tensor::ones((2, 1, 3, 3), DType::F32, &dev)?, None, Default::default());
    assert!(bn.fold_into_conv2d(&conv).is_err());
    Ok(())
}

#[test]
fn deterministic_values_helper_is_stable() {
    // The tests' data must not change between runs or machines.
    let v = values(1, 3, 0.0, 1.0);
    assert_eq!(v, values(1, 3, 0.0, 1.0));
    assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
}
