//! Training machinery of the engine: the optimizer's update formulas, learning-rate schedules,
//! batch norm's statistics in the three modes (Algorithm 2's population estimate, running averages
//! at inference), a small training run, bit-exact determinism across thread counts, network
//! construction checks and the distribution monitor.

use batchnorm::{reference, BatchNormConfig, Geometry, Layout, Momentum};
use bnlab::engine::{
    BatchNormLayer, Layer, Linear, LrSchedule, Mode, Param, Relu, Sequential, Sgd, Sigmoid, SoftmaxCrossEntropy,
};
use bnlab::experiments::paper_mlp::{build, Variant};
use bnlab::monitor::{percentiles, Monitor, Watch};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::common::{normal, rng};

/// |a − b| ≤ rel·max(|b|, 1e-3), with a message.
fn assert_close(what: &str, a: f64, b: f64, rel: f64) {
    assert!(
        (a - b).abs() <= rel * b.abs().max(1e-3),
        "{what}: {a} vs expected {b} (rel tol {rel:e})"
    );
}

// ---------------------------------------------------------------------------------------------
// SGD

#[test]
fn sgd_plain_step_is_w_minus_lr_g() {
    let mut w = vec![1.0f32, -2.0, 0.5, 3.25];
    let g = vec![0.1f32, 0.2, -0.3, 0.0];
    let lr = 0.5f32;
    let expected: Vec<f32> = w.iter().zip(&g).map(|(w, g)| w - lr * g).collect();
    let mut sgd = Sgd::new(0.0, 0.0);
    sgd.step(vec![weight(&mut w, &g)], lr);
    assert_eq!(w, expected);
}

/// Momentum and weight decay over several steps, PyTorch's convention:
/// v ← μ·v + g + λ·w (λ only where `decay`), w ← w − η·v; checked against an f64 re-computation.
#[test]
fn sgd_momentum_and_weight_decay_follow_the_formula() {
    let (mu, lambda) = (0.9f32, 0.05f32);
    let mut r = rng(1);
    let mut w = normal(&mut r, 5, 0.0, 1.0);
    let mut b = normal(&mut r, 3, 0.0, 1.0);
    let (mut w64, mut b64): (Vec<f64>, Vec<f64>) = (
        w.iter().map(|&v| v as f64).collect(),
        b.iter().map(|&v| v as f64).collect(),
    );
    let (mut vw, mut vb) = (vec![0.0f64; 5], vec![0.0f64; 3]);
    let mut sgd = Sgd::new(mu, lambda);
    for step in 0..6 {
        let lr = 0.1f32 / (1 + step) as f32;
        let gw = normal(&mut r, 5, 0.0, 1.0);
        let gb = normal(&mut r, 3, 0.0, 1.0);
        sgd.step(two_params(&mut w, &mut b, &gw, &gb), lr);
        for i in 0..5 {
            vw[i] = mu as f64 * vw[i] + gw[i] as f64 + lambda as f64 * w64[i];
            w64[i] -= lr as f64 * vw[i];
        }
        for i in 0..3 {
            vb[i] = mu as f64 * vb[i] + gb[i] as f64;
            b64[i] -= lr as f64 * vb[i];
        }
        for i in 0..5 {
            assert_close(&format!("step {step} w[{i}]"), w[i] as f64, w64[i], 1e-5);
            assert_close(&format!("step {step} vw[{i}]"), sgd.velocity[0][i] as f64, vw[i], 1e-5);
        }
        for i in 0..3 {
            assert_close(&format!("step {step} b[{i}]"), b[i] as f64, b64[i], 1e-5);
            assert_close(&format!("step {step} vb[{i}]"), sgd.velocity[1][i] as f64, vb[i], 1e-5);
        }
    }
}

/// A weight (decayed) and a bias (not decayed) with their gradients.
fn two_params<'a>(w: &'a mut [f32], b: &'a mut [f32], gw: &'a [f32], gb: &'a [f32]) -> Vec<Param<'a>> {
    let bias = Param {
        name: "bias",
        value: b,
        grad: gb,
        decay: false,
    };
    vec![weight(w, gw), bias]
}

/// A weight (decayed) with its gradient.
fn weight<'a>(w: &'a mut [f32], g: &'a [f32]) -> Param<'a> {
    Param {
        name: "weight",
        value: w,
        grad: g,
        decay: true,
    }
}

/// `step_with_grads` (the data-parallel update, gradients given concatenated) is `step` bit for
/// bit: momentum, weight decay only where `decay`, over several steps and both momentum settings.
#[test]
fn sgd_step_with_grads_is_step() {
    for (mu, lambda) in [(0.9f32, 0.05f32), (0.0, 0.05), (0.9, 0.0)] {
        let mut r = rng(7);
        let (w0, b0) = (normal(&mut r, 5, 0.0, 1.0), normal(&mut r, 3, 0.0, 1.0));
        let (mut w1, mut b1) = (w0.clone(), b0.clone());
        let (mut w2, mut b2) = (w0.clone(), b0.clone());
        let (mut a, mut c) = (Sgd::new(mu, lambda), Sgd::new(mu, lambda));
        for step in 0..5 {
            let lr = 0.1f32 / (1 + step) as f32;
            let (gw, gb) = (normal(&mut r, 5, 0.0, 1.0), normal(&mut r, 3, 0.0, 1.0));
            a.step(two_params(&mut w1, &mut b1, &gw, &gb), lr);
            // The stored gradients are ignored: zeros here, the real ones concatenated.
            let zeros = [0.0f32; 8];
            let all: Vec<f32> = gw.iter().chain(&gb).copied().collect();
            c.step_with_grads(two_params(&mut w2, &mut b2, &zeros[..5], &zeros[5..]), &all, lr)
                .unwrap();
            assert_eq!(w1, w2, "μ {mu}, λ {lambda}, step {step}: weights");
            assert_eq!(b1, b2, "μ {mu}, λ {lambda}, step {step}: biases");
            assert_eq!(a.velocity, c.velocity, "μ {mu}, λ {lambda}, step {step}: velocity");
        }
        assert_ne!(w1, w0, "the weights moved");
    }
    let mut w = vec![0.0f32; 3];
    let err = Sgd::new(0.9, 0.0)
        .step_with_grads(vec![weight(&mut w, &[0.0; 3])], &[1.0; 4], 0.1)
        .unwrap_err();
    assert!(err.to_string().contains("4 gradients for 3 parameters"), "{err}");
}

/// Weight decay without momentum: w ← w − η(g + λw).
#[test]
fn sgd_weight_decay_without_momentum() {
    let mut w = vec![2.0f32, -4.0];
    let g = vec![0.5f32, 0.25];
    let (lr, lambda) = (0.1f32, 0.01f32);
    let mut sgd = Sgd::new(0.0, lambda);
    sgd.step(vec![weight(&mut w, &g)], lr);
    assert_close("w0", w[0] as f64, 2.0 - 0.1 * (0.5 + 0.01 * 2.0), 1e-6);
    assert_close("w1", w[1] as f64, -4.0 - 0.1 * (0.25 - 0.01 * 4.0), 1e-6);
}

/// With zero gradients only decay moves a parameter: `decay = false` ones stay bit-identical.
#[test]
fn sgd_decay_skips_parameters_marked_no_decay() {
    for momentum in [0.0f32, 0.9] {
        let mut w = vec![1.0f32, -1.0, 2.0];
        let mut b = vec![1.0f32, -1.0, 2.0];
        let zeros = vec![0.0f32; 3];
        let mut sgd = Sgd::new(momentum, 0.1);
        for _ in 0..3 {
            sgd.step(two_params(&mut w, &mut b, &zeros, &zeros), 0.5);
        }
        assert_eq!(b, vec![1.0, -1.0, 2.0], "momentum {momentum}: no-decay parameter moved");
        assert!(
            w.iter().zip([1.0f32, -1.0, 2.0]).all(|(a, o)| a.abs() < o.abs()),
            "momentum {momentum}: decayed parameter did not shrink: {w:?}"
        );
    }
}

/// Which parameters the layers mark for decay: weights yes; biases, γ and β no.
#[test]
fn layers_mark_decay_on_weights_only() {
    let mut r = rng(2);
    let mut lin = Linear::new(3, 2, true, 0.1, &mut r);
    let flags: Vec<(&str, bool)> = lin.params().iter().map(|p| (p.name, p.decay)).collect();
    assert_eq!(flags, vec![("weight", true), ("bias", false)]);
    let mut bn = BatchNormLayer::new(2, 1, BatchNormConfig::default()).unwrap();
    let flags: Vec<(&str, bool)> = bn.params().iter().map(|p| (p.name, p.decay)).collect();
    assert_eq!(flags, vec![("gamma", false), ("beta", false)]);
}

// ---------------------------------------------------------------------------------------------
// Learning-rate schedules

#[test]
fn lr_schedule_constant() {
    for step in [0u64, 1, 999, 1 << 40] {
        assert_eq!(LrSchedule::Constant.lr(0.3, step), 0.3);
    }
}

#[test]
fn lr_schedule_step() {
    let s = LrSchedule::Step {
        every: 100,
        factor: 0.5,
    };
    let cases = [(0, 1.0), (99, 1.0), (100, 0.5), (199, 0.5), (200, 0.25), (350, 0.125)];
    for (step, mult) in cases {
        assert_close(&format!("step {step}"), s.lr(2.0, step), 2.0 * mult, 1e-15);
    }
}

/// Steps far beyond 2³¹ drops must keep decaying, not wrap around to a huge rate.
#[test]
fn lr_schedule_step_does_not_grow_for_huge_steps() {
    let s = LrSchedule::Step { every: 1, factor: 0.5 };
    for step in [1u64 << 31, (1 << 32) + 3, u64::MAX] {
        let lr = s.lr(1.0, step);
        assert!(
            (0.0..=1.0).contains(&lr),
            "Step{{every: 1, factor: 0.5}}.lr(1.0, {step}) = {lr}, expected ≤ 1"
        );
    }
}

#[test]
fn lr_schedule_exponential_with_speedup() {
    let plain = LrSchedule::Exponential {
        every: 1000,
        rate: 0.5,
        speedup: 1.0,
    };
    let fast = LrSchedule::Exponential {
        every: 1000,
        rate: 0.5,
        speedup: 6.0,
    };
    assert_close("lr(0)", plain.lr(0.1, 0), 0.1, 1e-15);
    assert_close("lr(1000)", plain.lr(0.1, 1000), 0.05, 1e-14);
    assert_close("lr(500)", plain.lr(0.1, 500), 0.1 / 2f64.sqrt(), 1e-14);
    assert_close("lr(3000)", plain.lr(0.1, 3000), 0.0125, 1e-14);
    // Six times faster: at step s it has decayed as much as the plain one at 6·s.
    assert_close("fast lr(1000)", fast.lr(0.1, 1000), 0.1 * 0.5f64.powi(6), 1e-14);
    for step in [0u64, 1, 17, 250, 1234] {
        assert_close(
            &format!("fast lr({step})"),
            fast.lr(0.1, step),
            plain.lr(0.1, 6 * step),
            1e-12,
        );
    }
    // Smooth and decreasing.
    let mut prev = f64::INFINITY;
    for step in 0..3000 {
        let lr = fast.lr(0.1, step);
        assert!(lr < prev && lr > 0.0);
        prev = lr;
    }
}

// ---------------------------------------------------------------------------------------------
// Batch norm: Collect / population, Train / running statistics, Eval

/// `x` `[batch, channels, spatial]` widened to f64, with its geometry, for `batchnorm::reference`.
fn widened(x: &[f32], channels: usize, spatial: usize) -> (Geometry, Vec<f64>) {
    let shape = [x.len() / (channels * spatial), channels, spatial];
    let g = Layout::ChannelsFirst.geometry(&shape).unwrap();
    (g, x.iter().map(|&v| v as f64).collect())
}

/// Per-channel (mean, biased variance) of `[batch, channels, spatial]` in f64
/// (`reference::mean_var`).
fn channel_stats(x: &[f32], channels: usize, spatial: usize) -> (Vec<f64>, Vec<f64>) {
    let (g, x) = widened(x, channels, spatial);
    reference::mean_var(&g, &x)
}

/// y = γ(x − mean)/√(var + ε) + β per channel of `x` `[batch, channels, spatial]` with the
/// layer's γ, β and ε, in f64 (`reference::forward_eval`).
fn bn_apply(layer: &BatchNormLayer, x: &[f32], spatial: usize, (mean, var): (&[f64], &[f64])) -> Vec<f64> {
    let bn = &layer.bn;
    let (g, x) = widened(x, bn.num_features, spatial);
    let wide = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    reference::forward_eval(&g, &x, mean, var, &wide(&bn.gamma), &wide(&bn.beta), bn.config.eps)
}

fn assert_all_close(what: &str, a: &[f32], b: &[f64], rel: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x as f64 - y).abs() <= rel * (y.abs() + scale),
            "{what}[{i}]: {x} vs expected {y}"
        );
    }
}

/// A batch whose channels have batch-specific means and spreads.
fn bn_batch(r: &mut ChaCha8Rng, batch: usize, channels: usize, spatial: usize) -> Vec<f32> {
    let offsets = normal(r, channels, 1.0, 2.0);
    let spreads: Vec<f32> = (0..channels).map(|_| r.gen_range(0.5..2.5)).collect();
    (0..batch * channels * spatial)
        .map(|i| {
            let c = (i / spatial) % channels;
            offsets[c] + spreads[c] * r.sample::<f32, _>(StandardNormal)
        })
        .collect()
}

/// Algorithm 2: after `Mode::Collect` over K batches, `use_population` sets the running statistics
/// to E[x] = mean of μ_B and Var[x] = m/(m−1)·mean of σ²_B, computed here directly.
#[test]
fn collect_then_use_population_is_algorithm_2() {
    let (batch, channels, spatial) = (6, 3, 2);
    let m = (batch * spatial) as f64;
    let mut r = rng(10);
    let mut layer = BatchNormLayer::new(channels, spatial, BatchNormConfig::default()).unwrap();
    layer.bn.gamma = vec![1.5, 0.5, 2.0];
    layer.bn.beta = vec![0.1, -0.2, 0.3];
    // Running statistics, parameters and the batch counter.
    let state = |layer: &BatchNormLayer| {
        let bn = &layer.bn;
        let stats = (bn.running_mean.clone(), bn.running_var.clone());
        (stats, bn.gamma.clone(), bn.beta.clone(), bn.num_batches_tracked)
    };
    let before = state(&layer);

    let collect = |layer: &mut BatchNormLayer, batches: &[Vec<f32>]| -> (Vec<f64>, Vec<f64>) {
        let (mut means, mut vars) = (vec![0.0; channels], vec![0.0; channels]);
        for x in batches {
            let mut y = vec![0.0f32; x.len()];
            layer.forward(x, batch, &mut y, Mode::Collect).unwrap();
            // Collect normalizes with the batch's own statistics, as training does.
            let (mu, var) = channel_stats(x, channels, spatial);
            let expected = bn_apply(layer, x, spatial, (&mu, &var));
            assert_all_close("collect output", &y, &expected, 1e-5);
            for c in 0..channels {
                means[c] += mu[c] / batches.len() as f64;
                vars[c] += var[c] / batches.len() as f64;
            }
        }
        (means, vars.iter().map(|v| v * m / (m - 1.0)).collect())
    };

    let batches: Vec<Vec<f32>> = (0..5).map(|_| bn_batch(&mut r, batch, channels, spatial)).collect();
    let (e, v) = collect(&mut layer, &batches);
    // Collect leaves running statistics, parameters and the batch counter alone.
    let after = state(&layer);
    assert_eq!(before, after, "Mode::Collect changed the layer");
    layer.use_population().unwrap();
    for c in 0..channels {
        assert_close(&format!("E[x][{c}]"), layer.bn.running_mean[c] as f64, e[c], 1e-6);
        assert_close(&format!("Var[x][{c}]"), layer.bn.running_var[c] as f64, v[c], 1e-6);
    }

    // Eval now uses the population statistics.
    let x = bn_batch(&mut r, 4, channels, spatial);
    let mut y = vec![0.0f32; x.len()];
    layer.forward(&x, 4, &mut y, Mode::Eval).unwrap();
    let expected = bn_apply(&layer, &x, spatial, (&e, &v));
    assert_all_close("eval with population statistics", &y, &expected, 1e-5);

    // reset_population forgets the old batches: a new estimate covers only the new ones.
    layer.reset_population();
    let batches: Vec<Vec<f32>> = (0..2).map(|_| bn_batch(&mut r, batch, channels, spatial)).collect();
    let (e2, v2) = collect(&mut layer, &batches);
    layer.use_population().unwrap();
    for c in 0..channels {
        assert_close(&format!("new E[x][{c}]"), layer.bn.running_mean[c] as f64, e2[c], 1e-6);
        assert_close(&format!("new Var[x][{c}]"), layer.bn.running_var[c] as f64, v2[c], 1e-6);
    }
}

#[test]
fn use_population_without_batches_is_an_error() {
    let mut layer = BatchNormLayer::new(2, 1, BatchNormConfig::default()).unwrap();
    assert!(layer.use_population().is_err());
    layer.reset_population();
    assert!(layer.use_population().is_err());
}

/// Training updates the running statistics as r ← (1 − 0.1)·r + 0.1·batch (unbiased variance), and
/// `Mode::Eval` afterwards applies γ(x − r_mean)/√(r_var + ε) + β, independent of the batch.
#[test]
fn eval_after_training_uses_running_statistics() {
    let (batch, channels, spatial) = (5, 4, 3);
    let m = (batch * spatial) as f64;
    let mut r = rng(11);
    let config = BatchNormConfig::default();
    assert_eq!(config.momentum, Momentum::Exponential(0.1));
    let mut layer = BatchNormLayer::new(channels, spatial, config).unwrap();
    layer.bn.gamma = vec![0.5, 1.0, 1.5, 2.0];
    layer.bn.beta = vec![-1.0, 0.0, 0.5, 1.0];
    let (mut rm, mut rv) = (vec![0.0f64; channels], vec![1.0f64; channels]);
    for _ in 0..7 {
        let x = bn_batch(&mut r, batch, channels, spatial);
        let mut y = vec![0.0f32; x.len()];
        layer.forward(&x, batch, &mut y, Mode::Train).unwrap();
        let (mu, var) = channel_stats(&x, channels, spatial);
        for c in 0..channels {
            rm[c] = 0.9 * rm[c] + 0.1 * mu[c];
            rv[c] = 0.9 * rv[c] + 0.1 * var[c] * m / (m - 1.0);
        }
    }
    for c in 0..channels {
        assert_close(
            &format!("running mean[{c}]"),
            layer.bn.running_mean[c] as f64,
            rm[c],
            1e-5,
        );
        assert_close(
            &format!("running var[{c}]"),
            layer.bn.running_var[c] as f64,
            rv[c],
            1e-5,
        );
    }

    // A test batch whose own statistics are far from the running ones.
    let x: Vec<f32> = bn_batch(&mut r, 6, channels, spatial)
        .iter()
        .map(|v| 3.0 * v + 5.0)
        .collect();
    let mut y = vec![0.0f32; x.len()];
    layer.forward(&x, 6, &mut y, Mode::Eval).unwrap();
    let rm32: Vec<f64> = layer.bn.running_mean.iter().map(|&v| v as f64).collect();
    let rv32: Vec<f64> = layer.bn.running_var.iter().map(|&v| v as f64).collect();
    let expected = bn_apply(&layer, &x, spatial, (&rm32, &rv32));
    assert_all_close("eval output", &y, &expected, 1e-6);
    let with_batch_stats = {
        let (mu, var) = channel_stats(&x, channels, spatial);
        bn_apply(&layer, &x, spatial, (&mu, &var))
    };
    assert!(
        y.iter()
            .zip(&with_batch_stats)
            .any(|(a, b)| (*a as f64 - b).abs() > 0.5),
        "eval output looks normalized by the batch's own statistics"
    );
    // Inference of one example alone gives the same values as within the batch.
    let per = channels * spatial;
    for n in 0..6 {
        let mut one = vec![0.0f32; per];
        layer
            .forward(&x[n * per..(n + 1) * per], 1, &mut one, Mode::Eval)
            .unwrap();
        let scale = expected.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        for (a, b) in one.iter().zip(&y[n * per..(n + 1) * per]) {
            assert!(
                (a - b).abs() as f64 <= 1e-6 * scale,
                "example {n}: {a} alone vs {b} in batch"
            );
        }
    }
    // Eval does not move the running statistics.
    assert_eq!(
        layer.bn.running_mean.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        rm32
    );
}

// ---------------------------------------------------------------------------------------------
// A tiny training run

/// Three Gaussian blobs in 4-D, well separated: a Linear → BN → ReLU → Linear network trained
/// with momentum SGD must drive the loss down and classify nearly everything in eval mode.
#[test]
fn tiny_training_run_reduces_the_loss() {
    let (d, k, n, batch) = (4usize, 3usize, 300usize, 30usize);
    let mut r = rng(20);
    let centers: Vec<Vec<f32>> = (0..k).map(|_| normal(&mut r, d, 0.0, 3.0)).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % k) as u8).collect();
    let x: Vec<f32> = labels
        .iter()
        .flat_map(|&l| {
            let noise = normal(&mut r, d, 0.0, 0.5);
            centers[l as usize]
                .iter()
                .zip(noise)
                .map(|(c, e)| c + e)
                .collect::<Vec<_>>()
        })
        .collect();
    let layers: Vec<Box<dyn Layer>> = vec![
        Box::new(Linear::new(d, 16, false, 0.5, &mut r)),
        Box::new(BatchNormLayer::new(16, 1, BatchNormConfig::default()).unwrap()),
        Box::new(Relu { size: 16 }),
        Box::new(Linear::new(16, k, true, 0.5, &mut r)),
    ];
    let mut net = Sequential::new(layers).unwrap();
    let mut sgd = Sgd::new(0.9, 1e-4);
    let mut ce = SoftmaxCrossEntropy::default();
    let mut dlogits = vec![0.0f32; batch * k];
    let mut losses = Vec::new();
    for step in 0..150 {
        let start = (step * batch) % n;
        let xb = &x[start * d..(start + batch) * d];
        let yb = &labels[start..start + batch];
        let logits = net.forward(xb, batch, Mode::Train).unwrap();
        let loss = ce.forward(logits, yb, k).unwrap();
        assert!(loss.is_finite(), "step {step}: loss {loss}");
        losses.push(loss as f64);
        ce.backward(yb, k, &mut dlogits);
        net.backward(&dlogits).unwrap();
        sgd.step(net.params(), 0.05);
    }
    let first = losses[..10].iter().sum::<f64>() / 10.0;
    let last = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(last < 0.2 * first, "loss went from {first:.4} to {last:.4}");
    let logits = net.forward(&x, n, Mode::Eval).unwrap();
    let correct = bnlab::engine::loss::argmax_rows(logits, k)
        .zip(&labels)
        .filter(|(p, &l)| *p == l as usize)
        .count();
    assert!(correct as f64 >= 0.97 * n as f64, "eval accuracy {correct}/{n}");
}

// ---------------------------------------------------------------------------------------------
// Determinism

/// Trains the paper's BN network for a few steps on synthetic data inside a rayon pool of
/// `threads` threads (batch 400: the first layer's products split their rows in two and the BN
/// kernels run in parallel), then collects inference outputs; returns the bits of every
/// parameter, the running statistics, population statistics and the outputs.
fn train_bits(seed: u64, threads: usize) -> Vec<u32> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        assert_eq!(rayon::current_num_threads(), threads);
        let (features, classes, batch, steps) = (784usize, 10usize, 400usize, 6);
        let (mut net, _) = build(Variant::Bn, features, classes, 0.1, seed, BatchNormConfig::default()).unwrap();
        let mut r = rng(seed ^ 0xdead_beef);
        let mut sgd = Sgd::new(0.9, 1e-4);
        let mut ce = SoftmaxCrossEntropy::default();
        let mut dlogits = vec![0.0f32; batch * classes];
        for _ in 0..steps {
            let x: Vec<f32> = (0..batch * features).map(|_| r.gen::<f32>()).collect();
            let y: Vec<u8> = (0..batch).map(|_| r.gen_range(0..classes as u8)).collect();
            let logits = net.forward(&x, batch, Mode::Train).unwrap();
            ce.forward(logits, &y, classes).unwrap();
            ce.backward(&y, classes, &mut dlogits);
            net.backward(&dlogits).unwrap();
            sgd.step(net.params(), 0.1);
        }
        let mut bits: Vec<u32> = net
            .params()
            .iter()
            .flat_map(|p| p.value.iter().map(|v| v.to_bits()))
            .collect();
        for bn in net.batchnorms() {
            bits.extend(bn.bn.running_mean.iter().chain(&bn.bn.running_var).map(|v| v.to_bits()));
        }
        let x: Vec<f32> = (0..1000 * features).map(|_| r.gen::<f32>()).collect();
        net.forward(&x[..batch * features], batch, Mode::Collect).unwrap();
        for bn in net.batchnorms() {
            bn.use_population().unwrap();
            bits.extend(bn.bn.running_mean.iter().chain(&bn.bn.running_var).map(|v| v.to_bits()));
        }
        let out = net.forward(&x, 1000, Mode::Eval).unwrap();
        bits.extend(out.iter().map(|v| v.to_bits()));
        bits
    })
}

#[test]
fn same_seed_and_threads_give_identical_bits() {
    let one = train_bits(7, 1);
    assert_eq!(one, train_bits(7, 1), "1 thread: two runs differ");
    let two = train_bits(7, 2);
    assert_eq!(two, train_bits(7, 2), "2 threads: two runs differ");
    // A product's element is computed the same way whichever thread computes its row, and the BN
    // kernels reduce in a fixed order, so the thread count does not change the bits either.
    let differing = one.iter().zip(&two).filter(|(a, b)| a != b).count();
    assert_eq!(
        differing,
        0,
        "1 vs 2 threads: {differing} of {} values differ",
        one.len()
    );
    assert_ne!(one, train_bits(8, 1), "the seed has no effect");
}

// ---------------------------------------------------------------------------------------------
// Network construction and input checks

#[test]
fn sequential_new_rejects_mismatched_sizes() {
    let mut r = rng(30);
    let layers: Vec<Box<dyn Layer>> = vec![
        Box::new(Linear::new(4, 3, true, 0.1, &mut r)),
        Box::new(Sigmoid { size: 4 }),
    ];
    let err = Sequential::new(layers)
        .err()
        .expect("3 features into a layer of 4")
        .to_string();
    assert!(err.contains('3') && err.contains('4'), "message: {err}");
    let layers: Vec<Box<dyn Layer>> = vec![
        Box::new(Linear::new(4, 3, true, 0.1, &mut r)),
        Box::new(Sigmoid { size: 3 }),
        Box::new(BatchNormLayer::new(2, 1, BatchNormConfig::default()).unwrap()),
    ];
    assert!(Sequential::new(layers).is_err(), "3 features into batch norm of 2");
    assert!(Sequential::new(Vec::new()).is_err(), "empty network");
    let layers: Vec<Box<dyn Layer>> = vec![
        Box::new(Linear::new(4, 3, true, 0.1, &mut r)),
        Box::new(Sigmoid { size: 3 }),
    ];
    let net = Sequential::new(layers).unwrap();
    assert_eq!((net.input_size(), net.output_size()), (4, 3));
}

#[test]
fn sequential_rejects_bad_inputs_without_panicking() {
    let mut r = rng(31);
    let layers: Vec<Box<dyn Layer>> = vec![
        Box::new(Linear::new(4, 3, false, 0.1, &mut r)),
        Box::new(BatchNormLayer::new(3, 1, BatchNormConfig::default()).unwrap()),
        Box::new(Sigmoid { size: 3 }),
    ];
    let mut net = Sequential::new(layers).unwrap();
    assert!(net.forward(&[0.0; 7], 2, Mode::Train).is_err(), "7 values for 2×4");
    assert!(net.forward(&[], 0, Mode::Train).is_err(), "batch 0");
    // Batch norm needs two values per feature in training.
    assert!(net.forward(&[0.5; 4], 1, Mode::Train).is_err(), "batch 1 in training");
    net.forward(&[0.5, 1.0, 1.5, 2.0, 0.0, -1.0, 3.0, 0.25], 2, Mode::Train)
        .unwrap();
    assert!(net.backward(&[0.0; 5]).is_err(), "5 output gradients for 2×3");
    net.backward(&[0.1; 6]).unwrap();
}

/// `Layer::forward` is public and safe, and Linear hands its buffers to an unchecked GEMM: a
/// too-short input must be an error. (The input here is a prefix of a longer buffer, so that the
/// current unchecked read stays inside the allocation.)
#[test]
fn linear_forward_rejects_inputs_of_the_wrong_length() {
    let mut r = rng(32);
    let mut lin = Linear::new(8, 4, true, 0.1, &mut r);
    let buffer = vec![1.0f32; 64];
    let mut y = vec![0.0f32; 2 * 4];
    let short = &buffer[..8]; // one example, but batch says two
    assert!(
        lin.forward(short, 2, &mut y, Mode::Train).is_err(),
        "Linear::forward accepted 8 inputs for a batch of 2×8"
    );
}

// ---------------------------------------------------------------------------------------------
// Monitor

/// NumPy's default ("linear") percentiles, computed directly.
fn numpy_percentiles(values: &[f32], ps: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ps.iter()
        .map(|&p| {
            let pos = p / 100.0 * (v.len() - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(v.len() - 1);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        })
        .collect()
}

fn assert_vec_close(what: &str, a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-12 * y.abs().max(1.0), "{what}: {a:?} vs {b:?}");
    }
}

#[test]
fn percentiles_match_numpy_linear() {
    let ps = [0.0, 15.0, 25.0, 50.0, 85.0, 100.0];
    let mut v = vec![4.0f32, 1.0, 3.0, 2.0];
    let got = percentiles(&mut v, &ps);
    assert_vec_close("1..4", &got, &[1.0, 1.45, 1.75, 2.5, 3.55, 4.0]);
    let mut r = rng(40);
    for n in [1usize, 2, 7, 100, 1001] {
        let vals = normal(&mut r, n, 0.0, 1.0);
        let got = percentiles(&mut vals.clone(), &ps);
        assert_vec_close(&format!("n={n}"), &got, &numpy_percentiles(&vals, &ps));
    }
    assert!(percentiles(&mut [], &ps).iter().all(|v| v.is_nan()));
    // Percentiles in any order, repeated, and data with ties and both infinities: exactly what
    // sorting gives.
    let ps = [85.0, 15.0, 50.0, 15.0, 100.0, 0.0, 99.9];
    for n in [3usize, 60, 6000] {
        let mut vals: Vec<f32> = normal(&mut r, n, 0.0, 1.0).iter().map(|x| (x * 4.0).round()).collect();
        vals[n / 2] = f32::INFINITY;
        vals[n / 3] = f32::NEG_INFINITY;
        let mut sorted = vals.clone();
        sorted.sort_by(f32::total_cmp);
        let expected: Vec<f64> = ps
            .iter()
            .map(|&p| {
                let pos = p / 100.0 * (n - 1) as f64;
                let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
                let frac = pos - lo as f64;
                sorted[lo] as f64 * (1.0 - frac) + sorted[hi] as f64 * frac
            })
            .collect();
        let got = percentiles(&mut vals, &ps);
        for (g, e) in got.iter().zip(&expected) {
            assert!(g == e || (g.is_nan() && e.is_nan()), "n={n}: {got:?} vs {expected:?}");
        }
    }
}

/// A monitor of a sigmoid's input and one of its output, over three forward passes of different
/// batch sizes, against the values computed directly from the first layer's weights.
#[test]
fn monitor_input_and_output_percentiles() {
    let mut r = rng(41);
    let (d, h) = (3usize, 4usize);
    let mut first = Linear::new(d, h, true, 1.0, &mut r);
    first.bias = Some(normal(&mut r, h, 0.0, 1.0));
    let (weight, bias) = (first.weight.clone(), first.bias.clone().unwrap());
    let layers: Vec<Box<dyn Layer>> = vec![
        Box::new(first),
        Box::new(Sigmoid { size: h }),
        Box::new(Linear::new(h, 2, true, 1.0, &mut r)),
    ];
    let mut net = Sequential::new(layers).unwrap();
    let ps = vec![0.0, 15.0, 50.0, 85.0, 100.0];
    let unit = 2;
    let mut m_in = Monitor::new(1, Watch::Input, unit, ps.clone());
    let mut m_out = Monitor::new(1, Watch::Output, unit, ps.clone());
    let (mut pre, mut post) = (Vec::new(), Vec::new());
    for batch in [7usize, 5, 9] {
        let x = normal(&mut r, batch * d, 0.0, 1.0);
        net.forward(&x, batch, Mode::Eval).unwrap();
        m_in.record(&net);
        m_out.record(&net);
        for row in x.chunks_exact(d) {
            for j in 0..h {
                let z = bias[j] as f64 + (0..d).map(|i| weight[j * d + i] as f64 * row[i] as f64).sum::<f64>();
                pre.push(z);
                post.push(1.0 / (1.0 + (-z).exp()));
            }
        }
    }
    let direct = |vals: &[f64], unit: Option<usize>| -> Vec<f64> {
        let picked: Vec<f32> = vals
            .iter()
            .enumerate()
            .filter(|(i, _)| unit.is_none_or(|u| i % h == u))
            .map(|(_, &v)| v as f32)
            .collect();
        assert_eq!(picked.len(), if unit.is_some() { 21 } else { 21 * h });
        numpy_percentiles(&picked, &ps)
    };
    let (s_in, s_out) = (m_in.summary(), m_out.summary());
    // The layer's f32 values vs the f64 ones computed here: a few ulp.
    let close = |what: &str, a: &[f64], b: &[f64]| {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{what}: {a:?} vs {b:?}");
        }
    };
    close("input, unit", &s_in.unit, &direct(&pre, Some(unit)));
    close("input, pooled", &s_in.pooled, &direct(&pre, None));
    close("output, unit", &s_out.unit, &direct(&post, Some(unit)));
    close("output, pooled", &s_out.pooled, &direct(&post, None));
    assert!(s_out.pooled.iter().all(|&v| v > 0.0 && v < 1.0));
    assert!(s_in.pooled[0] < 0.0, "pre-activations should include negatives");
    // And exactly NumPy's percentiles of what the network holds (no f64 re-computation).
    let last: Vec<f32> = net.layer_input(1).to_vec();
    let mut m = Monitor::new(1, Watch::Input, unit, ps.clone());
    m.record(&net);
    let s = m.summary();
    assert_vec_close("last batch, pooled", &s.pooled, &numpy_percentiles(&last, &ps));
    let col: Vec<f32> = last.chunks_exact(h).map(|row| row[unit]).collect();
    assert_vec_close("last batch, unit", &s.unit, &numpy_percentiles(&col, &ps));

    // clear() forgets everything.
    m_in.clear();
    let s = m_in.summary();
    assert!(s.unit.iter().chain(&s.pooled).all(|v| v.is_nan()));
    // A unit beyond the layer's width has no values of its own; the pooled ones still count.
    let mut wide = Monitor::new(1, Watch::Output, h + 3, ps.clone());
    wide.record(&net);
    let s = wide.summary();
    assert!(s.unit.iter().all(|v| v.is_nan()));
    assert!(s.pooled.iter().all(|v| v.is_finite()));
}

/// A data set of `n` random 4×4 images with random labels of 10 classes.
fn random_dataset(r: &mut ChaCha8Rng, n: usize) -> bnlab::data::Dataset {
    bnlab::data::Dataset {
        pixels: (0..n * 16).map(|_| r.gen()).collect(),
        labels: (0..n).map(|_| r.gen_range(0..10)).collect(),
        len: n,
        rows: 4,
        cols: 4,
        classes: 10,
    }
}

/// Evaluation with Algorithm 2's population statistics leaves every BN layer's training state
/// (running statistics, batch counter) as it found it; with `running_too` it also gives the
/// accuracy with the running statistics, and its main accuracy is that of the network whose
/// statistics Algorithm 2 replaced.
#[test]
fn population_evaluation_leaves_the_training_state_alone() {
    use bnlab::driver::evaluate::{count_correct, evaluate, use_population_stats};
    use bnlab::driver::{BnStats, CommonSettings, Defaults};
    let mut r = rng(21);
    let (train, test) = (random_dataset(&mut r, 64), random_dataset(&mut r, 40));
    let (mut net, _) = build(Variant::Bn, 16, 10, 0.5, 3, BatchNormConfig::default()).unwrap();
    for _ in 0..3 {
        let x = normal(&mut r, 8 * 16, 0.5, 1.0);
        net.forward(&x, 8, Mode::Train).unwrap();
    }
    let state = |net: &mut Sequential| net.batchnorms().iter().map(|bn| bn.state()).collect::<Vec<_>>();
    let before = state(&mut net);
    let accuracy = |correct: usize| correct as f64 / test.len as f64;
    let running = accuracy(count_correct(&mut net, &test, 0, &mut (), |_| {}).unwrap());
    let mut c = CommonSettings::new(Defaults::new(10, 10, 8, 0.1), std::env::temp_dir());
    c.bn_stats = BnStats::Population;
    c.population_batches = 3;
    let (acc, running_acc) = evaluate(&c, &mut net, &train, &test, &mut (), true, 1, &mut ()).unwrap();
    assert_eq!(state(&mut net), before, "evaluation changed the training state");
    assert_eq!(running_acc, Some(running));
    // Without `running_too`, no running accuracy; the same population accuracy.
    assert_eq!(
        evaluate(&c, &mut net, &train, &test, &mut (), false, 1, &mut ()).unwrap(),
        (acc.clone(), None)
    );
    use_population_stats(&c, &mut net, &train, &mut ()).unwrap();
    assert_ne!(state(&mut net), before, "Algorithm 2 left the statistics as they were");
    assert_eq!(
        acc,
        vec![accuracy(count_correct(&mut net, &test, 0, &mut (), |_| {}).unwrap())]
    );
}
