//! The paper's MNIST experiment (Section 4.1, Figure 1): a 784-100-100-100-10 sigmoid MLP trained
//! with and without batch norm; test accuracy over training (Fig. 1a) and the 15th/50th/85th
//! percentiles of one last-hidden-layer sigmoid's input (Fig. 1b,c).

use super::progress::Progress;
use crate::data::{self, gather, Dataset, EpochShuffler};
use crate::dist::{self, DataParallel};
use crate::engine::loss::argmax_rows;
use crate::engine::{BatchNormLayer, Layer, Linear, Mode, Sequential, Sgd, Sigmoid, SoftmaxCrossEntropy};
use crate::monitor::{Monitor, Watch};
use crate::report::{self, Band, BandPanels, LinePlot, Page, Series};
use anyhow::{bail, ensure, Context, Result};
use batchnorm::{BatchNormConfig, Communicator, SingleProcess};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The two networks of Figure 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Linear layers with biases, sigmoid after each hidden layer.
    Baseline,
    /// BN on W·u (no bias) before each sigmoid.
    Bn,
}

impl Variant {
    /// Name in files and reports.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::Bn => "bn",
        }
    }
}

/// Which statistics BN uses at evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BnStats {
    /// The running (momentum) averages kept during training.
    Running,
    /// Algorithm 2: population statistics over `population_batches` training batches, recomputed
    /// at each evaluation.
    Population,
}

/// Everything that defines a run.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Networks to train, in order.
    pub variants: Vec<Variant>,
    /// Training steps per network.
    pub steps: u64,
    /// SGD learning rate (plain SGD, no momentum, no weight decay).
    pub lr: f64,
    /// Steps between evaluations.
    pub eval_every: u64,
    /// Seed of weight initialization and shuffling.
    pub seed: u64,
    /// Mini-batch size.
    pub batch: usize,
    /// Standard deviation of the Gaussian weight initialization.
    pub init_std: f32,
    /// BN statistics at evaluation.
    pub bn_stats: BnStats,
    /// Training batches for Algorithm 2's estimate.
    pub population_batches: usize,
    /// IDX data directory.
    pub data_dir: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// Worker threads (recorded; the caller sets up the pool).
    pub threads: usize,
    /// Data-parallel processes (recorded; the communicator given to [`run_with`] decides).
    pub processes: usize,
    /// With several processes: batch norm over the global batch (true) or per process (false).
    pub bn_sync: bool,
}

impl Settings {
    /// The paper's settings with this lab's defaults.
    pub fn paper(out: PathBuf) -> Self {
        Settings {
            variants: vec![Variant::Baseline, Variant::Bn],
            steps: 50_000,
            lr: 0.5,
            eval_every: 1000,
            seed: 1,
            batch: 60,
            init_std: 0.1,
            bn_stats: BnStats::Population,
            population_batches: 50,
            data_dir: PathBuf::from(data::DEFAULT_DATA_DIR),
            out,
            threads: 1,
            processes: 1,
            bn_sync: true,
        }
    }

    /// Rejects settings that cannot run.
    pub fn check(&self) -> Result<()> {
        ensure!(!self.variants.is_empty(), "no variant to train");
        ensure!(self.steps > 0, "--steps must be > 0");
        ensure!(self.eval_every > 0, "--eval-every must be > 0");
        ensure!(
            self.batch >= 2,
            "--batch must be at least 2 (batch norm needs 2 values per feature)"
        );
        ensure!(self.lr.is_finite() && self.lr > 0.0, "--lr must be a finite number > 0");
        ensure!(
            self.init_std.is_finite() && self.init_std > 0.0,
            "--init-std must be a finite number > 0"
        );
        ensure!(self.population_batches > 0, "--population-batches must be > 0");
        Ok(())
    }
}

/// Hidden layer width of the paper's network.
pub const HIDDEN: usize = 100;
/// The watched sigmoid: unit 0 of the last hidden layer.
pub const WATCHED_UNIT: usize = 0;
/// Percentiles of Figure 1b,c.
pub const PERCENTILES: [f64; 3] = [15.0, 50.0, 85.0];

/// Builds the network of a variant; returns it and the index of the last hidden sigmoid.
pub fn build(variant: Variant, inputs: usize, classes: usize, init_std: f32, seed: u64) -> Result<(Sequential, usize)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut layers: Vec<Box<dyn Layer>> = Vec::new();
    let mut width = inputs;
    let mut watched = 0;
    for _ in 0..3 {
        match variant {
            Variant::Baseline => layers.push(Box::new(Linear::new(width, HIDDEN, true, init_std, &mut rng))),
            Variant::Bn => {
                layers.push(Box::new(Linear::new(width, HIDDEN, false, init_std, &mut rng)));
                layers.push(Box::new(BatchNormLayer::new(HIDDEN, 1, BatchNormConfig::default())?));
            }
        }
        watched = layers.len();
        layers.push(Box::new(Sigmoid { size: HIDDEN }));
        width = HIDDEN;
    }
    layers.push(Box::new(Linear::new(width, classes, true, init_std, &mut rng)));
    Ok((Sequential::new(layers)?, watched))
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    /// Variant name.
    pub variant: &'static str,
    /// Training steps done.
    pub step: u64,
    /// Test-set accuracy.
    pub test_acc: f64,
    /// Mean training loss over the steps since the previous evaluation.
    pub train_loss: f64,
    /// 15th percentile of the watched sigmoid's input over the test set.
    pub p15: f64,
    /// Median.
    pub p50: f64,
    /// 85th percentile.
    pub p85: f64,
    /// The same percentiles pooled over all units of the last hidden layer.
    pub pooled_p15: f64,
    /// Pooled median.
    pub pooled_p50: f64,
    /// Pooled 85th percentile.
    pub pooled_p85: f64,
}

/// Result of one variant.
#[derive(Debug, Clone, Serialize)]
pub struct VariantSummary {
    /// Test accuracy at the last evaluation.
    pub final_test_acc: f64,
    /// Best test accuracy over evaluations.
    pub best_test_acc: f64,
    /// Wall-clock seconds of the whole run (training and evaluations).
    pub seconds: f64,
    /// Milliseconds per training step (training steps only, no evaluation).
    pub ms_per_step: f64,
    /// Steps trained.
    pub steps: u64,
    /// Collective calls per training step of rank 0 (0 with one process).
    pub collective_calls_per_step: f64,
    /// Bytes rank 0 sent per training step (received: `processes` times as many).
    pub bytes_sent_per_step: f64,
}

/// Everything a run produced.
pub struct Outcome {
    /// All evaluations, variants in order.
    pub metrics: Vec<Metric>,
    /// Per variant.
    pub summaries: BTreeMap<&'static str, VariantSummary>,
}

/// Loads data, trains every variant, writes metrics, plots and the report into `settings.out`.
pub fn run(settings: &Settings, quiet: bool) -> Result<Outcome> {
    run_with(settings, quiet, Arc::new(SingleProcess))
}

/// [`run`] as one rank of data-parallel training over `comm` (see [`crate::dist`]): every rank
/// trains on its shard of each global batch; rank 0 alone evaluates, reports progress and writes
/// the outputs (the other ranks return an outcome without metrics). `settings.processes` is set
/// from `comm`. With one rank this is [`run`].
pub fn run_with(settings: &Settings, quiet: bool, comm: Arc<dyn Communicator>) -> Result<Outcome> {
    let mut settings = settings.clone();
    settings.processes = comm.size();
    let settings = &settings;
    settings.check()?;
    dist::check_split(settings.batch, settings.processes, settings.bn_sync)?;
    let root = comm.rank() == 0;
    let (train, test) = data::load(&settings.data_dir)?;
    let mut metrics_file = if root {
        std::fs::create_dir_all(&settings.out)
            .with_context(|| format!("cannot create output directory {}", settings.out.display()))?;
        let metrics_path = settings.out.join("metrics.jsonl");
        Some(std::fs::File::create(&metrics_path).with_context(|| format!("cannot write {}", metrics_path.display()))?)
    } else {
        None
    };
    let mut dp = DataParallel::new(comm);
    ensure!(
        train.len >= settings.batch,
        "the training set has fewer examples than one batch"
    );
    let mut outcome = Outcome {
        metrics: Vec::new(),
        summaries: BTreeMap::new(),
    };
    for &variant in &settings.variants {
        let summary = train_variant(settings, variant, &train, &test, quiet, &mut dp, |m| {
            if let Some(f) = metrics_file.as_mut() {
                writeln!(f, "{}", serde_json::to_string(m)?)?;
                f.flush()?;
            }
            outcome.metrics.push(m.clone());
            Ok(())
        })?;
        outcome.summaries.insert(variant.name(), summary);
    }
    if root {
        write_outputs(settings, &outcome)?;
    }
    Ok(outcome)
}

/// Trains one variant (this rank's shards when `dp` has several ranks), calling `on_metric` at
/// every evaluation (rank 0 only).
fn train_variant(
    s: &Settings,
    variant: Variant,
    train: &Dataset,
    test: &Dataset,
    quiet: bool,
    dp: &mut DataParallel,
    mut on_metric: impl FnMut(&Metric) -> Result<()>,
) -> Result<VariantSummary> {
    let classes = train.classes.max(test.classes);
    let features = train.features();
    let (mut net, watched) = build(variant, features, classes, s.init_std, s.seed)?;
    let (root, parallel) = (dp.rank() == 0, dp.size() > 1);
    let quiet = quiet || !root;
    let shard = dist::shard(s.batch, dp.rank(), dp.size());
    let local = shard.len();
    if parallel && s.bn_sync {
        net.batchnorms()
            .into_iter()
            .for_each(|bn| bn.synchronize(Some(dp.comm())));
    }
    dp.take_traffic();
    let mut shuffler = EpochShuffler::new(train.len, s.batch, s.seed)?;
    let mut loss_fn = SoftmaxCrossEntropy::default();
    let mut sgd = Sgd::new(0.0, 0.0);
    let mut monitor = Monitor::new(watched, Watch::Input, WATCHED_UNIT, PERCENTILES.to_vec());
    let (mut x, mut y) = (vec![0.0f32; local * features], vec![0u8; local]);
    let mut dlogits = vec![0.0f32; local * classes];
    let share = local as f32 / s.batch as f32;
    let progress = Progress::new(variant.name(), s.steps, quiet);
    let (start, mut train_secs) = (Instant::now(), 0.0f64);
    let (mut loss_sum, mut loss_n) = (0.0f64, 0u64);
    let (mut best, mut last) = (0.0f64, 0.0f64);
    for step in 0..s.steps {
        let t = Instant::now();
        gather(train, &shuffler.batch_indices(step)[shard.clone()], &mut x, &mut y);
        let logits = net.forward(&x, local, Mode::Train)?;
        let mut loss = loss_fn.forward(logits, &y, classes)?;
        if parallel {
            // The derivative of the global batch's mean loss through this shard; gradients and
            // loss shares are then summed over ranks (see `crate::dist`).
            loss_fn.backward(&y, classes, &mut dlogits);
            dlogits.iter_mut().for_each(|d| *d *= share);
            net.backward(&dlogits)?;
            loss = dp.all_reduce(&mut net, loss * share)?;
        }
        if !loss.is_finite() {
            bail!(
                "training of `{}` diverged at step {}: the loss is {loss} (try a smaller --lr)",
                variant.name(),
                step + 1
            );
        }
        if parallel {
            sgd.step_with_grads(net.params(), dp.grads(), s.lr as f32)?;
        } else {
            loss_fn.backward(&y, classes, &mut dlogits);
            net.backward(&dlogits)?;
            sgd.step(net.params(), s.lr as f32);
        }
        train_secs += t.elapsed().as_secs_f64();
        loss_sum += loss as f64;
        loss_n += 1;
        progress.step(step + 1);
        if (step + 1) % s.eval_every == 0 || step + 1 == s.steps {
            if parallel {
                // Running statistics are compared only where they are used: population evaluation
                // overwrites them on rank 0.
                let running = s.bn_sync && s.bn_stats == BnStats::Running;
                dp.check_replicas(&mut net, running, step + 1)?;
            }
            if !root {
                continue;
            }
            let acc = evaluate(s, &mut net, &mut monitor, train, test)?;
            let summary = monitor.summary();
            let m = Metric {
                variant: variant.name(),
                step: step + 1,
                test_acc: acc,
                train_loss: loss_sum / loss_n as f64,
                p15: summary.unit[0],
                p50: summary.unit[1],
                p85: summary.unit[2],
                pooled_p15: summary.pooled[0],
                pooled_p50: summary.pooled[1],
                pooled_p85: summary.pooled[2],
            };
            progress.eval(
                step + 1,
                s.steps,
                m.train_loss,
                acc,
                (step + 1) as f64 / train_secs.max(1e-9),
            );
            on_metric(&m)?;
            (loss_sum, loss_n) = (0.0, 0);
            best = best.max(acc);
            last = acc;
        }
    }
    progress.finish();
    let traffic = dp.take_traffic();
    Ok(VariantSummary {
        collective_calls_per_step: traffic.calls as f64 / s.steps as f64,
        bytes_sent_per_step: traffic.bytes_sent as f64 / s.steps as f64,
        final_test_acc: last,
        best_test_acc: best,
        seconds: start.elapsed().as_secs_f64(),
        ms_per_step: train_secs * 1e3 / s.steps as f64,
        steps: s.steps,
    })
}

/// Test accuracy with inference-mode BN; records the watched values into `monitor`.
pub fn evaluate(
    s: &Settings,
    net: &mut Sequential,
    monitor: &mut Monitor,
    train: &Dataset,
    test: &Dataset,
) -> Result<f64> {
    let features = train.features();
    if s.bn_stats == BnStats::Population && !net.batchnorms().is_empty() {
        net.batchnorms().into_iter().for_each(|bn| bn.reset_population());
        // A fixed set of training batches (epoch 0 of a shuffle with another seed).
        let mut shuffler = EpochShuffler::new(train.len, s.batch, s.seed ^ 0x9e37_79b9_7f4a_7c15)?;
        let (mut x, mut y) = (vec![0.0f32; s.batch * features], vec![0u8; s.batch]);
        for b in 0..s.population_batches.min(shuffler.batches_per_epoch()) {
            gather(train, shuffler.batch_indices(b as u64), &mut x, &mut y);
            net.forward(&x, s.batch, Mode::Collect)?;
        }
        for bn in net.batchnorms() {
            bn.use_population()?;
        }
    }
    monitor.clear();
    let classes = net.output_size();
    let chunk = 1000;
    let mut correct = 0usize;
    for start in (0..test.len).step_by(chunk) {
        let n = chunk.min(test.len - start);
        let x = &test.images[start * features..(start + n) * features];
        let logits = net.forward(x, n, Mode::Eval)?;
        correct += argmax_rows(logits, classes)
            .zip(&test.labels[start..start + n])
            .filter(|(p, &l)| *p == l as usize)
            .count();
        monitor.record(net);
    }
    Ok(correct as f64 / test.len.max(1) as f64)
}

/// Writes summary.json, the plots and report.html.
fn write_outputs(s: &Settings, o: &Outcome) -> Result<()> {
    let summary = serde_json::json!({ "variants": o.summaries, "settings": s });
    let path = s.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("cannot write {}", path.display()))?;

    let variants: Vec<&'static str> = s.variants.iter().map(|v| v.name()).collect();
    let of = |v: &'static str| o.metrics.iter().filter(move |m| m.variant == v);
    let series: Vec<Series> = variants
        .iter()
        .map(|v| Series {
            name: label(v).into(),
            points: of(v).map(|m| (m.step as f64, m.test_acc)).collect(),
        })
        .collect();
    let acc_svg = report::line_plot_svg(&LinePlot {
        title: "Test accuracy (Figure 1a)",
        x_label: "training steps",
        y_label: "test accuracy",
        series: &series,
        y_range: None,
    })?;
    report::write_plot(&s.out, "accuracy", &acc_svg)?;
    let bands: Vec<Band> = variants
        .iter()
        .map(|v| Band {
            name: label(v).into(),
            steps: of(v).map(|m| m.step as f64).collect(),
            lower: of(v).map(|m| m.p15).collect(),
            middle: of(v).map(|m| m.p50).collect(),
            upper: of(v).map(|m| m.p85).collect(),
        })
        .collect();
    let dist_svg = report::band_panels_svg(&BandPanels {
        title: "Input to a last-hidden-layer sigmoid: 15th/50th/85th percentiles (Figure 1b,c)",
        x_label: "training steps",
        y_label: "sigmoid input",
        panels: &bands,
        shared_y: true,
    })?;
    report::write_plot(&s.out, "distribution", &dist_svg)?;

    let mut page = Page::new("Batch normalization on the paper's MLP (Figure 1)");
    page.paragraph(
        "A 784-100-100-100-10 network with sigmoid hidden units, trained with plain SGD on mini-batches of 60, \
         with and without batch normalization before each sigmoid (Ioffe & Szegedy 2015, Section 4.1).",
    );
    let header: Vec<String> = [
        "variant",
        "final test accuracy",
        "best test accuracy",
        "ms / step",
        "seconds",
    ]
    .map(String::from)
    .to_vec();
    let rows: Vec<Vec<String>> = variants
        .iter()
        .filter_map(|v| o.summaries.get(v).map(|r| (v, r)))
        .map(|(v, r)| {
            vec![
                label(v).to_string(),
                format!("{:.2}%", r.final_test_acc * 100.0),
                format!("{:.2}%", r.best_test_acc * 100.0),
                format!("{:.3}", r.ms_per_step),
                format!("{:.1}", r.seconds),
            ]
        })
        .collect();
    if s.processes > 1 {
        page.paragraph(&mode_text(s));
    }
    page.table("Results", &header, &rows);
    page.figure("Test accuracy against training steps.", &acc_svg);
    page.figure(
        &format!("The input of sigmoid unit {WATCHED_UNIT} of the last hidden layer over the test set, as training progresses."),
        &dist_svg,
    );
    page.settings("Settings", &settings_rows(s));
    page.write(&s.out.join("report.html"))?;
    Ok(())
}

/// The data-parallel mode in words (for the report).
fn mode_text(s: &Settings) -> String {
    let bn = if s.bn_sync {
        format!(
            "batch norm synchronized: statistics over the global batch of {} (--bn-sync on)",
            s.batch
        )
    } else {
        format!(
            "batch norm per process: statistics over each process's shard of about {} (--bn-sync off)",
            s.batch / s.processes.max(1)
        )
    };
    format!(
        "Data-parallel training over {} MPI processes: each global batch of {} is split into contiguous shards, \
         gradients are summed over the processes; {bn}.",
        s.processes, s.batch
    )
}

fn label(v: &str) -> &'static str {
    match v {
        "bn" => "with batch norm",
        _ => "baseline",
    }
}

fn settings_rows(s: &Settings) -> Vec<(String, String)> {
    let v = serde_json::to_value(s).unwrap_or_default();
    let mut rows = Vec::new();
    if let Some(map) = v.as_object() {
        for (k, v) in map {
            rows.push((k.clone(), v.to_string().trim_matches('"').to_string()));
        }
    }
    rows
}

/// A new default output directory under `runs/`.
pub fn default_out(prefix: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Path::new("runs").join(format!("{prefix}-{secs}"))
}
