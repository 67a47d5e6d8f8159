//! candle-nn's constructors on our `BatchNorm`: the same signatures (code written for candle-nn
//! compiles unchanged) and the same behaviour as candle-nn's own on equal tensors: settings,
//! outputs, running statistics, rejections.

use crate::common::{assert_close, tensor, tol_composed, tol_fused};
use batchnorm_candle::BatchNorm;
use candle_core::{DType, ModuleT, Result, Tensor};

/// Builds a layer by candle-nn's constructor set: `new_with_momentum` / `new_no_bias_with_momentum`
/// or, at candle-nn's default momentum 0.1, also `new` / `new_no_bias`. Written once for both
/// crates' types by a macro, as user code would be.
macro_rules! build {
    ($ty:ty, $c:expr, $rm:expr, $rv:expr, $wb:expr, $eps:expr, $momentum:expr, $plain:expr) => {{
        let (c, rm, rv, wb, eps, momentum): (usize, Tensor, Tensor, Option<(Tensor, Tensor)>, f64, f64) =
            ($c, $rm, $rv, $wb, $eps, $momentum);
        match (wb, $plain) {
            (Some((w, b)), true) => <$ty>::new(c, rm, rv, w, b, eps),
            (Some((w, b)), false) => <$ty>::new_with_momentum(c, rm, rv, w, b, eps, momentum),
            (None, true) => <$ty>::new_no_bias(c, rm, rv, eps),
            (None, false) => <$ty>::new_no_bias_with_momentum(c, rm, rv, eps, momentum),
        }
    }};
}

/// Each constructor against candle-nn's on equal tensors: eps, momentum and affine settings
/// equal; three training steps give outputs and running statistics within the sum of both
/// paths' tolerances (candle-nn sums in the tensor's type, as our composed path does), and so
/// does inference after them.
#[test]
fn candle_nn_constructors_behave_as_candle_nn() -> Result<()> {
    let shape = [6, 3, 4];
    let m = 24;
    for dtype in [DType::F32, DType::F64] {
        for affine in [true, false] {
            for (momentum, plain) in [(0.1, true), (0.0, false), (0.3, false), (1.0, false)] {
                let t = |seed: u64, lo: f64, hi: f64| tensor(seed, &[3], lo, hi, dtype);
                let wb = || -> Result<Option<(Tensor, Tensor)>> {
                    Ok(if affine {
                        Some((t(6002, 0.5, 1.5)?, t(6003, -0.5, 0.5)?))
                    } else {
                        None
                    })
                };
                let (rm, rv) = (t(6000, -0.2, 0.2)?, t(6001, 0.5, 1.5)?);
                let ours = build!(BatchNorm, 3, rm.clone(), rv.clone(), wb()?, 1e-5, momentum, plain)?;
                let theirs = build!(candle_nn::BatchNorm, 3, rm, rv, wb()?, 1e-5, momentum, plain)?;
                assert_eq!((ours.eps(), ours.momentum()), (theirs.eps(), theirs.momentum()));
                assert_eq!(ours.weight_and_bias().is_some(), theirs.weight_and_bias().is_some());
                assert!(ours.config().remove_mean);
                let tol = tol_fused(dtype, m) + tol_composed(dtype, m);
                for step in 0..4 {
                    let x = tensor(6010 + step, &shape, -1.0, 3.0, dtype)?;
                    let train = step < 3;
                    let what = format!("{dtype:?} affine={affine} momentum={momentum} step {step}");
                    assert_close(&what, &ours.forward_t(&x, train)?, &theirs.forward_t(&x, train)?, tol);
                    assert_close(&what, ours.running_mean(), theirs.running_mean(), tol);
                    assert_close(&what, ours.running_var(), theirs.running_var(), tol);
                }
            }
        }
    }
    Ok(())
}

/// What candle-nn's constructors reject, ours reject too: a momentum outside [0, 1] and tensors
/// of the wrong shape. (Ours also reject ε ≤ 0, which candle-nn accepts; see the README.)
#[test]
fn candle_nn_constructors_reject_what_candle_nn_rejects() -> Result<()> {
    let v = |n: usize| Tensor::ones(n, DType::F32, &candle_core::Device::Cpu);
    for momentum in [-0.1, 1.5, f64::NAN] {
        let wb = Some((v(3)?, v(3)?));
        assert!(build!(candle_nn::BatchNorm, 3, v(3)?, v(3)?, wb.clone(), 1e-5, momentum, false).is_err());
        assert!(build!(BatchNorm, 3, v(3)?, v(3)?, wb, 1e-5, momentum, false).is_err());
        assert!(build!(candle_nn::BatchNorm, 3, v(3)?, v(3)?, None, 1e-5, momentum, false).is_err());
        assert!(build!(BatchNorm, 3, v(3)?, v(3)?, None, 1e-5, momentum, false).is_err());
    }
    for plain in [true, false] {
        for (rm, rv, w, b) in [(2, 3, 3, 3), (3, 4, 3, 3), (3, 3, 2, 3), (3, 3, 3, 4)] {
            let wb = Some((v(w)?, v(b)?));
            assert!(build!(candle_nn::BatchNorm, 3, v(rm)?, v(rv)?, wb.clone(), 1e-5, 0.1, plain).is_err());
            assert!(build!(BatchNorm, 3, v(rm)?, v(rv)?, wb, 1e-5, 0.1, plain).is_err());
        }
    }
    Ok(())
}
