//! Masked batch norm (issue 16's definition): statistics over the positions a mask selects,
//! those positions normalized, the others written 0, the backward its exact derivative.
//!
//! Against the f64 reference (`reference::masked_*`: plain batch norm's reference over the
//! selected positions gathered into rows, 0 elsewhere) over random shapes, layouts, masks and
//! element types; against central finite differences in f64; against plain batch norm bit for
//! bit with a mask of all ones; bit for bit unchanged by what the masked positions hold (1e30,
//! NaN, ±∞ in x and dy); synchronized over 2 and 3 in-process ranks (uneven shards, uneven
//! valid counts, a rank with none) against one process over the whole batch; bitwise across
//! thread counts. Tolerances are those of `common` (see its module docs) with m the number of
//! selected values per channel: every scale is computed on the selected values gathered into
//! rows (`selected`), where masked batch norm is plain batch norm.

use crate::common::*;
use crate::sync::{config as sync_config, Step};
use batchnorm::{
    batch_norm_backward, batch_norm_backward_eval, batch_norm_backward_eval_masked, batch_norm_backward_masked,
    batch_norm_eval, batch_norm_eval_masked, batch_norm_train, batch_norm_train_masked, batch_stats,
    batch_stats_masked, grad_sums, grad_sums_masked, input_grad, input_grad_masked, normalize, normalize_masked,
    reference, Affine, BatchNorm, BatchNormConfig, Communicator, Element, Error, FixedStats, Geometry, Grads, Layout,
    Momentum, SmallBatch, SyncBatchNorm, View,
};
use proptest::prelude::*;
use rand::Rng;

// ---------------------------------------------------------------------------------------------
// Masks and data
// ---------------------------------------------------------------------------------------------

/// How a test mask is drawn.
#[derive(Debug, Clone, Copy)]
enum MaskKind {
    /// Each position on with probability p.
    Random(f64),
    /// Each example on up to a random number of its positions (0 to all): padded sequences.
    Padded,
}

fn mask_kind() -> impl Strategy<Value = MaskKind> {
    prop_oneof![
        Just(MaskKind::Padded),
        Just(MaskKind::Random(0.5)),
        Just(MaskKind::Random(0.9)),
        Just(MaskKind::Random(0.1)),
    ]
}

/// A mask over `examples` examples of `per_example` positions each (row-major `[N, …]`), with at
/// least `min_on` positions on (the first ones that are off are switched on when the draw has
/// fewer).
fn make_mask(examples: usize, per_example: usize, kind: MaskKind, seed: u64, min_on: usize) -> Vec<bool> {
    let mut r = rng(seed);
    let mut mask = Vec::with_capacity(examples * per_example);
    for _ in 0..examples {
        match kind {
            MaskKind::Random(p) => mask.extend((0..per_example).map(|_| r.gen_bool(p))),
            MaskKind::Padded => {
                let len = r.gen_range(0..=per_example);
                mask.extend((0..per_example).map(|i| i < len));
            }
        }
    }
    let missing = min_on.saturating_sub(mask.iter().filter(|&&on| on).count());
    mask.iter_mut()
        .filter(|on| !**on)
        .take(missing)
        .for_each(|on| *on = true);
    mask
}

/// A mask for `shape` (its first dimension the examples).
fn mask_for(d: &Data, shape: &[usize], kind: MaskKind, seed: u64) -> Vec<bool> {
    let n = shape[0];
    make_mask(n, d.g.per_channel() / n, kind, seed, 2)
}

/// The synchronized tests' shapes of every layout (at least 4 examples, to be split over 3
/// ranks), and two with vector steps (planes of 20 positions, rows of 10 channels).
fn small_shapes() -> Vec<(Layout, Vec<usize>)> {
    let mut shapes = shard_shapes();
    shapes.extend([
        (Layout::ChannelsFirst, vec![6, 3, 20]),
        (Layout::ChannelsLast, vec![7, 3, 10]),
    ]);
    shapes
}

/// Flat indices of the elements at positions that `mask` has off.
fn masked_out<'a>(g: &Geometry, mask: &'a [bool]) -> impl Iterator<Item = usize> + 'a {
    let g = *g;
    (0..g.len()).filter(move |&k| !mask[(k / (g.channels * g.inner)) * g.inner + k % g.inner])
}

/// `v` with `pad` at every element of a position that `mask` has off.
fn padded(g: &Geometry, v: &[f64], mask: &[bool], pad: f64) -> Vec<f64> {
    let mut out = v.to_vec();
    for k in masked_out(g, mask) {
        out[k] = pad;
    }
    out
}

/// The data at the selected positions gathered into `[m, C]` rows (where masked batch norm is
/// plain batch norm: the tolerances' scales are computed there), and the positions.
fn selected(d: &Data, mask: &[bool]) -> (Data, Vec<(usize, usize)>) {
    let (g, x, positions) = reference::masked_gather(&d.g, &d.x, mask);
    let (_, dy, _) = reference::masked_gather(&d.g, &d.dy, mask);
    (Data { g, x, dy, ..d.clone() }, positions)
}

/// Asserts that every element at a position `mask` has off is +0.0, bit for bit.
#[track_caller]
fn assert_zero_where_off<T: Element>(what: &str, g: &Geometry, mask: &[bool], v: &[T]) {
    for k in masked_out(g, mask) {
        assert!(
            v[k].to_f64().to_bits() == 0,
            "{what}[{k}]: {:e} at a masked position, not +0",
            v[k].to_f64()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Against the reference
// ---------------------------------------------------------------------------------------------

/// Masked training forward (μ_B, σ²_B over the m selected values, y = γ·x̂ + β there, 0
/// elsewhere), its backward (plain batch norm's chain rule over the selected values, dx = 0
/// elsewhere, dγ and dβ over the selected values), masked inference and its backward, against
/// `reference::masked_*`. The masked positions of x and dy hold NaN, which the reference never
/// reads: any leak fails the comparison.
fn check_masked<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64, affine: bool, eps: f64, kind: MaskKind) {
    let d = Data::new::<T>(layout, shape, seed);
    let mask = mask_for(&d, shape, kind, seed ^ 0x6d61_736b);
    let (sd, positions) = selected(&d, &mask);
    let m = sd.g.outer;
    let scatter = |rows: &[f64]| reference::masked_scatter(&d.g, rows, &positions);
    let (gamma, beta) = d.affine(affine);
    let (gt, bt) = (narrow::<T>(&gamma), narrow::<T>(&beta));
    let x = narrow::<T>(&padded(&d.g, &d.x, &mask, f64::NAN));
    let dy = narrow::<T>(&padded(&d.g, &d.dy, &mask, f64::NAN));
    let v = View::new(&x, shape, layout);
    let (n, c) = (x.len(), d.g.channels);
    let nan = T::from_f64(f64::NAN);
    let what = format!("{layout} {shape:?} {kind:?} m={m} affine={affine} eps={eps}");
    let rel = reduce_rel::<T>(m);

    // Forward: statistics of the selected values, y.
    let mut y = vec![nan; n];
    let (stats, saved) = batch_norm_train_masked(v, &mask, affine_if(affine, &gt, &bt), eps, &mut y).unwrap();
    let (ry, rmean, rvar) = reference::masked_forward_train(&d.g, &d.x, &mask, &gamma, &beta, eps);
    assert_eq!((stats.count, saved.count), (m as u64, m as u64), "{what}: count");
    assert_close::<f64>(&format!("{what} mean"), &stats.mean, &rmean, &sd.mean_abs_x(), rel);
    assert_close::<f64>(&format!("{what} var"), &stats.var_biased(), &rvar, &rvar, rel);
    let rinv: Vec<f64> = rvar.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    assert_close::<f64>(&format!("{what} inv_std"), &saved.inv_std, &rinv, &rinv, rel);
    let y_scale = scatter(&train_y_scale(&sd, &gamma, &beta, &rmean, &rvar, eps));
    assert_close(&format!("{what} y"), &y, &ry, &y_scale, rel);
    assert_zero_where_off(&format!("{what} y"), &d.g, &mask, &y);

    // Backward.
    let (mut dx, mut dg, mut db) = (vec![nan; n], vec![nan; c], vec![nan; c]);
    let grads = Grads::new(&mut dx, &mut dg, &mut db);
    batch_norm_backward_masked(v, &mask, &dy, &saved, opt(&gt, affine), grads).unwrap();
    let (rdx, rdg, rdb) = reference::masked_backward_train(&d.g, &d.x, &mask, &d.dy, &gamma, eps);
    let (sdx, sdg, sdb) = backward_scales(&sd, &sd.dy, &gamma, eps);
    assert_close(&format!("{what} dx"), &dx, &rdx, &scatter(&sdx), rel);
    assert_zero_where_off(&format!("{what} dx"), &d.g, &mask, &dx);
    assert_close(&format!("{what} dgamma"), &dg, &rdg, &sdg, rel);
    assert_close(&format!("{what} dbeta"), &db, &rdb, &sdb, rel);

    // Inference with fixed statistics, and its backward (the statistics constants).
    let (mean_t, var_t) = (narrow::<T>(&d.mean), narrow::<T>(&d.var));
    let fixed = FixedStats::new(&mean_t, &var_t);
    let mut ye = vec![nan; n];
    batch_norm_eval_masked(v, &mask, fixed, affine_if(affine, &gt, &bt), eps, &mut ye).unwrap();
    let rye = reference::masked_forward_eval(&d.g, &d.x, &mask, &d.mean, &d.var, &gamma, &beta, eps);
    let ye_scale = scatter(&eval_y_scale(&sd, &gamma, &beta, eps));
    assert_close(&format!("{what} eval y"), &ye, &rye, &ye_scale, elementwise_rel::<T>());
    assert_zero_where_off(&format!("{what} eval y"), &d.g, &mask, &ye);
    let (mut dxe, mut dge, mut dbe) = (vec![nan; n], vec![nan; c], vec![nan; c]);
    let grads = Grads::new(&mut dxe, &mut dge, &mut dbe);
    batch_norm_backward_eval_masked(v, &mask, &dy, fixed, opt(&gt, affine), eps, grads).unwrap();
    let (rdxe, rdge, rdbe) = reference::masked_backward_eval(&d.g, &d.x, &mask, &d.dy, &d.mean, &d.var, &gamma, eps);
    let sdxe: Vec<f64> = (0..sd.x.len())
        .map(|k| {
            let c = channel_of(&sd.g, k);
            (sd.dy[k] * gamma[c]).abs() / (sd.var[c] + eps).sqrt()
        })
        .collect();
    assert_close(
        &format!("{what} eval dx"),
        &dxe,
        &rdxe,
        &scatter(&sdxe),
        elementwise_rel::<T>(),
    );
    assert_zero_where_off(&format!("{what} eval dx"), &d.g, &mask, &dxe);
    assert_eval_param_grads(&format!("{what} eval"), (&dge, &dbe), (&rdge, &rdbe), &sd, eps, rel);
    // dx with the sums (one pass), dx alone and the sums alone (a pass each): the same bits.
    assert_output_subsets(&format!("{what} eval"), (&dxe, &dge, &dbe), |grads| {
        batch_norm_backward_eval_masked(v, &mask, &dy, fixed, opt(&gt, affine), eps, grads).unwrap()
    });
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn masked_matches_reference_f64(
        (layout, shape) in layout_shape(20_000), seed: u64, affine: bool, eps in eps_strategy(), kind in mask_kind()
    ) {
        check_masked::<f64>(layout, &shape, seed, affine, eps, kind);
    }

    #[test]
    fn masked_matches_reference_f32(
        (layout, shape) in layout_shape(20_000), seed: u64, affine: bool, eps in eps_strategy(), kind in mask_kind()
    ) {
        check_masked::<f32>(layout, &shape, seed, affine, eps, kind);
    }
}

/// The chunking shapes (pieces, blocks of planes, fused channels, row tasks and blocks), with
/// padded masks (whole pieces, blocks and row tasks without a selected value) and random ones.
#[test]
fn masked_on_chunking_shapes() {
    for (i, (layout, shape)) in chunking_shapes().into_iter().enumerate() {
        let seed = 700 + i as u64;
        check_masked::<f32>(layout, &shape, seed, true, 1e-5, MaskKind::Padded);
        check_masked::<f64>(layout, &shape, seed, false, 1e-5, MaskKind::Random(0.3));
    }
}

/// Shapes whose outputs are written with streaming stores (y of 16 MiB and more; dx when x, dy
/// and dx together overflow the 32 MiB the plans assume), padded masks (the stretches that are
/// off are then zeroed with streaming stores too) and scattered ones. Outputs start as NaN, so an element the
/// passes skip fails `assert_zero_where_off` or the comparison with the reference.
#[test]
fn masked_with_streamed_outputs() {
    let shapes = [
        (Layout::NCHW, vec![16, 16, 128, 129]),
        (Layout::NHWC, vec![16, 129, 128, 16]),
    ];
    for (i, (layout, shape)) in shapes.into_iter().enumerate() {
        assert!(shape.iter().product::<usize>() * 4 >= 16 << 20);
        check_masked::<f32>(layout, &shape, 900 + i as u64, true, 1e-5, MaskKind::Padded);
        // Scattered: spans with gaps, selected lane by lane under streamed stores.
        check_masked::<f32>(layout, &shape, 910 + i as u64, true, 1e-5, MaskKind::Random(0.5));
    }
}

/// The layer: `forward_train_masked` gives the free function's bits and updates the running
/// statistics with μ_B and the unbiased m/(m − 1)·σ²_B of the m selected values
/// (`reference::running_update` with m); `backward_masked` and `forward_eval_masked` give the
/// free functions' bits.
#[test]
fn layer_masked_updates_running_stats_with_the_valid_count() {
    for (i, (layout, shape)) in small_shapes().into_iter().enumerate() {
        let d = Data::new::<f64>(layout, &shape, 40 + i as u64);
        let mask = mask_for(&d, &shape, MaskKind::Padded, 41 + i as u64);
        let v = View::new(&d.x, &shape, layout);
        let config = BatchNormConfig {
            momentum: Momentum::Exponential(0.3),
            ..BatchNormConfig::default()
        };
        let mut bn = BatchNorm::<f64>::new(d.g.channels, config).unwrap();
        bn.gamma = d.gamma.clone();
        bn.beta = d.beta.clone();
        bn.running_mean = d.mean.clone();
        bn.running_var = d.var.clone();
        let before = bn.clone();
        let n = d.x.len();
        let mut y = vec![f64::NAN; n];
        let saved = bn.forward_train_masked(v, &mask, &mut y).unwrap();
        let mut y_free = vec![f64::NAN; n];
        let (stats, saved_free) =
            batch_norm_train_masked(v, &mask, Affine::new(&d.gamma, &d.beta), 1e-5, &mut y_free).unwrap();
        assert_bits("layer y", &y, &y_free);
        assert_eq!(saved, saved_free);
        let (_, rmean, rvar) = reference::masked_forward_train(&d.g, &d.x, &mask, &d.gamma, &d.beta, 1e-5);
        let m = stats.count as usize;
        let (rm, rv) = reference::running_update(&d.mean, &d.var, &rmean, &rvar, m, Some(0.3), 1);
        let what = format!("{layout} {shape:?} m={m}");
        let (sd, _) = selected(&d, &mask);
        let rel = reduce_rel::<f64>(m);
        assert_close(
            &format!("{what} running_mean"),
            &bn.running_mean,
            &rm,
            &sd.mean_abs_x(),
            rel,
        );
        assert_close(&format!("{what} running_var"), &bn.running_var, &rv, &rv, rel);
        assert_eq!(bn.num_batches_tracked, 1);
        let c = d.g.channels;
        let (mut dx, mut dg, mut db) = (vec![0.0; n], vec![0.0; c], vec![0.0; c]);
        bn.backward_masked(v, &mask, &d.dy, &saved, Grads::new(&mut dx, &mut dg, &mut db))
            .unwrap();
        let (mut dx_f, mut dg_f, mut db_f) = (vec![0.0; n], vec![0.0; c], vec![0.0; c]);
        let grads = Grads::new(&mut dx_f, &mut dg_f, &mut db_f);
        batch_norm_backward_masked(v, &mask, &d.dy, &saved, Some(&before.gamma), grads).unwrap();
        assert_bits("layer dx", &dx, &dx_f);
        assert_bits("layer dgamma", &dg, &dg_f);
        assert_bits("layer dbeta", &db, &db_f);
        bn.forward_eval_masked(v, &mask, &mut y).unwrap();
        let running = FixedStats::new(&bn.running_mean, &bn.running_var);
        batch_norm_eval_masked(v, &mask, running, Affine::new(&bn.gamma, &bn.beta), 1e-5, &mut y_free).unwrap();
        assert_bits("layer eval y", &y, &y_free);
    }
}

// ---------------------------------------------------------------------------------------------
// Finite differences
// ---------------------------------------------------------------------------------------------

/// The masked backward against ∂ℓ/∂x, ∂ℓ/∂γ, ∂ℓ/∂β by central differences of the masked forward
/// (ℓ = Σ w·y, the weights nonzero at the masked positions too): at a masked position the
/// difference is 0 (the forward writes a constant there and the statistics do not see it), and
/// dx must be 0 there.
#[test]
fn masked_backward_matches_finite_differences() {
    let eps = 1e-5;
    for (i, (layout, shape)) in fd_shapes().into_iter().enumerate() {
        for affine in [true, false] {
            let d = Data::new::<f64>(layout, &shape, 500 + i as u64);
            let mask = mask_for(&d, &shape, MaskKind::Random(0.6), 600 + i as u64);
            let (gamma, beta) = d.affine(affine);
            let w = &d.dy;
            let forward = |x: &[f64], g: &[f64], b: &[f64]| {
                loss_of(w, |y| {
                    let v = View::new(x, &shape, layout);
                    batch_norm_train_masked(v, &mask, affine_if(affine, g, b), eps, y).unwrap();
                })
            };
            let v = View::new(&d.x, &shape, layout);
            let mut y = vec![0.0; d.x.len()];
            let (_, saved) = batch_norm_train_masked(v, &mask, affine_if(affine, &gamma, &beta), eps, &mut y).unwrap();
            let c = d.g.channels;
            let (mut dx, mut dg, mut db) = (vec![f64::NAN; d.x.len()], vec![f64::NAN; c], vec![f64::NAN; c]);
            let grads = Grads::new(&mut dx, &mut dg, &mut db);
            batch_norm_backward_masked(v, &mask, w, &saved, opt(&gamma, affine), grads).unwrap();
            let fwd_affine = |g: &[f64], b: &[f64]| {
                loss_of(w, |y| {
                    batch_norm_train_masked(v, &mask, Affine::new(g, b), eps, y).unwrap();
                })
            };
            let what = format!("masked {layout} {shape:?} affine={affine}");
            assert_fd_grads(&what, &d.x, &gamma, &beta, (&dx, &dg, &db), forward, fwd_affine);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A mask of all ones is plain batch norm; masked values never leak
// ---------------------------------------------------------------------------------------------

/// Every output (the statistics' and gradients' `f64` bits included) of every masked function
/// on `x`, `dy` with `mask`, and of the layer's masked training step; or, without a mask, of the
/// plain function of the same name.
fn outputs<T: PlainFloat>(
    d: &Data,
    layout: Layout,
    shape: &[usize],
    mask: Option<&[bool]>,
    x: &[f64],
    dy: &[f64],
) -> Vec<Vec<u64>> {
    let (x, dy, g, b) = (
        narrow::<T>(x),
        narrow::<T>(dy),
        narrow::<T>(&d.gamma),
        narrow::<T>(&d.beta),
    );
    let (mean, var) = (narrow::<T>(&d.mean), narrow::<T>(&d.var));
    let (v, affine, fixed) = (
        View::new(&x, shape, layout),
        Affine::new(&g, &b),
        FixedStats::new(&mean, &var),
    );
    let (n, c) = (x.len(), d.g.channels);
    let z = T::from_f64(0.0);
    let (mut y, mut ye, mut yn, mut dxs) = (vec![z; n], vec![z; n], vec![z; n], vec![z; n]);
    let (mut dx, mut dg, mut db) = (vec![z; n], vec![z; c], vec![z; c]);
    let (mut dxe, mut dge, mut dbe) = (vec![z; n], vec![z; c], vec![z; c]);
    let grads = Grads::new(&mut dx, &mut dg, &mut db);
    let grads_eval = Grads::new(&mut dxe, &mut dge, &mut dbe);
    let mut bn = BatchNorm::<T>::new(c, BatchNormConfig::default()).unwrap();
    let (stats, saved, part, sums) = match mask {
        Some(mask) => {
            let (stats, saved) = batch_norm_train_masked(v, mask, affine, 1e-5, &mut y).unwrap();
            batch_norm_backward_masked(v, mask, &dy, &saved, Some(&g), grads).unwrap();
            batch_norm_eval_masked(v, mask, fixed, affine, 1e-5, &mut ye).unwrap();
            batch_norm_backward_eval_masked(v, mask, &dy, fixed, Some(&g), 1e-5, grads_eval).unwrap();
            normalize_masked(v, mask, &saved, affine, &mut yn).unwrap();
            let sums = grad_sums_masked(v, mask, &dy, &saved).unwrap();
            input_grad_masked(v, mask, &dy, &saved, &sums, Some(&g), &mut dxs).unwrap();
            bn.forward_train_masked(v, mask, &mut vec![z; n]).unwrap();
            (stats, saved, batch_stats_masked(v, mask).unwrap(), sums)
        }
        None => {
            let (stats, saved) = batch_norm_train(v, affine, 1e-5, &mut y).unwrap();
            batch_norm_backward(v, &dy, &saved, Some(&g), grads).unwrap();
            batch_norm_eval(v, fixed, affine, 1e-5, &mut ye).unwrap();
            batch_norm_backward_eval(v, &dy, fixed, Some(&g), 1e-5, grads_eval).unwrap();
            normalize(v, &saved, affine, &mut yn).unwrap();
            let sums = grad_sums(v, &dy, &saved).unwrap();
            input_grad(v, &dy, &saved, &sums, Some(&g), &mut dxs).unwrap();
            bn.forward_train(v, &mut vec![z; n]).unwrap();
            (stats, saved, batch_stats(v).unwrap(), sums)
        }
    };
    let bits = |v: &[T]| v.iter().map(|a| a.to_f64().to_bits()).collect::<Vec<u64>>();
    let bits64 = |v: &[f64]| v.iter().map(|a| a.to_bits()).collect::<Vec<u64>>();
    let mut out: Vec<Vec<u64>> = [&y, &dx, &dg, &db, &ye, &dxe, &dge, &dbe, &yn, &dxs]
        .into_iter()
        .map(|v| bits(v))
        .collect();
    out.extend([
        bits(&bn.running_mean),
        bits(&bn.running_var),
        vec![stats.count, part.count],
    ]);
    let stats = [&stats.mean, &stats.m2, &saved.inv_std, &part.mean, &part.m2];
    out.extend(
        stats
            .into_iter()
            .chain([&sums.sum_dy, &sums.sum_dy_xhat])
            .map(|v| bits64(v)),
    );
    out
}

/// A mask of all ones gives plain batch norm's bits, every function, on every chunking shape
/// (the same pieces, lanes and merges: values that are on enter exactly as without a mask).
#[test]
fn all_ones_mask_is_plain_batch_norm_bit_for_bit() {
    for (i, (layout, shape)) in chunking_shapes().into_iter().enumerate() {
        let d = Data::new::<f32>(layout, &shape, 800 + i as u64);
        let ones = vec![true; d.g.per_channel()];
        let what = format!("{layout} {shape:?}");
        assert!(
            outputs::<f32>(&d, layout, &shape, Some(&ones), &d.x, &d.dy)
                == outputs::<f32>(&d, layout, &shape, None, &d.x, &d.dy),
            "{what} f32: a mask of all ones differs from plain batch norm"
        );
        assert!(
            outputs::<f64>(&d, layout, &shape, Some(&ones), &d.x, &d.dy)
                == outputs::<f64>(&d, layout, &shape, None, &d.x, &d.dy),
            "{what} f64: a mask of all ones differs from plain batch norm"
        );
    }
}

/// What the masked positions hold (in x and in dy) changes no bit of any output: 1e30, NaN and
/// ±∞ against the data's own values there.
fn check_no_leak<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64, kind: MaskKind) {
    let d = Data::new::<T>(layout, shape, seed);
    let mask = mask_for(&d, shape, kind, seed + 1);
    let want = outputs::<T>(&d, layout, shape, Some(&mask), &d.x, &d.dy);
    for pad in [1e30, -1e30, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let (x, dy) = (padded(&d.g, &d.x, &mask, pad), padded(&d.g, &d.dy, &mask, pad));
        let got = outputs::<T>(&d, layout, shape, Some(&mask), &x, &dy);
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a == b,
                "{layout} {shape:?} {kind:?} {}: output {k} changed with padding {pad:e}",
                T::NAME
            );
        }
    }
}

#[test]
fn masked_values_never_leak() {
    let mut shapes = small_shapes_of_every_layout();
    shapes.extend(chunking_shapes());
    for (i, (layout, shape)) in shapes.into_iter().enumerate() {
        let seed = 900 + 10 * i as u64;
        check_no_leak::<f32>(layout, &shape, seed, MaskKind::Padded);
        check_no_leak::<f64>(layout, &shape, seed, MaskKind::Random(0.5));
        // Scattered: f32 takes the narrow kernels' lane selects, f64 the wide ones.
        check_no_leak::<f32>(layout, &shape, seed + 5, MaskKind::Random(0.5));
    }
}

/// Every masked output, in rayon pools of 1, 2 and 3 threads: the same bits.
#[test]
fn masked_bitwise_identical_for_1_2_3_threads() {
    for (i, (layout, shape)) in chunking_shapes().into_iter().enumerate() {
        let d = Data::new::<f32>(layout, &shape, 1100 + i as u64);
        let mask = mask_for(&d, &shape, MaskKind::Padded, 1200 + i as u64);
        assert_same_for_1_2_3_threads(&format!("{layout} {shape:?}"), || {
            (
                outputs::<f32>(&d, layout, &shape, Some(&mask), &d.x, &d.dy),
                outputs::<f64>(&d, layout, &shape, Some(&mask), &d.x, &d.dy),
            )
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Frozen layer and small-batch policy
// ---------------------------------------------------------------------------------------------

/// A frozen layer's masked training pass is the masked inference transform with the running
/// statistics (`reference::masked_forward_eval`/`masked_backward_eval`), nothing updated; with
/// `SmallBatch::UseRunningStats`, a batch of fewer than 2 selected values is normalized so too,
/// while by default it is `Error::TooFewValues` with the selected count.
#[test]
fn frozen_and_small_batch_masked() {
    let (layout, shape) = (Layout::NCHW, vec![2, 3, 2, 2]);
    let d = Data::new::<f64>(layout, &shape, 77);
    let v = View::new(&d.x, &shape, layout);
    let layer = |small_batch| {
        let config = BatchNormConfig {
            small_batch,
            ..BatchNormConfig::default()
        };
        let mut bn = BatchNorm::<f64>::new(3, config).unwrap();
        (bn.gamma, bn.beta) = (d.gamma.clone(), d.beta.clone());
        (bn.running_mean, bn.running_var) = (d.mean.clone(), d.var.clone());
        bn
    };
    let n = d.x.len();
    let check = |bn: &mut BatchNorm<f64>, mask: &[bool], what: &str| {
        let before = bn.clone();
        let mut y = vec![f64::NAN; n];
        let saved = bn.forward_train_masked(v, mask, &mut y).unwrap();
        let ry = reference::masked_forward_eval(&d.g, &d.x, mask, &d.mean, &d.var, &d.gamma, &d.beta, 1e-5);
        let scale: Vec<f64> = ry.iter().map(|v| v.abs() + 10.0).collect();
        assert_close(&format!("{what} y"), &y, &ry, &scale, elementwise_rel::<f64>());
        assert_zero_where_off(what, &d.g, mask, &y);
        let (mut dx, mut dg, mut db) = (vec![f64::NAN; n], vec![f64::NAN; 3], vec![f64::NAN; 3]);
        bn.backward_masked(v, mask, &d.dy, &saved, Grads::new(&mut dx, &mut dg, &mut db))
            .unwrap();
        let (rdx, rdg, rdb) = reference::masked_backward_eval(&d.g, &d.x, mask, &d.dy, &d.mean, &d.var, &d.gamma, 1e-5);
        let sdy = sum_abs_dy(&d);
        assert_close(
            &format!("{what} dx"),
            &dx,
            &rdx,
            &vec![10.0; n],
            elementwise_rel::<f64>(),
        );
        assert_close(&format!("{what} dgamma"), &dg, &rdg, &[100.0; 3], reduce_rel::<f64>(8));
        assert_close(&format!("{what} dbeta"), &db, &rdb, &sdy, reduce_rel::<f64>(8));
        assert_eq!(*bn, before, "{what}: the layer changed");
    };
    let mask = mask_for(&d, &shape, MaskKind::Random(0.5), 78);
    let mut frozen = layer(SmallBatch::Error);
    frozen.freeze();
    check(&mut frozen, &mask, "frozen");
    let one = [false, false, true, false, false, false, false, false];
    let mut policy = layer(SmallBatch::UseRunningStats);
    check(&mut policy, &one, "small batch (1 selected value)");
    check(&mut policy, &[false; 8], "small batch (none selected)");
    let mut strict = layer(SmallBatch::Error);
    let before = strict.clone();
    let mut y = vec![f64::NAN; n];
    assert_eq!(
        strict.forward_train_masked(v, &one, &mut y),
        Err(Error::TooFewValues {
            count: 1,
            shape: shape.clone()
        })
    );
    assert_eq!(strict, before);
    assert!(y.iter().all(|v| v.is_nan()), "y untouched on error");
}

// ---------------------------------------------------------------------------------------------
// Synchronized over in-process ranks
// ---------------------------------------------------------------------------------------------

/// One masked training step of the synchronized layer on examples `start..start + n` of the
/// batch (x and dy already padded), with their part of the mask; with `SingleProcess`, the whole
/// batch on one process.
#[allow(clippy::too_many_arguments)]
fn masked_step<T: PlainFloat>(
    comm: &dyn Communicator,
    d: &Data,
    (x, dy): (&[f64], &[f64]),
    mask: &[bool],
    layout: Layout,
    shape: &[usize],
    start: usize,
    n: usize,
) -> Result<Step<T>, Error> {
    let (row, per_example) = (d.x.len() / shape[0], mask.len() / shape[0]);
    let mut local_shape = shape.to_vec();
    local_shape[0] = n;
    let x: Vec<T> = narrow(&x[start * row..(start + n) * row]);
    let dy: Vec<T> = narrow(&dy[start * row..(start + n) * row]);
    let mask = &mask[start * per_example..(start + n) * per_example];
    let mut bn = SyncBatchNorm::<T>::new(d.g.channels, sync_config())?;
    bn.bn.gamma = narrow(&d.gamma);
    bn.bn.beta = narrow(&d.beta);
    let v = View::new(&x, &local_shape, layout);
    let mut y = vec![T::from_f64(f64::NAN); x.len()];
    let saved = bn.forward_train_masked(comm, v, mask, &mut y)?;
    let (mut dx, mut dg, mut db) = (y.clone(), bn.bn.gamma.clone(), bn.bn.beta.clone());
    bn.backward_masked(comm, v, mask, &dy, &saved, Grads::new(&mut dx, &mut dg, &mut db))?;
    Ok(Step::new(y, dx, dg, db, bn.bn))
}

/// Shards of `sizes` examples over as many ranks, the mask of rank `none` all off and the others
/// drawn (uneven valid counts), at least 2 selected values in all; x and dy NaN where masked.
fn check_sync_masked<T: PlainFloat>(p: usize, none: usize) {
    for (i, (layout, shape)) in small_shapes().into_iter().enumerate() {
        let d = Data::new::<T>(layout, &shape, 300 + i as u64);
        let sizes = shard_sizes(shape[0], p);
        let starts = shard_starts(&sizes);
        let per_example = d.g.per_channel() / shape[0];
        let mut mask = make_mask(shape[0], per_example, MaskKind::Random(0.6), 310 + i as u64, 0);
        mask[starts[none] * per_example..(starts[none] + sizes[none]) * per_example].fill(false);
        let tail = mask.len() - 2;
        if mask.iter().filter(|&&on| on).count() < 2 {
            mask[tail..].fill(true);
        }
        let (x, dy) = (
            padded(&d.g, &d.x, &mask, f64::NAN),
            padded(&d.g, &d.dy, &mask, f64::NAN),
        );
        let [want, single] =
            on_one_rank(|c| masked_step::<T>(c, &d, (&x, &dy), &mask, layout, &shape, 0, shape[0]).unwrap());
        let ranks = on_threads(p, |c| {
            let r = c.rank();
            masked_step::<T>(c, &d, (&x, &dy), &mask, layout, &shape, starts[r], sizes[r]).unwrap()
        });
        let got = Step::gather(&ranks);
        let (y, dx) = (&got.out.y, &got.out.dx);
        let (sd, positions) = selected(&d, &mask);
        let m = sd.g.outer;
        let rel = reduce_rel::<T>(m);
        let eps = sync_config().eps;
        let what = |s: &str| format!("{layout} {shape:?} P={p} none={none} m={m} {s}");
        let scatter = |rows: &[f64]| reference::masked_scatter(&d.g, rows, &positions);
        let (rmean, rvar) = reference::mean_var(&sd.g, &sd.x);
        let y_scale = scatter(&train_y_scale(&sd, &sd.gamma, &sd.beta, &rmean, &rvar, eps));
        let (sdx, sdg, sdb) = backward_scales(&sd, &sd.dy, &sd.gamma, eps);
        got.out
            .assert_near(&want.out, [&y_scale, &scatter(&sdx), &sdg, &sdb], rel, what);
        assert_zero_where_off(&what("y"), &d.g, &mask, y);
        assert_zero_where_off(&what("dx"), &d.g, &mask, dx);
        got.assert_running_near(&want, &sd.mean_abs_x(), rel, what);
        // One rank is the one-process layer, bit for bit.
        let mut bn = BatchNorm::<T>::new(d.g.channels, sync_config()).unwrap();
        (bn.gamma, bn.beta) = (narrow(&d.gamma), narrow(&d.beta));
        let (xt, dyt) = (narrow::<T>(&x), narrow::<T>(&dy));
        let v = View::new(&xt, &shape, layout);
        let mut y1 = vec![T::from_f64(0.0); xt.len()];
        let saved = bn.forward_train_masked(v, &mask, &mut y1).unwrap();
        let (mut dx1, mut dg1, mut db1) = (y1.clone(), bn.gamma.clone(), bn.beta.clone());
        bn.backward_masked(v, &mask, &dyt, &saved, Grads::new(&mut dx1, &mut dg1, &mut db1))
            .unwrap();
        let one_process = Step::new(y1, dx1, dg1, db1, bn);
        for got in [&want, &single] {
            got.assert_bits(&one_process, |s| what(&format!("P=1 {s}")));
        }
    }
}

#[test]
fn two_ranks_masked_equal_one_process() {
    check_sync_masked::<f64>(2, 0);
    check_sync_masked::<f32>(2, 1);
}

#[test]
fn three_ranks_masked_equal_one_process() {
    check_sync_masked::<f64>(3, 1);
    check_sync_masked::<f32>(3, 2);
    check_sync_masked::<f64>(3, 0);
}

/// A global batch of fewer than 2 selected values is `Error::TooFewValues` with the global count
/// on every rank (each with its own shape), nothing written; one selected value on each of two
/// ranks is a valid batch of 2.
#[test]
fn global_selected_count_decides_too_few_values() {
    let d = Data::new::<f64>(Layout::NC, &[4, 3], 5);
    let run = |mask: [bool; 4]| {
        on_threads(2, |c| {
            let r = c.rank();
            let (x, dy) = (&d.x[6 * r..6 * r + 6], &d.dy[6 * r..6 * r + 6]);
            let mut bn = SyncBatchNorm::<f64>::new(3, sync_config()).unwrap();
            let before = bn.clone();
            let mask = &mask[2 * r..2 * r + 2];
            let v = View::new(x, &[2, 3], Layout::NC);
            let mut y = vec![f64::NAN; 6];
            let out = bn.forward_train_masked(c, v, mask, &mut y).map(|saved| {
                let mut dx = vec![0.0; 6];
                bn.backward_masked(c, v, mask, dy, &saved, Grads::dx(&mut dx)).unwrap();
            });
            if out.is_err() {
                assert_eq!(bn, before, "rank {r}: layer unchanged");
                assert!(y.iter().all(|v| v.is_nan()), "rank {r}: y untouched");
            }
            out
        })
    };
    for (mask, count) in [([false, true, false, false], 1), ([false; 4], 0)] {
        for out in run(mask) {
            assert_eq!(
                out,
                Err(Error::TooFewValues {
                    count,
                    shape: vec![2, 3]
                })
            );
        }
    }
    assert!(run([true, false, false, true]).iter().all(|r| r.is_ok()));
}
