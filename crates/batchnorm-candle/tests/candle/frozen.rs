//! Frozen batch norm and the small-batch policy through candle: training passes that normalize
//! with the running statistics, y = γ·(x − μ_run)/√(σ²_run + ε) + β, update nothing, and
//! backpropagate dx = γ·dy/√(σ²_run + ε), dγ = Σ dy·x̂, dβ = Σ dy (issue 16's definitions), on both
//! compute paths; the frozen state against the caller's train flag.

use crate::common::{
    assert_bits, assert_close, f64s, for_cases, forward_backward, pair, paths, reference_outputs, tensor, tol_composed,
    tol_fused, OUTPUTS,
};
use batchnorm::{reference, Layout};
use batchnorm_candle::{BatchNormConfig, SmallBatch};
use candle_core::{DType, ModuleT, Result, Tensor};

/// Frozen training pass (fused and composed) against the f64 reference `frozen_forward` /
/// `frozen_backward` and against candle-nn's inference pass on equal variables; the running
/// statistics stay as they were, bit for bit.
#[test]
fn frozen_training_uses_the_running_statistics_as_constants() -> Result<()> {
    for_cases(
        &[&[12usize, 3][..], &[4, 3, 5], &[3, 3, 4, 2]],
        2000,
        |dtype, shape, seed| {
            let p = pair(3, dtype, BatchNormConfig::default(), seed)?;
            let (fused, composed) = paths(3, dtype, BatchNormConfig::default(), seed, |bn| {
                bn.freeze();
                Ok(bn)
            })?;
            let x = tensor(seed + 5, shape, -1.0, 3.0, dtype)?;
            let w = tensor(seed + 6, shape, -1.0, 1.0, dtype)?;
            let (rm, rv) = (f64s(fused.running_mean()), f64s(fused.running_var()));
            let (gamma, beta) = fused.weight_and_bias().map(|(g, b)| (f64s(g), f64s(b))).unwrap();
            let g = Layout::ChannelsFirst.geometry(shape).unwrap();
            let (xs, ws) = (f64s(&x), f64s(&w));
            let y = reference::frozen_forward(&g, &xs, &rm, &rv, &gamma, &beta, 1e-5);
            let (dx, dgamma, dbeta) = reference::frozen_backward(&g, &xs, &ws, &rm, &rv, &gamma, 1e-5);
            let want = reference_outputs(&y, &dx, &dgamma, &dbeta, shape);
            let theirs = forward_backward(|x| p.theirs.forward_t(x, false), p.theirs.weight_and_bias(), &x, &w)?;
            let m = g.per_channel();
            for (bn, tol) in [(&fused, tol_fused(dtype, m)), (&composed, tol_composed(dtype, m))] {
                let got = forward_backward(|x| bn.forward_t(x, true), bn.weight_and_bias(), &x, &w)?;
                for k in 0..4 {
                    let what = format!("{} {shape:?} {dtype:?} {:?}", OUTPUTS[k], bn.compute());
                    assert_close(&what, &got[k], &want[k], tol);
                    assert_close(
                        &format!("{what} vs candle-nn"),
                        &got[k],
                        &theirs[k],
                        tol + tol_composed(dtype, m),
                    );
                }
                assert_bits("running mean", bn.running_mean(), p.ours.running_mean());
                assert_bits("running var", bn.running_var(), p.ours.running_var());
            }
            Ok(())
        },
    )
}

/// The frozen state is the layer's: no train flag undoes it, clones share it, it lasts until
/// unfrozen, and `set_frozen` restores it; a frozen training pass is the inference pass, bit for
/// bit, and adds nothing to the population statistics.
#[test]
fn frozen_state_survives_the_train_flag() -> Result<()> {
    let p = pair(4, DType::F32, BatchNormConfig::default(), 2100)?;
    let bn = &p.ours;
    assert!(!bn.is_frozen());
    let clone = bn.clone();
    bn.freeze();
    assert!(clone.is_frozen(), "clones share the state");
    bn.begin_population_stats()?;
    let before = (f64s(bn.running_mean()), f64s(bn.running_var()));
    for step in 0..3 {
        let x = tensor(2110 + step, &[6, 4, 3], 1.0, 4.0, DType::F32)?;
        let y_train = bn.forward_t(&x, true)?;
        assert_bits("frozen train = eval", &y_train, &bn.forward_t(&x, false)?);
        assert!(bn.is_frozen());
    }
    assert_eq!((f64s(bn.running_mean()), f64s(bn.running_var())), before);
    assert_eq!(bn.population_stats()?.map(|p| p.batches()), Some(0));

    clone.unfreeze();
    assert!(!bn.is_frozen());
    let x = tensor(2120, &[6, 4, 3], 1.0, 4.0, DType::F32)?;
    let y_train = bn.forward_t(&x, true)?;
    assert_ne!(f64s(bn.running_mean()), before.0, "unfrozen: training updates again");
    assert_ne!(f64s(&y_train), f64s(&bn.forward_t(&x, false)?));
    assert_eq!(bn.population_stats()?.map(|p| p.batches()), Some(1));

    bn.set_frozen(true);
    assert!(bn.is_frozen() && clone.is_frozen());
    bn.set_frozen(false);
    assert!(!clone.is_frozen());
    Ok(())
}

/// The small-batch policy: a training batch of one value per channel is an error by default and,
/// with `SmallBatch::UseRunningStats`, the frozen transform (the inference pass, bit for bit, and
/// its gradients) without any update; the next batch of two trains as usual. Both paths.
#[test]
fn small_batch_policy_normalizes_a_batch_of_one_with_the_running_statistics() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let (fused, composed) = paths(3, dtype, BatchNormConfig::default(), 2200, |bn| {
            Ok(bn.with_small_batch(SmallBatch::UseRunningStats))
        })?;
        let strict = pair(3, dtype, BatchNormConfig::default(), 2200)?.ours;
        assert_eq!(strict.small_batch(), SmallBatch::Error);
        for shape in [&[1usize, 3][..], &[1, 3, 1]] {
            let x = tensor(2201, shape, -1.0, 3.0, dtype)?;
            let w = tensor(2202, shape, -1.0, 1.0, dtype)?;
            let err = strict.forward_t(&x, true).unwrap_err().to_string();
            let want = batchnorm::Error::TooFewValues {
                count: 1,
                shape: shape.to_vec(),
            };
            assert!(err.contains(&want.to_string()), "{err}");
            for bn in [&fused, &composed] {
                assert_eq!(bn.small_batch(), SmallBatch::UseRunningStats);
                let before = (f64s(bn.running_mean()), f64s(bn.running_var()));
                let train = forward_backward(|x| bn.forward_t(x, true), bn.weight_and_bias(), &x, &w)?;
                let eval = forward_backward(|x| bn.forward_t(x, false), bn.weight_and_bias(), &x, &w)?;
                for k in 0..4 {
                    assert_bits(OUTPUTS[k], &train[k], &eval[k]);
                }
                assert_eq!((f64s(bn.running_mean()), f64s(bn.running_var())), before);
                assert!(!bn.is_frozen(), "the policy does not freeze the layer");
            }
        }
        // A batch of two values per channel uses its own statistics (and updates).
        let x: Tensor = tensor(2203, &[2, 3], -1.0, 3.0, dtype)?;
        let before = f64s(fused.running_mean());
        fused.forward_t(&x, true)?;
        assert_ne!(f64s(fused.running_mean()), before);
    }
    Ok(())
}
