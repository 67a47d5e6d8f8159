//! Ghost batch norm (issue 16; Hoffer et al. 2017) against the f64 reference
//! (`reference::ghost_*`, each group by the plain reference) over random shapes, layouts, virtual
//! batch sizes, element types and thread counts (the backward asked for any subset of dx, dγ, dβ
//! giving the same bits); against central finite differences in f64; against plain batch norm
//! where it must equal it (one group); bitwise across thread counts.
//!
//! Tolerances are those of `common` (see its module docs), taken per group: y and dx of a group
//! come from that group's statistics alone, a reduction over its m_g values, so they are held to
//! `reduce_rel(m_g)` against scales computed from the group's own data; dγ, dβ and the running
//! statistics add up the groups' sums or estimates, reductions over all m values of the batch,
//! so they are held to `reduce_rel(m)` against the sum (or mean) of the groups' scales.

use crate::common::*;
use batchnorm::{
    batch_norm_backward, batch_norm_eval, batch_norm_train, ghost_batch_norm_backward, ghost_batch_norm_train,
    grad_sums, reference, update_ghost_running_stats, update_running_stats, Affine, BatchNorm, BatchNormConfig, Error,
    FixedStats, GradSums, Grads, Layout, Momentum, SavedStats, SmallBatch, View,
};
use proptest::prelude::*;

/// The ghost groups of a batch of `n` examples with virtual batch `v`: (first example, examples).
fn group_examples(n: usize, v: usize) -> Vec<(usize, usize)> {
    (0..n).step_by(v).map(|first| (first, v.min(n - first))).collect()
}

/// A ghost layer (momentum 0.3) with the data's γ, β (when `affine`) and running statistics.
fn ghost_layer<T: PlainFloat>(d: &Data, eps: f64, affine: bool, v: usize) -> BatchNorm<T> {
    let config = BatchNormConfig {
        eps,
        affine,
        momentum: Momentum::Exponential(0.3),
        virtual_batch: Some(v),
        ..BatchNormConfig::default()
    };
    layer_of(d, config)
}

/// Scales of the running-statistics update (as in `forward.rs`'s layer test) after a ghost
/// mini-batch of `d`: |running| plus the mean over groups of mean|x_g| (the mean) and of 2·σ²_g
/// (the variance; m_g/(m_g − 1) ≤ 2), from each group's own data and reference `groups`.
fn running_scales(
    d: &Data,
    (layout, shape, v): (Layout, &[usize], usize),
    (rm0, rv0): (&[f64], &[f64]),
    groups: &[(Vec<f64>, Vec<f64>, usize)],
) -> (Vec<f64>, Vec<f64>) {
    let (mut mscale, mut vscale): (Vec<f64>, Vec<f64>) = (
        rm0.iter().map(|a| a.abs()).collect(),
        rv0.iter().map(|a| a.abs()).collect(),
    );
    let share = 1.0 / groups.len() as f64;
    for ((first, examples), (_, var, _)) in group_examples(shape[0], v).into_iter().zip(groups) {
        let mabs = d.examples(layout, shape, first, examples).0.mean_abs_x();
        for c in 0..d.g.channels {
            mscale[c] += share * mabs[c];
            vscale[c] += share * 2.0 * var[c];
        }
    }
    (mscale, vscale)
}

/// Ghost training forward, backward and the layer's running-statistics update against the
/// reference: each group's y = γ·(x − μ_g)/√(σ²_g + ε) + β (Algorithm 1 on the group), dx by
/// the group's chain rule, dγ = Σ_g Σ dy·x̂, dβ = Σ dy, and running ← (1 − 0.3)·running +
/// 0.3·(mean over groups of μ_g, of m_g/(m_g − 1)·σ²_g). A batch whose last group holds fewer
/// than 2 values per channel must be rejected instead, by the functions and the layer alike.
fn check_ghost<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64, affine: bool, eps: f64, v: usize) {
    let d = Data::new::<T>(layout, shape, seed);
    let (gamma, beta) = d.affine(affine);
    let (x, dy, gt, bt) = d.narrowed::<T>();
    let (len, c, n) = (x.len(), d.g.channels, shape[0]);
    let xv = View::new(&x, shape, layout);
    let what = format!("ghost {layout} {shape:?} v={v} affine={affine} eps={eps}");
    let groups = group_examples(n, v);
    let values_per_example = d.g.per_channel() / n;
    let nan = T::from_f64(f64::NAN);
    let mut y = vec![nan; len];
    let result = ghost_batch_norm_train(xv, v, affine_if(affine, &gt, &bt), eps, &mut y);
    let mut bn = ghost_layer::<T>(&d, eps, affine, v);
    if let Some(k) = groups.iter().position(|&(_, e)| e * values_per_example < 2) {
        assert_eq!(k + 1, groups.len(), "{what}: only the last group can be short");
        let want = Error::GhostGroupTooSmall {
            group: k,
            count: (groups[k].1 * values_per_example) as u64,
            shape: shape.to_vec(),
        };
        assert_eq!(result.unwrap_err(), want, "{what}");
        assert!(y.iter().all(|a| a.to_f64().is_nan()), "{what}: y untouched on error");
        let before = bn.clone();
        assert_eq!(bn.forward_train(xv, &mut y).unwrap_err(), want, "{what}: layer");
        assert_eq!(bn, before, "{what}: layer unchanged on error");
        return;
    }
    let (stats, saved) = result.unwrap();
    assert_eq!(
        (stats.len(), saved.groups.len(), saved.virtual_batch),
        (groups.len(), groups.len(), v)
    );
    let (ry, rgroups) = reference::ghost_forward_train(&d.g, n, v, &d.x, &gamma, &beta, eps);
    // Per-group statistics, and the tolerance scales of every output (see the module docs).
    let (mut sy, mut sdx) = (Vec::new(), Vec::new());
    let (mut sdg, mut sdb) = (vec![0.0; c], vec![0.0; c]);
    let mut m_max = 0;
    for (k, &(first, examples)) in groups.iter().enumerate() {
        let (dk, _) = d.examples(layout, shape, first, examples);
        let (rmean, rvar, m) = &rgroups[k];
        assert_eq!(
            (stats[k].count, saved.groups[k].count),
            (*m as u64, *m as u64),
            "{what} group {k} count"
        );
        let rel = reduce_rel::<T>(*m);
        let mabs = dk.mean_abs_x();
        assert_close::<f64>(&format!("{what} group {k} mean"), &stats[k].mean, rmean, &mabs, rel);
        assert_close::<f64>(
            &format!("{what} group {k} var"),
            &stats[k].var_biased(),
            rvar,
            rvar,
            rel,
        );
        sy.extend(train_y_scale(&dk, &gamma, &beta, rmean, rvar, eps));
        let (a, b, s) = backward_scales(&dk, &dk.dy, &gamma, eps);
        sdx.extend(a);
        for ch in 0..c {
            sdg[ch] += b[ch];
            sdb[ch] += s[ch];
        }
        m_max = m_max.max(*m);
    }
    let (rel_group, rel_all) = (reduce_rel::<T>(m_max), reduce_rel::<T>(d.g.per_channel()));
    assert_close(&format!("{what} y"), &y, &ry, &sy, rel_group);

    let (mut dx, mut dg, mut db) = (vec![nan; len], vec![nan; c], vec![nan; c]);
    let grads = Grads::new(&mut dx, &mut dg, &mut db);
    ghost_batch_norm_backward(xv, &dy, &saved, opt(&gt, affine), grads).unwrap();
    let (rdx, rdg, rdb) = reference::ghost_backward_train(&d.g, n, v, &d.x, &d.dy, &gamma, eps);
    assert_close(&format!("{what} dx"), &dx, &rdx, &sdx, rel_group);
    assert_close(&format!("{what} dgamma"), &dg, &rdg, &sdg, rel_all);
    assert_close(&format!("{what} dbeta"), &db, &rdb, &sdb, rel_all);
    assert_output_subsets(&what, (&dx, &dg, &db), |grads| {
        ghost_batch_norm_backward(xv, &dy, &saved, opt(&gt, affine), grads).unwrap();
    });

    // The layer: the functions' bits, its statistics packed group after group, one update.
    let (rm0, rv0) = (wide(&bn.running_mean), wide(&bn.running_var));
    let mut yl = vec![nan; len];
    let packed = bn.forward_train(xv, &mut yl).unwrap();
    assert_bits(&format!("{what} layer y"), &yl, &y);
    assert_eq!(packed.count, d.g.per_channel() as u64, "{what}");
    let concat = |f: fn(&batchnorm::SavedStats) -> &Vec<f64>| saved.groups.iter().flat_map(f).copied().collect();
    let (means, inv_stds): (Vec<f64>, Vec<f64>) = (concat(|s| &s.mean), concat(|s| &s.inv_std));
    assert_bits64(&format!("{what} packed mean"), &packed.mean, &means);
    assert_bits64(&format!("{what} packed inv_std"), &packed.inv_std, &inv_stds);
    assert_eq!(bn.num_batches_tracked, 1, "{what}: one update per mini-batch");
    let (erm, erv) = reference::ghost_running_update(&rm0, &rv0, &rgroups, Some(0.3), 1);
    let (mscale, vscale) = running_scales(&d, (layout, shape, v), (&rm0, &rv0), &rgroups);
    assert_close(
        &format!("{what} running_mean"),
        &bn.running_mean,
        &erm,
        &mscale,
        rel_all,
    );
    assert_close(&format!("{what} running_var"), &bn.running_var, &erv, &vscale, rel_all);
    let (dxl, dgl, dbl) = layer_backward_all(&bn, xv, &dy, &packed);
    assert_bits(&format!("{what} layer dx"), &dxl, &dx);
    if affine {
        assert_bits(&format!("{what} layer dgamma"), &dgl, &dg);
        assert_bits(&format!("{what} layer dbeta"), &dbl, &db);
    }
}

/// Virtual batch sizes: small (many groups, NC's last group often of one example), and one
/// larger than any batch of `layout_shape` (one group).
fn virtual_batch_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![2usize..6, 6usize..40, Just(1000)]
}

proptest! {
    #![proptest_config(config(80))]

    /// Both element types (`single`: f32), over pools of 1 to 3 threads.
    #[test]
    fn ghost_matches_reference(
        (layout, shape) in layout_shape(20_000), seed: u64, affine: bool, eps in eps_strategy(),
        v in virtual_batch_strategy(), threads in 1usize..=3, single: bool,
    ) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| match single {
            true => check_ghost::<f32>(layout, &shape, seed, affine, eps, v),
            false => check_ghost::<f64>(layout, &shape, seed, affine, eps, v),
        });
    }
}

/// The kernels' internal chunking paths, each group large enough to take them.
#[test]
fn ghost_on_chunking_shapes() {
    for (i, (layout, shape)) in chunking_shapes().into_iter().enumerate() {
        let v = (shape[0] / 2).max(2);
        check_ghost::<f32>(layout, &shape, 700 + i as u64, true, 1e-5, v);
    }
}

/// Ghost backward (dx through each group's statistics, dγ and dβ summed over groups) against
/// central differences of the ghost forward in f64, with groups of 2 and 3 examples (see
/// `common` for the error budget: every group here holds at least 2 values per channel).
#[test]
fn ghost_backward_matches_finite_differences() {
    for v in [2, 3] {
        for_each_fd_case(800 + v as u64, |layout, shape, affine, d| {
            let (gamma, beta) = d.affine(affine);
            let w = &d.dy;
            let forward = |x: &[f64], g: &[f64], b: &[f64]| {
                loss_of(w, |y| {
                    ghost_batch_norm_train(View::new(x, shape, layout), v, affine_if(affine, g, b), FD_EPS, y).unwrap();
                })
            };
            let c = d.g.channels;
            let mut y = vec![0.0; d.x.len()];
            let xv = View::new(&d.x, shape, layout);
            let (_, saved) = ghost_batch_norm_train(xv, v, affine_if(affine, &gamma, &beta), FD_EPS, &mut y).unwrap();
            let (dx, dg, db) = grads_of(d.x.len(), c, |grads| {
                ghost_batch_norm_backward(xv, w, &saved, opt(&gamma, affine), grads).unwrap();
            });
            // γ and β enter linearly: their differences are taken with affine on, around the
            // γ, β the forward used (1 and 0 without affine).
            let fwd_params = |g: &[f64], b: &[f64]| {
                loss_of(w, |y| {
                    ghost_batch_norm_train(xv, v, Affine::new(g, b), FD_EPS, y).unwrap();
                })
            };
            let what = format!("ghost v={v} {layout} {shape:?} affine={affine}");
            assert_fd_grads(&what, &d.x, &gamma, &beta, (&dx, &dg, &db), forward, fwd_params);
        });
    }
}

/// With v ≥ N there is one group, the whole batch, and ghost batch norm runs plain batch norm's
/// code on it: the same bits for y, the statistics, dx, dγ, dβ, and the layer's running
/// statistics (Algorithm 1 and 2 exactly).
fn check_one_group_is_plain<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64) {
    let d = Data::new::<T>(layout, shape, seed);
    let (x, dy, g, b) = d.narrowed::<T>();
    let xv = View::new(&x, shape, layout);
    let c = d.g.channels;
    let zero = T::from_f64(0.0);
    let (y_plain, stats_plain, saved_plain) = train(xv, Affine::new(&g, &b), 1e-5);
    let (dx_plain, dg_plain, db_plain) = backward_all(xv, &dy, &saved_plain, Some(&g));
    for v in [shape[0].max(2), shape[0] + 5] {
        let what = format!("{layout} {shape:?} v={v} ({})", T::NAME);
        let mut y = vec![zero; x.len()];
        let (stats, saved) = ghost_batch_norm_train(xv, v, Affine::new(&g, &b), 1e-5, &mut y).unwrap();
        assert_bits(&format!("{what} y"), &y, &y_plain);
        assert_eq!(
            (stats, saved.groups),
            (vec![stats_plain.clone()], vec![saved_plain.clone()]),
            "{what}"
        );
        let (mut dx, mut dg, mut db) = (vec![zero; x.len()], vec![zero; c], vec![zero; c]);
        let saved = batchnorm::GhostSaved {
            virtual_batch: v,
            groups: vec![saved_plain.clone()],
        };
        ghost_batch_norm_backward(xv, &dy, &saved, Some(&g), Grads::new(&mut dx, &mut dg, &mut db)).unwrap();
        assert_bits(&format!("{what} dx"), &dx, &dx_plain);
        assert_bits(&format!("{what} dgamma"), &dg, &dg_plain);
        assert_bits(&format!("{what} dbeta"), &db, &db_plain);
        // The layers, over two steps (the running statistics of the first feed the second).
        let mut ghost = ghost_layer::<T>(&d, 1e-5, true, v);
        let mut plain = ghost.clone();
        plain.config.virtual_batch = None;
        for step in 0..2 {
            let (mut yg, mut yp) = (vec![zero; x.len()], vec![zero; x.len()]);
            let sg = ghost.forward_train(xv, &mut yg).unwrap();
            let sp = plain.forward_train(xv, &mut yp).unwrap();
            assert_eq!(sg, sp, "{what} step {step}: saved");
            assert_bits(&format!("{what} step {step} layer y"), &yg, &yp);
            assert_bits(
                &format!("{what} running_mean"),
                &ghost.running_mean,
                &plain.running_mean,
            );
            assert_bits(&format!("{what} running_var"), &ghost.running_var, &plain.running_var);
            assert_eq!(ghost.num_batches_tracked, plain.num_batches_tracked);
            let mut dxg = vec![zero; x.len()];
            ghost.backward(xv, &dy, &sg, Grads::dx(&mut dxg)).unwrap();
            assert_bits(&format!("{what} step {step} layer dx"), &dxg, &dx_plain);
        }
    }
}

#[test]
fn ghost_with_one_group_is_plain_batch_norm() {
    for (i, (layout, shape)) in shard_shapes().into_iter().chain(chunking_shapes()).enumerate() {
        check_one_group_is_plain::<f32>(layout, &shape, 900 + i as u64);
        check_one_group_is_plain::<f64>(layout, &shape, 950 + i as u64);
    }
}

/// The running statistics over several mini-batches, exponential and cumulative: each
/// mini-batch one update (num_batches_tracked + 1) with the mean over groups of μ_g and of the
/// unbiased m_g/(m_g − 1)·σ²_g, groups of unequal size weighing the same (`reference::
/// ghost_running_update`, which differs from the update with the whole batch's statistics);
/// `update_ghost_running_stats` with one group is `update_running_stats` of that group.
#[test]
fn ghost_running_statistics_over_steps() {
    let (layout, shape, v) = (Layout::NCHW, vec![7, 3, 2, 2], 3); // groups of 3, 3 and 1 examples
    for momentum in [Momentum::Exponential(0.4), Momentum::Cumulative] {
        let d0 = Data::new::<f64>(layout, &shape, 31);
        let mut bn = ghost_layer::<f64>(&d0, 1e-5, true, v);
        bn.config.momentum = momentum;
        let mom = match momentum {
            Momentum::Exponential(w) => Some(w),
            Momentum::Cumulative => None,
        };
        for step in 0..3u64 {
            let d = Data::new::<f64>(layout, &shape, 40 + step);
            let (rm0, rv0) = (bn.running_mean.clone(), bn.running_var.clone());
            let mut y = vec![0.0; d.x.len()];
            bn.forward_train(View::new(&d.x, &shape, layout), &mut y).unwrap();
            assert_eq!(bn.num_batches_tracked, step + 1);
            let (_, groups) = reference::ghost_forward_train(&d.g, 7, v, &d.x, &d.gamma, &d.beta, 1e-5);
            let (erm, erv) = reference::ghost_running_update(&rm0, &rv0, &groups, mom, step + 1);
            let rel = reduce_rel::<f64>(d.g.per_channel());
            let (mscale, vscale) = running_scales(&d, (layout, &shape, v), (&rm0, &rv0), &groups);
            assert_close("running_mean", &bn.running_mean, &erm, &mscale, rel);
            assert_close("running_var", &bn.running_var, &erv, &vscale, rel);
            // Not the whole batch's update: groups weigh equally, not by their sizes.
            let (wm, wv) = reference::mean_var(&d.g, &d.x);
            let (whole_m, whole_v) = reference::running_update(&rm0, &rv0, &wm, &wv, 28, mom, step + 1);
            let far = |a: &[f64], b: &[f64]| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-6);
            assert!(
                far(&erm, &whole_m) && far(&erv, &whole_v),
                "the test would see a whole-batch update"
            );
        }
    }
    // One group: update_running_stats of it, bit for bit.
    let d = Data::new::<f32>(Layout::NC, &[5, 4], 50);
    let x = narrow::<f32>(&d.x);
    let stats = batchnorm::batch_stats(View::new(&x, &[5, 4], Layout::NC)).unwrap();
    let (mut gm, mut gv) = (narrow::<f32>(&d.mean), narrow::<f32>(&d.var));
    let (mut pm, mut pv) = (gm.clone(), gv.clone());
    let m = Momentum::Exponential(0.1);
    update_ghost_running_stats(std::slice::from_ref(&stats), m, 1, &mut gm, &mut gv).unwrap();
    update_running_stats(&stats, m, 1, &mut pm, &mut pv).unwrap();
    assert_bits("one group mean", &gm, &pm);
    assert_bits("one group var", &gv, &pv);
}

/// Inference never uses groups: a ghost layer's forward_eval and backward_eval are the inference
/// transforms with its running statistics (the bits of `batch_norm_eval` and
/// `batch_norm_backward_eval`, and the plain layer's), whatever the batch; frozen, its training
/// passes are too (the running statistics, not groups); with the small-batch policy a batch of
/// one value per channel is normalized with the running statistics instead of being rejected.
#[test]
fn ghost_inference_uses_running_statistics() {
    for (i, (layout, shape)) in shard_shapes().into_iter().enumerate() {
        let d = Data::new::<f32>(layout, &shape, 60 + i as u64);
        let (x, dy) = (narrow::<f32>(&d.x), narrow::<f32>(&d.dy));
        let xv = View::new(&x, &shape, layout);
        let mut bn = ghost_layer::<f32>(&d, 1e-5, true, 4); // every group of 2 values or more
        let mut y = vec![0.0f32; x.len()];
        bn.forward_train(xv, &mut y).unwrap(); // running statistics away from the data's
        let mut plain = bn.clone();
        plain.config.virtual_batch = None;
        let what = format!("{layout} {shape:?}");
        let running = FixedStats::new(&bn.running_mean, &bn.running_var);
        let affine = Affine::new(&bn.gamma, &bn.beta);
        let (mut ye, mut yw, mut yp) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
        bn.forward_eval(xv, &mut ye).unwrap();
        batch_norm_eval(xv, running, affine, 1e-5, &mut yw).unwrap();
        plain.forward_eval(xv, &mut yp).unwrap();
        assert_bits(&format!("{what} eval y"), &ye, &yw);
        assert_bits(&format!("{what} eval y, plain layer"), &ye, &yp);
        let ry = reference::forward_eval(
            &d.g,
            &d.x,
            &wide(&bn.running_mean),
            &wide(&bn.running_var),
            &d.gamma,
            &d.beta,
            1e-5,
        );
        let scale: Vec<f64> = (0..x.len())
            .map(|k| {
                let c = channel_of(&d.g, k);
                let s = 1.0 / (bn.running_var[c] as f64 + 1e-5).sqrt();
                d.gamma[c].abs() * (d.x[k].abs() + (bn.running_mean[c] as f64).abs()) * s + d.beta[c].abs()
            })
            .collect();
        assert_close(&format!("{what} eval y"), &ye, &ry, &scale, elementwise_rel::<f32>());
        let (dx_e, dg_e) = backward_eval_dx_dgamma(xv, &dy, running, &bn.gamma, 1e-5);
        let c = d.g.channels;
        let (mut dx, mut dg, mut db) = (vec![0.0f32; x.len()], vec![0.0f32; c], vec![0.0f32; c]);
        bn.backward_eval(xv, &dy, Grads::new(&mut dx, &mut dg, &mut db))
            .unwrap();
        assert_bits(&format!("{what} backward_eval dx"), &dx, &dx_e);
        assert_bits(&format!("{what} backward_eval dgamma"), &dg, &dg_e);

        // Frozen: training passes use the running statistics too, and update nothing.
        bn.freeze();
        let before = bn.clone();
        let mut yf = vec![0.0f32; x.len()];
        let saved = bn.forward_train(xv, &mut yf).unwrap();
        assert_bits(&format!("{what} frozen y"), &yf, &yw);
        assert_eq!(bn, before, "{what}: frozen ghost layer unchanged");
        let mut dxf = vec![0.0f32; x.len()];
        bn.backward(xv, &dy, &saved, Grads::dx(&mut dxf)).unwrap();
        assert_bits(&format!("{what} frozen dx"), &dxf, &dx_e);
    }
    // The small-batch policy applies to the whole batch: one value per channel is normalized
    // with the running statistics (no groups, no update).
    let d = Data::new::<f64>(Layout::NC, &[1, 3], 70);
    let mut bn = ghost_layer::<f64>(&d, 1e-5, true, 2);
    bn.config.small_batch = SmallBatch::UseRunningStats;
    let before = bn.clone();
    let (mut y, mut yw) = ([0.0; 3], [0.0; 3]);
    let xv = View::new(&d.x, &[1, 3], Layout::NC);
    let saved = bn.forward_train(xv, &mut y).unwrap();
    let running = FixedStats::new(&before.running_mean, &before.running_var);
    batch_norm_eval(xv, running, Affine::new(&bn.gamma, &bn.beta), 1e-5, &mut yw).unwrap();
    assert_bits("small batch y", &y, &yw);
    assert_eq!(bn, before);
    let mut dx = [0.0; 3];
    bn.backward(xv, &d.dy, &saved, Grads::dx(&mut dx)).unwrap();
}

/// Every output of the ghost functions and the ghost layer, in pools of 1, 2 and 3 threads,
/// on shapes whose groups are large enough to run the kernels' parallel paths.
#[test]
fn ghost_bitwise_identical_for_1_2_3_threads() {
    let outputs = |d: &Data, layout: Layout, shape: &[usize], v: usize| -> Vec<Vec<u64>> {
        let (x, dy, g, b) = d.narrowed::<f32>();
        let xv = View::new(&x, shape, layout);
        let c = d.g.channels;
        let mut y = vec![0.0f32; x.len()];
        let (stats, saved) = ghost_batch_norm_train(xv, v, Affine::new(&g, &b), 1e-5, &mut y).unwrap();
        let (mut dx, mut dg, mut db) = (vec![0.0f32; x.len()], vec![0.0f32; c], vec![0.0f32; c]);
        ghost_batch_norm_backward(xv, &dy, &saved, Some(&g), Grads::new(&mut dx, &mut dg, &mut db)).unwrap();
        let mut bn = ghost_layer::<f32>(d, 1e-5, true, v);
        let mut yl = vec![0.0f32; x.len()];
        bn.forward_train(xv, &mut yl).unwrap();
        let bits = |v: &[f32]| v.iter().map(|a| a.to_bits() as u64).collect::<Vec<u64>>();
        let mut out = vec![bits(&y), bits(&dx), bits(&dg), bits(&db), bits(&yl)];
        out.push(bits(&bn.running_mean));
        out.push(bits(&bn.running_var));
        for s in &stats {
            out.push(s.mean.iter().chain(&s.m2).map(|a| a.to_bits()).collect());
        }
        out
    };
    for (i, (layout, shape, v)) in [
        (Layout::NCHW, vec![16, 32, 16, 16], 4),
        (Layout::NCHW, vec![12, 4, 64, 64], 5),
        (Layout::NHWC, vec![20, 32, 32, 16], 6),
        (Layout::NC, vec![3000, 200], 1024),
        (Layout::NC, vec![600, 64], 16),
    ]
    .into_iter()
    .enumerate()
    {
        let d = Data::new::<f32>(layout, &shape, 1100 + i as u64);
        let on_pool = |t: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
            pool.install(|| outputs(&d, layout, &shape, v))
        };
        let one = on_pool(1);
        for t in [2, 3] {
            assert!(on_pool(t) == one, "{layout} {shape:?} v={v}: 1 vs {t} threads differ");
        }
    }
}

/// The plain kernels on a group give what the ghost functions give for it: each group of the
/// ghost forward is `batch_norm_train` of its slice, and the backward's dx of a group is
/// `batch_norm_backward` of its slice with that group's statistics, dγ and dβ the groups' sums
/// (`grad_sums` of each slice) added in batch order; in the rows plan and channels-first, with
/// enough channels for the fused per-channel passes (planes smaller and larger than a piece),
/// and with too few.
#[test]
fn each_group_is_plain_batch_norm_of_its_slice() {
    for (layout, shape, v) in [
        (Layout::ChannelsLast, vec![7, 3, 4], 3),
        (Layout::NCHW, vec![7, 16, 3, 5], 3),
        (Layout::NCHW, vec![5, 17, 90, 100], 2),
        (Layout::ChannelsFirst, vec![6, 3, 40], 4),
        // The rows plan with groups of one unit: of one block, of several blocks (512 rows of
        // 64 channels to a block), and with a short last group.
        (Layout::NC, vec![60, 100], 16),
        (Layout::NC, vec![2500, 64], 1200),
        (Layout::NC, vec![40, 4096], 16),
        // Groups of several units (64 rows of 4096 channels to a task).
        (Layout::NC, vec![150, 4096], 70),
    ] {
        check_groups_are_plain(layout, &shape, v);
    }
}

/// Small groups of the rows plan (a block each, their statistics, constants and y tile by tile)
/// where some channels' constants leave `f32` (γ = `f32::MAX` over a small spread: scale =
/// γ/σ overflows it), one in the vectors of a tile and one in its tail: those channels are
/// computed in `f64`, each group bit for bit `batch_norm_train` of its slice.
#[test]
fn ghost_small_groups_with_constants_outside_f32() {
    let (shape, v, c) = ([40usize, 20], 16, 20);
    let d = Data::new::<f32>(Layout::NC, &shape, 90);
    let (mut x, _, mut g, b) = d.narrowed::<f32>();
    for ch in [3, 18] {
        g[ch] = f32::MAX;
        x.iter_mut().skip(ch).step_by(c).for_each(|v| *v *= 1e-3);
    }
    let mut y = vec![0.0f32; x.len()];
    ghost_batch_norm_train(View::new(&x, &shape, Layout::NC), v, Affine::new(&g, &b), 1e-5, &mut y).unwrap();
    for (k, (first, examples)) in group_examples(shape[0], v).into_iter().enumerate() {
        let r = first * c..(first + examples) * c;
        let mut yk = vec![0.0f32; r.len()];
        let sub = [examples, c];
        let sv = View::new(&x[r.clone()], &sub, Layout::NC);
        batch_norm_train(sv, Affine::new(&g, &b), 1e-5, &mut yk).unwrap();
        assert_bits(&format!("NC {shape:?} v={v} group {k} y"), &y[r], &yk);
    }
    // Those channels' values are out of `f32`'s reach of the narrow constants.
    for ch in [3, 18] {
        assert!(y.iter().skip(ch).step_by(c).any(|v| v.abs() > 1e30), "channel {ch}");
    }
}

/// Small groups of the rows plan over more channels than one chunk of the per-group constants
/// (made and narrowed a few hundred channels at a time), with channels whose forward constants
/// and dx coefficients leave `f32` (γ = `f32::MAX` over a small spread) in the first chunk, a
/// middle one and the last, shorter one: each group's y and dx bit for bit plain batch norm's
/// of its slice, in `f32` (those channels computed in `f64`) and in `f64` (wide constants).
#[test]
fn ghost_small_groups_constants_over_chunks() {
    check_constants_over_chunks::<f32>();
    check_constants_over_chunks::<f64>();
}

fn check_constants_over_chunks<T: PlainFloat>() {
    let (shape, v, c) = ([40usize, 600], 16, 600);
    let d = Data::new::<T>(Layout::NC, &shape, 91);
    let (mut x, dy, mut g, b) = d.narrowed::<T>();
    for ch in [3, 300, 599] {
        g[ch] = T::from_f64(f32::MAX as f64);
        x.iter_mut()
            .skip(ch)
            .step_by(c)
            .for_each(|v| *v = T::from_f64(v.to_f64() * 1e-3));
    }
    let xv = View::new(&x, &shape, Layout::NC);
    let mut y = vec![T::from_f64(0.0); x.len()];
    let (_, saved) = ghost_batch_norm_train(xv, v, Affine::new(&g, &b), 1e-5, &mut y).unwrap();
    let mut dx = vec![T::from_f64(0.0); x.len()];
    ghost_batch_norm_backward(xv, &dy, &saved, Some(&g), Grads::dx(&mut dx)).unwrap();
    for (k, (first, examples)) in group_examples(shape[0], v).into_iter().enumerate() {
        let r = first * c..(first + examples) * c;
        let what = format!("NC {shape:?} v={v} group {k} ({})", T::NAME);
        let sub = [examples, c];
        let sv = View::new(&x[r.clone()], &sub, Layout::NC);
        let (yk, _, saved_k) = train(sv, Affine::new(&g, &b), 1e-5);
        assert_bits(&format!("{what} y"), &y[r.clone()], &yk);
        assert_eq!(saved.groups[k], saved_k, "{what}");
        let mut dxk = vec![T::from_f64(0.0); r.len()];
        batch_norm_backward(sv, &dy[r.clone()], &saved_k, Some(&g), Grads::dx(&mut dxk)).unwrap();
        assert_bits(&format!("{what} dx"), &dx[r], &dxk);
    }
    // In `f32`, those channels' values are out of reach of the narrow constants.
    if T::NAME == "f32" {
        for ch in [3, 300, 599] {
            let far = |v: &[T]| v.iter().skip(ch).step_by(c).any(|v| v.to_f64().abs() > 1e30);
            assert!(far(&y) && far(&dx), "channel {ch}");
        }
    }
}

fn check_groups_are_plain(layout: Layout, shape: &[usize], v: usize) {
    let d = Data::new::<f32>(layout, shape, 80);
    let (x, dy, g, b) = d.narrowed::<f32>();
    let mut y = vec![0.0f32; x.len()];
    let xv = View::new(&x, shape, layout);
    let (_, saved) = ghost_batch_norm_train(xv, v, Affine::new(&g, &b), 1e-5, &mut y).unwrap();
    let c = d.g.channels;
    let (mut dx, mut dg, mut db) = (vec![0.0f32; x.len()], vec![0.0f32; c], vec![0.0f32; c]);
    ghost_batch_norm_backward(xv, &dy, &saved, Some(&g), Grads::new(&mut dx, &mut dg, &mut db)).unwrap();
    let per_example = x.len() / shape[0];
    let mut sums: Option<GradSums> = None;
    for (k, (first, examples)) in group_examples(shape[0], v).into_iter().enumerate() {
        let r = first * per_example..(first + examples) * per_example;
        let mut sub = shape.to_vec();
        sub[0] = examples;
        let what = format!("{layout} {shape:?} v={v} group {k}");
        let sv = View::new(&x[r.clone()], &sub, layout);
        let (yk, _, saved_k) = train(sv, Affine::new(&g, &b), 1e-5);
        assert_bits(&format!("{what} y"), &y[r.clone()], &yk);
        assert_eq!(saved.groups[k], saved_k, "{what}");
        let mut dxk = vec![0.0f32; r.len()];
        batch_norm_backward(sv, &dy[r.clone()], &saved_k, Some(&g), Grads::dx(&mut dxk)).unwrap();
        assert_bits(&format!("{what} dx"), &dx[r.clone()], &dxk);
        let part = grad_sums(sv, &dy[r], &saved_k).unwrap();
        match &mut sums {
            None => sums = Some(part),
            Some(s) => s.add(&part).unwrap(),
        }
    }
    let (mut dg_e, mut db_e) = (vec![0.0f32; c], vec![0.0f32; c]);
    sums.unwrap()
        .write_param_grads(Some(&mut dg_e), Some(&mut db_e))
        .unwrap();
    assert_bits(&format!("{layout} {shape:?} dgamma"), &dg, &dg_e);
    assert_bits(&format!("{layout} {shape:?} dbeta"), &db, &db_e);
    // And not the whole batch's normalization.
    let mut y_whole = vec![0.0f32; x.len()];
    batch_norm_train(xv, Affine::new(&g, &b), 1e-5, &mut y_whole).unwrap();
    assert!(y.iter().zip(&y_whole).any(|(a, b)| (a - b).abs() > 1e-3));
}

/// `forward_train_into` is `forward_train` writing into the caller's `SavedStats`: the same y,
/// statistics and layer state whatever `saved` held before (another layer's, a larger batch's,
/// empty vectors), for a ghost layer (rows plan, channels-first) and a plain one; on error
/// `saved`, y and the layer are unchanged.
#[test]
fn forward_train_into_refills_saved_statistics() {
    for (layout, shape, v) in [
        (Layout::NC, vec![40, 24], Some(16)),
        (Layout::NCHW, vec![9, 16, 3, 5], Some(4)),
        (Layout::NCHW, vec![9, 16, 3, 5], None),
    ] {
        let d = Data::new::<f32>(layout, &shape, 1200);
        let (x, ..) = d.narrowed::<f32>();
        let xv = View::new(&x, &shape, layout);
        let mut bn = ghost_layer::<f32>(&d, 1e-5, true, v.unwrap_or(2));
        bn.config.virtual_batch = v;
        let mut twin = bn.clone();
        let (mut y, mut y_into) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
        let big = SavedStats {
            count: 7,
            mean: vec![1.5; 10_000],
            inv_std: vec![2.5; 3],
        };
        let empty = SavedStats {
            count: 0,
            mean: Vec::new(),
            inv_std: Vec::new(),
        };
        for mut saved in [big, empty] {
            let expected = bn.forward_train(xv, &mut y).unwrap();
            twin.forward_train_into(xv, &mut y_into, &mut saved).unwrap();
            let what = format!("{layout} {shape:?} v={v:?}");
            assert_eq!(saved, expected, "{what}");
            assert_bits(&format!("{what} y"), &y_into, &y);
            assert_eq!(twin, bn, "{what}: layer state");
        }
        // On error (a y of the wrong length) nothing changes.
        let before = (twin.clone(), y_into.clone());
        let mut saved = bn.forward_train(xv, &mut y).unwrap();
        let kept = saved.clone();
        let err = twin.forward_train_into(xv, &mut y_into[1..], &mut saved);
        assert!(matches!(err, Err(Error::BufferLength { name: "y", .. })), "{err:?}");
        assert_eq!(saved, kept);
        assert_eq!((twin, y_into), before);
    }
}
