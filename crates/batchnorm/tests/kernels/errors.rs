//! Every documented rejection, as tables of cases: each case is one call and the `Error` (with its
//! fields) it must return. The runner ([`check_all`]) gives every call fresh outputs filled with a
//! sentinel and a fresh copy of a layer, and checks afterwards that the call returned exactly that
//! error, never panicked, wrote no output and left the layer's state as it was.

use batchnorm::{
    batch_norm_backward, batch_norm_backward_eval, batch_norm_backward_eval_masked, batch_norm_backward_masked,
    batch_norm_eval, batch_norm_eval_masked, batch_norm_train, batch_norm_train_masked, batch_stats,
    batch_stats_masked, fold_into_preceding, grad_sums, grad_sums_masked, input_grad, input_grad_masked, normalize,
    normalize_masked, update_running_stats, Affine, BatchNorm, BatchNormConfig, BatchStats, Error, FixedStats,
    GradSums, Grads, InferenceAffine, Layout, Momentum, PopulationStats, ReluMask, SavedStats, SingleProcess, View,
};
use batchnorm::{
    batch_norm_backward_add_relu, batch_norm_backward_eval_add_relu, batch_norm_backward_eval_relu,
    batch_norm_backward_relu, batch_norm_eval_add_relu, batch_norm_eval_relu, batch_norm_train_add_relu,
    batch_norm_train_relu,
};

const S: f32 = 7.25; // sentinel

fn sentinel(n: usize) -> Vec<f32> {
    vec![S; n]
}

#[track_caller]
fn untouched(what: &str, v: &[f32]) {
    assert!(
        v.iter().all(|&a| a == S),
        "{what}: output was written despite the error"
    );
}

fn xs(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37).sin()).collect()
}

fn saved(c: usize, count: u64) -> SavedStats {
    SavedStats {
        count,
        mean: vec![0.0; c],
        inv_std: vec![1.0; c],
    }
}

fn sums(c: usize) -> GradSums {
    GradSums {
        sum_dy: vec![0.0; c],
        sum_dy_xhat: vec![0.0; c],
    }
}

fn feature(name: &'static str, expected: usize, actual: usize) -> Error {
    Error::FeatureMismatch { name, expected, actual }
}

fn buffer(name: &'static str, expected: usize, actual: usize) -> Error {
    Error::BufferLength { name, expected, actual }
}

fn too_few(count: u64, shape: &[usize]) -> Error {
    Error::TooFewValues {
        count,
        shape: shape.to_vec(),
    }
}

/// A layer whose state is compared before and after failing calls.
fn layer(c: usize) -> BatchNorm<f32> {
    let mut bn = BatchNorm::<f32>::new(c, BatchNormConfig::default()).unwrap();
    bn.gamma = (0..c).map(|i| 1.0 + i as f32).collect();
    bn.beta = (0..c).map(|i| i as f32 * 0.5).collect();
    bn.running_mean = (0..c).map(|i| i as f32 * 0.1).collect();
    bn.running_var = (0..c).map(|i| 1.0 + i as f32 * 0.2).collect();
    bn.num_batches_tracked = 5;
    bn
}

// ---------------------------------------------------------------------------------------------
// The table runner.
// ---------------------------------------------------------------------------------------------

/// The outputs a failing call is given, all filled with the sentinel: y, dx, dz (element
/// buffers), dγ, dβ, running mean and variance (per-channel buffers); and a fused forward's
/// ReLU mask, empty.
#[derive(Debug)]
struct Out {
    y: Vec<f32>,
    dx: Vec<f32>,
    dz: Vec<f32>,
    dg: Vec<f32>,
    db: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
    mask: ReluMask,
}

impl Out {
    /// Outputs of the right sizes for `n` elements and `c` channels.
    fn new(n: usize, c: usize) -> Out {
        Out::sized(n, n, c, c)
    }

    /// Outputs of the given sizes (y, dx, dγ, dβ; dz as dx, running statistics as dγ).
    fn sized(y: usize, dx: usize, dg: usize, db: usize) -> Out {
        Out {
            y: sentinel(y),
            dx: sentinel(dx),
            dz: sentinel(dx),
            dg: sentinel(dg),
            db: sentinel(db),
            rm: sentinel(dg),
            rv: sentinel(dg),
            mask: ReluMask::new(),
        }
    }

    /// Outputs as [`Out::new`] with a dz of `dz` elements.
    fn with_dz(n: usize, c: usize, dz: usize) -> Out {
        Out {
            dz: sentinel(dz),
            ..Out::new(n, c)
        }
    }

    /// dx, dγ and dβ.
    fn grads(&mut self) -> Grads<'_, f32> {
        Grads::new(&mut self.dx, &mut self.dg, &mut self.db)
    }

    /// dx and dγ, no dβ.
    fn grads_without_dbeta(&mut self) -> Grads<'_, f32> {
        Grads {
            dx: Some(&mut self.dx),
            dgamma: Some(&mut self.dg),
            dbeta: None,
        }
    }

    #[track_caller]
    fn untouched(&self, what: &str) {
        for (name, v) in [
            ("y", &self.y),
            ("dx", &self.dx),
            ("dz", &self.dz),
            ("dgamma", &self.dg),
            ("dbeta", &self.db),
            ("running mean", &self.rm),
            ("running var", &self.rv),
        ] {
            untouched(&format!("{what}: {name}"), v);
        }
        assert_eq!(
            self.mask,
            ReluMask::new(),
            "{what}: the ReLU mask was written despite the error"
        );
    }
}

/// What a case must return.
enum Want {
    /// Exactly this error (compared by its `Debug` form, so that a NaN ε or momentum compares
    /// equal to itself and −0 differs from +0, as bit equality would).
    Is(Error),
    /// An error the predicate accepts (where a field is not part of the documented contract).
    Like(&'static str, Box<dyn Fn(&Error) -> bool>),
}

impl From<Error> for Want {
    fn from(e: Error) -> Want {
        Want::Is(e)
    }
}

type Call<'a> = Box<dyn FnOnce(&mut Out, &mut BatchNorm<f32>) -> Result<(), Error> + 'a>;

/// One row of a table: a name, the call, the error it must return, and the outputs it is given
/// (`None`: the table's default sizes).
struct Case<'a> {
    what: String,
    want: Want,
    out: Option<Out>,
    call: Call<'a>,
}

/// A case of a call that needs no layer.
fn case<'a>(
    what: impl Into<String>,
    want: impl Into<Want>,
    call: impl FnOnce(&mut Out) -> Result<(), Error> + 'a,
) -> Case<'a> {
    on_layer(what, want, move |out, _| call(out))
}

/// A case of a call on the table's layer (a fresh copy; its state must not change).
fn on_layer<'a>(
    what: impl Into<String>,
    want: impl Into<Want>,
    call: impl FnOnce(&mut Out, &mut BatchNorm<f32>) -> Result<(), Error> + 'a,
) -> Case<'a> {
    Case {
        what: what.into(),
        want: want.into(),
        out: None,
        call: Box::new(call),
    }
}

impl Case<'_> {
    /// The case with outputs of other sizes than the table's default.
    fn with_out(mut self, out: Out) -> Self {
        self.out = Some(out);
        self
    }
}

/// Runs every case with fresh sentinel outputs (`n` elements, `c` channels unless the case says
/// otherwise) and a fresh copy of `bn`: each must return its error, write nothing and leave the
/// layer's state unchanged.
#[track_caller]
fn check_all(n: usize, c: usize, bn: &BatchNorm<f32>, cases: Vec<Case>) {
    for case in cases {
        let what = case.what;
        let mut out = case.out.unwrap_or_else(|| Out::new(n, c));
        let mut layer = bn.clone();
        let got = (case.call)(&mut out, &mut layer);
        let err = match got {
            Err(e) => e,
            Ok(()) => panic!("{what}: accepted"),
        };
        match &case.want {
            Want::Is(want) => assert_eq!(format!("{err:?}"), format!("{want:?}"), "{what}"),
            Want::Like(desc, ok) => assert!(ok(&err), "{what}: {err:?} is not {desc}"),
        }
        // (`Debug` rather than `PartialEq`: a layer with a NaN ε is not equal to itself.)
        assert_eq!(format!("{layer:?}"), format!("{bn:?}"), "{what}: layer state changed");
        out.untouched(&what);
    }
}

/// The cases of every function that takes `x` with a shape, all expected to return `want`
/// (for shapes that are themselves invalid): the free functions, the estimator and the layer.
fn shape_cases<'a>(x: &'a [f32], shape: &'a [usize], layout: Layout, c: usize, want: &Error) -> Vec<Case<'a>> {
    let what = format!("{layout} {shape:?}");
    let v = move || View::new(x, shape, layout);
    let w = || want.clone();
    vec![
        case(format!("{what} train"), w(), move |o| {
            let (g, b) = (vec![1.0f32; c], vec![0.0f32; c]);
            batch_norm_train(v(), Affine::new(&g, &b), 1e-5, &mut o.y).map(drop)
        }),
        case(format!("{what} eval"), w(), move |o| {
            let (g, b, m, var) = (vec![1.0f32; c], vec![0.0f32; c], vec![0.0f32; c], vec![1.0f32; c]);
            batch_norm_eval(v(), FixedStats::new(&m, &var), Affine::new(&g, &b), 1e-5, &mut o.y)
        }),
        case(format!("{what} normalize"), w(), move |o| {
            let (g, b) = (vec![1.0f32; c], vec![0.0f32; c]);
            normalize(v(), &saved(c, 4), Affine::new(&g, &b), &mut o.y)
        }),
        case(format!("{what} batch_stats"), w(), move |_| batch_stats(v()).map(drop)),
        case(format!("{what} backward"), w(), move |o| {
            let g = vec![1.0f32; c];
            batch_norm_backward(v(), x, &saved(c, 4), Some(&g), o.grads())
        }),
        case(format!("{what} backward_eval"), w(), move |o| {
            let (g, m, var) = (vec![1.0f32; c], vec![0.0f32; c], vec![1.0f32; c]);
            batch_norm_backward_eval(v(), x, FixedStats::new(&m, &var), Some(&g), 1e-5, o.grads())
        }),
        case(format!("{what} grad_sums"), w(), move |_| {
            grad_sums(v(), x, &saved(c, 4)).map(drop)
        }),
        case(format!("{what} input_grad"), w(), move |o| {
            let g = vec![1.0f32; c];
            input_grad(v(), x, &saved(c, 4), &sums(c), Some(&g), &mut o.dx)
        }),
        case(format!("{what} observe_batch"), w(), move |_| {
            let mut pop = PopulationStats::new(c);
            let r = pop.observe_batch(v());
            assert_eq!(pop, PopulationStats::new(c), "{layout} {shape:?}: estimator changed");
            r
        }),
        on_layer(format!("{what} layer train"), w(), move |o, bn| {
            bn.forward_train(v(), &mut o.y).map(drop)
        }),
        on_layer(format!("{what} layer eval"), w(), move |o, bn| {
            bn.forward_eval(v(), &mut o.y)
        }),
        on_layer(format!("{what} layer backward"), w(), move |o, bn| {
            bn.backward(v(), x, &saved(c, 4), o.grads())
        }),
        on_layer(format!("{what} layer backward_eval"), w(), move |o, bn| {
            bn.backward_eval(v(), x, o.grads())
        }),
        case(format!("{what} geometry"), w(), move |_| {
            layout.geometry(shape).map(drop)
        }),
        // Masked batch norm: the shape is checked before the mask.
        case(format!("{what} train masked"), w(), move |o| {
            batch_norm_train_masked(v(), &[], Affine::NONE, 1e-5, &mut o.y).map(drop)
        }),
        case(format!("{what} batch_stats masked"), w(), move |_| {
            batch_stats_masked(v(), &[]).map(drop)
        }),
        case(format!("{what} backward masked"), w(), move |o| {
            batch_norm_backward_masked(v(), &[], x, &saved(c, 4), None, o.grads())
        }),
        on_layer(format!("{what} layer train masked"), w(), move |o, bn| {
            bn.forward_train_masked(v(), &[], &mut o.y).map(drop)
        }),
        on_layer(format!("{what} layer train masked sync"), w(), move |o, bn| {
            bn.forward_train_masked_sync(&SingleProcess, v(), &[], &mut o.y)
                .map(drop)
        }),
        // Fused batch norm + ReLU: the shape is checked first.
        case(format!("{what} train relu"), w(), move |o| {
            batch_norm_train_relu(v(), Affine::NONE, 1e-5, &mut o.y, &mut o.mask).map(drop)
        }),
        case(format!("{what} train add relu"), w(), move |o| {
            batch_norm_train_add_relu(v(), x, Affine::NONE, 1e-5, &mut o.y, &mut o.mask).map(drop)
        }),
        case(format!("{what} eval add relu"), w(), move |o| {
            let (m, var) = (vec![0.0f32; c], vec![1.0f32; c]);
            let fixed = FixedStats::new(&m, &var);
            batch_norm_eval_add_relu(v(), x, fixed, Affine::NONE, 1e-5, &mut o.y, Some(&mut o.mask))
        }),
        case(format!("{what} backward add relu"), w(), move |o| {
            let Out { dx, dg, db, dz, .. } = o;
            let grads = Grads::new(dx, dg, db);
            batch_norm_backward_add_relu(v(), x, &ReluMask::new(), &saved(c, 4), None, grads, dz)
        }),
        on_layer(format!("{what} layer train relu"), w(), move |o, bn| {
            bn.forward_train_relu(v(), &mut o.y, &mut o.mask).map(drop)
        }),
        on_layer(format!("{what} layer backward relu"), w(), move |o, bn| {
            bn.backward_relu(v(), x, &ReluMask::new(), &saved(c, 4), o.grads())
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// Algorithm 1 needs m ≥ 2 values per channel to estimate σ²_B.
// ---------------------------------------------------------------------------------------------

#[test]
fn too_few_values_in_training() {
    let c = 3;
    for (layout, shape) in [
        (Layout::NC, vec![1, c]),
        (Layout::NCHW, vec![1, c, 1, 1]),
        (Layout::NHWC, vec![1, 1, 1, c]),
        (Layout::ChannelsFirst, vec![1, c]),
        (Layout::ChannelsLast, vec![1, 1, 1, c]),
    ] {
        let x = xs(c);
        let v = View::new(&x, &shape, layout);
        // Splitting phases: one value per channel is a valid shard for batch_stats …
        let s = batch_stats(v).unwrap();
        assert_eq!(s.count, 1);
        // … but not a batch for training, running statistics or Algorithm 2.
        let s = &s;
        let cases = vec![
            case(format!("{layout} train"), too_few(1, &shape), move |o| {
                batch_norm_train(v, Affine::NONE, 1e-5, &mut o.y).map(drop)
            }),
            // The layer: nothing changes, running statistics included.
            on_layer(format!("{layout} layer train"), too_few(1, &shape), move |o, bn| {
                bn.forward_train(v, &mut o.y).map(drop)
            }),
            case(format!("{layout} running update"), too_few(1, &[]), move |o| {
                update_running_stats(s, Momentum::Exponential(0.1), 1, &mut o.rm, &mut o.rv)
            }),
            case(format!("{layout} observe"), too_few(1, &[]), move |_| {
                let mut pop = PopulationStats::new(c);
                let r = pop.observe(s);
                assert_eq!((pop.batches(), &pop), (0, &PopulationStats::new(c)));
                r
            }),
            case(format!("{layout} observe_batch"), too_few(1, &shape), move |_| {
                let mut pop = PopulationStats::new(c);
                let r = pop.observe_batch(v);
                assert_eq!((pop.batches(), &pop), (0, &PopulationStats::new(c)));
                r
            }),
        ];
        check_all(c, c, &layer(c), cases);
    }
}

/// Backward and the split-phase input gradient need the (global) count ≥ 2.
#[test]
fn too_few_values_in_backward() {
    let (c, shape) = (2, [1usize, 2]);
    let (x, dy) = (xs(2), xs(2));
    let v = View::new(&x, &shape, Layout::NC);
    let one = saved(c, 1);
    let sums = GradSums {
        sum_dy: vec![0.5; c],
        sum_dy_xhat: vec![0.25; c],
    };
    let cases = vec![
        case("backward", too_few(1, &shape), |o| {
            batch_norm_backward(v, &dy, &one, None, o.grads())
        }),
        case("input_grad", too_few(1, &shape), |o| {
            input_grad(v, &dy, &one, &sums, None, &mut o.dx)
        }),
    ];
    check_all(2, c, &layer(c), cases);
    // With the global count of a synchronized batch, a one-sample shard is fine.
    let mut dx = sentinel(2);
    input_grad(v, &dy, &saved(c, 8), &sums, None, &mut dx).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Shapes: empty, wrong rank, overflow.
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_input() {
    for (layout, shape, c) in [
        (Layout::NC, vec![0, 3], 3),
        (Layout::NC, vec![4, 0], 0),
        (Layout::NCHW, vec![2, 3, 0, 4], 3),
        (Layout::NCHW, vec![0, 3, 2, 2], 3),
        (Layout::NHWC, vec![2, 2, 0, 3], 3),
        (Layout::ChannelsFirst, vec![2, 3, 4, 0, 1], 3),
        (Layout::ChannelsLast, vec![0, 3], 3),
    ] {
        let want = Error::EmptyInput { shape: shape.clone() };
        check_all(0, c, &layer(c), shape_cases(&[], &shape, layout, c, &want));
    }
}

#[test]
fn rank_mismatch() {
    for (layout, shape, expected) in [
        (Layout::NC, vec![2, 3, 4], "2"),
        (Layout::NC, vec![6], "2"),
        (Layout::NCHW, vec![2, 3, 4], "4"),
        (Layout::NCHW, vec![2, 3, 4, 1, 1], "4"),
        (Layout::NHWC, vec![2, 4, 3], "4"),
        (Layout::ChannelsFirst, vec![6], "at least 2"),
        (Layout::ChannelsLast, vec![6], "at least 2"),
        (Layout::ChannelsLast, vec![], "at least 2"),
    ] {
        let n: usize = shape.iter().product();
        let want = Error::RankMismatch {
            layout: layout.name(),
            expected,
            shape: shape.clone(),
        };
        let x = xs(n);
        check_all(n, 3, &layer(3), shape_cases(&x, &shape, layout, 3, &want));
    }
}

#[test]
fn shape_overflow() {
    for (layout, shape) in [
        (Layout::NC, vec![usize::MAX, 2]),
        (Layout::NCHW, vec![2, 3, usize::MAX / 2, 5]),
        (Layout::NHWC, vec![1 << 40, 1 << 20, 1 << 10, 3]),
    ] {
        let c = layout.geometry(&[2; 4][..shape.len()]).unwrap().channels;
        let want = Error::ShapeOverflow { shape: shape.clone() };
        let x = xs(6);
        check_all(6, c, &layer(c), shape_cases(&x, &shape, layout, c, &want));
    }
}

// ---------------------------------------------------------------------------------------------
// Buffer lengths.
// ---------------------------------------------------------------------------------------------

#[test]
fn buffer_length_mismatch() {
    let (shape, layout, n, c) = ([2usize, 3, 2, 2], Layout::NCHW, 24, 3);
    let (g, m, var) = (vec![1.0f32; c], vec![0.0f32; c], vec![1.0f32; c]);
    let stats = FixedStats::new(&m, &var);
    let sv = saved(c, 8);
    let sums = sums(c);
    let (x, short, long) = (xs(n), xs(n - 1), xs(n + 1));
    let good = View::new(&x, &shape, layout);
    let (sv, sums, g) = (&sv, &sums, &g);
    let mut cases = Vec::new();
    // x
    for bad in [&short, &long] {
        let want = buffer("x", n, bad.len());
        let v = View::new(bad, &shape, layout);
        let x = &x;
        cases.extend([
            case("x: train", want.clone(), move |o| {
                batch_norm_train(v, Affine::NONE, 1e-5, &mut o.y).map(drop)
            }),
            case("x: eval", want.clone(), move |o| {
                batch_norm_eval(v, stats, Affine::NONE, 1e-5, &mut o.y)
            }),
            case("x: normalize", want.clone(), move |o| {
                normalize(v, sv, Affine::NONE, &mut o.y)
            }),
            case("x: batch_stats", want.clone(), move |_| batch_stats(v).map(drop)),
            case("x: grad_sums", want.clone(), move |_| grad_sums(v, x, sv).map(drop)),
            case("x: backward", want.clone(), move |o| {
                batch_norm_backward(v, x, sv, None, o.grads())
            }),
            case("x: backward_eval", want.clone(), move |o| {
                batch_norm_backward_eval(v, x, stats, None, 1e-5, Grads::dx(&mut o.dx))
            }),
            case("x: input_grad", want.clone(), move |o| {
                input_grad(v, x, sv, sums, None, &mut o.dx)
            }),
            on_layer("x: layer train", want.clone(), move |o, bn| {
                bn.forward_train(v, &mut o.y).map(drop)
            }),
            on_layer("x: layer eval", want.clone(), move |o, bn| bn.forward_eval(v, &mut o.y)),
        ]);
    }
    // y
    for len in [n - 1, n + 1] {
        let want = buffer("y", n, len);
        let out = || Out::sized(len, n, c, c);
        cases.extend([
            case("y: train", want.clone(), move |o| {
                batch_norm_train(good, Affine::NONE, 1e-5, &mut o.y).map(drop)
            })
            .with_out(out()),
            case("y: eval", want.clone(), move |o| {
                batch_norm_eval(good, stats, Affine::NONE, 1e-5, &mut o.y)
            })
            .with_out(out()),
            case("y: normalize", want.clone(), move |o| {
                normalize(good, sv, Affine::NONE, &mut o.y)
            })
            .with_out(out()),
            on_layer("y: layer train", want.clone(), move |o, bn| {
                bn.forward_train(good, &mut o.y).map(drop)
            })
            .with_out(out()),
            on_layer("y: layer eval", want.clone(), move |o, bn| {
                bn.forward_eval(good, &mut o.y)
            })
            .with_out(out()),
        ]);
    }
    // dy
    for bad in [&short, &long] {
        let want = buffer("dy", n, bad.len());
        cases.extend([
            case("dy: backward", want.clone(), move |o| {
                batch_norm_backward(good, bad, sv, Some(g), o.grads())
            }),
            case("dy: backward_eval", want.clone(), move |o| {
                batch_norm_backward_eval(good, bad, stats, Some(g), 1e-5, o.grads_without_dbeta())
            }),
            case("dy: grad_sums", want.clone(), move |_| {
                grad_sums(good, bad, sv).map(drop)
            }),
            case("dy: input_grad", want.clone(), move |o| {
                input_grad(good, bad, sv, sums, None, &mut o.dx)
            }),
            on_layer("dy: layer backward", want.clone(), move |o, bn| {
                bn.backward(good, bad, sv, o.grads())
            }),
            on_layer("dy: layer backward_eval", want.clone(), move |o, bn| {
                bn.backward_eval(good, bad, o.grads())
            }),
        ]);
    }
    // dx
    for len in [n - 1, n + 1] {
        let want = buffer("dx", n, len);
        let out = || Out::sized(n, len, c, c);
        let x = &x;
        cases.extend([
            case("dx: backward", want.clone(), move |o| {
                batch_norm_backward(good, x, sv, Some(g), o.grads())
            })
            .with_out(out()),
            case("dx: backward_eval", want.clone(), move |o| {
                batch_norm_backward_eval(good, x, stats, Some(g), 1e-5, o.grads_without_dbeta())
            })
            .with_out(out()),
            case("dx: input_grad", want.clone(), move |o| {
                input_grad(good, x, sv, sums, None, &mut o.dx)
            })
            .with_out(out()),
            on_layer("dx: layer backward", want.clone(), move |o, bn| {
                bn.backward(good, x, sv, o.grads())
            })
            .with_out(out()),
        ]);
    }
    check_all(n, c, &layer(c), cases);
}

// ---------------------------------------------------------------------------------------------
// Per-channel vectors of the wrong length.
// ---------------------------------------------------------------------------------------------

#[test]
fn feature_mismatch() {
    let (shape, layout, n, c) = ([4usize, 5, 3], Layout::ChannelsLast, 60, 3);
    let x = xs(n);
    let v = View::new(&x, &shape, layout);
    let ok = vec![1.0f32; c];
    let sv = saved(c, 20);
    let good_sums = sums(c);
    let batch = batch_stats(v).unwrap();
    let (x, ok, sv, good_sums, batch) = (&x, &ok, &sv, &good_sums, &batch);
    let fixed = FixedStats::new(ok, ok);
    for bad_len in [c - 1, c + 1, 0] {
        let bad = vec![1.0f32; bad_len];
        let bad = &bad;
        let f = |name| feature(name, c, bad_len);
        let bad_mean = SavedStats {
            mean: vec![0.0; bad_len],
            ..sv.clone()
        };
        let bad_inv = SavedStats {
            inv_std: vec![1.0; bad_len],
            ..sv.clone()
        };
        let bad_sums = sums(bad_len);
        let (bad_mean, bad_inv, bad_sums) = (&bad_mean, &bad_inv, &bad_sums);
        // Parameter-gradient outputs of the wrong length: nothing written, dx included.
        let bad_dg = || Out::sized(n, n, bad_len, c);
        let bad_db = || Out::sized(n, n, c, bad_len);
        let cases = vec![
            // γ, β
            case("train gamma", f("gamma"), move |o| {
                batch_norm_train(v, Affine::new(bad, ok), 1e-5, &mut o.y).map(drop)
            }),
            case("train beta", f("beta"), move |o| {
                batch_norm_train(v, Affine::new(ok, bad), 1e-5, &mut o.y).map(drop)
            }),
            case("eval gamma", f("gamma"), move |o| {
                let affine = Affine {
                    gamma: Some(bad),
                    beta: None,
                };
                batch_norm_eval(v, fixed, affine, 1e-5, &mut o.y)
            }),
            case("eval beta", f("beta"), move |o| {
                let affine = Affine {
                    gamma: None,
                    beta: Some(bad),
                };
                batch_norm_eval(v, fixed, affine, 1e-5, &mut o.y)
            }),
            case("normalize gamma", f("gamma"), move |o| {
                let affine = Affine {
                    gamma: Some(bad),
                    beta: None,
                };
                normalize(v, sv, affine, &mut o.y)
            }),
            case("normalize beta", f("beta"), move |o| {
                let affine = Affine {
                    gamma: None,
                    beta: Some(bad),
                };
                normalize(v, sv, affine, &mut o.y)
            }),
            case("backward gamma", f("gamma"), move |o| {
                batch_norm_backward(v, x, sv, Some(bad), o.grads())
            }),
            case("backward_eval gamma", f("gamma"), move |o| {
                batch_norm_backward_eval(v, x, fixed, Some(bad), 1e-5, Grads::dx(&mut o.dx))
            }),
            // Inference statistics.
            case("eval mean", f("mean"), move |o| {
                batch_norm_eval(v, FixedStats::new(bad, ok), Affine::NONE, 1e-5, &mut o.y)
            }),
            case("eval var", f("var"), move |o| {
                batch_norm_eval(v, FixedStats::new(ok, bad), Affine::NONE, 1e-5, &mut o.y)
            }),
            case("backward_eval mean", f("mean"), move |o| {
                batch_norm_backward_eval(v, x, FixedStats::new(bad, ok), None, 1e-5, Grads::dx(&mut o.dx))
            }),
            case("backward_eval var", f("var"), move |o| {
                batch_norm_backward_eval(v, x, FixedStats::new(ok, bad), None, 1e-5, Grads::dx(&mut o.dx))
            }),
            // Saved statistics.
            case("normalize saved.mean", f("saved.mean"), move |o| {
                normalize(v, bad_mean, Affine::NONE, &mut o.y)
            }),
            case("normalize saved.inv_std", f("saved.inv_std"), move |o| {
                normalize(v, bad_inv, Affine::NONE, &mut o.y)
            }),
            case("backward saved.mean", f("saved.mean"), move |o| {
                batch_norm_backward(v, x, bad_mean, None, o.grads())
            }),
            case("backward saved.inv_std", f("saved.inv_std"), move |o| {
                batch_norm_backward(v, x, bad_inv, None, Grads::dx(&mut o.dx))
            }),
            case("grad_sums saved.mean", f("saved.mean"), move |_| {
                grad_sums(v, x, bad_mean).map(drop)
            }),
            case("input_grad saved.inv_std", f("saved.inv_std"), move |o| {
                input_grad(v, x, bad_inv, good_sums, None, &mut o.dx)
            }),
            case("input_grad sums", f("sums"), move |o| {
                input_grad(v, x, sv, bad_sums, None, &mut o.dx)
            }),
            case("input_grad gamma", f("gamma"), move |o| {
                input_grad(v, x, sv, good_sums, Some(bad), &mut o.dx)
            }),
            // Parameter-gradient outputs.
            case("backward dgamma", f("dgamma"), move |o| {
                batch_norm_backward(v, x, sv, None, o.grads())
            })
            .with_out(bad_dg()),
            case("backward dbeta", f("dbeta"), move |o| {
                batch_norm_backward(v, x, sv, None, o.grads())
            })
            .with_out(bad_db()),
            case("backward_eval dgamma", f("dgamma"), move |o| {
                batch_norm_backward_eval(v, x, fixed, None, 1e-5, o.grads_without_dbeta())
            })
            .with_out(bad_dg()),
            case("backward_eval dbeta", f("dbeta"), move |o| {
                batch_norm_backward_eval(v, x, fixed, None, 1e-5, o.grads())
            })
            .with_out(bad_db()),
            // Running statistics.
            case("running update mean", f("running_mean"), move |o| {
                let mut rbad = sentinel(bad_len);
                let r = update_running_stats(batch, Momentum::Cumulative, 1, &mut rbad, &mut o.rv);
                untouched("running (bad)", &rbad);
                r
            }),
            case("running update var", f("running_var"), move |o| {
                let mut rbad = sentinel(bad_len);
                let r = update_running_stats(batch, Momentum::Exponential(0.1), 1, &mut o.rm, &mut rbad);
                untouched("running (bad)", &rbad);
                r
            }),
            // Algorithm 2's estimator.
            case("observe", feature("batch", bad_len, c), move |_| {
                let mut pop = PopulationStats::new(bad_len);
                let r = pop.observe(batch);
                assert_eq!(pop.batches(), 0);
                r
            }),
            case("observe_batch", feature("batch", bad_len, c), move |_| {
                let mut pop = PopulationStats::new(bad_len);
                let r = pop.observe_batch(v);
                assert_eq!(pop.batches(), 0);
                r
            }),
        ];
        check_all(n, c, &layer(c), cases);
    }
}

/// The layer rejects an input whose channel count is not `num_features`, in every method.
#[test]
fn layer_num_features_mismatch() {
    let (shape, layout, n) = ([2usize, 4, 3, 3], Layout::NCHW, 72);
    let x = xs(n);
    let v = View::new(&x, &shape, layout);
    let want = feature("input", 3, 4);
    let mut pop = PopulationStats::new(4);
    pop.observe_batch(v).unwrap();
    let (x, pop) = (&x, &pop);
    let cases = vec![
        on_layer("forward_train", want.clone(), move |o, bn| {
            bn.forward_train(v, &mut o.y).map(drop)
        }),
        on_layer("forward_eval", want.clone(), move |o, bn| bn.forward_eval(v, &mut o.y)),
        on_layer("backward", want.clone(), move |o, bn| {
            bn.backward(v, x, &saved(4, 18), o.grads())
        }),
        on_layer("backward_eval", want.clone(), move |o, bn| {
            bn.backward_eval(v, x, o.grads())
        }),
        on_layer("set_population_stats", feature("population", 3, 4), move |_, bn| {
            bn.set_population_stats(pop)
        }),
    ];
    check_all(n, 4, &layer(3), cases);
}

// ---------------------------------------------------------------------------------------------
// ε and momentum.
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_eps() {
    let (shape, layout, n, c) = ([3usize, 2], Layout::NC, 6, 2);
    let x = xs(n);
    let v = View::new(&x, &shape, layout);
    let ok = vec![1.0f32; c];
    let s = batch_stats(v).unwrap();
    let (x, fixed, s) = (&x, FixedStats::new(&ok, &ok), &s);
    for eps in [0.0, -0.0, -1e-5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let want = || Error::InvalidEps(eps);
        // ε changed on a live layer: rejected, nothing changed.
        let mut bn = layer(c);
        bn.config.eps = eps;
        let cases = vec![
            case(format!("{eps} train"), want(), move |o| {
                batch_norm_train(v, Affine::NONE, eps, &mut o.y).map(drop)
            }),
            case(format!("{eps} eval"), want(), move |o| {
                batch_norm_eval(v, fixed, Affine::NONE, eps, &mut o.y)
            }),
            case(format!("{eps} backward_eval"), want(), move |o| {
                batch_norm_backward_eval(v, x, fixed, None, eps, Grads::dx(&mut o.dx))
            }),
            case(format!("{eps} saved"), want(), move |_| s.saved(eps).map(drop)),
            case(format!("{eps} inference affine"), want(), move |_| {
                InferenceAffine::new(fixed, Affine::NONE, eps).map(drop)
            }),
            case(format!("{eps} new layer"), want(), move |_| {
                let config = BatchNormConfig {
                    eps,
                    ..BatchNormConfig::default()
                };
                BatchNorm::<f32>::new(c, config).map(drop)
            }),
            on_layer(format!("{eps} layer train"), want(), move |o, bn| {
                bn.forward_train(v, &mut o.y).map(drop)
            }),
            on_layer(format!("{eps} layer eval"), want(), move |o, bn| {
                bn.forward_eval(v, &mut o.y)
            }),
            on_layer(format!("{eps} layer backward_eval"), want(), move |o, bn| {
                bn.backward_eval(v, x, Grads::dx(&mut o.dx))
            }),
            on_layer(format!("{eps} layer inference affine"), want(), move |_, bn| {
                bn.inference_affine().map(drop)
            }),
        ];
        check_all(n, c, &bn, cases);
    }
}

#[test]
fn invalid_momentum() {
    let c = 2;
    let x = xs(6);
    let batch = batch_stats(View::new(&x, &[3, 2], Layout::NC)).unwrap();
    let batch = &batch;
    for m in [0.0, -0.0, 1.5, 1.0 + f64::EPSILON, -0.1, f64::NAN, f64::INFINITY] {
        let cases = vec![
            case(format!("{m} new layer"), Error::InvalidMomentum(m), move |_| {
                let config = BatchNormConfig {
                    momentum: Momentum::Exponential(m),
                    ..BatchNormConfig::default()
                };
                BatchNorm::<f32>::new(c, config).map(drop)
            }),
            case(format!("{m} running update"), Error::InvalidMomentum(m), move |o| {
                update_running_stats(batch, Momentum::Exponential(m), 3, &mut o.rm, &mut o.rv)
            }),
        ];
        check_all(6, c, &layer(c), cases);
    }
}

/// `BatchNorm::forward_train` documents "on error nothing (running statistics included) is
/// changed". Its configuration is public, so an invalid momentum can reach it after construction;
/// the error must leave y and the layer (`num_batches_tracked` included) as they were.
#[test]
fn layer_forward_train_invalid_momentum_changes_nothing() {
    let (shape, layout, n, c) = ([4usize, 2], Layout::NC, 8, 2);
    let x = xs(n);
    let mut bn = layer(c);
    bn.config.momentum = Momentum::Exponential(1.5);
    let cases = vec![on_layer("forward_train", Error::InvalidMomentum(1.5), |o, bn| {
        bn.forward_train(View::new(&x, &shape, layout), &mut o.y).map(drop)
    })];
    check_all(n, c, &bn, cases);
}

/// Same, with running statistics of the wrong length (public fields).
#[test]
fn layer_forward_train_bad_running_stats_changes_nothing() {
    let (shape, layout, n, c) = ([4usize, 2], Layout::NC, 8, 2);
    let x = xs(n);
    let mut bn = layer(c);
    bn.running_var = vec![1.0; c + 1];
    let cases = vec![on_layer("forward_train", feature("running_var", c, c + 1), |o, bn| {
        bn.forward_train(View::new(&x, &shape, layout), &mut o.y).map(drop)
    })];
    check_all(n, c, &bn, cases);
}

// ---------------------------------------------------------------------------------------------
// Missing statistics, merges, folding.
// ---------------------------------------------------------------------------------------------

#[test]
fn no_running_stats() {
    let (shape, layout, n, c) = ([3usize, 2, 2, 2], Layout::NCHW, 24, 2);
    let x = xs(n);
    let v = View::new(&x, &shape, layout);
    let config = BatchNormConfig {
        track_running_stats: false,
        ..BatchNormConfig::default()
    };
    let mut bn = BatchNorm::<f32>::new(c, config).unwrap();
    assert!(bn.running_mean.is_empty() && bn.running_var.is_empty());
    let x = &x;
    let cases = vec![
        on_layer("forward_eval", Error::NoRunningStats, move |o, bn| {
            bn.forward_eval(v, &mut o.y)
        }),
        on_layer("backward_eval", Error::NoRunningStats, move |o, bn| {
            bn.backward_eval(v, x, o.grads())
        }),
        on_layer("inference_affine", Error::NoRunningStats, |_, bn| {
            bn.inference_affine().map(drop)
        }),
    ];
    check_all(n, c, &bn, cases);
    // Training still works and does not track anything.
    let mut y = sentinel(n);
    bn.forward_train(v, &mut y).unwrap();
    assert!(bn.running_mean.is_empty());
    assert_eq!(bn.num_batches_tracked, 0);
}

#[test]
fn no_batches() {
    let pop = PopulationStats::new(3);
    let pop = &pop;
    let cases = vec![
        case("mean", Error::NoBatches, move |_| pop.mean().map(drop)),
        case("var", Error::NoBatches, move |_| pop.var().map(drop)),
        case("finish", Error::NoBatches, move |_| pop.finish::<f32>().map(drop)),
        on_layer("set_population_stats", Error::NoBatches, move |_, bn| {
            bn.set_population_stats(pop)
        }),
    ];
    check_all(3, 3, &layer(3), cases);
}

#[test]
fn merge_mismatch() {
    let x = xs(6);
    let a = batch_stats(View::new(&x, &[3, 2], Layout::NC)).unwrap();
    let b = batch_stats(View::new(&x, &[2, 3], Layout::NC)).unwrap();
    let s = GradSums {
        sum_dy: vec![1.0; 2],
        sum_dy_xhat: vec![2.0; 2],
    };
    let t = GradSums {
        sum_dy: vec![1.0; 3],
        sum_dy_xhat: vec![2.0; 3],
    };
    let (a, b, s, t) = (&a, &b, &s, &t);
    let mismatch = |left, right| Error::MergeMismatch { left, right };
    let cases = vec![
        case("BatchStats::merge", mismatch(2, 3), move |_| {
            let mut merged = a.clone();
            let r = merged.merge(b);
            assert_eq!(&merged, a, "merge changed the statistics");
            r
        }),
        // Also against an empty accumulator of the wrong width.
        case("empty BatchStats::merge", mismatch(0, 3), move |_| {
            let mut empty = BatchStats {
                count: 0,
                mean: vec![],
                m2: vec![],
            };
            empty.merge(b)
        }),
        case("GradSums::add", mismatch(2, 3), move |_| {
            let mut sum = s.clone();
            let r = sum.add(t);
            assert_eq!(&sum, s, "add changed the sums");
            r
        }),
    ];
    check_all(6, 3, &layer(3), cases);
}

/// `GradSums::write_param_grads` rejects outputs of the wrong length; like every other function it
/// must do so before writing anything.
#[test]
fn write_param_grads_checks_before_writing() {
    let sums = GradSums {
        sum_dy: vec![1.0, 2.0],
        sum_dy_xhat: vec![3.0, 4.0],
    };
    let sums = &sums;
    let cases = vec![
        case("dbeta", feature("dbeta", 2, 3), move |o| {
            sums.write_param_grads(Some(&mut o.dg), Some(&mut o.db))
        })
        .with_out(Out::sized(0, 0, 2, 3)),
        case("dgamma", feature("dgamma", 2, 1), move |o| {
            sums.write_param_grads(Some(&mut o.dg), Some(&mut o.db))
        })
        .with_out(Out::sized(0, 0, 1, 2)),
    ];
    check_all(0, 2, &layer(2), cases);
}

#[test]
fn fold_errors() {
    let bn = InferenceAffine {
        scale: vec![2.0, 3.0, 4.0],
        shift: vec![1.0, 1.0, 1.0],
    };
    // No channels at all.
    let none = InferenceAffine {
        scale: vec![],
        shift: vec![],
    };
    let one = [1.0f32; 3];
    let (bn, none, one) = (&bn, &none, &one);
    // The weight is folded in place: it is given as the `y` output, and must stay untouched.
    let weight = |len: usize| Out::sized(len, 0, 0, 0);
    let weight_error = |len: usize| {
        Want::Like(
            "BufferLength of `weight` with its actual length",
            Box::new(move |e| matches!(e, Error::BufferLength { name: "weight", actual, .. } if *actual == len)),
        )
    };
    let mut cases = Vec::new();
    for len in [7usize, 2, 4, 0] {
        cases.push(
            case(format!("weight of {len}"), weight_error(len), move |o| {
                fold_into_preceding(bn, None, &mut o.y).map(drop)
            })
            .with_out(weight(len)),
        );
    }
    for blen in [2usize, 4, 0] {
        cases.push(
            case(format!("bias of {blen}"), feature("bias", 3, blen), move |o| {
                fold_into_preceding(bn, Some(&vec![0.0f32; blen]), &mut o.y).map(drop)
            })
            .with_out(weight(6)),
        );
    }
    cases.extend([
        case("no channels", weight_error(4), move |o| {
            fold_into_preceding(none, None, &mut o.y).map(drop)
        })
        .with_out(weight(4)),
        // InferenceAffine::new with mismatched vectors.
        case("affine var", feature("var", 3, 2), move |_| {
            InferenceAffine::new(FixedStats::new(one, &one[..2]), Affine::NONE, 1e-5).map(drop)
        }),
        case("affine gamma", feature("gamma", 3, 1), move |_| {
            let affine = Affine {
                gamma: Some(&one[..1]),
                beta: None,
            };
            InferenceAffine::new(FixedStats::new(one, one), affine, 1e-5).map(drop)
        }),
        case("affine beta", feature("beta", 3, 2), move |_| {
            let affine = Affine {
                gamma: None,
                beta: Some(&one[..2]),
            };
            InferenceAffine::new(FixedStats::new(one, one), affine, 1e-5).map(drop)
        }),
    ]);
    check_all(0, 0, &layer(3), cases);
}

/// Errors display a message (they are `std::error::Error`s) and never panic while doing so.
#[test]
fn errors_display() {
    let e: Box<dyn std::error::Error> = Box::new(Error::TooFewValues {
        count: 1,
        shape: vec![1, 3],
    });
    assert!(e.to_string().contains("more than 1 value"));
    assert!(Error::InvalidEps(f64::NAN).to_string().contains("NaN"));
}

/// The statistics structs have public fields, so inconsistent ones (per-channel vectors of
/// different lengths) are possible input. The crate documents "every error is an `Error`, never a
/// panic": each consumer must reject them, not index out of bounds.
#[test]
fn inconsistent_public_structs_are_rejected_without_panic() {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let stats = |m2: usize| BatchStats {
        count: 4,
        mean: vec![0.0; 3],
        m2: vec![1.0; m2],
    };
    let (short_m2, long_m2, good) = (stats(2), stats(4), stats(3));
    let cases: Vec<(&str, Box<dyn Fn() -> Result<(), Error>>)> = vec![
        (
            "BatchStats::merge(short m2)",
            Box::new(|| good.clone().merge(&short_m2)),
        ),
        ("short m2 .merge(good)", Box::new(|| short_m2.clone().merge(&good))),
        (
            "update_running_stats(short m2)",
            Box::new(|| {
                let (mut rm, mut rv) = (vec![0.0f32; 3], vec![1.0f32; 3]);
                update_running_stats(&short_m2, Momentum::Exponential(0.1), 1, &mut rm, &mut rv)
            }),
        ),
        (
            "PopulationStats::observe(long m2)",
            Box::new(|| PopulationStats::new(3).observe(&long_m2)),
        ),
        (
            "fold_into_preceding(shift shorter than scale)",
            Box::new(|| {
                let bn = InferenceAffine {
                    scale: vec![1.0; 3],
                    shift: vec![0.0; 2],
                };
                fold_into_preceding(&bn, None, &mut [1.0f32; 6]).map(drop)
            }),
        ),
    ];
    let mut failures = Vec::new();
    for (what, f) in &cases {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Err(_)) => {}
            Ok(Ok(())) => failures.push(format!("{what}: accepted")),
            Err(_) => failures.push(format!("{what}: panicked")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------------
// Ghost batch norm: the virtual batch size, short groups, saved groups, synchronization.
// ---------------------------------------------------------------------------------------------

#[test]
fn ghost_errors() {
    use batchnorm::{
        ghost_batch_norm_backward, ghost_batch_norm_train, update_ghost_running_stats, GhostSaved, SingleProcess,
        SyncBatchNorm,
    };
    let (layout, c, shape, n) = (Layout::NC, 2, [6usize, 2], 12);
    let x = xs(n);
    let v = View::new(&x, &shape, layout);
    let x5 = xs(10);
    let short = View::new(&x5, &[5, 2], layout); // groups of 2, 2 and 1 examples
    let x_nchw = xs(6);
    let short_nchw = View::new(&x_nchw, &[3, 2, 1, 1], Layout::NCHW); // groups of 2 and 1
    let one = View::new(&x[..2], &[1, 2], layout);
    let ghost = |v: usize, groups: usize, count: u64| GhostSaved {
        virtual_batch: v,
        groups: vec![saved(c, count); groups],
    };
    let (good, g) = (ghost(2, 3, 2), vec![1.0f32; c]);
    let (good, g, x) = (&good, &g, &x);
    let stats = batch_stats(v).unwrap();
    let wider = batch_stats(View::new(&x[..9], &[3, 3], layout)).unwrap();
    let single = batch_stats(one).unwrap();
    let (stats, wider, single) = (&stats, &wider, &single);
    let group_too_small = |group, count, shape: &[usize]| Error::GhostGroupTooSmall {
        group,
        count,
        shape: shape.to_vec(),
    };
    let mismatch = |expected, actual| Error::GhostGroupsMismatch { expected, actual };
    let cases = vec![
        case("train v = 0", Error::InvalidVirtualBatch(0), move |o| {
            ghost_batch_norm_train(v, 0, Affine::NONE, 1e-5, &mut o.y).map(drop)
        }),
        case("train v = 1", Error::InvalidVirtualBatch(1), move |o| {
            ghost_batch_norm_train(v, 1, Affine::NONE, 1e-5, &mut o.y).map(drop)
        }),
        case("train NC last group of one", group_too_small(2, 1, &[5, 2]), move |o| {
            ghost_batch_norm_train(short, 2, Affine::NONE, 1e-5, &mut o.y).map(drop)
        })
        .with_out(Out::new(10, c)),
        case(
            "train NCHW last group of one",
            group_too_small(1, 1, &[3, 2, 1, 1]),
            move |o| ghost_batch_norm_train(short_nchw, 2, Affine::NONE, 1e-5, &mut o.y).map(drop),
        )
        .with_out(Out::new(6, c)),
        case("train batch of one", too_few(1, &[1, 2]), move |o| {
            ghost_batch_norm_train(one, 2, Affine::NONE, 1e-5, &mut o.y).map(drop)
        })
        .with_out(Out::new(2, c)),
        case("train y", buffer("y", n, n - 1), move |o| {
            ghost_batch_norm_train(v, 2, Affine::NONE, 1e-5, &mut o.y).map(drop)
        })
        .with_out(Out::sized(n - 1, n, c, c)),
        // Backward: the saved groups against the input.
        case("backward v = 1", Error::InvalidVirtualBatch(1), move |o| {
            ghost_batch_norm_backward(v, x, &ghost(1, 6, 2), Some(g), o.grads())
        }),
        case("backward fewer groups", mismatch(3, 2), move |o| {
            ghost_batch_norm_backward(v, x, &ghost(2, 2, 2), Some(g), o.grads())
        }),
        case("backward other v", mismatch(2, 3), move |o| {
            ghost_batch_norm_backward(v, x, &ghost(4, 3, 2), Some(g), o.grads())
        }),
        case("backward group mean", feature("saved.mean", c, 1), move |o| {
            let mut bad = good.clone();
            bad.groups[1].mean.pop();
            ghost_batch_norm_backward(v, x, &bad, Some(g), o.grads())
        }),
        case("backward group count", group_too_small(2, 1, &shape), move |o| {
            let mut bad = good.clone();
            bad.groups[2].count = 1;
            ghost_batch_norm_backward(v, x, &bad, Some(g), o.grads())
        }),
        case("backward dy", buffer("dy", n, n - 1), move |o| {
            ghost_batch_norm_backward(v, &x[..n - 1], good, Some(g), o.grads())
        }),
        case("backward dx", buffer("dx", n, n + 1), move |o| {
            ghost_batch_norm_backward(v, x, good, Some(g), o.grads())
        })
        .with_out(Out::sized(n, n + 1, c, c)),
        case("backward gamma", feature("gamma", c, 1), move |o| {
            ghost_batch_norm_backward(v, x, good, Some(&g[..1]), o.grads())
        }),
        case("backward dbeta", feature("dbeta", c, c + 1), move |o| {
            ghost_batch_norm_backward(v, x, good, Some(g), o.grads())
        })
        .with_out(Out::sized(n, n, c, c + 1)),
        // The running update.
        case("update no groups", Error::NoBatches, move |o| {
            update_ghost_running_stats(&[], Momentum::Exponential(0.1), 1, &mut o.rm, &mut o.rv)
        }),
        case(
            "update channels",
            Error::MergeMismatch { left: 2, right: 3 },
            move |o| {
                let groups = [stats.clone(), wider.clone()];
                update_ghost_running_stats(&groups, Momentum::Exponential(0.1), 1, &mut o.rm, &mut o.rv)
            },
        ),
        case("update running mean", feature("running_mean", c, c + 1), move |o| {
            let mut rm = sentinel(c + 1);
            let r = update_ghost_running_stats(
                std::slice::from_ref(stats),
                Momentum::Exponential(0.1),
                1,
                &mut rm,
                &mut o.rv,
            );
            untouched("running mean (long)", &rm);
            r
        }),
        case("update momentum", Error::InvalidMomentum(1.5), move |o| {
            update_ghost_running_stats(
                std::slice::from_ref(stats),
                Momentum::Exponential(1.5),
                1,
                &mut o.rm,
                &mut o.rv,
            )
        }),
        case("update group of one", too_few(1, &[]), move |o| {
            let groups = [stats.clone(), single.clone()];
            update_ghost_running_stats(&groups, Momentum::Exponential(0.1), 1, &mut o.rm, &mut o.rv)
        }),
        // Layers: the configuration.
        case("new v = 1", Error::InvalidVirtualBatch(1), move |_| {
            let config = BatchNormConfig {
                virtual_batch: Some(1),
                ..BatchNormConfig::default()
            };
            BatchNorm::<f32>::new(c, config).map(drop)
        }),
        case("sync new", Error::GhostNotSynchronized, move |_| {
            let config = BatchNormConfig {
                virtual_batch: Some(2),
                ..BatchNormConfig::default()
            };
            SyncBatchNorm::<f32>::new(c, config).map(drop)
        }),
    ];
    check_all(n, c, &layer(c), cases);

    // A ghost layer: short groups, statistics that are not its packed ones, the synchronized
    // passes; nothing changes (its running statistics included).
    let mut bn = layer(c);
    bn.config.virtual_batch = Some(2);
    let cases = vec![
        on_layer(
            "layer train NC last group of one",
            group_too_small(2, 1, &[5, 2]),
            move |o, bn| bn.forward_train(short, &mut o.y).map(drop),
        )
        .with_out(Out::new(10, c)),
        // Plain statistics (C values) where the layer packs 3 groups × C.
        on_layer(
            "layer backward plain saved",
            feature("saved.mean", 3 * c, c),
            move |o, bn| bn.backward(v, x, &saved(c, 12), o.grads()),
        ),
        on_layer("layer train sync", Error::GhostNotSynchronized, move |o, bn| {
            bn.forward_train_sync(&SingleProcess, v, &mut o.y).map(drop)
        }),
        on_layer("layer backward sync", Error::GhostNotSynchronized, move |o, bn| {
            bn.backward_sync(&SingleProcess, v, x, &saved(c, 12), o.grads())
                .map(drop)
        }),
        // Groups are whole examples; a mask selects positions: the masked passes reject the layer.
        on_layer("layer train masked", Error::GhostNotMasked, move |o, bn| {
            bn.forward_train_masked(v, &[true; 6], &mut o.y).map(drop)
        }),
        on_layer("layer backward masked", Error::GhostNotMasked, move |o, bn| {
            bn.backward_masked(v, &[true; 6], x, &saved(c, 12), o.grads())
        }),
        on_layer("layer train masked sync", Error::GhostNotSynchronized, move |o, bn| {
            bn.forward_train_masked_sync(&SingleProcess, v, &[true; 6], &mut o.y)
                .map(drop)
        }),
        on_layer(
            "layer backward masked sync",
            Error::GhostNotSynchronized,
            move |o, bn| {
                bn.backward_masked_sync(&SingleProcess, v, &[true; 6], x, &saved(c, 12), o.grads())
                    .map(drop)
            },
        ),
    ];
    check_all(n, c, &bn, cases);

    // A virtual batch size made invalid after construction (the configuration is public):
    // rejected first by both training passes, frozen or not.
    for frozen in [false, true] {
        let mut bn = layer(c);
        bn.config.virtual_batch = Some(1);
        bn.set_frozen(frozen);
        let cases = vec![
            on_layer("layer train v = 1", Error::InvalidVirtualBatch(1), move |o, bn| {
                bn.forward_train(v, &mut o.y).map(drop)
            }),
            on_layer("layer backward v = 1", Error::InvalidVirtualBatch(1), move |o, bn| {
                bn.backward(v, x, &saved(c, 12), o.grads())
            }),
            on_layer(
                "layer train masked v = 1",
                Error::InvalidVirtualBatch(1),
                move |o, bn| bn.forward_train_masked(v, &[true; 6], &mut o.y).map(drop),
            ),
            on_layer(
                "layer backward masked v = 1",
                Error::InvalidVirtualBatch(1),
                move |o, bn| bn.backward_masked(v, &[true; 6], x, &saved(c, 12), o.grads()),
            ),
        ];
        check_all(n, c, &bn, cases);
    }
}

// ---------------------------------------------------------------------------------------------
// Masked batch norm: the mask's length, the count of selected values.
// ---------------------------------------------------------------------------------------------

/// Every masked function and method rejects a mask whose length is not the number of values per
/// channel (`BufferLength` named `mask`), after the input's and output buffers' own checks.
#[test]
fn masked_wrong_mask_length() {
    let (shape, layout, n, c) = ([2usize, 3, 2, 2], Layout::NCHW, 24, 3);
    let per_channel = 8;
    let (g, m, var) = (vec![1.0f32; c], vec![0.0f32; c], vec![1.0f32; c]);
    let fixed = FixedStats::new(&m, &var);
    let (sv, sums) = (saved(c, 8), sums(c));
    let x = xs(n);
    let v = View::new(&x, &shape, layout);
    let masks: Vec<Vec<bool>> = [0, per_channel - 1, per_channel + 1, n]
        .map(|len| vec![true; len])
        .into();
    let (x, sv, sums, g) = (&x, &sv, &sums, &g);
    let mut cases = Vec::new();
    for mask in &masks {
        let len = mask.len();
        let want = buffer("mask", per_channel, len);
        cases.extend([
            case(format!("train mask {len}"), want.clone(), move |o| {
                batch_norm_train_masked(v, mask, Affine::NONE, 1e-5, &mut o.y).map(drop)
            }),
            case(format!("eval mask {len}"), want.clone(), move |o| {
                batch_norm_eval_masked(v, mask, fixed, Affine::NONE, 1e-5, &mut o.y)
            }),
            case(format!("normalize mask {len}"), want.clone(), move |o| {
                normalize_masked(v, mask, sv, Affine::NONE, &mut o.y)
            }),
            case(format!("batch_stats mask {len}"), want.clone(), move |_| {
                batch_stats_masked(v, mask).map(drop)
            }),
            case(format!("backward mask {len}"), want.clone(), move |o| {
                batch_norm_backward_masked(v, mask, x, sv, Some(g), o.grads())
            }),
            case(format!("backward_eval mask {len}"), want.clone(), move |o| {
                batch_norm_backward_eval_masked(v, mask, x, fixed, Some(g), 1e-5, o.grads())
            }),
            case(format!("grad_sums mask {len}"), want.clone(), move |_| {
                grad_sums_masked(v, mask, x, sv).map(drop)
            }),
            case(format!("input_grad mask {len}"), want.clone(), move |o| {
                input_grad_masked(v, mask, x, sv, sums, Some(g), &mut o.dx)
            }),
            on_layer(format!("layer train mask {len}"), want.clone(), move |o, bn| {
                bn.forward_train_masked(v, mask, &mut o.y).map(drop)
            }),
            on_layer(format!("layer eval mask {len}"), want.clone(), move |o, bn| {
                bn.forward_eval_masked(v, mask, &mut o.y)
            }),
            on_layer(format!("layer backward mask {len}"), want.clone(), move |o, bn| {
                bn.backward_masked(v, mask, x, sv, o.grads())
            }),
            on_layer(format!("layer backward_eval mask {len}"), want.clone(), move |o, bn| {
                bn.backward_eval_masked(v, mask, x, o.grads())
            }),
            on_layer(format!("layer train sync mask {len}"), want.clone(), move |o, bn| {
                bn.forward_train_masked_sync(&SingleProcess, v, mask, &mut o.y)
                    .map(drop)
            }),
            on_layer(format!("layer backward sync mask {len}"), want.clone(), move |o, bn| {
                bn.backward_masked_sync(&SingleProcess, v, mask, x, sv, o.grads())
                    .map(drop)
            }),
            on_layer(format!("frozen layer train mask {len}"), want.clone(), move |o, bn| {
                bn.freeze();
                let r = bn.forward_train_masked(v, mask, &mut o.y).map(drop);
                bn.unfreeze();
                r
            }),
            on_layer(
                format!("frozen layer backward sync mask {len}"),
                want.clone(),
                move |o, bn| {
                    bn.freeze();
                    let r = bn
                        .backward_masked_sync(&SingleProcess, v, mask, x, sv, o.grads())
                        .map(drop);
                    bn.unfreeze();
                    r
                },
            ),
        ]);
    }
    // The buffers of x, y and dy are checked before the mask.
    let (short, bad_mask): (&[f32], &[bool]) = (&x[..n - 1], &[true; 3]);
    cases.extend([
        case("y before mask", buffer("y", n, n - 1), move |o| {
            batch_norm_train_masked(v, bad_mask, Affine::NONE, 1e-5, &mut o.y).map(drop)
        })
        .with_out(Out::sized(n - 1, n, c, c)),
        case("dy before mask", buffer("dy", n, n - 1), move |o| {
            batch_norm_backward_masked(v, bad_mask, short, sv, None, o.grads())
        }),
        case("x before mask", buffer("x", n, n - 1), move |_| {
            batch_stats_masked(View::new(short, &shape, layout), bad_mask).map(drop)
        }),
    ]);
    check_all(n, c, &layer(c), cases);
}

/// Training needs at least 2 selected values per channel: `TooFewValues` with their count (0 or 1)
/// and the input's shape, from the free function and the layer (one-process and synchronized over
/// one rank); the backward checks the saved count as the plain one does.
#[test]
fn masked_too_few_selected_values() {
    let (shape, layout, n, c) = ([3usize, 2, 2], Layout::ChannelsLast, 12, 2);
    let x = xs(n);
    let v = View::new(&x, &shape, layout);
    let (one, good_sums) = (saved(c, 1), sums(c));
    let mut cases = Vec::new();
    for (mask, count) in [([false; 6], 0u64), ([false, false, false, true, false, false], 1)] {
        let want = || too_few(count, &shape);
        cases.extend([
            case(format!("train {count} selected"), want(), move |o| {
                batch_norm_train_masked(v, &mask, Affine::NONE, 1e-5, &mut o.y).map(drop)
            }),
            on_layer(format!("layer train {count} selected"), want(), move |o, bn| {
                bn.forward_train_masked(v, &mask, &mut o.y).map(drop)
            }),
            on_layer(format!("layer train sync {count} selected"), want(), move |o, bn| {
                bn.forward_train_masked_sync(&SingleProcess, v, &mask, &mut o.y)
                    .map(drop)
            }),
        ]);
    }
    let (one, good_sums, x) = (&one, &good_sums, &x);
    let mask = [true; 6];
    cases.extend([
        case("backward saved count 1", too_few(1, &shape), move |o| {
            batch_norm_backward_masked(v, &mask, x, one, None, o.grads())
        }),
        case("grad_sums saved count 1", too_few(1, &shape), move |_| {
            grad_sums_masked(v, &mask, x, one).map(drop)
        }),
        case("input_grad saved count 1", too_few(1, &shape), move |o| {
            input_grad_masked(v, &mask, x, one, good_sums, None, &mut o.dx)
        }),
    ]);
    check_all(n, c, &layer(c), cases);
    // A shard may hold fewer than 2 selected values (its count is merged over workers).
    assert_eq!(batch_stats_masked(v, &[false; 6]).unwrap().count, 0);
}

// ---------------------------------------------------------------------------------------------
// Fused batch norm + ReLU: z, dz, the ReLU mask, ghost layers.
// ---------------------------------------------------------------------------------------------

/// The fused forwards reject a residual `z` of the wrong length (`BufferLength` named `z`, after
/// `y` and γ/β and before ε), the fused backwards a `dz` of the wrong length (`BufferLength`
/// named `dz`, after the ReLU mask and before `dx`) and a mask written for another geometry, or
/// never written (`ReluMaskMismatch`, right after `dy`); nothing is written, the mask included.
#[test]
fn fused_buffer_and_mask_errors() {
    let (shape, layout, n, c) = ([2usize, 3, 2, 2], Layout::NCHW, 24, 3);
    let (g, m, var) = (vec![1.0f32; c], vec![0.0f32; c], vec![1.0f32; c]);
    let fixed = FixedStats::new(&m, &var);
    let sv = saved(c, 8);
    let (x, short, long) = (xs(n), xs(n - 1), xs(n + 1));
    let good = View::new(&x, &shape, layout);
    let geometry = layout.geometry(&shape).unwrap();
    // A mask of this input, one of the same length in another layout, and one never written.
    let mut mask = ReluMask::new();
    batch_norm_train_relu(good, Affine::NONE, 1e-5, &mut sentinel(n), &mut mask).unwrap();
    let x_nhwc = xs(n);
    let mut other = ReluMask::new();
    let nhwc = View::new(&x_nhwc, &[2, 2, 2, 3], Layout::NHWC);
    batch_norm_train_relu(nhwc, Affine::NONE, 1e-5, &mut sentinel(n), &mut other).unwrap();
    let mismatch = |actual| Error::ReluMaskMismatch {
        expected: geometry,
        actual,
    };
    let never = ReluMask::new();
    let (sv, g, x, mask, other, short, m, var) = (&sv, &g, &x, &mask, &other, &short, &m, &var);
    let mut cases = Vec::new();
    // z
    for bad in [short, &long] {
        let want = buffer("z", n, bad.len());
        cases.extend([
            case("z: train add relu", want.clone(), move |o| {
                batch_norm_train_add_relu(good, bad, Affine::NONE, 1e-5, &mut o.y, &mut o.mask).map(drop)
            }),
            case("z: eval add relu", want.clone(), move |o| {
                batch_norm_eval_add_relu(good, bad, fixed, Affine::NONE, 1e-5, &mut o.y, Some(&mut o.mask))
            }),
            on_layer("z: layer train add relu", want.clone(), move |o, bn| {
                bn.forward_train_add_relu(good, bad, &mut o.y, &mut o.mask).map(drop)
            }),
            on_layer("z: layer eval add relu", want.clone(), move |o, bn| {
                bn.forward_eval_add_relu(good, bad, &mut o.y, Some(&mut o.mask))
            }),
            on_layer("z: frozen layer train add relu", want.clone(), move |o, bn| {
                bn.freeze();
                let r = bn.forward_train_add_relu(good, bad, &mut o.y, &mut o.mask).map(drop);
                bn.unfreeze();
                r
            }),
        ]);
    }
    // The order of the forward's checks: y, then γ/β, then z, then ε.
    let (bad_z, bad_g) = (short, &g[..2]);
    cases.extend([
        case("y before z", buffer("y", n, n - 1), move |o| {
            batch_norm_train_add_relu(good, bad_z, Affine::NONE, 1e-5, &mut o.y, &mut o.mask).map(drop)
        })
        .with_out(Out::sized(n - 1, n, c, c)),
        case("gamma before z", feature("gamma", c, 2), move |o| {
            let affine = Affine::new(bad_g, g);
            batch_norm_train_add_relu(good, bad_z, affine, 1e-5, &mut o.y, &mut o.mask).map(drop)
        }),
        case("z before eps", buffer("z", n, n - 1), move |o| {
            batch_norm_eval_add_relu(good, bad_z, fixed, Affine::NONE, -1.0, &mut o.y, Some(&mut o.mask))
        }),
        case("y: eval relu", buffer("y", n, n + 1), move |o| {
            batch_norm_eval_relu(good, fixed, Affine::NONE, 1e-5, &mut o.y, Some(&mut o.mask))
        })
        .with_out(Out::sized(n + 1, n, c, c)),
        case("too few values, relu", too_few(1, &[1, 3]), move |o| {
            let one = View::new(&x[..3], &[1, 3], Layout::NC);
            batch_norm_train_relu(one, Affine::NONE, 1e-5, &mut o.y, &mut o.mask).map(drop)
        })
        .with_out(Out::new(3, c)),
    ]);
    // dz
    for len in [n - 1, n + 1] {
        let want = buffer("dz", n, len);
        let out = || Out::with_dz(n, c, len);
        cases.extend([
            case("dz: backward add relu", want.clone(), move |o| {
                let Out { dx, dg, db, dz, .. } = o;
                batch_norm_backward_add_relu(good, x, mask, sv, Some(g), Grads::new(dx, dg, db), dz)
            })
            .with_out(out()),
            case("dz: backward add relu without dx", want.clone(), move |o| {
                batch_norm_backward_add_relu(good, x, mask, sv, Some(g), Grads::default(), &mut o.dz)
            })
            .with_out(out()),
            case("dz: backward eval add relu", want.clone(), move |o| {
                let Out { dx, dg, db, dz, .. } = o;
                batch_norm_backward_eval_add_relu(good, x, mask, fixed, Some(g), 1e-5, Grads::new(dx, dg, db), dz)
            })
            .with_out(out()),
            on_layer("dz: layer backward add relu", want.clone(), move |o, bn| {
                let Out { dx, dg, db, dz, .. } = o;
                bn.backward_add_relu(good, x, mask, sv, Grads::new(dx, dg, db), dz)
            })
            .with_out(out()),
            on_layer("dz: layer backward eval add relu", want.clone(), move |o, bn| {
                let Out { dx, dg, db, dz, .. } = o;
                bn.backward_eval_add_relu(good, x, mask, Grads::new(dx, dg, db), dz)
            })
            .with_out(out()),
        ]);
    }
    // The mask.
    for (bad, actual) in [(other, other.geometry()), (&never, None)] {
        let want = mismatch(actual);
        cases.extend([
            case("mask: backward relu", want.clone(), move |o| {
                batch_norm_backward_relu(good, x, bad, sv, Some(g), o.grads())
            }),
            case("mask: backward add relu", want.clone(), move |o| {
                let Out { dx, dg, db, dz, .. } = o;
                batch_norm_backward_add_relu(good, x, bad, sv, Some(g), Grads::new(dx, dg, db), dz)
            }),
            case("mask: backward eval relu", want.clone(), move |o| {
                batch_norm_backward_eval_relu(good, x, bad, fixed, Some(g), 1e-5, o.grads())
            }),
            case("mask: backward eval add relu", want.clone(), move |o| {
                let Out { dx, dg, db, dz, .. } = o;
                batch_norm_backward_eval_add_relu(good, x, bad, fixed, Some(g), 1e-5, Grads::new(dx, dg, db), dz)
            }),
            on_layer("mask: layer backward relu", want.clone(), move |o, bn| {
                bn.backward_relu(good, x, bad, sv, o.grads())
            }),
            on_layer("mask: layer backward eval relu", want.clone(), move |o, bn| {
                bn.backward_eval_relu(good, x, bad, o.grads())
            }),
            on_layer("mask: frozen layer backward add relu", want.clone(), move |o, bn| {
                bn.freeze();
                let Out { dx, dg, db, dz, .. } = o;
                let r = bn.backward_add_relu(good, x, bad, sv, Grads::new(dx, dg, db), dz);
                bn.unfreeze();
                r
            }),
        ]);
    }
    // The order of the backward's checks: dy, then the mask, then dz, then dx, then the rest.
    cases.extend([
        case("dy before mask", buffer("dy", n, n - 1), move |o| {
            batch_norm_backward_relu(good, short, other, sv, Some(g), o.grads())
        }),
        case("mask before dz", mismatch(other.geometry()), move |o| {
            let Out { dx, dg, db, dz, .. } = o;
            batch_norm_backward_add_relu(good, x, other, sv, Some(g), Grads::new(dx, dg, db), dz)
        })
        .with_out(Out::sized(n, n - 1, c, c)),
        case("dz before dx", buffer("dz", n, n - 1), move |o| {
            let Out { dx, dg, db, dz, .. } = o;
            batch_norm_backward_add_relu(good, x, mask, sv, Some(g), Grads::new(dx, dg, db), dz)
        })
        .with_out(Out {
            dx: sentinel(n + 1),
            ..Out::with_dz(n, c, n - 1)
        }),
        case("dz before the statistics", buffer("dz", n, n - 1), move |o| {
            let Out { dx, dg, db, dz, .. } = o;
            let bad = FixedStats::new(&m[..2], var);
            batch_norm_backward_eval_add_relu(good, x, mask, bad, Some(g), 1e-5, Grads::new(dx, dg, db), dz)
        })
        .with_out(Out::with_dz(n, c, n - 1)),
        case("saved after the mask", feature("saved.mean", c, 2), move |o| {
            let sv2 = SavedStats {
                mean: vec![0.0; 2],
                ..saved(c, 8)
            };
            batch_norm_backward_relu(good, x, mask, &sv2, Some(g), o.grads())
        }),
    ]);
    check_all(n, c, &layer(c), cases);
}

/// The layer's fused passes: a ghost layer is rejected first (`GhostNotFused`; an invalid virtual
/// batch size before it), frozen or not; an input of another channel count and missing running
/// statistics as the plain methods reject them.
#[test]
fn fused_layer_errors() {
    let (shape, layout, n, c) = ([6usize, 2], Layout::NC, 12, 2);
    let x = xs(n);
    let v = View::new(&x, &shape, layout);
    let mut mask = ReluMask::new();
    batch_norm_train_relu(v, Affine::NONE, 1e-5, &mut sentinel(n), &mut mask).unwrap();
    let (x, mask, sv) = (&x, &mask, &saved(c, 6));
    let ghost = |virtual_batch| {
        let mut bn = layer(c);
        bn.config.virtual_batch = Some(virtual_batch);
        bn
    };
    for (bn, want) in [
        (ghost(2), Error::GhostNotFused),
        (ghost(1), Error::InvalidVirtualBatch(1)),
    ] {
        let cases = vec![
            on_layer("ghost train relu", want.clone(), move |o, bn| {
                bn.forward_train_relu(v, &mut o.y, &mut o.mask).map(drop)
            }),
            on_layer("ghost train add relu", want.clone(), move |o, bn| {
                bn.forward_train_add_relu(v, x, &mut o.y, &mut o.mask).map(drop)
            }),
            on_layer("frozen ghost train relu", want.clone(), move |o, bn| {
                bn.freeze();
                let r = bn.forward_train_relu(v, &mut o.y, &mut o.mask).map(drop);
                bn.unfreeze();
                r
            }),
            on_layer("ghost backward relu", want.clone(), move |o, bn| {
                bn.backward_relu(v, x, mask, sv, o.grads())
            }),
            on_layer("ghost backward add relu", want.clone(), move |o, bn| {
                let Out { dx, dg, db, dz, .. } = o;
                bn.backward_add_relu(v, x, mask, sv, Grads::new(dx, dg, db), dz)
            }),
        ];
        check_all(n, c, &bn, cases);
    }
    let untracked = BatchNorm::<f32>::new(
        c,
        BatchNormConfig {
            track_running_stats: false,
            ..BatchNormConfig::default()
        },
    )
    .unwrap();
    let cases = vec![
        on_layer(
            "eval relu without running statistics",
            Error::NoRunningStats,
            move |o, bn| bn.forward_eval_relu(v, &mut o.y, Some(&mut o.mask)),
        ),
        on_layer(
            "backward eval add relu without running statistics",
            Error::NoRunningStats,
            move |o, bn| {
                let Out { dx, dg, db, dz, .. } = o;
                bn.backward_eval_add_relu(v, x, mask, Grads::new(dx, dg, db), dz)
            },
        ),
    ];
    check_all(n, c, &untracked, cases);
    let x3 = &xs(18);
    let v3 = View::new(x3, &[6, 3], layout);
    let want = feature("input", c, 3);
    let cases = vec![
        on_layer("train relu channels", want.clone(), move |o, bn| {
            bn.forward_train_relu(v3, &mut o.y, &mut o.mask).map(drop)
        }),
        on_layer("eval add relu channels", want.clone(), move |o, bn| {
            bn.forward_eval_add_relu(v3, x3, &mut o.y, None)
        }),
        on_layer("backward relu channels", want.clone(), move |o, bn| {
            bn.backward_relu(v3, x3, mask, &saved(3, 6), o.grads())
        }),
    ];
    check_all(18, c, &layer(c), cases);
}
