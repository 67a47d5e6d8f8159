//! Adversarial data for Algorithm 1's statistics (μ_B = (1/m)Σxᵢ, σ²_B = (1/m)Σ(xᵢ − μ_B)²):
//! a large offset with a small spread (where E[x²] − E[x]² cancels catastrophically), constant
//! channels (σ²_B = 0), huge and tiny magnitudes, a batch of two, and NaN/Inf values (IEEE
//! propagation confined to their channel).

use crate::common::*;
use batchnorm::{
    batch_norm_backward, batch_norm_eval, batch_stats, reference, Affine, FixedStats, Grads, Layout, View,
};

/// Neumaier-compensated sum: error ≈ u·|Σ| instead of m·u·Σ|terms|. Used to get "exact" statistics
/// of badly conditioned data.
fn accurate_sum(v: impl Iterator<Item = f64>) -> f64 {
    let (mut s, mut comp) = (0.0f64, 0.0f64);
    for x in v {
        let t = s + x;
        comp += if s.abs() >= x.abs() { (s - t) + x } else { (x - t) + s };
        s = t;
    }
    s + comp
}

/// Mean and biased variance per channel, both with compensated sums (two passes).
fn accurate_mean_var(g: &batchnorm::Geometry, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
    (0..g.channels)
        .map(|c| {
            let v = reference::channel_values(g, x, c);
            let m = accurate_sum(v.iter().copied()) / v.len() as f64;
            // Correct the mean by the compensated mean of the deviations.
            let m = m + accurate_sum(v.iter().map(|a| a - m)) / v.len() as f64;
            let var = accurate_sum(v.iter().map(|a| (a - m) * (a - m))) / v.len() as f64;
            (m, var)
        })
        .unzip()
}

/// Data with per-channel mean `offset` and standard deviation `spread`, rounded to `T`.
fn offset_data<T: PlainFloat>(layout: Layout, shape: &[usize], offset: f64, spread: f64, seed: u64) -> Vec<T> {
    let g = layout.geometry(shape).unwrap();
    let mut r = rng(seed);
    narrow(
        &normals(&mut r, g.len())
            .iter()
            .map(|z| offset + spread * z)
            .collect::<Vec<f64>>(),
    )
}

/// Large offset, small spread: μ = 1e4, σ = 1e-2 in f32 (the spread is ~10 ulp of the offset),
/// μ = 1e8, σ = 1 in f64. The computed mean must be within `mean_tol`·σ of the exact mean and the
/// variance within `var_rel` of the exact variance of the same values (a naive E[x²] − E[x]² in
/// f64 is off by ≈ u·μ²/σ² ≈ 1e-4 relative for the f32 case and ≈ 1 for the f64 case); x̂ must
/// have mean 0 and unit variance.
fn check_offset<T: PlainFloat>(offset: f64, spread: f64, mean_tol: f64, var_rel: f64, unit_tol: f64) {
    let eps = 1e-14 * spread * spread; // ε ≪ σ² so that x̂ has unit variance.
    for (i, (layout, shape)) in [
        (Layout::NCHW, vec![8, 3, 16, 16]),
        (Layout::NCHW, vec![2, 17, 64, 64]),
        (Layout::NC, vec![4096, 3]),
        (Layout::NHWC, vec![4, 32, 32, 3]),
        (Layout::ChannelsFirst, vec![3, 2, 9000]),
    ]
    .into_iter()
    .enumerate()
    {
        let what = format!("{layout} {shape:?} {} μ={offset:e} σ={spread:e}", T::NAME);
        let g = layout.geometry(&shape).unwrap();
        let x = offset_data::<T>(layout, &shape, offset, spread, 40 + i as u64);
        let xw = wide(&x);
        let (emean, evar) = accurate_mean_var(&g, &xw);
        let (y, stats, _) = train(View::new(&x, &shape, layout), Affine::NONE, eps);
        let var = stats.var_biased();
        for c in 0..g.channels {
            let sd = evar[c].sqrt();
            assert!(
                (stats.mean[c] - emean[c]).abs() <= mean_tol * sd,
                "{what}: mean[{c}] {} vs exact {} (σ {sd:e})",
                stats.mean[c],
                emean[c]
            );
            assert!(
                (var[c] - evar[c]).abs() <= var_rel * evar[c],
                "{what}: var[{c}] {:e} vs exact {:e}",
                var[c],
                evar[c]
            );
            let yc = channel(&g, &y, c);
            let ym = yc.iter().sum::<f64>() / yc.len() as f64;
            let yv = yc.iter().map(|v| (v - ym) * (v - ym)).sum::<f64>() / yc.len() as f64;
            assert!(ym.abs() <= unit_tol, "{what}: mean of x̂[{c}] = {ym:e}");
            assert!((yv - 1.0).abs() <= unit_tol, "{what}: variance of x̂[{c}] = {yv}");
        }
        // batch_stats is the same computation.
        let s = batch_stats(View::new(&x, &shape, layout)).unwrap();
        assert_eq!(s, stats);
    }
}

/// f32, μ = 1e4, σ = 1e-2 (ulp(1e4) ≈ 1e-3): mean within 1e-6·σ, variance within 1e-6 relative
/// (the f64 kernels do far better; a naive E[x²] − E[x]² is off by ~1e-4), x̂ moments within 1e-3.
#[test]
fn large_offset_small_spread_f32() {
    check_offset::<f32>(1e4, 1e-2, 1e-6, 1e-6, 1e-3);
}

/// f64, μ = 1e8, σ = 1: ulp(1e8) = 1.5e-8, so the mean can only be within a few 1e-8·σ. The
/// variance's condition number is κ ≈ |μ|/σ = 1e8; stable algorithms (corrected two-pass,
/// Chan's pairwise merge, whose partial means are themselves rounded at ulp(μ)) guarantee a
/// relative error of O(u·κ) ≈ 1e-8, so the variance is asked within 1e-8 relative (measured:
/// ~1e-10); a naive E[x²] − E[x]² has an absolute error ~u·μ² ≈ 1, i.e. ~100 % here. x̂ moments
/// within 1e-7.
#[test]
fn large_offset_f64() {
    check_offset::<f64>(1e8, 1.0, 1e-7, 1e-8, 1e-7);
}

/// A constant channel: σ²_B = 0 exactly, μ_B = the constant exactly, y = β exactly (x − μ_B = 0),
/// and backward stays finite: x̂ = 0 so dx = γ/√ε·(dy − Σdy/m) and dγ = 0.
fn check_constant<T: PlainFloat>(layout: Layout, shape: &[usize], value: f64, seed: u64) {
    let d = Data::new::<T>(layout, shape, seed);
    let g = d.g;
    let mut xw = d.x.clone();
    let cc = g.channels / 2; // the constant channel
    for (k, v) in xw.iter_mut().enumerate() {
        if channel_of(&g, k) == cc {
            *v = value;
        }
    }
    let x = narrow::<T>(&xw);
    let value = wide(&x)[(0..x.len()).find(|&k| channel_of(&g, k) == cc).unwrap()];
    let (gamma, beta) = (narrow::<T>(&d.gamma), narrow::<T>(&d.beta));
    let eps = 1e-5;
    let what = format!("{layout} {shape:?} {} constant {value}", T::NAME);
    for affine in [true, false] {
        let (y, stats, saved) = train(View::new(&x, shape, layout), affine_if(affine, &gamma, &beta), eps);
        assert_eq!(stats.mean[cc], value, "{what}: mean");
        assert_eq!(stats.m2[cc], 0.0, "{what}: M2");
        let b = if affine { beta[cc].to_f64() } else { 0.0 };
        for (k, v) in y.iter().enumerate() {
            if channel_of(&g, k) == cc {
                assert_eq!(v.to_f64(), b, "{what}: y[{k}] must be β exactly (affine={affine})");
            }
        }
        let dy = narrow::<T>(&d.dy);
        let (dx, dg, db) = backward_all(View::new(&x, shape, layout), &dy, &saved, opt(&gamma, affine));
        assert!(
            dx.iter().chain(&dg).chain(&db).all(|v| v.to_f64().is_finite()),
            "{what}: finite gradients"
        );
        assert_eq!(dg[cc].to_f64(), 0.0, "{what}: dγ of a constant channel");
        let gc = if affine { gamma[cc].to_f64() } else { 1.0 };
        let dyc = channel(&g, &dy, cc);
        let mean_dy = dyc.iter().sum::<f64>() / dyc.len() as f64;
        let k = gc / eps.sqrt();
        let mean_abs_dy = dyc.iter().map(|a| a.abs()).sum::<f64>() / dyc.len() as f64;
        let mut j = 0;
        for (idx, v) in dx.iter().enumerate() {
            if channel_of(&g, idx) == cc {
                let want = k * (dyc[j] - mean_dy);
                let scale = k.abs() * (dyc[j].abs() + mean_abs_dy);
                let t = tol::<T>(want, scale, reduce_rel::<T>(dyc.len()));
                assert!((v.to_f64() - want).abs() <= t, "{what}: dx[{idx}] {v:?} vs {want}");
                j += 1;
            }
        }
    }
}

#[test]
fn constant_channel() {
    for (i, (layout, shape)) in [
        (Layout::NC, vec![7, 3]),
        (Layout::NC, vec![2, 5]),
        (Layout::NCHW, vec![3, 2, 5, 5]),
        (Layout::NCHW, vec![3, 20, 5, 5]),
        (Layout::NHWC, vec![3, 5, 5, 4]),
        (Layout::ChannelsFirst, vec![2, 3, 10_001]),
        (Layout::NC, vec![9001, 2]),
        (Layout::NC, vec![5000, 64]),
    ]
    .into_iter()
    .enumerate()
    {
        for value in [0.1, 3.7, -1e4, 0.0, 1e-30, 7e18] {
            check_constant::<f32>(layout, &shape, value, i as u64);
            check_constant::<f64>(layout, &shape, value, i as u64);
        }
    }
}

/// Magnitudes far from 1: x scaled by `k` (f32 data, statistics in f64), against the reference.
/// Algorithm 1 is scale-invariant when ε ≪ σ²: x̂ must keep unit variance.
fn check_magnitude<T: PlainFloat>(k: f64, eps: f64) {
    for (i, (layout, shape)) in [
        (Layout::NCHW, vec![4, 3, 8, 9]),
        (Layout::NC, vec![300, 5]),
        (Layout::NHWC, vec![2, 6, 7, 20]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut d = Data::new::<T>(layout, &shape, 80 + i as u64);
        d.x = wide(&narrow::<T>(&d.x.iter().map(|v| v * k).collect::<Vec<f64>>()));
        let g = d.g;
        let what = format!("{layout} {shape:?} {} scale {k:e}", T::NAME);
        let x = narrow::<T>(&d.x);
        let (gamma, beta) = (narrow::<T>(&d.gamma), narrow::<T>(&d.beta));
        let (y, _, saved) = train(View::new(&x, &shape, layout), Affine::new(&gamma, &beta), eps);
        let (ry, rmean, rvar) = reference::forward_train(&g, &d.x, &d.gamma, &d.beta, eps);
        assert!(y.iter().all(|v| v.to_f64().is_finite()), "{what}: finite y");
        let rel = reduce_rel::<T>(g.per_channel());
        let scale = train_y_scale(&d, &d.gamma, &d.beta, &rmean, &rvar, eps);
        assert_close(&format!("{what} y"), &y, &ry, &scale, rel);

        let dy = narrow::<T>(&d.dy);
        let (dx, dg, db) = backward_all(View::new(&x, &shape, layout), &dy, &saved, Some(&gamma));
        let (rdx, rdg, rdb) = reference::backward_train(&g, &d.x, &d.dy, &d.gamma, eps);
        let (sdx, sdg, sdb) = backward_scales(&d, &d.dy, &d.gamma, eps);
        assert_close(&format!("{what} dx"), &dx, &rdx, &sdx, rel);
        assert_close(&format!("{what} dgamma"), &dg, &rdg, &sdg, rel);
        assert_close(&format!("{what} dbeta"), &db, &rdb, &sdb, rel);

        // Without affine and with ε ≪ σ², x̂ has unit variance whatever the magnitude.
        if eps < 1e-6 * k * k {
            let (y, _, _) = train(View::new(&x, &shape, layout), Affine::NONE, eps);
            for c in 0..g.channels {
                let yc = channel(&g, &y, c);
                let v = yc.iter().map(|a| a * a).sum::<f64>() / yc.len() as f64;
                assert!((v - 1.0).abs() < 1e-5, "{what}: variance of x̂[{c}] = {v}");
            }
        }
    }
}

#[test]
fn huge_and_tiny_magnitudes() {
    check_magnitude::<f32>(1e18, 1e-5);
    check_magnitude::<f32>(1e37, 1e-5); // squares of ~1e38 overflow f32 but not f64
    check_magnitude::<f32>(1e-30, 1e-5); // σ² ≪ ε: y ≈ β
    check_magnitude::<f32>(1e-30, 1e-70);
    check_magnitude::<f64>(1e100, 1e-5); // the reference's (σ² + ε)^(−3/2) stays normal
    check_magnitude::<f64>(1e-100, 1e-5);
    check_magnitude::<f64>(1e-100, 1e-205);
}

/// A batch of two (NC [2, C]): μ_B = (x₁ + x₂)/2, σ²_B = ((x₁ − x₂)/2)², so x̂ = ±|x₁ − x₂|/2/√(σ²_B + ε)
/// (→ ±1 for ε ≪ σ²_B), against the reference forward and backward.
#[test]
fn batch_of_two() {
    for c in [1usize, 3, 17, 64] {
        let shape = [2, c];
        for seed in 0..4 {
            for eps in [1e-5, 1e-12] {
                check_pair::<f32>(&shape, seed, eps);
                check_pair::<f64>(&shape, seed, eps);
            }
        }
    }
}

fn check_pair<T: PlainFloat>(shape: &[usize], seed: u64, eps: f64) {
    let d = Data::new::<T>(Layout::NC, shape, seed);
    let x = narrow::<T>(&d.x);
    let (y, _, saved) = train(View::new(&x, shape, Layout::NC), Affine::NONE, eps);
    let (gamma, beta) = d.ones_zeros();
    let (ry, rmean, rvar) = reference::forward_train(&d.g, &d.x, &gamma, &beta, eps);
    let rel = reduce_rel::<T>(2);
    assert_close(
        "pair y",
        &y,
        &ry,
        &train_y_scale(&d, &gamma, &beta, &rmean, &rvar, eps),
        rel,
    );
    let c = shape[1];
    for ch in 0..c {
        let (a, b) = (y[ch].to_f64(), y[c + ch].to_f64());
        // x₁ − μ_B and x₂ − μ_B are exact up to the rounding of μ_B, ≤ u·|μ_B|, i.e. relative
        // u·|μ_B|/|x₁ − x₂|·2 of x̂; plus the final rounding to T.
        let (x1, x2) = (d.x[ch], d.x[c + ch]);
        let t = 4.0 * T::EPS + 8.0 * U * (x1.abs() + x2.abs()) / (x1 - x2).abs();
        assert!((a + b).abs() <= t, "pair: x̂ sums to 0: {a} + {b}");
        let expect = (rvar[ch] / (rvar[ch] + eps)).sqrt();
        assert!((a.abs() - expect).abs() <= t, "pair: |x̂| = {a} vs {expect}");
        assert_eq!(a > b, d.x[ch] > d.x[c + ch], "pair: order kept");
    }
    let dy = narrow::<T>(&d.dy);
    let mut dx = vec![T::from_f64(0.0); x.len()];
    batch_norm_backward(View::new(&x, shape, Layout::NC), &dy, &saved, None, Grads::dx(&mut dx)).unwrap();
    let (rdx, _, _) = reference::backward_train(&d.g, &d.x, &d.dy, &gamma, eps);
    let (sdx, _, _) = backward_scales(&d, &d.dy, &gamma, eps);
    assert_close("pair dx", &dx, &rdx, &sdx, rel);
}

/// NaN and ±Inf are data: they propagate (IEEE 754) to their channel's statistics and every output
/// of that channel, and leave the other channels exactly as without them.
fn check_nonfinite<T: PlainFloat>(layout: Layout, shape: &[usize], bad: f64) {
    let d = Data::new::<T>(layout, shape, 99);
    let g = d.g;
    let mut x = narrow::<T>(&d.x);
    let clean = x.clone();
    let k0 = (0..x.len()).find(|&k| channel_of(&g, k) == 0).unwrap() + if g.inner > 1 { 1 } else { 0 };
    assert_eq!(channel_of(&g, k0), 0);
    x[k0] = T::from_f64(bad);
    let (gamma, beta, mean, var) = (
        narrow::<T>(&d.gamma),
        narrow::<T>(&d.beta),
        narrow::<T>(&d.mean),
        narrow::<T>(&d.var),
    );
    let dy = narrow::<T>(&d.dy);
    let what = format!("{layout} {shape:?} {} with {bad} in channel 0", T::NAME);
    let (n, c) = (x.len(), g.channels);
    let z = T::from_f64(0.0);

    let run = |x: &[T]| {
        let (y, stats, saved) = train(View::new(x, shape, layout), Affine::new(&gamma, &beta), 1e-5);
        let (dx, dg, db) = backward_all(View::new(x, shape, layout), &dy, &saved, Some(&gamma));
        let mut ye = vec![z; n];
        batch_norm_eval(
            View::new(x, shape, layout),
            FixedStats::new(&mean, &var),
            Affine::new(&gamma, &beta),
            1e-5,
            &mut ye,
        )
        .unwrap();
        (y, stats, dx, dg, db, ye)
    };
    let (y, stats, dx, dg, _db, ye) = run(&x);
    let (y0, stats0, dx0, dg0, _, ye0) = run(&clean);
    assert!(stats.mean[0].is_nan() || bad.is_infinite(), "{what}: mean of channel 0");
    assert!(stats.m2[0].is_nan(), "{what}: M2 of channel 0 is NaN");
    assert!(dg[0].to_f64().is_nan(), "{what}: dγ of channel 0");
    for k in 0..n {
        if channel_of(&g, k) == 0 {
            assert!(y[k].to_f64().is_nan(), "{what}: y[{k}] of channel 0 must be NaN");
            assert!(dx[k].to_f64().is_nan(), "{what}: dx[{k}] of channel 0 must be NaN");
        } else {
            assert_eq!(
                y[k].to_f64().to_bits(),
                y0[k].to_f64().to_bits(),
                "{what}: y[{k}] unaffected"
            );
            assert_eq!(
                dx[k].to_f64().to_bits(),
                dx0[k].to_f64().to_bits(),
                "{what}: dx[{k}] unaffected"
            );
        }
        // Inference is element-wise: only the bad element itself is non-finite.
        if k == k0 {
            assert!(!ye[k].to_f64().is_finite(), "{what}: eval y at the bad element");
        } else {
            assert_eq!(
                ye[k].to_f64().to_bits(),
                ye0[k].to_f64().to_bits(),
                "{what}: eval y[{k}] unaffected"
            );
        }
    }
    for ch in 1..c {
        assert_eq!(
            stats.mean[ch].to_bits(),
            stats0.mean[ch].to_bits(),
            "{what}: mean[{ch}]"
        );
        assert_eq!(stats.m2[ch].to_bits(), stats0.m2[ch].to_bits(), "{what}: m2[{ch}]");
        assert_eq!(
            dg[ch].to_f64().to_bits(),
            dg0[ch].to_f64().to_bits(),
            "{what}: dγ[{ch}]"
        );
    }
}

#[test]
fn nan_and_inf_stay_in_their_channel() {
    for (layout, shape) in [
        (Layout::NC, vec![4, 2]),
        (Layout::NCHW, vec![2, 2, 3, 3]),
        (Layout::NHWC, vec![2, 3, 3, 2]),
        (Layout::NCHW, vec![2, 20, 3, 3]),
        (Layout::NC, vec![5000, 64]),
        (Layout::ChannelsFirst, vec![2, 3, 9000]),
    ] {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            check_nonfinite::<f32>(layout, &shape, bad);
            check_nonfinite::<f64>(layout, &shape, bad);
        }
    }
}
