//! Batch norm fused with its ReLU (`BatchNormLayer::with_relu`) against the two layers in
//! sequence, batch norm and then `Relu`: the same outputs, gradients and layer state, bit for
//! bit, in every mode and variant, whether the kernel crate has a fused form for it (plain,
//! frozen) or the layer runs the two passes (renorm, ghost, masked, synchronized, Algorithm 2's
//! `Collect`); the same checkpoints (either network resumes from the other's); and folding
//! keeps the ReLU.

use std::sync::Arc;

use batchnorm::{BatchNormConfig, RenormSchedule, SingleProcess};
use bnlab::engine::checkpoint::{architecture, Checkpoint, CheckpointProgress};
use bnlab::engine::fold::fold_batchnorm;
use bnlab::engine::{BatchNormLayer, BnVariant, Layer, Linear, Mode, PositionMask, Relu, Sequential, Sgd};

use crate::common::checkpoints::sgd_step;
use crate::common::{normal, rng};
use crate::engine_variants::{batch_data, params};

const BATCH: usize = 6;
const CHANNELS: usize = 3;
const SPATIAL: usize = 4;
const LEN: usize = BATCH * CHANNELS * SPATIAL;

/// The bits of a buffer (NaN payloads included).
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|v| v.to_bits()).collect()
}

/// A batch-norm configuration of the comparison.
struct Case {
    name: &'static str,
    /// A fresh layer of it.
    make: Box<dyn Fn() -> BatchNormLayer>,
    /// Whether its batches come with a position mask.
    masked: bool,
    /// Whether it trains synchronized (over one process).
    sync: bool,
    /// Whether the kernel crate has a fused form of its training passes.
    fused_form: bool,
}

fn cases() -> Vec<Case> {
    let layer =
        |variant| move || BatchNormLayer::with_variant(CHANNELS, SPATIAL, BatchNormConfig::default(), variant).unwrap();
    let renorm = BnVariant::Renorm {
        momentum: 0.2,
        limits: RenormSchedule::new(1, 3, 2, 3.0, 5.0).unwrap(),
    };
    let ghost = BatchNormConfig {
        virtual_batch: Some(3),
        ..BatchNormConfig::default()
    };
    let case = |name, make: Box<dyn Fn() -> BatchNormLayer>, masked, sync, fused_form| Case {
        name,
        make,
        masked,
        sync,
        fused_form,
    };
    let plain = layer(BnVariant::Plain);
    vec![
        case("plain", Box::new(plain), false, false, true),
        case(
            "frozen",
            Box::new(layer(BnVariant::Frozen { after: 2 })),
            false,
            false,
            true,
        ),
        case("renorm", Box::new(layer(renorm)), false, false, false),
        case(
            "ghost",
            Box::new(move || BatchNormLayer::new(CHANNELS, SPATIAL, ghost).unwrap()),
            false,
            false,
            false,
        ),
        case(
            "masked",
            Box::new(move || plain().masked().unwrap()),
            true,
            false,
            false,
        ),
        case("synchronized", Box::new(plain), false, true, false),
    ]
}

/// A fresh layer of `case` with the test's γ and β, synchronized if the case is.
fn fresh(case: &Case) -> BatchNormLayer {
    let mut layer = (case.make)();
    set_params(&mut layer);
    if case.sync {
        layer.synchronize(Some(Arc::new(SingleProcess)));
    }
    layer
}

/// γ and β away from 1 and 0 (so that the ReLU keeps some outputs and not others), the same for
/// every layer.
fn set_params(layer: &mut BatchNormLayer) {
    let (gamma, beta) = params(CHANNELS);
    let mut p = layer.params();
    p[0].value.copy_from_slice(&gamma);
    p[1].value.copy_from_slice(&beta);
}

/// The mask of step `step`: a few positions of each example off.
fn mask(step: usize) -> PositionMask {
    let valid = (0..BATCH * SPATIAL).map(|i| !(i + step).is_multiple_of(5)).collect();
    PositionMask::new(valid, SPATIAL).unwrap()
}

/// The unfused pair: batch norm, then a ReLU, through the `Layer` interface.
struct Pair {
    bn: BatchNormLayer,
    relu: Relu,
    t: Vec<f32>,
}

impl Pair {
    fn forward(&mut self, x: &[f32], mode: Mode) -> Vec<f32> {
        self.t = vec![0.0; x.len()];
        self.bn.forward(x, BATCH, &mut self.t, mode).unwrap();
        let mut y = vec![0.0; x.len()];
        self.relu.forward(&self.t, BATCH, &mut y, mode).unwrap();
        y
    }

    fn backward(&mut self, x: &[f32], y: &[f32], dy: &[f32]) -> Vec<f32> {
        let mut g = vec![0.0; x.len()];
        self.relu.backward(&self.t, y, dy, BATCH, Some(&mut g)).unwrap();
        let mut dx = vec![0.0; x.len()];
        self.bn.backward(x, &self.t, &g, BATCH, Some(&mut dx)).unwrap();
        dx
    }
}

/// The fused layer's forward and backward.
fn fused_step(layer: &mut BatchNormLayer, x: &[f32], dy: &[f32], y_for_backward: Option<&[f32]>) -> [Vec<f32>; 2] {
    let mut y = vec![0.0; x.len()];
    layer.forward(x, BATCH, &mut y, Mode::Train).unwrap();
    let mut dx = vec![0.0; x.len()];
    layer
        .backward(x, y_for_backward.unwrap_or(&y), dy, BATCH, Some(&mut dx))
        .unwrap();
    [y, dx]
}

fn grads(layer: &mut BatchNormLayer) -> Vec<Vec<u32>> {
    layer.params().iter().map(|p| bits(p.grad)).collect()
}

/// relu(bn(x)) fused equals batch norm then `Relu`, bit for bit: training forward (y) and
/// backward (dx, dγ, dβ) over steps whose statistics move (through a frozen layer's freezing
/// step), inference with the running statistics, Algorithm 2's collection and inference with
/// its estimate, and the layer state after it all.
#[test]
fn fused_relu_gives_the_bits_of_batch_norm_then_relu() {
    for case in cases() {
        let (name, masked) = (case.name, case.masked);
        let mut pair = Pair {
            bn: fresh(&case),
            relu: Relu {
                size: CHANNELS * SPATIAL,
            },
            t: Vec::new(),
        };
        let mut fused = fresh(&case).with_relu();
        assert!(fused.has_relu() && !pair.bn.has_relu());
        let give_mask = |l: &mut BatchNormLayer, step| {
            if masked {
                l.set_mask(&mask(step));
            }
        };
        for step in 0..4 {
            let (x, dy) = batch_data(step, LEN);
            give_mask(&mut fused, step);
            give_mask(&mut pair.bn, step);
            let [y, dx] = fused_step(&mut fused, &x, &dy, None);
            let want = pair.forward(&x, Mode::Train);
            assert!(y.iter().any(|&v| v > 0.0) && y.contains(&0.0), "{name}: a mixed ReLU");
            assert_eq!(bits(&y), bits(&want), "{name}: y at step {step}");
            assert_eq!(
                bits(&dx),
                bits(&pair.backward(&x, &want, &dy)),
                "{name}: dx at step {step}"
            );
            assert_eq!(grads(&mut fused), grads(&mut pair.bn), "{name}: dγ, dβ at step {step}");
            give_mask(&mut fused, step);
            give_mask(&mut pair.bn, step);
            let mut y = vec![0.0; LEN];
            fused.forward(&x, BATCH, &mut y, Mode::Eval).unwrap();
            assert_eq!(
                bits(&y),
                bits(&pair.forward(&x, Mode::Eval)),
                "{name}: eval at step {step}"
            );
        }
        for step in 4..6 {
            let (x, _) = batch_data(step, LEN);
            give_mask(&mut fused, step);
            give_mask(&mut pair.bn, step);
            let mut y = vec![0.0; LEN];
            fused.forward(&x, BATCH, &mut y, Mode::Collect).unwrap();
            assert_eq!(bits(&y), bits(&pair.forward(&x, Mode::Collect)), "{name}: collect");
        }
        fused.use_population().unwrap();
        pair.bn.use_population().unwrap();
        let (x, _) = batch_data(6, LEN);
        give_mask(&mut fused, 6);
        give_mask(&mut pair.bn, 6);
        let mut y = vec![0.0; LEN];
        fused.forward(&x, BATCH, &mut y, Mode::Eval).unwrap();
        assert_eq!(bits(&y), bits(&pair.forward(&x, Mode::Eval)), "{name}: population eval");
        assert_eq!(fused.state(), pair.bn.state(), "{name}: state");
    }
}

/// Where the kernel crate has a fused form (plain and frozen, unmasked, unsynchronized, no
/// virtual batch) the layer runs it: its backward reads the ReLU's 1-bit mask, not the output,
/// and gives the same gradients with any output passed in; the others run batch norm and then
/// the ReLU, and their backward finds the kept outputs from the output it is given.
#[test]
fn fused_form_runs_where_the_kernel_crate_has_one() {
    for case in cases() {
        let name = case.name;
        let (mut a, mut b) = (fresh(&case).with_relu(), fresh(&case).with_relu());
        if case.masked {
            a.set_mask(&mask(0));
            b.set_mask(&mask(0));
        }
        let (x, dy) = batch_data(0, LEN);
        let zeros = vec![0.0; LEN];
        let [_, dx] = fused_step(&mut a, &x, &dy, None);
        let [_, dx_from_zeros] = fused_step(&mut b, &x, &dy, Some(&zeros));
        if case.fused_form {
            assert_eq!(bits(&dx_from_zeros), bits(&dx), "{name}: fused");
            assert_eq!(grads(&mut b), grads(&mut a), "{name}: fused");
        } else {
            let no_grads = b.params().iter().all(|p| p.grad.iter().all(|&g| g == 0.0));
            assert!(no_grads, "{name}: unfused, y = 0 keeps nothing");
            assert_ne!(bits(&dx_from_zeros), bits(&dx), "{name}: unfused");
        }
    }
}

const FEATURES: usize = 5;
const CLASSES: usize = 3;

/// Linear → batch norm → ReLU → linear, the batch norm and ReLU fused or as two layers,
/// initialized from `seed`.
fn net(fused: bool, seed: u64) -> Sequential {
    let mut r = rng(seed);
    let bn = BatchNormLayer::new(CHANNELS, 1, BatchNormConfig::default()).unwrap();
    let mut layers: Vec<Box<dyn Layer>> = vec![Box::new(Linear::new(FEATURES, CHANNELS, false, 0.5, &mut r))];
    match fused {
        true => layers.push(Box::new(bn.with_relu())),
        false => layers.extend([Box::new(bn) as Box<dyn Layer>, Box::new(Relu { size: CHANNELS })]),
    }
    layers.push(Box::new(Linear::new(CHANNELS, CLASSES, true, 0.5, &mut r)));
    Sequential::new(layers).unwrap()
}

fn train(net: &mut Sequential, sgd: &mut Sgd, steps: std::ops::Range<usize>) {
    for step in steps {
        let x = normal(&mut rng(300 + step as u64), BATCH * FEATURES, 0.2, 1.0);
        let y: Vec<u8> = (0..BATCH).map(|i| ((i + step) % CLASSES) as u8).collect();
        sgd_step(net, sgd, &x, &y, CLASSES);
    }
}

fn capture(net: &mut Sequential, sgd: &Sgd, step: usize) -> Checkpoint {
    let progress = CheckpointProgress {
        step: step as u64,
        ..CheckpointProgress::default()
    };
    Checkpoint::capture(net, sgd, &progress, "test", "v", serde_json::Value::Null).unwrap()
}

/// A fused network has the unfused one's architecture and checkpoints (the ReLU listed as the
/// layer after the batch norm), trains to the same bits, and each resumes exactly from the
/// other's checkpoint.
#[test]
fn fused_and_unfused_networks_share_checkpoints() {
    let (mut fused, mut pair) = (net(true, 1), net(false, 1));
    assert_eq!(fused.layers.len() + 1, pair.layers.len());
    assert_eq!(architecture(&mut fused), architecture(&mut pair));
    let (mut sf, mut sp) = (Sgd::new(0.9, 1e-4), Sgd::new(0.9, 1e-4));
    train(&mut fused, &mut sf, 0..3);
    train(&mut pair, &mut sp, 0..3);
    let ck = capture(&mut pair, &sp, 3);
    assert_eq!(capture(&mut fused, &sf, 3), ck);
    let ck = Checkpoint::from_bytes(&ck.to_bytes().unwrap()).unwrap();
    let (mut resumed, mut sr) = (net(true, 99), Sgd::new(0.9, 1e-4));
    ck.restore(&mut resumed, &mut sr).unwrap();
    let back = capture(&mut fused, &sf, 3);
    let (mut unfused, mut su) = (net(false, 99), Sgd::new(0.9, 1e-4));
    back.restore(&mut unfused, &mut su).unwrap();
    for (n, s) in [
        (&mut fused, &mut sf),
        (&mut pair, &mut sp),
        (&mut resumed, &mut sr),
        (&mut unfused, &mut su),
    ] {
        train(n, s, 3..5);
    }
    let want = capture(&mut pair, &sp, 5);
    for (what, n, s) in [
        ("fused", &mut fused, &sf),
        ("fused from unfused", &mut resumed, &sr),
        ("unfused from fused", &mut unfused, &su),
    ] {
        assert_eq!(capture(n, s, 5), want, "{what}");
    }
}

/// Folding a fused batch norm into the linear layer before it leaves its ReLU as a layer: the
/// folded network is the folded unfused one, layer for layer and output for output.
#[test]
fn folding_a_fused_batch_norm_keeps_its_relu() {
    let (mut fused, mut pair) = (net(true, 2), net(false, 2));
    let (mut sf, mut sp) = (Sgd::new(0.0, 0.0), Sgd::new(0.0, 0.0));
    train(&mut fused, &mut sf, 0..3);
    train(&mut pair, &mut sp, 0..3);
    let (mut fused, mut pair) = (fold_batchnorm(fused).unwrap(), fold_batchnorm(pair).unwrap());
    let names = |n: &Sequential| n.layers.iter().map(|l| l.name()).collect::<Vec<_>>();
    assert_eq!(names(&fused), ["linear5x3", "relu", "linear3x3"]);
    assert_eq!(names(&fused), names(&pair));
    let x = normal(&mut rng(9), BATCH * FEATURES, 0.0, 1.0);
    let want = bits(pair.forward(&x, BATCH, Mode::Eval).unwrap());
    assert_eq!(bits(fused.forward(&x, BATCH, Mode::Eval).unwrap()), want);
}
