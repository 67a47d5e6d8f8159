//! The engine's batch-norm variants (`BnVariant`: plain, frozen, renorm): each against the kernel
//! crate's layer bit for bit, the frozen state against the caller's modes and checkpoints, renorm's
//! and masked batch norm's state through a checkpoint and a resumed run, Algorithm 2 per variant,
//! checkpoints of another variant or with other settings refused, and the `bnlab bench` rows of
//! each variant. Masked batch norm's passes are in `engine_masked`.

use std::sync::Arc;

use batchnorm::{
    batch_renorm_train, Affine, BatchNorm, BatchNormConfig, BatchRenorm, BatchRenormConfig, Grads, Layout,
    RenormSchedule, RenormStats, SingleProcess, SmallBatch, View,
};
use bnlab::bench::{self, Case, Clock, Dtype, Op};
use bnlab::engine::checkpoint::{architecture, Checkpoint, CheckpointError, CheckpointProgress};
use bnlab::engine::{
    BatchNormLayer, BnVariant, Layer, Linear, Mode, Param, PositionMask, Sequential, Sgd, Sigmoid, State, StateValue,
};

use crate::common::checkpoints::{edit_tensors, sgd_step};
use crate::common::{normal, rng, FUSED_OPS};

/// A renorm schedule that leaves (1, 0) after one step, so a few steps exercise r and d.
fn schedule() -> RenormSchedule {
    RenormSchedule::new(1, 3, 2, 3.0, 5.0).unwrap()
}

fn renorm() -> BnVariant {
    BnVariant::Renorm {
        momentum: 0.2,
        limits: schedule(),
    }
}

/// One training step of a lone layer through the `Layer` interface: y, dx, dγ, dβ.
pub(crate) type Step = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

pub(crate) fn engine_step(layer: &mut BatchNormLayer, x: &[f32], dy: &[f32], batch: usize) -> Step {
    let mut y = vec![0.0; x.len()];
    layer.forward(x, batch, &mut y, Mode::Train).unwrap();
    let mut dx = vec![0.0; x.len()];
    layer.backward(x, &y, dy, batch, Some(&mut dx)).unwrap();
    let grads: Vec<Vec<f32>> = layer.params().iter().map(|p| p.grad.to_vec()).collect();
    (y, dx, grads[0].clone(), grads[1].clone())
}

/// γ and β away from 1 and 0, the same in both layers.
pub(crate) fn params(channels: usize) -> (Vec<f32>, Vec<f32>) {
    let mut r = rng(5);
    (normal(&mut r, channels, 1.0, 0.3), normal(&mut r, channels, 0.2, 0.5))
}

/// Batches of `[batch, channels, spatial]` whose statistics move from step to step.
pub(crate) fn batch_data(step: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
    let mut r = rng(100 + step as u64);
    (
        normal(&mut r, len, 0.3 * step as f32, 1.0 + 0.4 * step as f32),
        normal(&mut r, len, 0.0, 1.0),
    )
}

pub(crate) const STEPS: usize = 6;

/// A kernel-crate layer, for comparison with the engine layer built on it.
pub(crate) trait KernelLayer {
    /// One training step driven by hand: y, dx, dγ, dβ.
    fn step(&mut self, x: View<'_, f32>, dy: &[f32]) -> Step;
    fn infer(&self, x: View<'_, f32>, y: &mut [f32]);
}

/// `BatchNorm` and `BatchRenorm` have the same method names and differ in their saved values.
macro_rules! kernel_layer {
    ($layer:ty) => {
        impl KernelLayer for $layer {
            fn step(&mut self, x: View<'_, f32>, dy: &[f32]) -> Step {
                let mut y = vec![0.0; x.data.len()];
                let saved = self.forward_train(x, &mut y).unwrap();
                let channels = self.num_features;
                let (mut dx, mut dg, mut db) = (vec![0.0; y.len()], vec![0.0; channels], vec![0.0; channels]);
                let grads = Grads::new(&mut dx, &mut dg, &mut db);
                self.backward(x, dy, &saved, grads).unwrap();
                (y, dx, dg, db)
            }
            fn infer(&self, x: View<'_, f32>, y: &mut [f32]) {
                self.forward_eval(x, y).unwrap()
            }
        }
    };
}

kernel_layer!(BatchNorm<f32>);
kernel_layer!(BatchRenorm<f32>);

/// [`STEPS`] training steps of `engine` and of `kernel` on the same batches `[batch, channels,
/// spatial]`, then one inference: the same bits in y, dx, dγ, dβ and the inference output.
/// `before(step, kernel)` runs before each kernel step; `check(step, engine, kernel)` after it.
pub(crate) fn assert_same_as_kernel<K: KernelLayer>(
    what: &str,
    engine: &mut BatchNormLayer,
    kernel: &mut K,
    [batch, channels, spatial]: [usize; 3],
    mut before: impl FnMut(usize, &mut K),
    check: impl Fn(usize, &BatchNormLayer, &K),
) {
    let shape = [batch, channels, spatial];
    for step in 0..STEPS {
        let (x, dy) = batch_data(step, batch * channels * spatial);
        let got = engine_step(engine, &x, &dy, batch);
        before(step, kernel);
        let want = kernel.step(View::new(&x, &shape, Layout::ChannelsFirst), &dy);
        assert_eq!(got, want, "{what}: step {step}");
        check(step, engine, kernel);
    }
    let (x, _) = batch_data(STEPS, batch * channels * spatial);
    let (mut y, mut want) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    engine.forward(&x, batch, &mut y, Mode::Eval).unwrap();
    kernel.infer(View::new(&x, &shape, Layout::ChannelsFirst), &mut want);
    assert_eq!(y, want, "{what}: inference");
}

/// The shapes the layers are compared on: fully connected and convolutional.
const SHAPES: [[usize; 3]; 2] = [[8, 3, 1], [4, 2, 5]];

/// `f(variant, after, dims)` for every shape of [`SHAPES`] and plain batch norm (`after` = None)
/// and frozen batch norm from step 0 and from step 2 (`after` = Some(step)).
pub(crate) fn for_plain_and_frozen(mut f: impl FnMut(BnVariant, Option<u64>, [usize; 3])) {
    for dims in SHAPES {
        for after in [None, Some(0), Some(2)] {
            f(
                after.map_or(BnVariant::Plain, |after| BnVariant::Frozen { after }),
                after,
                dims,
            );
        }
    }
}

/// Plain and frozen batch norm: the engine layer equals the kernel's `BatchNorm` driven by hand
/// (frozen: plain for `after` steps, then `freeze()`), bit for bit, in y, dx, dγ, dβ, running
/// statistics and inference outputs.
#[test]
fn plain_and_frozen_layers_are_the_kernel_layer() {
    for_plain_and_frozen(|variant, after, dims| {
        let what = format!("{variant:?} {dims:?}");
        let [_, channels, spatial] = dims;
        let config = BatchNormConfig::default();
        let mut engine = BatchNormLayer::with_variant(channels, spatial, config, variant).unwrap();
        let mut kernel = BatchNorm::<f32>::new(channels, config).unwrap();
        let (gamma, beta) = params(channels);
        (engine.bn.gamma, engine.bn.beta) = (gamma.clone(), beta.clone());
        (kernel.gamma, kernel.beta) = (gamma, beta);
        let freeze = |step: usize, kernel: &mut BatchNorm<f32>| {
            if after == Some(step as u64) {
                kernel.freeze();
            }
        };
        let check = |step: usize, engine: &BatchNormLayer, kernel: &BatchNorm<f32>| {
            assert_eq!(&engine.bn, kernel, "{what}: layer state after step {step}");
            let frozen = after.is_some_and(|a| step as u64 >= a);
            assert_eq!(engine.is_frozen(), frozen, "{what}: frozen after step {step}");
        };
        assert_same_as_kernel(&what, &mut engine, &mut kernel, dims, freeze, check);
    });
}

/// Batch renorm: the engine layer equals the kernel's `BatchRenorm` with the same α and schedule,
/// bit for bit, in y, dx, dγ, dβ, moving μ and σ, the step counter and inference outputs, through
/// the warm-up and the ramps of r_max and d_max.
#[test]
fn renorm_layer_is_the_kernel_layer() {
    for dims in SHAPES {
        let what = format!("renorm {dims:?}");
        let [_, channels, spatial] = dims;
        let config = BatchNormConfig::default();
        let mut engine = BatchNormLayer::with_variant(channels, spatial, config, renorm()).unwrap();
        let renorm_config = BatchRenormConfig {
            eps: config.eps,
            momentum: 0.2,
            limits: schedule(),
            affine: true,
        };
        let mut kernel = BatchRenorm::<f32>::new(channels, renorm_config).unwrap();
        let (gamma, beta) = params(channels);
        let layer = engine.renorm_mut().unwrap();
        (layer.gamma, layer.beta) = (gamma.clone(), beta.clone());
        (kernel.gamma, kernel.beta) = (gamma, beta);
        let check = |step: usize, engine: &BatchNormLayer, kernel: &BatchRenorm<f32>| {
            assert_eq!(engine.renorm(), Some(kernel), "{what}: layer state after step {step}");
        };
        assert_same_as_kernel(&what, &mut engine, &mut kernel, dims, |_, _| {}, check);
        assert_eq!(engine.train_steps(), Some(STEPS as u64));
        assert!(
            kernel.clip().r_max() > 1.0 && kernel.clip().d_max() > 0.0,
            "{what}: past the warm-up"
        );
    }
}

/// The small-batch policy reaches the kernel: with `SmallBatch::UseRunningStats` a training batch
/// of one example (fully connected: one value per channel) is normalized with the running
/// statistics, as `Mode::Eval` does, and leaves them alone; by default it is an error.
#[test]
fn small_batch_policy_passes_through() {
    let x = [0.5f32, -1.0, 2.0];
    let mut strict = BatchNormLayer::new(3, 1, BatchNormConfig::default()).unwrap();
    let mut y = [0.0; 3];
    assert!(strict.forward(&x, 1, &mut y, Mode::Train).is_err());
    let config = BatchNormConfig {
        small_batch: SmallBatch::UseRunningStats,
        ..BatchNormConfig::default()
    };
    let mut layer = BatchNormLayer::new(3, 1, config).unwrap();
    layer.bn.running_mean = vec![0.1, -0.2, 0.3];
    layer.bn.running_var = vec![0.5, 2.0, 1.5];
    let before = layer.bn.clone();
    layer.forward(&x, 1, &mut y, Mode::Train).unwrap();
    let mut eval = [0.0; 3];
    layer.forward(&x, 1, &mut eval, Mode::Eval).unwrap();
    assert_eq!(y, eval);
    assert_eq!(layer.bn, before, "running statistics untouched");
    let mut dx = [0.0; 3];
    layer.backward(&x, &y, &[1.0, 1.0, 1.0], 1, Some(&mut dx)).unwrap();
    // dx = γ·dy/√(σ²_run + ε) with γ = 1 (the frozen backward); the kernel's f32 element-wise
    // pass is within 2·ε_f32 of it (docs/numerics.md), doubled for margin.
    for (c, (&dx, &var)) in dx.iter().zip(&before.running_var).enumerate() {
        let want = 1.0 / (var as f64 + 1e-5).sqrt();
        assert!((dx as f64 - want).abs() <= 4.0 * f32::EPSILON as f64 * want, "dx[{c}]");
    }
}

/// The frozen state belongs to the layer: Train, Eval and Collect passes in any order leave it
/// frozen, never touch the running statistics, and a frozen training pass computes exactly the
/// inference transform.
#[test]
fn frozen_state_survives_the_callers_modes() {
    let (batch, channels, spatial) = (4, 3, 2);
    let config = BatchNormConfig::default();
    let mut layer = BatchNormLayer::with_variant(channels, spatial, config, BnVariant::Frozen { after: 0 }).unwrap();
    (layer.bn.running_mean, layer.bn.running_var) = (vec![0.5, -1.0, 0.25], vec![2.0, 0.5, 1.0]);
    let stats = |bn: &BatchNorm<f32>| (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked);
    let before = stats(&layer.bn);
    let mut y = vec![0.0; batch * channels * spatial];
    let mut eval = y.clone();
    for (step, mode) in [
        Mode::Train,
        Mode::Eval,
        Mode::Collect,
        Mode::Train,
        Mode::Eval,
        Mode::Train,
    ]
    .into_iter()
    .enumerate()
    {
        let (x, _) = batch_data(step, y.len());
        layer.forward(&x, batch, &mut y, mode).unwrap();
        layer.forward(&x, batch, &mut eval, Mode::Eval).unwrap();
        assert_eq!(y, eval, "{mode:?} pass {step}: the inference transform");
        assert!(layer.is_frozen(), "{mode:?} pass {step} unfroze the layer");
        assert_eq!(stats(&layer.bn), before, "{mode:?} pass {step} changed the statistics");
    }
    assert_eq!(layer.train_steps(), Some(3));
    // Algorithm 2 keeps a frozen layer's statistics: it observed nothing and replaces nothing.
    layer.use_population().unwrap();
    assert_eq!(stats(&layer.bn), before);
    layer.set_frozen(false).unwrap();
    assert!(!layer.is_frozen());
    let (x, _) = batch_data(9, y.len());
    layer.forward(&x, batch, &mut y, Mode::Train).unwrap();
    assert_ne!(stats(&layer.bn), before, "unfrozen, training updates them again");
    assert!(!layer.is_frozen(), "the freezing step is past: unfreezing lasts");
}

/// Frozen and unfrozen layers train synchronized: over one process, the engine layer equals the
/// kernel's synchronized passes (a frozen one communicates only dγ and dβ).
#[test]
fn frozen_layer_trains_synchronized() {
    let (batch, channels) = (6, 2);
    let config = BatchNormConfig::default();
    let mut engine = BatchNormLayer::with_variant(channels, 1, config, BnVariant::Frozen { after: 2 }).unwrap();
    engine.synchronize(Some(Arc::new(SingleProcess)));
    let mut kernel = BatchNorm::<f32>::new(channels, config).unwrap();
    for step in 0..4 {
        let (x, dy) = batch_data(step, batch * channels);
        let got = engine_step(&mut engine, &x, &dy, batch);
        if step == 2 {
            kernel.freeze();
        }
        let shape = [batch, channels];
        let xv = View::new(&x, &shape, Layout::NC);
        let mut y = vec![0.0; x.len()];
        let saved = kernel.forward_train_sync(&SingleProcess, xv, &mut y).unwrap();
        let mut dx = vec![0.0; x.len()];
        let sums = kernel
            .backward_sync(&SingleProcess, xv, &dy, &saved, Grads::dx(&mut dx))
            .unwrap();
        let (mut dg, mut db) = (vec![0.0; channels], vec![0.0; channels]);
        sums.write_param_grads(Some(&mut dg[..]), Some(&mut db[..])).unwrap();
        assert_eq!(got, (y, dx, dg, db), "step {step}");
    }
}

/// Synchronized batch renorm over one rank is the one-process layer: the same outputs,
/// gradients and moving statistics, bit for bit, over a few steps (the kernel crate's tests hold
/// 2 and 3 ranks to one process over the concatenated batch).
#[test]
fn synchronized_renorm_over_one_rank_is_the_one_process_layer() {
    let (batch, channels) = (3, 2);
    let mut one = BatchNormLayer::with_variant(channels, 1, BatchNormConfig::default(), renorm()).unwrap();
    let mut synced = BatchNormLayer::with_variant(channels, 1, BatchNormConfig::default(), renorm()).unwrap();
    synced.synchronize(Some(Arc::new(SingleProcess)));
    for step in 0..4 {
        let (x, dy) = batch_data(step, batch * channels);
        assert_eq!(
            engine_step(&mut synced, &x, &dy, batch),
            engine_step(&mut one, &x, &dy, batch),
            "step {step}"
        );
    }
    assert_eq!(synced.state(), one.state());
    assert_eq!(synced.train_steps(), Some(4));
}

/// Algorithm 2 with batch renorm: `Collect` computes the training transform of the current step
/// (r and d from the moving statistics) without updating anything, and observes the plain batch
/// statistics; after `use_population` inference is y = γ·(x − E[x])/√(Var[x] + ε) + β, which is
/// plain batch norm's inference with the same estimate, while the moving statistics, which
/// training uses, are unchanged; `reset_population` goes back to them.
#[test]
fn renorm_collects_plain_batch_statistics() {
    let (batch, channels, spatial) = (4, 3, 2);
    let len = batch * channels * spatial;
    let config = BatchNormConfig::default();
    let mut layer = BatchNormLayer::with_variant(channels, spatial, config, renorm()).unwrap();
    let mut plain = BatchNormLayer::new(channels, spatial, config).unwrap();
    let (gamma, beta) = params(channels);
    (plain.bn.gamma, plain.bn.beta) = (gamma.clone(), beta.clone());
    let r = layer.renorm_mut().unwrap();
    (r.gamma, r.beta) = (gamma.clone(), beta.clone());
    for step in 0..3 {
        let (x, dy) = batch_data(step, len);
        engine_step(&mut layer, &x, &dy, batch);
    }
    let trained = layer.renorm().unwrap().clone();
    let shape = [batch, channels, spatial];
    for step in 3..6 {
        let (x, _) = batch_data(step, len);
        let mut y = vec![0.0; len];
        layer.forward(&x, batch, &mut y, Mode::Collect).unwrap();
        let mut want = vec![0.0; len];
        let moving = RenormStats::new(&trained.moving_mean, &trained.moving_std);
        let xv = View::new(&x, &shape, Layout::ChannelsFirst);
        batch_renorm_train(
            xv,
            moving,
            Affine::new(&gamma, &beta),
            config.eps,
            trained.clip(),
            &mut want,
        )
        .unwrap();
        assert_eq!(y, want, "collect pass {step}: the training transform");
        plain.forward(&x, batch, &mut y, Mode::Collect).unwrap();
    }
    assert_eq!(layer.renorm(), Some(&trained), "Collect updated the renorm layer");
    layer.use_population().unwrap();
    plain.use_population().unwrap();
    assert_eq!(
        layer.renorm(),
        Some(&trained),
        "use_population changed the moving statistics"
    );
    let (x, _) = batch_data(7, len);
    let (mut got, mut want) = (vec![0.0; len], vec![0.0; len]);
    layer.forward(&x, batch, &mut got, Mode::Eval).unwrap();
    plain.forward(&x, batch, &mut want, Mode::Eval).unwrap();
    // Both compute in f32 within 2·ε_f32 of the terms' magnitude M = |γ·(x − E)/σ| + |β| (the
    // kernels' element-wise bound), and renorm's σ = √(Var + ε) is rounded to f32 once more
    // (≤ ε_f32 relative): 8·ε_f32·M covers the sum with margin. Another estimate (a biased
    // variance, the moving statistics) moves y by far more.
    let eps32 = f32::EPSILON as f64;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let c = (i / spatial) % channels;
        let sigma = (plain.bn.running_var[c] as f64 + config.eps).sqrt();
        let m =
            (gamma[c] as f64 * (x[i] as f64 - plain.bn.running_mean[c] as f64) / sigma).abs() + beta[c].abs() as f64;
        assert!(
            (*g as f64 - *w as f64).abs() <= 8.0 * eps32 * m,
            "y[{i}] = {g}, plain batch norm with the estimate gives {w}"
        );
    }
    // The affine form for folding agrees with the inference pass.
    let affine = layer.inference_affine().unwrap();
    for (i, g) in got.iter().enumerate() {
        let c = (i / spatial) % channels;
        let folded = x[i] as f64 * affine.scale[c] + affine.shift[c];
        let m = (x[i] as f64 * affine.scale[c]).abs() + affine.shift[c].abs();
        assert!((folded - *g as f64).abs() <= 8.0 * eps32 * m, "folded y[{i}]");
    }
    layer.reset_population();
    layer.forward(&x, batch, &mut got, Mode::Eval).unwrap();
    trained
        .forward_eval(View::new(&x, &shape, Layout::ChannelsFirst), &mut want)
        .unwrap();
    assert_eq!(got, want, "after reset_population: the moving statistics");
}

/// Algorithm 2 with a frozen-variant layer before its freezing step: it collects like plain batch
/// norm and infers with exactly the estimate plain batch norm would put in its running
/// statistics, but keeps its own running statistics, which it will freeze.
#[test]
fn frozen_variant_collects_without_replacing_its_statistics() {
    let (batch, channels) = (8, 3);
    let config = BatchNormConfig::default();
    let mut layer = BatchNormLayer::with_variant(channels, 1, config, BnVariant::Frozen { after: 10 }).unwrap();
    let mut plain = BatchNormLayer::new(channels, 1, config).unwrap();
    for step in 0..2 {
        let (x, dy) = batch_data(step, batch * channels);
        engine_step(&mut layer, &x, &dy, batch);
        engine_step(&mut plain, &x, &dy, batch);
    }
    let running = (layer.bn.running_mean.clone(), layer.bn.running_var.clone());
    let mut y = vec![0.0; batch * channels];
    for step in 2..5 {
        let (x, _) = batch_data(step, batch * channels);
        layer.forward(&x, batch, &mut y, Mode::Collect).unwrap();
        plain.forward(&x, batch, &mut y, Mode::Collect).unwrap();
    }
    layer.use_population().unwrap();
    plain.use_population().unwrap();
    assert_eq!((layer.bn.running_mean.clone(), layer.bn.running_var.clone()), running);
    assert_ne!(plain.bn.running_var, running.1, "plain batch norm replaces them");
    let (x, _) = batch_data(8, batch * channels);
    let mut want = y.clone();
    layer.forward(&x, batch, &mut y, Mode::Eval).unwrap();
    plain.forward(&x, batch, &mut want, Mode::Eval).unwrap();
    assert_eq!(y, want);
    let (a, b) = (layer.inference_affine().unwrap(), plain.inference_affine().unwrap());
    assert_eq!(a, b, "folding uses the estimate too");
}

#[test]
fn invalid_variant_settings_are_rejected() {
    let no_stats = BatchNormConfig {
        track_running_stats: false,
        ..BatchNormConfig::default()
    };
    let policy = BatchNormConfig {
        small_batch: SmallBatch::UseRunningStats,
        ..BatchNormConfig::default()
    };
    let cases = [
        (no_stats, BnVariant::Frozen { after: 3 }, "running statistics"),
        (no_stats, renorm(), "track_running_stats"),
        (policy, renorm(), "small-batch"),
        (
            BatchNormConfig::default(),
            BnVariant::Renorm {
                momentum: 0.0,
                limits: schedule(),
            },
            "momentum",
        ),
        (
            BatchNormConfig::default(),
            BnVariant::Renorm {
                momentum: 1.5,
                limits: schedule(),
            },
            "momentum",
        ),
    ];
    for (config, variant, needle) in cases {
        let err = BatchNormLayer::with_variant(2, 1, config, variant).err().unwrap();
        let msg = format!("{err:#}");
        assert!(msg.to_lowercase().contains(needle), "{variant:?}: {msg}");
    }
    for variant in [BnVariant::Plain, renorm()] {
        let mut layer = BatchNormLayer::with_variant(2, 1, BatchNormConfig::default(), variant).unwrap();
        assert!(layer.set_frozen(true).is_err(), "{variant:?} has no saved frozen state");
        assert!(!layer.is_frozen());
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

const FEATURES: usize = 4;
const HIDDEN: usize = 3;
const CLASSES: usize = 2;
const BATCH: usize = 8;

/// A batch-norm layer of the checkpoint tests: its variant, and whether it is masked.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Spec {
    variant: BnVariant,
    masked: bool,
}

impl From<BnVariant> for Spec {
    fn from(variant: BnVariant) -> Spec {
        Spec { variant, masked: false }
    }
}

/// `variant`, masked.
fn masked(variant: BnVariant) -> Spec {
    Spec { variant, masked: true }
}

/// Linear → batch norm of `spec` → sigmoid → linear, initialized from `seed`.
fn net(spec: impl Into<Spec>, seed: u64) -> Sequential {
    let Spec { variant, masked } = spec.into();
    let mut r = rng(seed);
    let mut bn = BatchNormLayer::with_variant(HIDDEN, 1, BatchNormConfig::default(), variant).unwrap();
    if masked {
        bn = bn.masked().unwrap();
    }
    let layers: Vec<Box<dyn Layer>> = vec![
        Box::new(Linear::new(FEATURES, HIDDEN, false, 0.5, &mut r)),
        Box::new(bn),
        Box::new(Sigmoid { size: HIDDEN }),
        Box::new(Linear::new(HIDDEN, CLASSES, true, 0.5, &mut r)),
    ];
    Sequential::new(layers).unwrap()
}

/// SGD steps `from..to` with momentum, on batches that depend on the step alone, each with a
/// mask (one position per example, a third of the examples off) that only a masked layer uses.
fn train(net: &mut Sequential, sgd: &mut Sgd, from: usize, to: usize) {
    for step in from..to {
        let (x, _) = batch_data(step, BATCH * FEATURES);
        let y: Vec<u8> = (0..BATCH).map(|i| ((i + step) % CLASSES) as u8).collect();
        let valid = (0..BATCH).map(|i| (i + step) % 3 != 0).collect();
        net.set_mask(&PositionMask::new(valid, 1).unwrap());
        sgd_step(net, sgd, &x, &y, CLASSES);
    }
}

fn capture(net: &mut Sequential, sgd: &Sgd, step: usize) -> Checkpoint {
    let progress = CheckpointProgress {
        step: step as u64,
        seed: 7,
        ..CheckpointProgress::default()
    };
    Checkpoint::capture(net, sgd, &progress, "test", "v", serde_json::Value::Null).unwrap()
}

/// `variant`'s network trained `steps` steps, saved, parsed back and restored into a fresh one.
fn round_trip(variant: impl Into<Spec>, steps: usize) -> (Sequential, Sgd, Checkpoint, Sequential, Sgd) {
    let variant = variant.into();
    let (mut a, mut sa) = (net(variant, 1), Sgd::new(0.9, 1e-4));
    train(&mut a, &mut sa, 0, steps);
    let ck = capture(&mut a, &sa, steps);
    let back = Checkpoint::from_bytes(&ck.to_bytes().unwrap()).unwrap();
    let (mut b, mut sb) = (net(variant, 99), Sgd::new(0.9, 1e-4));
    back.restore(&mut b, &mut sb).unwrap();
    assert_eq!(
        capture(&mut b, &sb, steps),
        ck,
        "{variant:?}: the restored network captures identically"
    );
    (a, sa, ck, b, sb)
}

/// Interrupted at `stop`, saved and resumed in a fresh network: the same bits as training on.
fn assert_resume_is_exact(variant: impl Into<Spec>, stop: usize, steps: usize) -> Sequential {
    let variant = variant.into();
    let (mut a, mut sa, _, mut b, mut sb) = round_trip(variant, stop);
    train(&mut a, &mut sa, stop, steps);
    train(&mut b, &mut sb, stop, steps);
    assert_eq!(capture(&mut b, &sb, steps), capture(&mut a, &sa, steps), "{variant:?}");
    b
}

fn bn(net: &mut Sequential) -> &mut BatchNormLayer {
    net.batchnorms().into_iter().next().unwrap()
}

/// The frozen state, the step count and the freezing step travel with the checkpoint: restored
/// before the freezing step the layer freezes on time; restored after it, it is frozen (or, if it
/// was unfrozen by hand, stays unfrozen); training on gives the same bits either way.
#[test]
fn frozen_state_survives_a_checkpoint_round_trip() {
    let variant = BnVariant::Frozen { after: 3 };
    let (_, _, ck, mut b, _) = round_trip(variant, 4);
    assert!(bn(&mut b).is_frozen());
    assert_eq!(bn(&mut b).train_steps(), Some(4));
    let (_, dtype, shape) = ck.tensor("layers.1.batchnorm.frozen").unwrap();
    assert_eq!((dtype.as_str(), shape), ("U64", &[1usize][..]));
    assert!(
        architecture(&mut b).contains("batchnorm3{frozen(after=3)}"),
        "{}",
        architecture(&mut b)
    );

    let (_, _, _, mut b, _) = round_trip(variant, 2);
    assert!(!bn(&mut b).is_frozen());
    assert_resume_is_exact(variant, 2, 6);
    let b = &mut assert_resume_is_exact(variant, 4, 6);
    assert!(bn(b).is_frozen());

    // Unfrozen by hand after the freezing step: saved and restored as such.
    let (mut a, mut sa) = (net(variant, 1), Sgd::new(0.9, 1e-4));
    train(&mut a, &mut sa, 0, 5);
    bn(&mut a).set_frozen(false).unwrap();
    let ck = capture(&mut a, &sa, 5);
    let mut b = net(variant, 3);
    ck.restore(&mut b, &mut Sgd::new(0.9, 1e-4)).unwrap();
    assert!(!bn(&mut b).is_frozen());
}

/// Batch renorm's moving μ and σ, its step counter (which sets r_max and d_max) and Algorithm 2's
/// accumulators survive a checkpoint, and training resumed from it gives the same bits as
/// training on, across the end of the warm-up and through the ramps.
#[test]
fn renorm_state_survives_a_checkpoint_and_resumes_exactly() {
    let (mut a, _, ck, _, _) = round_trip(renorm(), 3);
    let layer = bn(&mut a).renorm().unwrap().clone();
    assert_eq!(layer.steps, 3);
    assert!(layer.moving_std.iter().all(|&s| s != 1.0), "the moving σ has moved");
    let (bytes, dtype, _) = ck.tensor("layers.1.batchrenorm.moving_std").unwrap();
    assert_eq!(dtype, "F32");
    let stored: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(stored, layer.moving_std);
    let (bytes, _, _) = ck.tensor("layers.1.batchrenorm.train_steps").unwrap();
    assert_eq!(bytes, 3u64.to_le_bytes());
    for stop in [1, 3] {
        let mut b = assert_resume_is_exact(renorm(), stop, 7);
        assert_eq!(bn(&mut b).train_steps(), Some(7));
    }
}

/// Masked batch norm (plain and frozen) through a checkpoint: `masked` in the architecture after
/// the variant's settings, the running statistics (updated with the valid counts), the frozen
/// state and Algorithm 2's accumulators restored, and training resumed from it (with a new mask
/// every step) gives the same bits as training on.
#[test]
fn masked_state_survives_a_checkpoint_and_resumes_exactly() {
    for (variant, settings) in [
        (BnVariant::Plain, "batchnorm3{masked}"),
        (BnVariant::Frozen { after: 3 }, "batchnorm3{frozen(after=3),masked}"),
    ] {
        let (mut a, _, _, mut b, _) = round_trip(masked(variant), 4);
        assert!(bn(&mut b).is_masked(), "{variant:?}");
        assert!(architecture(&mut b).contains(settings), "{}", architecture(&mut b));
        assert_eq!(bn(&mut b).state(), bn(&mut a).state(), "{variant:?}");
        assert_eq!(bn(&mut b).is_frozen(), variant != BnVariant::Plain);
        for stop in [2, 4] {
            assert_resume_is_exact(masked(variant), stop, 6);
        }
    }
}

/// Variants share tensor names nowhere they could be confused: a checkpoint of another variant,
/// or of the same variant with other settings (freezing step, α, schedule, masked or not), is
/// refused as another architecture before anything is changed.
#[test]
fn checkpoints_of_another_variant_are_refused() {
    let other_schedule = BnVariant::Renorm {
        momentum: 0.2,
        limits: RenormSchedule::new(1, 3, 2, 3.0, 4.0).unwrap(),
    };
    let other_momentum = BnVariant::Renorm {
        momentum: 0.1,
        limits: schedule(),
    };
    let variants: [Spec; 8] = [
        BnVariant::Plain.into(),
        BnVariant::Frozen { after: 3 }.into(),
        BnVariant::Frozen { after: 4 }.into(),
        renorm().into(),
        other_schedule.into(),
        other_momentum.into(),
        masked(BnVariant::Plain),
        masked(BnVariant::Frozen { after: 3 }),
    ];
    for (i, &saved) in variants.iter().enumerate() {
        let (mut a, mut sa) = (net(saved, 1), Sgd::new(0.9, 1e-4));
        train(&mut a, &mut sa, 0, 2);
        let ck = capture(&mut a, &sa, 2);
        for (j, &into) in variants.iter().enumerate() {
            let mut b = net(into, 5);
            let before = capture(&mut b, &Sgd::new(0.9, 1e-4), 2);
            let result = ck.restore(&mut b, &mut Sgd::new(0.9, 1e-4));
            if i == j {
                result.unwrap();
                continue;
            }
            let err = result.unwrap_err();
            assert!(
                matches!(err, CheckpointError::Architecture { .. }),
                "{saved:?} into {into:?}: {err}"
            );
            assert_eq!(
                capture(&mut b, &Sgd::new(0.9, 1e-4), 2),
                before,
                "{saved:?} into {into:?}"
            );
        }
    }
}

/// Values no run can produce in the variants' state are refused when the file is read: a frozen
/// state other than 0 or 1, a moving σ ≤ 0, more training steps than `progress.step`.
#[test]
fn impossible_variant_state_is_refused() {
    let file = |variant: BnVariant| {
        let (mut a, mut sa) = (net(variant, 1), Sgd::new(0.9, 1e-4));
        train(&mut a, &mut sa, 0, 2);
        capture(&mut a, &sa, 2).to_bytes().unwrap()
    };
    let frozen = file(BnVariant::Frozen { after: 1 });
    let renorm_bytes = file(renorm());
    let u64_bytes = |v: u64| v.to_le_bytes().to_vec();
    let cases: [(&[u8], &str, Vec<u8>); 5] = [
        (&frozen, "layers.1.batchnorm.frozen", u64_bytes(2)),
        (&frozen, "layers.1.batchnorm.train_steps", u64_bytes(3)),
        (&renorm_bytes, "layers.1.batchrenorm.train_steps", u64_bytes(3)),
        (
            &renorm_bytes,
            "layers.1.batchrenorm.moving_std",
            [0.0f32, 1.0, 1.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        (
            &renorm_bytes,
            "layers.1.batchrenorm.moving_std",
            [1.0f32, -0.5, 1.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    ];
    // The layer itself refuses a frozen state other than 0 or 1, and keeps its own.
    let mut layer =
        BatchNormLayer::with_variant(2, 1, BatchNormConfig::default(), BnVariant::Frozen { after: 0 }).unwrap();
    layer.set_state("frozen", StateValue::U64(vec![1])).unwrap();
    let err = layer.set_state("frozen", StateValue::U64(vec![2])).unwrap_err();
    assert!(err.to_string().contains("neither 0 nor 1"), "{err}");
    assert!(layer.is_frozen());
    for (bytes, name, value) in cases {
        assert!(Checkpoint::from_bytes(bytes).is_ok());
        let damaged = edit_tensors(bytes, |t| t.get_mut(name).unwrap().2 = value);
        let err = Checkpoint::from_bytes(&damaged).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::Invariant { name: n, .. } if n == name),
            "{name}: {err}"
        );
    }
}

/// A layer that keeps one counter and refuses to restore a value above 10.
struct Picky(u64);

impl Layer for Picky {
    fn name(&self) -> String {
        "picky".into()
    }
    fn input_size(&self) -> usize {
        HIDDEN
    }
    fn output_size(&self) -> usize {
        HIDDEN
    }
    fn forward(&mut self, x: &[f32], _: usize, y: &mut [f32], _: Mode) -> anyhow::Result<()> {
        y.copy_from_slice(x);
        Ok(())
    }
    fn backward(&mut self, _: &[f32], _: &[f32], dy: &[f32], _: usize, dx: Option<&mut [f32]>) -> anyhow::Result<()> {
        if let Some(dx) = dx {
            dx.copy_from_slice(dy);
        }
        Ok(())
    }
    fn params(&mut self) -> Vec<Param<'_>> {
        Vec::new()
    }
    fn state(&self) -> Vec<State> {
        vec![State {
            name: "counter",
            value: StateValue::U64(vec![self.0]),
        }]
    }
    fn set_state(&mut self, _: &str, value: StateValue) -> anyhow::Result<()> {
        match value {
            StateValue::U64(v) if v[0] <= 10 => self.0 = v[0],
            _ => anyhow::bail!("counter above 10"),
        }
        Ok(())
    }
}

/// Nothing is half restored: when a layer refuses its state after another layer's was set, the
/// states already set are put back.
#[test]
fn a_refused_layer_state_puts_the_others_back() {
    let make = |variant, counter| {
        let mut r = rng(2);
        let layers: Vec<Box<dyn Layer>> = vec![
            Box::new(Linear::new(FEATURES, HIDDEN, false, 0.5, &mut r)),
            Box::new(BatchNormLayer::with_variant(HIDDEN, 1, BatchNormConfig::default(), variant).unwrap()),
            Box::new(Picky(counter)),
        ];
        Sequential::new(layers).unwrap()
    };
    for variant in [BnVariant::Plain, BnVariant::Frozen { after: 1 }, renorm()] {
        let mut a = make(variant, 11);
        let mut y = vec![0.0; BATCH * HIDDEN];
        for step in 0..3 {
            let (x, _) = batch_data(step, BATCH * FEATURES);
            let out = a.forward(&x, BATCH, Mode::Train).unwrap();
            y.copy_from_slice(out);
            a.backward(&y).unwrap();
        }
        let ck = capture(&mut a, &Sgd::new(0.0, 0.0), 3);
        let mut b = make(variant, 0);
        let before = capture(&mut b, &Sgd::new(0.0, 0.0), 3);
        let err = ck.restore(&mut b, &mut Sgd::new(0.0, 0.0)).unwrap_err();
        assert!(matches!(err, CheckpointError::LayerState(_)), "{err}");
        assert_eq!(capture(&mut b, &Sgd::new(0.0, 0.0), 3), before, "{variant:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// bnlab bench

/// Every variant's rows in every dtype, in the library: its name, the dtype, the case, and the
/// operations it times, each with a finite positive time (with `--min-time 0`: the minimum
/// repetitions only).
#[test]
fn bench_times_every_variant() {
    let case = Case {
        layout: Layout::NCHW,
        shape: vec![2, 3, 2, 2],
    };
    let min = bench::min_time(0.0).unwrap();
    for variant in bench::Variant::ALL {
        for dtype in Dtype::ALL {
            let rows = bench::run_case(&case, variant, dtype, min, Clock::Wall).unwrap();
            let ops: Vec<&str> = rows.iter().map(|r| r.op).collect();
            let want: Vec<&str> = variant.ops().iter().map(|o| o.name()).collect();
            assert_eq!(ops, want, "{variant:?} {dtype:?}");
            for r in rows {
                assert_eq!(
                    (r.variant, r.dtype, r.layout.as_str(), &r.shape),
                    (variant.name(), dtype.name(), "NCHW", &case.shape)
                );
                assert!(
                    r.ms > 0.0 && r.ms.is_finite(),
                    "{variant:?} {dtype:?} {}: {} ms",
                    r.op,
                    r.ms
                );
            }
        }
    }
    assert_eq!(Dtype::ALL.map(|d| d.name()), ["f32", "bf16", "f16"]);
    assert_eq!(Dtype::ALL.map(|d| d.bytes()), [4, 2, 2]);
    assert_eq!(bench::Variant::Bn.ops(), [Op::FwdTrain, Op::FwdEval, Op::Backward]);
    assert_eq!(
        bench::Variant::ALL.map(|v| v.name()),
        ["bn", "frozen", "renorm", "ghost", "masked", "masked-random", "fused"]
    );
    assert_eq!(bench::Variant::DEFAULT, &bench::Variant::ALL[..6]);
}

/// The fused rows: each fused op beside its unfused sequence, their names, and the transfers
/// their GB/s count (batch norm's, one more with the residual; an unfused row as its fused one).
#[test]
fn bench_fused_rows_pair_each_op_with_its_unfused_sequence() {
    let names: Vec<&str> = bench::Variant::Fused.ops().iter().map(|o| o.name()).collect();
    assert_eq!(names, FUSED_OPS);
    for pair in bench::Variant::Fused.ops().chunks(2) {
        assert_eq!(pair[1].name(), format!("{}_unfused", pair[0].name()));
        assert_eq!(pair[0].transfers(), pair[1].transfers(), "{pair:?}");
    }
    let t = |o: Op| o.transfers();
    assert_eq!(t(Op::FwdTrainRelu), t(Op::FwdTrain));
    assert_eq!(t(Op::BackwardRelu), t(Op::Backward));
    assert_eq!(t(Op::FwdTrainAddRelu), t(Op::FwdTrain) + 1.0);
    assert_eq!(t(Op::BackwardAddRelu), t(Op::Backward) + 1.0);
    // NC [60,100] in 1 ms at 4 transfers of 4-byte elements: 96 000 bytes / 1e-3 s; of 2-byte
    // elements (bf16, f16) half as many bytes.
    let mut r = bench::Record {
        variant: "fused",
        dtype: "f32",
        layout: "NC".into(),
        shape: vec![60, 100],
        op: "fwd_train_add_relu_unfused",
        ms: 1.0,
    };
    assert_eq!(r.gbps(), 60.0 * 100.0 * 4.0 * 4.0 / 1e-3 / 1e9);
    for half in ["bf16", "f16"] {
        r.dtype = half;
        assert_eq!(r.gbps(), 60.0 * 100.0 * 4.0 * 2.0 / 1e-3 / 1e9, "{half}");
    }
}

/// The masks of the masked rows hold half of the positions: `masked` as padded sequences leave
/// them (the first half of an NC batch's examples, the first half of each example's positions of
/// a feature map), `masked-random` a scattered half (as many changes between valid and padding
/// as a random mask has, far more than one per example), the same in every run.
#[test]
fn bench_masks_hold_half_of_the_positions() {
    use bench::MaskPattern;
    assert_eq!(
        MaskPattern::Padded.mask(60, 1),
        (0..60).map(|k| k < 30).collect::<Vec<_>>()
    );
    let (examples, positions) = (4, 14 * 14);
    let padded = MaskPattern::Padded.mask(examples, positions);
    assert_eq!(padded.len(), examples * positions);
    for (k, example) in padded.chunks(positions).enumerate() {
        let (valid, padding) = example.split_at(positions / 2);
        assert!(
            valid.iter().all(|&on| on) && padding.iter().all(|&on| !on),
            "example {k}"
        );
    }
    let changes = |m: &[bool]| m.windows(2).filter(|w| w[0] != w[1]).count();
    for (examples, positions) in [(60, 1), (4, 14 * 14), (32, 56 * 56)] {
        let random = MaskPattern::Random.mask(examples, positions);
        let len = examples * positions;
        assert_eq!(random.len(), len);
        assert_eq!(random.iter().filter(|&&on| on).count(), len / 2);
        assert_eq!(random, MaskPattern::Random.mask(examples, positions));
        assert!(
            changes(&random) > len / 4,
            "{examples}×{positions}: {} changes",
            changes(&random)
        );
    }
}
