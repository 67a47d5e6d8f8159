//! `bnlab padded`: batch norm over padded sequences, with the padding in its statistics (what
//! every framework but this one does by default) and masked.
//!
//! **Data.** Each image of the data set (Fashion-MNIST: 28×28) is read as a sequence of its rows
//! (28 steps of 28 features), cut to a random length and padded back to the image's height with
//! `--pad-value`. A length is drawn per example, uniform in a [`Lengths`] range `MIN-MAX`, from a
//! generator keyed by the seed, the split and the example's index ([`sequence_length`]): fixed for
//! the run, the same in every epoch, on every rank and on resume. Training uses
//! `--train-lengths`; every evaluation measures the test set under the training lengths and under
//! each of `--test-lengths` (by default full-length sequences and heavy padding), with the same
//! network and statistics.
//!
//! **Network** ([`build`]), per example, C1, C2 = `--channels`, L = the steps (rows), F = the
//! features (columns):
//!
//! ```text
//! x [F, L] (the sequence, feature-major: each step a column)
//!   [zero-masked] → conv1d k=3 "same" → [C1, L] → [BN] → ReLU
//!   [zero-masked] → conv1d k=3 "same" → [C2, L] → [BN] → ReLU
//!   masked mean over the valid steps → [C2] → linear C2 → classes
//! ```
//!
//! The three variants ([`Variant`]) start from the same weights:
//! - `bn`: what a framework user writes: the convolutions read the padded input as it is and batch
//!   norm's statistics run over every position, padding included; only the pooling is masked.
//! - `masked-bn`: every layer respects the mask: the convolutions read the padded steps as zeros
//!   (a [`ZeroMasked`] layer before each: each sequence is zero-padded at its own end), batch norm
//!   is the kernel crate's masked batch norm (statistics over the valid positions only, padded
//!   positions written as 0), the pooling is masked.
//! - `no-bn`: the masked network without batch norm (the convolutions with biases).
//!
//! The mask of each batch is set from its examples' lengths before every forward pass, in training
//! and in evaluation ([`Experiment::prepare_batch`], [`Sequential::set_mask`]). In `masked-bn` and
//! `no-bn` no padded value is ever read into anything: `--pad-value 1e30` or `nan` gives the same
//! metrics, bit for bit, as `--pad-value 0`. In `bn` the padding enters the first convolution and
//! every batch-norm statistic.
//!
//! **Training**: SGD with momentum 0.9 and L2 weight decay 1e-4, the learning rate halving every
//! `--half-life` steps; evaluation with Algorithm 2's population statistics, estimated over
//! training batches with the training lengths (the statistics the network trained with).

use super::convnet::check_sgd;
pub use super::convnet::default_half_life;
use super::{Padded, Preset, QuickPreset, Study, StudyHelp, StudySettings};
use crate::data::batches::{below, epoch_key};
use crate::driver::Variant as _;
use crate::driver::{
    self, Built, CommonSettings, Data, Defaults, Evaluation, Experiment, ExperimentSettings, Gathered, Outcome, Pass,
    RunTable, StudyLine, TrainingStatus,
};
use crate::engine::{
    BatchNormLayer, Conv2d, ConvInit, Layer, Linear, LrSchedule, MaskedMeanPool, PositionMask, Relu, Sequential, Sgd,
    ZeroMasked,
};
use crate::report::{self, markdown_table, percent, LinePlot, Page, PlotLabels, Series};
use anyhow::{ensure, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The networks of the study (named `bn`, `masked-bn`, `no-bn` in flags, files and JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// Batch norm over every position, padding included.
    Bn,
    /// Masked batch norm, and every layer respecting the mask.
    MaskedBn,
    /// The masked network without batch norm.
    NoBn,
}

impl driver::Variant for Variant {
    const ALL: &'static [Variant] = &[Variant::Bn, Variant::MaskedBn, Variant::NoBn];

    fn name(self) -> &'static str {
        match self {
            Variant::Bn => "bn",
            Variant::MaskedBn => "masked-bn",
            Variant::NoBn => "no-bn",
        }
    }
}

impl Variant {
    /// Whether its layers respect the mask (all but the pooling ignore it in `bn`).
    pub fn masked(self) -> bool {
        self != Variant::Bn
    }
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Variant::from_name(s).ok_or_else(|| format!("unknown variant `{s}` (expected one of bn, masked-bn, no-bn)"))
    }
}

/// A distribution of sequence lengths: uniform over the whole numbers `min..=max` (`1 ≤ min ≤
/// max`). Written `MIN-MAX`, or `N` for every sequence of length N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lengths {
    /// The shortest length.
    pub min: usize,
    /// The longest length.
    pub max: usize,
}

impl Lengths {
    /// The expected fraction of padded steps in sequences padded to `steps`.
    pub fn padding(self, steps: usize) -> f64 {
        1.0 - (self.min + self.max) as f64 / 2.0 / steps as f64
    }
}

impl std::fmt::Display for Lengths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.min == self.max {
            true => write!(f, "{}", self.min),
            false => write!(f, "{}-{}", self.min, self.max),
        }
    }
}

impl std::str::FromStr for Lengths {
    type Err = String;
    /// `MIN-MAX` or `N`; rejects anything else, 0 and MIN > MAX.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected lengths MIN-MAX or N (whole numbers >= 1), got `{s}`");
        let number = |t: &str| t.trim().parse::<usize>().map_err(|_| bad());
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(s)?, number(s)?),
        };
        match (min, max) {
            (0, _) => Err(format!("lengths must be >= 1, got `{s}`")),
            (min, max) if min > max => Err(format!("lengths `{s}`: MIN is above MAX")),
            (min, max) => Ok(Lengths { min, max }),
        }
    }
}

impl Serialize for Lengths {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lengths {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        String::deserialize(de)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `--pad-value` in `settings.json`: a JSON number when finite, else the text `NaN`, `inf` or
/// `-inf` (JSON has no such numbers).
mod pad_value {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f32, ser: S) -> Result<S::Ok, S::Error> {
        match v.is_finite() {
            true => ser.serialize_f32(*v),
            false => ser.collect_str(v),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<f32, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Value {
            Number(f32),
            Text(String),
        }
        match Value::deserialize(de)? {
            Value::Number(v) => Ok(v),
            Value::Text(t) => super::parse_pad_value(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// A padding value as the table and report write it: plain decimals from 1e-4 to 1e6 (and 0),
/// scientific notation beyond (`1e30`, not thirty-one digits), `NaN`, `inf`, `-inf`.
pub fn pad_value_text(v: f32) -> String {
    match v == 0.0 || !v.is_finite() || (1e-4..1e6).contains(&v.abs()) {
        true => v.to_string(),
        false => format!("{v:e}"),
    }
}

/// Parses `--pad-value`: any `f32`, `nan`, `inf` and `-inf` included.
pub fn parse_pad_value(s: &str) -> Result<f32, String> {
    s.trim()
        .parse::<f32>()
        .map_err(|_| format!("expected a number (or nan, inf, -inf), got `{s}`"))
}

/// The study's own settings (beside [`CommonSettings`] in [`Settings`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaddedSettings {
    /// The networks to train, the steps over which the learning rate halves, the channels of the
    /// two convolutions.
    #[serde(flatten)]
    pub study: StudySettings<Variant>,
    /// Sequence lengths in training (and in the population statistics).
    pub train_lengths: Lengths,
    /// The test conditions after the training lengths: each evaluation measures the test set under
    /// the training lengths, then under each of these.
    pub test_lengths: Vec<Lengths>,
    /// What the padded steps hold.
    #[serde(with = "pad_value")]
    pub pad_value: f32,
    /// SGD momentum.
    pub momentum: f32,
    /// L2 weight decay (on conv and linear weights).
    pub weight_decay: f32,
}

/// Everything that defines a study.
pub type Settings = driver::Settings<PaddedSettings>;

/// The convolutions' kernel (over time).
pub const KERNEL: usize = 3;

impl Preset for PaddedSettings {
    /// 3000 steps of batches of 64 at rate 0.05, evaluated every 500.
    const DEFAULTS: Defaults = Defaults::new(3000, 500, 64, 0.05);
    /// 30 steps, evaluations every 10, 2 population batches, 8 channels per convolution.
    const QUICK: QuickPreset = QuickPreset::new(30, 10, 2, [8, 8]);

    fn study(&mut self) -> &mut StudySettings<Variant> {
        &mut self.study
    }

    /// Trained on lengths 8–28, tested on those, on full-length sequences (28) and on heavy
    /// padding (4–10).
    fn defaults() -> Self {
        PaddedSettings {
            study: StudySettings::new([32, 32], Self::DEFAULTS.steps),
            train_lengths: Lengths { min: 8, max: 28 },
            test_lengths: vec![Lengths { min: 28, max: 28 }, Lengths { min: 4, max: 10 }],
            pad_value: 0.0,
            momentum: 0.9,
            weight_decay: 1e-4,
        }
    }
}

impl Settings {
    /// The length distribution of each test condition: the training lengths, then
    /// `--test-lengths`.
    pub fn conditions(&self) -> Vec<Lengths> {
        let e = &self.experiment;
        std::iter::once(e.train_lengths)
            .chain(e.test_lengths.iter().copied())
            .collect()
    }

    /// The learning rate at `step` (0-based): `--lr`, halving every `--half-life` steps.
    pub fn lr_at(&self, step: u64) -> f64 {
        LrSchedule::Exponential {
            every: self.experiment.study.half_life,
            rate: 0.5,
            speedup: 1.0,
        }
        .lr(self.common.lr, step)
    }
}

impl ExperimentSettings for PaddedSettings {
    type Variant = Variant;

    /// The lengths against the data are checked by [`build`].
    fn check(&self, _common: &CommonSettings) -> Result<()> {
        self.study.check()?;
        check_sgd(self.momentum, self.weight_decay)?;
        ensure!(self.study.channels.iter().all(|&c| c > 0), "--channels must be > 0");
        for l in std::iter::once(&self.train_lengths).chain(&self.test_lengths) {
            ensure!(
                l.min >= 1 && l.min <= l.max,
                "lengths {}-{} must satisfy 1 <= MIN <= MAX",
                l.min,
                l.max
            );
        }
        Ok(())
    }

    fn variants(&self) -> &[Variant] {
        &self.study.variants
    }
}

/// Which split a sequence length is drawn for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training split.
    Train,
    /// The test split.
    Test,
}

/// The length of the sequence of example `index` of `split` under `lengths`: `lengths.min` plus a
/// uniform draw from `0..=max − min` by a ChaCha8 generator keyed by `seed`, `index` and the
/// split. The same example gets the same draw under every distribution (the test conditions differ
/// in their ranges only).
pub fn sequence_length(seed: u64, split: Split, index: usize, lengths: Lengths) -> usize {
    let mut key = epoch_key(seed, index as u64);
    key[16..].copy_from_slice(match split {
        Split::Train => b"bnlab-seqlen-trn",
        Split::Test => b"bnlab-seqlen-tst",
    });
    let span = (lengths.max - lengths.min + 1) as u64;
    lengths.min + below(&mut ChaCha8Rng::from_seed(key), span) as usize
}

/// Rewrites gathered images `x` (`[batch, rows·cols]`, row-major: step t is row t) into padded
/// sequences, feature-major (`[batch, cols, rows]`: feature f of step t at `f·rows + t`): the first
/// `lengths[n]` steps of example n hold its rows, the others `pad`.
pub fn pad_sequences(x: &mut [f32], (rows, cols): (usize, usize), lengths: &[usize], pad: f32) {
    let mut image = vec![0.0f32; rows * cols];
    for (xn, &len) in x.chunks_exact_mut(rows * cols).zip(lengths) {
        image.copy_from_slice(xn);
        for (f, seq) in xn.chunks_exact_mut(rows).enumerate() {
            for (t, v) in seq.iter_mut().enumerate() {
                *v = if t < len { image[t * cols + f] } else { pad };
            }
        }
    }
}

/// The network of `variant` for sequences of `steps` steps of `features` features and `classes`
/// classes (see the module docs), weights drawn from `seed` in layer order, the same for every
/// variant. `norm` builds a variant's batch-norm layer for `(channels, steps)`.
pub fn build(
    s: &Settings,
    variant: Variant,
    (steps, features, classes): (usize, usize, usize),
    norm: &dyn Fn(usize, usize) -> Result<BatchNormLayer>,
) -> Result<Sequential> {
    let mut rng = ChaCha8Rng::seed_from_u64(s.common.seed);
    let bn = variant != Variant::NoBn;
    let mut layers: Vec<Box<dyn Layer>> = Vec::new();
    let mut c = features;
    for &out_c in &s.experiment.study.channels {
        if variant.masked() {
            layers.push(Box::new(ZeroMasked::new(c, steps)?));
        }
        layers.push(Box::new(Conv2d::conv1d(
            c,
            out_c,
            steps,
            KERNEL,
            !bn,
            ConvInit::He,
            &mut rng,
        )?));
        match bn {
            // Batch norm fused with its ReLU: the pair's bits and checkpoints.
            true => layers.push(Box::new(norm(out_c, steps)?.with_relu())),
            false => layers.push(Box::new(Relu { size: out_c * steps })),
        }
        c = out_c;
    }
    layers.push(Box::new(MaskedMeanPool::new(c, steps)?));
    layers.push(Box::new(Linear::new(
        c,
        classes,
        true,
        (2.0 / c as f32).sqrt(),
        &mut rng,
    )));
    Sequential::new(layers)
}

/// The test accuracy under one length distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConditionAcc {
    /// The lengths of the test sequences.
    pub lengths: Lengths,
    /// Test accuracy (`None` on the line that reports divergence).
    pub test_acc: Option<f64>,
}

/// One line of `metrics.jsonl` (its `test_acc`: under the training lengths).
pub type Metric = StudyLine<Variant, Conditions>;

/// The study's own fields of a line of `metrics.jsonl` ([`Metric`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conditions {
    /// Test accuracy under each test condition: the training lengths, then `--test-lengths`.
    pub conditions: Vec<ConditionAcc>,
}

/// One row of the table: a variant's last evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// Variant name.
    pub variant: String,
    /// Final test accuracy under each condition, in the order of [`Table::conditions`] (`None`:
    /// diverged before any evaluation).
    pub test_acc: Vec<Option<f64>>,
    /// The step at which training diverged, if it did.
    pub diverged_at: Option<u64>,
}

/// The study's table: final test accuracy per variant × test length distribution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    /// The training lengths.
    pub train_lengths: Lengths,
    /// The padding value.
    #[serde(with = "pad_value")]
    pub pad_value: f32,
    /// The test conditions (the training lengths first).
    pub conditions: Vec<Lengths>,
    /// The expected fraction of padded steps under each condition.
    pub padding: Vec<f64>,
    /// One row per variant, in the run's order.
    pub rows: Vec<Row>,
}

/// The table of a run from its metrics (each variant's lines in step order); `steps` is the
/// sequences' padded length.
pub fn table(s: &Settings, steps: usize, metrics: &[Metric]) -> Table {
    let conditions = s.conditions();
    let rows = (s.experiment.study.variants.iter())
        .map(|v| {
            let mine = || metrics.iter().filter(|m| m.variant == *v);
            let last = mine().rfind(|m| !m.training.diverged);
            Row {
                variant: v.name().to_string(),
                test_acc: (0..conditions.len())
                    .map(|i| last.and_then(|m| m.own.conditions.get(i)).and_then(|c| c.test_acc))
                    .collect(),
                diverged_at: mine().find(|m| m.training.diverged).map(|m| m.step),
            }
        })
        .collect();
    Table {
        train_lengths: s.experiment.train_lengths,
        pad_value: s.experiment.pad_value,
        padding: conditions.iter().map(|l| l.padding(steps)).collect(),
        conditions,
        rows,
    }
}

impl Table {
    /// The header and rows for display: a row per variant, a column per test condition.
    pub fn display_rows(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let mut header = vec!["variant".to_string()];
        header.extend(
            (self.conditions.iter().zip(&self.padding))
                .enumerate()
                .map(|(i, (l, p))| {
                    let train = if i == 0 { ", as trained" } else { "" };
                    format!("lengths {l} ({:.0}% padding{train})", p * 100.0)
                }),
        );
        let rows = (self.rows.iter())
            .map(|r| {
                let mut cells = vec![r.variant.clone()];
                match r.diverged_at {
                    Some(step) => cells.extend(r.test_acc.iter().map(|_| format!("diverged at step {step}"))),
                    None => cells.extend(r.test_acc.iter().map(|&a| percent(a))),
                }
                cells
            })
            .collect();
        (header, rows)
    }

    /// The table as Markdown (what `table.md` holds).
    pub fn markdown(&self) -> String {
        let (header, rows) = self.display_rows();
        format!(
            "Final test accuracy by test sequence lengths; trained on lengths {}, padding value {}.\n\n{}",
            self.train_lengths,
            pad_value_text(self.pad_value),
            markdown_table(&header, &rows)
        )
    }
}

impl Metric {
    /// The line of `variant`'s evaluation `eval`, or with `None` of its divergence at `step`.
    fn new(s: &Settings, variant: Variant, step: u64, eval: Option<&Evaluation>) -> Metric {
        let accuracies = eval.map(|e| &e.condition_test_acc[..]).unwrap_or_default();
        let conditions = (s.conditions().into_iter().enumerate())
            .map(|(i, lengths)| ConditionAcc {
                lengths,
                test_acc: accuracies.get(i).copied(),
            })
            .collect();
        Metric {
            variant,
            step,
            test_acc: eval.map(|e| e.test_acc),
            own: Conditions { conditions },
            training: match eval {
                Some(e) => TrainingStatus::evaluated(e.train_loss, s.lr_at(step - 1)),
                None => TrainingStatus::diverged(s.lr_at(step - 1)),
            },
        }
    }
}

impl Experiment for Padded {
    type Settings = PaddedSettings;
    type Metric = Metric;
    const NAME: &'static str = "padded";

    fn memory_estimate(&self, s: &Settings, data: &Data) -> (u64, &'static str) {
        let (steps, features) = (data.train.rows as u64, data.train.cols as u64);
        let [c1, c2] = s.experiment.study.channels.map(|c| c as u64);
        let k = KERNEL as u64;
        let params = k * (features * c1 + c1 * c2) + 4 * (c1 + c2) + (c2 + 1) * data.classes as u64;
        // Per example: the input and its mask layer, conv, BN, ReLU and mask layer per block, the
        // pooled features and logits; the convolutions' unfolded inputs.
        let outputs = 2 * features * steps + 4 * (c1 + c2) * steps + c2 + data.classes as u64;
        let unfolded = k * (features + c1) * steps;
        let per_example = 2 * outputs + unfolded;
        let floats = 4 * params + (s.common.batch + driver::EVAL_CHUNK) as u64 * per_example;
        (
            4 * floats,
            "--channels or --batch (or --threads: fewer variants at once)",
        )
    }

    fn build(&self, s: &Settings, variant: Variant, data: &Data, _rank: usize) -> Result<Built> {
        let (steps, features) = (data.train.rows, data.train.cols);
        for l in s.conditions() {
            ensure!(
                l.max <= steps,
                "lengths {l}: the sequences have {steps} steps (the images' rows), so lengths must be at most {steps}"
            );
        }
        let config = s.common.bn_config();
        let norm = |channels: usize, steps: usize| -> Result<BatchNormLayer> {
            match variant {
                Variant::Bn => BatchNormLayer::new(channels, steps, config),
                Variant::MaskedBn => BatchNormLayer::new(channels, steps, config)?.masked(),
                Variant::NoBn => unreachable!("no normalization layer is built without BN"),
            }
        };
        let net = build(s, variant, (steps, features, data.classes), &norm)?;
        Ok(Built { net, monitor: None })
    }

    /// Cuts and pads the batch's sequences to their lengths (the training lengths for training and
    /// the population statistics, the condition's for a test pass) and sets the network's mask.
    fn prepare_batch(
        &self,
        s: &Settings,
        _variant: Variant,
        batch: Gathered<'_>,
        x: &mut [f32],
        net: &mut Sequential,
    ) -> Result<()> {
        let (split, indices) = (batch.split, batch.indices);
        let (which, lengths) = match batch.pass {
            Pass::Train(_) | Pass::Population => (Split::Train, s.experiment.train_lengths),
            Pass::Test(c) => {
                let conditions = s.conditions();
                let l = *conditions.get(c).with_context(|| format!("no test condition {c}"))?;
                (Split::Test, l)
            }
        };
        let (steps, features) = (split.rows, split.cols);
        let lens: Vec<usize> = (indices.iter())
            .map(|&i| sequence_length(s.common.seed, which, i, lengths))
            .collect();
        pad_sequences(x, (steps, features), &lens, s.experiment.pad_value);
        net.set_mask(&PositionMask::from_lengths(&lens, steps)?);
        Ok(())
    }

    fn test_conditions(&self, s: &Settings) -> usize {
        s.conditions().len()
    }

    fn optimizer(&self, s: &Settings, _variant: Variant) -> Sgd {
        Sgd::new(s.experiment.momentum, s.experiment.weight_decay)
    }

    fn lr(&self, s: &Settings, _variant: Variant, step: u64) -> f64 {
        s.lr_at(step)
    }

    fn metric(&self, s: &Settings, variant: Variant, eval: &Evaluation) -> Result<Metric> {
        Ok(Metric::new(s, variant, eval.step, Some(eval)))
    }

    fn diverged_line(&self, s: &Settings, variant: Variant, step: u64) -> Option<Metric> {
        Some(Metric::new(s, variant, step, None))
    }

    fn finish(&self, s: &Settings, o: &Outcome<Metric>) -> Result<Option<RunTable>> {
        // The padded length, for the padding fractions: the rows of the images the run evaluated.
        let test = crate::data::load_split(&s.common.data_dir, crate::data::Split::Test)?;
        let table = table(s, test.rows, &o.metrics);
        write_outputs(s, o, &table)?;
        Ok(Some(RunTable::new(&table, table.markdown())?))
    }
}

impl Study for Padded {
    const HELP: StudyHelp = StudyHelp {
        variants: "Variants to train, comma-separated (bn, masked-bn, no-bn; default: all three)",
        half_life: "Steps over which the learning rate halves (default: steps / 3)",
        channels: "Output channels of the two convolutions, `C1,C2` (default 32,32; 8,8 with --quick)",
        quick: "A short run for CI: 30 steps, evaluations every 10, 8 channels per convolution, 2 population batches \
                (each can still be set by its flag)",
    };
}

/// Writes the plots and report.html.
fn write_outputs(s: &Settings, o: &Outcome<Metric>, table: &Table) -> Result<()> {
    let (c, e, out) = (&s.common, &s.experiment, &s.common.out);
    let mut figures = Vec::new();
    // Final accuracy against the test padding, one line per variant.
    let series: Vec<Series> = (table.rows.iter())
        .map(|r| {
            let points = (table.padding.iter().zip(&r.test_acc))
                .filter_map(|(&p, a)| a.map(|a| (p, a)))
                .collect();
            Series::new(r.variant.clone(), sorted_by_x(points))
        })
        .collect();
    figures.push(accuracy_plot(
        out,
        "accuracy-vs-padding",
        "Final test accuracy against the test sequences' padding".into(),
        "expected fraction of padded steps in the test sequences",
        &series,
    )?);
    // Training curves: accuracy under the training lengths against steps.
    let series: Vec<Series> = (e.study.variants.iter())
        .map(|v| {
            let points = (o.metrics.iter())
                .filter(|m| m.variant == *v)
                .filter_map(|m| m.test_acc.map(|a| (m.step as f64, a)))
                .collect();
            Series::new(v.name(), points)
        })
        .collect();
    let title = format!("Test accuracy during training (lengths {})", e.train_lengths);
    figures.push(accuracy_plot(out, "curves", title, "training steps", &series)?);

    let mut page = Page::new("Batch norm over padded sequences");
    page.paragraph(&format!(
        "Fashion-MNIST images read as sequences of their rows, cut to lengths drawn uniformly from {train} and \
         padded with {pad}; a 1-D conv net (conv k=3 {c1} → BN → ReLU → conv k=3 {c2} → BN → ReLU → masked mean \
         over the valid steps → linear) trained with SGD (momentum {m}, rate {lr} halving every {hl} steps, batches \
         of {b}) for {steps} steps. `bn` normalizes over every position, padding included; `masked-bn` over the valid \
         positions only (every layer respects the mask); `no-bn` is the masked network without batch norm. Each \
         column evaluates the final network (Algorithm 2's population statistics, estimated with the training \
         lengths) on test sequences of other lengths.",
        train = e.train_lengths,
        pad = pad_value_text(e.pad_value),
        c1 = e.study.channels[0],
        c2 = e.study.channels[1],
        m = e.momentum,
        lr = c.lr,
        hl = e.study.half_life,
        b = c.batch,
        steps = c.steps,
    ));
    let table = ("Final test accuracy by test sequence lengths", table.display_rows());
    driver::finish_study_report(page, s, table, &e.study.variants, o, &figures)
}

/// Draws `series` as a plot of test accuracy (0 to 1) against `x_label` and writes it into `out` as
/// `stem`.svg and .png; returns its title and SVG for the report.
fn accuracy_plot(
    out: &std::path::Path,
    stem: &str,
    title: String,
    x_label: &str,
    series: &[Series],
) -> Result<(String, String)> {
    let svg = report::write_line_plot(
        out,
        stem,
        &LinePlot {
            labels: PlotLabels::new(&title, x_label, "test accuracy"),
            series,
            y_range: Some((0.0, 1.0)),
        },
    )?;
    Ok((title, svg))
}

/// `points` in increasing x (a line through the test conditions in padding order).
fn sorted_by_x(mut points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}
