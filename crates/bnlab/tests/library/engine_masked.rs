//! The engine's masked batch norm (`BatchNormLayer::masked`): each pass against the kernel crate's
//! masked functions bit for bit (plain and frozen, synchronized over one process), the mask of
//! each forward kept for its backward, Algorithm 2 over the valid positions, no leak of padding
//! through the layer or through a network of masked layers, the statistics independent of how
//! much padding a batch holds, and the rejections. Checkpoints of masked layers are in
//! `engine_variants`, synchronization over several ranks in the `parallel` binary.

use std::path::PathBuf;
use std::sync::Arc;

use batchnorm::{
    batch_norm_eval_masked, batch_norm_train_masked, Affine, BatchNorm, BatchNormConfig, FixedStats, Grads, Layout,
    PopulationStats, SingleProcess, View,
};
use bnlab::engine::fold::fold_batchnorm;
use bnlab::engine::{
    BatchNormLayer, BnVariant, Conv2d, ConvInit, Layer, Linear, MaskedMeanPool, Mode, PositionMask, Relu, Sequential,
    Sgd, ZeroMasked,
};
use bnlab::experiments::padded::{build, Settings, Variant};

use crate::common::checkpoints::sgd_step;
use crate::common::{normal, rng};
use crate::engine_conv::{fill_masked, masked_case, run_masked, same_bits};
use crate::engine_variants::{
    assert_same_as_kernel, batch_data, engine_step, for_plain_and_frozen, params, KernelLayer, Step,
};

/// The mask of `batch` sequences of `spatial` positions, example n of length (3n + seed) mod
/// (spatial + 1): some empty, some full, a different pattern for each seed.
fn mask_of(batch: usize, spatial: usize, seed: usize) -> PositionMask {
    let lengths: Vec<usize> = (0..batch).map(|n| (3 * n + seed) % (spatial + 1)).collect();
    PositionMask::from_lengths(&lengths, spatial).unwrap()
}

/// A masked layer of `variant` over `[channels, spatial]` examples.
fn masked_layer(channels: usize, spatial: usize, variant: BnVariant) -> BatchNormLayer {
    (BatchNormLayer::with_variant(channels, spatial, BatchNormConfig::default(), variant).unwrap())
        .masked()
        .unwrap()
}

/// The kernel crate's `BatchNorm` driven by hand through its masked passes, with one mask.
struct MaskedKernel {
    bn: BatchNorm<f32>,
    mask: Vec<bool>,
}

impl KernelLayer for MaskedKernel {
    fn step(&mut self, x: View<'_, f32>, dy: &[f32]) -> Step {
        let mut y = vec![0.0; x.data.len()];
        let saved = self.bn.forward_train_masked(x, &self.mask, &mut y).unwrap();
        let channels = self.bn.num_features;
        let (mut dx, mut dg, mut db) = (vec![0.0; y.len()], vec![0.0; channels], vec![0.0; channels]);
        let grads = Grads::new(&mut dx, &mut dg, &mut db);
        self.bn.backward_masked(x, &self.mask, dy, &saved, grads).unwrap();
        (y, dx, dg, db)
    }
    fn infer(&self, x: View<'_, f32>, y: &mut [f32]) {
        self.bn.forward_eval_masked(x, &self.mask, y).unwrap()
    }
}

/// Masked plain and frozen batch norm: the engine layer equals the kernel's `BatchNorm` driven by
/// hand through `forward_train_masked`, `backward_masked` and `forward_eval_masked` (frozen: plain
/// for `after` steps, then `freeze()`), bit for bit, in y, dx, dγ, dβ, the running statistics
/// (updated with the valid count) and the inference output.
#[test]
fn masked_layers_are_the_kernel_masked_layer() {
    for_plain_and_frozen(|variant, after, dims| {
        let what = format!("masked {variant:?} {dims:?}");
        let [batch, channels, spatial] = dims;
        let mask = mask_of(batch, spatial, 1);
        let mut engine = masked_layer(channels, spatial, variant);
        engine.set_mask(&mask);
        let bn = BatchNorm::<f32>::new(channels, BatchNormConfig::default()).unwrap();
        let mut kernel = MaskedKernel {
            bn,
            mask: mask.valid().to_vec(),
        };
        let (gamma, beta) = params(channels);
        (engine.bn.gamma, engine.bn.beta) = (gamma.clone(), beta.clone());
        (kernel.bn.gamma, kernel.bn.beta) = (gamma, beta);
        let freeze = |step: usize, kernel: &mut MaskedKernel| {
            if after == Some(step as u64) {
                kernel.bn.freeze();
            }
        };
        let check = |step: usize, engine: &BatchNormLayer, kernel: &MaskedKernel| {
            assert_eq!(&engine.bn, &kernel.bn, "{what}: layer state after step {step}");
        };
        assert_same_as_kernel(&what, &mut engine, &mut kernel, dims, freeze, check);
        assert!(engine.is_masked());
    });
}

/// Each forward pass uses the mask given last, and its backward the mask of that forward, even
/// when the next batch's mask arrives in between (as `Sequential::set_mask` hands it out).
#[test]
fn each_pass_uses_the_mask_of_its_forward() {
    let [batch, channels, spatial] = [4, 2, 5];
    let shape = [batch, channels, spatial];
    let mut engine = masked_layer(channels, spatial, BnVariant::Plain);
    let mut kernel = BatchNorm::<f32>::new(channels, BatchNormConfig::default()).unwrap();
    for step in 0..3 {
        let (x, dy) = batch_data(step, batch * channels * spatial);
        let (this, next) = (mask_of(batch, spatial, step), mask_of(batch, spatial, step + 1));
        assert_ne!(this, next);
        engine.set_mask(&this);
        let mut y = vec![0.0; x.len()];
        engine.forward(&x, batch, &mut y, Mode::Train).unwrap();
        engine.set_mask(&next);
        let mut dx = vec![0.0; x.len()];
        engine.backward(&x, &y, &dy, batch, Some(&mut dx)).unwrap();
        let grads: Vec<Vec<f32>> = engine.params().iter().map(|p| p.grad.to_vec()).collect();

        let xv = View::new(&x, &shape, Layout::ChannelsFirst);
        let mut want_y = vec![0.0; x.len()];
        let saved = kernel.forward_train_masked(xv, this.valid(), &mut want_y).unwrap();
        let (mut want_dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; channels], vec![0.0; channels]);
        let kernel_grads = Grads::new(&mut want_dx, &mut dg, &mut db);
        kernel
            .backward_masked(xv, this.valid(), &dy, &saved, kernel_grads)
            .unwrap();
        assert_eq!((y, dx), (want_y, want_dx), "step {step}");
        assert_eq!(grads, [dg, db], "step {step}");
    }
}

/// Masked layers (plain, and frozen from step 2) synchronized over one process are the kernel's
/// synchronized masked passes (`forward_train_masked_sync`, `backward_masked_sync` and the rank's
/// share of dγ, dβ), bit for bit; the `parallel` binary holds 2 and 3 ranks to one process.
#[test]
fn masked_layers_train_synchronized() {
    let [batch, channels, spatial] = [5, 2, 4];
    let shape = [batch, channels, spatial];
    for after in [None, Some(2)] {
        let variant = after.map_or(BnVariant::Plain, |after| BnVariant::Frozen { after });
        let mut engine = masked_layer(channels, spatial, variant);
        engine.synchronize(Some(Arc::new(SingleProcess)));
        let mut kernel = BatchNorm::<f32>::new(channels, BatchNormConfig::default()).unwrap();
        for step in 0..4 {
            let (x, dy) = batch_data(step, batch * channels * spatial);
            let mask = mask_of(batch, spatial, step);
            engine.set_mask(&mask);
            let got = engine_step(&mut engine, &x, &dy, batch);
            if after == Some(step as u64) {
                kernel.freeze();
            }
            let xv = View::new(&x, &shape, Layout::ChannelsFirst);
            let mut y = vec![0.0; x.len()];
            let saved = kernel
                .forward_train_masked_sync(&SingleProcess, xv, mask.valid(), &mut y)
                .unwrap();
            let mut dx = vec![0.0; x.len()];
            let sums = (kernel.backward_masked_sync(&SingleProcess, xv, mask.valid(), &dy, &saved, Grads::dx(&mut dx)))
                .unwrap();
            let (mut dg, mut db) = (vec![0.0; channels], vec![0.0; channels]);
            sums.write_param_grads(Some(&mut dg[..]), Some(&mut db[..])).unwrap();
            assert_eq!(got, (y, dx, dg, db), "{variant:?} step {step}");
            assert_eq!(engine.bn, kernel, "{variant:?} step {step}");
        }
    }
}

/// Algorithm 2 with masked batch norm: `Collect` is the masked training transform and changes
/// nothing; `use_population` puts E[x] = the mean over batches of the masked batch means and
/// Var[x] = the mean over batches of the masked variances, each unbiased with its batch's valid
/// count m (m/(m − 1)·σ²_B), into the running statistics; inference is then masked inference with
/// them. Checked against those definitions computed in f64 from the valid values, and against the
/// kernel's `PopulationStats` bit for bit; the estimate over every position (padding included)
/// is another.
#[test]
fn masked_population_statistics_average_the_valid_positions() {
    let [batch, channels, spatial] = [4, 3, 6];
    let (shape, len) = ([batch, channels, spatial], batch * channels * spatial);
    let config = BatchNormConfig::default();
    let mut layer = masked_layer(channels, spatial, BnVariant::Plain);
    for step in 0..2 {
        let (x, dy) = batch_data(step, len);
        layer.set_mask(&mask_of(batch, spatial, step));
        engine_step(&mut layer, &x, &dy, batch);
    }
    let trained = layer.bn.clone();
    let affine = Affine::new(&trained.gamma, &trained.beta);
    let (mut pop, mut unmasked) = (PopulationStats::new(channels), PopulationStats::new(channels));
    // Per channel, the sums over batches of the batch means and unbiased variances (f64).
    let (mut means, mut vars) = (vec![0.0f64; channels], vec![0.0f64; channels]);
    let batches = 2..5;
    for step in batches.clone() {
        let (x, _) = batch_data(step, len);
        let mask = mask_of(batch, spatial, step + 4);
        layer.set_mask(&mask);
        let mut y = vec![0.0; len];
        layer.forward(&x, batch, &mut y, Mode::Collect).unwrap();
        let xv = View::new(&x, &shape, Layout::ChannelsFirst);
        let mut want = vec![0.0; len];
        let (stats, _) = batch_norm_train_masked(xv, mask.valid(), affine, config.eps, &mut want).unwrap();
        assert_eq!(y, want, "collect pass {step}: the masked training transform");
        pop.observe(&stats).unwrap();
        unmasked.observe_batch(xv).unwrap();
        for c in 0..channels {
            let valid: Vec<f64> = (0..batch * spatial)
                .filter(|&i| mask.valid()[i])
                .map(|i| x[(i / spatial * channels + c) * spatial + i % spatial] as f64)
                .collect();
            let m = valid.len() as f64;
            let mean = valid.iter().sum::<f64>() / m;
            means[c] += mean;
            vars[c] += valid.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (m - 1.0);
        }
    }
    assert_eq!(layer.bn, trained, "Collect changed the layer");
    layer.use_population().unwrap();
    let (mean, var) = pop.finish::<f32>().unwrap();
    assert_eq!((&layer.bn.running_mean, &layer.bn.running_var), (&mean, &var));
    // The f64 sums above and the kernel's are accurate to far below f32's resolution; the
    // estimate is rounded to f32 once (≤ ε_f32/2 relative): ε_f32 covers it.
    let n = batches.len() as f64;
    for c in 0..channels {
        for (what, got, want) in [("mean", mean[c], means[c] / n), ("var", var[c], vars[c] / n)] {
            let tol = f32::EPSILON as f64 * want.abs();
            assert!(
                (got as f64 - want).abs() <= tol,
                "{what}[{c}] = {got}, definition {want}"
            );
        }
    }
    assert_ne!(var, unmasked.finish::<f32>().unwrap().1, "padding changes the estimate");

    let (x, _) = batch_data(9, len);
    let mask = mask_of(batch, spatial, 2);
    layer.set_mask(&mask);
    let (mut y, mut want) = (vec![0.0; len], vec![0.0; len]);
    layer.forward(&x, batch, &mut y, Mode::Eval).unwrap();
    let xv = View::new(&x, &shape, Layout::ChannelsFirst);
    batch_norm_eval_masked(
        xv,
        mask.valid(),
        FixedStats::new(&mean, &var),
        affine,
        config.eps,
        &mut want,
    )
    .unwrap();
    assert_eq!(y, want, "inference with the estimate");
}

/// No leak through the layer: whatever the padded positions of x and dy hold (1e30, NaN, ±∞), no
/// bit of y, dx, dγ, dβ or the running statistics changes, in training (plain and frozen), in
/// inference and in Algorithm 2's pass; padded positions get y = dx = +0.0. The mask is random
/// (padding anywhere, not only at the end).
#[test]
fn masked_layer_never_leaks_padding() {
    let (batch, channels, len) = (6, 3, 7);
    let (valid, mask, x) = masked_case((batch, channels, len), 51);
    let dy = normal(&mut rng(52), x.len(), 0.0, 1.0);
    // y, dx, dγ, dβ, the layer's state, then y of an Eval and a Collect pass.
    let run = |variant: BnVariant, x: &[f32], dy: &[f32]| {
        let mut layer = masked_layer(channels, len, variant);
        let (y, dx) = run_masked(&mut layer, &mask, x, dy, batch);
        let grads: Vec<Vec<f32>> = layer.params().iter().map(|p| p.grad.to_vec()).collect();
        let (mut eval, mut collect) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        layer.forward(x, batch, &mut eval, Mode::Eval).unwrap();
        layer.forward(x, batch, &mut collect, Mode::Collect).unwrap();
        [
            y,
            dx,
            grads.concat(),
            layer.bn.running_mean.clone(),
            layer.bn.running_var.clone(),
            eval,
            collect,
        ]
    };
    for variant in [BnVariant::Plain, BnVariant::Frozen { after: 0 }] {
        let clean = run(variant, &x, &dy);
        for (i, v) in clean[0].iter().chain(&clean[1]).enumerate() {
            let (n, t) = (i % x.len() / (channels * len), i % len);
            assert!(
                valid[n * len + t] || v.to_bits() == 0,
                "{variant:?}: padded output {v} at {i}"
            );
        }
        for fill in [1e30, -1e30, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let dirty_x = fill_masked(&x, &valid, (channels, len), fill);
            let dirty_dy = fill_masked(&dy, &valid, (channels, len), fill);
            let dirty = run(variant, &dirty_x, &dirty_dy);
            for (k, (a, b)) in clean.iter().zip(&dirty).enumerate() {
                assert!(same_bits(a, b), "{variant:?}: padding {fill} leaked into output {k}");
            }
        }
    }
}

/// Features, steps, classes and batch of the network tests.
const NET: (usize, usize, usize, usize) = (5, 8, 3, 6);

/// Batch `b` of the network tests, padded to `steps` (at least `NET.1`) with `pad`: sequences
/// `[batch, features, steps]` of lengths 1 to `NET.1` whose values (from `b`) do not depend on
/// `steps`; and their mask.
fn sequences(b: usize, steps: usize, pad: f32) -> (Vec<f32>, PositionMask) {
    let (features, content, _, batch) = NET;
    let lengths: Vec<usize> = (0..batch).map(|n| 1 + (5 * n + 3 * b) % content).collect();
    let data = normal(&mut rng(b as u64), batch * features * content, 0.5, 1.0);
    let x = (0..batch * features * steps)
        .map(|i| {
            let (row, t) = (i / steps, i % steps);
            match t < lengths[row / features] {
                true => data[row * content + t],
                false => pad,
            }
        })
        .collect();
    (x, PositionMask::from_lengths(&lengths, steps).unwrap())
}

/// What a network computes in 3 SGD steps, Algorithm 2 over 2 batches and an inference pass on
/// batches padded to `steps` with `pad`.
struct NetworkRun {
    /// Every layer's output in each pass.
    outputs: Vec<Vec<f32>>,
    /// The logits of each pass, every parameter and gradient after each step, and the running
    /// (at the end: population) statistics of every batch norm: the values without a steps
    /// dimension.
    results: Vec<Vec<f32>>,
}

fn network_run(mut net: Sequential, steps: usize, pad: f32) -> NetworkRun {
    let (classes, batch) = (NET.2, NET.3);
    let mut run = NetworkRun {
        outputs: Vec::new(),
        results: Vec::new(),
    };
    let record = |net: &mut Sequential, run: &mut NetworkRun| {
        let layers = net.layers.len();
        run.outputs.extend((0..layers).map(|i| net.activation(i).to_vec()));
        run.results.push(net.activation(layers - 1).to_vec());
        run.results
            .extend(net.params().iter().flat_map(|p| [p.value.to_vec(), p.grad.to_vec()]));
        for bn in net.batchnorms() {
            run.results.push([&bn.bn.running_mean[..], &bn.bn.running_var].concat());
        }
    };
    let mut sgd = Sgd::new(0.9, 1e-4);
    for b in 0..3 {
        let (x, mask) = sequences(b, steps, pad);
        let labels: Vec<u8> = (0..batch).map(|n| ((n + b) % classes) as u8).collect();
        net.set_mask(&mask);
        sgd_step(&mut net, &mut sgd, &x, &labels, classes);
        record(&mut net, &mut run);
    }
    for bn in net.batchnorms() {
        bn.reset_population();
    }
    for b in 3..5 {
        let (x, mask) = sequences(b, steps, pad);
        net.set_mask(&mask);
        net.forward(&x, batch, Mode::Collect).unwrap();
        record(&mut net, &mut run);
    }
    for bn in net.batchnorms() {
        bn.use_population().unwrap();
    }
    let (x, mask) = sequences(5, steps, pad);
    net.set_mask(&mask);
    net.forward(&x, batch, Mode::Eval).unwrap();
    record(&mut net, &mut run);
    run
}

/// Whether two lists of vectors hold the same bits.
fn all_same_bits(a: &[Vec<f32>], b: &[Vec<f32>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_bits(a, b))
}

/// A network of masked layers where the padding reaches batch norm itself: batch norm over the
/// input's features → ZeroMasked → conv1d k=3 → batch norm → ReLU → MaskedMeanPool → linear; the
/// batch norms masked or not.
fn masked_net(masked: bool) -> Sequential {
    let (features, steps, classes, _) = NET;
    let mut r = rng(3);
    let norm = |c: usize| {
        let bn = BatchNormLayer::new(c, steps, BatchNormConfig::default()).unwrap();
        match masked {
            true => bn.masked().unwrap(),
            false => bn,
        }
    };
    let channels = 4;
    let layers: Vec<Box<dyn Layer>> = vec![
        Box::new(norm(features)),
        Box::new(ZeroMasked::new(features, steps).unwrap()),
        Box::new(Conv2d::conv1d(features, channels, steps, 3, false, ConvInit::He, &mut r).unwrap()),
        Box::new(norm(channels)),
        Box::new(Relu { size: channels * steps }),
        Box::new(MaskedMeanPool::new(channels, steps).unwrap()),
        Box::new(Linear::new(channels, classes, true, 0.5, &mut r)),
    ];
    Sequential::new(layers).unwrap()
}

/// Masked batch norm + ZeroMasked + MaskedMeanPool: with the padded steps of every input holding
/// 1e30, −∞ or NaN instead of 0, every output of every layer, every parameter and gradient, the
/// running and population statistics are the same bits, through training, Algorithm 2 and
/// inference. With the same network's batch norms unmasked, the padding changes them (it reaches
/// the first batch norm's statistics): the comparison can fail.
#[test]
fn masked_network_ignores_the_padding_value() {
    let steps = NET.1;
    let clean = network_run(masked_net(true), steps, 0.0);
    let plain = network_run(masked_net(false), steps, 0.0);
    for pad in [1e30, f32::NEG_INFINITY, f32::NAN] {
        let dirty = network_run(masked_net(true), steps, pad);
        assert!(
            all_same_bits(&clean.outputs, &dirty.outputs),
            "padding {pad} changed an output"
        );
        assert!(
            all_same_bits(&clean.results, &dirty.results),
            "padding {pad} changed a result"
        );
        let unmasked = network_run(masked_net(false), steps, pad);
        assert!(
            !all_same_bits(&plain.results, &unmasked.results),
            "unmasked batch norm ignored padding {pad}"
        );
    }
}

/// The `padded` study's `masked-bn` network ([`build`]): the same sequences padded to 8 steps or
/// to 12 (with the same weights: none depends on the steps) give the same logits, parameters,
/// gradients and statistics, bit for bit: masked batch norm's statistics do not depend on how
/// much padding a batch holds. With unmasked batch norm in the same network, the 4 more padded
/// steps enter its statistics and change everything after.
#[test]
fn masked_statistics_ignore_the_amount_of_padding() {
    let (features, steps, classes, _) = NET;
    let mut s = Settings::new(PathBuf::from("unused"));
    s.experiment.study.channels = [4, 3];
    let results = |steps: usize, masked: bool| {
        let norm = |c: usize, l: usize| {
            let bn = BatchNormLayer::new(c, l, BatchNormConfig::default())?;
            if masked {
                bn.masked()
            } else {
                Ok(bn)
            }
        };
        let net = build(&s, Variant::MaskedBn, (steps, features, classes), &norm).unwrap();
        network_run(net, steps, 0.0).results
    };
    assert!(all_same_bits(&results(steps, true), &results(steps + 4, true)));
    assert!(!all_same_bits(&results(steps, false), &results(steps + 4, false)));
}

/// Renorm and ghost batch norm have no masked form; a masked layer refuses a pass without a mask
/// or with a mask of another batch or length, a training batch with fewer than 2 valid values
/// per channel (naming the count), and folding into the convolution before it.
#[test]
fn masked_layer_rejections() {
    let config = BatchNormConfig::default();
    let renorm = BnVariant::Renorm {
        momentum: 0.1,
        limits: batchnorm::RenormSchedule::new(1, 1, 1, 3.0, 5.0).unwrap(),
    };
    let err = BatchNormLayer::with_variant(2, 3, config, renorm)
        .unwrap()
        .masked()
        .err()
        .unwrap();
    assert!(err.to_string().contains("renorm has no masked form"), "{err}");
    let ghost = BatchNormConfig {
        virtual_batch: Some(2),
        ..config
    };
    let err = BatchNormLayer::new(2, 3, ghost).unwrap().masked().err().unwrap();
    assert!(err.to_string().contains("ghost"), "{err}");

    let (batch, channels, spatial) = (3, 2, 4);
    let x = vec![0.5f32; batch * channels * spatial];
    let mut y = vec![0.0; x.len()];
    let mut layer = masked_layer(channels, spatial, BnVariant::Plain);
    let err = layer.forward(&x, batch, &mut y, Mode::Train).unwrap_err();
    assert!(format!("{err:#}").contains("needs a position mask"), "{err:#}");
    for (mask, needle) in [
        (PositionMask::from_lengths(&[1, 2], spatial).unwrap(), "[2, 4]"),
        (PositionMask::from_lengths(&[1, 2, 3], 5).unwrap(), "[3, 5]"),
    ] {
        layer.set_mask(&mask);
        for mode in [Mode::Train, Mode::Eval, Mode::Collect] {
            let err = layer.forward(&x, batch, &mut y, mode).unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{mode:?}: {err:#}");
        }
    }
    layer.set_mask(&PositionMask::from_lengths(&[0, 1, 0], spatial).unwrap());
    let err = layer.forward(&x, batch, &mut y, Mode::Train).unwrap_err();
    assert!(format!("{err:#}").contains('1'), "{err:#}");
    assert!(
        layer.backward(&x, &y, &x, batch, None).is_err(),
        "backward without a forward"
    );

    let mut r = rng(1);
    let layers: Vec<Box<dyn Layer>> = vec![
        Box::new(Conv2d::conv1d(1, channels, spatial, 3, false, ConvInit::He, &mut r).unwrap()),
        Box::new(masked_layer(channels, spatial, BnVariant::Plain)),
    ];
    let err = fold_batchnorm(Sequential::new(layers).unwrap()).err().unwrap();
    assert!(format!("{err:#}").contains("cannot be folded"), "{err:#}");
}
