//! The paper's "accelerating BN networks" study (Section 4.2, Figure 3) at the scale of a small conv
//! net on Fashion-MNIST.
//!
//! The network is [`ConvNet`] (two conv 5×5 blocks with max-pooling, a hidden linear layer and a
//! linear head), with batch norm after each conv and the hidden linear layer in the BN variants.
//! Every variant starts from the same weights (same seed).
//! Training: SGD with momentum 0.9, softmax cross-entropy, batches of 64, and an exponentially
//! decaying learning rate `lr · 0.5^(step · speedup / half_life)`.
//!
//! The variants mirror the paper's Section 4.2 ([`Variant`]): `baseline` (no BN, ReLU, dropout,
//! L2 weight decay, LRN, base rate), `bn-baseline` (the same with BN before each nonlinearity),
//! `bn-x5` (BN, rate ×5, no dropout, L2 ÷ 5, decay 6× faster, no LRN), `bn-x30` (as `bn-x5`
//! with rate ×30), `bn-x5-sigmoid` (`bn-x5` with sigmoids) and `baseline-sigmoid` (`baseline`
//! with sigmoids). All get the same step budget and evaluation schedule.
//!
//! A variant whose training loss becomes NaN or infinite stops there: `metrics.jsonl` gets a line
//! with `"diverged": true` (accuracy and loss `null`), the table's "diverged at" column gives N
//! (its other columns count the evaluations before), and the other variants go on.
//!
//! The Figure 3 table ([`figure3_table`]): for each variant, the first evaluated step at which its
//! test accuracy reached the baseline's best test accuracy (or never), and its own best accuracy
//! and the step of it.
//!
//! Data-parallel training (`bnlab accelerate --distributed` under `mpirun`) follows the driver's
//! design ([`crate::parallel`]): every global batch of the one-process run is cut into
//! contiguous shards, one per rank; gradients and loss are summed over the ranks and every rank
//! applies the same update (momentum and weight decay included), so the replicas stay identical
//! (checked at every evaluation). The learning-rate schedule, the evaluation schedule and rank 0's
//! evaluation (Algorithm 2's population statistics included) are those of one process; a
//! diverged variant stops on every rank at the same step (the decision is taken on the global
//! loss). With synchronized batch norm the variants without dropout (`bn-x5`, `bn-x30`,
//! `bn-x5-sigmoid`) compute the one-process run up to rounding. Dropout masks are drawn per
//! example, and the ranks see different examples: each rank has its own dropout stream (seeded
//! from the seed and the rank; rank 0's is the one-process stream), so the variants with dropout
//! (`baseline`, `bn-baseline`, `baseline-sigmoid`) draw other masks than one process for all but
//! rank 0's examples: the same training procedure, not the same bits.

pub use super::convnet::default_half_life;
use super::convnet::{check_training, ConvNet};
use super::{Accelerate, Preset, QuickPreset, Study, StudyHelp, StudySettings};
use crate::driver::metrics::{runs_table, settings_rows, RunColumn};
use crate::driver::Variant as _;
use crate::driver::{
    self, Built, CommonSettings, Data, Defaults, Evaluation, Experiment, ExperimentSettings, Outcome, RunTable,
    TrainingStatus,
};
use crate::engine::{BatchNormLayer, LrSchedule, Sequential, Sgd, StateValue};
use crate::parallel::{self, DataParallel};
use crate::report::{self, markdown_table, percent, LinePlot, Page, PlotLabels, Series};
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// The six networks of the study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Variant {
    /// No BN, ReLU, dropout, L2 weight decay, LRN, base learning rate.
    Baseline,
    /// The baseline with BN before each nonlinearity.
    BnBaseline,
    /// BN, learning rate ×5, no dropout, L2 ÷ 5, decay 6× faster, no LRN.
    BnX5,
    /// As `BnX5` with learning rate ×30.
    BnX30,
    /// `BnX5` with sigmoid nonlinearities.
    BnX5Sigmoid,
    /// `Baseline` with sigmoid nonlinearities.
    BaselineSigmoid,
}

/// What a variant changes relative to the baseline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recipe {
    /// BN before each nonlinearity.
    pub bn: bool,
    /// Sigmoid instead of ReLU.
    pub sigmoid: bool,
    /// Multiplier of the base learning rate.
    pub lr_factor: f64,
    /// Dropout before each linear layer.
    pub dropout: bool,
    /// LRN after each pooling.
    pub lrn: bool,
    /// Divisor of the L2 weight decay.
    pub weight_decay_divisor: f64,
    /// Speed-up of the learning-rate decay.
    pub decay_speedup: f64,
}

impl driver::Variant for Variant {
    const ALL: &'static [Variant] = &[
        Variant::Baseline,
        Variant::BnBaseline,
        Variant::BnX5,
        Variant::BnX30,
        Variant::BnX5Sigmoid,
        Variant::BaselineSigmoid,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::BnBaseline => "bn-baseline",
            Variant::BnX5 => "bn-x5",
            Variant::BnX30 => "bn-x30",
            Variant::BnX5Sigmoid => "bn-x5-sigmoid",
            Variant::BaselineSigmoid => "baseline-sigmoid",
        }
    }
}

impl Variant {
    /// The variant's changes to the baseline (the paper's Section 4.2.1).
    pub fn recipe(self) -> Recipe {
        let baseline = Recipe {
            bn: false,
            sigmoid: false,
            lr_factor: 1.0,
            dropout: true,
            lrn: true,
            weight_decay_divisor: 1.0,
            decay_speedup: 1.0,
        };
        let x5 = Recipe {
            bn: true,
            lr_factor: 5.0,
            dropout: false,
            lrn: false,
            weight_decay_divisor: 5.0,
            decay_speedup: 6.0,
            ..baseline
        };
        match self {
            Variant::Baseline => baseline,
            Variant::BnBaseline => Recipe { bn: true, ..baseline },
            Variant::BnX5 => x5,
            Variant::BnX30 => Recipe { lr_factor: 30.0, ..x5 },
            Variant::BnX5Sigmoid => Recipe { sigmoid: true, ..x5 },
            Variant::BaselineSigmoid => Recipe {
                sigmoid: true,
                ..baseline
            },
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Variant::from_name(s).ok_or_else(|| {
            let names: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
            format!("unknown variant `{s}` (expected one of {})", names.join(", "))
        })
    }
}

/// The study's own settings (beside [`CommonSettings`] in [`Settings`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccelerateSettings {
    /// The networks to train, the steps over which the baseline's learning rate halves (variants
    /// with a decay speed-up halve faster), the channels of the two conv layers.
    #[serde(flatten)]
    pub study: StudySettings<Variant>,
    /// SGD momentum.
    pub momentum: f32,
    /// The baseline's L2 weight decay (on conv and linear weights).
    pub weight_decay: f32,
    /// Width of the hidden linear layer.
    pub hidden: usize,
    /// Drop probability of the dropout layers.
    pub dropout: f32,
}

/// Everything that defines a study.
pub type Settings = driver::Settings<AccelerateSettings>;

impl Preset for AccelerateSettings {
    /// 4000 steps of batches of 64 at base learning rate 0.01, evaluated every 200 steps.
    const DEFAULTS: Defaults = Defaults::new(4000, 200, 64, 0.01);
    /// 120 steps, evaluations every 40, 5 population batches, channels 4, 8 (and a hidden layer of
    /// 32: [`Preset::quick_own`]).
    const QUICK: QuickPreset = QuickPreset::new(120, 40, 5, [4, 8]);

    /// A hidden layer of 32.
    fn quick_own(&mut self) {
        self.hidden = 32;
    }

    fn study(&mut self) -> &mut StudySettings<Variant> {
        &mut self.study
    }

    fn defaults() -> Self {
        AccelerateSettings {
            study: StudySettings::new([8, 16], Self::DEFAULTS.steps),
            momentum: 0.9,
            weight_decay: 5e-4,
            hidden: 100,
            dropout: 0.5,
        }
    }
}

impl Settings {
    /// The conv net of `variant`.
    pub fn conv_net(&self, variant: Variant) -> ConvNet {
        let r = variant.recipe();
        ConvNet {
            channels: self.experiment.study.channels,
            hidden: self.experiment.hidden,
            sigmoid: r.sigmoid,
            dropout: r.dropout.then_some(self.experiment.dropout),
            lrn: r.lrn,
        }
    }

    /// The learning-rate schedule of `variant`.
    pub fn schedule(&self, variant: Variant) -> LrSchedule {
        LrSchedule::Exponential {
            every: self.experiment.study.half_life,
            rate: 0.5,
            speedup: variant.recipe().decay_speedup,
        }
    }

    /// The learning rate of `variant` at `step` (0-based: the rate of the step's update).
    pub fn lr_at(&self, variant: Variant, step: u64) -> f64 {
        self.schedule(variant)
            .lr(self.common.lr * variant.recipe().lr_factor, step)
    }
}

impl ExperimentSettings for AccelerateSettings {
    type Variant = Variant;

    fn check(&self, _common: &CommonSettings) -> Result<()> {
        self.study.check()?;
        check_training(self.momentum, self.weight_decay, self.study.channels, self.hidden)?;
        ensure!((0.0..1.0).contains(&self.dropout), "--dropout must be in [0, 1)");
        Ok(())
    }

    fn variants(&self) -> &[Variant] {
        &self.study.variants
    }
}

/// Builds the conv net of `variant` for `[1, rows, cols]` images and `classes` classes.
pub fn build(s: &Settings, variant: Variant, rows: usize, cols: usize, classes: usize) -> Result<Sequential> {
    build_for_rank(s, variant, rows, cols, classes, 0)
}

/// [`build`] for data-parallel rank `rank`: the same initial weights on every rank, and dropout
/// layers with the rank's own generator (seeded from the seed and `rank`; rank 0's is [`build`]'s).
pub fn build_for_rank(
    s: &Settings,
    variant: Variant,
    rows: usize,
    cols: usize,
    classes: usize,
    rank: usize,
) -> Result<Sequential> {
    let common = &s.common;
    let norm = |channels: usize, spatial: usize| BatchNormLayer::new(channels, spatial, common.bn_config());
    let dropout_seed = |k: u64| common.seed ^ (0x000d_5090_u64 + k) ^ (rank as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    s.conv_net(variant).build(
        rows,
        cols,
        classes,
        common.seed,
        variant.recipe().bn.then_some(&norm),
        dropout_seed,
    )
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Variant name.
    pub variant: String,
    /// Training steps done.
    pub step: u64,
    /// Test-set accuracy (`None` on the line that reports divergence).
    pub test_acc: Option<f64>,
    /// Training since the previous evaluation: loss, learning rate, divergence.
    #[serde(flatten)]
    pub training: TrainingStatus,
}

/// One row of the Figure 3 table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableRow {
    /// Variant name.
    pub variant: String,
    /// First evaluated step with test accuracy ≥ the baseline's best (`None`: never).
    pub steps_to_baseline_best: Option<u64>,
    /// The baseline's steps to its best divided by this variant's steps to the same accuracy.
    pub speedup: Option<f64>,
    /// Best test accuracy over evaluations (`None`: no evaluation).
    pub best_test_acc: Option<f64>,
    /// First step at which the best accuracy was reached.
    pub best_step: Option<u64>,
    /// Step at which training diverged, if it did.
    pub diverged_at: Option<u64>,
}

/// The paper's Figure 3 table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    /// The baseline's best test accuracy (`None` when the baseline was not run or never evaluated).
    pub baseline_best_acc: Option<f64>,
    /// The first step at which the baseline reached it.
    pub baseline_best_step: Option<u64>,
    /// One row per variant, in the order given.
    pub rows: Vec<TableRow>,
}

/// Best accuracy of `metrics` and the first step that reached it.
fn best_of<'a>(metrics: impl Iterator<Item = &'a Metric>) -> Option<(f64, u64)> {
    let mut best: Option<(f64, u64)> = None;
    for m in metrics {
        if let Some(acc) = m.test_acc {
            if best.is_none_or(|(b, _)| acc > b) {
                best = Some((acc, m.step));
            }
        }
    }
    best
}

/// The Figure 3 table of `variants` from their evaluations `metrics` (any order of lines; each
/// variant's lines in step order). The target is the best test accuracy of the variant named
/// `baseline`; a variant "reaches" it at its first evaluation with accuracy ≥ the target.
pub fn figure3_table(variants: &[&str], metrics: &[Metric]) -> Table {
    fn of<'a>(metrics: &'a [Metric], v: &'a str) -> impl Iterator<Item = &'a Metric> + 'a {
        metrics.iter().filter(move |m| m.variant == v)
    }
    let of = |v| of(metrics, v);
    let target = best_of(of(driver::Variant::name(Variant::Baseline)));
    let rows = variants
        .iter()
        .map(|&v| {
            let best = best_of(of(v));
            let reached = target.and_then(|(t, _)| of(v).find(|m| m.test_acc.is_some_and(|a| a >= t)).map(|m| m.step));
            TableRow {
                variant: v.to_string(),
                steps_to_baseline_best: reached,
                speedup: target
                    .zip(reached)
                    .map(|((_, base_steps), steps)| base_steps as f64 / steps as f64),
                best_test_acc: best.map(|b| b.0),
                best_step: best.map(|b| b.1),
                diverged_at: of(v).find(|m| m.training.diverged).map(|m| m.step),
            }
        })
        .collect();
    Table {
        baseline_best_acc: target.map(|t| t.0),
        baseline_best_step: target.map(|t| t.1),
        rows,
    }
}

impl Table {
    /// The table as Markdown (what `table.md` holds).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        match (self.baseline_best_acc, self.baseline_best_step) {
            (Some(a), Some(st)) => s.push_str(&format!(
                "Baseline's best test accuracy: {:.2}% (step {st}).\n\n",
                a * 100.0
            )),
            _ => s.push_str("The baseline was not run: no target accuracy.\n\n"),
        }
        s.push_str(&markdown_table(&TABLE_HEADER.map(String::from), &self.html_rows()));
        s
    }

    /// The rows as display cells ([`TABLE_HEADER`]): variant, steps to the baseline's best,
    /// speed-up, best accuracy, its step, the step of divergence.
    pub fn html_rows(&self) -> Vec<Vec<String>> {
        self.rows
            .iter()
            .map(|r| {
                let reach = match r.steps_to_baseline_best {
                    Some(n) => n.to_string(),
                    None if self.baseline_best_acc.is_none() => "n/a".into(),
                    None => "never".into(),
                };
                vec![
                    r.variant.clone(),
                    reach,
                    r.speedup.map_or("–".into(), |x| format!("{x:.1}×")),
                    percent(r.best_test_acc),
                    r.best_step.map_or("–".into(), |s| s.to_string()),
                    r.diverged_at.map_or("–".into(), |s| s.to_string()),
                ]
            })
            .collect()
    }
}

/// The columns of the Figure 3 table.
pub const TABLE_HEADER: [&str; 6] = [
    "variant",
    "steps to baseline's best",
    "speed-up",
    "best test accuracy",
    "at step",
    "diverged at",
];

impl Experiment for Accelerate {
    type Settings = AccelerateSettings;
    type Metric = Metric;
    const NAME: &'static str = "accelerate";

    /// The largest of the variants' nets ([`ConvNet::memory_estimate`]).
    fn memory_estimate(&self, s: &Settings, data: &Data) -> (u64, &'static str) {
        let bytes = (s.experiment.study.variants.iter())
            .map(|&v| {
                let net = s.conv_net(v);
                net.memory_estimate(
                    data.train.rows,
                    data.train.cols,
                    data.classes,
                    s.common.batch,
                    driver::EVAL_CHUNK,
                )
            })
            .max()
            .unwrap_or(0);
        (
            bytes,
            "--channels, --hidden or --batch (or --threads: fewer variants at once)",
        )
    }

    fn build(&self, s: &Settings, variant: Variant, data: &Data, rank: usize) -> Result<Built> {
        let net = build_for_rank(s, variant, data.train.rows, data.train.cols, data.classes, rank)?;
        Ok(Built { net, monitor: None })
    }

    fn optimizer(&self, s: &Settings, variant: Variant) -> Sgd {
        let a = &s.experiment;
        Sgd::new(
            a.momentum,
            a.weight_decay / variant.recipe().weight_decay_divisor as f32,
        )
    }

    fn lr(&self, s: &Settings, variant: Variant, step: u64) -> f64 {
        s.lr_at(variant, step)
    }

    fn metric(&self, s: &Settings, variant: Variant, eval: &Evaluation) -> Result<Metric> {
        Ok(Metric {
            variant: variant.name().into(),
            step: eval.step,
            test_acc: Some(eval.test_acc),
            training: TrainingStatus::evaluated(eval.train_loss, s.lr_at(variant, eval.step - 1)),
        })
    }

    fn diverged_line(&self, s: &Settings, variant: Variant, step: u64) -> Option<Metric> {
        Some(Metric {
            variant: variant.name().into(),
            step,
            test_acc: None,
            training: TrainingStatus::diverged(s.lr_at(variant, step - 1)),
        })
    }

    /// The checkpoint holds the dropout positions of rank 0 of the run that wrote it.
    fn after_restore(
        &self,
        s: &Settings,
        net: &mut Sequential,
        writer_processes: usize,
        dp: &DataParallel,
    ) -> Result<()> {
        let batch = s.common.batch;
        let local = parallel::shard(batch, dp.rank(), dp.size()).len();
        dropout_to_rank(net, parallel::shard(batch, 0, writer_processes).len(), local)
    }

    fn finish(&self, s: &Settings, o: &Outcome<Metric>) -> Result<Option<RunTable>> {
        let names: Vec<&str> = s.experiment.study.variants.iter().map(|v| v.name()).collect();
        let table = figure3_table(&names, &o.metrics);
        write_outputs(s, o, &table)?;
        Ok(Some(RunTable::new(&table, table.markdown())?))
    }
}

impl Study for Accelerate {
    const HELP: StudyHelp = StudyHelp {
        variants: "Variants to train, comma-separated (baseline, bn-baseline, bn-x5, bn-x30, bn-x5-sigmoid, \
                   baseline-sigmoid; default: all six)",
        half_life: "Steps over which the baseline's learning rate halves (default: steps / 3)",
        channels: "Output channels of the two conv layers, `C1,C2` (default 8,16; 4,8 with --quick)",
        quick: "A short run for CI: 120 steps, evaluations every 40, a smaller net (4, 8 channels, 32 hidden), 5 \
                population batches (each can still be set by its flag)",
    };
}

/// Moves the dropout generators of a network restored from a checkpoint (which holds the
/// positions of rank 0 of the run that wrote it, `rank0_shard` examples per step) to this rank's
/// (`shard` examples per step, in this run's process count): each step draws one 32-bit word per
/// example and feature, so a generator's position is proportional to the examples it has masked.
/// Rejects a position that is not a whole number of the writer's steps.
fn dropout_to_rank(net: &mut Sequential, rank0_shard: usize, shard: usize) -> Result<()> {
    if shard == rank0_shard {
        return Ok(());
    }
    for layer in net.layers.iter_mut() {
        for st in layer.state() {
            if let (StateValue::U64(v), "rng_word_pos") = (&st.value, st.name) {
                let pos = u128::from(v[0]) | (u128::from(v[1]) << 64);
                ensure!(
                    pos % rank0_shard as u128 == 0,
                    "dropout generator position {pos} is not a whole number of steps of {rank0_shard} examples"
                );
                let mine = pos / rank0_shard as u128 * shard as u128;
                layer.set_state(st.name, StateValue::U64(vec![mine as u64, (mine >> 64) as u64]))?;
            }
        }
    }
    Ok(())
}

/// Writes the accuracy plot and report.html.
fn write_outputs(s: &Settings, o: &Outcome<Metric>, table: &Table) -> Result<()> {
    let (c, a, out) = (&s.common, &s.experiment, &s.common.out);
    let series: Vec<Series> = (a.study.variants.iter())
        .map(|v| {
            let points = o
                .metrics
                .iter()
                .filter(|m| m.variant == v.name())
                .filter_map(|m| m.test_acc.map(|a| (m.step as f64, a)))
                .collect();
            Series::new(v.name(), points)
        })
        .collect();
    let acc_plot = LinePlot {
        labels: PlotLabels::new(
            "Test accuracy of the conv net variants (Figure 2)",
            "training steps",
            "test accuracy",
        ),
        series: &series,
        y_range: Some((0.0, 1.0)),
    };
    let acc_svg = report::write_line_plot(out, "accuracy", &acc_plot)?;

    let mut page = Page::new("Accelerating BN networks (Figure 3)");
    page.paragraph(&format!(
        "A small conv net on the images (conv 5×5 {c1} → pool → conv 5×5 {c2} → pool → linear {h} → linear), \
         trained with SGD (momentum {m}, batches of {b}) in six configurations mirroring Ioffe & Szegedy \
         (2015), Section 4.2: the baseline has dropout, L2 weight decay and LRN; the BN variants add batch norm \
         before each nonlinearity and, for ×5 and ×30, raise the learning rate, remove dropout and LRN, cut \
         the weight decay 5× and decay the learning rate 6× faster. All variants train for {steps} steps \
         and are evaluated every {e} steps.",
        c1 = a.study.channels[0],
        c2 = a.study.channels[1],
        h = a.hidden,
        m = a.momentum,
        b = c.batch,
        steps = c.steps,
        e = c.eval_every,
    ));
    page.table(
        &match table.baseline_best_acc {
            Some(a) => format!("Steps to reach the baseline's best test accuracy ({:.2}%)", a * 100.0),
            None => "Steps to reach the baseline's best test accuracy (baseline not run)".into(),
        },
        &TABLE_HEADER.map(String::from),
        &table.html_rows(),
    );
    use RunColumn::{FinalTestAcc, MsPerStep, Seconds, Steps};
    let names = a.study.variants.iter().map(|v| (v.name(), v.name()));
    let (header, rows) = runs_table(names, &o.summaries, &[FinalTestAcc, MsPerStep, Seconds, Steps]);
    if c.processes > 1 {
        page.paragraph(&driver::data_parallel_text(c));
    }
    page.table("Runs", &header, &rows);
    page.figure("Test accuracy against training steps, all variants.", &acc_svg);
    page.settings("Settings", &settings_rows(s));
    page.write(&out.join("report.html"))?;
    Ok(())
}
