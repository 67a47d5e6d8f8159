//! Masked batch norm through candle (`BatchNorm::forward_t_masked`): a mask of one entry per
//! example and position (`[N]` for `[N, C]`, `[N, L…]` for `[N, C, L…]`) selects the positions
//! that enter the statistics; valid positions are normalized with them, masked ones written as 0;
//! the backward is the exact derivative (dx = 0 at masked positions, which add nothing to dγ,
//! dβ); the running variance is unbiased with the valid count (issue 16's definition). Checked on
//! both compute paths against plain batch norm's f64 reference over the valid positions gathered;
//! the fused path against the kernel crate's masked functions bit for bit and against the
//! composed path; and for padding holding NaN or 1e30 changing nothing.

use crate::common::{
    assert_bits, assert_close, assert_outputs_bits, assert_outputs_close, assert_steps_match_kernel, check_paths,
    check_stats, eps_of, f64s, for_cases, forward_backward, from_f64s, kernel_step, pair, paths, reference_outputs,
    running, tensor, tol_composed, tol_fused, values, vecs, OUTPUTS,
};
use batchnorm::{
    batch_norm_backward_eval_masked, batch_norm_backward_masked, batch_norm_eval_masked, batch_norm_train_masked,
    reference, update_running_stats, Affine, FixedStats, Geometry, Layout, Momentum,
};
use batchnorm_candle::{BatchNorm, BatchNormConfig, SmallBatch};
use candle_core::{DType, Device, ModuleT, Result, Tensor, WithDType};

/// Input shapes with about 60 % of their positions valid (at least 2 per batch).
const SHAPES: [&[usize]; 3] = [&[10, 3], &[4, 3, 5], &[3, 2, 4, 2]];

/// The mask's shape for an input of shape `shape`: `[N, d1, …]`.
fn mask_shape(shape: &[usize]) -> Vec<usize> {
    let mut m = vec![shape[0]];
    m.extend_from_slice(&shape[2..]);
    m
}

/// A deterministic mask for `shape` (about 60 % valid, never fewer than 2), as 0/1 `u8`.
fn mask_for(shape: &[usize], seed: u64) -> Result<(Tensor, Vec<bool>)> {
    let dims = mask_shape(shape);
    let n = dims.iter().product();
    let mut bits: Vec<bool> = values(seed, n, 0.0, 1.0).into_iter().map(|v| v < 0.6).collect();
    bits[0] = true;
    bits[n - 1] = true;
    let bytes: Vec<u8> = bits.iter().map(|&b| b as u8).collect();
    Ok((Tensor::from_vec(bytes, dims, &Device::Cpu)?, bits))
}

/// A padded-sequence mask for `shape`: example k valid for its first `lengths[k % lengths.len()]`
/// positions (row-major over `[d1, …]`, capped at their number), the rest padding; as 0/1 `u8`.
fn padded_mask(shape: &[usize], lengths: &[usize]) -> Result<(Tensor, Vec<bool>)> {
    let dims = mask_shape(shape);
    let per_example: usize = dims[1..].iter().product();
    let bits: Vec<bool> = (0..dims[0])
        .flat_map(|k| (0..per_example).map(move |p| p < lengths[k % lengths.len()]))
        .collect();
    let bytes: Vec<u8> = bits.iter().map(|&b| b as u8).collect();
    Ok((Tensor::from_vec(bytes, dims, &Device::Cpu)?, bits))
}

/// Padded-sequence lengths: a full example, a long and a short prefix, and an empty one.
const LENGTHS: [usize; 4] = [usize::MAX, 23, 3, 0];

/// The valid positions of a channels-first `shape`: (example·spatial index, its offset per
/// channel) for each position whose mask bit is on, in order.
fn valid_positions(g: &Geometry, bits: &[bool]) -> Vec<(usize, usize)> {
    (0..g.outer)
        .flat_map(|o| (0..g.inner).map(move |i| (o, i)))
        .zip(bits)
        .filter_map(|(p, &on)| on.then_some(p))
        .collect()
}

/// [`mask_for`]'s mask and its valid positions ([`valid_positions`]).
fn masked_positions(shape: &[usize], seed: u64) -> Result<(Tensor, Vec<(usize, usize)>)> {
    let (mask, bits) = mask_for(shape, seed)?;
    let g = Layout::ChannelsFirst.geometry(shape).unwrap();
    Ok((mask, valid_positions(&g, &bits)))
}

/// The values of `v` at the valid positions as an NC batch `[count, C]` (row r = position r).
fn gather(g: &Geometry, v: &[f64], positions: &[(usize, usize)]) -> Vec<f64> {
    let at = |o: usize, c: usize, i: usize| (o * g.channels + c) * g.inner + i;
    positions
        .iter()
        .flat_map(|&(o, i)| (0..g.channels).map(move |c| v[at(o, c, i)]))
        .collect()
}

/// An NC batch `[count, C]` written back at the valid positions, 0 elsewhere.
fn scatter(g: &Geometry, rows: &[f64], positions: &[(usize, usize)]) -> Vec<f64> {
    let mut out = vec![0.0; g.len()];
    for (r, &(o, i)) in positions.iter().enumerate() {
        for c in 0..g.channels {
            out[(o * g.channels + c) * g.inner + i] = rows[r * g.channels + c];
        }
    }
    out
}

/// Two training steps and an inference pass of each path against plain batch norm's reference
/// on the gathered valid positions (training: `reference::forward_train`, `backward_train` and
/// `running_update` with the valid count; inference: `frozen_forward` and `frozen_backward` with
/// the running statistics), the outputs scattered back with 0 at masked positions; then a frozen
/// layer's masked training pass is its masked inference pass, bit for bit.
#[test]
fn masked_batch_norm_is_plain_batch_norm_over_the_valid_positions() -> Result<()> {
    for_cases(&SHAPES, 7000, |dtype, shape, seed| {
        let c = shape[1];
        let (fused, composed) = paths(c, dtype, BatchNormConfig::default(), seed, Ok)?;
        let g = Layout::ChannelsFirst.geometry(shape).unwrap();
        for step in 0..3 {
            let train = step < 2;
            let (mask, positions) = masked_positions(shape, seed + 3 + step)?;
            let count = positions.len();
            let x = tensor(seed + 5 + step, shape, -1.0, 3.0, dtype)?;
            let w = tensor(seed + 7 + step, shape, -1.0, 1.0, dtype)?;
            let (gamma, beta) = fused.weight_and_bias().map(|(g, b)| (f64s(g), f64s(b))).unwrap();
            let (rm, rv) = (f64s(fused.running_mean()), f64s(fused.running_var()));
            let rows = Geometry {
                outer: count,
                channels: c,
                inner: 1,
            };
            let (xs, ws) = (gather(&g, &f64s(&x), &positions), gather(&g, &f64s(&w), &positions));
            let (y, (dx, dgamma, dbeta), (rm, rv)) = if train {
                let (y, mean, var) = reference::forward_train(&rows, &xs, &gamma, &beta, 1e-5);
                let grads = reference::backward_train(&rows, &xs, &ws, &gamma, 1e-5);
                (
                    y,
                    grads,
                    reference::running_update(&rm, &rv, &mean, &var, count, Some(0.1), 1),
                )
            } else {
                let y = reference::frozen_forward(&rows, &xs, &rm, &rv, &gamma, &beta, 1e-5);
                (
                    y,
                    reference::frozen_backward(&rows, &xs, &ws, &rm, &rv, &gamma, 1e-5),
                    (rm, rv),
                )
            };
            let (y, dx) = (scatter(&g, &y, &positions), scatter(&g, &dx, &positions));
            let want = reference_outputs(&y, &dx, &dgamma, &dbeta, shape);
            let run = |bn: &BatchNorm| {
                forward_backward(|x| bn.forward_t_masked(x, &mask, train), bn.weight_and_bias(), &x, &w)
            };
            let what = format!("{shape:?} {dtype:?} step {step} train={train} ({count} valid)");
            check_paths(&what, &run(&fused)?, &run(&composed)?, &want, dtype, count);
            check_stats(&what, running(&fused), running(&composed), [&rm, &rv], dtype, count);
        }
        let (mask, _) = masked_positions(shape, seed + 9)?;
        let x = tensor(seed + 8, shape, -1.0, 3.0, dtype)?;
        for bn in [&fused, &composed] {
            let run = |train| forward_backward(|x| bn.forward_t_masked(x, &mask, train), bn.weight_and_bias(), &x, &x);
            let (eval, stats) = (run(false)?, running(bn).map(f64s));
            bn.freeze();
            let frozen = run(true)?;
            assert_outputs_bits(&format!("frozen {shape:?} {dtype:?}"), &frozen, &eval);
            assert_eq!(running(bn).map(f64s), stats);
        }
        Ok(())
    })
}

/// A mask of all ones is plain batch norm, in training and inference: on the fused path bit for
/// bit (the kernel crate's masked functions give the plain bits then), running statistics
/// included; on the composed path within the sum of the two passes' tolerances.
#[test]
fn all_ones_mask_is_plain_batch_norm() -> Result<()> {
    for_cases(&SHAPES, 7200, |dtype, shape, seed| {
        let ones = Tensor::ones(mask_shape(shape), DType::U8, &Device::Cpu)?;
        let (fused, composed) = paths(shape[1], dtype, BatchNormConfig::default(), seed, Ok)?;
        let (fused_plain, composed_plain) = paths(shape[1], dtype, BatchNormConfig::default(), seed, Ok)?;
        let m = ones.elem_count();
        let x = tensor(seed + 5, shape, -1.0, 3.0, dtype)?;
        let w = tensor(seed + 7, shape, -1.0, 1.0, dtype)?;
        for (masked, plain, tol) in [
            (&fused, &fused_plain, None),
            (&composed, &composed_plain, Some(2.0 * tol_composed(dtype, m))),
        ] {
            let check = |what: &str, a: &Tensor, b: &Tensor| match tol {
                None => assert_bits(what, a, b),
                Some(tol) => assert_close(what, a, b, tol),
            };
            for train in [true, false] {
                let params = masked.weight_and_bias();
                let a = forward_backward(|x| masked.forward_t_masked(x, &ones, train), params, &x, &w)?;
                let b = forward_backward(|x| plain.forward_t(x, train), plain.weight_and_bias(), &x, &w)?;
                let what = format!("{shape:?} {dtype:?} train={train}");
                match tol {
                    None => assert_outputs_bits(&what, &a, &b),
                    Some(tol) => assert_outputs_close(&what, &a, &b, tol),
                }
            }
            check("running mean", masked.running_mean(), plain.running_mean());
            check("running var", masked.running_var(), plain.running_var());
        }
        Ok(())
    })
}

/// Padding never leaks: NaN, ±1e30 and infinities in x at masked positions, and NaN in the
/// upstream gradient there, leave every output, gradient and running statistic bit for bit as
/// with zeros there; on both paths, in training, inference and frozen, for a scattered mask and
/// a padded-sequence one (whose long stretches of padding the fused kernels skip).
#[test]
fn padding_holding_nan_or_1e30_changes_nothing() -> Result<()> {
    let shape = [4usize, 3, 40];
    for ((mask, bits), dtype) in [mask_for(&shape, 7301)?, padded_mask(&shape, &LENGTHS)?]
        .into_iter()
        .flat_map(|m| [(m.clone(), DType::F32), (m, DType::F64)])
    {
        let g = Layout::ChannelsFirst.geometry(&shape).unwrap();
        let clean = f64s(&tensor(7302, &shape, -1.0, 3.0, dtype)?);
        let dy_clean = f64s(&tensor(7303, &shape, -1.0, 1.0, dtype)?);
        let poison = [f64::NAN, 1e30, -1e30, f64::INFINITY];
        let with_padding = |v: &[f64], fill: Option<f64>| -> Result<Tensor> {
            let mut v = v.to_vec();
            for (k, p) in v.iter_mut().enumerate() {
                let position = (k / (g.channels * g.inner)) * g.inner + k % g.inner;
                if !bits[position] {
                    *p = fill.map_or(0.0, |f| if f.is_nan() { f } else { f * (1.0 + k as f64) });
                }
            }
            from_f64s(&v, &shape).to_dtype(dtype)
        };
        for path in [
            batchnorm_candle::ComputePath::Auto,
            batchnorm_candle::ComputePath::Composed,
        ] {
            for (train, frozen) in [(true, false), (false, false), (true, true)] {
                let run = |fill: Option<f64>| -> Result<(Vec<Tensor>, Vec<f64>)> {
                    let bn = pair(3, dtype, BatchNormConfig::default(), 7300)?
                        .ours
                        .with_compute(path);
                    bn.set_frozen(frozen);
                    let x = with_padding(&clean, fill)?;
                    let dy = with_padding(&dy_clean, fill.map(|_| f64::NAN))?;
                    let out =
                        forward_backward(|x| bn.forward_t_masked(x, &mask, train), bn.weight_and_bias(), &x, &dy)?;
                    Ok((out, [f64s(bn.running_mean()), f64s(bn.running_var())].concat()))
                };
                let (want, want_stats) = run(None)?;
                for fill in poison {
                    let (got, stats) = run(Some(fill))?;
                    for k in 0..4 {
                        let what = format!(
                            "{} {dtype:?} {path:?} train={train} frozen={frozen} padding {fill:e}",
                            OUTPUTS[k]
                        );
                        assert_bits(&what, &got[k], &want[k]);
                    }
                    assert_eq!(
                        stats.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want_stats.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    );
                }
            }
        }
    }
    Ok(())
}

/// Any integer mask dtype, nonzero meaning valid: `u8`, `u32` and `i64` masks holding 0, 1 and
/// other nonzero values give the same bits.
#[test]
fn mask_dtypes_and_nonzero_values() -> Result<()> {
    let shape = [4usize, 3, 5];
    let (mask, bits) = mask_for(&shape, 7401)?;
    let x = tensor(7402, &shape, -1.0, 3.0, DType::F32)?;
    let bn = pair(3, DType::F32, BatchNormConfig::default(), 7400)?.ours;
    let want = bn.forward_eval_masked(&x, &mask)?;
    let dims = mask_shape(&shape);
    let dev = Device::Cpu;
    let nonzero = |k: usize| if bits[k] { (k % 5 + 1) as i64 } else { 0 };
    let i64s: Vec<i64> = (0..bits.len()).map(nonzero).collect();
    let u32s: Vec<u32> = i64s.iter().map(|&v| v as u32 * 1000).collect();
    let u8s: Vec<u8> = i64s.iter().map(|&v| v as u8 * 50).collect();
    for m in [
        Tensor::from_vec(i64s, dims.as_slice(), &dev)?,
        Tensor::from_vec(u32s, dims.as_slice(), &dev)?,
        Tensor::from_vec(u8s, dims.as_slice(), &dev)?,
    ] {
        assert_bits(
            &format!("{:?} mask", m.dtype()),
            &bn.forward_eval_masked(&x, &m)?,
            &want,
        );
    }
    Ok(())
}

/// Rejected, both paths: a mask of the wrong shape or a float dtype, fewer than 2 valid positions
/// (`TooFewValues` with the valid count, the running statistics left alone), a ghost or uncentred
/// layer in training; and the small-batch policy takes a batch of one valid position to masked
/// inference.
#[test]
fn masked_errors_and_the_small_batch_policy() -> Result<()> {
    let dev = Device::Cpu;
    let shape = [4usize, 3, 5];
    let x = tensor(7501, &shape, -1.0, 3.0, DType::F32)?;
    let msg = |r: Result<Tensor>| r.expect_err("must be rejected").to_string();
    let (fused, composed) = paths(3, DType::F32, BatchNormConfig::default(), 7500, Ok)?;
    for bn in [&fused, &composed] {
        for train in [true, false] {
            for dims in [&[4usize][..], &[4, 6], &[4, 5, 1], &[5, 5]] {
                let m = Tensor::ones(dims, DType::U8, &dev)?;
                assert!(msg(bn.forward_t_masked(&x, &m, train)).contains("mask has shape"));
            }
            let m = Tensor::ones((4, 5), DType::F32, &dev)?;
            assert!(msg(bn.forward_t_masked(&x, &m, train)).contains("integer dtype"));
        }
        let mut one = vec![0u8; 20];
        one[7] = 1;
        let one = Tensor::from_vec(one, (4, 5), &dev)?;
        let before = f64s(bn.running_var());
        let want = batchnorm::Error::TooFewValues {
            count: 1,
            shape: shape.to_vec(),
        };
        assert!(msg(bn.forward_train_masked(&x, &one)).contains(&want.to_string()));
        assert_eq!(f64s(bn.running_var()), before);
        let policy = bn.clone().with_small_batch(SmallBatch::UseRunningStats);
        assert_bits(
            "small batch",
            &policy.forward_train_masked(&x, &one)?,
            &bn.forward_eval_masked(&x, &one)?,
        );
        assert_eq!(f64s(bn.running_var()), before);
        let ghost = bn.clone().with_virtual_batch(Some(2))?;
        let ones = Tensor::ones((4, 5), DType::U8, &dev)?;
        assert!(msg(ghost.forward_train_masked(&x, &ones)).contains("no ghost"));
    }
    let uncentred = BatchNormConfig {
        remove_mean: false,
        ..Default::default()
    };
    let bn = pair(3, DType::F32, uncentred, 7500)?.ours;
    let ones = Tensor::ones((4, 5), DType::U8, &dev)?;
    assert!(msg(bn.forward_train_masked(&x, &ones)).contains("uncentred"));
    Ok(())
}

/// Shapes for the fused path against the kernels and the composed path: NC, long sequences
/// (whose padded masks hold long stretches on and off) and a map of several spatial dimensions.
const FUSED_SHAPES: [&[usize]; 3] = [&[40, 3], &[6, 4, 40], &[4, 3, 6, 7]];

/// The fused path is the kernel crate's masked batch norm: three training steps against
/// `batch_norm_train_masked`, `batch_norm_backward_masked` and `update_running_stats` with the
/// masked batch statistics (momentum 0.1: the running variance unbiased with the valid count),
/// then the inference pass, and the frozen training pass, against `batch_norm_eval_masked` and
/// `batch_norm_backward_eval_masked` with the running statistics: outputs, gradients and
/// running statistics bit for bit, for a scattered and a padded-sequence mask.
fn masked_matches_the_kernel<T: batchnorm::Element<Param = T> + WithDType>() -> Result<()> {
    for (i, shape) in FUSED_SHAPES.into_iter().enumerate() {
        let seed = 7600 + 10 * i as u64;
        for (mask, bits) in [mask_for(shape, seed + 1)?, padded_mask(shape, &LENGTHS)?] {
            let bn = pair(shape[1], T::DTYPE, BatchNormConfig::default(), seed)?.ours;
            let (gamma, beta) = bn.weight_and_bias().unwrap();
            let [gamma, beta, mut mean, mut var] = vecs([gamma, beta, bn.running_mean(), bn.running_var()])?;
            let affine = Affine::new(&gamma, &beta);
            let stats = || running(&bn).map(Tensor::clone).to_vec();
            let ours = |x: &Tensor| bn.forward_train_masked(x, &mask);
            assert_steps_match_kernel::<T>(ours, bn.weight_and_bias(), stats, shape, seed, |x, dy, y, grads| {
                let (batch, saved) = batch_norm_train_masked(x, &bits, affine, 1e-5, y).unwrap();
                batch_norm_backward_masked(x, &bits, dy, &saved, Some(&gamma), grads).unwrap();
                update_running_stats(&batch, Momentum::Exponential(0.1), 1, &mut mean, &mut var).unwrap();
                vec![mean.clone(), var.clone()]
            })?;
            let x = tensor(seed + 2, shape, -1.0, 3.0, T::DTYPE)?;
            let w = tensor(seed + 3, shape, -1.0, 1.0, T::DTYPE)?;
            let want = kernel_step::<T>(&x, &w, |x, dy, y, grads| {
                let fixed = FixedStats::new(&mean, &var);
                batch_norm_eval_masked(x, &bits, fixed, affine, 1e-5, y).unwrap();
                batch_norm_backward_eval_masked(x, &bits, dy, fixed, Some(&gamma), 1e-5, grads).unwrap();
            })?;
            let what = format!("{shape:?} {:?}", T::DTYPE);
            for frozen in [false, true] {
                bn.set_frozen(frozen);
                let got = forward_backward(|x| bn.forward_t_masked(x, &mask, frozen), bn.weight_and_bias(), &x, &w)?;
                assert_outputs_bits(&format!("{what} inference (frozen={frozen})"), &got, &want);
            }
        }
    }
    Ok(())
}

#[test]
fn masked_fused_path_is_the_kernel_bit_for_bit() -> Result<()> {
    masked_matches_the_kernel::<f32>()?;
    masked_matches_the_kernel::<f64>()
}

/// The fused path against the composed one (`ComputePath::Composed`, the fallback off the CPU)
/// directly, for scattered and padded-sequence masks, in training (two steps, running
/// statistics included), inference and frozen: within the sum of the two paths' tolerances for
/// sums over the valid count m; for `f16`/`bf16`, which both paths compute in `f32`, within the
/// `f32` tolerances plus one rounding of each result to the half type on each side (2·ε of the
/// half type each).
#[test]
fn masked_fused_path_against_the_composed_path() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for (i, shape) in FUSED_SHAPES.into_iter().enumerate() {
            let seed = 7700 + 10 * i as u64;
            for (mask, bits) in [mask_for(shape, seed + 1)?, padded_mask(shape, &LENGTHS)?] {
                let m = bits.iter().filter(|&&on| on).count();
                let tol = match dtype {
                    DType::F16 | DType::BF16 => {
                        4.0 * eps_of(dtype) + tol_fused(DType::F32, m) + tol_composed(DType::F32, m)
                    }
                    _ => tol_fused(dtype, m) + tol_composed(dtype, m),
                };
                let (fused, composed) = paths(shape[1], dtype, BatchNormConfig::default(), seed, Ok)?;
                for (step, (train, frozen)) in [(true, false), (true, false), (false, false), (true, true)]
                    .into_iter()
                    .enumerate()
                {
                    let x = tensor(seed + 2 + step as u64, shape, -1.0, 3.0, dtype)?;
                    let w = tensor(seed + 6 + step as u64, shape, -1.0, 1.0, dtype)?;
                    let run = |bn: &BatchNorm| {
                        bn.set_frozen(frozen);
                        forward_backward(|x| bn.forward_t_masked(x, &mask, train), bn.weight_and_bias(), &x, &w)
                    };
                    let (a, b) = (run(&fused)?, run(&composed)?);
                    let what = format!("{shape:?} {dtype:?} {m} valid, step {step} train={train} frozen={frozen}");
                    for k in 0..4 {
                        assert_eq!(a[k].dtype(), dtype);
                        assert_close(&format!("{what} {}", OUTPUTS[k]), &a[k], &b[k], tol);
                    }
                    for (name, f, c) in [
                        ("running mean", fused.running_mean(), composed.running_mean()),
                        ("running var", fused.running_var(), composed.running_var()),
                    ] {
                        assert_close(&format!("{what} {name}"), f, c, tol);
                    }
                }
            }
        }
    }
    Ok(())
}
