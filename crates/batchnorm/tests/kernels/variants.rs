//! Frozen batch norm, the small-batch policy and batch renormalization (issue 16's definitions)
//! against the f64 reference (`reference::frozen_*`, `reference::renorm_*`) over random shapes,
//! layouts and element types, against central finite differences in f64, against plain batch
//! norm where they must equal it, and bitwise across thread counts. Tolerances are those of
//! `common` (see its module docs); each assertion names the equation it checks.

use crate::common::*;
use batchnorm::{
    batch_norm_backward, batch_norm_train, batch_renorm_backward, batch_renorm_eval, batch_renorm_train, reference,
    update_renorm_stats, Affine, BatchNorm, BatchNormConfig, BatchRenorm, BatchRenormConfig, Grads, Layout, RenormClip,
    RenormSaved, RenormSchedule, RenormStats, SingleProcess, SmallBatch, ThreadComm, View,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Frozen batch norm
// ---------------------------------------------------------------------------------------------

/// Frozen forward and backward of the layer against `reference::frozen_forward` and
/// `reference::frozen_backward`: y = γ·(x − μ_run)/√(σ²_run + ε) + β, dx = γ·dy/√(σ²_run + ε),
/// dγ = Σ dy·x̂, dβ = Σ dy; the running statistics and `num_batches_tracked` keep their bits.
fn check_frozen<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64, affine: bool, eps: f64) {
    let d = Data::new::<T>(layout, shape, seed);
    let (gamma, beta) = d.affine(affine);
    let mut bn = layer_with::<T>(&d, eps, affine, SmallBatch::Error);
    bn.freeze();
    let before = bn.clone();
    let (x, dy) = (narrow::<T>(&d.x), narrow::<T>(&d.dy));
    let n = x.len();
    let nan = T::from_f64(f64::NAN);
    let mut y = vec![nan; n];
    let saved = bn.forward_train(View::new(&x, shape, layout), &mut y).unwrap();
    let what = format!("frozen {layout} {shape:?} affine={affine} eps={eps}");
    let ry = reference::frozen_forward(&d.g, &d.x, &d.mean, &d.var, &gamma, &beta, eps);
    assert_close(
        &format!("{what} y"),
        &y,
        &ry,
        &eval_y_scale(&d, &gamma, &beta, eps),
        elementwise_rel::<T>(),
    );
    let (dx, dg, db) = layer_backward_all(&bn, View::new(&x, shape, layout), &dy, &saved);
    let (rdx, rdg, rdb) = reference::frozen_backward(&d.g, &d.x, &d.dy, &d.mean, &d.var, &gamma, eps);
    let sdx: Vec<f64> = (0..n)
        .map(|k| {
            let c = channel_of(&d.g, k);
            (d.dy[k] * gamma[c]).abs() / (d.var[c] + eps).sqrt()
        })
        .collect();
    let rel = reduce_rel::<T>(d.g.per_channel());
    assert_close(&format!("{what} dx"), &dx, &rdx, &sdx, elementwise_rel::<T>());
    if affine {
        assert_eval_param_grads(&what, (&dg, &db), (&rdg, &rdb), &d, eps, rel);
    }
    // The running statistics are constants: not updated by forward_train or backward.
    assert_bits(&format!("{what} running_mean"), &bn.running_mean, &before.running_mean);
    assert_bits(&format!("{what} running_var"), &bn.running_var, &before.running_var);
    assert_eq!(bn.num_batches_tracked, before.num_batches_tracked, "{what}");
    assert!(bn.is_frozen(), "{what}: still frozen");
}

shape_proptests! { 48;
    frozen_matches_reference_f64 => check_frozen for f64;
    frozen_matches_reference_f32 => check_frozen for f32;
}

/// The frozen state is the layer's, not a call's: it holds over repeated training passes (the
/// synchronized ones too, with one rank and with three) until `unfreeze`, after which training
/// uses batch statistics and updates the running statistics again; `set_frozen` restores it.
#[test]
fn frozen_state_survives_training_calls() {
    let (layout, shape) = (Layout::NCHW, vec![4, 3, 2, 5]);
    let d = Data::new::<f64>(layout, &shape, 7);
    let mut bn = layer_with::<f64>(&d, 1e-5, true, SmallBatch::Error);
    assert!(!bn.is_frozen());
    bn.freeze();
    let frozen = bn.clone();
    let n = d.x.len();
    let mut y = vec![0.0; n];
    let ry = reference::frozen_forward(&d.g, &d.x, &d.mean, &d.var, &d.gamma, &d.beta, 1e-5);
    let scale = eval_y_scale(&d, &d.gamma, &d.beta, 1e-5);
    for step in 0..3 {
        let saved = bn.forward_train(View::new(&d.x, &shape, layout), &mut y).unwrap();
        assert_close(&format!("step {step} y"), &y, &ry, &scale, elementwise_rel::<f64>());
        let (dx, dg, db) = layer_backward_all(&bn, View::new(&d.x, &shape, layout), &d.dy, &saved);
        let saved = bn
            .forward_train_sync(&SingleProcess, View::new(&d.x, &shape, layout), &mut y)
            .unwrap();
        assert_close(
            &format!("step {step} sync y"),
            &y,
            &ry,
            &scale,
            elementwise_rel::<f64>(),
        );
        let (mut dx_s, mut dg_s, mut db_s) = (vec![0.0; n], vec![0.0; 3], vec![0.0; 3]);
        bn.backward_sync(
            &SingleProcess,
            View::new(&d.x, &shape, layout),
            &d.dy,
            &saved,
            Grads::new(&mut dx_s, &mut dg_s, &mut db_s),
        )
        .unwrap();
        // One rank: the synchronized frozen backward is the one-process one, bit for bit.
        assert_bits("sync dx", &dx_s, &dx);
        assert_bits("sync dgamma", &dg_s, &dg);
        assert_bits("sync dbeta", &db_s, &db);
        assert_eq!(bn, frozen, "step {step}: the frozen layer changed");
    }
    bn.set_frozen(false);
    assert!(!bn.is_frozen());
    bn.forward_train(View::new(&d.x, &shape, layout), &mut y).unwrap();
    assert_eq!(
        bn.num_batches_tracked, 1,
        "unfrozen: the running statistics are updated again"
    );
    assert_ne!(bn.running_mean, frozen.running_mean);
    let mut y_plain = vec![0.0; n];
    batch_norm_train(
        View::new(&d.x, &shape, layout),
        Affine::new(&bn.gamma, &bn.beta),
        1e-5,
        &mut y_plain,
    )
    .unwrap();
    assert_bits("unfrozen y is Algorithm 1's", &y, &y_plain);
    bn.set_frozen(true);
    assert!(bn.is_frozen());
}

/// Frozen over three in-process ranks with uneven shards: each rank's dx is the frozen one of
/// its shard, dγ and dβ those of the concatenated batch, and nothing is updated.
#[test]
fn frozen_sync_over_three_ranks_equals_one_process() {
    let c = 3;
    let rows = [2usize, 5, 1];
    let total: usize = rows.iter().sum();
    let d = Data::new::<f64>(Layout::NC, &[total, c], 11);
    let mut whole = layer_with::<f64>(&d, 1e-5, true, SmallBatch::Error);
    whole.freeze();
    let mut y = vec![0.0; total * c];
    let shape = [total, c];
    let x = View::new(&d.x, &shape, Layout::NC);
    let saved = whole.forward_train(x, &mut y).unwrap();
    let (dx, dg, db) = layer_backward_all(&whole, x, &d.dy, &saved);
    let comms = ThreadComm::group(3).unwrap();
    let starts: Vec<usize> = rows.iter().scan(0, |s, r| Some(std::mem::replace(s, *s + r))).collect();
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let (bn, d) = (whole.clone(), &d);
                let (a, b) = (starts[rank] * c, (starts[rank] + rows[rank]) * c);
                scope.spawn(move || {
                    let mut bn = bn;
                    let shape = [rows[rank], c];
                    let (x, dy) = (&d.x[a..b], &d.dy[a..b]);
                    let mut y = vec![0.0; b - a];
                    let saved = bn
                        .forward_train_sync(&comm, View::new(x, &shape, Layout::NC), &mut y)
                        .unwrap();
                    let (mut dx, mut dg, mut db) = (vec![0.0; b - a], vec![0.0; c], vec![0.0; c]);
                    bn.backward_sync(
                        &comm,
                        View::new(x, &shape, Layout::NC),
                        dy,
                        &saved,
                        Grads::new(&mut dx, &mut dg, &mut db),
                    )
                    .unwrap();
                    (bn, y, dx, dg, db, a, b)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let rel = reduce_rel::<f64>(total);
    let sdb: Vec<f64> = sum_abs_dy(&d);
    for (bn, yr, dxr, dgr, dbr, a, b) in results {
        assert_eq!(bn, whole, "rank layer unchanged");
        assert_bits("rank y", &yr, &y[a..b]);
        assert_bits("rank dx", &dxr, &dx[a..b]);
        assert_close(
            "rank dgamma",
            &dgr,
            &wide(&dg),
            &eval_dgamma_scale(&d, &d.dy, 1e-5),
            rel,
        );
        assert_close("rank dbeta", &dbr, &wide(&db), &sdb, rel);
    }
}

// ---------------------------------------------------------------------------------------------
// Small-batch policy
// ---------------------------------------------------------------------------------------------

/// A batch of one value per channel: rejected by default ([`Error::TooFewValues`], nothing
/// changed); with `SmallBatch::UseRunningStats` normalized with the running statistics (the
/// frozen transform, `reference::frozen_forward`/`frozen_backward`) without updating them, and
/// the layer is not frozen: the next batch of two or more uses its own statistics.
#[test]
fn small_batch_policy() {
    // One example of four channels, in each layout.
    let one_example = [
        (Layout::NC, vec![1, 4]),
        (Layout::NCHW, vec![1, 4, 1, 1]),
        (Layout::NHWC, vec![1, 1, 1, 4]),
        (Layout::ChannelsFirst, vec![1, 4]),
    ];
    for (layout, shape) in one_example {
        let d = Data::new::<f32>(layout, &shape, 21);
        let (x, dy) = (narrow::<f32>(&d.x), narrow::<f32>(&d.dy));
        let eps = 1e-5;
        let mut strict = layer_with::<f32>(&d, eps, true, SmallBatch::Error);
        let before = strict.clone();
        let mut y = vec![f32::NAN; 4];
        let err = strict.forward_train(View::new(&x, &shape, layout), &mut y).unwrap_err();
        assert_eq!(
            err,
            batchnorm::Error::TooFewValues {
                count: 1,
                shape: shape.clone()
            }
        );
        assert_eq!(strict, before);
        assert!(y.iter().all(|v| v.is_nan()), "y untouched on error");

        let mut bn = layer_with::<f32>(&d, eps, true, SmallBatch::UseRunningStats);
        let before = bn.clone();
        let saved = bn.forward_train(View::new(&x, &shape, layout), &mut y).unwrap();
        let what = format!("small batch {layout} {shape:?}");
        let ry = reference::frozen_forward(&d.g, &d.x, &d.mean, &d.var, &d.gamma, &d.beta, eps);
        assert_close(
            &format!("{what} y"),
            &y,
            &ry,
            &eval_y_scale(&d, &d.gamma, &d.beta, eps),
            elementwise_rel::<f32>(),
        );
        assert_eq!(bn, before, "{what}: no running-statistics update, not frozen");
        let (dx, dg, db) = layer_backward_all(&bn, View::new(&x, &shape, layout), &dy, &saved);
        let (rdx, rdg, rdb) = reference::frozen_backward(&d.g, &d.x, &d.dy, &d.mean, &d.var, &d.gamma, eps);
        let sdx: Vec<f64> = (0..4)
            .map(|k| (d.dy[k] * d.gamma[k]).abs() / (d.var[k] + eps).sqrt())
            .collect();
        assert_close(&format!("{what} dx"), &dx, &rdx, &sdx, elementwise_rel::<f32>());
        assert_eval_param_grads(&what, (&dg, &db), (&rdg, &rdb), &d, eps, reduce_rel::<f32>(1));
        // Synchronized, one rank: the global batch is as small, the same transform.
        let mut y_sync = vec![f32::NAN; 4];
        let saved_sync = bn
            .forward_train_sync(&SingleProcess, View::new(&x, &shape, layout), &mut y_sync)
            .unwrap();
        assert_bits(&format!("{what} sync y"), &y_sync, &y);
        let mut dx_sync = vec![f32::NAN; 4];
        bn.backward_sync(
            &SingleProcess,
            View::new(&x, &shape, layout),
            &dy,
            &saved_sync,
            Grads::dx(&mut dx_sync),
        )
        .unwrap();
        assert_bits(&format!("{what} sync dx"), &dx_sync, &dx);
        assert_eq!(bn, before);

        // A batch of two: Algorithm 1 and a running-statistics update.
        let mut two = shape.clone();
        two[0] = 2;
        let x2: Vec<f32> = x.iter().chain(dy.iter()).copied().collect();
        let mut y2 = vec![0.0f32; 8];
        bn.forward_train(View::new(&x2, &two, layout), &mut y2).unwrap();
        assert_eq!(bn.num_batches_tracked, 1, "{what}: a batch of two is tracked");
    }
    // The policy needs running statistics.
    let config = BatchNormConfig {
        track_running_stats: false,
        small_batch: SmallBatch::UseRunningStats,
        ..BatchNormConfig::default()
    };
    let mut bn = BatchNorm::<f64>::new(2, config).unwrap();
    let mut y = [0.0; 2];
    assert_eq!(
        bn.forward_train(View::new(&[1.0, 2.0], &[1, 2], Layout::NC), &mut y),
        Err(batchnorm::Error::NoRunningStats)
    );
}

// ---------------------------------------------------------------------------------------------
// Batch renormalization
// ---------------------------------------------------------------------------------------------

/// Moving statistics for renorm tests: the data's inference mean and σ = √var·`spread` (so r and
/// d are away from 1 and 0, and clipped when the limits are tight).
fn moving(d: &Data, spread: f64) -> (Vec<f64>, Vec<f64>) {
    (d.mean.clone(), d.var.iter().map(|v| v.sqrt() * spread).collect())
}

/// Training forward, backward, inference and the moving update of batch renorm against the
/// reference: r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max),
/// y = γ·((x − μ_B)/σ_B·r + d) + β; backward with r, d constant; inference γ·(x − μ)/σ + β;
/// μ ← μ + α(μ_B − μ), σ ← σ + α(σ_B − σ).
#[allow(clippy::too_many_arguments)]
fn check_renorm<T: PlainFloat>(
    layout: Layout,
    shape: &[usize],
    seed: u64,
    affine: bool,
    eps: f64,
    r_max: f64,
    d_max: f64,
    spread: f64,
) {
    let d = Data::new::<T>(layout, shape, seed);
    let (gamma, beta) = d.affine(affine);
    let (mm, ms) = moving(&d, spread);
    let (mm_t, ms_t) = (narrow::<T>(&mm), narrow::<T>(&ms));
    let (mm, ms) = (wide(&mm_t), wide(&ms_t));
    let (x, dy, gt, bt) = (
        narrow::<T>(&d.x),
        narrow::<T>(&d.dy),
        narrow::<T>(&gamma),
        narrow::<T>(&beta),
    );
    let (n, c) = (x.len(), d.g.channels);
    let m = d.g.per_channel();
    let clip = RenormClip::new(r_max, d_max).unwrap();
    let nan = T::from_f64(f64::NAN);
    let mut y = vec![nan; n];
    let (stats, saved) = batch_renorm_train(
        View::new(&x, shape, layout),
        RenormStats::new(&mm_t, &ms_t),
        affine_if(affine, &gt, &bt),
        eps,
        clip,
        &mut y,
    )
    .unwrap();
    let what = format!("renorm {layout} {shape:?} affine={affine} eps={eps} r_max={r_max} d_max={d_max}");
    let (ry, rmean, rsigma, rr, rd) =
        reference::renorm_forward_train(&d.g, &d.x, &mm, &ms, &gamma, &beta, eps, r_max, d_max);
    let rel = reduce_rel::<T>(m);
    let mabs = d.mean_abs_x();
    // r: σ_B/σ with σ_B behind a reduction (relative error ≤ rel); d: (μ_B − μ)/σ with μ_B's
    // error ≤ rel·mean|x|.
    let sr: Vec<f64> = rr.clone();
    let sd: Vec<f64> = (0..c).map(|k| (mabs[k] + mm[k].abs()) / ms[k]).collect();
    assert_close::<f64>(&format!("{what} r"), &saved.r, &rr, &sr, rel);
    assert_close::<f64>(&format!("{what} d"), &saved.d, &rd, &sd, rel);
    assert_close::<f64>(&format!("{what} mean"), &saved.stats.mean, &rmean, &mabs, rel);
    let inv: Vec<f64> = rsigma.iter().map(|s| 1.0 / s).collect();
    assert_close::<f64>(&format!("{what} inv_std"), &saved.stats.inv_std, &inv, &inv, rel);
    // y = γ·r·x̂₀ + (γ·d + β): train_y_scale's terms with γ·r, plus |γ|·(|d| + d's error scale).
    let var: Vec<f64> = rsigma.iter().map(|s| s * s - eps).collect();
    let gr: Vec<f64> = (0..c).map(|k| gamma[k] * rr[k]).collect();
    let base = train_y_scale(&d, &gr, &beta, &rmean, &var, eps);
    let sy: Vec<f64> = (0..n)
        .map(|k| {
            let ch = channel_of(&d.g, k);
            base[k] + gamma[ch].abs() * (rd[ch].abs() + sd[ch])
        })
        .collect();
    assert_close(&format!("{what} y"), &y, &ry, &sy, rel);

    // Backward, r and d the constants the forward used.
    let backward = |grads: Grads<'_, T>| {
        batch_renorm_backward(View::new(&x, shape, layout), &dy, &saved, opt(&gt, affine), grads).unwrap();
    };
    let (mut dx, mut dg, mut db) = (vec![nan; n], vec![nan; c], vec![nan; c]);
    backward(Grads::new(&mut dx, &mut dg, &mut db));
    let (rdx, rdg, rdb) = reference::renorm_backward(&d.g, &d.x, &d.dy, &saved.r, &saved.d, &gamma, eps);
    let (sdx, sdg0, sdb) = backward_scales(&d, &d.dy, &gr, eps);
    let sdg: Vec<f64> = (0..c)
        .map(|k| saved.r[k] * sdg0[k] + saved.d[k].abs() * sdb[k])
        .collect();
    assert_close(&format!("{what} dx"), &dx, &rdx, &sdx, rel);
    assert_close(&format!("{what} dgamma"), &dg, &rdg, &sdg, rel);
    assert_close(&format!("{what} dbeta"), &db, &rdb, &sdb, rel);
    // dx alone and the parameter gradients alone give the same bits.
    assert_output_subsets(&what, (&dx, &dg, &db), backward);

    // Inference: y = γ·(x − μ)/σ + β, element-wise.
    let mut ye = vec![nan; n];
    batch_renorm_eval(
        View::new(&x, shape, layout),
        RenormStats::new(&mm_t, &ms_t),
        affine_if(affine, &gt, &bt),
        &mut ye,
    )
    .unwrap();
    let rye = reference::renorm_eval(&d.g, &d.x, &mm, &ms, &gamma, &beta);
    let sye: Vec<f64> = (0..n)
        .map(|k| {
            let ch = channel_of(&d.g, k);
            gamma[ch].abs() * (d.x[k].abs() + mm[ch].abs()) / ms[ch] + beta[ch].abs()
        })
        .collect();
    assert_close(&format!("{what} eval y"), &ye, &rye, &sye, elementwise_rel::<T>());

    // Moving update with α = 0.3.
    let (mut um, mut us) = (mm_t.clone(), ms_t.clone());
    update_renorm_stats(&stats, eps, 0.3, &mut um, &mut us).unwrap();
    let (rum, rus) = reference::renorm_update(&mm, &ms, &rmean, &rsigma, 0.3);
    let sum: Vec<f64> = (0..c).map(|k| mm[k].abs() + mabs[k]).collect();
    let sus: Vec<f64> = (0..c).map(|k| ms[k] + rsigma[k]).collect();
    assert_close(&format!("{what} moving mean"), &um, &rum, &sum, rel);
    assert_close(&format!("{what} moving std"), &us, &rus, &sus, rel);
}

fn r_max_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![Just(1.0), Just(1.5), Just(3.0), 1.0f64..4.0]
}

fn d_max_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(0.5), Just(5.0), 0.0f64..3.0]
}

fn spread_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![Just(1.0), Just(0.2), Just(5.0), 0.1f64..4.0]
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn renorm_matches_reference_f64(
        (layout, shape) in layout_shape(20_000), seed: u64, affine: bool, eps in eps_strategy(),
        r_max in r_max_strategy(), d_max in d_max_strategy(), spread in spread_strategy(),
    ) {
        check_renorm::<f64>(layout, &shape, seed, affine, eps, r_max, d_max, spread);
    }

    #[test]
    fn renorm_matches_reference_f32(
        (layout, shape) in layout_shape(20_000), seed: u64, affine: bool, eps in eps_strategy(),
        r_max in r_max_strategy(), d_max in d_max_strategy(), spread in spread_strategy(),
    ) {
        check_renorm::<f32>(layout, &shape, seed, affine, eps, r_max, d_max, spread);
    }

    /// With r_max = 1 and d_max = 0 (r = 1, d = 0), batch renorm's training outputs and gradients
    /// are plain batch norm's (Algorithm 1 and Section 3's chain rule), whatever the moving
    /// statistics: against `reference::forward_train`/`backward_train` with the tolerances of the
    /// plain tests, and against the plain kernels.
    #[test]
    fn renorm_with_identity_limits_is_plain_batch_norm(
        (layout, shape) in layout_shape(20_000), seed: u64, affine: bool, eps in eps_strategy(), spread in spread_strategy(),
    ) {
        let d = Data::new::<f32>(layout, &shape, seed);
        let (gamma, beta) = d.affine(affine);
        let (mm, ms) = moving(&d, spread);
        let (x, dy, gt, bt) = (narrow::<f32>(&d.x), narrow::<f32>(&d.dy), narrow::<f32>(&gamma), narrow::<f32>(&beta));
        let (n, c) = (x.len(), d.g.channels);
        let mut y = vec![0.0f32; n];
        let (_, saved) = batch_renorm_train(View::new(&x, &shape, layout), RenormStats::new(&narrow::<f32>(&mm), &narrow::<f32>(&ms)), Affine { gamma: opt(&gt, affine), beta: opt(&bt, affine) }, eps, RenormClip::identity(), &mut y).unwrap();
        prop_assert!(saved.r.iter().all(|&r| r == 1.0) && saved.d.iter().all(|&d| d == 0.0));
        let (ry, rmean, rvar) = reference::forward_train(&d.g, &d.x, &gamma, &beta, eps);
        let rel = reduce_rel::<f32>(d.g.per_channel());
        assert_close("identity renorm y", &y, &ry, &train_y_scale(&d, &gamma, &beta, &rmean, &rvar, eps), rel);
        let (mut dx, mut dg, mut db) = (vec![0.0f32; n], vec![0.0f32; c], vec![0.0f32; c]);
        batch_renorm_backward(View::new(&x, &shape, layout), &dy, &saved, opt(&gt, affine), Grads::new(&mut dx, &mut dg, &mut db)).unwrap();
        let (rdx, rdg, rdb) = reference::backward_train(&d.g, &d.x, &d.dy, &gamma, eps);
        let (sdx, sdg, sdb) = backward_scales(&d, &d.dy, &gamma, eps);
        assert_close("identity renorm dx", &dx, &rdx, &sdx, rel);
        assert_close("identity renorm dgamma", &dg, &rdg, &sdg, rel);
        assert_close("identity renorm dbeta", &db, &rdb, &sdb, rel);
        // And the plain kernels, within the same tolerances (both are within them of the reference).
        let mut yp = vec![0.0f32; n];
        let (_, sp) = batch_norm_train(View::new(&x, &shape, layout), Affine { gamma: opt(&gt, affine), beta: opt(&bt, affine) }, eps, &mut yp).unwrap();
        let (mut dxp, mut dgp, mut dbp) = (vec![0.0f32; n], vec![0.0f32; c], vec![0.0f32; c]);
        batch_norm_backward(View::new(&x, &shape, layout), &dy, &sp, opt(&gt, affine), Grads::new(&mut dxp, &mut dgp, &mut dbp)).unwrap();
        let twice = |s: &[f64]| s.iter().map(|v| 2.0 * v).collect::<Vec<f64>>();
        assert_close("identity renorm y vs plain", &y, &wide(&yp), &twice(&train_y_scale(&d, &gamma, &beta, &rmean, &rvar, eps)), 2.0 * rel);
        assert_close("identity renorm dx vs plain", &dx, &wide(&dxp), &twice(&sdx), 2.0 * rel);
        assert_close("identity renorm dgamma vs plain", &dg, &wide(&dgp), &twice(&sdg), 2.0 * rel);
        assert_close("identity renorm dbeta vs plain", &db, &wide(&dbp), &twice(&sdb), 2.0 * rel);
    }
}

/// The kernels' internal chunking (fused and blocked plans, several tasks) for renorm.
#[test]
fn renorm_on_chunking_shapes() {
    for (i, (layout, shape)) in chunking_shapes().into_iter().enumerate() {
        check_renorm::<f32>(layout, &shape, 500 + i as u64, true, 1e-5, 3.0, 5.0, 0.5);
    }
}

// Central finite differences (f64) with `common`'s `assert_fd_grads` (its comment gives the
// error budget; r ≤ 3 and |d| ≤ 5 scale the derivatives by O(1) factors). r and d are held
// constant: the forward under perturbation is Algorithm 1's kernel with γ' = γ·r and
// β' = γ·d + β, exactly y = γ·((x − μ_B)/σ_B·r + d) + β for fixed r, d.

/// Renorm backward (dx, dγ, dβ with r, d constant) against central differences.
#[test]
fn renorm_backward_matches_finite_differences() {
    for (i, (layout, shape)) in fd_shapes().into_iter().enumerate() {
        for spread in [0.2, 0.7, 1.3, 5.0] {
            let d = Data::new::<f64>(layout, &shape, 600 + i as u64);
            let (mm, ms) = moving(&d, spread);
            let (gamma, beta) = (d.gamma.clone(), d.beta.clone());
            let w = d.dy.clone();
            let (n, c) = (d.x.len(), d.g.channels);
            let clip = RenormClip::new(3.0, 5.0).unwrap();
            let mut y = vec![0.0; n];
            let (_, saved): (_, RenormSaved) = batch_renorm_train(
                View::new(&d.x, &shape, layout),
                RenormStats::new(&mm, &ms),
                Affine::new(&gamma, &beta),
                FD_EPS,
                clip,
                &mut y,
            )
            .unwrap();
            let (r, dd) = (saved.r.clone(), saved.d.clone());
            let fixed = |x: &[f64], g: &[f64], b: &[f64]| {
                let gr: Vec<f64> = (0..c).map(|k| g[k] * r[k]).collect();
                let br: Vec<f64> = (0..c).map(|k| g[k] * dd[k] + b[k]).collect();
                let mut y = vec![0.0; n];
                batch_norm_train(View::new(x, &shape, layout), Affine::new(&gr, &br), FD_EPS, &mut y).unwrap();
                loss(&w, &y)
            };
            let (dx, dg, db) = grads_of(n, c, |grads| {
                batch_renorm_backward(View::new(&d.x, &shape, layout), &w, &saved, Some(&gamma), grads).unwrap();
            });
            let what = format!("renorm {layout} {shape:?} spread={spread} r={r:?} d={dd:?}");
            let fixed_params = |g: &[f64], b: &[f64]| fixed(&d.x, g, b);
            assert_fd_grads(&what, &d.x, &gamma, &beta, (&dx, &dg, &db), fixed, fixed_params);
        }
    }
}

/// The frozen layer's backward against central differences of its own training forward (the
/// running statistics fixed).
#[test]
fn frozen_backward_matches_finite_differences() {
    for (i, (layout, shape)) in fd_shapes().into_iter().enumerate() {
        let d = Data::new::<f64>(layout, &shape, 700 + i as u64);
        let mut bn = layer_with::<f64>(&d, FD_EPS, true, SmallBatch::Error);
        bn.freeze();
        let w = &d.dy;
        let mut y = vec![0.0; d.x.len()];
        let saved = bn.forward_train(View::new(&d.x, &shape, layout), &mut y).unwrap();
        let (dx, dg, db) = layer_backward_all(&bn, View::new(&d.x, &shape, layout), w, &saved);
        // The layer's own training forward with γ and β replaced.
        let forward = |x: &[f64], g: &[f64], b: &[f64]| {
            let mut bn = bn.clone();
            (bn.gamma, bn.beta) = (g.to_vec(), b.to_vec());
            loss_of(w, |y| {
                bn.forward_train(View::new(x, &shape, layout), y).unwrap();
            })
        };
        let forward_params = |g: &[f64], b: &[f64]| forward(&d.x, g, b);
        let what = format!("frozen {layout} {shape:?}");
        assert_fd_grads(
            &what,
            &d.x,
            &bn.gamma,
            &bn.beta,
            (&dx, &dg, &db),
            forward,
            forward_params,
        );
    }
}

/// The layer: each step uses the schedule's limits at its step count, then updates the moving
/// statistics as `reference::renorm_update` and counts the step; inference uses them.
#[test]
fn renorm_layer_follows_schedule_and_updates() {
    let (layout, shape) = (Layout::NHWC, vec![3, 2, 2, 4]);
    let schedule = RenormSchedule::new(2, 2, 1, 3.0, 5.0).unwrap();
    let config = BatchRenormConfig {
        eps: 1e-3,
        momentum: 0.25,
        limits: schedule,
        affine: true,
    };
    let mut bn = BatchRenorm::<f64>::new(4, config).unwrap();
    let mut mm = vec![0.0; 4];
    let mut ms = vec![1.0; 4];
    for step in 0..6u64 {
        let d = Data::new::<f64>(layout, &shape, 800 + step);
        let x: Vec<f64> = d.x.iter().map(|v| 3.0 * v + 1.0).collect(); // far from (0, 1): clipped early
        let clip = schedule.at(step);
        assert_eq!(bn.clip(), clip);
        let mut y = vec![0.0; x.len()];
        let saved = bn.forward_train(View::new(&x, &shape, layout), &mut y).unwrap();
        assert_eq!(bn.steps, step + 1);
        let (ry, rmean, rsigma, rr, rd) = reference::renorm_forward_train(
            &d.g,
            &x,
            &mm,
            &ms,
            &bn.gamma,
            &bn.beta,
            1e-3,
            clip.r_max(),
            clip.d_max(),
        );
        let scale: Vec<f64> = ry.iter().map(|v| v.abs() + 10.0).collect();
        assert_close(&format!("step {step} y"), &y, &ry, &scale, reduce_rel::<f64>(12));
        assert_close::<f64>(
            &format!("step {step} r"),
            &saved.r,
            &rr,
            &[10.0; 4],
            reduce_rel::<f64>(12),
        );
        assert_close::<f64>(
            &format!("step {step} d"),
            &saved.d,
            &rd,
            &[10.0; 4],
            reduce_rel::<f64>(12),
        );
        if step < 2 {
            assert!(
                saved.r.iter().all(|&r| r == 1.0) && saved.d.iter().all(|&d| d == 0.0),
                "warm-up is plain BN"
            );
        }
        (mm, ms) = reference::renorm_update(&mm, &ms, &rmean, &rsigma, 0.25);
        assert_close(
            &format!("step {step} moving mean"),
            &bn.moving_mean,
            &mm,
            &[10.0; 4],
            reduce_rel::<f64>(12),
        );
        assert_close(
            &format!("step {step} moving std"),
            &bn.moving_std,
            &ms,
            &[10.0; 4],
            reduce_rel::<f64>(12),
        );
    }
    let d = Data::new::<f64>(layout, &shape, 900);
    let mut y = vec![0.0; d.x.len()];
    bn.forward_eval(View::new(&d.x, &shape, layout), &mut y).unwrap();
    let ry = reference::renorm_eval(&d.g, &d.x, &bn.moving_mean, &bn.moving_std, &bn.gamma, &bn.beta);
    let scale: Vec<f64> = ry.iter().map(|v| v.abs() + 10.0).collect();
    assert_close("eval y", &y, &ry, &scale, elementwise_rel::<f64>());
}

/// The schedule: (1, 0) during warm-up, linear ramps, then the final limits.
#[test]
fn renorm_schedule_values() {
    let s = RenormSchedule::new(10, 20, 5, 3.0, 5.0).unwrap();
    for step in [0, 5, 9, 10] {
        assert_eq!((s.at(step).r_max(), s.at(step).d_max()), (1.0, 0.0), "step {step}");
    }
    assert_eq!(s.at(15).r_max(), 1.0 + 5.0 / 20.0 * 2.0);
    assert_eq!(s.at(15).d_max(), 5.0);
    assert_eq!(s.at(12).d_max(), 2.0 / 5.0 * 5.0);
    assert_eq!((s.at(30).r_max(), s.at(u64::MAX).r_max()), (3.0, 3.0));
    let p = RenormSchedule::paper();
    assert_eq!((p.at(4999).r_max(), p.at(4999).d_max()), (1.0, 0.0));
    assert_eq!((p.at(40_000).r_max(), p.at(25_000).d_max()), (3.0, 5.0));
    assert!(p.at(39_999).r_max() < 3.0 && p.at(24_999).d_max() < 5.0);
    let k = RenormSchedule::constant(RenormClip::new(2.0, 1.0).unwrap());
    assert_eq!(k.at(0), RenormClip::new(2.0, 1.0).unwrap());
    // Jump at the end of warm-up with ramps of 0 steps.
    let j = RenormSchedule::new(3, 0, 0, 2.0, 1.0).unwrap();
    assert_eq!((j.at(2).r_max(), j.at(3).r_max(), j.at(3).d_max()), (1.0, 2.0, 1.0));
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn renorm_errors() {
    use batchnorm::Error;
    let limit = |name, bound, value: f64| Error::InvalidRenormLimit { name, bound, value };
    assert_eq!(RenormClip::new(0.5, 0.0), Err(limit("r_max", "≥ 1", 0.5)));
    assert_eq!(
        RenormClip::new(f64::INFINITY, 0.0),
        Err(limit("r_max", "≥ 1", f64::INFINITY))
    );
    assert!(matches!(
        RenormClip::new(f64::NAN, 0.0),
        Err(Error::InvalidRenormLimit { name: "r_max", .. })
    ));
    assert_eq!(RenormClip::new(1.0, -0.1), Err(limit("d_max", "≥ 0", -0.1)));
    assert!(matches!(
        RenormClip::new(2.0, f64::NAN),
        Err(Error::InvalidRenormLimit { name: "d_max", .. })
    ));
    assert_eq!(
        RenormClip::new(1.0, f64::INFINITY),
        Err(limit("d_max", "≥ 0", f64::INFINITY))
    );
    assert_eq!(
        RenormSchedule::new(0, 0, 0, 0.9, 1.0),
        Err(limit("r_max_final", "≥ 1", 0.9))
    );
    assert_eq!(
        RenormSchedule::new(0, 0, 0, 2.0, -1.0),
        Err(limit("d_max_final", "≥ 0", -1.0))
    );
    assert!(matches!(
        RenormSchedule::new(u64::MAX, 1, 0, 2.0, 1.0),
        Err(Error::InvalidRenormSchedule { .. })
    ));
    assert!(matches!(
        RenormSchedule::new(u64::MAX - 1, 0, 2, 2.0, 1.0),
        Err(Error::InvalidRenormSchedule { .. })
    ));
    assert!(RenormSchedule::new(u64::MAX, 0, 0, 2.0, 1.0).is_ok());

    let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // [3, 2]
    let (mm, ms, g) = ([0.0f32; 2], [1.0f32; 2], [1.0f32; 2]);
    let clip = RenormClip::new(2.0, 1.0).unwrap();
    let mut y = [f32::NAN; 6];
    let feature = |name, expected, actual| Error::FeatureMismatch { name, expected, actual };
    let train = |x: &[f32], shape: &[usize], mm: &[f32], ms: &[f32], eps: f64, y: &mut [f32]| {
        batch_renorm_train(
            View::new(x, shape, Layout::NC),
            RenormStats::new(mm, ms),
            Affine::new(&g, &g),
            eps,
            clip,
            y,
        )
        .map(|_| ())
    };
    assert_eq!(
        train(&x, &[3, 2], &mm[..1], &ms, 1e-5, &mut y),
        Err(feature("moving_mean", 2, 1))
    );
    assert_eq!(
        train(&x, &[3, 2], &mm, &[1.0; 3], 1e-5, &mut y),
        Err(feature("moving_std", 2, 3))
    );
    assert_eq!(train(&x, &[3, 2], &mm, &ms, 0.0, &mut y), Err(Error::InvalidEps(0.0)));
    assert_eq!(
        train(&x[..2], &[1, 2], &mm, &ms, 1e-5, &mut y[..2]),
        Err(Error::TooFewValues {
            count: 1,
            shape: vec![1, 2]
        })
    );
    assert_eq!(
        train(&x, &[3, 2], &mm, &ms, 1e-5, &mut y[..5]),
        Err(Error::BufferLength {
            name: "y",
            expected: 6,
            actual: 5
        })
    );
    assert!(y.iter().all(|v| v.is_nan()), "y untouched on error");
    assert_eq!(
        batch_renorm_eval(
            View::new(&x, &[3, 2], Layout::NC),
            RenormStats::new(&mm, &ms[..1]),
            Affine::NONE,
            &mut y
        ),
        Err(feature("moving_std", 2, 1))
    );

    let (_, saved) = batch_renorm_train(
        View::new(&x, &[3, 2], Layout::NC),
        RenormStats::new(&mm, &ms),
        Affine::NONE,
        1e-5,
        clip,
        &mut y,
    )
    .unwrap();
    let mut dx = [f32::NAN; 6];
    let mut bad = saved.clone();
    bad.r.pop();
    assert_eq!(
        batch_renorm_backward(View::new(&x, &[3, 2], Layout::NC), &x, &bad, None, Grads::dx(&mut dx)),
        Err(feature("saved.r", 2, 1))
    );
    let mut bad = saved.clone();
    bad.d.push(0.0);
    assert_eq!(
        batch_renorm_backward(View::new(&x, &[3, 2], Layout::NC), &x, &bad, None, Grads::dx(&mut dx)),
        Err(feature("saved.d", 2, 3))
    );
    let mut bad = saved.clone();
    bad.stats.count = 1;
    assert!(matches!(
        batch_renorm_backward(View::new(&x, &[3, 2], Layout::NC), &x, &bad, None, Grads::dx(&mut dx)),
        Err(Error::TooFewValues { count: 1, .. })
    ));
    assert!(dx.iter().all(|v| v.is_nan()), "dx untouched on error");

    let stats = batchnorm::batch_stats(View::new(&x, &[3, 2], Layout::NC)).unwrap();
    let (mut um, mut us) = (mm, ms);
    for alpha in [0.0, -0.1, 1.5, f64::NAN] {
        assert!(matches!(
            update_renorm_stats(&stats, 1e-5, alpha, &mut um, &mut us),
            Err(Error::InvalidMomentum(_))
        ));
    }
    assert_eq!(
        update_renorm_stats(&stats, 1e-5, 0.1, &mut um[..1], &mut us),
        Err(feature("moving_mean", 2, 1))
    );
    assert_eq!((um, us), (mm, ms), "moving statistics untouched on error");

    let config = |eps, momentum| BatchRenormConfig {
        eps,
        momentum,
        ..BatchRenormConfig::default()
    };
    assert_eq!(
        BatchRenorm::<f32>::new(2, config(-1.0, 0.1)),
        Err(Error::InvalidEps(-1.0))
    );
    assert_eq!(
        BatchRenorm::<f32>::new(2, config(1e-5, 0.0)),
        Err(Error::InvalidMomentum(0.0))
    );
    let mut bn = BatchRenorm::<f32>::new(2, config(1e-5, 0.1)).unwrap();
    let mut y = [f32::NAN; 6];
    bn.steps = u64::MAX;
    let before = bn.clone();
    assert!(matches!(
        bn.forward_train(View::new(&x, &[3, 2], Layout::NC), &mut y),
        Err(Error::InvalidRenormSchedule { .. })
    ));
    bn.config.momentum = 2.0;
    assert_eq!(
        bn.forward_train(View::new(&x, &[3, 2], Layout::NC), &mut y),
        Err(Error::InvalidMomentum(2.0))
    );
    bn.config.momentum = 0.1;
    assert_eq!(
        bn.forward_train(View::new(&x, &[2, 3], Layout::NC), &mut y),
        Err(feature("input", 2, 3))
    );
    assert_eq!(bn.moving_mean, before.moving_mean);
    assert!(y.iter().all(|v| v.is_nan()), "y untouched on error");
}

#[test]
fn frozen_errors() {
    use batchnorm::Error;
    // Frozen without running statistics.
    let config = BatchNormConfig {
        track_running_stats: false,
        ..BatchNormConfig::default()
    };
    let mut bn = BatchNorm::<f64>::new(2, config).unwrap();
    bn.freeze();
    let x = [1.0, 2.0, 3.0, 4.0];
    let mut y = [f64::NAN; 4];
    assert_eq!(
        bn.forward_train(View::new(&x, &[2, 2], Layout::NC), &mut y),
        Err(Error::NoRunningStats)
    );
    assert_eq!(
        bn.forward_train_sync(&SingleProcess, View::new(&x, &[2, 2], Layout::NC), &mut y),
        Err(Error::NoRunningStats)
    );
    let saved = batchnorm::SavedStats {
        count: 2,
        mean: vec![0.0; 2],
        inv_std: vec![1.0; 2],
    };
    let mut dx = [f64::NAN; 4];
    assert_eq!(
        bn.backward(View::new(&x, &[2, 2], Layout::NC), &x, &saved, Grads::dx(&mut dx)),
        Err(Error::NoRunningStats)
    );
    assert_eq!(
        bn.backward_sync(
            &SingleProcess,
            View::new(&x, &[2, 2], Layout::NC),
            &x,
            &saved,
            Grads::dx(&mut dx)
        ),
        Err(Error::NoRunningStats)
    );
    // Frozen with running statistics: the shape and buffer checks of the inference transforms.
    let mut bn = BatchNorm::<f64>::new(2, BatchNormConfig::default()).unwrap();
    bn.freeze();
    assert_eq!(
        bn.forward_train(View::new(&x, &[1, 4], Layout::NC), &mut y),
        Err(Error::FeatureMismatch {
            name: "input",
            expected: 2,
            actual: 4
        })
    );
    assert_eq!(
        bn.forward_train(View::new(&x, &[2, 2], Layout::NC), &mut y[..3]),
        Err(Error::BufferLength {
            name: "y",
            expected: 4,
            actual: 3
        })
    );
    let short = batchnorm::SavedStats {
        count: 2,
        mean: vec![0.0; 1],
        inv_std: vec![1.0; 2],
    };
    assert_eq!(
        bn.backward(View::new(&x, &[2, 2], Layout::NC), &x, &short, Grads::dx(&mut dx)),
        Err(Error::FeatureMismatch {
            name: "saved.mean",
            expected: 2,
            actual: 1
        })
    );
    assert_eq!(
        bn.backward_sync(
            &SingleProcess,
            View::new(&x, &[2, 2], Layout::NC),
            &x[..3],
            &saved,
            Grads::dx(&mut dx)
        ),
        Err(Error::BufferLength {
            name: "dy",
            expected: 4,
            actual: 3
        })
    );
    assert!(
        y.iter().all(|v| v.is_nan()) && dx.iter().all(|v| v.is_nan()),
        "outputs untouched on error"
    );
    assert_eq!(bn.num_batches_tracked, 0);
}

// ---------------------------------------------------------------------------------------------
// Thread-count determinism
// ---------------------------------------------------------------------------------------------

/// Every output of the renorm functions and of the frozen layer, in pools of 1, 2 and 3 threads.
fn variant_outputs<T: PlainFloat>(d: &Data, layout: Layout, shape: &[usize]) -> Vec<Vec<u64>> {
    let (x, dy, g, b) = (
        narrow::<T>(&d.x),
        narrow::<T>(&d.dy),
        narrow::<T>(&d.gamma),
        narrow::<T>(&d.beta),
    );
    let (mm, ms) = moving(d, 0.7);
    let (mm, ms) = (narrow::<T>(&mm), narrow::<T>(&ms));
    let (n, c) = (x.len(), d.g.channels);
    let z = T::from_f64(0.0);
    let clip = RenormClip::new(3.0, 5.0).unwrap();
    let mut y = vec![z; n];
    let (stats, saved) = batch_renorm_train(
        View::new(&x, shape, layout),
        RenormStats::new(&mm, &ms),
        Affine::new(&g, &b),
        1e-5,
        clip,
        &mut y,
    )
    .unwrap();
    let (mut dx, mut dg, mut db) = (vec![z; n], vec![z; c], vec![z; c]);
    batch_renorm_backward(
        View::new(&x, shape, layout),
        &dy,
        &saved,
        Some(&g),
        Grads::new(&mut dx, &mut dg, &mut db),
    )
    .unwrap();
    let mut ye = vec![z; n];
    batch_renorm_eval(
        View::new(&x, shape, layout),
        RenormStats::new(&mm, &ms),
        Affine::new(&g, &b),
        &mut ye,
    )
    .unwrap();
    let mut bn = layer_with::<T>(d, 1e-5, true, SmallBatch::Error);
    bn.freeze();
    let mut yf = vec![z; n];
    let sf = bn.forward_train(View::new(&x, shape, layout), &mut yf).unwrap();
    let (dxf, dgf, dbf) = layer_backward_all(&bn, View::new(&x, shape, layout), &dy, &sf);
    let bits = |v: &[T]| v.iter().map(|a| a.to_f64().to_bits()).collect::<Vec<u64>>();
    let bits64 = |v: &[f64]| v.iter().map(|a| a.to_bits()).collect::<Vec<u64>>();
    vec![
        bits(&y),
        bits(&dx),
        bits(&dg),
        bits(&db),
        bits(&ye),
        bits(&yf),
        bits(&dxf),
        bits(&dgf),
        bits(&dbf),
        bits64(&stats.mean),
        bits64(&stats.m2),
        bits64(&saved.r),
        bits64(&saved.d),
    ]
}

#[test]
fn variants_bitwise_identical_for_1_2_3_threads() {
    for (i, (layout, shape)) in [
        (Layout::NCHW, vec![16, 32, 32, 32]),
        (Layout::NCHW, vec![64, 4, 16, 16]),
        (Layout::NHWC, vec![20, 32, 32, 16]),
        (Layout::NC, vec![3000, 200]),
    ]
    .into_iter()
    .enumerate()
    {
        let d = Data::new::<f32>(layout, &shape, 1000 + i as u64);
        let runs: Vec<_> = [1usize, 2, 3]
            .into_iter()
            .map(|t| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
                (
                    pool.install(|| variant_outputs::<f32>(&d, layout, &shape)),
                    pool.install(|| variant_outputs::<f64>(&d, layout, &shape)),
                )
            })
            .collect();
        for (t, run) in runs.iter().enumerate().skip(1) {
            assert!(run == &runs[0], "{layout} {shape:?}: 1 vs {} threads differ", t + 1);
        }
    }
}
