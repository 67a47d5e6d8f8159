//! Fused batch norm + ReLU and batch norm + add + ReLU (issue 17): `relu(bn(x))` and
//! `relu(bn(x) + z)`, forward and backward, training and inference.
//!
//! - Bit for bit against the unfused sequence the fused passes replace (batch norm into y, then
//!   y + z and the ReLU element by element; back: the ReLU's backward dy·[y > 0], then batch
//!   norm's backward), every layout, f32 and f64: the same operations in the same order, so the
//!   same bits; and for 1, 2 and 3 threads.
//! - Against the f64 reference (`reference::relu_*`, written from the definitions) over random
//!   shapes, with the tolerances of `common` (the ReLU is 1-Lipschitz and a select, so it adds
//!   nothing; the residual adds its own magnitude to the scale of y).
//! - The backward against central finite differences in f64, on data whose ReLU inputs all lie
//!   away from the kink.
//! - At the kink: inputs whose ReLU input t is exactly 0 get gradient 0 (PyTorch's convention).
//! - The layer: running statistics updated as by the plain forward; frozen and small-batch
//!   paths through the inference transform.

use crate::common::*;
use batchnorm::{
    batch_norm_backward, batch_norm_backward_add_relu, batch_norm_backward_eval, batch_norm_backward_eval_add_relu,
    batch_norm_backward_eval_relu, batch_norm_backward_relu, batch_norm_eval, batch_norm_eval_add_relu,
    batch_norm_eval_relu, batch_norm_train, batch_norm_train_add_relu, batch_norm_train_relu, reference, Affine,
    BatchNorm, BatchNormConfig, Element, FixedStats, Grads, Layout, Momentum, ReluMask, SmallBatch, View,
};
use proptest::prelude::*;

/// T's sum of two T values: their f64 sum rounded once to T is T's correctly rounded sum (f64
/// carries more than twice T's precision plus two bits, so the double rounding is harmless).
fn add_t<T: Element>(a: T, b: T) -> T {
    T::from_f64(a.to_f64() + b.to_f64())
}

/// The ReLU in T as the unfused sequence applies it: t where t is not ≤ 0 (a NaN propagates),
/// +0.0 elsewhere.
fn relu_t<T: Element>(t: T) -> T {
    if t.to_f64() <= 0.0 {
        T::from_f64(0.0)
    } else {
        t
    }
}

/// The ReLU's backward as the unfused sequence computes it, from its output y: dy where y is not
/// ≤ 0, +0.0 elsewhere (PyTorch's `threshold_backward` on the result).
fn relu_backward_t<T: Element>(y: &[T], dy: &[T]) -> Vec<T> {
    y.iter()
        .zip(dy)
        .map(|(&v, &d)| if v.to_f64() <= 0.0 { T::from_f64(0.0) } else { d })
        .collect()
}

/// NaN-filled dx, dγ, dβ and dz for data `d` (an element a call does not write then fails any
/// comparison).
fn nan_grads<T: Element>(d: &Data) -> (Vec<T>, Vec<T>, Vec<T>, Vec<T>) {
    let nan = |n| vec![T::from_f64(f64::NAN); n];
    (nan(d.x.len()), nan(d.g.channels), nan(d.g.channels), nan(d.x.len()))
}

/// Which elements a mask says the ReLU kept.
fn kept_of(mask: &ReluMask) -> Vec<bool> {
    (0..mask.len()).map(|k| mask.kept(k).unwrap()).collect()
}

/// A residual for data `d` (N(0, 1), rounded to T), from another seed.
fn residual<T: Element>(layout: Layout, shape: &[usize], seed: u64) -> Vec<T> {
    narrow(&Data::new::<T>(layout, shape, seed ^ 0x7a).dy)
}

/// The bits of a buffer.
fn bits<T: Element>(v: &[T]) -> Vec<u64> {
    v.iter().map(|a| a.to_f64().to_bits()).collect()
}

/// Every output of a training step and an inference step of `relu(bn(x) + z)` (`z` `None`:
/// `relu(bn(x))`, no dz), named: by the fused functions and layer methods (`fused`), or by the unfused
/// sequence of plain functions and methods (`!fused`). γ of channel 0 is 0 and β 0 when there
/// are several channels, so that its ReLU inputs are exactly 0 (the kink) without a residual.
fn outputs<T: PlainFloat>(
    d: &Data,
    layout: Layout,
    shape: &[usize],
    z: Option<&[T]>,
    fused: bool,
) -> Vec<(String, Vec<u64>)> {
    let (x, dy, mut g, mut b) = d.narrowed::<T>();
    if g.len() > 1 {
        (g[0], b[0]) = (T::from_f64(0.0), T::from_f64(0.0));
    }
    let (mean, var) = (narrow::<T>(&d.mean), narrow::<T>(&d.var));
    let fixed = FixedStats::new(&mean, &var);
    let (v, affine) = (View::new(&x, shape, layout), Affine::new(&g, &b));
    let (n, c) = (x.len(), d.g.channels);
    let z0 = T::from_f64(0.0);
    let (mut y, mut ye, mut mask, mut mask_e) = (vec![z0; n], vec![z0; n], ReluMask::new(), ReluMask::new());
    let (mut dx, mut dg, mut db, mut dz) = (vec![z0; n], vec![z0; c], vec![z0; c], vec![z0; n]);
    let (mut dxe, mut dge, mut dbe, mut dze) = (vec![z0; n], vec![z0; c], vec![z0; c], vec![z0; n]);
    let config = BatchNormConfig {
        momentum: Momentum::Exponential(0.3),
        ..BatchNormConfig::default()
    };
    let mut bn = layer_of::<T>(d, config);
    bn.gamma = g.clone();
    bn.beta = b.clone();
    let (mut yl, mut mask_l) = (vec![z0; n], ReluMask::new());
    let (mut dxl, mut dgl, mut dbl, mut dzl) = (vec![z0; n], vec![z0; c], vec![z0; c], vec![z0; n]);
    let stats;
    if fused {
        let (s, saved) = match z {
            Some(z) => batch_norm_train_add_relu(v, z, affine, 1e-5, &mut y, &mut mask),
            None => batch_norm_train_relu(v, affine, 1e-5, &mut y, &mut mask),
        }
        .unwrap();
        stats = (s, saved.clone());
        let grads = Grads::new(&mut dx, &mut dg, &mut db);
        match z {
            Some(_) => batch_norm_backward_add_relu(v, &dy, &mask, &saved, Some(&g), grads, &mut dz),
            None => batch_norm_backward_relu(v, &dy, &mask, &saved, Some(&g), grads),
        }
        .unwrap();
        match z {
            Some(z) => batch_norm_eval_add_relu(v, z, fixed, affine, 1e-5, &mut ye, Some(&mut mask_e)),
            None => batch_norm_eval_relu(v, fixed, affine, 1e-5, &mut ye, Some(&mut mask_e)),
        }
        .unwrap();
        let grads = Grads::new(&mut dxe, &mut dge, &mut dbe);
        match z {
            Some(_) => batch_norm_backward_eval_add_relu(v, &dy, &mask_e, fixed, Some(&g), 1e-5, grads, &mut dze),
            None => batch_norm_backward_eval_relu(v, &dy, &mask_e, fixed, Some(&g), 1e-5, grads),
        }
        .unwrap();
        let saved = match z {
            Some(z) => bn.forward_train_add_relu(v, z, &mut yl, &mut mask_l),
            None => bn.forward_train_relu(v, &mut yl, &mut mask_l),
        }
        .unwrap();
        let grads = Grads::new(&mut dxl, &mut dgl, &mut dbl);
        match z {
            Some(_) => bn.backward_add_relu(v, &dy, &mask_l, &saved, grads, &mut dzl),
            None => bn.backward_relu(v, &dy, &mask_l, &saved, grads),
        }
        .unwrap();
    } else {
        // y = relu(bn(x) + z), each step in T; the mask is where the ReLU's input is not ≤ 0.
        let activate = |y: &mut [T], mask: &mut Vec<bool>| {
            for (k, v) in y.iter_mut().enumerate() {
                let t = z.map_or(*v, |z| add_t(*v, z[k]));
                mask.push(reference::relu_keeps(t.to_f64()));
                *v = relu_t(t);
            }
        };
        let (s, saved) = batch_norm_train(v, affine, 1e-5, &mut y).unwrap();
        stats = (s, saved.clone());
        let mut kept_t = Vec::new();
        activate(&mut y, &mut kept_t);
        let up = relu_backward_t(&y, &dy);
        batch_norm_backward(v, &up, &saved, Some(&g), Grads::new(&mut dx, &mut dg, &mut db)).unwrap();
        if z.is_some() {
            dz.copy_from_slice(&up);
        }
        batch_norm_eval(v, fixed, affine, 1e-5, &mut ye).unwrap();
        let mut kept_e = Vec::new();
        activate(&mut ye, &mut kept_e);
        let up_e = relu_backward_t(&ye, &dy);
        batch_norm_backward_eval(
            v,
            &up_e,
            fixed,
            Some(&g),
            1e-5,
            Grads::new(&mut dxe, &mut dge, &mut dbe),
        )
        .unwrap();
        if z.is_some() {
            dze.copy_from_slice(&up_e);
        }
        let saved = bn.forward_train(v, &mut yl).unwrap();
        let mut kept_l = Vec::new();
        activate(&mut yl, &mut kept_l);
        let up_l = relu_backward_t(&yl, &dy);
        bn.backward(v, &up_l, &saved, Grads::new(&mut dxl, &mut dgl, &mut dbl))
            .unwrap();
        if z.is_some() {
            dzl.copy_from_slice(&up_l);
        }
        return named(
            &stats,
            [
                &y, &dx, &dg, &db, &dz, &ye, &dxe, &dge, &dbe, &dze, &yl, &dxl, &dgl, &dbl, &dzl,
            ],
            [kept_t, kept_e, kept_l],
            &bn,
        );
    }
    named(
        &stats,
        [
            &y, &dx, &dg, &db, &dz, &ye, &dxe, &dge, &dbe, &dze, &yl, &dxl, &dgl, &dbl, &dzl,
        ],
        [kept_of(&mask), kept_of(&mask_e), kept_of(&mask_l)],
        &bn,
    )
}

/// The outputs of [`outputs`], named.
fn named<T: Element>(
    stats: &(batchnorm::BatchStats, batchnorm::SavedStats),
    buffers: [&Vec<T>; 15],
    masks: [Vec<bool>; 3],
    bn: &BatchNorm<T>,
) -> Vec<(String, Vec<u64>)> {
    let names = [
        "train y",
        "dx",
        "dgamma",
        "dbeta",
        "dz",
        "eval y",
        "eval dx",
        "eval dgamma",
        "eval dbeta",
        "eval dz",
        "layer y",
        "layer dx",
        "layer dgamma",
        "layer dbeta",
        "layer dz",
    ];
    let mut out: Vec<(String, Vec<u64>)> = names
        .iter()
        .zip(buffers)
        .map(|(n, v)| (n.to_string(), bits(v)))
        .collect();
    for (name, m) in ["train mask", "eval mask", "layer mask"].into_iter().zip(masks) {
        out.push((name.into(), m.into_iter().map(u64::from).collect()));
    }
    let (s, saved) = stats;
    for (name, v) in [("mean", &s.mean), ("m2", &s.m2), ("inv_std", &saved.inv_std)] {
        out.push((name.into(), bits(v)));
    }
    out.push(("running mean".into(), bits(&bn.running_mean)));
    out.push(("running var".into(), bits(&bn.running_var)));
    out.push(("batches".into(), vec![bn.num_batches_tracked]));
    out
}

/// Asserts the fused outputs equal the unfused sequence's, bit for bit, for `relu(bn(x))` and
/// `relu(bn(x) + z)`.
#[track_caller]
fn assert_fused_is_unfused<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64) {
    let d = Data::new::<T>(layout, shape, seed);
    let z = residual::<T>(layout, shape, seed);
    for z in [None, Some(&z[..])] {
        let (fused, unfused) = (
            outputs::<T>(&d, layout, shape, z, true),
            outputs::<T>(&d, layout, shape, z, false),
        );
        for ((name, a), (_, b)) in fused.iter().zip(&unfused) {
            assert!(
                a == b,
                "{layout} {shape:?} {} residual={}: {name} differs from the unfused sequence",
                T::NAME,
                z.is_some()
            );
        }
    }
}

/// Every layout and chunking shape (pieces, blocks of planes, fused per-channel passes, row tasks
/// and blocks, wide rows), f32 and f64: the fused passes give the unfused sequence's bits.
#[test]
fn fused_equals_unfused_sequence_bit_for_bit() {
    let mut shapes = small_shapes_of_every_layout();
    // Rows wider than a column tile.
    shapes.push((Layout::NC, vec![9, 1500]));
    shapes.extend(chunking_shapes());
    for (i, (layout, shape)) in shapes.into_iter().enumerate() {
        assert_fused_is_unfused::<f32>(layout, &shape, 1300 + i as u64);
        assert_fused_is_unfused::<f64>(layout, &shape, 1400 + i as u64);
    }
}

/// f32 data of magnitude 1e37, whose per-channel constants do not fit f32 (the mean is above
/// 2¹⁰⁰): those channels are computed in f64, where the fused passes round batch norm's value to
/// f32 before adding the residual, as the unfused sequence does. Still its bits.
#[test]
fn fused_equals_unfused_sequence_on_the_f64_path() {
    for (i, (layout, shape)) in [
        (Layout::NCHW, vec![2, 3, 5, 7]),
        (Layout::NHWC, vec![2, 5, 3, 9]),
        (Layout::NC, vec![40, 3]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut d = Data::new::<f32>(layout, &shape, 2100 + i as u64);
        let big = |v: &[f64], k: f64| wide(&narrow::<f32>(&v.iter().map(|a| a * k).collect::<Vec<f64>>()));
        (d.x, d.mean) = (big(&d.x, 1e37), big(&d.mean, 1e37));
        let z = residual::<f32>(layout, &shape, 2100 + i as u64);
        for z in [None, Some(&z[..])] {
            let (fused, unfused) = (
                outputs::<f32>(&d, layout, &shape, z, true),
                outputs::<f32>(&d, layout, &shape, z, false),
            );
            for ((name, a), (_, b)) in fused.iter().zip(&unfused) {
                assert!(a == b, "{layout} {shape:?} residual={}: {name} differs", z.is_some());
            }
        }
    }
}

/// The fused outputs in rayon pools of 1, 2 and 3 threads: the same bits.
#[test]
fn fused_bitwise_identical_for_1_2_3_threads() {
    for (i, (layout, shape)) in chunking_shapes().into_iter().enumerate() {
        let d = Data::new::<f32>(layout, &shape, 1500 + i as u64);
        let z = residual::<f32>(layout, &shape, 1500 + i as u64);
        assert_same_for_1_2_3_threads(&format!("{layout} {shape:?}"), || {
            (
                outputs::<f32>(&d, layout, &shape, Some(&z), true),
                outputs::<f64>(&d, layout, &shape, None, true),
            )
        });
    }
}

/// The training backward of `relu(bn(x) + z)` and `relu(bn(x))` against the unfused sequence's
/// bits (dx, dγ, dβ, and dz = dy·[kept]), into NaN-filled buffers (an element not written fails),
/// on tensors whose outputs are written with streaming stores (16 MiB and more) with ≥ 16
/// channels (the fused per-channel passes, whose gradient sums' loop writes dz): planes of an
/// odd length, so that they start alternately at a 32-byte boundary (dz streamed) and off it
/// (dz stored), and pieces of a plane longer than one; f32 and f64.
#[test]
fn fused_backward_with_streamed_outputs() {
    fn check<T: PlainFloat>(shape: &[usize], seed: u64) {
        let layout = Layout::NCHW;
        let d = Data::new::<T>(layout, shape, seed);
        let z = residual::<T>(layout, shape, seed);
        let (x, dy, g, b) = d.narrowed::<T>();
        let (v, affine, n) = (View::new(&x, shape, layout), Affine::new(&g, &b), x.len());
        for z in [None, Some(&z[..])] {
            let what = format!("{layout} {shape:?} {} residual={}", T::NAME, z.is_some());
            let (mut y, mut mask) = (vec![T::from_f64(0.0); n], ReluMask::new());
            let (_, saved) = match z {
                Some(z) => batch_norm_train_add_relu(v, z, affine, 1e-5, &mut y, &mut mask),
                None => batch_norm_train_relu(v, affine, 1e-5, &mut y, &mut mask),
            }
            .unwrap();
            let (mut dx, mut dg, mut db, mut dz) = nan_grads::<T>(&d);
            let grads = Grads::new(&mut dx, &mut dg, &mut db);
            match z {
                Some(_) => batch_norm_backward_add_relu(v, &dy, &mask, &saved, Some(&g), grads, &mut dz),
                None => batch_norm_backward_relu(v, &dy, &mask, &saved, Some(&g), grads),
            }
            .unwrap();
            let up = relu_backward_t(&y, &dy);
            let (mut dxu, mut dgu, mut dbu, _) = nan_grads::<T>(&d);
            batch_norm_backward(v, &up, &saved, Some(&g), Grads::new(&mut dxu, &mut dgu, &mut dbu)).unwrap();
            assert_bits(&format!("{what} dx"), &dx, &dxu);
            assert_bits(&format!("{what} dgamma"), &dg, &dgu);
            assert_bits(&format!("{what} dbeta"), &db, &dbu);
            if z.is_some() {
                assert_bits(&format!("{what} dz"), &dz, &up);
            }
        }
    }
    check::<f32>(&[4, 17, 255, 257], 2400);
    check::<f64>(&[2, 17, 255, 257], 2401);
}

// ---------------------------------------------------------------------------------------------
// Against the reference
// ---------------------------------------------------------------------------------------------

/// The fused passes against `reference::relu_*`: y = relu(bn(x) + z) (training and inference)
/// within `common`'s tolerances with |z| added to the scale of y; the mask equal to the
/// reference's t > 0 wherever t lies farther from 0 than that tolerance; dx, dγ, dβ of the
/// backward through the kernel's own mask (the ReLU's decision is the forward's) within the
/// backward's tolerances, dz = dy·[kept] exactly.
fn check_reference<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64, affine: bool, eps: f64) {
    let d = Data::new::<T>(layout, shape, seed);
    let zt = residual::<T>(layout, shape, seed);
    let (x, dy, gt, bt) = d.narrowed::<T>();
    let (gamma, beta) = d.affine(affine);
    let v = View::new(&x, shape, layout);
    let (n, m) = (x.len(), d.g.per_channel());
    let nan = T::from_f64(f64::NAN);
    let (mean_t, var_t) = (narrow::<T>(&d.mean), narrow::<T>(&d.var));
    let fixed = FixedStats::new(&mean_t, &var_t);
    for z in [None, Some(&zt[..])] {
        let what = format!("{layout} {shape:?} affine={affine} eps={eps} residual={}", z.is_some());
        let zw = z.map(wide);
        let abs_z = |k: usize| zw.as_ref().map_or(0.0, |z| z[k].abs());
        let rel = reduce_rel::<T>(m);

        // Training forward.
        let (mut y, mut mask) = (vec![nan; n], ReluMask::new());
        let (_, saved) = match z {
            Some(z) => batch_norm_train_add_relu(v, z, affine_if(affine, &gt, &bt), eps, &mut y, &mut mask),
            None => batch_norm_train_relu(v, affine_if(affine, &gt, &bt), eps, &mut y, &mut mask),
        }
        .unwrap();
        let (ry, rt, rmean, rvar) = reference::relu_forward_train(&d.g, &d.x, zw.as_deref(), &gamma, &beta, eps);
        let scale: Vec<f64> = train_y_scale(&d, &gamma, &beta, &rmean, &rvar, eps)
            .iter()
            .enumerate()
            .map(|(k, s)| s + abs_z(k))
            .collect();
        assert_close(&format!("{what} y"), &y, &ry, &scale, rel);
        let kept = kept_of(&mask);
        for k in 0..n {
            if rt[k].abs() > tol::<T>(rt[k], scale[k], rel) {
                assert_eq!(
                    kept[k],
                    reference::relu_keeps(rt[k]),
                    "{what}: mask[{k}], t = {:e}",
                    rt[k]
                );
            }
        }

        // Training backward, through the forward's mask.
        let (mut dx, mut dg, mut db, mut dz) = nan_grads::<T>(&d);
        let grads = Grads::new(&mut dx, &mut dg, &mut db);
        match z {
            Some(_) => batch_norm_backward_add_relu(v, &dy, &mask, &saved, opt(&gt, affine), grads, &mut dz),
            None => batch_norm_backward_relu(v, &dy, &mask, &saved, opt(&gt, affine), grads),
        }
        .unwrap();
        let (rdx, rdg, rdb, rdz) = reference::relu_backward_train(&d.g, &d.x, &kept, &d.dy, &gamma, eps);
        let (sdx, sdg, sdb) = backward_scales(&d, &rdz, &gamma, eps);
        assert_close(&format!("{what} dx"), &dx, &rdx, &sdx, rel);
        assert_close(&format!("{what} dgamma"), &dg, &rdg, &sdg, rel);
        assert_close(&format!("{what} dbeta"), &db, &rdb, &sdb, rel);
        if z.is_some() {
            assert_eq!(wide(&dz), rdz, "{what}: dz is dy·[kept]");
        }

        // Inference forward and backward.
        let (mut ye, mut mask_e) = (vec![nan; n], ReluMask::new());
        match z {
            Some(z) => batch_norm_eval_add_relu(
                v,
                z,
                fixed,
                affine_if(affine, &gt, &bt),
                eps,
                &mut ye,
                Some(&mut mask_e),
            ),
            None => batch_norm_eval_relu(v, fixed, affine_if(affine, &gt, &bt), eps, &mut ye, Some(&mut mask_e)),
        }
        .unwrap();
        let (rye, rte) = reference::relu_forward_eval(&d.g, &d.x, zw.as_deref(), &d.mean, &d.var, &gamma, &beta, eps);
        let scale_e: Vec<f64> = eval_y_scale(&d, &gamma, &beta, eps)
            .iter()
            .enumerate()
            .map(|(k, s)| s + abs_z(k))
            .collect();
        assert_close(&format!("{what} eval y"), &ye, &rye, &scale_e, elementwise_rel::<T>());
        let kept_e = kept_of(&mask_e);
        for k in 0..n {
            if rte[k].abs() > tol::<T>(rte[k], scale_e[k], elementwise_rel::<T>()) {
                assert_eq!(kept_e[k], reference::relu_keeps(rte[k]), "{what}: eval mask[{k}]");
            }
        }
        let (mut dxe, mut dge, mut dbe, mut dze) = nan_grads::<T>(&d);
        let grads = Grads::new(&mut dxe, &mut dge, &mut dbe);
        match z {
            Some(_) => {
                batch_norm_backward_eval_add_relu(v, &dy, &mask_e, fixed, opt(&gt, affine), eps, grads, &mut dze)
            }
            None => batch_norm_backward_eval_relu(v, &dy, &mask_e, fixed, opt(&gt, affine), eps, grads),
        }
        .unwrap();
        let (rdxe, rdge, rdbe, rdze) =
            reference::relu_backward_eval(&d.g, &d.x, &kept_e, &d.dy, &d.mean, &d.var, &gamma, eps);
        let sdxe: Vec<f64> = (0..n)
            .map(|k| {
                let c = channel_of(&d.g, k);
                (rdze[k] * gamma[c]).abs() / (d.var[c] + eps).sqrt()
            })
            .collect();
        let up = Data {
            dy: rdze.clone(),
            ..d.clone()
        };
        assert_close(&format!("{what} eval dx"), &dxe, &rdxe, &sdxe, elementwise_rel::<T>());
        assert_eval_param_grads(&format!("{what} eval"), (&dge, &dbe), (&rdge, &rdbe), &up, eps, rel);
        if z.is_some() {
            assert_eq!(wide(&dze), rdze, "{what}: eval dz is dy·[kept]");
        }
    }
}

shape_proptests! { 24;
    fused_matches_reference => check_reference for f64, f32;
}

/// The reference comparison on the chunking shapes.
#[test]
fn fused_matches_reference_on_chunking_shapes() {
    for (i, (layout, shape)) in chunking_shapes().into_iter().enumerate() {
        check_reference::<f32>(layout, &shape, 1600 + i as u64, true, 1e-5);
        check_reference::<f64>(layout, &shape, 1700 + i as u64, i % 2 == 0, 1e-3);
    }
}

// ---------------------------------------------------------------------------------------------
// Finite differences and the kink
// ---------------------------------------------------------------------------------------------

/// Data of an f64 finite-difference case whose ReLU inputs t all lie at least 1e-3 from 0 (so no
/// perturbation of h = 1e-6 crosses the kink): the first seed from `seed` that gives such data.
fn away_from_kink(layout: Layout, shape: &[usize], seed: u64, residual_on: bool, affine: bool) -> (Data, Vec<f64>) {
    (seed..seed + 1000)
        .map(|s| {
            let d = Data::new::<f64>(layout, shape, s);
            let z = if residual_on {
                residual::<f64>(layout, shape, s)
            } else {
                vec![0.0; d.x.len()]
            };
            (d, z)
        })
        .find(|(d, z)| {
            let (g, b) = d.affine(affine);
            let (_, t, _, _) = reference::relu_forward_train(&d.g, &d.x, Some(z), &g, &b, FD_EPS);
            t.iter().all(|t| t.abs() > 1e-3)
        })
        .expect("a seed with every ReLU input away from 0")
}

/// The fused training backward against central differences of the fused forward (ℓ = Σ w·y),
/// in each element of x, each γ and β, and each element of the residual z: ∂ℓ/∂z = dz.
#[test]
fn fused_backward_matches_finite_differences() {
    for (i, (layout, shape)) in fd_shapes().into_iter().enumerate() {
        for (affine, residual_on) in [(true, true), (false, true), (true, false)] {
            let (d, z) = away_from_kink(layout, &shape, 1800 + 10 * i as u64, residual_on, affine);
            let (gamma, beta) = d.affine(affine);
            let w = &d.dy;
            let forward = |x: &[f64], z: &[f64], g: &[f64], b: &[f64], y: &mut [f64]| {
                let (v, mut mask) = (View::new(x, &shape, layout), ReluMask::new());
                let (_, saved) = match residual_on {
                    true => batch_norm_train_add_relu(v, z, affine_if(affine, g, b), FD_EPS, y, &mut mask),
                    false => batch_norm_train_relu(v, affine_if(affine, g, b), FD_EPS, y, &mut mask),
                }
                .unwrap();
                (mask, saved)
            };
            let mut y = vec![0.0; d.x.len()];
            let (mask, saved) = forward(&d.x, &z, &gamma, &beta, &mut y);
            let v = View::new(&d.x, &shape, layout);
            let c = d.g.channels;
            let (mut dx, mut dg, mut db, mut dz) = nan_grads::<f64>(&d);
            let grads = Grads::new(&mut dx, &mut dg, &mut db);
            match residual_on {
                true => batch_norm_backward_add_relu(v, w, &mask, &saved, opt(&gamma, affine), grads, &mut dz),
                false => batch_norm_backward_relu(v, w, &mask, &saved, opt(&gamma, affine), grads),
            }
            .unwrap();
            let what = format!("{layout} {shape:?} affine={affine} residual={residual_on}");
            let loss_x = |x: &[f64], g: &[f64], b: &[f64]| loss_of(w, |y| drop(forward(x, &z, g, b, y)));
            let loss_params = |g: &[f64], b: &[f64]| loss_of(w, |y| drop(forward(&d.x, &z, g, b, y)));
            let (dgs, dbs) = if affine {
                (dg.clone(), db.clone())
            } else {
                (vec![0.0; c], vec![0.0; c])
            };
            assert_fd_grads(&what, &d.x, &gamma, &beta, (&dx, &dgs, &dbs), loss_x, loss_params);
            if residual_on {
                for k in 0..z.len() {
                    let (mut zp, mut zm) = (z.clone(), z.clone());
                    zp[k] += H;
                    zm[k] -= H;
                    let at = |z: &[f64]| loss_of(w, |y| drop(forward(&d.x, z, &gamma, &beta, y)));
                    assert_fd(&format!("{what} dz[{k}]"), dz[k], (at(&zp) - at(&zm)) / (2.0 * H));
                }
            }
        }
    }
}

/// At the kink: where the ReLU's input is exactly 0 its output is +0.0 and its gradient 0
/// (PyTorch's convention), so dy there reaches neither dz nor batch norm's backward. Without a
/// residual, γ = β = 0 puts every input at 0: dγ = dβ = 0 although Σ dy·x̂ and Σ dy are not.
/// With one, z = −bn(x) at every other element puts those at 0: dz is 0 there and dy elsewhere
/// where kept, and dx, dγ, dβ are the reference's with those gradients.
fn check_kink<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64) {
    let d = Data::new::<T>(layout, shape, seed);
    let (x, dy, gt, bt) = d.narrowed::<T>();
    let v = View::new(&x, shape, layout);
    let (n, c) = (x.len(), d.g.channels);
    let zero = T::from_f64(0.0);
    let what = format!("{layout} {shape:?} {}", T::NAME);

    let (g0, b0) = (vec![zero; c], vec![zero; c]);
    let (mut y, mut mask) = (vec![T::from_f64(f64::NAN); n], ReluMask::new());
    let (_, saved) = batch_norm_train_relu(v, Affine::new(&g0, &b0), 1e-5, &mut y, &mut mask).unwrap();
    assert!(bits(&y).iter().all(|&b| b == 0), "{what}: relu(0) is +0.0");
    assert!(kept_of(&mask).iter().all(|&k| !k), "{what}: the ReLU keeps no 0");
    let (mut dx, mut dg, mut db) = (vec![zero; n], vec![T::from_f64(1.0); c], vec![T::from_f64(1.0); c]);
    batch_norm_backward_relu(v, &dy, &mask, &saved, Some(&g0), Grads::new(&mut dx, &mut dg, &mut db)).unwrap();
    assert!(
        dg.iter().chain(&db).chain(&dx).all(|v| v.to_f64() == 0.0),
        "{what}: gradient 0 at t = 0"
    );
    let (_, rdg, rdb) = reference::backward_train(&d.g, &d.x, &d.dy, &vec![1.0; c], 1e-5);
    assert!(
        rdg.iter().chain(&rdb).any(|v| v.abs() > 1e-3),
        "{what}: the data would pass a gradient at 0"
    );

    // z = −bn(x) at even elements (t = +0.0 there exactly), 0 elsewhere.
    let mut bn = vec![zero; n];
    batch_norm_train(v, Affine::new(&gt, &bt), 1e-5, &mut bn).unwrap();
    let z: Vec<T> = bn
        .iter()
        .enumerate()
        .map(|(k, &b)| if k % 2 == 0 { T::from_f64(-b.to_f64()) } else { zero })
        .collect();
    let mut mask = ReluMask::new();
    let (_, saved) = batch_norm_train_add_relu(v, &z, Affine::new(&gt, &bt), 1e-5, &mut y, &mut mask).unwrap();
    let kept = kept_of(&mask);
    let (mut dz, mut dx, mut dg, mut db) = (vec![zero; n], vec![zero; n], vec![zero; c], vec![zero; c]);
    let grads = Grads::new(&mut dx, &mut dg, &mut db);
    batch_norm_backward_add_relu(v, &dy, &mask, &saved, Some(&gt), grads, &mut dz).unwrap();
    for k in 0..n {
        if k % 2 == 0 {
            assert!(
                y[k].to_f64().to_bits() == 0 && !kept[k],
                "{what}: t[{k}] = 0 gives +0.0, not kept"
            );
            assert_eq!(dz[k].to_f64(), 0.0, "{what}: dz[{k}] at t = 0");
        } else {
            assert_eq!(kept[k], bn[k].to_f64() > 0.0, "{what}: mask[{k}]");
        }
    }
    let (rdx, rdg, rdb, rdz) = reference::relu_backward_train(&d.g, &d.x, &kept, &d.dy, &d.gamma, 1e-5);
    assert_eq!(wide(&dz), rdz, "{what}: dz");
    let (sdx, sdg, sdb) = backward_scales(&d, &rdz, &d.gamma, 1e-5);
    let rel = reduce_rel::<T>(d.g.per_channel());
    assert_close(&format!("{what} dx"), &dx, &rdx, &sdx, rel);
    assert_close(&format!("{what} dgamma"), &dg, &rdg, &sdg, rel);
    assert_close(&format!("{what} dbeta"), &db, &rdb, &sdb, rel);
}

#[test]
fn gradient_is_zero_at_the_kink() {
    for (i, (layout, shape)) in fd_shapes()
        .into_iter()
        .chain(chunking_shapes().into_iter().take(4))
        .enumerate()
    {
        check_kink::<f32>(layout, &shape, 1900 + i as u64);
        check_kink::<f64>(layout, &shape, 1950 + i as u64);
    }
}

/// A mask written before, for another geometry with every bit set, then by a fused forward (a
/// training and an inference one): the bytes of a new mask written by that forward, so none is
/// left from before (a forward writes every element's bit and clears the bits past each
/// segment's elements, instead of zeroing the whole mask first).
#[test]
fn reused_mask_is_written_as_a_new_one() {
    for (i, (layout, shape)) in chunking_shapes().into_iter().enumerate() {
        let d = Data::new::<f32>(layout, &shape, 2100 + i as u64);
        let (x, _, g, b) = d.narrowed::<f32>();
        let (v, affine) = (View::new(&x, &shape, layout), Affine::new(&g, &b));
        let (mean, var) = (narrow::<f32>(&d.mean), narrow::<f32>(&d.var));
        let fixed = FixedStats::new(&mean, &var);
        // Every bit set over more bytes than this shape's mask has: relu(x + 1e3) keeps all.
        let big: Vec<f32> = (0..16 * x.len() + 1024).map(|k| (k % 7) as f32).collect();
        let (gamma, beta, big_shape) = ([1.0f32], [1e3f32], [big.len(), 1]);
        let big_v = View::new(&big, &big_shape, Layout::NC);
        let reused = |mask: &mut ReluMask, eval: bool| {
            let mut yb = vec![0.0f32; big.len()];
            batch_norm_train_relu(big_v, Affine::new(&gamma, &beta), 1e-5, &mut yb, mask).unwrap();
            assert!(kept_of(mask).iter().all(|&k| k));
            let mut y = vec![0.0f32; x.len()];
            match eval {
                false => drop(batch_norm_train_relu(v, affine, 1e-5, &mut y, mask).unwrap()),
                true => batch_norm_eval_relu(v, fixed, affine, 1e-5, &mut y, Some(mask)).unwrap(),
            }
        };
        for eval in [false, true] {
            let (mut fresh, mut old) = (ReluMask::new(), ReluMask::new());
            let mut y = vec![0.0f32; x.len()];
            match eval {
                false => drop(batch_norm_train_relu(v, affine, 1e-5, &mut y, &mut fresh).unwrap()),
                true => batch_norm_eval_relu(v, fixed, affine, 1e-5, &mut y, Some(&mut fresh)).unwrap(),
            }
            reused(&mut old, eval);
            assert!(
                old == fresh,
                "{layout} {shape:?} eval={eval}: the reused mask's bytes differ"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The layer
// ---------------------------------------------------------------------------------------------

/// A frozen layer's fused training passes are the fused inference transform with the running
/// statistics (mask written, nothing updated) and its backward through them as constants; so is
/// a batch of 1 value per channel under `SmallBatch::UseRunningStats`. The inference methods
/// give the free functions' bits.
#[test]
fn layer_frozen_and_small_batch_fused() {
    for (layout, shape) in [(Layout::NCHW, vec![2, 3, 2, 2]), (Layout::NC, vec![1, 3])] {
        let d = Data::new::<f64>(layout, &shape, 77);
        let z = residual::<f64>(layout, &shape, 77);
        let v = View::new(&d.x, &shape, layout);
        let (n, c) = (d.x.len(), d.g.channels);
        let config = BatchNormConfig {
            small_batch: SmallBatch::UseRunningStats,
            ..BatchNormConfig::default()
        };
        let mut bn = layer_of::<f64>(&d, config);
        if n > c {
            bn.freeze();
        }
        let before = bn.clone();
        let (mut y, mut mask) = (vec![f64::NAN; n], ReluMask::new());
        let saved = bn.forward_train_add_relu(v, &z, &mut y, &mut mask).unwrap();
        assert_eq!(bn, before, "{layout} {shape:?}: the layer changed");
        let fixed = FixedStats::new(&bn.running_mean, &bn.running_var);
        let (mut ye, mut mask_e) = (vec![f64::NAN; n], ReluMask::new());
        let affine = Affine::new(&bn.gamma, &bn.beta);
        batch_norm_eval_add_relu(v, &z, fixed, affine, 1e-5, &mut ye, Some(&mut mask_e)).unwrap();
        assert_bits("frozen y", &y, &ye);
        assert_eq!(mask, mask_e);
        let mut yl = vec![f64::NAN; n];
        bn.forward_eval_add_relu(v, &z, &mut yl, None).unwrap();
        assert_bits("layer eval y", &yl, &ye);
        let (mut dx, mut dg, mut db, mut dz) = (vec![0.0; n], vec![0.0; c], vec![0.0; c], vec![0.0; n]);
        bn.backward_add_relu(v, &d.dy, &mask, &saved, Grads::new(&mut dx, &mut dg, &mut db), &mut dz)
            .unwrap();
        let (mut dxe, mut dge, mut dbe, mut dze) = (vec![0.0; n], vec![0.0; c], vec![0.0; c], vec![0.0; n]);
        let grads = Grads::new(&mut dxe, &mut dge, &mut dbe);
        batch_norm_backward_eval_add_relu(v, &d.dy, &mask, fixed, Some(&bn.gamma), 1e-5, grads, &mut dze).unwrap();
        for (name, a, b) in [
            ("dx", &dx, &dxe),
            ("dgamma", &dg, &dge),
            ("dbeta", &db, &dbe),
            ("dz", &dz, &dze),
        ] {
            assert_bits(&format!("{layout} {shape:?} frozen {name}"), a, b);
        }
        let (mut dxl, mut dgl, mut dbl) = (vec![0.0; n], vec![0.0; c], vec![0.0; c]);
        bn.backward_eval_relu(v, &d.dy, &mask, Grads::new(&mut dxl, &mut dgl, &mut dbl))
            .unwrap();
        let (mut dxr, mut dgr, mut dbr) = (vec![0.0; n], vec![0.0; c], vec![0.0; c]);
        let grads = Grads::new(&mut dxr, &mut dgr, &mut dbr);
        batch_norm_backward_eval_relu(v, &d.dy, &mask, fixed, Some(&bn.gamma), 1e-5, grads).unwrap();
        assert_bits("layer backward_eval_relu dx", &dxl, &dxr);
        assert_bits("layer backward_eval_relu dgamma", &dgl, &dgr);
        let mut ym = vec![f64::NAN; n];
        bn.forward_eval_relu(v, &mut ym, Some(&mut mask)).unwrap();
        batch_norm_eval_relu(v, fixed, affine, 1e-5, &mut ye, None).unwrap();
        assert_bits("layer eval relu y", &ym, &ye);
    }
}

/// A backward asked for part of its outputs gives the bits it gives asked for all of them,
/// dz included (written by its own pass when dx is not asked for).
#[test]
fn fused_backward_output_subsets() {
    // Channels-first with ≥ 16 channels (the fused per-channel passes), the rows plan.
    let shapes = [
        (Layout::NCHW, vec![3, 17, 4, 5]),
        (Layout::NHWC, vec![2, 3, 3, 5]),
        (Layout::NC, vec![7, 3]),
    ];
    for (layout, shape) in shapes {
        let d = Data::new::<f32>(layout, &shape, 2000);
        let z = residual::<f32>(layout, &shape, 2000);
        let (x, dy, g, b) = d.narrowed::<f32>();
        let v = View::new(&x, &shape, layout);
        let (n, c) = (x.len(), d.g.channels);
        let (mut y, mut mask) = (vec![0.0; n], ReluMask::new());
        let (_, saved) = batch_norm_train_add_relu(v, &z, Affine::new(&g, &b), 1e-5, &mut y, &mut mask).unwrap();
        let (mean, var) = (narrow::<f32>(&d.mean), narrow::<f32>(&d.var));
        let fixed = FixedStats::new(&mean, &var);
        for eval in [false, true] {
            let run = |grads: Grads<'_, f32>, dz: &mut [f32]| match eval {
                false => batch_norm_backward_add_relu(v, &dy, &mask, &saved, Some(&g), grads, dz).unwrap(),
                true => batch_norm_backward_eval_add_relu(v, &dy, &mask, fixed, Some(&g), 1e-5, grads, dz).unwrap(),
            };
            let (mut dx, mut dg, mut db, mut dz) = (vec![0.0; n], vec![0.0; c], vec![0.0; c], vec![f32::NAN; n]);
            run(Grads::new(&mut dx, &mut dg, &mut db), &mut dz);
            let what = format!("{layout} {shape:?} eval={eval}");
            assert_output_subsets(&what, (&dx, &dg, &db), |grads| run(grads, &mut vec![0.0; n]));
            let mut dz_alone = vec![f32::NAN; n];
            run(Grads::default(), &mut dz_alone);
            assert_bits(&format!("{what} dz without dx"), &dz_alone, &dz);
        }
    }
}
