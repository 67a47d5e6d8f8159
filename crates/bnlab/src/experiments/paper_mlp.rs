//! The paper's MNIST experiment (Section 4.1, Figure 1): a 784-100-100-100-10 sigmoid MLP trained
//! with and without batch norm; test accuracy over training (Fig. 1a) and the 15th/50th/85th
//! percentiles of one last-hidden-layer sigmoid's input (Fig. 1b,c).

use super::common::{self, VariantRun};
pub use super::common::{default_out, BnStats};
use super::metrics_log::truncate_jsonl;
use crate::data::{self, Dataset, EpochShuffler};
use crate::dist::{self, DataParallel};
use crate::engine::checkpoint::{Checkpoint, Progress as TrainProgress};
use crate::engine::{BatchNormLayer, Layer, Linear, Sequential, Sgd, Sigmoid};
use crate::monitor::{Monitor, Watch};
use crate::report::{self, Band, BandPanels, LinePlot, Page, Series};
use anyhow::{bail, ensure, Result};
use batchnorm::{BatchNormConfig, Communicator, SingleProcess};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The two networks of Figure 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

    /// The variant named `name` (as [`Variant::name`] spells it).
    pub fn from_name(name: &str) -> Option<Variant> {
        [Variant::Baseline, Variant::Bn].into_iter().find(|v| v.name() == name)
    }
}

/// Everything that defines a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Worker threads (recorded; the caller sets up the pool). With one process and two or more
    /// threads, the variants train side by side, each on its share of the threads (see
    /// [`common::train_variants`]).
    pub threads: usize,
    /// Steps between checkpoints (one is also written at the end of each variant).
    pub checkpoint_every: u64,
    /// Data-parallel processes (recorded; the communicator given to [`run_with`] decides).
    #[serde(default = "one")]
    pub processes: usize,
    /// With several processes: batch norm over the global batch (true) or per process (false).
    #[serde(default = "yes")]
    pub bn_sync: bool,
}

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
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
            checkpoint_every: 1000,
            processes: 1,
            bn_sync: true,
        }
    }

    /// How evaluations set up batch norm.
    pub fn eval_settings(&self) -> common::EvalSettings {
        common::EvalSettings {
            bn_stats: self.bn_stats,
            population_batches: self.population_batches,
            batch: self.batch,
            seed: self.seed,
        }
    }

    /// Rejects settings that cannot run.
    pub fn check(&self) -> Result<()> {
        ensure!(!self.variants.is_empty(), "no variant to train");
        ensure!(self.steps > 0, "--steps must be > 0");
        ensure!(self.eval_every > 0, "--eval-every must be > 0");
        ensure!(self.checkpoint_every > 0, "--checkpoint-every must be > 0");
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// The network.
    pub variant: Variant,
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
    /// Milliseconds per training step (training steps only, no evaluation; with variants side by
    /// side, on this variant's share of the threads).
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

common::impl_experiment_settings!(Settings);

/// The `experiment` name in this experiment's checkpoints.
pub const EXPERIMENT: &str = "paper-mlp";

/// Where a run keeps the checkpoint of `variant`: `OUT/checkpoints/<variant>.safetensors`.
pub fn checkpoint_path(out: &Path, variant: Variant) -> PathBuf {
    common::checkpoint_path(out, variant.name())
}

/// Loads data, trains every variant, writes metrics, checkpoints, plots and the report into
/// `settings.out` (a fresh run: an existing `metrics.jsonl` there is replaced). With two or more
/// threads in the current rayon pool, the variants train side by side, each on its share of the
/// threads (same results as one after another); if one fails, the others stop and its error is
/// returned (see [`common::train_variants`]).
pub fn run(settings: &Settings, quiet: bool) -> Result<Outcome> {
    execute(settings, quiet, false, Arc::new(SingleProcess))
}

/// [`run`] as one rank of data-parallel training over `comm` (see [`crate::dist`]): every rank
/// trains on its shard of each global batch; rank 0 alone evaluates, reports progress and writes
/// the outputs and checkpoints (the other ranks return an outcome without metrics).
/// `settings.processes` is set from `comm`. With one rank this is [`run`].
pub fn run_with(settings: &Settings, quiet: bool, comm: Arc<dyn Communicator>) -> Result<Outcome> {
    execute(settings, quiet, false, comm)
}

/// [`resume`] as one rank of data-parallel training over `comm`, as [`run_with`]. Checkpoints do
/// not depend on the number of processes: a run may resume with another.
pub fn resume_with(settings: &Settings, quiet: bool, comm: Arc<dyn Communicator>) -> Result<Outcome> {
    execute(settings, quiet, true, comm)
}

/// The settings of the run in `dir` (its `settings.json`), with `out` set to `dir`. Rejects a
/// directory without a readable, valid `settings.json` (not a paper-mlp run directory).
pub fn resume_settings(dir: &Path) -> Result<Settings> {
    let mut s: Settings = common::run_settings(dir, "a paper-mlp run")?;
    s.out = dir.to_path_buf();
    Ok(s)
}

/// Continues the run in `settings.out` (settings from [`resume_settings`]): every variant restarts
/// from its checkpoint (a finished one is not retrained, one without a checkpoint starts afresh),
/// `metrics.jsonl` is cut back to the checkpoints' steps, and all outputs are written as an
/// uninterrupted run would. Rejects a checkpoint that belongs to another run (other settings,
/// another architecture) or is damaged.
pub fn resume(settings: &Settings, quiet: bool) -> Result<Outcome> {
    execute(settings, quiet, true, Arc::new(SingleProcess))
}

fn execute(settings: &Settings, quiet: bool, resuming: bool, comm: Arc<dyn Communicator>) -> Result<Outcome> {
    let mut settings = settings.clone();
    settings.processes = comm.size();
    let settings = &settings;
    settings.check()?;
    dist::check_split(settings.batch, settings.processes, settings.bn_sync)?;
    let root = comm.rank() == 0;
    let (train, test) = data::load(&settings.data_dir)?;
    ensure!(
        train.len >= settings.batch,
        "the training set has fewer examples than one batch"
    );
    let names: Vec<&str> = settings.variants.iter().map(|v| v.name()).collect();
    let kept = |starts: &[Option<Checkpoint>]| kept_metrics(settings, starts);
    let (starts, kept) = common::begin_run(
        &settings.out,
        EXPERIMENT,
        &names,
        settings,
        resuming,
        comm.as_ref(),
        kept,
    )?;
    let out = root.then_some(settings.out.as_path());
    let (metrics, summaries) = common::train_variants(
        out,
        kept,
        &settings.variants,
        Variant::name,
        settings.steps,
        quiet,
        comm.size(),
        |i, variant, run| {
            let mut dp = DataParallel::new(comm.clone());
            train_variant(settings, variant, starts[i].as_ref(), &train, &test, &mut dp, run)
        },
    )?;
    let outcome = Outcome { metrics, summaries };
    if root {
        write_outputs(settings, &outcome)?;
    }
    Ok(outcome)
}

/// Cuts `metrics.jsonl` back to the lines the checkpoints `starts` (one per variant, in order)
/// cover and returns them: a variant's evaluations up to its checkpoint's step.
fn kept_metrics(s: &Settings, starts: &[Option<Checkpoint>]) -> Result<Vec<Metric>> {
    let names: Vec<&str> = s.variants.iter().map(|v| v.name()).collect();
    let covered = |v: &serde_json::Value| {
        serde_json::from_value::<Metric>(v.clone()).is_ok() && common::covered_by_checkpoints(v, &names, starts)
    };
    let kept = truncate_jsonl(&s.out.join("metrics.jsonl"), covered)?;
    Ok(kept.into_iter().map(serde_json::from_value).collect::<Result<_, _>>()?)
}

impl common::MetricLine for Metric {
    fn variant_name(&self) -> &str {
        self.variant.name()
    }
    fn step(&self) -> u64 {
        self.step
    }
}

/// Counters a variant's loop carries between steps, saved in its checkpoints.
#[derive(Default)]
struct Counters {
    loss_sum: f64,
    loss_n: u64,
    best: f64,
    last: f64,
    train_secs: f64,
    seconds: f64,
}

impl From<common::LoopCounters> for Counters {
    fn from(l: common::LoopCounters) -> Self {
        Counters {
            loss_sum: l.loss_sum,
            loss_n: l.loss_n,
            best: l.best_acc.unwrap_or(0.0),
            last: l.last_acc.unwrap_or(0.0),
            train_secs: l.train_secs,
            seconds: l.seconds,
        }
    }
}

impl Counters {
    /// The counters as a checkpoint's progress, in the keys every experiment uses
    /// ([`common::LoopCounters::progress`]).
    fn progress(&self, step: u64, seed: u64) -> TrainProgress {
        self.as_loop(step).progress(seed)
    }

    fn as_loop(&self, steps: u64) -> common::LoopCounters {
        common::LoopCounters {
            steps,
            train_secs: self.train_secs,
            seconds: self.seconds,
            best_acc: Some(self.best),
            last_acc: Some(self.last),
            diverged: None,
            loss_sum: self.loss_sum,
            loss_n: self.loss_n,
        }
    }
}

/// Trains one variant (from `start` when resuming; this rank's shards when `dp` has several
/// ranks), recording a metrics line through `run` at every evaluation and saving a checkpoint
/// every `checkpoint_every` steps and at the end (rank 0 only).
fn train_variant(
    s: &Settings,
    variant: Variant,
    start: Option<&Checkpoint>,
    train: &Dataset,
    test: &Dataset,
    dp: &mut DataParallel,
    run: &VariantRun<Metric>,
) -> Result<VariantSummary> {
    let classes = train.classes.max(test.classes);
    let features = train.features();
    let (mut net, watched) = build(variant, features, classes, s.init_std, s.seed)?;
    let (root, parallel) = (dp.rank() == 0, dp.size() > 1);
    let local = dist::shard(s.batch, dp.rank(), dp.size()).len();
    if parallel && s.bn_sync {
        net.batchnorms()
            .into_iter()
            .for_each(|bn| bn.synchronize(Some(dp.comm())));
    }
    dp.take_traffic();
    let mut shuffler = EpochShuffler::new(train.len, s.batch, s.seed)?;
    let mut sgd = Sgd::new(0.0, 0.0);
    let ckpt_path = checkpoint_path(&s.out, variant);
    let (mut c, first) = match start {
        Some(ck) => {
            let counters = common::restore_start(ck, &mut net, &mut sgd, s.steps, s.seed, &ckpt_path)?;
            (Counters::from(counters), ck.progress.step)
        }
        None => (Counters::default(), 0),
    };
    let mut saved = start.map(|ck| ck.progress.step);
    let settings_json = serde_json::to_value(s)?;
    let mut monitor = Monitor::new(watched, Watch::Input, WATCHED_UNIT, PERCENTILES.to_vec());
    let mut buf = common::StepBuffers::new(local, features, classes);
    let kept = |saved: Option<u64>| match saved {
        Some(step) => format!(
            "the last good checkpoint (step {step}) is kept in {}",
            ckpt_path.display()
        ),
        None => "no checkpoint had been written yet".to_string(),
    };
    let progress = run.progress;
    let (start_time, prior_secs) = (Instant::now(), c.seconds);
    progress.step(first);
    for step in first..s.steps {
        run.check()?;
        let t = Instant::now();
        // One process: forward, loss, backward, update. Several: this rank's shard, gradients
        // summed over ranks (see `crate::dist`). Nothing is updated when the loss is not finite.
        let loss = common::train_step_parallel(
            &mut net,
            &mut sgd,
            train,
            &mut shuffler,
            step,
            s.lr as f32,
            &mut buf,
            dp,
        )?;
        if !loss.is_finite() {
            bail!(
                "training of `{}` diverged at step {}: the loss is {loss} (try a smaller --lr); {}",
                variant.name(),
                step + 1,
                kept(saved)
            );
        }
        c.train_secs += t.elapsed().as_secs_f64();
        c.loss_sum += loss as f64;
        c.loss_n += 1;
        progress.step(step + 1);
        if parallel && ((step + 1) % s.eval_every == 0 || step + 1 == s.steps) {
            // Running statistics are compared only where they are used: population evaluation
            // overwrites them on rank 0.
            let running = s.bn_sync && s.bn_stats == BnStats::Running;
            dp.check_replicas(&mut net, running, step + 1)?;
        }
        if root && ((step + 1) % s.eval_every == 0 || step + 1 == s.steps) {
            let acc = evaluate(s, &mut net, &mut monitor, train, test)?;
            let summary = monitor.summary();
            let m = Metric {
                variant,
                step: step + 1,
                test_acc: acc,
                train_loss: c.loss_sum / c.loss_n as f64,
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
                (step + 1) as f64 / c.train_secs.max(1e-9),
            );
            run.record(&m)?;
            (c.loss_sum, c.loss_n) = (0.0, 0);
            c.best = c.best.max(acc);
            c.last = acc;
        }
        if root && ((step + 1) % s.checkpoint_every == 0 || step + 1 == s.steps) {
            c.seconds = prior_secs + start_time.elapsed().as_secs_f64();
            let ck = Checkpoint::capture(
                &mut net,
                &sgd,
                &c.progress(step + 1, s.seed),
                EXPERIMENT,
                variant.name(),
                settings_json.clone(),
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "training of `{}` diverged by step {}: {e}; {}",
                    variant.name(),
                    step + 1,
                    kept(saved)
                )
            })?;
            ck.save(&ckpt_path)?;
            saved = Some(step + 1);
        }
    }
    progress.finish();
    let traffic = dp.take_traffic();
    Ok(VariantSummary {
        collective_calls_per_step: traffic.calls as f64 / s.steps as f64,
        bytes_sent_per_step: traffic.bytes_sent as f64 / s.steps as f64,
        final_test_acc: c.last,
        best_test_acc: c.best,
        seconds: prior_secs + start_time.elapsed().as_secs_f64(),
        ms_per_step: c.train_secs * 1e3 / s.steps as f64,
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
    if s.bn_stats == BnStats::Population {
        use_population_stats(s, net, train)?;
    }
    monitor.clear();
    let correct = count_correct(net, test, Some(monitor))?;
    Ok(correct as f64 / test.len.max(1) as f64)
}

/// Algorithm 2 over `s.population_batches` fixed training batches: [`common::use_population_stats`]
/// with this run's settings.
pub fn use_population_stats(s: &Settings, net: &mut Sequential, train: &Dataset) -> Result<()> {
    common::use_population_stats(&s.eval_settings(), net, train)
}

/// Test examples `net` classifies correctly (inference mode); records the watched values into
/// `monitor` when given.
pub fn count_correct(net: &mut Sequential, test: &Dataset, mut monitor: Option<&mut Monitor>) -> Result<usize> {
    common::count_correct(net, test, |net| {
        if let Some(m) = monitor.as_deref_mut() {
            m.record(net);
        }
    })
}

/// Writes summary.json, the plots and report.html.
fn write_outputs(s: &Settings, o: &Outcome) -> Result<()> {
    let summary = serde_json::json!({ "variants": o.summaries, "settings": s });
    common::write_json(&s.out.join("summary.json"), &summary)?;

    let variants: Vec<&'static str> = s.variants.iter().map(|v| v.name()).collect();
    let of = |v: &'static str| o.metrics.iter().filter(move |m| m.variant.name() == v);
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
    page.settings("Settings", &common::settings_rows(s));
    page.write(&s.out.join("report.html"))?;
    Ok(())
}

/// The data-parallel mode in words (for the report).
fn mode_text(s: &Settings) -> String {
    common::data_parallel_text(s.processes, s.batch, s.bn_sync)
}

fn label(v: &str) -> &'static str {
    match v {
        "bn" => "with batch norm",
        _ => "baseline",
    }
}
