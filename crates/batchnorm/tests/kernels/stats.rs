//! Statistics: `batch_stats`, running averages (`update_running_stats`), Algorithm 2's population
//! estimator (`PopulationStats`), and the split phases of synchronized batch norm
//! (`batch_stats` + `BatchStats::merge` + `normalize`; `grad_sums` + `GradSums::add` + `input_grad`).
//! Tolerances: see `common/mod.rs`.

use crate::common::*;
use batchnorm::{
    batch_norm_eval, batch_stats, grad_sums, reference, update_running_stats, Affine, BatchNorm, BatchNormConfig,
    BatchStats, FixedStats, GradSums, Layout, Momentum, PopulationStats, View,
};
use proptest::prelude::*;
use rand::Rng;

/// Algorithm 1, lines 1–2: μ_B and σ²_B per channel (and M2 = m·σ²_B).
fn check_batch_stats<T: TestFloat>(layout: Layout, shape: &[usize], seed: u64) {
    let d = Data::new::<T>(layout, shape, seed);
    let s = batch_stats(View::new(&narrow::<T>(&d.x), shape, layout)).unwrap();
    let (rmean, rvar) = reference::mean_var(&d.g, &d.x);
    let m = d.g.per_channel();
    let rel = reduce_rel::<T>(m);
    assert_eq!(s.count, m as u64);
    assert_eq!(s.channels(), d.g.channels);
    assert_close::<f64>("batch_stats mean", &s.mean, &rmean, &d.mean_abs_x(), rel);
    assert_close::<f64>("batch_stats var", &s.var_biased(), &rvar, &rvar, rel);
    let rm2: Vec<f64> = rvar.iter().map(|v| v * m as f64).collect();
    assert_close::<f64>("batch_stats m2", &s.m2, &rm2, &rm2, rel);
}

/// Running averages after one batch (Algorithm 2's unbiased m/(m−1)·σ²_B, as in
/// `reference::running_update`), exponential and cumulative.
fn check_running<T: TestFloat>(layout: Layout, shape: &[usize], seed: u64, momentum: Momentum, seen: u64) {
    let d = Data::new::<T>(layout, shape, seed);
    let batch = batch_stats(View::new(&narrow::<T>(&d.x), shape, layout)).unwrap();
    let (rm0, rv0) = (narrow::<T>(&d.mean), narrow::<T>(&d.var));
    let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
    update_running_stats(&batch, momentum, seen, &mut rm, &mut rv).unwrap();
    let (bm, bv) = reference::mean_var(&d.g, &d.x);
    let mom = match momentum {
        Momentum::Exponential(w) => Some(w),
        Momentum::Cumulative => None,
    };
    let m = d.g.per_channel();
    let (erm, erv) = reference::running_update(&d.mean, &d.var, &bm, &bv, m, mom, seen);
    let mabs = d.mean_abs_x();
    let mscale: Vec<f64> = (0..d.g.channels).map(|c| d.mean[c].abs() + mabs[c]).collect();
    let vscale: Vec<f64> = (0..d.g.channels).map(|c| d.var[c] + 2.0 * bv[c]).collect();
    let rel = reduce_rel::<T>(m);
    assert_close(
        &format!("running_mean {momentum:?} seen={seen}"),
        &rm,
        &erm,
        &mscale,
        rel,
    );
    assert_close(
        &format!("running_var {momentum:?} seen={seen}"),
        &rv,
        &erv,
        &vscale,
        rel,
    );
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn batch_stats_match_reference((layout, shape) in layout_shape(20_000), seed: u64) {
        check_batch_stats::<f64>(layout, &shape, seed);
        check_batch_stats::<f32>(layout, &shape, seed);
    }

    #[test]
    fn running_stats_match_reference(
        (layout, shape) in layout_shape(5_000),
        seed: u64,
        momentum in prop_oneof![(0.001f64..=1.0).prop_map(Momentum::Exponential), Just(Momentum::Exponential(1.0)), Just(Momentum::Cumulative)],
        seen in 1u64..100,
    ) {
        check_running::<f64>(layout, &shape, seed, momentum, seen);
        check_running::<f32>(layout, &shape, seed, momentum, seen);
    }
}

#[test]
fn batch_stats_on_chunking_shapes() {
    for_each_chunking_shape(50, |layout, shape, seed| {
        check_batch_stats::<f64>(layout, shape, seed);
        check_batch_stats::<f32>(layout, shape, seed);
    });
}

/// Momentum 1 replaces the running statistics by the batch's (mean, unbiased variance);
/// cumulative averaging with `batches_seen = 1` does the same.
#[test]
fn running_stats_momentum_one_and_first_cumulative_batch() {
    let (layout, shape) = (Layout::NC, vec![9, 4]);
    let d = Data::new::<f64>(layout, &shape, 5);
    let batch = batch_stats(View::new(&d.x, &shape, layout)).unwrap();
    for momentum in [Momentum::Exponential(1.0), Momentum::Cumulative] {
        let (mut rm, mut rv) = (vec![123.0; 4], vec![-7.0; 4]);
        update_running_stats(&batch, momentum, 1, &mut rm, &mut rv).unwrap();
        let unbiased = batch.var_unbiased();
        for c in 0..4 {
            assert!((rm[c] - batch.mean[c]).abs() <= 1e-14 * (123.0 + batch.mean[c].abs()));
            assert!((rv[c] - unbiased[c]).abs() <= 1e-14 * (7.0 + unbiased[c]));
        }
    }
}

/// With weight w = 1 (momentum 1, or the first batch of a cumulative average) the running
/// statistics become the batch's μ_B and m/(m−1)·σ²_B: `reference::running_update` computes
/// (1 − w)·r + w·b, which is then exact, whatever the old value r. The result must be the batch
/// value to within rounding (relative 4u), also when the old value is much larger than the batch's
/// (PyTorch's initial running_var = 1 against a batch variance of 1e-20).
#[test]
fn running_stats_weight_one_forgets_the_old_value_exactly() {
    let (layout, shape) = (Layout::NC, vec![16, 3]);
    let d = Data::new::<f64>(layout, &shape, 8);
    // Per channel spreads 1e-10, 1e-6, 1 around 0.5: unbiased variances ≈ 1e-20, 1e-12, 1.
    let x: Vec<f64> =
        d.x.iter()
            .enumerate()
            .map(|(k, v)| 0.5 + v * [1e-10, 1e-6, 1.0][k % 3])
            .collect();
    let batch = batch_stats(View::new(&x, &shape, layout)).unwrap();
    let unbiased = batch.var_unbiased();
    for momentum in [Momentum::Exponential(1.0), Momentum::Cumulative] {
        let (mut rm, mut rv) = (vec![0.0, 1e6, -3.0], vec![1.0; 3]);
        let (erm, erv) = reference::running_update(
            &rm,
            &rv,
            &batch.mean,
            &batch.var_biased(),
            16,
            match momentum {
                Momentum::Exponential(w) => Some(w),
                Momentum::Cumulative => None,
            },
            1,
        );
        update_running_stats(&batch, momentum, 1, &mut rm, &mut rv).unwrap();
        for c in 0..3 {
            assert!(
                (rm[c] - erm[c]).abs() <= 4.0 * U * erm[c].abs(),
                "{momentum:?}: running_mean[{c}] = {:e}, the batch mean is {:e}",
                rm[c],
                erm[c]
            );
            assert!(
                (rv[c] - erv[c]).abs() <= 4.0 * U * erv[c],
                "{momentum:?}: running_var[{c}] = {:e}, the batch's unbiased variance is {:e} ({:e})",
                rv[c],
                erv[c],
                unbiased[c]
            );
        }
    }
}

/// The same through the layer: a cumulative-average `BatchNorm<f32>` (initial running_var = 1)
/// after its first batch holds that batch's unbiased variance, rounded once to f32 (≤ 1 ulp).
#[test]
fn layer_first_cumulative_batch_keeps_small_variance() {
    let (layout, shape) = (Layout::NCHW, vec![4, 2, 3, 3]);
    let config = BatchNormConfig {
        momentum: Momentum::Cumulative,
        ..BatchNormConfig::default()
    };
    let mut bn = BatchNorm::<f32>::new(2, config).unwrap();
    let d = Data::new::<f32>(layout, &shape, 2);
    // Spread 1e-7: unbiased variance ≈ 1e-14 (≈ 100 u against the old value 1).
    let x: Vec<f32> = d.x.iter().map(|v| (1e-7 * v) as f32).collect();
    let mut y = vec![0.0f32; x.len()];
    bn.forward_train(View::new(&x, &shape, layout), &mut y).unwrap();
    let want = batch_stats(View::new(&x, &shape, layout)).unwrap().var_unbiased();
    for c in 0..2 {
        let got = bn.running_var[c] as f64;
        assert!(
            (got - want[c]).abs() <= f32::EPSILON as f64 * want[c],
            "running_var[{c}] = {got:e}, the batch's unbiased variance is {:e} (rel. error {:e})",
            want[c],
            (got - want[c]).abs() / want[c]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Algorithm 2: population statistics.
// ---------------------------------------------------------------------------------------------

/// Algorithm 2, lines 8–10 with same-size batches: E[x] = E_B[μ_B] (= the mean of the
/// concatenated batches), Var[x] = m/(m−1)·E_B[σ²_B], against `reference::population` and a
/// direct computation over the concatenation.
#[test]
fn population_stats_match_algorithm_2() {
    for (layout, per_batch) in [
        (Layout::NCHW, vec![4, 3, 5, 5]),
        (Layout::NHWC, vec![3, 4, 4, 20]),
        (Layout::NC, vec![7, 5]),
        (Layout::ChannelsFirst, vec![2, 17, 9]),
    ] {
        let batches = 6;
        let g = layout.geometry(&per_batch).unwrap();
        let m = g.per_channel();
        let mut pop = PopulationStats::new(g.channels);
        let mut per = Vec::new();
        let mut all = Vec::new();
        for b in 0..batches {
            let d = Data::new::<f64>(layout, &per_batch, 900 + b);
            pop.observe_batch(View::new(&d.x, &per_batch, layout)).unwrap();
            per.push(reference::mean_var(&g, &d.x));
            all.extend_from_slice(&d.x);
        }
        assert_eq!(pop.batches(), batches);
        let (emean, evar) = reference::population(&per, m);
        let mean = pop.mean().unwrap();
        let var = pop.var().unwrap();
        let rel = reduce_rel::<f64>(m * batches as usize);
        // Scales: the batch means are O(|μ| + σ) ≤ 3 + 2·4σ; variances relative.
        let mscale: Vec<f64> = emean.iter().map(|v| v.abs() + 10.0).collect();
        assert_close::<f64>(&format!("{layout} population mean"), &mean, &emean, &mscale, rel);
        assert_close::<f64>(&format!("{layout} population var"), &var, &evar, &evar, rel);

        // Direct: the concatenation along N has mean E_B[μ_B] when batches have the same size.
        let mut cat_shape = per_batch.clone();
        cat_shape[0] *= batches as usize;
        let cat = batch_stats(View::new(&all, &cat_shape, layout)).unwrap();
        assert_close::<f64>(
            &format!("{layout} mean of concatenation"),
            &mean,
            &cat.mean,
            &mscale,
            rel,
        );
        // … and Var[x] is the unbiased average within-batch variance, which is below the
        // concatenation's total variance (that also holds the between-batch spread).
        for c in 0..g.channels {
            let within: f64 = per.iter().map(|(_, v)| v[c] * m as f64).sum::<f64>() / (m as f64 - 1.0) / batches as f64;
            assert!((var[c] - within).abs() <= rel * within);
            assert!(var[c] * (m as f64 - 1.0) / m as f64 <= cat.var_biased()[c] * (1.0 + 1e-12));
        }

        // Rounded to the element type, and installed in a layer for inference.
        let (m32, v32) = pop.finish::<f32>().unwrap();
        assert_eq!(m32, narrow::<f32>(&mean));
        assert_eq!(v32, narrow::<f32>(&var));
        let mut bn = BatchNorm::<f64>::new(
            g.channels,
            BatchNormConfig {
                track_running_stats: false,
                ..BatchNormConfig::default()
            },
        )
        .unwrap();
        bn.set_population_stats(&pop).unwrap();
        assert!(bn.config.track_running_stats);
        let d = Data::new::<f64>(layout, &per_batch, 1);
        let (mut y1, mut y2) = (vec![0.0; d.x.len()], vec![0.0; d.x.len()]);
        bn.forward_eval(View::new(&d.x, &per_batch, layout), &mut y1).unwrap();
        let (gamma, beta) = d.ones_zeros();
        batch_norm_eval(
            View::new(&d.x, &per_batch, layout),
            FixedStats::new(&mean, &var),
            Affine::new(&gamma, &beta),
            1e-5,
            &mut y2,
        )
        .unwrap();
        assert_bits64("layer with population stats", &y1, &y2);
    }
}

/// Documented behaviour with unequal batch sizes: each batch's variance is made unbiased with its
/// own m_b, then batches are averaged with equal weights (E[x] = (1/B)Σμ_b, not the
/// count-weighted mean; Var[x] = (1/B)Σ m_b/(m_b − 1)·σ²_b).
#[test]
fn population_stats_unequal_batches() {
    let layout = Layout::NCHW;
    let sizes = [2usize, 9, 5];
    let mut pop = PopulationStats::new(3);
    let (mut mu, mut unb) = (vec![0.0; 3], vec![0.0; 3]);
    let mut weighted = [0.0; 3];
    let mut total = 0.0;
    for (b, &n) in sizes.iter().enumerate() {
        let shape = [n, 3, 2, 3];
        let g = layout.geometry(&shape).unwrap();
        let mut d = Data::new::<f64>(layout, &shape, 40 + b as u64);
        // Batch-dependent offset so that equal and count weights differ clearly.
        d.x.iter_mut().for_each(|v| *v += 10.0 * b as f64);
        let s = batch_stats(View::new(&d.x, &shape, layout)).unwrap();
        pop.observe(&s).unwrap();
        let (bm, bv) = reference::mean_var(&g, &d.x);
        let m = g.per_channel() as f64;
        for c in 0..3 {
            mu[c] += bm[c] / sizes.len() as f64;
            unb[c] += m / (m - 1.0) * bv[c] / sizes.len() as f64;
            weighted[c] += bm[c] * m;
        }
        total += g.per_channel() as f64;
    }
    let (mean, var) = (pop.mean().unwrap(), pop.var().unwrap());
    for c in 0..3 {
        assert!(
            (mean[c] - mu[c]).abs() <= 1e-13 * (mu[c].abs() + 10.0),
            "mean {c}: {} vs {}",
            mean[c],
            mu[c]
        );
        assert!(
            (var[c] - unb[c]).abs() <= 1e-13 * unb[c],
            "var {c}: {} vs {}",
            var[c],
            unb[c]
        );
        assert!(
            (mean[c] - weighted[c] / total).abs() > 1.0,
            "batches are weighted equally, not by size"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Split phases (synchronized batch norm) over shards along N.
// ---------------------------------------------------------------------------------------------

/// Splits a buffer of `shape` (N first) into shards of `sizes` samples along N.
fn shards<'a, T>(v: &'a [T], shape: &[usize], sizes: &[usize]) -> Vec<(&'a [T], Vec<usize>)> {
    let per_sample = v.len() / shape[0];
    let mut out = Vec::new();
    let mut start = 0;
    for &n in sizes {
        let mut s = shape.to_vec();
        s[0] = n;
        out.push((&v[start * per_sample..(start + n) * per_sample], s));
        start += n;
    }
    assert_eq!(start, shape[0]);
    out
}

/// Algorithm 1 computed by workers: per-shard (count, mean, M2) merged with Chan's formula equal
/// the whole batch's statistics; normalizing each shard with the merged statistics gives the
/// training y; per-shard Σdy, Σdy·x̂ added, then per-shard dx, give the whole batch's backward.
fn check_split<T: TestFloat>(layout: Layout, shape: &[usize], sizes: &[usize], seed: u64, affine: bool) {
    let eps = 1e-5;
    let d = Data::new::<T>(layout, shape, seed);
    let (gamma, beta) = d.affine(affine);
    let (gt, bt) = (narrow::<T>(&gamma), narrow::<T>(&beta));
    let (x, dy) = (narrow::<T>(&d.x), narrow::<T>(&d.dy));
    let c = d.g.channels;
    let m = d.g.per_channel();
    let rel = reduce_rel::<T>(m);
    let what = format!("{layout} {shape:?} shards {sizes:?} affine={affine} {}", T::NAME);

    let (y, stats, saved) = train(View::new(&x, shape, layout), affine_if(affine, &gt, &bt), eps);
    let (dx, dg, db) = backward_all(View::new(&x, shape, layout), &dy, &saved, opt(&gt, affine));

    let xs = shards(&x, shape, sizes);
    let dys = shards(&dy, shape, sizes);
    // Phase 1: statistics.
    let mut merged = BatchStats {
        count: 0,
        mean: vec![0.0; c],
        m2: vec![0.0; c],
    };
    for (xs, s) in &xs {
        merged.merge(&batch_stats(View::new(xs, s, layout)).unwrap()).unwrap();
    }
    assert_eq!(merged.count, m as u64, "{what}: merged count");
    assert_close::<f64>(
        &format!("{what} merged mean"),
        &merged.mean,
        &stats.mean,
        &d.mean_abs_x(),
        rel,
    );
    assert_close::<f64>(&format!("{what} merged m2"), &merged.m2, &stats.m2, &stats.m2, rel);
    let msaved = merged.saved(eps).unwrap();
    assert_eq!(msaved.count, m as u64);
    assert_close::<f64>(
        &format!("{what} merged inv_std"),
        &msaved.inv_std,
        &saved.inv_std,
        &saved.inv_std,
        rel,
    );

    // Phase 2: normalize each shard with the global statistics.
    let mut ys = Vec::new();
    for (xs, s) in &xs {
        ys.extend(split_normalize(
            View::new(xs, s, layout),
            &msaved,
            affine_if(affine, &gt, &bt),
        ));
    }
    let var = stats.var_biased();
    let yscale = train_y_scale(&d, &gamma, &beta, &stats.mean, &var, eps);
    assert_close(&format!("{what} sharded y"), &ys, &wide(&y), &yscale, rel);

    // Backward: sums per shard, added; dx per shard with the global sums and count.
    let mut sums = GradSums {
        sum_dy: vec![0.0; c],
        sum_dy_xhat: vec![0.0; c],
    };
    for ((xs, s), (dys, _)) in xs.iter().zip(&dys) {
        sums.add(&grad_sums(View::new(xs, s, layout), dys, &msaved).unwrap())
            .unwrap();
    }
    let mut dxs = Vec::new();
    for ((xs, s), (dys, _)) in xs.iter().zip(&dys) {
        dxs.extend(split_input_grad(
            &sums,
            View::new(xs, s, layout),
            dys,
            &msaved,
            opt(&gt, affine),
        ));
    }
    let (mut dg2, mut db2) = (vec![T::from_f64(0.0); c], vec![T::from_f64(0.0); c]);
    sums.write_param_grads(Some(&mut dg2), Some(&mut db2)).unwrap();
    let (sdx, sdg, sdb) = backward_scales(&d, &d.dy, &gamma, eps);
    assert_close(&format!("{what} sharded dx"), &dxs, &wide(&dx), &sdx, rel);
    assert_close(&format!("{what} sharded dgamma"), &dg2, &wide(&dg), &sdg, rel);
    assert_close(&format!("{what} sharded dbeta"), &db2, &wide(&db), &sdb, rel);

    // One shard: the split phases are the fused functions, bit for bit.
    let whole = batch_stats(View::new(&x, shape, layout)).unwrap();
    assert_eq!(whole, stats, "{what}: batch_stats vs batch_norm_train statistics");
    let wsaved = whole.saved(eps).unwrap();
    assert_eq!(wsaved, saved, "{what}: saved statistics");
    let y1 = split_normalize(View::new(&x, shape, layout), &wsaved, affine_if(affine, &gt, &bt));
    assert_bits(&format!("{what} normalize, one shard"), &y1, &y);
    let wsums = grad_sums(View::new(&x, shape, layout), &dy, &wsaved).unwrap();
    let dx1 = split_input_grad(&wsums, View::new(&x, shape, layout), &dy, &wsaved, opt(&gt, affine));
    assert_bits(&format!("{what} input_grad, one shard"), &dx1, &dx);
}

#[test]
fn split_phases_match_single_process() {
    let cases: Vec<(Layout, Vec<usize>, Vec<usize>)> = vec![
        (Layout::NCHW, vec![7, 3, 5, 6], vec![3, 1, 3]),
        (Layout::NCHW, vec![10, 20, 4, 5], vec![6, 4]),
        (Layout::NCHW, vec![5, 2, 100, 100], vec![1, 4]),
        (Layout::NHWC, vec![9, 5, 4, 6], vec![2, 5, 2]),
        (Layout::NC, vec![31, 7], vec![20, 11]),
        (Layout::NC, vec![5000, 64], vec![1234, 3000, 766]),
        (Layout::ChannelsFirst, vec![6, 4, 33], vec![1, 2, 3]),
        (Layout::ChannelsLast, vec![8, 3, 5, 2], vec![5, 3]),
    ];
    for (i, (layout, shape, sizes)) in cases.into_iter().enumerate() {
        for affine in [true, false] {
            check_split::<f64>(layout, &shape, &sizes, 600 + i as u64, affine);
            check_split::<f32>(layout, &shape, &sizes, 700 + i as u64, affine);
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn split_phases_random((layout, shape) in layout_shape(20_000), seed: u64, affine: bool) {
        // Random uneven cut of N into 1..=3 shards.
        let n = shape[0];
        let mut r = rng(seed);
        let mut sizes = Vec::new();
        let mut left = n;
        while left > 0 && sizes.len() < 2 {
            let s = r.gen_range(1..=left);
            sizes.push(s);
            left -= s;
        }
        if left > 0 {
            sizes.push(left);
        }
        check_split::<f64>(layout, &shape, &sizes, seed, affine);
        check_split::<f32>(layout, &shape, &sizes, seed, affine);
    }
}
