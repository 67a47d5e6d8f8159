//! Synchronized batch norm over the in-process communicator: P = 2 and 3 ranks holding uneven
//! shards of a batch give what one process gives on the whole batch.
//!
//! # Tolerance
//!
//! The synchronized layer and the one-process layer compute the same quantities in f64 but sum
//! in a different order (per-shard partials merged with Chan's formula / added in rank order,
//! against the one-process kernel's cache-sized pieces). Each is within the tolerance of
//! `common` (`2·ε_T·|ref| + reduce_rel::<T>(m)·scale + tiny_T`, the bound the kernels are already held
//! to against the f64 reference) of the exact value, so they differ by at most twice that. For
//! f32 the dominant term is the single rounding to f32 (≈ 2 ulp); for f64 it is the reduction
//! error, ≈ 4·(m + 16)·2⁻⁵³ relative to the scale of the terms. A formula error (a local instead
//! of a global count, a biased running variance, a missing merge) is orders of magnitude larger:
//! `sharded_statistics_are_not_local` checks that the comparison would catch one.

// The shared helpers in `common` index several buffers in step.

use crate::common::{
    assert_bits, assert_near, backward_scales, layer_backward_all, narrow, on_one_rank, on_threads, reduce_rel,
    shard_shapes, shard_sizes, shard_starts, train_y_scale, wide, Data, Outputs, PlainFloat,
};
use batchnorm::{
    BatchNorm, BatchNormConfig, Communicator, Counted, Error, Grads, Layout, Momentum, SingleProcess, SyncBatchNorm,
    ThreadComm, View,
};

/// What one rank (or one process) produced in one training step.
#[derive(Debug, Clone)]
pub(crate) struct Step<T> {
    pub out: Outputs<T>,
    pub running_mean: Vec<T>,
    pub running_var: Vec<T>,
}

impl<T: PlainFloat> Step<T> {
    /// A step's y, dx, dγ and dβ, and the running statistics of the layer that took it.
    pub(crate) fn new(y: Vec<T>, dx: Vec<T>, dgamma: Vec<T>, dbeta: Vec<T>, bn: BatchNorm<T>) -> Self {
        Step {
            out: Outputs { y, dx, dgamma, dbeta },
            running_mean: bn.running_mean,
            running_var: bn.running_var,
        }
    }

    /// The whole batch's step from the ranks' (see [`Outputs::gather`]); also asserts that every
    /// rank holds the same bits of the running statistics.
    pub(crate) fn gather(ranks: &[Step<T>]) -> Self {
        for r in &ranks[1..] {
            assert_bits("running_mean across ranks", &r.running_mean, &ranks[0].running_mean);
            assert_bits("running_var across ranks", &r.running_var, &ranks[0].running_var);
        }
        Step {
            out: Outputs::gather(ranks.iter().map(|r| &r.out)),
            ..ranks[0].clone()
        }
    }

    /// [`assert_near`] of the running statistics against `want`'s: the mean at `mean_scale`, the
    /// variance at its own magnitude.
    pub(crate) fn assert_running_near(
        &self,
        want: &Step<T>,
        mean_scale: &[f64],
        rel: f64,
        what: impl Fn(&str) -> String,
    ) {
        assert_near(
            &what("running_mean"),
            &self.running_mean,
            &want.running_mean,
            mean_scale,
            rel,
        );
        let var_scale: Vec<f64> = wide(&want.running_var).iter().map(|v| v.abs()).collect();
        assert_near(
            &what("running_var"),
            &self.running_var,
            &want.running_var,
            &var_scale,
            rel,
        );
    }

    /// Asserts the bits of `want` in every output and running statistic (`what(name)` names it).
    pub(crate) fn assert_bits(&self, want: &Step<T>, what: impl Fn(&str) -> String) {
        self.out.assert_bits(&want.out, &what);
        assert_bits(&what("running_mean"), &self.running_mean, &want.running_mean);
        assert_bits(&what("running_var"), &self.running_var, &want.running_var);
    }
}

pub(crate) fn config() -> BatchNormConfig {
    BatchNormConfig {
        momentum: Momentum::Exponential(0.3),
        ..Default::default()
    }
}

/// One training step of the one-process layer on the whole batch.
fn one_process<T: PlainFloat>(d: &Data, layout: Layout, shape: &[usize]) -> Step<T> {
    let mut bn = BatchNorm::<T>::new(d.g.channels, config()).unwrap();
    bn.gamma = narrow(&d.gamma);
    bn.beta = narrow(&d.beta);
    let (x, dy): (Vec<T>, Vec<T>) = (narrow(&d.x), narrow(&d.dy));
    let mut y = vec![T::default(); x.len()];
    let saved = bn.forward_train(View::new(&x, shape, layout), &mut y).unwrap();
    let (dx, dg, db) = layer_backward_all(&bn, View::new(&x, shape, layout), &dy, &saved);
    Step::new(y, dx, dg, db, bn)
}

/// One training step of the synchronized layer on this rank's shard (rows `start..start + n`).
fn one_rank<T: PlainFloat>(
    comm: &dyn Communicator,
    d: &Data,
    layout: Layout,
    shape: &[usize],
    start: usize,
    n: usize,
) -> Result<Step<T>, Error> {
    let row = d.x.len() / shape[0];
    let mut local_shape = shape.to_vec();
    local_shape[0] = n;
    let x: Vec<T> = narrow(&d.x[start * row..(start + n) * row]);
    let dy: Vec<T> = narrow(&d.dy[start * row..(start + n) * row]);
    let mut bn = SyncBatchNorm::<T>::new(d.g.channels, config())?;
    bn.bn.gamma = narrow(&d.gamma);
    bn.bn.beta = narrow(&d.beta);
    let mut y = vec![T::default(); x.len()];
    let saved = bn.forward_train(comm, View::new(&x, &local_shape, layout), &mut y)?;
    let (mut dx, mut dg, mut db) = (y.clone(), bn.bn.gamma.clone(), bn.bn.beta.clone());
    bn.backward(
        comm,
        View::new(&x, &local_shape, layout),
        &dy,
        &saved,
        Grads::new(&mut dx, &mut dg, &mut db),
    )?;
    Ok(Step::new(y, dx, dg, db, bn.bn))
}

/// The synchronized step over `sizes` shards, concatenated back into whole-batch buffers; also
/// checks that every rank holds the same bits of dγ, dβ and running statistics.
fn sharded<T: PlainFloat>(d: &Data, layout: Layout, shape: &[usize], sizes: &[usize]) -> Step<T> {
    let starts = shard_starts(sizes);
    let ranks = on_threads(sizes.len(), |c| {
        let r = c.rank();
        one_rank::<T>(c, d, layout, shape, starts[r], sizes[r].max(1)).unwrap()
    });
    Step::gather(&ranks)
}

fn check_equal_to_one_process<T: PlainFloat>(p: usize) {
    for (i, (layout, shape)) in shard_shapes().into_iter().enumerate() {
        let d = Data::new::<T>(layout, &shape, 100 + i as u64);
        let sizes = shard_sizes(shape[0], p);
        assert_eq!(sizes.iter().sum::<usize>(), shape[0]);
        let want = one_process::<T>(&d, layout, &shape);
        let got = sharded::<T>(&d, layout, &shape, &sizes);
        let m = d.g.per_channel();
        let rel = reduce_rel::<T>(m);
        let (mean, var) = batchnorm::reference::mean_var(&d.g, &d.x);
        let eps = config().eps;
        let what = |s: &str| format!("{} {shape:?} P={p} {s}", layout.name());
        let y_scale = train_y_scale(&d, &d.gamma, &d.beta, &mean, &var, eps);
        let (dx_scale, dg_scale, db_scale) = backward_scales(&d, &d.dy, &d.gamma, eps);
        let scales = [&y_scale[..], &dx_scale, &dg_scale, &db_scale];
        got.out.assert_near(&want.out, scales, rel, what);
        got.assert_running_near(&want, &d.mean_abs_x(), rel, what);
    }
}

#[test]
fn two_ranks_equal_one_process() {
    check_equal_to_one_process::<f64>(2);
    check_equal_to_one_process::<f32>(2);
}

#[test]
fn three_ranks_equal_one_process() {
    check_equal_to_one_process::<f64>(3);
    check_equal_to_one_process::<f32>(3);
}

/// The tolerance is tight enough to catch per-shard statistics (what unsynchronized data-parallel
/// batch norm computes): the comparison above would fail on them.
#[test]
fn sharded_statistics_are_not_local() {
    let (layout, shape) = (Layout::NCHW, vec![6, 3, 2, 3]);
    let d = Data::new::<f64>(layout, &shape, 7);
    let want = one_process::<f64>(&d, layout, &shape);
    // Rank 1's shard alone, with its own statistics.
    let row = d.x.len() / 6;
    let mut local = d.clone();
    local.x = d.x[row..].to_vec();
    local.dy = d.dy[row..].to_vec();
    local.g = layout.geometry(&[5, 3, 2, 3]).unwrap();
    let alone = one_process::<f64>(&local, layout, &[5, 3, 2, 3]);
    let synced = sharded::<f64>(&d, layout, &shape, &[1, 5]);
    let worst = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(worst(&synced.out.y[row..], &want.out.y[row..]) < 1e-12);
    assert!(
        worst(&alone.out.y, &want.out.y[row..]) > 1e-3,
        "local statistics should differ visibly"
    );
}

/// One rank (the same code path, nothing to merge) gives exactly the one-process layer's bits.
fn check_single_rank_bits<T: PlainFloat>() {
    for (i, (layout, shape)) in shard_shapes().into_iter().enumerate() {
        let d = Data::new::<T>(layout, &shape, 200 + i as u64);
        let want = one_process::<T>(&d, layout, &shape);
        let n = shape[0];
        for got in on_one_rank(|c| one_rank::<T>(c, &d, layout, &shape, 0, n).unwrap()) {
            got.assert_bits(&want, |s| format!("{} {shape:?} P=1 {s}", layout.name()));
        }
    }
}

#[test]
fn single_rank_is_bitwise_the_one_process_layer() {
    check_single_rank_bits::<f64>();
    check_single_rank_bits::<f32>();
}

/// Shards of one example each are fine when the global batch has two; one example in all is the
/// one-process error, with the global count.
#[test]
fn global_count_decides_too_few_values() {
    let d = Data::new::<f64>(Layout::NC, &[2, 3], 5);
    let ranks = on_threads(2, |c| one_rank::<f64>(c, &d, Layout::NC, &[2, 3], c.rank(), 1));
    assert!(ranks.iter().all(|r| r.is_ok()), "{ranks:?}");
    let err = one_rank::<f64>(&SingleProcess, &d, Layout::NC, &[2, 3], 0, 1).unwrap_err();
    assert_eq!(
        err,
        Error::TooFewValues {
            count: 1,
            shape: vec![1, 3]
        }
    );
    let mut bn = BatchNorm::<f64>::new(3, config()).unwrap();
    let one = bn
        .forward_train(View::new(&d.x[..3], &[1, 3], Layout::NC), &mut [0.0; 3])
        .unwrap_err();
    assert_eq!(err, one, "the same error as the one-process rule");
}

/// A rank that leaves (its thread ends) fails the others' collectives instead of hanging them.
#[test]
fn a_departed_rank_fails_the_collective() {
    let mut comms = ThreadComm::group(2).unwrap();
    drop(comms.pop());
    let d = Data::new::<f64>(Layout::NC, &[4, 3], 9);
    let err = one_rank::<f64>(&comms[0], &d, Layout::NC, &[4, 3], 0, 4).unwrap_err();
    assert!(matches!(err, Error::Communication { .. }), "{err:?}");
}

/// Ranks that disagree on the channel count get an error, on every rank.
#[test]
fn channel_mismatch_across_ranks_is_an_error() {
    let results = on_threads(2, |c| {
        let channels = 3 + c.rank();
        let d = Data::new::<f64>(Layout::NC, &[4, channels], 3);
        one_rank::<f64>(c, &d, Layout::NC, &[4, channels], 0, 4)
    });
    for r in results {
        assert!(matches!(r, Err(Error::Communication { .. })), "{r:?}");
    }
}

/// All-reduce sums in rank order (the same bits everywhere), all-gather keeps rank order, and
/// the counting wrapper sees every call and byte.
#[test]
fn collectives_and_traffic() {
    let out = on_threads(3, |c| {
        let counted = Counted::new(c);
        let r = counted.rank() as f64;
        let mut g = vec![0.0; 6];
        counted.all_gather_f64(&[r, 10.0 + r], &mut g).unwrap();
        let mut s = vec![0.1 * (r + 1.0), 1e16, -1e16 * (r - 1.0)];
        counted.all_reduce_sum_f64(&mut s).unwrap();
        let mut s32 = vec![0.5f32 + r as f32];
        counted.all_reduce_sum_f32(&mut s32).unwrap();
        counted.barrier().unwrap();
        let bad = counted.all_gather_f64(&[1.0], &mut [0.0; 2]);
        (g, s, s32, counted.take(), bad)
    });
    for (g, s, s32, traffic, bad) in &out {
        assert_eq!(g, &[0.0, 10.0, 1.0, 11.0, 2.0, 12.0]);
        assert_eq!(s[0].to_bits(), ((0.1 + 0.2) + 0.30000000000000004f64).to_bits());
        assert_eq!(s[1], 3e16);
        assert_eq!(s[2], 1e16 + 0.0 - 1e16);
        assert_eq!(s32, &[4.5]);
        assert_eq!(traffic.calls, 5);
        assert_eq!(traffic.bytes_sent, (2 + 3) * 8 + 4 + 8);
        assert_eq!(traffic.bytes_received, (6 + 9) * 8 + 3 * 4 + 2 * 8);
        assert_eq!(
            *bad,
            Err(Error::BufferLength {
                name: "recv",
                expected: 3,
                actual: 2
            })
        );
    }
    assert!(ThreadComm::group(0).is_err());
}
