//! Forward transforms against the f64 reference (`batchnorm::reference`), over random shapes and
//! every layout, f32 and f64, with and without affine: Algorithm 1 (`batch_norm_train`), the
//! inference transform of Algorithm 2 (`batch_norm_eval`), the split-phase `normalize`, and the
//! `BatchNorm` layer. Tolerances: see `common/mod.rs`.

use crate::common::*;
use batchnorm::{
    batch_norm_eval, batch_norm_train, reference, BatchNorm, BatchNormConfig, FixedStats, Layout, Momentum, SavedStats,
    View,
};
use proptest::prelude::*;

/// Algorithm 1: μ_B = (1/m)Σxᵢ, σ²_B = (1/m)Σ(xᵢ − μ_B)², x̂ᵢ = (xᵢ − μ_B)/√(σ²_B + ε),
/// yᵢ = γx̂ᵢ + β. Checks y, the batch statistics and the saved statistics.
fn check_train<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64, affine: bool, eps: f64) {
    let d = Data::new::<T>(layout, shape, seed);
    let (gamma, beta) = d.affine(affine);
    let (gt, bt) = (narrow::<T>(&gamma), narrow::<T>(&beta));
    let x = narrow::<T>(&d.x);
    let (y, stats, saved) = train(View::new(&x, shape, layout), affine_if(affine, &gt, &bt), eps);

    let (ry, rmean, rvar) = reference::forward_train(&d.g, &d.x, &gamma, &beta, eps);
    let m = d.g.per_channel();
    let rel = reduce_rel::<T>(m);
    let what = format!("{layout} {shape:?} affine={affine} eps={eps}");

    // Statistics are f64 whatever T is: compare in f64. Mean: scale mean|x|; variance: scale σ².
    assert_eq!(stats.count, m as u64, "{what}: count");
    assert_eq!(saved.count, m as u64, "{what}: saved.count");
    assert_close::<f64>(&format!("{what} mean"), &stats.mean, &rmean, &d.mean_abs_x(), rel);
    assert_close::<f64>(&format!("{what} saved.mean"), &saved.mean, &rmean, &d.mean_abs_x(), rel);
    assert_close::<f64>(&format!("{what} var"), &stats.var_biased(), &rvar, &rvar, rel);
    let rinv: Vec<f64> = rvar.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    assert_close::<f64>(&format!("{what} inv_std"), &saved.inv_std, &rinv, &rinv, rel);
    let runb: Vec<f64> = rvar.iter().map(|v| v * m as f64 / (m as f64 - 1.0)).collect();
    assert_close::<f64>(
        &format!("{what} var_unbiased"),
        &stats.var_unbiased(),
        &runb,
        &runb,
        rel,
    );

    let scale = train_y_scale(&d, &gamma, &beta, &rmean, &rvar, eps);
    assert_close(&format!("{what} y"), &y, &ry, &scale, rel);
}

/// Algorithm 2, step 11 (inference): y = γ/√(Var[x] + ε)·x + (β − γE[x]/√(Var[x] + ε)), computed
/// as γ(x − E[x])/√(Var[x] + ε) + β. Element-wise.
fn check_eval<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64, affine: bool, eps: f64) {
    let d = Data::new::<T>(layout, shape, seed);
    let (gamma, beta) = d.affine(affine);
    let (gt, bt) = (narrow::<T>(&gamma), narrow::<T>(&beta));
    let (x, mean, var) = (narrow::<T>(&d.x), narrow::<T>(&d.mean), narrow::<T>(&d.var));
    let mut y = vec![T::from_f64(f64::NAN); x.len()];
    batch_norm_eval(
        View::new(&x, shape, layout),
        FixedStats::new(&mean, &var),
        affine_if(affine, &gt, &bt),
        eps,
        &mut y,
    )
    .unwrap();
    assert_eval_y(
        &format!("eval {layout} {shape:?} affine={affine}"),
        &d,
        &y,
        &gamma,
        &beta,
        eps,
    );
}

/// `y` against the reference inference transform of `d.x` with the fixed statistics `d.mean`,
/// `d.var`, element-wise (tolerance: `eval_y_scale`, `elementwise_rel`).
fn assert_eval_y<T: PlainFloat>(what: &str, d: &Data, y: &[T], gamma: &[f64], beta: &[f64], eps: f64) {
    let ry = reference::forward_eval(&d.g, &d.x, &d.mean, &d.var, gamma, beta, eps);
    let scale = eval_y_scale(d, gamma, beta, eps);
    assert_close(what, y, &ry, &scale, elementwise_rel::<T>());
}

/// Split-phase normalization (Algorithm 1's x̂ and y given μ_B and 1/√(σ²_B + ε)) with externally
/// supplied statistics: element-wise against the reference formula.
fn check_normalize<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64, affine: bool, eps: f64) {
    let d = Data::new::<T>(layout, shape, seed);
    let (gamma, beta) = d.affine(affine);
    let (gt, bt) = (narrow::<T>(&gamma), narrow::<T>(&beta));
    let x = narrow::<T>(&d.x);
    let saved = SavedStats {
        count: d.g.per_channel() as u64,
        mean: d.mean.clone(),
        inv_std: d.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect(),
    };
    let y = split_normalize(View::new(&x, shape, layout), &saved, affine_if(affine, &gt, &bt));
    assert_eval_y(&format!("normalize {layout} {shape:?}"), &d, &y, &gamma, &beta, eps);
}

/// The layer: `forward_train` gives `batch_norm_train`'s bits and updates the running statistics
/// as `reference::running_update` (Algorithm 2's unbiased m/(m−1)·σ²_B, exponential or cumulative
/// average); `forward_eval` is the inference transform with those statistics.
fn check_layer<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64, affine: bool, momentum: Momentum) {
    let eps = 1e-5;
    let config = BatchNormConfig {
        eps,
        momentum,
        affine,
        track_running_stats: true,
        ..Default::default()
    };
    let d0 = Data::new::<T>(layout, shape, seed);
    let mut bn = BatchNorm::<T>::new(d0.g.channels, config).unwrap();
    if affine {
        bn.gamma = narrow(&d0.gamma);
        bn.beta = narrow(&d0.beta);
    }
    let m = d0.g.per_channel();
    for step in 0..3u64 {
        let d = Data::new::<T>(layout, shape, seed.wrapping_add(step * 7919));
        let x = narrow::<T>(&d.x);
        let mut y = vec![T::from_f64(0.0); x.len()];
        let (rm0, rv0) = (wide(&bn.running_mean), wide(&bn.running_var));
        let saved = bn.forward_train(View::new(&x, shape, layout), &mut y).unwrap();

        // Same bits as the stateless function.
        let mut y2 = vec![T::from_f64(0.0); x.len()];
        let (g2, b2) = (bn.gamma.clone(), bn.beta.clone());
        let (_, saved2) =
            batch_norm_train(View::new(&x, shape, layout), affine_if(affine, &g2, &b2), eps, &mut y2).unwrap();
        assert_bits("layer y", &y, &y2);
        assert_eq!(saved, saved2);
        assert_eq!(bn.num_batches_tracked, step + 1);

        // Running statistics: one step of the reference from the layer's previous (rounded) state.
        let (bm, bv) = reference::mean_var(&d.g, &d.x);
        let mom = match momentum {
            Momentum::Exponential(w) => Some(w),
            Momentum::Cumulative => None,
        };
        let (erm, erv) = reference::running_update(&rm0, &rv0, &bm, &bv, m, mom, step + 1);
        let rel = reduce_rel::<T>(m);
        let mabs = d.mean_abs_x();
        let mscale: Vec<f64> = (0..d.g.channels).map(|c| rm0[c].abs() + mabs[c]).collect();
        let vscale: Vec<f64> = (0..d.g.channels).map(|c| rv0[c].abs() + bv[c] * 2.0).collect();
        assert_close("running_mean", &bn.running_mean, &erm, &mscale, rel);
        assert_close("running_var", &bn.running_var, &erv, &vscale, rel);
    }
    // Inference with the running statistics.
    let d = Data::new::<T>(layout, shape, seed ^ 0x5eed);
    let x = narrow::<T>(&d.x);
    let mut y = vec![T::from_f64(0.0); x.len()];
    bn.forward_eval(View::new(&x, shape, layout), &mut y).unwrap();
    let (rm, rv) = (wide(&bn.running_mean), wide(&bn.running_var));
    let (gamma, beta) = if affine {
        (wide(&bn.gamma), wide(&bn.beta))
    } else {
        d.ones_zeros()
    };
    let ry = reference::forward_eval(&d.g, &d.x, &rm, &rv, &gamma, &beta, eps);
    let scale: Vec<f64> = (0..x.len())
        .map(|k| {
            let c = channel_of(&d.g, k);
            gamma[c].abs() * (d.x[k].abs() + rm[c].abs()) / (rv[c] + eps).sqrt() + beta[c].abs()
        })
        .collect();
    assert_close("layer forward_eval", &y, &ry, &scale, elementwise_rel::<T>());
}

shape_proptests! { 96;
    train_matches_reference_f64 => check_train for f64;
    train_matches_reference_f32 => check_train for f32;
    eval_matches_reference => check_eval for f64, f32;
    normalize_matches_reference => check_normalize for f64, f32;
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn layer_matches_reference(
        (layout, shape) in layout_shape(20_000),
        seed: u64,
        affine: bool,
        momentum in prop_oneof![Just(Momentum::Exponential(0.1)), Just(Momentum::Exponential(1.0)), Just(Momentum::Exponential(0.7)), Just(Momentum::Cumulative)],
    ) {
        check_layer::<f64>(layout, &shape, seed, affine, momentum);
        check_layer::<f32>(layout, &shape, seed, affine, momentum);
    }
}

/// Algorithm 1, the inference transform and both backward transforms (`backward`'s checks) on
/// shapes that exercise every internal chunking path: each pass of each plan, on one data set
/// per shape for the forwards and another for the backwards.
#[test]
fn passes_on_chunking_shapes() {
    use super::backward::{check_backward, check_backward_eval};
    for_each_chunking_shape(1000, |layout, shape, seed| {
        for affine in [true, false] {
            check_train::<f64>(layout, shape, seed, affine, 1e-5);
            check_train::<f32>(layout, shape, seed, affine, 1e-5);
        }
        check_eval::<f64>(layout, shape, seed, true, 1e-5);
        check_eval::<f32>(layout, shape, seed, false, 1e-5);
        check_normalize::<f32>(layout, shape, seed, true, 1e-3);
        let seed = seed + 1000;
        check_backward::<f64>(layout, shape, seed, true, 1e-5);
        check_backward::<f32>(layout, shape, seed, false, 1e-5);
        check_backward_eval::<f32>(layout, shape, seed, true, 1e-5);
        check_backward_eval::<f64>(layout, shape, seed, false, 1e-3);
    });
}

/// The layer on chunking shapes (rows with several tasks, planes fused and blocked).
#[test]
fn layer_on_chunking_shapes() {
    for (i, (layout, shape)) in chunking_shapes().into_iter().enumerate().step_by(2) {
        check_layer::<f32>(layout, &shape, 77 + i as u64, true, Momentum::Exponential(0.1));
        check_layer::<f64>(layout, &shape, 78 + i as u64, false, Momentum::Cumulative);
    }
}
