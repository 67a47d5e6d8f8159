//! Folding inference batch norm into the preceding linear or convolution layer (Algorithm 2,
//! step 11: y = γ/√(Var[x] + ε)·x + (β − γE[x]/√(Var[x] + ε)) is affine, so BN(W·u + b) =
//! W'·u + b'). Checked against `batch_norm_eval` applied to the layer's output, in f64.
//!
//! Tolerance: both sides are sums of ≤ 4·3·3 + 1 = 37 products followed by a few roundings, so
//! each differs from the exact value by ≤ ~40·u·S where S = |scale|·(Σ|W||u| + |b| + |E[x]|) + |β|
//! is the sum of the magnitudes of the terms; we allow 1e-12·S (≈ 4500·u·S, still far below any
//! formula error such as a missing shift or a wrong ε).

use crate::common::*;
use batchnorm::{
    batch_norm_eval, fold_into_preceding, Affine, BatchNorm, BatchNormConfig, FixedStats, InferenceAffine, Layout, View,
};
use rand::Rng;

const FOLD_REL: f64 = 1e-12;

/// Random inference statistics and parameters for `out` channels.
fn bn_params(r: &mut rand::rngs::StdRng, out: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let mean = (0..out).map(|_| r.gen_range(-2.0..2.0)).collect();
    let var = (0..out).map(|_| r.gen_range(0.1..4.0)).collect();
    let gamma = (0..out).map(|_| r.gen_range(-2.0..2.0)).collect();
    let beta = (0..out).map(|_| r.gen_range(-1.0..1.0)).collect();
    (mean, var, gamma, beta)
}

/// The reference `batch_norm_eval` of the layer's output `z` with (mean, var, γ, β), the same
/// transform as an [`InferenceAffine`], and the layer's weights `w` and `bias` folded through it
/// (folded weights, folded bias).
fn reference_and_folded(
    z: View<'_, f64>,
    (mean, var, gamma, beta): (&[f64], &[f64], &[f64], &[f64]),
    eps: f64,
    w: &[f64],
    bias: Option<&[f64]>,
) -> (Vec<f64>, InferenceAffine, Vec<f64>, Vec<f64>) {
    let mut want = vec![0.0; z.data.len()];
    batch_norm_eval(z, FixedStats::new(mean, var), Affine::new(gamma, beta), eps, &mut want).unwrap();
    let bn = InferenceAffine::new(FixedStats::<f64>::new(mean, var), Affine::new(gamma, beta), eps).unwrap();
    let mut wf = w.to_vec();
    let bf = fold_into_preceding(&bn, bias, &mut wf).unwrap();
    (want, bn, wf, bf)
}

/// Linear layer W [out, in], b: z = u·Wᵀ + b over a batch u [N, in] (NC).
fn linear(u: &[f64], n: usize, w: &[f64], b: Option<&[f64]>, out: usize, inp: usize) -> Vec<f64> {
    (0..n * out)
        .map(|k| {
            let (s, o) = (k / out, k % out);
            (0..inp).fold(b.map_or(0.0, |b| b[o]), |acc, i| acc + w[o * inp + i] * u[s * inp + i])
        })
        .collect()
}

/// Convolution, stride 1, no padding, weight OIHW [out, in, kh, kw], input NCHW [n, in, h, w].
fn conv(u: &[f64], ushape: [usize; 4], w: &[f64], b: Option<&[f64]>, out: usize, k: usize) -> (Vec<f64>, [usize; 4]) {
    let [n, inp, h, wd] = ushape;
    let (oh, ow) = (h - k + 1, wd - k + 1);
    let mut z = vec![0.0; n * out * oh * ow];
    for s in 0..n {
        for o in 0..out {
            for yy in 0..oh {
                for xx in 0..ow {
                    let mut acc = b.map_or(0.0, |b| b[o]);
                    for i in 0..inp {
                        for ky in 0..k {
                            for kx in 0..k {
                                acc += w[((o * inp + i) * k + ky) * k + kx]
                                    * u[((s * inp + i) * h + yy + ky) * wd + xx + kx];
                            }
                        }
                    }
                    z[((s * out + o) * oh + yy) * ow + xx] = acc;
                }
            }
        }
    }
    (z, [n, out, oh, ow])
}

/// Magnitude of the terms of BN(z) at each output (see the module docs).
fn term_scale(abs_z: &[f64], g: &batchnorm::Geometry, bn: &InferenceAffine, mean: &[f64], beta: &[f64]) -> Vec<f64> {
    (0..abs_z.len())
        .map(|k| {
            let c = channel_of(g, k);
            bn.scale[c].abs() * (abs_z[k] + mean[c].abs()) + beta[c].abs()
        })
        .collect()
}

#[test]
fn fold_into_linear_layer() {
    let mut r = rng(17);
    for with_bias in [true, false] {
        let (out, inp, n) = (6, 5, 11);
        let w: Vec<f64> = normals(&mut r, out * inp);
        let b: Vec<f64> = normals(&mut r, out);
        let bias = with_bias.then_some(&b[..]);
        let (mean, var, gamma, beta) = bn_params(&mut r, out);
        let eps = 1e-5;
        let u: Vec<f64> = normals(&mut r, n * inp);

        let z = linear(&u, n, &w, bias, out, inp);
        let params = (&mean[..], &var[..], &gamma[..], &beta[..]);
        let (want, bn, wf, bf) = reference_and_folded(View::new(&z, &[n, out], Layout::NC), params, eps, &w, bias);
        assert_eq!(bf.len(), out);
        let got = linear(&u, n, &wf, Some(&bf), out, inp);

        let abs_w: Vec<f64> = w.iter().map(|v| v.abs()).collect();
        let abs_u: Vec<f64> = u.iter().map(|v| v.abs()).collect();
        let abs_b: Vec<f64> = b.iter().map(|v| v.abs()).collect();
        let abs_z = linear(&abs_u, n, &abs_w, with_bias.then_some(&abs_b[..]), out, inp);
        let g = Layout::NC.geometry(&[n, out]).unwrap();
        let scale = term_scale(&abs_z, &g, &bn, &mean, &beta);
        assert_close::<f64>(
            &format!("folded linear, bias={with_bias}"),
            &got,
            &want,
            &scale,
            FOLD_REL,
        );
    }
}

#[test]
fn fold_into_conv_layer() {
    let mut r = rng(23);
    for with_bias in [true, false] {
        let (out, inp, k) = (5, 4, 3);
        let ushape = [2, inp, 7, 6];
        let w: Vec<f64> = normals(&mut r, out * inp * k * k);
        let b: Vec<f64> = normals(&mut r, out);
        let bias = with_bias.then_some(&b[..]);
        let (mean, var, gamma, beta) = bn_params(&mut r, out);
        let eps = 1e-3;
        let u: Vec<f64> = normals(&mut r, ushape.iter().product());

        let (z, zshape) = conv(&u, ushape, &w, bias, out, k);
        let params = (&mean[..], &var[..], &gamma[..], &beta[..]);
        let (want, bn, wf, bf) = reference_and_folded(View::new(&z, &zshape, Layout::NCHW), params, eps, &w, bias);
        let (got, _) = conv(&u, ushape, &wf, Some(&bf), out, k);

        let abs = |v: &[f64]| v.iter().map(|a| a.abs()).collect::<Vec<f64>>();
        let abs_b = abs(&b);
        let (abs_z, _) = conv(&abs(&u), ushape, &abs(&w), with_bias.then_some(&abs_b[..]), out, k);
        let g = Layout::NCHW.geometry(&zshape).unwrap();
        let scale = term_scale(&abs_z, &g, &bn, &mean, &beta);
        assert_close::<f64>(&format!("folded conv, bias={with_bias}"), &got, &want, &scale, FOLD_REL);
    }
}

/// The layer's `inference_affine` folds like its own `forward_eval` (no affine: γ = 1, β = 0).
#[test]
fn fold_from_layer_without_affine() {
    let mut r = rng(5);
    let (out, inp, n) = (3, 4, 9);
    let mut bn = BatchNorm::<f64>::new(
        out,
        BatchNormConfig {
            affine: false,
            ..BatchNormConfig::default()
        },
    )
    .unwrap();
    let (mean, var, _, _) = bn_params(&mut r, out);
    bn.running_mean = mean.clone();
    bn.running_var = var.clone();
    let w: Vec<f64> = normals(&mut r, out * inp);
    let u: Vec<f64> = normals(&mut r, n * inp);
    let z = linear(&u, n, &w, None, out, inp);
    let mut want = vec![0.0; z.len()];
    bn.forward_eval(View::new(&z, &[n, out], Layout::NC), &mut want)
        .unwrap();
    let affine = bn.inference_affine().unwrap();
    let mut wf = w.clone();
    let bf = fold_into_preceding(&affine, None, &mut wf).unwrap();
    let got = linear(&u, n, &wf, Some(&bf), out, inp);
    let abs = |v: &[f64]| v.iter().map(|a| a.abs()).collect::<Vec<f64>>();
    let abs_z = linear(&abs(&u), n, &abs(&w), None, out, inp);
    let g = Layout::NC.geometry(&[n, out]).unwrap();
    let scale = term_scale(&abs_z, &g, &affine, &mean, &[0.0; 3]);
    assert_close::<f64>("folded from layer", &got, &want, &scale, FOLD_REL);
}

/// `InferenceAffine` is scale = γ/√(Var + ε), shift = β − E[x]·scale (Algorithm 2, step 11).
#[test]
fn inference_affine_formula() {
    let mut r = rng(3);
    let (mean, var, gamma, beta) = bn_params(&mut r, 7);
    let eps = 0.01;
    let a = InferenceAffine::new(FixedStats::<f64>::new(&mean, &var), Affine::new(&gamma, &beta), eps).unwrap();
    for c in 0..7 {
        let s = gamma[c] / (var[c] + eps).sqrt();
        assert!((a.scale[c] - s).abs() <= 1e-15 * s.abs());
        let t = beta[c] - mean[c] * s;
        assert!((a.shift[c] - t).abs() <= 1e-15 * (beta[c].abs() + (mean[c] * s).abs()));
    }
    let plain = InferenceAffine::new(FixedStats::new(&mean, &var), Affine::<f64>::NONE, eps).unwrap();
    for c in 0..7 {
        let s = 1.0 / (var[c] + eps).sqrt();
        assert!((plain.scale[c] - s).abs() <= 1e-15 * s);
        assert!((plain.shift[c] + mean[c] * s).abs() <= 1e-15 * (mean[c] * s).abs());
    }
}
