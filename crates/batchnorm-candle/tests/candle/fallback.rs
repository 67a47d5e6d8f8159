//! The composed candle-op path, the fallback on devices other than the CPU, called directly on
//! the CPU (`ComputePath::Composed`) for plain batch norm: against the f64 reference (Algorithm 1
//! forward and backward, the running update, inference) next to the fused path, on half types
//! against the fused path, and on the inputs the fused path takes (strided, without affine).
//! The variants' composed paths are checked in their own modules (frozen, ghost, renorm, masked).

use crate::common::{
    assert_close, check_paths, check_stats, f64s, for_cases, forward_backward, pair, paths, reference_outputs, running,
    tensor, tol_composed, tol_fused, OUTPUTS,
};
use batchnorm::{reference, Layout};
use batchnorm_candle::{BatchNormConfig, ComputePath};
use candle_core::{DType, ModuleT, Result};

const SHAPES: [&[usize]; 4] = [&[16, 5], &[8, 4, 7], &[4, 3, 5, 6], &[32, 2, 8, 8]];

/// Two training steps and an inference pass of each path against `reference::forward_train`,
/// `backward_train`, `running_update`, `forward_eval` and `backward_eval`.
#[test]
fn composed_plain_batch_norm_matches_the_reference_like_the_fused_path() -> Result<()> {
    for_cases(&SHAPES, 5000, |dtype, shape, seed| {
        let c = shape[1];
        let (fused, composed) = paths(c, dtype, BatchNormConfig::default(), seed, Ok)?;
        assert_eq!(
            (fused.compute(), composed.compute()),
            (ComputePath::Auto, ComputePath::Composed)
        );
        let g = Layout::ChannelsFirst.geometry(shape).unwrap();
        let m = g.per_channel();
        for step in 0..3 {
            let train = step < 2;
            let x = tensor(seed + 5 + step, shape, -1.0, 3.0, dtype)?;
            let w = tensor(seed + 7 + step, shape, -1.0, 1.0, dtype)?;
            let (gamma, beta) = fused.weight_and_bias().map(|(g, b)| (f64s(g), f64s(b))).unwrap();
            let (rm, rv) = (f64s(fused.running_mean()), f64s(fused.running_var()));
            let (xs, ws) = (f64s(&x), f64s(&w));
            let (y, mean, var) = reference::forward_train(&g, &xs, &gamma, &beta, 1e-5);
            let want = if train {
                let (dx, dgamma, dbeta) = reference::backward_train(&g, &xs, &ws, &gamma, 1e-5);
                reference_outputs(&y, &dx, &dgamma, &dbeta, shape)
            } else {
                let y = reference::forward_eval(&g, &xs, &rm, &rv, &gamma, &beta, 1e-5);
                let (dx, dgamma, dbeta) = reference::backward_eval(&g, &xs, &ws, &rm, &rv, &gamma, 1e-5);
                reference_outputs(&y, &dx, &dgamma, &dbeta, shape)
            };
            let got_fused = forward_backward(|x| fused.forward_t(x, train), fused.weight_and_bias(), &x, &w)?;
            let got_composed = forward_backward(|x| composed.forward_t(x, train), composed.weight_and_bias(), &x, &w)?;
            let what = format!("{shape:?} {dtype:?} step {step} train={train}");
            check_paths(&what, &got_fused, &got_composed, &want, dtype, m);
            let (rm, rv) = if train {
                reference::running_update(&rm, &rv, &mean, &var, m, Some(0.1), 1)
            } else {
                (rm, rv)
            };
            check_stats(&what, running(&fused), running(&composed), [&rm, &rv], dtype, m);
        }
        Ok(())
    })
}

/// Half types on the composed path compute in f32, as on the fused path: the two differ by the
/// f32 computation's tolerances plus one rounding of each result to the half type (2·ε of the
/// half type each side); the running statistics stay in the half type.
#[test]
fn composed_half_precision_goes_through_f32() -> Result<()> {
    for dtype in [DType::F16, DType::BF16] {
        let shape = [8, 3, 4];
        let (fused, composed) = paths(3, dtype, BatchNormConfig::default(), 5100, Ok)?;
        let x = tensor(5101, &shape, -1.0, 3.0, dtype)?;
        let w = tensor(5102, &shape, -1.0, 1.0, dtype)?;
        let tol = 4.0 * crate::common::eps_of(dtype) + tol_fused(DType::F32, 32) + tol_composed(DType::F32, 32);
        for train in [true, false] {
            let a = forward_backward(|x| fused.forward_t(x, train), fused.weight_and_bias(), &x, &w)?;
            let b = forward_backward(|x| composed.forward_t(x, train), composed.weight_and_bias(), &x, &w)?;
            for k in 0..4 {
                assert_eq!(b[k].dtype(), dtype);
                assert_close(&format!("{} {dtype:?} train={train}", OUTPUTS[k]), &b[k], &a[k], tol);
            }
        }
        assert_eq!(composed.running_mean().dtype(), dtype);
        assert_close("running mean", composed.running_mean(), fused.running_mean(), tol);
        assert_close("running var", composed.running_var(), fused.running_var(), tol);
    }
    Ok(())
}

/// The composed path takes what the fused path takes: a strided input, a layer without γ and β
/// (gradient for x only), the same rejections; and it agrees with candle-nn, whose op chain it
/// shares, within the parity tests' candle-nn tolerances.
#[test]
fn composed_path_on_strided_input_without_affine_and_against_candle_nn() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let config = BatchNormConfig {
            affine: false,
            ..Default::default()
        };
        let (fused, composed) = paths(5, dtype, config, 5200, Ok)?;
        let theirs = pair(5, dtype, config, 5200)?.theirs;
        let xt = tensor(5201, &[5, 16], -1.0, 3.0, dtype)?.t()?;
        assert!(!xt.is_contiguous());
        let w = tensor(5202, &[16, 5], -1.0, 1.0, dtype)?;
        let tol = tol_fused(dtype, 16) + tol_composed(dtype, 16);
        for train in [true, false] {
            let a = forward_backward(|x| fused.forward_t(x, train), None, &xt, &w)?;
            let b = forward_backward(|x| composed.forward_t(x, train), None, &xt, &w)?;
            let t = forward_backward(|x| theirs.forward_t(x, train), None, &xt, &w)?;
            for k in 0..2 {
                assert_close(&format!("{} {dtype:?} train={train}", OUTPUTS[k]), &b[k], &a[k], tol);
                assert_close(
                    &format!("{} vs candle-nn", OUTPUTS[k]),
                    &b[k],
                    &t[k],
                    2.0 * tol_composed(dtype, 16),
                );
            }
        }
        let one = tensor(5203, &[1, 5], -1.0, 3.0, dtype)?;
        // The message's first line (a backtrace may follow).
        let message = |r: Result<candle_core::Tensor>| r.unwrap_err().to_string().lines().next().map(String::from);
        assert_eq!(
            message(fused.forward_t(&one, true)),
            message(composed.forward_t(&one, true))
        );
    }
    Ok(())
}
