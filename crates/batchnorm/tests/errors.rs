//! Every documented rejection: each call returns the documented `Error` variant (with its fields),
//! never panics, and leaves its outputs and the layer's state untouched. Outputs are filled with a
//! sentinel before each failing call and checked afterwards.

// Index loops over (element, channel) mirror the paper's formulas.
#![allow(clippy::needless_range_loop)]

mod common;

use batchnorm::{
    batch_norm_backward, batch_norm_backward_eval, batch_norm_eval, batch_norm_train, batch_stats, fold_into_preceding,
    grad_sums, input_grad, normalize, update_running_stats, BatchNorm, BatchNormConfig, BatchStats, Error, GradSums,
    InferenceAffine, Layout, Momentum, PopulationStats, SavedStats,
};

const S: f32 = 7.25; // sentinel

fn sentinel(n: usize) -> Vec<f32> {
    vec![S; n]
}

#[track_caller]
fn untouched(what: &str, v: &[f32]) {
    assert!(
        v.iter().all(|&a| a == S),
        "{what}: output was written despite the error"
    );
}

fn xs(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37).sin()).collect()
}

fn saved(c: usize, count: u64) -> SavedStats {
    SavedStats {
        count,
        mean: vec![0.0; c],
        inv_std: vec![1.0; c],
    }
}

fn feature(name: &'static str, expected: usize, actual: usize) -> Error {
    Error::FeatureMismatch { name, expected, actual }
}

fn buffer(name: &'static str, expected: usize, actual: usize) -> Error {
    Error::BufferLength { name, expected, actual }
}

/// A layer whose state is compared before and after failing calls.
fn layer(c: usize) -> BatchNorm<f32> {
    let mut bn = BatchNorm::<f32>::new(c, BatchNormConfig::default()).unwrap();
    bn.gamma = (0..c).map(|i| 1.0 + i as f32).collect();
    bn.beta = (0..c).map(|i| i as f32 * 0.5).collect();
    bn.running_mean = (0..c).map(|i| i as f32 * 0.1).collect();
    bn.running_var = (0..c).map(|i| 1.0 + i as f32 * 0.2).collect();
    bn.num_batches_tracked = 5;
    bn
}

// ---------------------------------------------------------------------------------------------
// Algorithm 1 needs m ≥ 2 values per channel to estimate σ²_B.
// ---------------------------------------------------------------------------------------------

#[test]
fn too_few_values_in_training() {
    let c = 3;
    for (layout, shape) in [
        (Layout::NC, vec![1, c]),
        (Layout::NCHW, vec![1, c, 1, 1]),
        (Layout::NHWC, vec![1, 1, 1, c]),
        (Layout::ChannelsFirst, vec![1, c]),
        (Layout::ChannelsLast, vec![1, 1, 1, c]),
    ] {
        let x = xs(c);
        let mut y = sentinel(c);
        let err = batch_norm_train(&x, &shape, layout, None, None, 1e-5, &mut y).unwrap_err();
        assert_eq!(
            err,
            Error::TooFewValues {
                count: 1,
                shape: shape.clone()
            },
            "{layout}"
        );
        untouched("train y", &y);

        // The layer: nothing changes, running statistics included.
        let mut bn = layer(c);
        let before = bn.clone();
        let err = bn.forward_train(&x, &shape, layout, &mut y).unwrap_err();
        assert!(matches!(err, Error::TooFewValues { count: 1, .. }), "{layout}: {err:?}");
        assert_eq!(bn, before, "{layout}: layer state changed");
        untouched("layer y", &y);

        // Splitting phases: one value per channel is a valid shard for batch_stats …
        let s = batch_stats(&x, &shape, layout).unwrap();
        assert_eq!(s.count, 1);
        // … but not a batch for running statistics or Algorithm 2.
        let (mut rm, mut rv) = (sentinel(c), sentinel(c));
        let err = update_running_stats(&mut rm, &mut rv, &s, Momentum::Exponential(0.1), 1).unwrap_err();
        assert!(matches!(err, Error::TooFewValues { count: 1, .. }));
        untouched("running mean", &rm);
        untouched("running var", &rv);
        let mut pop = PopulationStats::new(c);
        assert!(matches!(pop.observe(&s), Err(Error::TooFewValues { count: 1, .. })));
        assert!(matches!(
            pop.observe_batch(&x, &shape, layout),
            Err(Error::TooFewValues { count: 1, .. })
        ));
        assert_eq!(pop.batches(), 0);
        assert_eq!(pop, PopulationStats::new(c));
    }
}

/// Backward and the split-phase input gradient need the (global) count ≥ 2.
#[test]
fn too_few_values_in_backward() {
    let (c, shape) = (2, [1usize, 2]);
    let (x, dy) = (xs(2), xs(2));
    let one = saved(c, 1);
    let (mut dx, mut dg, mut db) = (sentinel(2), sentinel(c), sentinel(c));
    let err = batch_norm_backward(
        &x,
        &dy,
        &shape,
        Layout::NC,
        &one,
        None,
        Some(&mut dx),
        Some(&mut dg),
        Some(&mut db),
    )
    .unwrap_err();
    assert_eq!(
        err,
        Error::TooFewValues {
            count: 1,
            shape: shape.to_vec()
        }
    );
    untouched("dx", &dx);
    untouched("dgamma", &dg);
    untouched("dbeta", &db);
    let sums = GradSums {
        sum_dy: vec![0.5; c],
        sum_dy_xhat: vec![0.25; c],
    };
    let err = input_grad(&x, &dy, &shape, Layout::NC, &one, &sums, None, &mut dx).unwrap_err();
    assert!(matches!(err, Error::TooFewValues { count: 1, .. }));
    untouched("input_grad dx", &dx);
    // With the global count of a synchronized batch, a one-sample shard is fine.
    input_grad(&x, &dy, &shape, Layout::NC, &saved(c, 8), &sums, None, &mut dx).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Shapes: empty, wrong rank, overflow.
// ---------------------------------------------------------------------------------------------

/// Calls every shape-taking function on (`x`, `shape`, `layout`) with buffers sized `n` and
/// per-channel vectors sized `c`, and asserts they all return `want` without writing.
fn all_reject(x: &[f32], shape: &[usize], layout: Layout, c: usize, want: &Error) {
    let n = x.len();
    let what = format!("{layout} {shape:?}");
    let (g, b, m, v) = (vec![1.0f32; c], vec![0.0f32; c], vec![0.0f32; c], vec![1.0f32; c]);
    let sv = saved(c, 4);
    let mut y = sentinel(n);
    let (mut dx, mut dg, mut db) = (sentinel(n), sentinel(c), sentinel(c));
    assert_eq!(
        batch_norm_train(x, shape, layout, Some(&g), Some(&b), 1e-5, &mut y).unwrap_err(),
        *want,
        "{what} train"
    );
    assert_eq!(
        batch_norm_eval(x, shape, layout, &m, &v, Some(&g), Some(&b), 1e-5, &mut y).unwrap_err(),
        *want,
        "{what} eval"
    );
    assert_eq!(
        normalize(x, shape, layout, &sv, Some(&g), Some(&b), &mut y).unwrap_err(),
        *want,
        "{what} normalize"
    );
    assert_eq!(batch_stats(x, shape, layout).unwrap_err(), *want, "{what} batch_stats");
    assert_eq!(
        batch_norm_backward(
            x,
            x,
            shape,
            layout,
            &sv,
            Some(&g),
            Some(&mut dx),
            Some(&mut dg),
            Some(&mut db)
        )
        .unwrap_err(),
        *want,
        "{what} backward"
    );
    assert_eq!(
        batch_norm_backward_eval(
            x,
            x,
            shape,
            layout,
            &m,
            &v,
            1e-5,
            Some(&g),
            Some(&mut dx),
            Some(&mut dg),
            Some(&mut db)
        )
        .unwrap_err(),
        *want,
        "{what} backward_eval"
    );
    assert_eq!(
        grad_sums(x, x, shape, layout, &sv).unwrap_err(),
        *want,
        "{what} grad_sums"
    );
    let sums = GradSums {
        sum_dy: vec![0.0; c],
        sum_dy_xhat: vec![0.0; c],
    };
    assert_eq!(
        input_grad(x, x, shape, layout, &sv, &sums, Some(&g), &mut dx).unwrap_err(),
        *want,
        "{what} input_grad"
    );
    let mut pop = PopulationStats::new(c);
    assert_eq!(
        pop.observe_batch(x, shape, layout).unwrap_err(),
        *want,
        "{what} observe_batch"
    );
    let mut bn = layer(c);
    let before = bn.clone();
    assert_eq!(
        bn.forward_train(x, shape, layout, &mut y).unwrap_err(),
        *want,
        "{what} layer train"
    );
    assert_eq!(
        bn.forward_eval(x, shape, layout, &mut y).unwrap_err(),
        *want,
        "{what} layer eval"
    );
    assert_eq!(
        bn.backward(x, x, shape, layout, &sv, Some(&mut dx), Some((&mut dg, &mut db)))
            .unwrap_err(),
        *want,
        "{what} layer backward"
    );
    assert_eq!(
        bn.backward_eval(x, x, shape, layout, Some(&mut dx), Some((&mut dg, &mut db)))
            .unwrap_err(),
        *want,
        "{what} layer backward_eval"
    );
    assert_eq!(bn, before, "{what}: layer state changed");
    for (name, v) in [("y", &y), ("dx", &dx), ("dgamma", &dg), ("dbeta", &db)] {
        untouched(&format!("{what} {name}"), v);
    }
    assert_eq!(layout.geometry(shape).unwrap_err(), *want, "{what} geometry");
}

#[test]
fn empty_input() {
    for (layout, shape, c) in [
        (Layout::NC, vec![0, 3], 3),
        (Layout::NC, vec![4, 0], 0),
        (Layout::NCHW, vec![2, 3, 0, 4], 3),
        (Layout::NCHW, vec![0, 3, 2, 2], 3),
        (Layout::NHWC, vec![2, 2, 0, 3], 3),
        (Layout::ChannelsFirst, vec![2, 3, 4, 0, 1], 3),
        (Layout::ChannelsLast, vec![0, 3], 3),
    ] {
        all_reject(&[], &shape, layout, c, &Error::EmptyInput { shape: shape.clone() });
    }
}

#[test]
fn rank_mismatch() {
    for (layout, shape, expected) in [
        (Layout::NC, vec![2, 3, 4], "2"),
        (Layout::NC, vec![6], "2"),
        (Layout::NCHW, vec![2, 3, 4], "4"),
        (Layout::NCHW, vec![2, 3, 4, 1, 1], "4"),
        (Layout::NHWC, vec![2, 4, 3], "4"),
        (Layout::ChannelsFirst, vec![6], "at least 2"),
        (Layout::ChannelsLast, vec![6], "at least 2"),
        (Layout::ChannelsLast, vec![], "at least 2"),
    ] {
        let n: usize = shape.iter().product();
        let want = Error::RankMismatch {
            layout: layout.name(),
            expected,
            shape: shape.clone(),
        };
        all_reject(&xs(n), &shape, layout, 3, &want);
    }
}

#[test]
fn shape_overflow() {
    for (layout, shape) in [
        (Layout::NC, vec![usize::MAX, 2]),
        (Layout::NCHW, vec![2, 3, usize::MAX / 2, 5]),
        (Layout::NHWC, vec![1 << 40, 1 << 20, 1 << 10, 3]),
    ] {
        let c = layout.geometry(&[2; 4][..shape.len()]).unwrap().channels;
        all_reject(
            &xs(6),
            &shape,
            layout,
            c,
            &Error::ShapeOverflow { shape: shape.clone() },
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Buffer lengths.
// ---------------------------------------------------------------------------------------------

#[test]
fn buffer_length_mismatch() {
    let (shape, layout, n, c) = ([2usize, 3, 2, 2], Layout::NCHW, 24, 3);
    let (g, m, v) = (vec![1.0f32; c], vec![0.0f32; c], vec![1.0f32; c]);
    let sv = saved(c, 8);
    let sums = GradSums {
        sum_dy: vec![0.0; c],
        sum_dy_xhat: vec![0.0; c],
    };
    let (x, short, long) = (xs(n), xs(n - 1), xs(n + 1));
    let (mut dg, mut db) = (sentinel(c), sentinel(c));

    // x
    for bad in [&short, &long] {
        let want = buffer("x", n, bad.len());
        let mut y = sentinel(n);
        assert_eq!(
            batch_norm_train(bad, &shape, layout, None, None, 1e-5, &mut y).unwrap_err(),
            want
        );
        assert_eq!(
            batch_norm_eval(bad, &shape, layout, &m, &v, None, None, 1e-5, &mut y).unwrap_err(),
            want
        );
        assert_eq!(
            normalize(bad, &shape, layout, &sv, None, None, &mut y).unwrap_err(),
            want
        );
        assert_eq!(batch_stats(bad, &shape, layout).unwrap_err(), want);
        assert_eq!(grad_sums(bad, &x, &shape, layout, &sv).unwrap_err(), want);
        let mut dx = sentinel(n);
        assert_eq!(
            batch_norm_backward(
                bad,
                &x,
                &shape,
                layout,
                &sv,
                None,
                Some(&mut dx),
                Some(&mut dg),
                Some(&mut db)
            )
            .unwrap_err(),
            want
        );
        assert_eq!(
            batch_norm_backward_eval(bad, &x, &shape, layout, &m, &v, 1e-5, None, Some(&mut dx), None, None)
                .unwrap_err(),
            want
        );
        assert_eq!(
            input_grad(bad, &x, &shape, layout, &sv, &sums, None, &mut dx).unwrap_err(),
            want
        );
        let mut bn = layer(c);
        let before = bn.clone();
        assert_eq!(bn.forward_train(bad, &shape, layout, &mut y).unwrap_err(), want);
        assert_eq!(bn.forward_eval(bad, &shape, layout, &mut y).unwrap_err(), want);
        assert_eq!(bn, before);
        untouched("y", &y);
        untouched("dx", &dx);
    }
    // y
    for mut bad in [sentinel(n - 1), sentinel(n + 1)] {
        let want = buffer("y", n, bad.len());
        assert_eq!(
            batch_norm_train(&x, &shape, layout, None, None, 1e-5, &mut bad).unwrap_err(),
            want
        );
        assert_eq!(
            batch_norm_eval(&x, &shape, layout, &m, &v, None, None, 1e-5, &mut bad).unwrap_err(),
            want
        );
        assert_eq!(
            normalize(&x, &shape, layout, &sv, None, None, &mut bad).unwrap_err(),
            want
        );
        let mut bn = layer(c);
        let before = bn.clone();
        assert_eq!(bn.forward_train(&x, &shape, layout, &mut bad).unwrap_err(), want);
        assert_eq!(bn.forward_eval(&x, &shape, layout, &mut bad).unwrap_err(), want);
        assert_eq!(bn, before, "layer state changed on a bad y");
        untouched("y", &bad);
    }
    // dy
    for bad in [&short, &long] {
        let want = buffer("dy", n, bad.len());
        let mut dx = sentinel(n);
        assert_eq!(
            batch_norm_backward(
                &x,
                bad,
                &shape,
                layout,
                &sv,
                Some(&g),
                Some(&mut dx),
                Some(&mut dg),
                Some(&mut db)
            )
            .unwrap_err(),
            want
        );
        assert_eq!(
            batch_norm_backward_eval(
                &x,
                bad,
                &shape,
                layout,
                &m,
                &v,
                1e-5,
                Some(&g),
                Some(&mut dx),
                Some(&mut dg),
                None
            )
            .unwrap_err(),
            want
        );
        assert_eq!(grad_sums(&x, bad, &shape, layout, &sv).unwrap_err(), want);
        assert_eq!(
            input_grad(&x, bad, &shape, layout, &sv, &sums, None, &mut dx).unwrap_err(),
            want
        );
        let bn = layer(c);
        assert_eq!(
            bn.backward(&x, bad, &shape, layout, &sv, Some(&mut dx), Some((&mut dg, &mut db)))
                .unwrap_err(),
            want
        );
        assert_eq!(
            bn.backward_eval(&x, bad, &shape, layout, Some(&mut dx), Some((&mut dg, &mut db)))
                .unwrap_err(),
            want
        );
        untouched("dx", &dx);
    }
    // dx
    for mut bad in [sentinel(n - 1), sentinel(n + 1)] {
        let want = buffer("dx", n, bad.len());
        assert_eq!(
            batch_norm_backward(
                &x,
                &x,
                &shape,
                layout,
                &sv,
                Some(&g),
                Some(&mut bad),
                Some(&mut dg),
                Some(&mut db)
            )
            .unwrap_err(),
            want
        );
        assert_eq!(
            batch_norm_backward_eval(
                &x,
                &x,
                &shape,
                layout,
                &m,
                &v,
                1e-5,
                Some(&g),
                Some(&mut bad),
                Some(&mut dg),
                None
            )
            .unwrap_err(),
            want
        );
        assert_eq!(
            input_grad(&x, &x, &shape, layout, &sv, &sums, None, &mut bad).unwrap_err(),
            want
        );
        let bn = layer(c);
        assert_eq!(
            bn.backward(&x, &x, &shape, layout, &sv, Some(&mut bad), Some((&mut dg, &mut db)))
                .unwrap_err(),
            want
        );
        untouched("dx", &bad);
    }
    untouched("dgamma", &dg);
    untouched("dbeta", &db);
}

// ---------------------------------------------------------------------------------------------
// Per-channel vectors of the wrong length.
// ---------------------------------------------------------------------------------------------

#[test]
fn feature_mismatch() {
    let (shape, layout, n, c) = ([4usize, 5, 3], Layout::ChannelsLast, 60, 3);
    let x = xs(n);
    let ok = vec![1.0f32; c];
    let sv = saved(c, 20);
    for bad_len in [c - 1, c + 1, 0] {
        let bad = vec![1.0f32; bad_len];
        let mut y = sentinel(n);
        let (mut dx, mut dg, mut db) = (sentinel(n), sentinel(c), sentinel(c));
        // γ, β
        assert_eq!(
            batch_norm_train(&x, &shape, layout, Some(&bad), Some(&ok), 1e-5, &mut y).unwrap_err(),
            feature("gamma", c, bad_len)
        );
        assert_eq!(
            batch_norm_train(&x, &shape, layout, Some(&ok), Some(&bad), 1e-5, &mut y).unwrap_err(),
            feature("beta", c, bad_len)
        );
        assert_eq!(
            batch_norm_eval(&x, &shape, layout, &ok, &ok, Some(&bad), None, 1e-5, &mut y).unwrap_err(),
            feature("gamma", c, bad_len)
        );
        assert_eq!(
            batch_norm_eval(&x, &shape, layout, &ok, &ok, None, Some(&bad), 1e-5, &mut y).unwrap_err(),
            feature("beta", c, bad_len)
        );
        assert_eq!(
            normalize(&x, &shape, layout, &sv, Some(&bad), None, &mut y).unwrap_err(),
            feature("gamma", c, bad_len)
        );
        assert_eq!(
            normalize(&x, &shape, layout, &sv, None, Some(&bad), &mut y).unwrap_err(),
            feature("beta", c, bad_len)
        );
        assert_eq!(
            batch_norm_backward(
                &x,
                &x,
                &shape,
                layout,
                &sv,
                Some(&bad),
                Some(&mut dx),
                Some(&mut dg),
                Some(&mut db)
            )
            .unwrap_err(),
            feature("gamma", c, bad_len)
        );
        assert_eq!(
            batch_norm_backward_eval(
                &x,
                &x,
                &shape,
                layout,
                &ok,
                &ok,
                1e-5,
                Some(&bad),
                Some(&mut dx),
                None,
                None
            )
            .unwrap_err(),
            feature("gamma", c, bad_len)
        );
        // Inference statistics.
        assert_eq!(
            batch_norm_eval(&x, &shape, layout, &bad, &ok, None, None, 1e-5, &mut y).unwrap_err(),
            feature("mean", c, bad_len)
        );
        assert_eq!(
            batch_norm_eval(&x, &shape, layout, &ok, &bad, None, None, 1e-5, &mut y).unwrap_err(),
            feature("var", c, bad_len)
        );
        assert_eq!(
            batch_norm_backward_eval(&x, &x, &shape, layout, &bad, &ok, 1e-5, None, Some(&mut dx), None, None)
                .unwrap_err(),
            feature("mean", c, bad_len)
        );
        assert_eq!(
            batch_norm_backward_eval(&x, &x, &shape, layout, &ok, &bad, 1e-5, None, Some(&mut dx), None, None)
                .unwrap_err(),
            feature("var", c, bad_len)
        );
        // Saved statistics.
        let bad_mean = SavedStats {
            mean: vec![0.0; bad_len],
            ..sv.clone()
        };
        let bad_inv = SavedStats {
            inv_std: vec![1.0; bad_len],
            ..sv.clone()
        };
        assert_eq!(
            normalize(&x, &shape, layout, &bad_mean, None, None, &mut y).unwrap_err(),
            feature("saved.mean", c, bad_len)
        );
        assert_eq!(
            normalize(&x, &shape, layout, &bad_inv, None, None, &mut y).unwrap_err(),
            feature("saved.inv_std", c, bad_len)
        );
        assert_eq!(
            batch_norm_backward(
                &x,
                &x,
                &shape,
                layout,
                &bad_mean,
                None,
                Some(&mut dx),
                Some(&mut dg),
                Some(&mut db)
            )
            .unwrap_err(),
            feature("saved.mean", c, bad_len)
        );
        assert_eq!(
            batch_norm_backward(&x, &x, &shape, layout, &bad_inv, None, Some(&mut dx), None, None).unwrap_err(),
            feature("saved.inv_std", c, bad_len)
        );
        assert_eq!(
            grad_sums(&x, &x, &shape, layout, &bad_mean).unwrap_err(),
            feature("saved.mean", c, bad_len)
        );
        let sums = GradSums {
            sum_dy: vec![0.0; c],
            sum_dy_xhat: vec![0.0; c],
        };
        assert_eq!(
            input_grad(&x, &x, &shape, layout, &bad_inv, &sums, None, &mut dx).unwrap_err(),
            feature("saved.inv_std", c, bad_len)
        );
        let bad_sums = GradSums {
            sum_dy: vec![0.0; bad_len],
            sum_dy_xhat: vec![0.0; bad_len],
        };
        assert_eq!(
            input_grad(&x, &x, &shape, layout, &sv, &bad_sums, None, &mut dx).unwrap_err(),
            feature("sums", c, bad_len)
        );
        assert_eq!(
            input_grad(&x, &x, &shape, layout, &sv, &sums, Some(&bad), &mut dx).unwrap_err(),
            feature("gamma", c, bad_len)
        );
        // Parameter-gradient outputs: nothing written, dx included.
        let mut bad_out = sentinel(bad_len);
        assert_eq!(
            batch_norm_backward(
                &x,
                &x,
                &shape,
                layout,
                &sv,
                None,
                Some(&mut dx),
                Some(&mut bad_out),
                Some(&mut db)
            )
            .unwrap_err(),
            feature("dgamma", c, bad_len)
        );
        assert_eq!(
            batch_norm_backward(
                &x,
                &x,
                &shape,
                layout,
                &sv,
                None,
                Some(&mut dx),
                Some(&mut dg),
                Some(&mut bad_out)
            )
            .unwrap_err(),
            feature("dbeta", c, bad_len)
        );
        assert_eq!(
            batch_norm_backward_eval(
                &x,
                &x,
                &shape,
                layout,
                &ok,
                &ok,
                1e-5,
                None,
                Some(&mut dx),
                Some(&mut bad_out),
                None
            )
            .unwrap_err(),
            feature("dgamma", c, bad_len)
        );
        assert_eq!(
            batch_norm_backward_eval(
                &x,
                &x,
                &shape,
                layout,
                &ok,
                &ok,
                1e-5,
                None,
                Some(&mut dx),
                Some(&mut dg),
                Some(&mut bad_out)
            )
            .unwrap_err(),
            feature("dbeta", c, bad_len)
        );
        // Running statistics.
        let batch = batch_stats(&x, &shape, layout).unwrap();
        let (mut rm, mut rv, mut rbad) = (sentinel(c), sentinel(c), sentinel(bad_len));
        assert_eq!(
            update_running_stats(&mut rbad, &mut rv, &batch, Momentum::Cumulative, 1).unwrap_err(),
            feature("running_mean", c, bad_len)
        );
        assert_eq!(
            update_running_stats(&mut rm, &mut rbad, &batch, Momentum::Exponential(0.1), 1).unwrap_err(),
            feature("running_var", c, bad_len)
        );
        untouched("running mean", &rm);
        untouched("running var", &rv);
        untouched("running (bad)", &rbad);
        // Algorithm 2's estimator.
        let mut pop = PopulationStats::new(bad_len);
        assert_eq!(pop.observe(&batch).unwrap_err(), feature("batch", bad_len, c));
        assert_eq!(
            pop.observe_batch(&x, &shape, layout).unwrap_err(),
            feature("batch", bad_len, c)
        );
        assert_eq!(pop.batches(), 0);

        for (name, v) in [
            ("y", &y),
            ("dx", &dx),
            ("dgamma", &dg),
            ("dbeta", &db),
            ("bad", &bad_out),
        ] {
            untouched(name, v);
        }
    }
}

/// The layer rejects an input whose channel count is not `num_features`, in every method.
#[test]
fn layer_num_features_mismatch() {
    let (shape, layout, n) = ([2usize, 4, 3, 3], Layout::NCHW, 72);
    let x = xs(n);
    let mut bn = layer(3);
    let before = bn.clone();
    let want = feature("input", 3, 4);
    let mut y = sentinel(n);
    let (mut dx, mut dg, mut db) = (sentinel(n), sentinel(4), sentinel(4));
    assert_eq!(bn.forward_train(&x, &shape, layout, &mut y).unwrap_err(), want);
    assert_eq!(bn.forward_eval(&x, &shape, layout, &mut y).unwrap_err(), want);
    assert_eq!(
        bn.backward(
            &x,
            &x,
            &shape,
            layout,
            &saved(4, 18),
            Some(&mut dx),
            Some((&mut dg, &mut db))
        )
        .unwrap_err(),
        want
    );
    assert_eq!(
        bn.backward_eval(&x, &x, &shape, layout, Some(&mut dx), Some((&mut dg, &mut db)))
            .unwrap_err(),
        want
    );
    let mut pop = PopulationStats::new(4);
    pop.observe_batch(&x, &shape, layout).unwrap();
    assert_eq!(bn.set_population_stats(&pop).unwrap_err(), feature("population", 3, 4));
    assert_eq!(bn, before);
    for v in [&y, &dx, &dg, &db] {
        untouched("layer output", v);
    }
}

// ---------------------------------------------------------------------------------------------
// ε and momentum.
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_eps() {
    let (shape, layout, n, c) = ([3usize, 2], Layout::NC, 6, 2);
    let x = xs(n);
    let ok = vec![1.0f32; c];
    for eps in [0.0, -0.0, -1e-5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let is_want = |e: Error| matches!(e, Error::InvalidEps(v) if v.to_bits() == eps.to_bits());
        let mut y = sentinel(n);
        let mut dx = sentinel(n);
        assert!(
            is_want(batch_norm_train(&x, &shape, layout, None, None, eps, &mut y).unwrap_err()),
            "{eps}"
        );
        assert!(is_want(
            batch_norm_eval(&x, &shape, layout, &ok, &ok, None, None, eps, &mut y).unwrap_err()
        ));
        assert!(is_want(
            batch_norm_backward_eval(&x, &x, &shape, layout, &ok, &ok, eps, None, Some(&mut dx), None, None)
                .unwrap_err()
        ));
        let s = batch_stats(&x, &shape, layout).unwrap();
        assert!(is_want(s.saved(eps).unwrap_err()));
        assert!(is_want(InferenceAffine::new(&ok, &ok, None, None, eps).unwrap_err()));
        let config = BatchNormConfig {
            eps,
            ..BatchNormConfig::default()
        };
        assert!(is_want(BatchNorm::<f32>::new(c, config).unwrap_err()));
        // ε changed on a live layer: rejected, nothing changed.
        let mut bn = layer(c);
        bn.config.eps = eps;
        let before = bn.clone();
        assert!(is_want(bn.forward_train(&x, &shape, layout, &mut y).unwrap_err()));
        assert!(is_want(bn.forward_eval(&x, &shape, layout, &mut y).unwrap_err()));
        assert!(is_want(
            bn.backward_eval(&x, &x, &shape, layout, Some(&mut dx), None)
                .unwrap_err()
        ));
        assert!(is_want(bn.inference_affine().unwrap_err()));
        // (`BatchNorm: PartialEq` is false for a NaN ε: compare the state field by field.)
        assert_eq!(bn.config.eps.to_bits(), before.config.eps.to_bits());
        assert_eq!(
            (
                &bn.gamma,
                &bn.beta,
                &bn.running_mean,
                &bn.running_var,
                bn.num_batches_tracked
            ),
            (
                &before.gamma,
                &before.beta,
                &before.running_mean,
                &before.running_var,
                before.num_batches_tracked
            )
        );
        untouched("y", &y);
        untouched("dx", &dx);
    }
}

#[test]
fn invalid_momentum() {
    let c = 2;
    let x = xs(6);
    let batch = batch_stats(&x, &[3, 2], Layout::NC).unwrap();
    for m in [0.0, -0.0, 1.5, 1.0 + f64::EPSILON, -0.1, f64::NAN, f64::INFINITY] {
        let is_want = |e: Error| matches!(e, Error::InvalidMomentum(v) if v.to_bits() == m.to_bits());
        let config = BatchNormConfig {
            momentum: Momentum::Exponential(m),
            ..BatchNormConfig::default()
        };
        assert!(is_want(BatchNorm::<f32>::new(c, config).unwrap_err()), "{m}");
        let (mut rm, mut rv) = (sentinel(c), sentinel(c));
        assert!(is_want(
            update_running_stats(&mut rm, &mut rv, &batch, Momentum::Exponential(m), 3).unwrap_err()
        ));
        untouched("running mean", &rm);
        untouched("running var", &rv);
    }
}

/// `BatchNorm::forward_train` documents "on error nothing (running statistics included) is
/// changed". Its configuration is public, so an invalid momentum can reach it after construction;
/// the error must leave y and the layer (`num_batches_tracked` included) as they were.
#[test]
fn layer_forward_train_invalid_momentum_changes_nothing() {
    let (shape, layout, n, c) = ([4usize, 2], Layout::NC, 8, 2);
    let x = xs(n);
    let mut bn = layer(c);
    bn.config.momentum = Momentum::Exponential(1.5);
    let before = bn.clone();
    let mut y = sentinel(n);
    let err = bn.forward_train(&x, &shape, layout, &mut y).unwrap_err();
    assert_eq!(err, Error::InvalidMomentum(1.5));
    assert_eq!(
        bn.num_batches_tracked, before.num_batches_tracked,
        "num_batches_tracked changed by a rejected forward_train"
    );
    assert_eq!(bn, before, "layer state changed by a rejected forward_train");
    untouched("y after a rejected forward_train", &y);
}

/// Same, with running statistics of the wrong length (public fields).
#[test]
fn layer_forward_train_bad_running_stats_changes_nothing() {
    let (shape, layout, n, c) = ([4usize, 2], Layout::NC, 8, 2);
    let x = xs(n);
    let mut bn = layer(c);
    bn.running_var = vec![1.0; c + 1];
    let before = bn.clone();
    let mut y = sentinel(n);
    let err = bn.forward_train(&x, &shape, layout, &mut y).unwrap_err();
    assert_eq!(err, feature("running_var", c, c + 1));
    assert_eq!(
        bn.num_batches_tracked, before.num_batches_tracked,
        "num_batches_tracked changed by a rejected forward_train"
    );
    assert_eq!(bn, before, "layer state changed by a rejected forward_train");
    untouched("y after a rejected forward_train", &y);
}

// ---------------------------------------------------------------------------------------------
// Missing statistics, merges, folding.
// ---------------------------------------------------------------------------------------------

#[test]
fn no_running_stats() {
    let (shape, layout, n, c) = ([3usize, 2, 2, 2], Layout::NCHW, 24, 2);
    let x = xs(n);
    let config = BatchNormConfig {
        track_running_stats: false,
        ..BatchNormConfig::default()
    };
    let mut bn = BatchNorm::<f32>::new(c, config).unwrap();
    assert!(bn.running_mean.is_empty() && bn.running_var.is_empty());
    let mut y = sentinel(n);
    let (mut dx, mut dg, mut db) = (sentinel(n), sentinel(c), sentinel(c));
    assert_eq!(
        bn.forward_eval(&x, &shape, layout, &mut y).unwrap_err(),
        Error::NoRunningStats
    );
    assert_eq!(
        bn.backward_eval(&x, &x, &shape, layout, Some(&mut dx), Some((&mut dg, &mut db)))
            .unwrap_err(),
        Error::NoRunningStats
    );
    assert_eq!(bn.inference_affine().unwrap_err(), Error::NoRunningStats);
    for v in [&y, &dx, &dg, &db] {
        untouched("output", v);
    }
    // Training still works and does not track anything.
    bn.forward_train(&x, &shape, layout, &mut y).unwrap();
    assert!(bn.running_mean.is_empty());
    assert_eq!(bn.num_batches_tracked, 0);
}

#[test]
fn no_batches() {
    let pop = PopulationStats::new(3);
    assert_eq!(pop.mean().unwrap_err(), Error::NoBatches);
    assert_eq!(pop.var().unwrap_err(), Error::NoBatches);
    assert_eq!(pop.finish::<f32>().unwrap_err(), Error::NoBatches);
    let mut bn = layer(3);
    let before = bn.clone();
    assert_eq!(bn.set_population_stats(&pop).unwrap_err(), Error::NoBatches);
    assert_eq!(bn, before);
}

#[test]
fn merge_mismatch() {
    let mut a = batch_stats(&xs(6), &[3, 2], Layout::NC).unwrap();
    let b = batch_stats(&xs(6), &[2, 3], Layout::NC).unwrap();
    let before = a.clone();
    assert_eq!(a.merge(&b).unwrap_err(), Error::MergeMismatch { left: 2, right: 3 });
    assert_eq!(a, before);
    // Also against an empty accumulator of the wrong width.
    let mut empty = BatchStats {
        count: 0,
        mean: vec![],
        m2: vec![],
    };
    assert_eq!(empty.merge(&b).unwrap_err(), Error::MergeMismatch { left: 0, right: 3 });

    let mut s = GradSums {
        sum_dy: vec![1.0; 2],
        sum_dy_xhat: vec![2.0; 2],
    };
    let t = GradSums {
        sum_dy: vec![1.0; 3],
        sum_dy_xhat: vec![2.0; 3],
    };
    let before = s.clone();
    assert_eq!(s.add(&t).unwrap_err(), Error::MergeMismatch { left: 2, right: 3 });
    assert_eq!(s, before);
}

/// `GradSums::write_param_grads` rejects outputs of the wrong length; like every other function it
/// must do so before writing anything.
#[test]
fn write_param_grads_checks_before_writing() {
    let sums = GradSums {
        sum_dy: vec![1.0, 2.0],
        sum_dy_xhat: vec![3.0, 4.0],
    };
    let (mut dg, mut db) = (sentinel(2), sentinel(3));
    assert_eq!(
        sums.write_param_grads(Some(&mut dg), Some(&mut db)).unwrap_err(),
        feature("dbeta", 2, 3)
    );
    untouched("dgamma", &dg);
    untouched("dbeta", &db);
    let (mut dg, mut db) = (sentinel(1), sentinel(2));
    assert_eq!(
        sums.write_param_grads(Some(&mut dg), Some(&mut db)).unwrap_err(),
        feature("dgamma", 2, 1)
    );
    untouched("dbeta", &db);
}

#[test]
fn fold_errors() {
    let bn = InferenceAffine {
        scale: vec![2.0, 3.0, 4.0],
        shift: vec![1.0, 1.0, 1.0],
    };
    for len in [7usize, 2, 4, 0] {
        let mut w = sentinel(len);
        let err = fold_into_preceding(&mut w, None, &bn).unwrap_err();
        assert!(
            matches!(err, Error::BufferLength { name: "weight", actual, .. } if actual == len),
            "weight of {len}: {err:?}"
        );
        untouched("weight", &w);
    }
    for blen in [2usize, 4, 0] {
        let mut w = sentinel(6);
        let b = vec![0.0f32; blen];
        assert_eq!(
            fold_into_preceding(&mut w, Some(&b), &bn).unwrap_err(),
            feature("bias", 3, blen)
        );
        untouched("weight", &w);
    }
    // No channels at all.
    let none = InferenceAffine {
        scale: vec![],
        shift: vec![],
    };
    let mut w = sentinel(4);
    assert!(matches!(
        fold_into_preceding(&mut w, None, &none).unwrap_err(),
        Error::BufferLength { name: "weight", .. }
    ));
    untouched("weight", &w);
    // InferenceAffine::new with mismatched vectors.
    let one = [1.0f32; 3];
    assert_eq!(
        InferenceAffine::new(&one, &one[..2], None, None, 1e-5).unwrap_err(),
        feature("var", 3, 2)
    );
    assert_eq!(
        InferenceAffine::new(&one, &one, Some(&one[..1]), None, 1e-5).unwrap_err(),
        feature("gamma", 3, 1)
    );
    assert_eq!(
        InferenceAffine::new(&one, &one, None, Some(&one[..2]), 1e-5).unwrap_err(),
        feature("beta", 3, 2)
    );
}

/// Errors display a message (they are `std::error::Error`s) and never panic while doing so.
#[test]
fn errors_display() {
    let e: Box<dyn std::error::Error> = Box::new(Error::TooFewValues {
        count: 1,
        shape: vec![1, 3],
    });
    assert!(e.to_string().contains("more than 1 value"));
    assert!(Error::InvalidEps(f64::NAN).to_string().contains("NaN"));
}

/// The statistics structs have public fields, so inconsistent ones (per-channel vectors of
/// different lengths) are possible input. The crate documents "every error is an `Error`, never a
/// panic": each consumer must reject them, not index out of bounds.
#[test]
fn inconsistent_public_structs_are_rejected_without_panic() {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let short_m2 = BatchStats {
        count: 4,
        mean: vec![0.0; 3],
        m2: vec![1.0; 2],
    };
    let long_m2 = BatchStats {
        count: 4,
        mean: vec![0.0; 3],
        m2: vec![1.0; 4],
    };
    let good = BatchStats {
        count: 4,
        mean: vec![0.0; 3],
        m2: vec![1.0; 3],
    };
    let mut failures = Vec::new();
    let mut check = |what: &str, f: &mut dyn FnMut() -> Result<(), Error>| match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Err(_)) => {}
        Ok(Ok(())) => failures.push(format!("{what}: accepted")),
        Err(_) => failures.push(format!("{what}: panicked")),
    };
    check("BatchStats::merge(short m2)", &mut || good.clone().merge(&short_m2));
    check("short m2 .merge(good)", &mut || short_m2.clone().merge(&good));
    check("update_running_stats(short m2)", &mut || {
        let (mut rm, mut rv) = (vec![0.0f32; 3], vec![1.0f32; 3]);
        update_running_stats(&mut rm, &mut rv, &short_m2, Momentum::Exponential(0.1), 1)
    });
    check("PopulationStats::observe(long m2)", &mut || {
        PopulationStats::new(3).observe(&long_m2)
    });
    check("fold_into_preceding(shift shorter than scale)", &mut || {
        let bn = InferenceAffine {
            scale: vec![1.0; 3],
            shift: vec![0.0; 2],
        };
        fold_into_preceding(&mut [1.0f32; 6], None, &bn).map(|_| ())
    });
    assert!(failures.is_empty(), "{failures:#?}");
}
