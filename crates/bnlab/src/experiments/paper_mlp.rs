//! The paper's MNIST experiment (Section 4.1, Figure 1): a 784-100-100-100-10 sigmoid MLP trained
//! with and without batch norm; test accuracy over training (Fig. 1a) and the 15th/50th/85th
//! percentiles of one last-hidden-layer sigmoid's input (Fig. 1b,c).

use super::PaperMlp;
use crate::driver::metrics::{runs_table, settings_rows, RunColumn};
use crate::driver::Variant as _;
use crate::driver::{
    self, Built, CommonSettings, Data, Defaults, Divergence, Evaluation, Experiment, ExperimentSettings, Outcome,
    RunTable,
};
use crate::engine::{BatchNormLayer, Layer, Linear, Sequential, Sgd, Sigmoid};
use crate::monitor::{Monitor, Watch};
use crate::report::{self, Band, BandPanels, LinePlot, Page, PlotLabels, Series};
use anyhow::{ensure, Context, Result};
use batchnorm::BatchNormConfig;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The two networks of Figure 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Linear layers with biases, sigmoid after each hidden layer.
    Baseline,
    /// BN on W·u (no bias) before each sigmoid.
    Bn,
}

impl driver::Variant for Variant {
    const ALL: &'static [Variant] = &[Variant::Baseline, Variant::Bn];

    fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::Bn => "bn",
        }
    }
}

/// The experiment's own settings (beside [`CommonSettings`] in [`Settings`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaperMlpSettings {
    /// Networks to train, in order.
    pub variants: Vec<Variant>,
    /// Standard deviation of the Gaussian weight initialization.
    pub init_std: f32,
}

impl ExperimentSettings for PaperMlpSettings {
    type Variant = Variant;

    fn check(&self, _common: &CommonSettings) -> Result<()> {
        ensure!(
            self.init_std.is_finite() && self.init_std > 0.0,
            "--init-std must be a finite number > 0"
        );
        Ok(())
    }

    fn variants(&self) -> &[Variant] {
        &self.variants
    }
}

/// Everything that defines a run of this experiment.
pub type Settings = driver::Settings<PaperMlpSettings>;

/// The paper's choices of the common settings: 50,000 steps of batches of 60 at learning rate
/// 0.5, evaluated every 1000 steps.
pub const DEFAULTS: Defaults = Defaults::new(50_000, 1000, 60, 0.5);

impl Settings {
    /// The paper's settings with this lab's defaults, writing to `out`.
    pub fn paper(out: PathBuf) -> Self {
        Settings {
            common: CommonSettings::new(DEFAULTS, out),
            experiment: PaperMlpSettings {
                variants: vec![Variant::Baseline, Variant::Bn],
                init_std: 0.1,
            },
        }
    }
}

/// Hidden layer width of the paper's network.
pub const HIDDEN: usize = 100;
/// The watched sigmoid: unit 0 of the last hidden layer.
pub const WATCHED_UNIT: usize = 0;
/// Percentiles of Figure 1b,c.
pub const PERCENTILES: [f64; 3] = [15.0, 50.0, 85.0];

/// Builds the network of a variant (weights from N(0, `init_std`²) drawn with `seed`, batch norm
/// configured by `bn`); returns it and the index of the last hidden sigmoid.
pub fn build(
    variant: Variant,
    inputs: usize,
    classes: usize,
    init_std: f32,
    seed: u64,
    bn: BatchNormConfig,
) -> Result<(Sequential, usize)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut layers: Vec<Box<dyn Layer>> = Vec::new();
    let mut width = inputs;
    let mut watched = 0;
    for _ in 0..3 {
        match variant {
            Variant::Baseline => layers.push(Box::new(Linear::new(width, HIDDEN, true, init_std, &mut rng))),
            Variant::Bn => {
                layers.push(Box::new(Linear::new(width, HIDDEN, false, init_std, &mut rng)));
                layers.push(Box::new(BatchNormLayer::new(HIDDEN, 1, bn)?));
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

impl Experiment for PaperMlp {
    const NAME: &'static str = "paper-mlp";
    type Settings = PaperMlpSettings;
    type Metric = Metric;

    /// Weights, gradients and every layer's output and gradient for a training batch and an
    /// evaluation chunk (f32), and the monitor's values: one per test example and hidden unit.
    fn memory_estimate(&self, s: &Settings, data: &Data) -> (u64, &'static str) {
        let inputs = data.train.features() as u64;
        let hidden = HIDDEN as u64;
        let params = inputs * hidden + 2 * hidden * hidden + hidden * data.classes as u64 + 4 * hidden;
        let per_example = inputs + 9 * hidden + data.classes as u64;
        let rows = s.common.batch as u64 * 2 + driver::EVAL_CHUNK as u64;
        let floats = 3 * params + rows * per_example + data.test.len as u64 * hidden;
        (4 * floats, "--batch")
    }

    fn build(&self, s: &Settings, variant: Variant, data: &Data, _rank: usize) -> Result<Built> {
        let c = &s.common;
        let features = data.train.features();
        let (net, watched) = build(
            variant,
            features,
            data.classes,
            s.experiment.init_std,
            c.seed,
            c.bn_config(),
        )?;
        let monitor = Monitor::new(watched, Watch::Input, WATCHED_UNIT, PERCENTILES.to_vec());
        Ok(Built {
            net,
            monitor: Some(monitor),
        })
    }

    fn optimizer(&self, _s: &Settings, _variant: Variant) -> Sgd {
        Sgd::new(0.0, 0.0)
    }

    fn lr(&self, s: &Settings, _variant: Variant, _step: u64) -> f64 {
        s.common.lr
    }

    fn divergence(&self) -> Divergence {
        Divergence::Fail
    }

    /// Rejects an evaluation without the watched sigmoid's percentiles.
    fn metric(&self, _s: &Settings, variant: Variant, eval: &Evaluation) -> Result<Metric> {
        let summary = (eval.watched.as_ref()).context("an evaluation without the watched sigmoid's percentiles")?;
        Ok(Metric {
            variant,
            step: eval.step,
            test_acc: eval.test_acc,
            train_loss: eval.train_loss,
            p15: summary.unit[0],
            p50: summary.unit[1],
            p85: summary.unit[2],
            pooled_p15: summary.pooled[0],
            pooled_p50: summary.pooled[1],
            pooled_p85: summary.pooled[2],
        })
    }

    fn diverged_line(&self, _s: &Settings, _variant: Variant, _step: u64) -> Option<Metric> {
        None
    }

    /// Figure 1 has no table.
    fn finish(&self, s: &Settings, o: &Outcome<Metric>) -> Result<Option<RunTable>> {
        write_outputs(s, o)?;
        Ok(None)
    }
}

/// Writes the plots and report.html.
fn write_outputs(s: &Settings, o: &Outcome<Metric>) -> Result<()> {
    let out = &s.common.out;
    let variants: Vec<&'static str> = s.experiment.variants.iter().map(|v| v.name()).collect();
    let of = |v: &'static str| o.metrics.iter().filter(move |m| m.variant.name() == v);
    let series: Vec<Series> = variants
        .iter()
        .map(|v| Series {
            name: label(v).into(),
            points: of(v).map(|m| (m.step as f64, m.test_acc)).collect(),
        })
        .collect();
    let acc_plot = LinePlot {
        labels: PlotLabels::new("Test accuracy (Figure 1a)", "training steps", "test accuracy"),
        series: &series,
        y_range: None,
    };
    let acc_svg = report::write_line_plot(out, "accuracy", &acc_plot)?;
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
        labels: PlotLabels::new(
            "Input to a last-hidden-layer sigmoid: 15th/50th/85th percentiles (Figure 1b,c)",
            "training steps",
            "sigmoid input",
        ),
        panels: &bands,
        shared_y: true,
    })?;
    report::write_plot(out, "distribution", &dist_svg)?;

    let mut page = Page::new("Batch normalization on the paper's MLP (Figure 1)");
    page.paragraph(&format!(
        "A 784-100-100-100-10 network with sigmoid hidden units, trained with plain SGD on mini-batches of {}, \
         with and without batch normalization before each sigmoid (Ioffe & Szegedy 2015, Section 4.1).",
        s.common.batch
    ));
    use RunColumn::{BestTestAcc, FinalTestAcc, MsPerStep, Seconds};
    let names = variants.iter().map(|&v| (v, label(v)));
    let (header, rows) = runs_table(names, &o.summaries, &[FinalTestAcc, BestTestAcc, MsPerStep, Seconds]);
    if s.common.processes > 1 {
        page.paragraph(&driver::data_parallel_text(&s.common));
    }
    page.table("Results", &header, &rows);
    page.figure("Test accuracy against training steps.", &acc_svg);
    page.figure(
        &format!("The input of sigmoid unit {WATCHED_UNIT} of the last hidden layer over the test set, as training progresses."),
        &dist_svg,
    );
    page.settings("Settings", &settings_rows(s));
    page.write(&out.join("report.html"))?;
    Ok(())
}

fn label(v: &str) -> &'static str {
    match v {
        "bn" => "with batch norm",
        _ => "baseline",
    }
}
