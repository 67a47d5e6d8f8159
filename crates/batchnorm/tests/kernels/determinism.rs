//! Thread-count determinism: the crate documents that results are bitwise identical for any number
//! of threads (work units and merge order depend only on the shape). Every op runs inside rayon
//! pools of 1, 2 and 3 threads on tensors large enough to be split into parallel units, and all
//! outputs must have the same bits.

use crate::common::*;
use batchnorm::{
    batch_norm_backward, batch_norm_eval, batch_stats, grad_sums, Affine, BatchStats, FixedStats, GradSums, Grads,
    Layout, SavedStats, View,
};

/// All outputs of all ops, as f64 bits where they are f64 and as `T` otherwise.
struct Run<T> {
    y: Vec<T>,
    stats: BatchStats,
    saved: SavedStats,
    batch_stats: BatchStats,
    y_eval: Vec<T>,
    y_norm: Vec<T>,
    dx: Vec<T>,
    dgamma: Vec<T>,
    dbeta: Vec<T>,
    dgamma_no_dx: Vec<T>,
    sums: GradSums,
    dx_split: Vec<T>,
    dx_eval: Vec<T>,
    dgamma_eval: Vec<T>,
}

fn run_ops<T: PlainFloat>(d: &Data, shape: &[usize], layout: Layout) -> Run<T> {
    let eps = 1e-5;
    let (x, dy) = (narrow::<T>(&d.x), narrow::<T>(&d.dy));
    let (gamma, beta, mean, var) = (
        narrow::<T>(&d.gamma),
        narrow::<T>(&d.beta),
        narrow::<T>(&d.mean),
        narrow::<T>(&d.var),
    );
    let (n, c) = (x.len(), d.g.channels);
    let z = T::from_f64(0.0);
    let (y, stats, saved) = train(View::new(&x, shape, layout), Affine::new(&gamma, &beta), eps);
    let bs = batch_stats(View::new(&x, shape, layout)).unwrap();
    let mut y_eval = vec![z; n];
    batch_norm_eval(
        View::new(&x, shape, layout),
        FixedStats::new(&mean, &var),
        Affine::new(&gamma, &beta),
        eps,
        &mut y_eval,
    )
    .unwrap();
    let gamma_only = Affine {
        gamma: Some(&gamma),
        beta: None,
    };
    let y_norm = split_normalize(View::new(&x, shape, layout), &saved, gamma_only);
    let (dx, dgamma, dbeta) = backward_all(View::new(&x, shape, layout), &dy, &saved, Some(&gamma));
    let mut dgamma_no_dx = vec![z; c];
    batch_norm_backward(
        View::new(&x, shape, layout),
        &dy,
        &saved,
        None,
        Grads {
            dx: None,
            dgamma: Some(&mut dgamma_no_dx),
            dbeta: None,
        },
    )
    .unwrap();
    let sums = grad_sums(View::new(&x, shape, layout), &dy, &saved).unwrap();
    let dx_split = split_input_grad(&sums, View::new(&x, shape, layout), &dy, &saved, Some(&gamma));
    let (dx_eval, dgamma_eval) = backward_eval_dx_dgamma(
        View::new(&x, shape, layout),
        &dy,
        FixedStats::new(&mean, &var),
        &gamma,
        eps,
    );
    Run {
        y,
        stats,
        saved,
        batch_stats: bs,
        y_eval,
        y_norm,
        dx,
        dgamma,
        dbeta,
        dgamma_no_dx,
        sums,
        dx_split,
        dx_eval,
        dgamma_eval,
    }
}

fn f64_bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|a| a.to_bits()).collect()
}

fn assert_same_run<T: PlainFloat>(what: &str, a: &Run<T>, b: &Run<T>) {
    for (name, p, q) in [
        ("y", &a.y, &b.y),
        ("y_eval", &a.y_eval, &b.y_eval),
        ("y_norm", &a.y_norm, &b.y_norm),
        ("dx", &a.dx, &b.dx),
        ("dgamma", &a.dgamma, &b.dgamma),
        ("dbeta", &a.dbeta, &b.dbeta),
        ("dgamma_no_dx", &a.dgamma_no_dx, &b.dgamma_no_dx),
        ("dx_split", &a.dx_split, &b.dx_split),
        ("dx_eval", &a.dx_eval, &b.dx_eval),
        ("dgamma_eval", &a.dgamma_eval, &b.dgamma_eval),
    ] {
        assert_bits(&format!("{what} {name}"), p, q);
    }
    for (name, p, q) in [
        ("stats.mean", &a.stats.mean, &b.stats.mean),
        ("stats.m2", &a.stats.m2, &b.stats.m2),
        ("saved.mean", &a.saved.mean, &b.saved.mean),
        ("saved.inv_std", &a.saved.inv_std, &b.saved.inv_std),
        ("batch_stats.mean", &a.batch_stats.mean, &b.batch_stats.mean),
        ("batch_stats.m2", &a.batch_stats.m2, &b.batch_stats.m2),
        ("sum_dy", &a.sums.sum_dy, &b.sums.sum_dy),
        ("sum_dy_xhat", &a.sums.sum_dy_xhat, &b.sums.sum_dy_xhat),
    ] {
        assert_eq!(f64_bits(p), f64_bits(q), "{what} {name}");
    }
    assert_eq!(a.stats.count, b.stats.count);
}

fn check_threads<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64) {
    let d = Data::new::<T>(layout, shape, seed);
    let runs: Vec<(usize, Run<T>)> = [1usize, 2, 3]
        .into_iter()
        .map(|threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            (threads, pool.install(|| run_ops::<T>(&d, shape, layout)))
        })
        .collect();
    for (threads, run) in &runs[1..] {
        assert_same_run(
            &format!("{layout} {shape:?} {}: 1 vs {threads} threads", T::NAME),
            &runs[0].1,
            run,
        );
    }
}

/// Channels-first with ≥ 16 channels: one unit per channel, fused passes.
#[test]
fn threads_nchw_many_channels() {
    check_threads::<f32>(Layout::NCHW, &[16, 32, 32, 32], 1);
    check_threads::<f64>(Layout::NCHW, &[8, 32, 32, 32], 2);
}

/// Channels-first with few channels: blocks of planes merged per channel.
#[test]
fn threads_nchw_few_channels() {
    check_threads::<f32>(Layout::NCHW, &[64, 4, 16, 16], 3);
    check_threads::<f64>(Layout::NCHW, &[64, 4, 16, 16], 4);
    // Planes longer than a piece (8192) and one channel.
    check_threads::<f32>(Layout::ChannelsFirst, &[6, 1, 40_000], 5);
}

/// Channels-last: tasks of 2¹⁸ elements merged in order (20·32·32 = 20480 rows of 16 channels =
/// 2 tasks; 16·32·32 = exactly 1 task).
#[test]
fn threads_nhwc() {
    check_threads::<f32>(Layout::NHWC, &[16, 32, 32, 16], 6);
    check_threads::<f32>(Layout::NHWC, &[20, 32, 32, 16], 7);
    check_threads::<f64>(Layout::NHWC, &[4, 150, 150, 3], 8);
}

/// NC: 3000 rows of 200 features = 3 tasks of 1310 rows.
#[test]
fn threads_nc() {
    check_threads::<f32>(Layout::NC, &[3000, 200], 9);
    check_threads::<f64>(Layout::NC, &[3000, 200], 10);
}
