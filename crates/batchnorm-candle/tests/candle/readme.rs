//! The README's candle example, compiled and run, with its claims checked: the folded Linear
//! equals Linear followed by inference BN on Algorithm 2's population statistics.

use batchnorm_candle::{batch_norm, BatchNormConfig};
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{linear, VarBuilder, VarMap};

#[test]
fn readme_example_runs_and_folding_matches() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let fc = linear(784, 100, vb.pp("fc"))?;
    let bn = batch_norm(100, BatchNormConfig::default(), vb.pp("bn"))?;
    let x = Tensor::randn(0f32, 1., (60, 784), &dev)?;
    let y = bn.forward_t(&x.apply(&fc)?, true)?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    let (weight, bias) = bn.weight_and_bias().expect("affine by default");
    assert!(grads.get(weight).is_some() && grads.get(bias).is_some());

    bn.begin_population_stats()?;
    for _ in 0..50 {
        bn.forward_t(&Tensor::randn(0f32, 1., (60, 784), &dev)?.apply(&fc)?, true)?;
    }
    bn.finish_population_stats()?;
    let folded = bn.fold_into_linear(&fc)?;
    let y_eval = x.apply(&folded)?;

    let expected = bn.forward_t(&x.apply(&fc)?, false)?;
    let max_diff = (y_eval - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
    // f32 rounding of a 784-term dot product scaled by γ/σ: a few ulps of the largest output.
    assert!(
        max_diff <= 1e-5 * scale.max(1.0),
        "folded differs by {max_diff} (scale {scale})"
    );
    Ok(())
}
