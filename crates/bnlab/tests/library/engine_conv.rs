//! Tests of the convolutional layers of `bnlab::engine`: `Conv2d` (also as `Conv2d::conv1d`),
//! `MaxPool2d`, `Dropout`, `Lrn`, and the padded-sequence layers `ZeroMasked` and
//! `MaskedMeanPool` with their `PositionMask`.
//!
//! Forward passes are checked against direct f64 implementations written here from the
//! definitions; backward passes against central finite differences of those f64 references for the
//! loss L = Σ r·y with a fixed random r (the layer's backward gets dy = r). The layers compute in
//! f32, so the tolerances are f32-sized: a few 1e-6 relative per accumulated term, well under the
//! 1e-4 used (the f64 differences themselves are exact to ~1e-9 here: conv and pooling are
//! piecewise linear, LRN is smooth with h = 1e-4, error O(h²)).

use bnlab::engine::{
    Conv2d, ConvInit, Dropout, Layer, Lrn, MaskedMeanPool, MaxPool2d, Mode, PositionMask, Sequential, ZeroMasked,
};
use rand::Rng;

use crate::common::{central_diff, rng};

fn uniform(n: usize, rng: &mut impl Rng) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// |got − want| ≤ tol·(1 + |want|) elementwise.
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Conv2d

#[derive(Clone, Copy, Debug)]
struct ConvCase {
    batch: usize,
    ic: usize,
    oc: usize,
    ih: usize,
    iw: usize,
    k: (usize, usize),
    s: usize,
    p: usize,
    bias: bool,
}

const CONV_CASES: [ConvCase; 6] = [
    // stride 2, padding 1, non-square input; 19 examples: more than the layer's 16 runs.
    ConvCase {
        batch: 19,
        ic: 3,
        oc: 4,
        ih: 7,
        iw: 5,
        k: (3, 3),
        s: 2,
        p: 1,
        bias: true,
    },
    ConvCase {
        batch: 3,
        ic: 1,
        oc: 2,
        ih: 6,
        iw: 9,
        k: (2, 4),
        s: 1,
        p: 0,
        bias: false,
    },
    ConvCase {
        batch: 2,
        ic: 2,
        oc: 3,
        ih: 5,
        iw: 4,
        k: (5, 5),
        s: 1,
        p: 2,
        bias: true,
    },
    ConvCase {
        batch: 4,
        ic: 2,
        oc: 3,
        ih: 8,
        iw: 6,
        k: (3, 2),
        s: 3,
        p: 2,
        bias: true,
    },
    // 72 output positions against 6 = ic·kh·kw weights per filter: dW takes the row-dot path
    // (positions ≥ 4× weights), with a 16-lane tail (72 = 4·16 + 8) and 6 = 4 + 2 rows.
    ConvCase {
        batch: 2,
        ic: 1,
        oc: 3,
        ih: 9,
        iw: 7,
        k: (3, 2),
        s: 1,
        p: 1,
        bias: true,
    },
    // kernel wider than the input: some kernel columns never touch it.
    ConvCase {
        batch: 2,
        ic: 1,
        oc: 2,
        ih: 1,
        iw: 3,
        k: (5, 5),
        s: 1,
        p: 2,
        bias: true,
    },
];

/// Direct 7-loop convolution in f64: y[n, o, oy, ox] = b[o] + Σ_{c,i,j} w[o, c, i, j]·x[n, c, iy, ix].
fn conv_ref(t: ConvCase, x: &[f64], w: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    let oh = (t.ih + 2 * t.p - t.k.0) / t.s + 1;
    let ow = (t.iw + 2 * t.p - t.k.1) / t.s + 1;
    let mut y = vec![0.0; t.batch * t.oc * oh * ow];
    for n in 0..t.batch {
        for o in 0..t.oc {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = b.map_or(0.0, |b| b[o]);
                    for c in 0..t.ic {
                        for i in 0..t.k.0 {
                            for j in 0..t.k.1 {
                                let iy = (oy * t.s + i) as isize - t.p as isize;
                                let ix = (ox * t.s + j) as isize - t.p as isize;
                                if iy < 0 || ix < 0 || iy >= t.ih as isize || ix >= t.iw as isize {
                                    continue;
                                }
                                let xi = ((n * t.ic + c) * t.ih + iy as usize) * t.iw + ix as usize;
                                acc += w[((o * t.ic + c) * t.k.0 + i) * t.k.1 + j] * x[xi];
                            }
                        }
                    }
                    y[((n * t.oc + o) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    y
}

fn conv_layer(t: ConvCase, seed: u64) -> Conv2d {
    let mut layer = Conv2d::new(
        t.ic,
        t.oc,
        t.ih,
        t.iw,
        t.k,
        t.s,
        t.p,
        t.bias,
        ConvInit::Normal(0.5),
        &mut rng(seed),
    )
    .unwrap();
    if let Some(b) = layer.bias.as_mut() {
        b.iter_mut().enumerate().for_each(|(i, v)| *v = 0.1 * i as f32 - 0.15);
    }
    layer
}

#[test]
fn conv_shapes_and_init() {
    let l = Conv2d::new(1, 32, 28, 28, (5, 5), 1, 2, true, ConvInit::He, &mut rng(1)).unwrap();
    assert_eq!((l.input_size(), l.output_size(), l.out_hw), (784, 32 * 784, (28, 28)));
    let std = (l.weight.iter().map(|w| w * w).sum::<f32>() / l.weight.len() as f32).sqrt();
    assert!((std - (2.0f32 / 25.0).sqrt()).abs() < 0.03, "He std {std}");
    let l = Conv2d::new(3, 8, 7, 5, (3, 3), 2, 1, false, ConvInit::Normal(0.1), &mut rng(1)).unwrap();
    assert_eq!(l.out_hw, (4, 3));
    assert!(Conv2d::new(1, 1, 2, 2, (5, 5), 1, 1, false, ConvInit::He, &mut rng(1)).is_err());
}

#[test]
fn conv_forward_matches_direct_convolution() {
    for (ci, &t) in CONV_CASES.iter().enumerate() {
        let mut layer = conv_layer(t, ci as u64);
        let x = uniform(t.batch * layer.input_size(), &mut rng(100 + ci as u64));
        let mut y = vec![f32::NAN; t.batch * layer.output_size()];
        layer.forward(&x, t.batch, &mut y, Mode::Train).unwrap();
        let b = layer.bias.as_deref().map(f64s);
        let want = conv_ref(t, &f64s(&x), &f64s(&layer.weight), b.as_deref());
        assert_close(&format!("{t:?} y"), &y, &want, 1e-5);
    }
}

#[test]
fn conv_backward_matches_finite_differences() {
    for (ci, &t) in CONV_CASES.iter().enumerate() {
        let mut layer = conv_layer(t, ci as u64);
        let x = uniform(t.batch * layer.input_size(), &mut rng(200 + ci as u64));
        let r = uniform(t.batch * layer.output_size(), &mut rng(300 + ci as u64));
        let mut y = vec![0.0; r.len()];
        layer.forward(&x, t.batch, &mut y, Mode::Train).unwrap();
        let mut dx = vec![f32::NAN; x.len()];
        layer.backward(&x, &y, &r, t.batch, Some(&mut dx)).unwrap();

        let (x64, w64, r64) = (f64s(&x), f64s(&layer.weight), f64s(&r));
        let b64 = layer.bias.as_deref().map(f64s);
        let loss = |x: &[f64], w: &[f64], b: Option<&[f64]>| dot(&conv_ref(t, x, w, b), &r64);
        let dw = central_diff(|w| loss(&x64, w, b64.as_deref()), &w64, 1e-3, None);
        let dxf = central_diff(|x| loss(x, &w64, b64.as_deref()), &x64, 1e-3, None);
        let params = layer.params();
        assert_close(&format!("{t:?} dW"), params[0].grad, &dw, 1e-4);
        if let Some(b) = &b64 {
            let db = central_diff(|b| loss(&x64, &w64, Some(b)), b, 1e-3, None);
            assert_eq!(params[1].name, "bias");
            assert_close(&format!("{t:?} db"), params[1].grad, &db, 1e-4);
        }
        let dw_with_dx = params[0].grad.to_vec();
        assert_close(&format!("{t:?} dx"), &dx, &dxf, 1e-4);

        // Without dx: the same parameter gradients.
        layer.backward(&x, &y, &r, t.batch, None).unwrap();
        assert_eq!(layer.params()[0].grad, &dw_with_dx[..]);
    }
}

/// y, dW, db and dx of one forward/backward of a fresh layer, in a pool of `threads` threads.
fn conv_run(threads: usize, t: ConvCase) -> Vec<Vec<f32>> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let mut layer = Conv2d::new(t.ic, t.oc, t.ih, t.iw, t.k, t.s, t.p, t.bias, ConvInit::He, &mut rng(7)).unwrap();
        let x = uniform(t.batch * layer.input_size(), &mut rng(8));
        let dy = uniform(t.batch * layer.output_size(), &mut rng(9));
        let mut y = vec![0.0; dy.len()];
        let mut dx = vec![0.0; x.len()];
        layer.forward(&x, t.batch, &mut y, Mode::Train).unwrap();
        layer.backward(&x, &y, &dy, t.batch, Some(&mut dx)).unwrap();
        let grads: Vec<Vec<f32>> = layer.params().iter().map(|p| p.grad.to_vec()).collect();
        [vec![y, dx], grads].concat()
    })
}

#[test]
fn conv_is_bitwise_identical_for_any_thread_count() {
    let cases = [
        ConvCase {
            batch: 37,
            ic: 3,
            oc: 8,
            ih: 12,
            iw: 10,
            k: (5, 5),
            s: 1,
            p: 2,
            bias: true,
        },
        // The study's first layer: dW by row dot products.
        ConvCase {
            batch: 21,
            ic: 1,
            oc: 8,
            ih: 28,
            iw: 28,
            k: (5, 5),
            s: 1,
            p: 2,
            bias: true,
        },
        // The study's second layer: dW by sgemm.
        ConvCase {
            batch: 20,
            ic: 8,
            oc: 16,
            ih: 14,
            iw: 14,
            k: (5, 5),
            s: 1,
            p: 2,
            bias: true,
        },
    ];
    for t in cases {
        let one = conv_run(1, t);
        for threads in [2, 3] {
            let many = conv_run(threads, t);
            for (a, b) in one.iter().zip(&many) {
                let same = a.len() == b.len() && a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same, "{t:?}: results differ between 1 and {threads} threads");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MaxPool2d

/// Direct max pooling in f64 (the first maximum in row-major window order wins).
fn pool_ref(x: &[f64], batch: usize, c: usize, (ih, iw): (usize, usize), k: usize, s: usize) -> Vec<f64> {
    let (oh, ow) = ((ih - k) / s + 1, (iw - k) / s + 1);
    let mut y = Vec::new();
    for n in 0..batch {
        for ch in 0..c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut m = f64::NEG_INFINITY;
                    for i in 0..k {
                        for j in 0..k {
                            m = m.max(x[((n * c + ch) * ih + oy * s + i) * iw + ox * s + j]);
                        }
                    }
                    y.push(m);
                }
            }
        }
    }
    y
}

#[test]
fn maxpool_forward_and_backward_match_references() {
    // (channels, (h, w), kernel, stride): non-square, overlapping windows, leftover rows/columns.
    for (c, hw, k, s) in [
        (3, (7, 9), 3, 2),
        (2, (8, 6), 2, 2),
        (2, (7, 5), 2, 2),
        (1, (5, 7), 3, 1),
        (2, (9, 5), 2, 3),
    ] {
        let batch = 3;
        let mut layer = MaxPool2d::new(c, hw.0, hw.1, k, s).unwrap();
        // Distinct values 0.01 apart, so no ties and finite differences with h = 1e-3 stay exact.
        let n = batch * layer.input_size();
        let mut x: Vec<f32> = (0..n).map(|i| 0.01 * i as f32 - 0.003 * n as f32).collect();
        for i in (1..n).rev() {
            x.swap(i, rng(i as u64).gen_range(0..=i));
        }
        let mut y = vec![0.0; batch * layer.output_size()];
        layer.forward(&x, batch, &mut y, Mode::Eval).unwrap();
        let want = pool_ref(&f64s(&x), batch, c, hw, k, s);
        assert_close("pool y", &y, &want, 0.0);

        let r = uniform(y.len(), &mut rng(5));
        let mut dx = vec![f32::NAN; n];
        layer.backward(&x, &y, &r, batch, Some(&mut dx)).unwrap();
        let r64 = f64s(&r);
        let dxf = central_diff(|x| dot(&pool_ref(x, batch, c, hw, k, s), &r64), &f64s(&x), 1e-3, None);
        assert_close("pool dx", &dx, &dxf, 1e-5);
    }
}

#[test]
fn maxpool_ties_go_to_the_first_maximum() {
    // All equal, 2×2 windows with stride 1 on 3×3: every window picks its top-left element.
    let mut layer = MaxPool2d::new(1, 3, 3, 2, 1).unwrap();
    let x = [1.0f32; 9];
    let mut y = [0.0; 4];
    layer.forward(&x, 1, &mut y, Mode::Train).unwrap();
    assert_eq!(y, [1.0; 4]);
    let mut dx = [0.0; 9];
    layer.backward(&x, &y, &[1.0, 2.0, 3.0, 4.0], 1, Some(&mut dx)).unwrap();
    assert_eq!(dx, [1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);

    // A tie between two later elements: the first in row-major order wins, in every example.
    let mut layer = MaxPool2d::new(1, 2, 2, 2, 2).unwrap();
    let x = [0.0, 5.0, 5.0, 1.0, -3.0, -3.0, -3.0, -3.0];
    let mut y = [0.0; 2];
    layer.forward(&x, 2, &mut y, Mode::Train).unwrap();
    assert_eq!(y, [5.0, -3.0]);
    let mut dx = [9.0; 8];
    layer.backward(&x, &y, &[1.0, 1.0], 2, Some(&mut dx)).unwrap();
    assert_eq!(dx, [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);

    // NaN propagates (as PyTorch); a window of −∞ gives −∞.
    let x = [
        0.0,
        f32::NAN,
        7.0,
        1.0,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
    ];
    layer.forward(&x, 2, &mut y, Mode::Train).unwrap();
    assert!(y[0].is_nan() && y[1] == f32::NEG_INFINITY);
}

// ---------------------------------------------------------------------------------------------
// Dropout

#[test]
fn dropout_is_identity_outside_training() {
    let mut layer = Dropout::new(50, 0.5, 1).unwrap();
    let x = uniform(150, &mut rng(2));
    let dy = uniform(150, &mut rng(3));
    for mode in [Mode::Eval, Mode::Collect] {
        let (mut y, mut dx) = (vec![0.0; 150], vec![0.0; 150]);
        layer.forward(&x, 3, &mut y, mode).unwrap();
        layer.backward(&x, &y, &dy, 3, Some(&mut dx)).unwrap();
        assert_eq!((&y, &dx), (&x, &dy));
    }
    assert_eq!(layer.rng_position(), 0, "Eval and Collect draw no random numbers");
}

#[test]
fn dropout_train_masks_scales_and_backpropagates_the_mask() {
    let p = 0.3f32;
    let mut layer = Dropout::new(100, p, 11).unwrap();
    let x: Vec<f32> = uniform(400, &mut rng(4)).iter().map(|v| v + 2.0).collect(); // nonzero
    let dy = uniform(400, &mut rng(5));
    let (mut y, mut dx) = (vec![0.0; 400], vec![0.0; 400]);
    layer.forward(&x, 4, &mut y, Mode::Train).unwrap();
    layer.backward(&x, &y, &dy, 4, Some(&mut dx)).unwrap();
    let scale = 1.0 / (1.0 - p);
    let mut dropped = 0;
    for i in 0..400 {
        if y[i] == 0.0 {
            dropped += 1;
            assert_eq!(dx[i], 0.0);
        } else {
            assert_eq!((y[i], dx[i]), (x[i] * scale, dy[i] * scale));
        }
    }
    assert!((80..160).contains(&dropped), "{dropped} of 400 dropped at p = {p}");

    // p = 0: identity in training too.
    let mut layer = Dropout::new(100, 0.0, 11).unwrap();
    layer.forward(&x, 4, &mut y, Mode::Train).unwrap();
    assert_eq!(y, x);
    assert!(Dropout::new(10, 1.0, 0).is_err() && Dropout::new(10, -0.1, 0).is_err());
}

fn masks(layer: &mut Dropout, steps: usize) -> Vec<Vec<f32>> {
    let x = vec![1.0f32; 64];
    let mut y = vec![0.0; 64];
    (0..steps)
        .map(|_| {
            layer.forward(&x, 2, &mut y, Mode::Train).unwrap();
            layer.mask().to_vec()
        })
        .collect()
}

#[test]
fn dropout_same_seed_same_masks() {
    let a = masks(&mut Dropout::new(32, 0.5, 42).unwrap(), 5);
    let b = masks(&mut Dropout::new(32, 0.5, 42).unwrap(), 5);
    let c = masks(&mut Dropout::new(32, 0.5, 43).unwrap(), 5);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a[0], a[1], "consecutive masks differ");

    // Restarting and resuming the generator reproduce the stream.
    let mut layer = Dropout::new(32, 0.5, 42).unwrap();
    let first = masks(&mut layer, 2);
    let pos = layer.rng_position();
    let rest = masks(&mut layer, 3);
    assert_eq!([first, rest.clone()].concat(), a);
    layer.set_rng_position(pos);
    assert_eq!(masks(&mut layer, 3), rest);
    layer.reset_rng();
    assert_eq!(masks(&mut layer, 5), a);
}

#[test]
fn dropout_preserves_the_mean() {
    // Var(y) = p/(1 − p) = 1 per element at p = 0.5, so the mean of 2¹⁸ outputs has σ ≈ 0.002.
    for p in [0.2f32, 0.5, 0.8] {
        let n = 1 << 18;
        let mut layer = Dropout::new(n, p, 3).unwrap();
        let x = vec![1.0f32; n];
        let mut y = vec![0.0; n];
        layer.forward(&x, 1, &mut y, Mode::Train).unwrap();
        let mean = y.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let sigma = (p as f64 / (1.0 - p as f64) / n as f64).sqrt();
        assert!((mean - 1.0).abs() < 5.0 * sigma, "p = {p}: mean {mean}");
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        assert!((kept - (1.0 - p as f64)).abs() < 0.005, "p = {p}: kept {kept}");
    }
}

// ---------------------------------------------------------------------------------------------
// Lrn

/// PyTorch's `local_response_norm` written out in f64: b_c = a_c / (k + α/n·Σ_{c'} a_{c'}²)^β over
/// c' ∈ [c − ⌊n/2⌋, c + ⌊(n−1)/2⌋] ∩ [0, C).
fn lrn_ref(x: &[f64], c: usize, hw: usize, (n, alpha, beta, k): (usize, f64, f64, f64)) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for e in 0..x.len() / (c * hw) {
        for ch in 0..c {
            for p in 0..hw {
                let mut sum = 0.0;
                for cc in ch as isize - (n / 2) as isize..=(ch + (n - 1) / 2) as isize {
                    if cc >= 0 && (cc as usize) < c {
                        sum += x[(e * c + cc as usize) * hw + p].powi(2);
                    }
                }
                let i = (e * c + ch) * hw + p;
                y[i] = x[i] / (k + alpha / n as f64 * sum).powf(beta);
            }
        }
    }
    y
}

#[test]
fn lrn_matches_pytorch_formula_and_finite_differences() {
    let (batch, hw) = (3, 6);
    // (channels, (size, α, β, k)): AlexNet's constants, then large α so the cross-channel term of the
    // gradient matters; even sizes (asymmetric windows) and windows wider than the channels.
    let cases = [
        (7, (5, 1e-4, 0.75, 2.0)),
        (7, (5, 2.0, 0.75, 1.0)),
        (6, (4, 3.0, 0.5, 1.0)),
        (5, (3, 1.5, 1.25, 0.5)),
        (3, (7, 2.0, 0.75, 1.0)),
        (4, (1, 1.0, 0.75, 1.0)),
    ];
    for (c, prm) in cases {
        let mut layer = Lrn::new(c, hw, prm.0, prm.1 as f32, prm.2 as f32, prm.3 as f32).unwrap();
        let x: Vec<f32> = uniform(batch * c * hw, &mut rng(c as u64))
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let mut y = vec![0.0; x.len()];
        layer.forward(&x, batch, &mut y, Mode::Train).unwrap();
        let want = lrn_ref(&f64s(&x), c, hw, prm);
        assert_close(&format!("lrn {prm:?} y"), &y, &want, 1e-5);

        let r = uniform(x.len(), &mut rng(77));
        let mut dx = vec![f32::NAN; x.len()];
        layer.backward(&x, &y, &r, batch, Some(&mut dx)).unwrap();
        let r64 = f64s(&r);
        let dxf = central_diff(|x| dot(&lrn_ref(x, c, hw, prm), &r64), &f64s(&x), 1e-4, None);
        assert_close(&format!("lrn {prm:?} dx"), &dx, &dxf, 1e-4);
    }
    let l = Lrn::alexnet(96, 55 * 55);
    assert_eq!((l.size, l.alpha, l.beta, l.k), (5, 1e-4, 0.75, 2.0));
}

// ---------------------------------------------------------------------------------------------
// Conv2d::conv1d (a convolution over the steps of sequences)

/// The 1-D convolution with "same" zero padding, y[n, o, t] = b[o] + Σ_{c, j} w[o, c, j]·x[n, c,
/// t + j − ⌊k/2⌋] (x = 0 outside 0..len), as the middle row of [`conv_ref`]'s direct 2-D
/// convolution of the single-row input padded with ⌊k/2⌋ zeros on every side (the rows above and
/// below see only zeros).
fn conv1d_ref(
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    (batch, ic, oc, len, k): (usize, usize, usize, usize, usize),
) -> Vec<f64> {
    let p = k / 2;
    let t = ConvCase {
        batch,
        ic,
        oc,
        ih: 1,
        iw: len,
        k: (1, k),
        s: 1,
        p,
        bias: b.is_some(),
    };
    let rows = conv_ref(t, x, w, b);
    rows.chunks_exact(len)
        .skip(p)
        .step_by(2 * p + 1)
        .flatten()
        .copied()
        .collect()
}

/// Forward against [`conv1d_ref`] and dW, db, dx against central differences of it (loss Σ r·y),
/// for kernels 1, 3 and 5 (5 wider than a 4-step sequence), with and without bias.
#[test]
fn conv1d_matches_direct_convolution_and_finite_differences() {
    for (ci, &(batch, ic, oc, len, k, bias)) in [
        (3, 4, 5, 7, 3, false),
        (2, 3, 2, 4, 5, true),
        (17, 2, 3, 6, 1, true),
        (2, 28, 4, 28, 3, false),
    ]
    .iter()
    .enumerate()
    {
        let dims = (batch, ic, oc, len, k);
        let mut layer = Conv2d::conv1d(ic, oc, len, k, bias, ConvInit::Normal(0.5), &mut rng(ci as u64)).unwrap();
        if let Some(b) = layer.bias.as_mut() {
            b.iter_mut().enumerate().for_each(|(i, v)| *v = 0.1 * i as f32 - 0.15);
        }
        assert_eq!((layer.input_size(), layer.output_size()), (ic * len, oc * len));
        let x = uniform(batch * ic * len, &mut rng(400 + ci as u64));
        let r = uniform(batch * oc * len, &mut rng(500 + ci as u64));
        let mut y = vec![f32::NAN; r.len()];
        layer.forward(&x, batch, &mut y, Mode::Train).unwrap();
        let (x64, w64, r64) = (f64s(&x), f64s(&layer.weight), f64s(&r));
        let b64 = layer.bias.as_deref().map(f64s);
        assert_close(
            &format!("{dims:?} y"),
            &y,
            &conv1d_ref(&x64, &w64, b64.as_deref(), dims),
            1e-5,
        );

        let mut dx = vec![f32::NAN; x.len()];
        layer.backward(&x, &y, &r, batch, Some(&mut dx)).unwrap();
        let loss = |x: &[f64], w: &[f64], b: Option<&[f64]>| dot(&conv1d_ref(x, w, b, dims), &r64);
        let params = layer.params();
        let dw = central_diff(|w| loss(&x64, w, b64.as_deref()), &w64, 1e-3, None);
        assert_close(&format!("{dims:?} dW"), params[0].grad, &dw, 1e-4);
        if let Some(b) = &b64 {
            let db = central_diff(|b| loss(&x64, &w64, Some(b)), b, 1e-3, None);
            assert_close(&format!("{dims:?} db"), params[1].grad, &db, 1e-4);
        }
        let dxf = central_diff(|x| loss(x, &w64, b64.as_deref()), &x64, 1e-3, None);
        assert_close(&format!("{dims:?} dx"), &dx, &dxf, 1e-4);
    }
}

#[test]
fn conv1d_shapes_names_and_rejections() {
    let l = Conv2d::conv1d(28, 32, 28, 3, false, ConvInit::He, &mut rng(1)).unwrap();
    assert_eq!(
        (l.in_hw, l.out_hw, l.kernel, l.padding),
        ((1, 28), (1, 28), (1, 3), (0, 1))
    );
    assert_eq!(l.name(), "conv28x32k1x3s1p0x1");
    // He: fan_in = in_c·k.
    let std = (l.weight.iter().map(|w| w * w).sum::<f32>() / l.weight.len() as f32).sqrt();
    assert!((std - (2.0f32 / 84.0).sqrt()).abs() < 0.01, "He std {std}");
    // A square padding keeps its old name (checkpoints name layers so).
    let l = Conv2d::new(1, 2, 5, 5, (3, 3), 1, 1, true, ConvInit::He, &mut rng(1)).unwrap();
    assert_eq!((l.name().as_str(), l.padding), ("conv1x2k3x3s1p1", (1, 1)));
    let err = Conv2d::conv1d(2, 2, 8, 4, false, ConvInit::He, &mut rng(1))
        .err()
        .unwrap();
    assert!(err.to_string().contains("odd kernel"), "{err}");
    assert!(Conv2d::conv1d(0, 2, 8, 3, false, ConvInit::He, &mut rng(1)).is_err());
    assert!(Conv2d::conv1d(2, 2, 0, 3, false, ConvInit::He, &mut rng(1)).is_err());
}

// ---------------------------------------------------------------------------------------------
// Padded sequences: PositionMask, ZeroMasked, MaskedMeanPool

/// A mask of `batch` examples of `len` positions, each position valid with probability 1/2 and
/// every example with at least one valid position (not only at the end: the layers take any
/// mask).
pub(crate) fn random_mask(batch: usize, len: usize, seed: u64) -> Vec<bool> {
    let mut r = rng(seed);
    let mut valid: Vec<bool> = (0..batch * len).map(|_| r.gen_bool(0.5)).collect();
    for n in 0..batch {
        valid[n * len + r.gen_range(0..len)] = true;
    }
    valid
}

/// A [`random_mask`] from `seed`, as a [`PositionMask`] too, and inputs `[batch, channels, len]`
/// uniform in [−1, 1) from `seed + 1`.
pub(crate) fn masked_case(
    (batch, channels, len): (usize, usize, usize),
    seed: u64,
) -> (Vec<bool>, PositionMask, Vec<f32>) {
    let valid = random_mask(batch, len, seed);
    let mask = PositionMask::new(valid.clone(), len).unwrap();
    (valid, mask, uniform(batch * channels * len, &mut rng(seed + 1)))
}

/// `v` with `fill` at every masked position of `[batch, channels, len]` examples.
pub(crate) fn fill_masked(v: &[f32], valid: &[bool], (channels, len): (usize, usize), fill: f32) -> Vec<f32> {
    let mut out = v.to_vec();
    for (i, x) in out.iter_mut().enumerate() {
        let (n, t) = (i / (channels * len), i % len);
        if !valid[n * len + t] {
            *x = fill;
        }
    }
    out
}

/// y and dx of one forward and backward of `layer` with `mask`.
pub(crate) fn run_masked(
    layer: &mut dyn Layer,
    mask: &PositionMask,
    x: &[f32],
    dy: &[f32],
    batch: usize,
) -> (Vec<f32>, Vec<f32>) {
    layer.set_mask(mask);
    let mut y = vec![f32::NAN; batch * layer.output_size()];
    layer.forward(x, batch, &mut y, Mode::Train).unwrap();
    let mut dx = vec![f32::NAN; x.len()];
    layer.backward(x, &y, dy, batch, Some(&mut dx)).unwrap();
    (y, dx)
}

/// The same bits.
pub(crate) fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())
}

#[test]
fn position_masks_from_lengths_and_their_rejections() {
    let m = PositionMask::from_lengths(&[2, 0, 3], 3).unwrap();
    assert_eq!((m.examples(), m.positions()), (3, 3));
    assert_eq!(m.valid(), &[true, true, false, false, false, false, true, true, true]);
    assert_eq!(m.example(0), &[true, true, false]);
    assert!(PositionMask::from_lengths(&[4], 3)
        .unwrap_err()
        .to_string()
        .contains("does not fit"));
    assert!(PositionMask::new(vec![true; 5], 2).is_err());
    assert!(PositionMask::new(Vec::new(), 0).is_err());
    assert!(m.check_fits(3, 3, "x").is_ok());
    assert!(m.check_fits(2, 3, "x").unwrap_err().to_string().contains("[3, 3]"));
}

/// ZeroMasked: y = x at valid positions, +0.0 at the others (the module docs' definition), and
/// its backward against central differences of that definition; whatever the masked positions of
/// x and dy hold (1e30, NaN, ∞), no bit of y or dx changes.
#[test]
fn zero_masked_selects_and_never_leaks() {
    let (batch, channels, len) = (5, 3, 7);
    let (valid, mask, x) = masked_case((batch, channels, len), 31);
    let r = uniform(x.len(), &mut rng(33));
    let reference = |x: &[f64]| -> Vec<f64> {
        (x.iter().enumerate())
            .map(|(i, &v)| {
                if valid[i / (channels * len) * len + i % len] {
                    v
                } else {
                    0.0
                }
            })
            .collect()
    };
    let mut layer = ZeroMasked::new(channels, len).unwrap();
    let (y, dx) = run_masked(&mut layer, &mask, &x, &r, batch);
    assert_close("y", &y, &reference(&f64s(&x)), 0.0);
    let dxf = central_diff(|x| dot(&reference(x), &f64s(&r)), &f64s(&x), 1e-3, None);
    assert_close("dx", &dx, &dxf, 1e-6);
    for fill in [1e30, f32::NAN, f32::INFINITY] {
        let dirty_x = fill_masked(&x, &valid, (channels, len), fill);
        let dirty_dy = fill_masked(&r, &valid, (channels, len), fill);
        let (y2, dx2) = run_masked(&mut layer, &mask, &dirty_x, &dirty_dy, batch);
        assert!(same_bits(&y, &y2) && same_bits(&dx, &dx2), "padding {fill} leaked");
    }
}

/// MaskedMeanPool: y[n, c] = mean of x[n, c, t] over the valid t (the module docs' definition),
/// its backward against central differences of that definition, and no leak of 1e30, NaN or ∞
/// from the masked positions of x.
#[test]
fn masked_mean_pool_averages_valid_positions_and_never_leaks() {
    let (batch, channels, len) = (6, 4, 9);
    let (valid, mask, x) = masked_case((batch, channels, len), 41);
    let r = uniform(batch * channels, &mut rng(43));
    let reference = |x: &[f64]| -> Vec<f64> {
        let mut y = vec![0.0; batch * channels];
        for n in 0..batch {
            let row = &valid[n * len..(n + 1) * len];
            let m = row.iter().filter(|&&v| v).count() as f64;
            for c in 0..channels {
                let xs = &x[(n * channels + c) * len..][..len];
                y[n * channels + c] = xs.iter().zip(row).filter(|(_, &v)| v).map(|(&x, _)| x).sum::<f64>() / m;
            }
        }
        y
    };
    let mut layer = MaskedMeanPool::new(channels, len).unwrap();
    assert_eq!((layer.input_size(), layer.output_size()), (channels * len, channels));
    let (y, dx) = run_masked(&mut layer, &mask, &x, &r, batch);
    assert_close("y", &y, &reference(&f64s(&x)), 1e-6);
    let dxf = central_diff(|x| dot(&reference(x), &f64s(&r)), &f64s(&x), 1e-3, None);
    assert_close("dx", &dx, &dxf, 1e-6);
    for fill in [1e30, f32::NAN, f32::NEG_INFINITY] {
        let (y2, dx2) = run_masked(
            &mut layer,
            &mask,
            &fill_masked(&x, &valid, (channels, len), fill),
            &r,
            batch,
        );
        assert!(same_bits(&y, &y2) && same_bits(&dx, &dx2), "padding {fill} leaked");
    }
}

/// The masked layers refuse a forward without a mask, a mask of another batch or length, and
/// (pooling) an example with no valid position, each with an error that names the problem.
#[test]
fn masked_layers_reject_missing_and_mismatched_masks() {
    let x = vec![0.5f32; 2 * 3 * 4];
    let mut y = vec![0.0f32; x.len()];
    let mut layers: Vec<Box<dyn Layer>> = vec![
        Box::new(ZeroMasked::new(3, 4).unwrap()),
        Box::new(MaskedMeanPool::new(3, 4).unwrap()),
    ];
    for layer in &mut layers {
        let y = &mut y[..2 * layer.output_size()];
        let err = layer.forward(&x, 2, y, Mode::Eval).unwrap_err().to_string();
        assert!(err.contains("needs a position mask"), "{err}");
        layer.set_mask(&PositionMask::from_lengths(&[4, 4, 4], 4).unwrap());
        let err = layer.forward(&x, 2, y, Mode::Eval).unwrap_err().to_string();
        assert!(err.contains("but the mask is [3, 4]"), "{err}");
        layer.set_mask(&PositionMask::from_lengths(&[2, 2], 2).unwrap());
        assert!(layer.forward(&x, 2, y, Mode::Eval).is_err());
        layer.set_mask(&PositionMask::from_lengths(&[4, 1], 4).unwrap());
        layer.forward(&x, 2, y, Mode::Eval).unwrap();
    }
    let pool = &mut layers[1];
    pool.set_mask(&PositionMask::from_lengths(&[3, 0], 4).unwrap());
    let err = pool.forward(&x, 2, &mut y[..6], Mode::Eval).unwrap_err().to_string();
    assert!(err.contains("example 1") && err.contains("no valid position"), "{err}");
    assert!(ZeroMasked::new(0, 4).is_err() && MaskedMeanPool::new(3, 0).is_err());
}

// ---------------------------------------------------------------------------------------------
// The layers together

#[test]
fn layers_chain_in_a_sequential_network() {
    let mut r = rng(12);
    let net = vec![
        Box::new(Conv2d::new(1, 4, 12, 10, (5, 5), 1, 2, true, ConvInit::He, &mut r).unwrap()) as Box<dyn Layer>,
        Box::new(Lrn::new(4, 120, 3, 1e-2, 0.75, 1.0).unwrap()),
        Box::new(MaxPool2d::new(4, 12, 10, 3, 2).unwrap()),
        Box::new(Conv2d::new(4, 6, 5, 4, (3, 3), 2, 1, false, ConvInit::He, &mut r).unwrap()),
        Box::new(Dropout::new(6 * 3 * 2, 0.5, 5).unwrap()),
    ];
    let mut net = Sequential::new(net).unwrap();
    assert_eq!((net.input_size(), net.output_size()), (120, 36));
    let x = uniform(5 * 120, &mut r);
    let out = net.forward(&x, 5, Mode::Train).unwrap().to_vec();
    assert!(out.iter().all(|v| v.is_finite()) && out.contains(&0.0));
    net.backward(&vec![1.0; out.len()]).unwrap();
    let grads: Vec<_> = net
        .params()
        .iter()
        .map(|p| (p.name, p.grad.iter().any(|&g| g != 0.0)))
        .collect();
    assert_eq!(grads, [("weight", true), ("bias", true), ("weight", true)]);
}

// ---------------------------------------------------------------------------------------------
// Timing (not an assertion): cargo test --release -p bnlab --test library -- --ignored conv_timing --nocapture

#[test]
#[ignore]
fn conv_timing() {
    let batch = 64;
    for (ic, oc, hw) in [(1, 32, 28), (32, 64, 14)] {
        let mut layer = Conv2d::new(ic, oc, hw, hw, (5, 5), 1, 2, true, ConvInit::He, &mut rng(1)).unwrap();
        let x = uniform(batch * layer.input_size(), &mut rng(2));
        let dy = uniform(batch * layer.output_size(), &mut rng(3));
        let (mut y, mut dx) = (vec![0.0; dy.len()], vec![0.0; x.len()]);
        let mut times = (Vec::new(), Vec::new());
        for _ in 0..12 {
            let t0 = std::time::Instant::now();
            layer.forward(&x, batch, &mut y, Mode::Train).unwrap();
            let t1 = std::time::Instant::now();
            layer.backward(&x, &y, &dy, batch, Some(&mut dx)).unwrap();
            times.0.push((t1 - t0).as_secs_f64());
            times.1.push(t1.elapsed().as_secs_f64());
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (f, b) = (median(&mut times.0), median(&mut times.1));
        let gflop = 2.0 * (batch * oc * ic * 25 * hw * hw) as f64 / 1e9; // one of the three products
        println!(
            "conv {ic}x{hw}x{hw} -> {oc} ch 5x5 pad 2, batch {batch}, {} threads: forward {:.2} ms \
             ({:.1} GFLOP/s), backward (dW + dx) {:.2} ms ({:.1} GFLOP/s)",
            rayon::current_num_threads(),
            f * 1e3,
            gflop / f,
            b * 1e3,
            2.0 * gflop / b
        );
    }
}
