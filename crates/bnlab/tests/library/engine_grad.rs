//! Every layer's backward against central finite differences.
//!
//! The main check of each layer: the layer's analytic gradients (computed in `f32`) against
//! central differences of the same function re-implemented in `f64`. A separate assertion checks
//! that the layer's `f32` forward agrees with that `f64` re-implementation, so the differences are
//! taken of the function the layer really computes. Working in `f64` makes the finite differences
//! themselves practically exact (step `H64` = 1e-5 on values of order 1: truncation error
//! ~h²·f'''/6 ≈ 1e-10, rounding error ~1e-16·|L|/h ≈ 1e-10), so the tolerances below only have to
//! absorb the `f32` rounding of the analytic gradients:
//!
//! - `TOL_ELEMENTWISE` = 1e-5 for Sigmoid and Relu: each dx is 2–3 `f32` operations on an
//!   `f32` output (≤ ~4 ulp ≈ 2.4e-7 relative); measured worst 1.7e-7.
//! - `TOL` = 1e-5 for Linear, BatchNorm, softmax cross-entropy and the whole network: their
//!   gradients are sums of at most ~130 `f32` products of order 1, whose rounding error grows like
//!   √K·ε ≈ 1e-6 of the gradient's scale (K·ε ≈ 8e-6 in the worst case). For BN's dx the scale
//!   also counts the magnitude of the chain rule's terms (`bn_dx_terms`): with N = 2 they cancel
//!   to nearly 0 and the kernel's `f32` rounding of them is what is left. Measured errors are
//!   printed with `--nocapture`.
//!
//! Errors are measured as |analytic − numeric| ≤ tol·(|numeric| + scale), where `scale` is the
//! largest |numeric| of the tensor: relative for large entries, absolute (relative to the
//! tensor's size) for entries near zero. Any real mistake in a backward formula (a missing factor,
//! a transposition, a wrong sign, a missing term of the BN gradient) gives errors of order 1 in
//! these units.
//!
//! In addition, BatchNorm is checked as a black box in `f32` (finite differences of the layer
//! itself, with no re-implementation), with a step and tolerance justified at
//! `batchnorm_black_box_f32`.

use batchnorm::BatchNormConfig;
use bnlab::engine::{BatchNormLayer, Layer, Linear, Mode, Relu, Sequential, Sigmoid, SoftmaxCrossEntropy};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::common::{central_diff, normal, rng};

/// Step of the `f64` central differences.
const H64: f64 = 1e-5;
/// Tolerance for element-wise layers (see the module docs).
const TOL_ELEMENTWISE: f64 = 1e-5;
/// Tolerance for layers with sums (see the module docs).
const TOL: f64 = 1e-5;

// ---------------------------------------------------------------------------------------------
// Helpers

/// `n` values uniform in [lo, hi).
fn uniform(r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(lo..hi)).collect()
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The layer's analytic gradients for the loss L = Σ w⊙y: forward in `Mode::Train`, then backward
/// with dy = w. Returns (y, dx, the parameters' gradients by name).
fn analytic(layer: &mut dyn Layer, x: &[f32], batch: usize, w: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<Grad>) {
    let mut y = vec![f32::NAN; batch * layer.output_size()];
    layer.forward(x, batch, &mut y, Mode::Train).expect("forward");
    // Poisoned so that a backward that leaves entries unwritten is caught.
    let mut dx = vec![f32::NAN; x.len()];
    layer.backward(x, &y, w, batch, Some(&mut dx)).expect("backward");
    let grads = layer
        .params()
        .into_iter()
        .map(|p| Grad {
            name: p.name,
            grad: p.grad.to_vec(),
        })
        .collect();
    (y, dx, grads)
}

struct Grad {
    name: &'static str,
    grad: Vec<f32>,
}

fn grad<'a>(grads: &'a [Grad], name: &str) -> &'a [f32] {
    &grads
        .iter()
        .find(|g| g.name == name)
        .unwrap_or_else(|| panic!("no parameter `{name}`"))
        .grad
}

fn names(grads: &[Grad]) -> Vec<&'static str> {
    grads.iter().map(|g| g.name).collect()
}

/// Σ w⊙y in `f64`.
fn dot(w: &[f64], y: &[f64]) -> f64 {
    assert_eq!(w.len(), y.len());
    w.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Asserts |a − n| ≤ tol·(|n| + max|n|) for every entry; returns the worst ratio error/allowed·tol
/// (the error in units of the scale, for reporting).
fn assert_grad_close(what: &str, analytic: &[f32], numeric: &[f64], tol: f64) -> f64 {
    assert_grad_close_at(what, analytic, numeric, 0.0, tol)
}

/// [`assert_grad_close`] with the scale at least `min_scale` (the magnitude of the terms that
/// make the gradient, where they cancel).
fn assert_grad_close_at(what: &str, analytic: &[f32], numeric: &[f64], min_scale: f64, tol: f64) -> f64 {
    assert_eq!(analytic.len(), numeric.len(), "{what}: lengths differ");
    let scale = numeric.iter().fold(min_scale, |m, v| m.max(v.abs()));
    assert!(
        scale > 1e-6,
        "{what}: the numeric gradient is all zero; the check would be vacuous"
    );
    let mut worst = 0.0f64;
    let mut bad = Vec::new();
    for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (a as f64 - n).abs();
        let rel = err / (n.abs() + scale);
        if rel.is_nan() || rel > tol {
            bad.push(format!("[{i}] analytic {a} numeric {n} (rel {rel:.2e})"));
        }
        worst = worst.max(if rel.is_nan() { f64::INFINITY } else { rel });
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} entries off by more than {tol:e} (scale {scale:.3e}); first: {}",
        bad.len(),
        analytic.len(),
        bad.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
    );
    println!("{what}: worst relative error {worst:.2e} (tolerance {tol:e})");
    worst
}

/// Asserts that the `f32` forward output matches the `f64` reference within `tol` of its scale.
fn assert_forward_close(what: &str, y: &[f32], reference: &[f64], tol: f64) {
    assert_eq!(y.len(), reference.len(), "{what}: lengths differ");
    let scale = reference.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    for (i, (&a, &r)) in y.iter().zip(reference).enumerate() {
        let err = (a as f64 - r).abs();
        assert!(
            err <= tol * (r.abs() + scale),
            "{what}: forward output [{i}] is {a}, the f64 reference {r}"
        );
    }
}

/// `n` distinct indices below `len` (all of them when `n ≥ len`).
fn sample_indices(r: &mut ChaCha8Rng, len: usize, n: usize) -> Vec<usize> {
    if n >= len {
        return (0..len).collect();
    }
    rand::seq::index::sample(r, len, n).into_vec()
}

// ---------------------------------------------------------------------------------------------
// Linear

/// y = x·Wᵀ + b in f64; `w` is `[out, in]`.
fn linear_ref(x: &[f64], w: &[f64], b: Option<&[f64]>, batch: usize, inp: usize, out: usize) -> Vec<f64> {
    let mut y = vec![0.0; batch * out];
    for n in 0..batch {
        for o in 0..out {
            let mut s = b.map_or(0.0, |b| b[o]);
            for i in 0..inp {
                s += x[n * inp + i] * w[o * inp + i];
            }
            y[n * out + o] = s;
        }
    }
    y
}

/// Checks dx, dW and (with bias) db of a Linear layer on a batch of `batch × inp`, on `samples`
/// random coordinates per tensor (all when it is small).
fn check_linear(seed: u64, batch: usize, inp: usize, out: usize, bias: bool, samples: usize) {
    let mut r = rng(seed);
    let mut lin = Linear::new(inp, out, bias, 0.5, &mut r);
    if let Some(b) = lin.bias.as_mut() {
        *b = normal(&mut r, out, 0.0, 1.0);
    }
    let x = normal(&mut r, batch * inp, 0.3, 1.0);
    let w = normal(&mut r, batch * out, 0.0, 1.0);
    let (wt, bs) = (lin.weight.clone(), lin.bias.clone());
    let (y, dx, grads) = analytic(&mut lin, &x, batch, &w);
    let what = format!("linear {batch}x{inp}->{out} bias={bias}");
    assert_eq!(
        names(&grads),
        if bias { vec!["weight", "bias"] } else { vec!["weight"] },
        "{what}: parameters"
    );

    let (x64, wt64, w64) = (to64(&x), to64(&wt), to64(&w));
    let b64 = bs.as_deref().map(to64);
    let reference = linear_ref(&x64, &wt64, b64.as_deref(), batch, inp, out);
    assert_forward_close(&format!("{what} forward"), &y, &reference, 1e-5);

    // dx
    let idx = sample_indices(&mut r, x.len(), samples);
    let num = central_diff(
        |xp| dot(&w64, &linear_ref(xp, &wt64, b64.as_deref(), batch, inp, out)),
        &x64,
        H64,
        Some(&idx),
    );
    let ana: Vec<f32> = idx.iter().map(|&i| dx[i]).collect();
    assert_grad_close(&format!("{what} dx"), &ana, &num, TOL);

    // dW
    let idx = sample_indices(&mut r, wt.len(), samples);
    let num = central_diff(
        |wp| dot(&w64, &linear_ref(&x64, wp, b64.as_deref(), batch, inp, out)),
        &wt64,
        H64,
        Some(&idx),
    );
    let gw = grad(&grads, "weight");
    let ana: Vec<f32> = idx.iter().map(|&i| gw[i]).collect();
    assert_grad_close(&format!("{what} dW"), &ana, &num, TOL);

    // db
    if let Some(b64) = &b64 {
        let num = central_diff(
            |bp| dot(&w64, &linear_ref(&x64, &wt64, Some(bp), batch, inp, out)),
            b64,
            H64,
            None,
        );
        assert_grad_close(&format!("{what} db"), grad(&grads, "bias"), &num, TOL);
    }
}

#[test]
fn linear_with_bias_matches_finite_differences() {
    check_linear(1, 5, 7, 4, true, usize::MAX);
}

#[test]
fn linear_without_bias_matches_finite_differences() {
    check_linear(2, 6, 3, 5, false, usize::MAX);
}

/// Shapes that leave partial tiles in the products' kernels (forward: 60 rows, 50 outputs, 101
/// inputs, not a multiple of the 8 lanes; dW: 50 rows, 101 columns; dx: 101 columns), and a
/// second whose widths divide evenly.
#[test]
fn linear_larger_shapes_match_finite_differences() {
    check_linear(3, 60, 101, 50, true, 60);
    check_linear(4, 64, 128, 64, false, 60);
}

/// A second backward with different dy must overwrite, not accumulate, the gradients.
#[test]
fn linear_backward_overwrites_gradients() {
    let mut r = rng(5);
    let (batch, inp, out) = (4, 3, 2);
    let mut lin = Linear::new(inp, out, true, 0.5, &mut r);
    let x = normal(&mut r, batch * inp, 0.0, 1.0);
    let w1 = normal(&mut r, batch * out, 0.0, 1.0);
    let w2 = normal(&mut r, batch * out, 0.0, 1.0);
    analytic(&mut lin, &x, batch, &w1);
    let (_, dx2, g2) = analytic(&mut lin, &x, batch, &w2);
    let mut fresh = Linear::new(inp, out, true, 0.5, &mut rng(5));
    fresh.weight = lin.weight.clone();
    fresh.bias = lin.bias.clone();
    let (_, dx, g) = analytic(&mut fresh, &x, batch, &w2);
    assert_eq!(dx2, dx);
    assert_eq!(grad(&g2, "weight"), grad(&g, "weight"));
    assert_eq!(grad(&g2, "bias"), grad(&g, "bias"));
}

// ---------------------------------------------------------------------------------------------
// Activations

#[test]
fn sigmoid_matches_finite_differences() {
    let mut r = rng(10);
    let (batch, size) = (6, 9);
    let mut layer = Sigmoid { size };
    let x = uniform(&mut r, batch * size, -5.0, 5.0);
    let w = normal(&mut r, batch * size, 0.0, 1.0);
    let (y, dx, grads) = analytic(&mut layer, &x, batch, &w);
    assert!(grads.is_empty());
    let sig = |v: &[f64]| v.iter().map(|&t| 1.0 / (1.0 + (-t).exp())).collect::<Vec<_>>();
    let (x64, w64) = (to64(&x), to64(&w));
    assert_forward_close("sigmoid forward", &y, &sig(&x64), 1e-6);
    let num = central_diff(|xp| dot(&w64, &sig(xp)), &x64, H64, None);
    assert_grad_close("sigmoid dx", &dx, &num, TOL_ELEMENTWISE);
}

#[test]
fn relu_matches_finite_differences() {
    let mut r = rng(11);
    let (batch, size) = (5, 8);
    let mut layer = Relu { size };
    // Away from the kink at 0: |x| ≥ 0.1 ≫ H64.
    let x: Vec<f32> = uniform(&mut r, batch * size, 0.1, 3.0)
        .into_iter()
        .map(|v| if r.gen::<bool>() { v } else { -v })
        .collect();
    assert!(x.iter().any(|&v| v < 0.0) && x.iter().any(|&v| v > 0.0));
    let w = normal(&mut r, batch * size, 0.0, 1.0);
    let (y, dx, grads) = analytic(&mut layer, &x, batch, &w);
    assert!(grads.is_empty());
    let relu = |v: &[f64]| v.iter().map(|&t| t.max(0.0)).collect::<Vec<_>>();
    let (x64, w64) = (to64(&x), to64(&w));
    assert_forward_close("relu forward", &y, &relu(&x64), 0.0);
    let num = central_diff(|xp| dot(&w64, &relu(xp)), &x64, H64, None);
    assert_grad_close("relu dx", &dx, &num, TOL_ELEMENTWISE);
    // Exactly dy or exactly 0.
    for ((&d, &v), &g) in dx.iter().zip(&x).zip(&w) {
        assert_eq!(d, if v > 0.0 { g } else { 0.0 });
    }
}

/// relu(x) = x where x > 0 or x is NaN, +0.0 elsewhere: a NaN propagates (IEEE 754, PyTorch),
/// −0.0 becomes +0.0, and the backward lets dy through exactly where the forward kept x —
/// gradient 0 at x = 0 (PyTorch's convention), dy at a NaN.
#[test]
fn relu_propagates_nan_and_has_gradient_zero_at_zero() {
    let x = [
        f32::NAN,
        -f32::NAN,
        0.0,
        -0.0,
        -1.0,
        2.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    let mut layer = Relu { size: x.len() };
    let mut y = vec![1.0; x.len()];
    layer.forward(&x, 1, &mut y, Mode::Train).unwrap();
    assert!(y[0].is_nan() && y[1].is_nan(), "NaN propagates: {y:?}");
    let bits: Vec<u32> = y[2..].iter().map(|v| v.to_bits()).collect();
    let want: Vec<u32> = [0.0f32, 0.0, 0.0, 2.0, f32::INFINITY, 0.0]
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(bits, want, "+0.0 where x ≤ 0, x where x > 0");
    let dy: Vec<f32> = (1..=x.len()).map(|v| v as f32).collect();
    let mut dx = vec![f32::NAN; x.len()];
    layer.backward(&x, &y, &dy, 1, Some(&mut dx)).unwrap();
    assert_eq!(dx, [1.0, 2.0, 0.0, 0.0, 0.0, 6.0, 7.0, 0.0]);
}

// ---------------------------------------------------------------------------------------------
// Batch norm

/// Algorithm 1 in f64 on `[batch, channels, spatial]`.
fn bn_ref(x: &[f64], gamma: &[f64], beta: &[f64], batch: usize, channels: usize, spatial: usize, eps: f64) -> Vec<f64> {
    let m = (batch * spatial) as f64;
    let at = |n: usize, c: usize, s: usize| n * channels * spatial + c * spatial + s;
    let mut y = vec![0.0; x.len()];
    for c in 0..channels {
        let mut mean = 0.0;
        for n in 0..batch {
            for s in 0..spatial {
                mean += x[at(n, c, s)];
            }
        }
        mean /= m;
        let mut var = 0.0;
        for n in 0..batch {
            for s in 0..spatial {
                var += (x[at(n, c, s)] - mean).powi(2);
            }
        }
        var /= m;
        let inv = 1.0 / (var + eps).sqrt();
        for n in 0..batch {
            for s in 0..spatial {
                let i = at(n, c, s);
                y[i] = gamma[c] * (x[i] - mean) * inv + beta[c];
            }
        }
    }
    y
}

/// A BN layer with γ, β drawn at random, and an input whose channels have different means and
/// spreads (so that a gradient that ignores the mean or the variance term is caught).
fn bn_case(seed: u64, batch: usize, channels: usize, spatial: usize) -> (BatchNormLayer, Vec<f32>, Vec<f32>) {
    let mut r = rng(seed);
    let mut layer = BatchNormLayer::new(channels, spatial, BatchNormConfig::default()).expect("bn");
    layer.bn.gamma = uniform(&mut r, channels, 0.5, 2.0);
    layer.bn.beta = normal(&mut r, channels, 0.0, 1.0);
    let offsets = normal(&mut r, channels, 0.0, 3.0);
    let spreads = uniform(&mut r, channels, 0.5, 3.0);
    let mut x = vec![0.0f32; batch * channels * spatial];
    for (i, v) in x.iter_mut().enumerate() {
        let c = (i / spatial) % channels;
        *v = offsets[c] + spreads[c] * r.sample::<f32, _>(StandardNormal);
    }
    let w = normal(&mut r, x.len(), 0.0, 1.0);
    (layer, x, w)
}

/// The largest magnitude of the terms of BN's ∂L/∂x: |γ|/σ·(|dy| + mean|dy| + |x̂|·mean|dy·x̂|)
/// (with dy = `w`). With a batch of 2 the exact dx is nearly 0 (x̂ = ±1 and the terms cancel up to
/// ε's effect) and what remains of the `f32` kernel's result is its rounding of these terms
/// (≤ 2·ε_f32 of them, see the batchnorm crate), so they set the scale of the comparison.
fn bn_dx_terms(x: &[f64], w: &[f64], gamma: &[f64], batch: usize, channels: usize, spatial: usize, eps: f64) -> f64 {
    let m = (batch * spatial) as f64;
    let idx = |c: usize| (0..batch).flat_map(move |n| (0..spatial).map(move |s| (n * channels + c) * spatial + s));
    let mut worst = 0.0f64;
    for (c, g) in gamma.iter().enumerate().take(channels) {
        let mean = idx(c).map(|i| x[i]).sum::<f64>() / m;
        let var = idx(c).map(|i| (x[i] - mean) * (x[i] - mean)).sum::<f64>() / m;
        let inv = 1.0 / (var + eps).sqrt();
        let mdy = idx(c).map(|i| w[i].abs()).sum::<f64>() / m;
        let mdyx = idx(c).map(|i| (w[i] * (x[i] - mean) * inv).abs()).sum::<f64>() / m;
        for i in idx(c) {
            let xhat = (x[i] - mean) * inv;
            worst = worst.max(g.abs() * inv * (w[i].abs() + mdy + xhat.abs() * mdyx));
        }
    }
    worst
}

fn check_batchnorm(seed: u64, batch: usize, channels: usize, spatial: usize) {
    let (mut layer, x, w) = bn_case(seed, batch, channels, spatial);
    let what = format!("batchnorm N={batch} C={channels} S={spatial}");
    let eps = layer.bn.config.eps;
    let (g64, b64) = (to64(&layer.bn.gamma), to64(&layer.bn.beta));
    let (y, dx, grads) = analytic(&mut layer, &x, batch, &w);
    assert_eq!(names(&grads), vec!["gamma", "beta"], "{what}: parameters");
    let (x64, w64) = (to64(&x), to64(&w));
    let f = |x: &[f64], g: &[f64], b: &[f64]| dot(&w64, &bn_ref(x, g, b, batch, channels, spatial, eps));
    assert_forward_close(
        &format!("{what} forward"),
        &y,
        &bn_ref(&x64, &g64, &b64, batch, channels, spatial, eps),
        1e-5,
    );
    let num = central_diff(|xp| f(xp, &g64, &b64), &x64, H64, None);
    let terms = bn_dx_terms(&x64, &w64, &g64, batch, channels, spatial, eps);
    assert_grad_close_at(&format!("{what} dx"), &dx, &num, terms, TOL);
    let num = central_diff(|gp| f(&x64, gp, &b64), &g64, H64, None);
    assert_grad_close(&format!("{what} dgamma"), grad(&grads, "gamma"), &num, TOL);
    let num = central_diff(|bp| f(&x64, &g64, bp), &b64, H64, None);
    assert_grad_close(&format!("{what} dbeta"), grad(&grads, "beta"), &num, TOL);
}

#[test]
fn batchnorm_spatial_1_matches_finite_differences() {
    check_batchnorm(20, 8, 4, 1);
    // The smallest batch batch norm accepts.
    check_batchnorm(21, 2, 3, 1);
}

#[test]
fn batchnorm_spatial_gt_1_matches_finite_differences() {
    check_batchnorm(22, 5, 3, 4);
    check_batchnorm(23, 2, 2, 7);
}

/// Black-box check in `f32`: finite differences of the layer itself (no re-implementation) of
/// L = Σ w⊙y, summed in `f64` from the layer's `f32` outputs.
///
/// Step: h = 1e-2·σ_c, 1 % of the channel's spread. Truncation error of the central difference:
/// h²/6·∂³L ~ (h/σ)²·|∂L| ≈ 1e-4 relative. Rounding: each of the N outputs carries ≈ 1 ulp of
/// |y| ≲ 4 (≈ 2.4e-7), so L carries ≈ √N·2.4e-7 ≈ 2e-6 (N ≤ 60), which divided by 2h ≥ 0.01
/// gives ≲ 2e-4, against gradient entries of order γ/σ·|w| ~ 0.3–3, i.e. ≲ 2e-4 of the scale.
/// Tolerance 1e-3 of (|numeric| + scale) leaves a margin of ≥ 5× over that estimate (measured
/// worst 8.9e-6, ~100×), while a wrong formula is still off by order 1.
#[test]
fn batchnorm_black_box_f32() {
    const TOL_F32: f64 = 1e-3;
    for &(seed, batch, channels, spatial) in &[(30u64, 8usize, 4usize, 1usize), (31, 5, 3, 4)] {
        let (mut layer, x, w) = bn_case(seed, batch, channels, spatial);
        let what = format!("batchnorm f32 black box N={batch} C={channels} S={spatial}");
        let (_, dx, grads) = analytic(&mut layer, &x, batch, &w);
        let loss = |layer: &mut BatchNormLayer, x: &[f32]| -> f64 {
            let mut y = vec![0.0f32; x.len()];
            layer.forward(x, batch, &mut y, Mode::Train).expect("forward");
            w.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        // Per-channel spread of x, for the step.
        let m = (batch * spatial) as f64;
        let sigma: Vec<f64> = (0..channels)
            .map(|c| {
                let vals: Vec<f64> = (0..x.len())
                    .filter(|i| (i / spatial) % channels == c)
                    .map(|i| x[i] as f64)
                    .collect();
                let mean = vals.iter().sum::<f64>() / m;
                (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / m).sqrt()
            })
            .collect();
        let mut num = Vec::new();
        let mut xp = x.clone();
        for i in 0..x.len() {
            let h = (1e-2 * sigma[(i / spatial) % channels]) as f32;
            xp[i] = x[i] + h;
            let up = loss(&mut layer, &xp);
            xp[i] = x[i] - h;
            let down = loss(&mut layer, &xp);
            xp[i] = x[i];
            // The step actually taken, after rounding x ± h to f32.
            num.push((up - down) / ((x[i] + h) as f64 - (x[i] - h) as f64));
        }
        assert_grad_close(&format!("{what} dx"), &dx, &num, TOL_F32);
        // γ and β: L is linear in β and in γ, so any step works; h = 1e-2.
        for (k, name) in ["gamma", "beta"].iter().enumerate() {
            let mut num = Vec::new();
            for c in 0..channels {
                let orig = if k == 0 { layer.bn.gamma[c] } else { layer.bn.beta[c] };
                let set = |layer: &mut BatchNormLayer, v: f32| {
                    if k == 0 {
                        layer.bn.gamma[c] = v
                    } else {
                        layer.bn.beta[c] = v
                    }
                };
                let h = 1e-2f32;
                set(&mut layer, orig + h);
                let up = loss(&mut layer, &x);
                set(&mut layer, orig - h);
                let down = loss(&mut layer, &x);
                set(&mut layer, orig);
                num.push((up - down) / ((orig + h) as f64 - (orig - h) as f64));
            }
            assert_grad_close(&format!("{what} d{name}"), grad(&grads, name), &num, TOL_F32);
        }
    }
}

/// Backward needs the statistics of a training forward; without one it is an error, not a panic.
#[test]
fn batchnorm_backward_without_training_forward_is_an_error() {
    let mut layer = BatchNormLayer::new(2, 1, BatchNormConfig::default()).unwrap();
    let x = [1.0f32, 2.0, 3.0, 5.0];
    let mut y = [0.0f32; 4];
    layer.forward(&x, 2, &mut y, Mode::Eval).unwrap();
    let mut dx = [0.0f32; 4];
    assert!(layer.backward(&x, &y, &[1.0; 4], 2, Some(&mut dx)).is_err());
}

// ---------------------------------------------------------------------------------------------
// Softmax cross-entropy

/// Mean over rows of log Σ exp(z) − z_label, in f64.
fn ce_ref(logits: &[f64], labels: &[u8], classes: usize) -> f64 {
    let mut total = 0.0;
    for (row, &l) in logits.chunks_exact(classes).zip(labels) {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
        total += lse - row[l as usize];
    }
    total / labels.len() as f64
}

fn check_ce(what: &str, logits: &[f32], labels: &[u8], classes: usize) {
    let mut ce = SoftmaxCrossEntropy::default();
    let loss = ce.forward(logits, labels, classes).expect("forward");
    let mut d = vec![f32::NAN; logits.len()];
    ce.backward(labels, classes, &mut d);
    let l64 = to64(logits);
    let reference = ce_ref(&l64, labels, classes);
    assert!(
        (loss as f64 - reference).abs() <= 1e-5 * reference.abs().max(1.0),
        "{what}: loss {loss}, f64 reference {reference}"
    );
    let num = central_diff(|z| ce_ref(z, labels, classes), &l64, H64, None);
    assert_grad_close(&format!("{what} dlogits"), &d, &num, TOL);
}

#[test]
fn softmax_cross_entropy_matches_finite_differences() {
    let mut r = rng(40);
    let (batch, classes) = (7, 5);
    let logits = normal(&mut r, batch * classes, 0.5, 2.0);
    let labels: Vec<u8> = (0..batch).map(|_| r.gen_range(0..classes as u8)).collect();
    check_ce("softmax CE", &logits, &labels, classes);
}

/// Large logits (|z| ~ 1000) must not overflow: the loss is computed relative to the row maximum.
#[test]
fn softmax_cross_entropy_large_logits_are_stable() {
    let mut r = rng(41);
    let (batch, classes) = (4, 3);
    let logits: Vec<f32> = normal(&mut r, batch * classes, 0.0, 1.0)
        .into_iter()
        .enumerate()
        .map(|(i, v)| v + if i % 2 == 0 { 1000.0 } else { -1000.0 })
        .collect();
    let labels = [0u8, 1, 2, 0];
    let mut ce = SoftmaxCrossEntropy::default();
    let loss = ce.forward(&logits, &labels, classes).unwrap();
    assert!(loss.is_finite(), "loss {loss}");
    let mut d = vec![0.0f32; logits.len()];
    ce.backward(&labels, classes, &mut d);
    assert!(d.iter().all(|v| v.is_finite()));
    // Each row of the gradient sums to 0 (softmax sums to 1, minus the one-hot).
    for row in d.chunks_exact(classes) {
        assert!(row.iter().sum::<f32>().abs() < 1e-6);
    }
    let reference = ce_ref(&to64(&logits), &labels, classes);
    assert!((loss as f64 - reference).abs() <= 1e-4 * reference.abs().max(1.0));
}

#[test]
fn softmax_cross_entropy_rejects_bad_labels_and_lengths() {
    let mut ce = SoftmaxCrossEntropy::default();
    assert!(ce.forward(&[0.0; 6], &[0, 3], 3).is_err(), "label 3 of 3 classes");
    assert!(ce.forward(&[0.0; 5], &[0, 1], 3).is_err(), "5 logits for 2×3");
    assert!(ce.forward(&[], &[], 0).is_err(), "0 classes");
}

// ---------------------------------------------------------------------------------------------
// A whole network: Linear → BN → Sigmoid → Linear → softmax cross-entropy

/// Mean cross-entropy of the network, in f64, as a function of all parameters concatenated in
/// `Sequential::params` order: W1 `[h, d]`, γ `[h]`, β `[h]`, W2 `[k, h]`, b2 `[k]`.
#[allow(clippy::too_many_arguments)]
fn net_ref(p: &[f64], x: &[f64], labels: &[u8], batch: usize, d: usize, h: usize, k: usize, eps: f64) -> f64 {
    let (w1, rest) = p.split_at(h * d);
    let (gamma, rest) = rest.split_at(h);
    let (beta, rest) = rest.split_at(h);
    let (w2, b2) = rest.split_at(k * h);
    let a = linear_ref(x, w1, None, batch, d, h);
    let z = bn_ref(&a, gamma, beta, batch, h, 1, eps);
    let s: Vec<f64> = z.iter().map(|&t| 1.0 / (1.0 + (-t).exp())).collect();
    let logits = linear_ref(&s, w2, Some(b2), batch, h, k);
    ce_ref(&logits, labels, k)
}

#[test]
fn sequential_linear_bn_sigmoid_linear_matches_finite_differences() {
    let mut r = rng(50);
    let (batch, d, h, k) = (8, 6, 5, 3);
    let mut bn = BatchNormLayer::new(h, 1, BatchNormConfig::default()).unwrap();
    bn.bn.gamma = uniform(&mut r, h, 0.5, 2.0);
    bn.bn.beta = normal(&mut r, h, 0.0, 0.5);
    let eps = bn.bn.config.eps;
    let mut out = Linear::new(h, k, true, 0.8, &mut r);
    out.bias = Some(normal(&mut r, k, 0.0, 0.5));
    let layers: Vec<Box<dyn Layer>> = vec![
        Box::new(Linear::new(d, h, false, 0.5, &mut r)),
        Box::new(bn),
        Box::new(Sigmoid { size: h }),
        Box::new(out),
    ];
    let mut net = Sequential::new(layers).unwrap();
    let x = normal(&mut r, batch * d, 0.2, 1.0);
    let labels: Vec<u8> = (0..batch).map(|_| r.gen_range(0..k as u8)).collect();

    let logits = net.forward(&x, batch, Mode::Train).unwrap().to_vec();
    let mut ce = SoftmaxCrossEntropy::default();
    let loss = ce.forward(&logits, &labels, k).unwrap();
    let mut dlogits = vec![0.0f32; logits.len()];
    ce.backward(&labels, k, &mut dlogits);
    net.backward(&dlogits).unwrap();

    let params = net.params();
    let shapes: Vec<(&str, usize)> = params.iter().map(|p| (p.name, p.value.len())).collect();
    assert_eq!(
        shapes,
        vec![
            ("weight", h * d),
            ("gamma", h),
            ("beta", h),
            ("weight", k * h),
            ("bias", k)
        ]
    );
    let values: Vec<f64> = params.iter().flat_map(|p| to64(p.value)).collect();
    let grads: Vec<Vec<f32>> = params.iter().map(|p| p.grad.to_vec()).collect();
    drop(params);

    let x64 = to64(&x);
    let f = |p: &[f64]| net_ref(p, &x64, &labels, batch, d, h, k, eps);
    let reference = f(&values);
    assert!(
        (loss as f64 - reference).abs() <= 1e-5 * reference,
        "loss {loss}, f64 reference {reference}"
    );
    let num = central_diff(f, &values, H64, None);
    let mut at = 0;
    for ((name, len), g) in shapes.iter().zip(&grads) {
        assert_grad_close(&format!("network d{name}@{at}"), g, &num[at..at + len], TOL);
        at += len;
    }
}
