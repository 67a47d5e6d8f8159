//! Backward transforms: against the f64 reference (the paper's chain rule term by term, Section 3)
//! over random shapes and layouts, against central finite differences of the kernels' own
//! forward, and the split phases (`grad_sums` + `input_grad`). Tolerances: see `common/mod.rs`
//! and the finite-difference section below.

use crate::common::*;
use batchnorm::{
    batch_norm_backward, batch_norm_backward_eval, batch_norm_eval, batch_norm_train, grad_sums, reference, Affine,
    FixedStats, Grads, Layout, SmallBatch, View,
};
use proptest::prelude::*;

/// Training backward (Section 3): ∂ℓ/∂x̂ᵢ = ∂ℓ/∂yᵢ·γ; ∂ℓ/∂σ²_B = Σ∂ℓ/∂x̂ᵢ(xᵢ − μ_B)(−½)(σ²_B + ε)^(−3/2);
/// ∂ℓ/∂μ_B = Σ∂ℓ/∂x̂ᵢ(−1/√(σ²_B + ε)) + ∂ℓ/∂σ²_B·Σ−2(xᵢ − μ_B)/m;
/// ∂ℓ/∂xᵢ = ∂ℓ/∂x̂ᵢ/√(σ²_B + ε) + ∂ℓ/∂σ²_B·2(xᵢ − μ_B)/m + ∂ℓ/∂μ_B/m; ∂ℓ/∂γ = Σ∂ℓ/∂yᵢ·x̂ᵢ; ∂ℓ/∂β = Σ∂ℓ/∂yᵢ.
/// Also: skipping dx gives the same dγ, dβ bits; skipping dγ/dβ gives the same dx bits; the
/// split phases with one shard give the same bits; the layer gives the same bits.
pub(super) fn check_backward<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64, affine: bool, eps: f64) {
    let d = Data::new::<T>(layout, shape, seed);
    let (gamma, beta) = d.affine(affine);
    let (gt, bt) = (narrow::<T>(&gamma), narrow::<T>(&beta));
    let (x, dy) = (narrow::<T>(&d.x), narrow::<T>(&d.dy));
    let c = d.g.channels;
    let (_, _, saved) = train(View::new(&x, shape, layout), affine_if(affine, &gt, &bt), eps);

    let nan = T::from_f64(f64::NAN);
    let (dx, dg, db) = backward_all(View::new(&x, shape, layout), &dy, &saved, opt(&gt, affine));

    let (rdx, rdg, rdb) = reference::backward_train(&d.g, &d.x, &d.dy, &gamma, eps);
    let (sdx, sdg, sdb) = backward_scales(&d, &d.dy, &gamma, eps);
    let rel = reduce_rel::<T>(d.g.per_channel());
    let what = format!("{layout} {shape:?} affine={affine} eps={eps}");
    assert_close(&format!("{what} dx"), &dx, &rdx, &sdx, rel);
    assert_close(&format!("{what} dgamma"), &dg, &rdg, &sdg, rel);
    assert_close(&format!("{what} dbeta"), &db, &rdb, &sdb, rel);

    // dx skipped (one pass, same sums), dγ and dβ skipped, only one of dγ/dβ: the same bits.
    assert_output_subsets(&what, (&dx, &dg, &db), |grads| {
        batch_norm_backward(View::new(&x, shape, layout), &dy, &saved, opt(&gt, affine), grads).unwrap();
    });

    // Split phases, one worker: same bits as the fused function.
    let sums = grad_sums(View::new(&x, shape, layout), &dy, &saved).unwrap();
    let dx3 = split_input_grad(&sums, View::new(&x, shape, layout), &dy, &saved, opt(&gt, affine));
    assert_bits(&format!("{what} input_grad"), &dx3, &dx);
    let (mut dg4, mut db4) = (vec![nan; c], vec![nan; c]);
    sums.write_param_grads(Some(&mut dg4), Some(&mut db4)).unwrap();
    assert_bits(&format!("{what} grad_sums dgamma"), &dg4, &dg);
    assert_bits(&format!("{what} grad_sums dbeta"), &db4, &db);

    // The layer (γ from the layer; parameter gradients only with affine).
    let bn = layer_with::<T>(&d, eps, affine, SmallBatch::Error);
    let (dx5, dg5, db5) = layer_backward_all(&bn, View::new(&x, shape, layout), &dy, &saved);
    assert_bits(&format!("{what} layer dx"), &dx5, &dx);
    if affine {
        assert_bits(&format!("{what} layer dgamma"), &dg5, &dg);
        assert_bits(&format!("{what} layer dbeta"), &db5, &db);
    } else {
        assert!(
            dg5.iter().chain(&db5).all(|v| v.to_f64().is_nan()),
            "no parameter gradients without affine"
        );
    }
}

/// Inference-mode backward (statistics are constants): ∂ℓ/∂xᵢ = ∂ℓ/∂yᵢ·γ/√(Var + ε),
/// ∂ℓ/∂γ = Σ∂ℓ/∂yᵢ·x̂ᵢ, ∂ℓ/∂β = Σ∂ℓ/∂yᵢ with x̂ from the given statistics.
pub(super) fn check_backward_eval<T: PlainFloat>(layout: Layout, shape: &[usize], seed: u64, affine: bool, eps: f64) {
    let d = Data::new::<T>(layout, shape, seed);
    let (gamma, _) = d.affine(affine);
    let gt = narrow::<T>(&gamma);
    let (x, dy) = (narrow::<T>(&d.x), narrow::<T>(&d.dy));
    let (mean, var) = (narrow::<T>(&d.mean), narrow::<T>(&d.var));
    let (n, c) = (x.len(), d.g.channels);
    let nan = T::from_f64(f64::NAN);
    let backward_eval = |grads: Grads<'_, T>| {
        let stats = FixedStats::new(&mean, &var);
        batch_norm_backward_eval(View::new(&x, shape, layout), &dy, stats, opt(&gt, affine), eps, grads).unwrap();
    };
    let (mut dx, mut dg, mut db) = (vec![nan; n], vec![nan; c], vec![nan; c]);
    backward_eval(Grads::new(&mut dx, &mut dg, &mut db));
    let (rdx, rdg, rdb) = reference::backward_eval(&d.g, &d.x, &d.dy, &d.mean, &d.var, &gamma, eps);
    let s: Vec<f64> = d.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let sdx: Vec<f64> = (0..n)
        .map(|k| (d.dy[k] * gamma[channel_of(&d.g, k)]).abs() * s[channel_of(&d.g, k)])
        .collect();
    let sdg = eval_dgamma_scale(&d, &d.dy, eps);
    let mut sdb = vec![0.0; c];
    for k in 0..n {
        sdb[channel_of(&d.g, k)] += d.dy[k].abs();
    }
    let what = format!("eval {layout} {shape:?} affine={affine}");
    let rel = reduce_rel::<T>(d.g.per_channel());
    assert_close(&format!("{what} dx"), &dx, &rdx, &sdx, elementwise_rel::<T>());
    assert_close(&format!("{what} dgamma"), &dg, &rdg, &sdg, rel);
    assert_close(&format!("{what} dbeta"), &db, &rdb, &sdb, rel);

    assert_output_subsets(&what, (&dx, &dg, &db), backward_eval);

    // The layer's inference backward uses its running statistics.
    let bn = layer_with::<T>(&d, eps, affine, SmallBatch::Error);
    let (mut dx3, mut dg3, mut db3) = (vec![nan; n], vec![nan; c], vec![nan; c]);
    bn.backward_eval(
        View::new(&x, shape, layout),
        &dy,
        Grads::new(&mut dx3, &mut dg3, &mut db3),
    )
    .unwrap();
    assert_bits(&format!("{what} layer dx"), &dx3, &dx);
    if affine {
        assert_bits(&format!("{what} layer dgamma"), &dg3, &dg);
        assert_bits(&format!("{what} layer dbeta"), &db3, &db);
    }
}

shape_proptests! { 96;
    backward_matches_reference_f64 => check_backward for f64;
    backward_matches_reference_f32 => check_backward for f32;
    backward_eval_matches_reference => check_backward_eval for f64, f32;
}

// Central finite differences (f64): `common`'s `for_each_fd_case` and `assert_fd_grads` (its
// comment gives the error budget of the estimate and the tolerance).

/// Training backward (Section 3's chain rule) against ∂ℓ/∂x, ∂ℓ/∂γ, ∂ℓ/∂β by central differences
/// of Algorithm 1's forward.
#[test]
fn train_backward_matches_finite_differences() {
    for_each_fd_case(300, |layout, shape, affine, d| {
        let (gamma, beta) = d.affine(affine);
        let w = &d.dy;
        let forward = |x: &[f64], g: &[f64], b: &[f64]| {
            loss_of(w, |y| {
                batch_norm_train(View::new(x, shape, layout), affine_if(affine, g, b), FD_EPS, y).unwrap();
            })
        };
        let (_, _, saved) = train(View::new(&d.x, shape, layout), affine_if(affine, &gamma, &beta), FD_EPS);
        let (dx, dg, db) = backward_all(View::new(&d.x, shape, layout), w, &saved, opt(&gamma, affine));
        // γ and β enter linearly; their finite difference is taken with affine on, around the
        // same γ, β the forward used (1 and 0 without affine).
        let fwd_affine = |g: &[f64], b: &[f64]| {
            loss_of(w, |y| {
                batch_norm_train(View::new(&d.x, shape, layout), Affine::new(g, b), FD_EPS, y).unwrap();
            })
        };
        let what = format!("{layout} {shape:?} affine={affine}");
        assert_fd_grads(&what, &d.x, &gamma, &beta, (&dx, &dg, &db), forward, fwd_affine);
    });
}

/// Inference-mode backward against central differences of the inference transform (statistics
/// held fixed).
#[test]
fn eval_backward_matches_finite_differences() {
    for_each_fd_case(400, |layout, shape, affine, d| {
        let (gamma, beta) = d.affine(affine);
        let w = &d.dy;
        let stats = FixedStats::new(&d.mean, &d.var);
        let forward = |x: &[f64], g: &[f64], b: &[f64]| {
            loss_of(w, |y| {
                batch_norm_eval(View::new(x, shape, layout), stats, Affine::new(g, b), FD_EPS, y).unwrap();
            })
        };
        let (dx, dg, db) = grads_of(d.x.len(), d.g.channels, |grads| {
            let x = View::new(&d.x, shape, layout);
            batch_norm_backward_eval(x, w, stats, opt(&gamma, affine), FD_EPS, grads).unwrap();
        });
        let what = format!("eval {layout} {shape:?} affine={affine}");
        let fwd_params = |g: &[f64], b: &[f64]| forward(&d.x, g, b);
        assert_fd_grads(&what, &d.x, &gamma, &beta, (&dx, &dg, &db), forward, fwd_params);
    });
}

/// The inference backward in one pass (dx = dy·γ/√(Var + ε) with ∂ℓ/∂γ = Σ∂ℓ/∂yᵢ·x̂ᵢ and
/// ∂ℓ/∂β = Σ∂ℓ/∂yᵢ) against its passes taken alone (dx alone; dγ and dβ without dx), bit for
/// bit, on 1, 2 and 3 threads, on shapes whose channels-first walk cuts the tensor every way:
/// rows of planes over several runs of channels, planes longer than a piece, blocks of planes of
/// fewer than 16 channels; and the rows plan in blocks of either size, and in its one loop
/// (dx written in the sums' loop: 40, 256, 64 and 1032 channels). Each element of dx and
/// each sum is one fixed computation, however the pass is cut and whoever computes it.
#[test]
fn backward_eval_one_pass_same_bits_on_any_thread_count() {
    let shapes = [
        // rows of 8 planes of 1000 elements, 40 channels in 2 runs of 20.
        (Layout::NCHW, vec![20, 40, 25, 40]),
        // planes of 10000 elements, longer than a piece.
        (Layout::NCHW, vec![2, 20, 100, 100]),
        // 6 channels: blocks of planes.
        (Layout::NCHW, vec![30, 6, 33, 33]),
        // the rows plan.
        (Layout::NHWC, vec![8, 30, 30, 40]),
        // the rows plan with dx streamed (16 MiB of f32 or more) and rows too short for the
        // rows prefetch (60 channels): blocks of 8 rows, a task's 4369 ending in a block of one.
        (Layout::NHWC, vec![70, 32, 32, 60]),
        // the rows plan with dx streamed because x, dy and dx overflow the last-level cache
        // (11 MiB of f32 each) and rows long enough for the rows prefetch (256 channels): blocks
        // of 64 rows, the last task's 16 rows a block of its own.
        (Layout::NHWC, vec![47, 16, 15, 256]),
        // the rows plan's one loop (channels a multiple of 8, at most 256: dx written in the
        // sums' loop) with dx streamed (16 MiB of f32 or more), the last task's 1024 rows short.
        (Layout::NHWC, vec![65, 32, 32, 64]),
        // the rows plan's one loop over rows wider than a tile of the sums (1032 channels, the
        // whole row one tile): tasks of 254 rows (a last group of 2), the last task's 46.
        (Layout::NC, vec![300, 1032]),
    ];
    for ((layout, shape), seed) in shapes.into_iter().zip(3000..) {
        let d = Data::new::<f32>(layout, &shape, seed);
        let (gamma, _) = d.affine(true);
        let (x, dy, g) = (narrow::<f32>(&d.x), narrow::<f32>(&d.dy), narrow::<f32>(&gamma));
        let (mean, var) = (narrow::<f32>(&d.mean), narrow::<f32>(&d.var));
        let (n, c) = (x.len(), d.g.channels);
        let backward_eval = |grads: Grads<'_, f32>| {
            let stats = FixedStats::new(&mean, &var);
            batch_norm_backward_eval(View::new(&x, &shape, layout), &dy, stats, Some(&g), 1e-5, grads).unwrap();
        };
        let runs: Vec<_> = [1usize, 2, 3]
            .into_iter()
            .map(|t| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
                pool.install(|| {
                    let (mut dx, mut dg, mut db) = (vec![f32::NAN; n], vec![f32::NAN; c], vec![f32::NAN; c]);
                    backward_eval(Grads::new(&mut dx, &mut dg, &mut db));
                    let what = format!("{layout} {shape:?} {t} threads");
                    assert_output_subsets(&what, (&dx, &dg, &db), backward_eval);
                    (dx, dg, db)
                })
            })
            .collect();
        for (t, (dx, dg, db)) in runs.iter().enumerate().skip(1) {
            let what = format!("{layout} {shape:?}: 1 vs {} threads", t + 1);
            assert_bits(&format!("{what} dx"), dx, &runs[0].0);
            assert_bits(&format!("{what} dgamma"), dg, &runs[0].1);
            assert_bits(&format!("{what} dbeta"), db, &runs[0].2);
        }
    }
}
