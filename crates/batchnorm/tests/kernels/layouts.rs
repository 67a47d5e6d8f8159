//! Layout independence: batch norm's statistics are per channel over N·H·W values whatever the
//! memory order, so NCHW and NHWC of the same logical tensor give the same numbers up to
//! summation order (tolerance: `reduce_rel::<T>(m)` of `common/mod.rs`, plus 2·ε_T·|value| for the
//! final rounding to f32, where two f64 values a few ulp apart can round to neighbouring f32s).
//! Layouts with the same `[outer, channels, inner]` geometry run the same code and must agree
//! bit for bit.

use crate::common::*;
use batchnorm::{batch_norm_eval, Affine, BatchStats, FixedStats, Layout, SavedStats, View};
use proptest::prelude::*;

/// Everything the ops produce for one layout, in the layout's own memory order.
struct Outputs<T> {
    y: Vec<T>,
    stats: BatchStats,
    saved: SavedStats,
    dx: Vec<T>,
    dgamma: Vec<T>,
    dbeta: Vec<T>,
    y_eval: Vec<T>,
    dx_eval: Vec<T>,
    dgamma_eval: Vec<T>,
}

fn run_all<T: PlainFloat>(d: &Data, x: &[T], dy: &[T], shape: &[usize], layout: Layout, eps: f64) -> Outputs<T> {
    let (gamma, beta, mean, var) = (
        narrow::<T>(&d.gamma),
        narrow::<T>(&d.beta),
        narrow::<T>(&d.mean),
        narrow::<T>(&d.var),
    );
    let n = x.len();
    let zero = T::from_f64(0.0);
    let (y, stats, saved) = train(View::new(x, shape, layout), Affine::new(&gamma, &beta), eps);
    let (dx, dgamma, dbeta) = backward_all(View::new(x, shape, layout), dy, &saved, Some(&gamma));
    let mut y_eval = vec![zero; n];
    batch_norm_eval(
        View::new(x, shape, layout),
        FixedStats::new(&mean, &var),
        Affine::new(&gamma, &beta),
        eps,
        &mut y_eval,
    )
    .unwrap();
    let (dx_eval, dgamma_eval) = backward_eval_dx_dgamma(
        View::new(x, shape, layout),
        dy,
        FixedStats::new(&mean, &var),
        &gamma,
        eps,
    );
    Outputs {
        y,
        stats,
        saved,
        dx,
        dgamma,
        dbeta,
        y_eval,
        dx_eval,
        dgamma_eval,
    }
}

/// NCHW vs the same tensor transposed to NHWC (Algorithm 1 forward, Section 3 backward,
/// inference forward and backward).
fn check_nchw_nhwc<T: PlainFloat>(shape: [usize; 4], seed: u64) {
    let eps = 1e-5;
    let d = Data::new::<T>(Layout::NCHW, &shape, seed);
    let [n, c, h, w] = shape;
    let nhwc_shape = [n, h, w, c];
    let (x, dy) = (narrow::<T>(&d.x), narrow::<T>(&d.dy));
    let a = run_all(&d, &x, &dy, &shape, Layout::NCHW, eps);
    let b = run_all(
        &d,
        &nchw_to_nhwc(&x, shape),
        &nchw_to_nhwc(&dy, shape),
        &nhwc_shape,
        Layout::NHWC,
        eps,
    );
    let rel = reduce_rel::<T>(d.g.per_channel());
    let what = format!("NCHW {shape:?} vs NHWC ({})", T::NAME);

    assert_eq!(a.stats.count, b.stats.count);
    assert_close::<f64>(
        &format!("{what} mean"),
        &b.stats.mean,
        &a.stats.mean,
        &d.mean_abs_x(),
        rel,
    );
    assert_close::<f64>(&format!("{what} m2"), &b.stats.m2, &a.stats.m2, &a.stats.m2, rel);
    assert_close::<f64>(
        &format!("{what} inv_std"),
        &b.saved.inv_std,
        &a.saved.inv_std,
        &a.saved.inv_std,
        rel,
    );

    let t = |v: &[f64]| nchw_to_nhwc(v, shape);
    let var = a.stats.var_biased();
    let yscale = t(&train_y_scale(&d, &d.gamma, &d.beta, &a.stats.mean, &var, eps));
    assert_close(&format!("{what} y"), &b.y, &t(&wide(&a.y)), &yscale, rel);
    let (sdx, sdg, sdb) = backward_scales(&d, &d.dy, &d.gamma, eps);
    assert_close(&format!("{what} dx"), &b.dx, &t(&wide(&a.dx)), &t(&sdx), rel);
    assert_close(&format!("{what} dgamma"), &b.dgamma, &wide(&a.dgamma), &sdg, rel);
    assert_close(&format!("{what} dbeta"), &b.dbeta, &wide(&a.dbeta), &sdb, rel);

    // Inference: element-wise, the same formula in both layouts: bit for bit.
    assert_bits(&format!("{what} eval y"), &b.y_eval, &t_bits(&a.y_eval, shape));
    assert_bits(&format!("{what} eval dx"), &b.dx_eval, &t_bits(&a.dx_eval, shape));
    let sdge = eval_dgamma_scale(&d, &d.dy, eps);
    assert_close(
        &format!("{what} eval dgamma"),
        &b.dgamma_eval,
        &wide(&a.dgamma_eval),
        &sdge,
        rel,
    );
}

fn t_bits<T: Copy>(v: &[T], shape: [usize; 4]) -> Vec<T> {
    nchw_to_nhwc(v, shape)
}

/// Two layouts with the same geometry: identical bits for every output.
fn check_same_bits<T: PlainFloat>(a: (Layout, &[usize]), b: (Layout, &[usize]), seed: u64) {
    let d = Data::new::<T>(a.0, a.1, seed);
    assert_eq!(a.0.geometry(a.1).unwrap(), b.0.geometry(b.1).unwrap());
    let (x, dy) = (narrow::<T>(&d.x), narrow::<T>(&d.dy));
    let p = run_all(&d, &x, &dy, a.1, a.0, 1e-5);
    let q = run_all(&d, &x, &dy, b.1, b.0, 1e-5);
    let what = format!("{} {:?} vs {} {:?}", a.0, a.1, b.0, b.1);
    assert_bits(&format!("{what} y"), &p.y, &q.y);
    assert_eq!(p.stats, q.stats, "{what} stats");
    assert_eq!(p.saved, q.saved, "{what} saved");
    assert_bits(&format!("{what} dx"), &p.dx, &q.dx);
    assert_bits(&format!("{what} dgamma"), &p.dgamma, &q.dgamma);
    assert_bits(&format!("{what} dbeta"), &p.dbeta, &q.dbeta);
    assert_bits(&format!("{what} y_eval"), &p.y_eval, &q.y_eval);
    assert_bits(&format!("{what} dx_eval"), &p.dx_eval, &q.dx_eval);
    assert_bits(&format!("{what} dgamma_eval"), &p.dgamma_eval, &q.dgamma_eval);
}

#[test]
fn nchw_and_nhwc_agree_on_chunking_shapes() {
    for (i, shape) in [
        [4, 5, 6, 7],
        [2, 20, 9, 11],
        [3, 3, 100, 30],
        [2, 3, 100, 100],
        [64, 4, 8, 8],
        [2, 1, 1, 2],
        [9, 64, 30, 31],
    ]
    .into_iter()
    .enumerate()
    {
        check_nchw_nhwc::<f64>(shape, 11 + i as u64);
        check_nchw_nhwc::<f32>(shape, 31 + i as u64);
    }
}

#[test]
fn same_geometry_same_bits() {
    for (i, s) in [[2usize, 3, 100, 100], [4, 20, 5, 7], [3, 5, 2, 1]]
        .into_iter()
        .enumerate()
    {
        let seed = 70 + i as u64;
        check_same_bits::<f32>((Layout::NCHW, &s), (Layout::ChannelsFirst, &s), seed);
        check_same_bits::<f64>((Layout::NCHW, &s), (Layout::ChannelsFirst, &s), seed);
        check_same_bits::<f32>((Layout::NHWC, &s), (Layout::ChannelsLast, &s), seed);
        check_same_bits::<f64>((Layout::NHWC, &s), (Layout::ChannelsLast, &s), seed);
    }
    // NC, channels-first and channels-last of rank 2 are all [N, C].
    for s in [[7usize, 3], [5000, 64]] {
        check_same_bits::<f32>((Layout::NC, &s), (Layout::ChannelsFirst, &s), 5);
        check_same_bits::<f64>((Layout::NC, &s), (Layout::ChannelsLast, &s), 6);
    }
    // Channels-last of any rank is a function of (N·spatial, C) only: [N, H, W, C] = [N·H·W, C].
    check_same_bits::<f32>((Layout::NHWC, &[8, 40, 40, 3]), (Layout::NC, &[8 * 40 * 40, 3]), 9);
    // Channels-first with trailing dims multiplied out.
    check_same_bits::<f64>(
        (Layout::NCHW, &[2, 3, 10, 10]),
        (Layout::ChannelsFirst, &[2, 3, 100]),
        10,
    );
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn nchw_and_nhwc_agree(n in 1usize..6, c in 1usize..24, h in 1usize..12, w in 1usize..12, seed: u64) {
        prop_assume!(n * h * w >= 2);
        check_nchw_nhwc::<f64>([n, c, h, w], seed);
        check_nchw_nhwc::<f32>([n, c, h, w], seed);
    }
}
