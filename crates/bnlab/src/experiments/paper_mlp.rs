//! The paper's MNIST experiment (Section 4.1, Figure 1): a 784-100-100-100-10 sigmoid MLP trained
//! with and without batch norm; test accuracy over training (Fig. 1a) and the 15th/50th/85th
//! percentiles of one last-hidden-layer sigmoid's input (Fig. 1b,c).

use super::common::{self, train_step, EvalSettings, StepBuffers};
use crate::data::{self, Dataset, EpochShuffler};
use crate::engine::{BatchNormLayer, Layer, Linear, Sequential, Sgd, Sigmoid};
use crate::monitor::{Monitor, Watch};
use crate::report::{self, Band, BandPanels, LinePlot, Page, Series};
use anyhow::{bail, ensure, Result};
use batchnorm::BatchNormConfig;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

pub use super::common::{default_out, BnStats};

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

    /// How evaluations set up batch norm.
    pub fn eval_settings(&self) -> EvalSettings {
        EvalSettings {
            bn_stats: self.bn_stats,
            population_batches: self.population_batches,
            batch: self.batch,
            seed: self.seed,
        }
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
    settings.check()?;
    let (train, test) = data::load(&settings.data_dir)?;
    ensure!(
        train.len >= settings.batch,
        "the training set has fewer examples than one batch"
    );
    let (metrics, summaries) =
        common::train_variants(&settings.out, &settings.variants, Variant::name, |v, record| {
            train_variant(settings, v, &train, &test, quiet, record)
        })?;
    let outcome = Outcome { metrics, summaries };
    write_outputs(settings, &outcome)?;
    Ok(outcome)
}

/// Trains one variant, calling `on_metric` at every evaluation.
fn train_variant(
    s: &Settings,
    variant: Variant,
    train: &Dataset,
    test: &Dataset,
    quiet: bool,
    on_metric: &mut dyn FnMut(&Metric) -> Result<()>,
) -> Result<VariantSummary> {
    let classes = train.classes.max(test.classes);
    let features = train.features();
    let (net, watched) = build(variant, features, classes, s.init_std, s.seed)?;
    let shuffler = EpochShuffler::new(train.len, s.batch, s.seed)?;
    let monitor = Monitor::new(watched, Watch::Input, WATCHED_UNIT, PERCENTILES.to_vec());
    let buf = StepBuffers::new(s.batch, features, classes);
    let mut state = (net, Sgd::new(0.0, 0.0), shuffler, buf, monitor);
    let end = common::train_loop(
        variant.name(),
        s.steps,
        s.eval_every,
        quiet,
        &mut state,
        |(net, sgd, shuffler, buf, _), step| train_step(net, sgd, train, shuffler, step, s.lr as f32, buf),
        |(net, _, _, _, monitor), step, train_loss| {
            let acc = evaluate(s, net, monitor, train, test)?;
            let summary = monitor.summary();
            on_metric(&Metric {
                variant: variant.name(),
                step,
                test_acc: acc,
                train_loss,
                p15: summary.unit[0],
                p50: summary.unit[1],
                p85: summary.unit[2],
                pooled_p15: summary.pooled[0],
                pooled_p50: summary.pooled[1],
                pooled_p85: summary.pooled[2],
            })?;
            Ok(acc)
        },
    )?;
    if let Some((step, loss)) = end.diverged {
        bail!(
            "training of `{}` diverged at step {step}: the loss is {loss} (try a smaller --lr)",
            variant.name()
        );
    }
    Ok(VariantSummary {
        final_test_acc: end.last_acc.unwrap_or(0.0),
        best_test_acc: end.best_acc.unwrap_or(0.0),
        seconds: end.seconds,
        ms_per_step: end.ms_per_step(),
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
    monitor.clear();
    common::evaluate(&s.eval_settings(), net, train, test, |net| monitor.record(net))
}

/// Writes summary.json, the plots and report.html.
fn write_outputs(s: &Settings, o: &Outcome) -> Result<()> {
    let summary = serde_json::json!({ "variants": o.summaries, "settings": s });
    common::write_json(&s.out.join("summary.json"), &summary)?;

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

fn label(v: &str) -> &'static str {
    match v {
        "bn" => "with batch norm",
        _ => "baseline",
    }
}
