//! Synchronized batch renormalization (`BatchRenorm::forward_train_sync` / `backward_sync`) over
//! the in-process communicator: P = 2 and 3 ranks holding uneven shards of a batch give what one
//! process gives on the whole batch (outputs, gradients, moving statistics); one rank gives its
//! bits; with r_max = 1 and d_max = 0 it is synchronized plain batch norm, bit for bit.
//!
//! # Tolerance
//!
//! As in `sync.rs`: the synchronized and the one-process layers compute the same quantities in
//! f64, summing in different orders, each within `common`'s tolerance of the exact value, so
//! they differ by at most twice it (`assert_near`). The scales are those of the renorm tests
//! against the reference (`variants.rs`): y = γ·r·x̂₀ + (γ·d + β) has plain batch norm's scale
//! with γ·r, plus |γ|·(|d| + (mean|x| + |μ|)/σ) for d and the error of μ_B inside it; dx is plain
//! batch norm's with γ·r; dγ = r·Σ dy·x̂₀ + d·Σ dy; the moving mean |μ| + mean|x|, the moving σ
//! σ + σ_B. A formula error (local instead of global statistics or sums, a local count, r or d
//! from a shard) is orders of magnitude larger, as `sync.rs` checks for plain batch norm.

use crate::common::*;
use batchnorm::{
    BatchRenorm, BatchRenormConfig, Communicator, Error, GradSums, Grads, Layout, RenormClip, RenormSaved,
    RenormSchedule, SingleProcess, SyncBatchNorm, View,
};

const EPS: f64 = 1e-5;

/// The limits of the tests: tight enough that r and d clip in some channels and not in others.
fn clip() -> RenormClip {
    RenormClip::new(1.5, 0.5).unwrap()
}

/// The moving statistics the layers start from: the data's inference mean, σ = 0.7·√var.
fn moving(d: &Data) -> (Vec<f64>, Vec<f64>) {
    (d.mean.clone(), d.var.iter().map(|v| 0.7 * v.sqrt()).collect())
}

/// A renorm layer with the data's γ, β and moving statistics, limits `clip`, α = 0.2.
fn layer<T: PlainFloat>(d: &Data, clip: RenormClip) -> BatchRenorm<T> {
    let config = BatchRenormConfig {
        eps: EPS,
        momentum: 0.2,
        limits: RenormSchedule::constant(clip),
        affine: true,
    };
    let mut bn = BatchRenorm::<T>::new(d.g.channels, config).unwrap();
    let (mm, ms) = moving(d);
    (bn.gamma, bn.beta) = (narrow(&d.gamma), narrow(&d.beta));
    (bn.moving_mean, bn.moving_std) = (narrow(&mm), narrow(&ms));
    bn
}

/// What one rank (or one process) produced in one training step.
#[derive(Debug, Clone)]
struct Step<T: PlainFloat> {
    out: Outputs<T>,
    bn: BatchRenorm<T>,
    saved: RenormSaved,
    /// This rank's own sums (`backward_sync`'s result); the whole batch's for one process, the
    /// ranks' added in rank order for [`sharded`].
    local: GradSums,
}

/// One training step of `bn` on an input of `len` elements: `forward` (one process or
/// synchronized) into y, then `backward` into dx, dγ, dβ, which returns the sums behind dγ and
/// dβ (`None`: the step's own dγ and dβ, one process).
fn train_step<T: PlainFloat>(
    mut bn: BatchRenorm<T>,
    len: usize,
    forward: impl FnOnce(&mut BatchRenorm<T>, &mut [T]) -> Result<RenormSaved, Error>,
    backward: impl FnOnce(&BatchRenorm<T>, &RenormSaved, Grads<'_, T>) -> Result<Option<GradSums>, Error>,
) -> Result<Step<T>, Error> {
    let mut y = vec![T::default(); len];
    let saved = forward(&mut bn, &mut y)?;
    let (mut dx, mut dgamma, mut dbeta) = (y.clone(), bn.gamma.clone(), bn.beta.clone());
    let local = backward(&bn, &saved, Grads::new(&mut dx, &mut dgamma, &mut dbeta))?;
    let local = local.unwrap_or_else(|| GradSums {
        sum_dy: wide(&dbeta),
        sum_dy_xhat: wide(&dgamma),
    });
    Ok(Step {
        out: Outputs { y, dx, dgamma, dbeta },
        bn,
        saved,
        local,
    })
}

/// One training step of the one-process layer on the whole batch.
fn one_process<T: PlainFloat>(d: &Data, layout: Layout, shape: &[usize], clip: RenormClip) -> Step<T> {
    let (x, dy): (Vec<T>, Vec<T>) = (narrow(&d.x), narrow(&d.dy));
    let xv = View::new(&x, shape, layout);
    let forward = |bn: &mut BatchRenorm<T>, y: &mut [T]| bn.forward_train(xv, y);
    let backward = |bn: &BatchRenorm<T>, saved: &RenormSaved, grads: Grads<'_, T>| {
        bn.backward(xv, &dy, saved, grads).map(|()| None)
    };
    train_step(layer::<T>(d, clip), x.len(), forward, backward).unwrap()
}

/// One synchronized training step on this rank's shard (examples `start..start + n`).
fn one_rank<T: PlainFloat>(
    comm: &dyn Communicator,
    d: &Data,
    (layout, shape): (Layout, &[usize]),
    (start, n): (usize, usize),
    clip: RenormClip,
) -> Result<Step<T>, Error> {
    let (shard, shard_shape) = d.examples(layout, shape, start, n);
    let (x, dy): (Vec<T>, Vec<T>) = (narrow(&shard.x), narrow(&shard.dy));
    let xv = View::new(&x, &shard_shape, layout);
    let forward = |bn: &mut BatchRenorm<T>, y: &mut [T]| bn.forward_train_sync(comm, xv, y);
    let backward = |bn: &BatchRenorm<T>, saved: &RenormSaved, grads: Grads<'_, T>| {
        bn.backward_sync(comm, xv, &dy, saved, grads).map(Some)
    };
    train_step(layer::<T>(d, clip), x.len(), forward, backward)
}

/// The synchronized step over `sizes` shards, y and dx concatenated back into whole-batch
/// buffers, the ranks' own sums added. Checks that every rank holds the same bits of dγ, dβ,
/// the moving statistics, the step count, r and d, and that the ranks' shares of dβ = Σ dy add
/// up to it (in rank order, as the global sum is taken).
fn sharded<T: PlainFloat>(d: &Data, layout: Layout, shape: &[usize], sizes: &[usize], clip: RenormClip) -> Step<T> {
    let starts = shard_starts(sizes);
    let ranks = on_threads(sizes.len(), |c| {
        let r = c.rank();
        one_rank::<T>(c, d, (layout, shape), (starts[r], sizes[r]), clip).unwrap()
    });
    let first = &ranks[0];
    for r in &ranks[1..] {
        assert_bits("moving_mean across ranks", &r.bn.moving_mean, &first.bn.moving_mean);
        assert_bits("moving_std across ranks", &r.bn.moving_std, &first.bn.moving_std);
        assert_bits64("r across ranks", &r.saved.r, &first.saved.r);
        assert_bits64("d across ranks", &r.saved.d, &first.saved.d);
        assert_eq!(r.bn.steps, first.bn.steps);
    }
    let mut total = first.local.clone();
    for r in &ranks[1..] {
        total.add(&r.local).unwrap();
    }
    let out = Outputs::gather(ranks.iter().map(|r| &r.out));
    assert_bits("rank shares of dbeta", &out.dbeta, &narrow::<T>(&total.sum_dy));
    Step {
        out,
        local: total,
        ..first.clone()
    }
}

/// Tolerance scales of one renorm training step on `d` (see the module docs): y, dx per element;
/// dγ, dβ, moving mean, moving σ per channel.
struct Scales {
    y: Vec<f64>,
    dx: Vec<f64>,
    dgamma: Vec<f64>,
    dbeta: Vec<f64>,
    moving_mean: Vec<f64>,
    moving_std: Vec<f64>,
}

fn scales(d: &Data, clip: RenormClip) -> Scales {
    let (mm, ms) = moving(d);
    let c = d.g.channels;
    let (_, mean_b, sigma_b, r, dd) = batchnorm::reference::renorm_forward_train(
        &d.g,
        &d.x,
        &mm,
        &ms,
        &d.gamma,
        &d.beta,
        EPS,
        clip.r_max(),
        clip.d_max(),
    );
    let mabs = d.mean_abs_x();
    let gamma_r: Vec<f64> = (0..c).map(|k| d.gamma[k] * r[k]).collect();
    let var_b: Vec<f64> = sigma_b.iter().map(|s| s * s - EPS).collect();
    let d_err: Vec<f64> = (0..c).map(|k| (mabs[k] + mm[k].abs()) / ms[k]).collect();
    let plain_y = train_y_scale(d, &gamma_r, &d.beta, &mean_b, &var_b, EPS);
    let y = (0..d.x.len())
        .map(|k| {
            let ch = channel_of(&d.g, k);
            plain_y[k] + d.gamma[ch].abs() * (dd[ch].abs() + d_err[ch])
        })
        .collect();
    let (dx, dgamma0, dbeta) = backward_scales(d, &d.dy, &gamma_r, EPS);
    Scales {
        y,
        dx,
        dgamma: (0..c).map(|k| r[k] * dgamma0[k] + dd[k].abs() * dbeta[k]).collect(),
        dbeta,
        moving_mean: (0..c).map(|k| mm[k].abs() + mabs[k]).collect(),
        moving_std: (0..c).map(|k| ms[k] + sigma_b[k]).collect(),
    }
}

fn check_equal_to_one_process<T: PlainFloat>(p: usize) {
    let mut clipped = std::collections::BTreeMap::new();
    for (i, (layout, shape)) in shard_shapes().into_iter().enumerate() {
        let d = Data::new::<T>(layout, &shape, 1200 + i as u64);
        let sizes = shard_sizes(shape[0], p);
        let want = one_process::<T>(&d, layout, &shape, clip());
        let got = sharded::<T>(&d, layout, &shape, &sizes, clip());
        let rel = reduce_rel::<T>(d.g.per_channel());
        let s = scales(&d, clip());
        let what = |name: &str| format!("renorm {layout} {shape:?} P={p} {name}");
        got.out
            .assert_near(&want.out, [&s.y, &s.dx, &s.dgamma, &s.dbeta], rel, what);
        // The ranks' shares r·Σ dy·x̂₀ + d·Σ dy of dγ add up to it (r, d the same on every rank).
        let shares = narrow::<T>(&got.local.sum_dy_xhat);
        assert_near(
            &what("rank shares of dgamma"),
            &shares,
            &want.out.dgamma,
            &s.dgamma,
            rel,
        );
        let (bn, one) = (&got.bn, &want.bn);
        assert_near(
            &what("moving_mean"),
            &bn.moving_mean,
            &one.moving_mean,
            &s.moving_mean,
            rel,
        );
        assert_near(&what("moving_std"), &bn.moving_std, &one.moving_std, &s.moving_std, rel);
        assert_eq!((bn.steps, one.steps), (1, 1), "{}", what("steps"));
        for c in 0..d.g.channels {
            let (r, dd) = (want.saved.r[c], want.saved.d[c]);
            let at_limit = r == 1.5 || r == 1.0 / 1.5 || dd.abs() == 0.5;
            *clipped.entry(at_limit).or_insert(0) += 1;
        }
    }
    // The limits bind in some channels and not in others: both branches of the clipping ran.
    assert!(clipped.len() == 2, "clipped channels: {clipped:?}");
}

#[test]
fn renorm_two_and_three_ranks_equal_one_process() {
    for p in [2, 3] {
        check_equal_to_one_process::<f64>(p);
        check_equal_to_one_process::<f32>(p);
    }
}

/// One rank (SingleProcess, or a group of one thread) computes the one-process layer's bits:
/// y, r, d, the statistics, dx, dγ, dβ, the moving statistics and the step count.
fn check_single_rank_bits<T: PlainFloat>() {
    for (i, (layout, shape)) in shard_shapes().into_iter().chain(chunking_shapes()).enumerate() {
        let d = Data::new::<T>(layout, &shape, 1300 + i as u64);
        let want = one_process::<T>(&d, layout, &shape, clip());
        let n = shape[0];
        for got in on_one_rank(|c| one_rank::<T>(c, &d, (layout, &shape), (0, n), clip()).unwrap()) {
            let what = |s: &str| format!("renorm {layout} {shape:?} P=1 {s}");
            got.out.assert_bits(&want.out, what);
            assert_eq!(got.saved, want.saved, "{}", what("saved"));
            assert_eq!(got.bn, want.bn, "{}", what("layer state"));
        }
    }
}

#[test]
fn renorm_single_rank_is_bitwise_the_one_process_layer() {
    check_single_rank_bits::<f64>();
    check_single_rank_bits::<f32>();
}

/// With r_max = 1 and d_max = 0 (r = 1, d = 0), synchronized batch renorm is synchronized plain
/// batch norm: y, dx, dγ and dβ with the same bits on every rank, over 2 and 3 ranks (the same
/// global statistics and sums, and γ·1, γ·0 + β, 1·Σ dy·x̂ + 0·Σ dy are exact).
#[test]
fn renorm_with_identity_limits_is_synchronized_plain_batch_norm() {
    for p in [2, 3] {
        for (i, (layout, shape)) in shard_shapes().into_iter().enumerate() {
            let d = Data::new::<f32>(layout, &shape, 1400 + i as u64);
            let sizes = shard_sizes(shape[0], p);
            let starts = shard_starts(&sizes);
            let renorm = sharded::<f32>(&d, layout, &shape, &sizes, RenormClip::identity());
            let plain = on_threads(p, |c| {
                let r = c.rank();
                let (shard, shard_shape) = d.examples(layout, &shape, starts[r], sizes[r]);
                let (x, dy) = (narrow::<f32>(&shard.x), narrow::<f32>(&shard.dy));
                let mut bn = SyncBatchNorm::<f32>::new(d.g.channels, Default::default()).unwrap();
                (bn.bn.gamma, bn.bn.beta) = (narrow(&d.gamma), narrow(&d.beta));
                let mut y = vec![0.0f32; x.len()];
                let saved = bn
                    .forward_train(c, View::new(&x, &shard_shape, layout), &mut y)
                    .unwrap();
                let (mut dx, mut dgamma, mut dbeta) = (vec![0.0f32; x.len()], bn.bn.gamma.clone(), bn.bn.beta.clone());
                let grads = Grads::new(&mut dx, &mut dgamma, &mut dbeta);
                bn.backward(c, View::new(&x, &shard_shape, layout), &dy, &saved, grads)
                    .unwrap();
                Outputs { y, dx, dgamma, dbeta }
            });
            let what = |s: &str| format!("identity renorm {layout} {shape:?} P={p} {s}");
            assert!(renorm.saved.r.iter().all(|&r| r == 1.0) && renorm.saved.d.iter().all(|&d| d == 0.0));
            renorm.out.assert_bits(&Outputs::gather(&plain), what);
        }
    }
}

/// The global count decides: shards of one example each train when the global batch has two;
/// one example in all is `Error::TooFewValues` with the global count, and the layer and y are
/// unchanged.
#[test]
fn renorm_sync_global_count_decides_too_few_values() {
    let d = Data::new::<f64>(Layout::NC, &[2, 3], 5);
    let ranks = on_threads(2, |c| {
        one_rank::<f64>(c, &d, (Layout::NC, &[2, 3]), (c.rank(), 1), clip())
    });
    assert!(ranks.iter().all(|r| r.is_ok()), "{ranks:?}");
    let mut bn = layer::<f64>(&d, clip());
    let before = bn.clone();
    let mut y = [f64::NAN; 3];
    let err = bn
        .forward_train_sync(&SingleProcess, View::new(&d.x[..3], &[1, 3], Layout::NC), &mut y)
        .unwrap_err();
    assert_eq!(
        err,
        Error::TooFewValues {
            count: 1,
            shape: vec![1, 3]
        }
    );
    assert_eq!(bn, before);
    assert!(y.iter().all(|v| v.is_nan()), "y untouched on error");
}

/// What the synchronized passes reject before communicating (a single process suffices) and
/// after: each error leaves y, dx and the layer as they were.
#[test]
fn renorm_sync_errors() {
    let (shape, layout) = ([4usize, 2], Layout::NC);
    let d = Data::new::<f64>(layout, &shape, 9);
    let xv = View::new(&d.x, &shape, layout);
    let fresh = layer::<f64>(&d, clip());
    let feature = |name, expected, actual| Error::FeatureMismatch { name, expected, actual };
    let buffer = |name, expected, actual| Error::BufferLength { name, expected, actual };
    let forward = |bn: &mut BatchRenorm<f64>, x: View<'_, f64>, y: &mut [f64]| {
        let before = bn.clone();
        let r = bn.forward_train_sync(&SingleProcess, x, y).map(drop);
        assert_eq!(*bn, before, "layer unchanged on error");
        assert!(y.iter().all(|v| v.is_nan()), "y untouched on error");
        r
    };
    let mut y = [f64::NAN; 8];
    let mut bn = fresh.clone();
    let wide = View::new(&d.x, &[2, 4], layout);
    assert_eq!(forward(&mut bn, wide, &mut y), Err(feature("input", 2, 4)));
    assert_eq!(forward(&mut bn, xv, &mut y[..7]), Err(buffer("y", 8, 7)));
    bn.config.momentum = 1.5;
    assert_eq!(forward(&mut bn, xv, &mut y), Err(Error::InvalidMomentum(1.5)));
    let mut bn = fresh.clone();
    bn.steps = u64::MAX;
    assert!(matches!(
        forward(&mut bn, xv, &mut y),
        Err(Error::InvalidRenormSchedule { .. })
    ));
    let mut bn = fresh.clone();
    bn.moving_std.pop();
    assert_eq!(forward(&mut bn, xv, &mut y), Err(feature("moving_std", 2, 1)));
    let mut bn = fresh.clone();
    bn.config.eps = 0.0;
    assert_eq!(forward(&mut bn, xv, &mut y), Err(Error::InvalidEps(0.0)));
    let short = View::new(&d.x[..7], &shape, layout);
    assert_eq!(forward(&mut fresh.clone(), short, &mut y), Err(buffer("x", 8, 7)));

    // Backward: saved statistics, r, d and buffers checked before anything is written.
    let mut bn = fresh.clone();
    let saved = bn.forward_train_sync(&SingleProcess, xv, &mut y).unwrap();
    let backward = |saved: &RenormSaved, dy: &[f64], dx_len: usize| {
        let (mut dx, mut dg, mut db) = (vec![f64::NAN; dx_len], [f64::NAN; 2], [f64::NAN; 2]);
        let grads = Grads::new(&mut dx, &mut dg, &mut db);
        let r = bn.backward_sync(&SingleProcess, xv, dy, saved, grads).map(drop);
        let untouched = dx.iter().chain(&dg).chain(&db).all(|v| v.is_nan());
        assert!(untouched, "outputs untouched on error");
        r
    };
    let mut bad = saved.clone();
    bad.r.pop();
    assert_eq!(backward(&bad, &d.dy, 8), Err(feature("saved.r", 2, 1)));
    let mut bad = saved.clone();
    bad.d.push(0.0);
    assert_eq!(backward(&bad, &d.dy, 8), Err(feature("saved.d", 2, 3)));
    let mut bad = saved.clone();
    bad.stats.count = 1;
    assert_eq!(
        backward(&bad, &d.dy, 8),
        Err(Error::TooFewValues {
            count: 1,
            shape: shape.to_vec()
        })
    );
    assert_eq!(backward(&saved, &d.dy[..7], 8), Err(buffer("dy", 8, 7)));
    assert_eq!(backward(&saved, &d.dy, 9), Err(buffer("dx", 8, 9)));
}

/// A rank that leaves fails the others' collectives instead of hanging them, and ranks that
/// disagree on the channel count get an error on every rank; neither changes the layer.
#[test]
fn renorm_sync_communication_failures() {
    let mut comms = batchnorm::ThreadComm::group(2).unwrap();
    drop(comms.pop());
    let d = Data::new::<f64>(Layout::NC, &[4, 3], 9);
    let err = one_rank::<f64>(&comms[0], &d, (Layout::NC, &[4, 3]), (0, 4), clip()).unwrap_err();
    assert!(matches!(err, Error::Communication { .. }), "{err:?}");
    let results = on_threads(2, |c| {
        let channels = 3 + c.rank();
        let d = Data::new::<f64>(Layout::NC, &[4, channels], 3);
        let mut bn = layer::<f64>(&d, clip());
        let before = bn.clone();
        let mut y = vec![0.0; 4 * channels];
        let r = bn.forward_train_sync(c, View::new(&d.x, &[4, channels], Layout::NC), &mut y);
        assert_eq!(bn, before);
        r
    });
    for r in results {
        assert!(matches!(r, Err(Error::Communication { .. })), "{r:?}");
    }
}
