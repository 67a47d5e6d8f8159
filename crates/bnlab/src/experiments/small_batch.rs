//! `bnlab small-batch`: where batch norm breaks when mini-batches are small or not i.i.d., and the
//! variants that fix it, side by side (Ioffe 2017, Batch Renormalization, Sections 4.2–4.3;
//! Hoffer et al. 2017 on ghost batches).
//!
//! The network is `accelerate`'s conv net ([`ConvNet`], ReLU, no dropout, no LRN) with a
//! normalization after each conv and the hidden linear layer, trained at mini-batch sizes 2, 4, 8,
//! 16 and 64 with the same examples seen. Methods ([`Method`]): plain batch norm, batch
//! renormalization with the paper's r_max/d_max warm-up scaled to the run's length, ghost batch
//! norm with virtual batches of 4 and 16 (at the sizes above them), batch norm frozen after a
//! warm-up, and no normalization.
//!
//! **One budget, counted at the reference batch.** The common flags keep their meaning at the
//! reference batch size `--batch` (64): `--steps` steps of it, an evaluation every `--eval-every`
//! of them, Algorithm 2 over `--population-batches` of them, the rate `--lr`. A variant with
//! batch B takes k = `--batch`/B times as many steps, evaluates every k·`--eval-every` steps and
//! estimates its population statistics over k·`--population-batches` batches of B: every variant
//! sees the same examples (with `--batches iid`, the same examples in the same order: the epoch
//! permutations depend on the seed alone) and is evaluated after the same examples.
//!
//! **The learning rate scales linearly with the batch** (Goyal et al. 2017): B/`--batch` · `--lr`,
//! halving every `--half-life` reference steps. SGD's expected step per example seen is then the
//! same at every size, so equal examples seen is equal training; the square-root rule (Hoffer et
//! al. 2017) would give the small batches larger steps per example.
//!
//! **Evaluation** uses Algorithm 2's population statistics (the run's `--bn-stats`) and also the
//! running averages (momentum `--bn-momentum` per step at every size, as users of PyTorch and
//! Keras keep it): the metrics hold both, and the gap between them is one of the findings.

pub use super::convnet::default_half_life;
use super::convnet::{check_training, ConvNet, Norm};
use super::{Preset, QuickPreset, SmallBatch, Study, StudyHelp, StudySettings};
use crate::data::{BatchOrder, ClassGroupedBatches, EpochShuffler};
use crate::driver::Variant as _;
use crate::driver::{
    self, Built, CommonSettings, Data, Defaults, Evaluation, Experiment, ExperimentSettings, Outcome, RunTable,
    StudyLine, TrainingStatus,
};
use crate::engine::{BatchNormLayer, BnVariant, LrSchedule, Sgd};
use crate::report::{self, markdown_table, percent, LinePlot, Page, PlotLabels, Series};
use anyhow::{ensure, Result};
use batchnorm::{BatchNormConfig, RenormSchedule};
use serde::{Deserialize, Serialize};

/// How a variant normalizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Method {
    /// Batch norm over the mini-batch (Algorithm 1).
    Bn,
    /// Batch renormalization (Ioffe 2017) with the paper's warm-up of r_max and d_max, scaled.
    Renorm,
    /// Ghost batch norm over virtual batches of 4 examples.
    Ghost4,
    /// Ghost batch norm over virtual batches of 16 examples.
    Ghost16,
    /// Batch norm frozen (running statistics, no update) after the first `--freeze-after`
    /// reference steps.
    Frozen,
    /// No normalization (layers with biases).
    NoBn,
}

impl Method {
    /// Every method, in table order.
    pub const ALL: [Method; 6] = [
        Method::Bn,
        Method::Renorm,
        Method::Ghost4,
        Method::Ghost16,
        Method::Frozen,
        Method::NoBn,
    ];

    /// The method's name in variant names and tables.
    pub fn name(self) -> &'static str {
        match self {
            Method::Bn => "bn",
            Method::Renorm => "renorm",
            Method::Ghost4 => "ghost4",
            Method::Ghost16 => "ghost16",
            Method::Frozen => "frozen",
            Method::NoBn => "no-bn",
        }
    }

    /// The virtual batch size of a ghost method.
    pub fn virtual_batch(self) -> Option<usize> {
        match self {
            Method::Ghost4 => Some(4),
            Method::Ghost16 => Some(16),
            _ => None,
        }
    }
}

/// α of the renorm variants' moving statistics (the kernel crate's default, the weight Keras's
/// `renorm_momentum` of 0.99 gives a batch).
pub const RENORM_MOMENTUM: f64 = 0.01;

/// The mini-batch sizes of the study.
pub const SIZES: [usize; 5] = [2, 4, 8, 16, 64];

/// One network of the study: a method at a mini-batch size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Variant {
    /// How it normalizes.
    pub method: Method,
    /// Its mini-batch size.
    pub batch: usize,
}

macro_rules! variants {
    ($(($method:ident, $batch:literal, $name:literal)),* $(,)?) => {
        const VARIANTS: &[Variant] = &[$(Variant { method: Method::$method, batch: $batch }),*];
        const NAMES: &[&str] = &[$($name),*];
    };
}

// Smallest batches first: they take the most steps, and lanes start them first.
variants![
    (Bn, 2, "bn-b2"),
    (Renorm, 2, "renorm-b2"),
    (Frozen, 2, "frozen-b2"),
    (NoBn, 2, "no-bn-b2"),
    (Bn, 4, "bn-b4"),
    (Renorm, 4, "renorm-b4"),
    (Frozen, 4, "frozen-b4"),
    (NoBn, 4, "no-bn-b4"),
    (Bn, 8, "bn-b8"),
    (Renorm, 8, "renorm-b8"),
    (Frozen, 8, "frozen-b8"),
    (NoBn, 8, "no-bn-b8"),
    (Bn, 16, "bn-b16"),
    (Renorm, 16, "renorm-b16"),
    (Ghost4, 16, "ghost4-b16"),
    (Frozen, 16, "frozen-b16"),
    (NoBn, 16, "no-bn-b16"),
    (Bn, 64, "bn-b64"),
    (Renorm, 64, "renorm-b64"),
    (Ghost4, 64, "ghost4-b64"),
    (Ghost16, 64, "ghost16-b64"),
    (Frozen, 64, "frozen-b64"),
    (NoBn, 64, "no-bn-b64"),
];

impl driver::Variant for Variant {
    const ALL: &'static [Variant] = VARIANTS;

    fn name(self) -> &'static str {
        let i = VARIANTS.iter().position(|&v| v == self);
        // Every Variant value the program holds comes from VARIANTS (fields are checked on parse).
        i.map_or("unknown", |i| NAMES[i])
    }
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Variant::from_name(s).ok_or_else(|| format!("unknown variant `{s}` (expected one of {})", NAMES.join(", ")))
    }
}

impl Serialize for Variant {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Variant {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let name = String::deserialize(de)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// How mini-batches are drawn (`--batches`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BatchMode {
    /// Shuffled epochs ([`EpochShuffler`]): i.i.d. batches, the same example order at every size.
    Iid,
    /// Each batch from `--classes-per-batch` classes only ([`ClassGroupedBatches`]).
    Grouped,
}

/// The study's own settings (beside [`CommonSettings`] in [`Settings`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmallBatchSettings {
    /// The networks to train, the reference steps over which the learning rate halves, the
    /// channels of the two conv layers.
    #[serde(flatten)]
    pub study: StudySettings<Variant>,
    /// How mini-batches are drawn.
    pub batches: BatchMode,
    /// Classes per batch with `grouped` batches.
    pub classes_per_batch: usize,
    /// Reference steps of plain batch norm before the `frozen` variants freeze.
    pub freeze_after: u64,
    /// Width of the hidden linear layer.
    pub hidden: usize,
    /// SGD momentum.
    pub momentum: f32,
    /// L2 weight decay (on conv and linear weights).
    pub weight_decay: f32,
}

/// Everything that defines a study.
pub type Settings = driver::Settings<SmallBatchSettings>;

/// The default of `--freeze-after` for a run of `steps` reference steps: the frozen variants
/// freeze after a quarter of the run (the rate halves every third: [`default_half_life`]).
pub fn default_freeze_after(steps: u64) -> u64 {
    steps / 4
}

impl Preset for SmallBatchSettings {
    /// At the reference batch of 64: 1500 steps (96,000 examples, 1.6 epochs) at rate 0.02,
    /// evaluated every 300.
    const DEFAULTS: Defaults = Defaults::new(1500, 300, 64, 0.02);
    /// 8 reference steps, evaluations every 4, 2 population batches, a tiny net (channels 2, 4;
    /// hidden 16: [`Preset::quick_own`]).
    const QUICK: QuickPreset = QuickPreset::new(8, 4, 2, [2, 4]);

    /// A hidden layer of 16, freezing after a quarter of the quick run.
    fn quick_own(&mut self) {
        self.hidden = 16;
        self.freeze_after = default_freeze_after(Self::QUICK.steps);
    }

    fn study(&mut self) -> &mut StudySettings<Variant> {
        &mut self.study
    }

    fn defaults() -> Self {
        SmallBatchSettings {
            study: StudySettings::new([8, 16], Self::DEFAULTS.steps),
            batches: BatchMode::Iid,
            classes_per_batch: 2,
            freeze_after: default_freeze_after(Self::DEFAULTS.steps),
            hidden: 100,
            momentum: 0.9,
            weight_decay: 1e-4,
        }
    }
}

impl Settings {
    /// k = `--batch` / B: how many of `variant`'s steps make one reference step.
    pub fn steps_per_reference_step(&self, variant: Variant) -> u64 {
        (self.common.batch / variant.batch) as u64
    }

    /// The learning rate of `variant` at its step `step` (0-based): linear in the batch size,
    /// halving every `half_life` reference steps.
    pub fn lr_at(&self, variant: Variant, step: u64) -> f64 {
        let k = self.steps_per_reference_step(variant);
        let base = self.common.lr * variant.batch as f64 / self.common.batch as f64;
        LrSchedule::Exponential {
            every: self.experiment.study.half_life * k,
            rate: 0.5,
            speedup: 1.0,
        }
        .lr(base, step)
    }

    /// The engine's batch-norm variant of `variant`'s normalization layers: frozen after
    /// `freeze_after` reference steps; renorm on the paper's schedule scaled to the variant's
    /// steps T (the paper's 5k warm-up, r_max reaching 3 at 40k and d_max reaching 5 at 25k, with
    /// 40k = T/2: (1, 0) for T/16 steps, then r_max ramping over 7T/16 and d_max over T/4),
    /// moving statistics with α = 0.01; plain batch norm otherwise (ghost: plain with a virtual
    /// batch).
    pub fn bn_variant(&self, variant: Variant) -> Result<BnVariant> {
        let k = self.steps_per_reference_step(variant);
        let steps = self.common.steps * k;
        Ok(match variant.method {
            Method::Frozen => BnVariant::Frozen {
                after: self.experiment.freeze_after * k,
            },
            Method::Renorm => BnVariant::Renorm {
                momentum: RENORM_MOMENTUM,
                limits: RenormSchedule::new(steps / 16, steps * 7 / 16, steps / 4, 3.0, 5.0)?,
            },
            _ => BnVariant::Plain,
        })
    }

    /// The conv net of every variant (the normalization aside).
    pub fn conv_net(&self) -> ConvNet {
        ConvNet {
            channels: self.experiment.study.channels,
            hidden: self.experiment.hidden,
            sigmoid: false,
            dropout: None,
            lrn: false,
        }
    }
}

impl ExperimentSettings for SmallBatchSettings {
    type Variant = Variant;

    /// With the common settings, for the batch-size rules.
    fn check(&self, common: &CommonSettings) -> Result<()> {
        self.study.check()?;
        ensure!(
            self.freeze_after < common.steps,
            "--freeze-after must be below --steps (the frozen variants would never freeze)"
        );
        ensure!(self.classes_per_batch > 0, "--classes-per-batch must be > 0");
        check_training(self.momentum, self.weight_decay, self.study.channels, self.hidden)?;
        for v in &self.study.variants {
            ensure!(
                v.batch <= common.batch && common.batch.is_multiple_of(v.batch),
                "variant `{}`: its batch of {} must divide the reference --batch {}",
                v.name(),
                v.batch,
                common.batch
            );
        }
        Ok(())
    }

    fn variants(&self) -> &[Variant] {
        &self.study.variants
    }
}

/// One line of `metrics.jsonl`: the variant's name, and its `test_acc` with the run's
/// `bn_stats` (Algorithm 2's population statistics by default).
pub type Metric = StudyLine<String, BatchFields>;

/// The study's own fields of a line of `metrics.jsonl` ([`Metric`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchFields {
    /// The variant's method.
    pub method: String,
    /// Its mini-batch size.
    pub batch: usize,
    /// Training examples seen (`step · batch`).
    pub examples: u64,
    /// Test accuracy with the running averages (`None` without batch norm, with `bn_stats`
    /// `running`, and when diverged).
    pub running_test_acc: Option<f64>,
}

impl Metric {
    /// The line of `variant`'s evaluation `eval`, or with `None` of its divergence at `step`.
    fn new(s: &Settings, variant: Variant, step: u64, eval: Option<&Evaluation>) -> Metric {
        let lr = s.lr_at(variant, step - 1);
        Metric {
            variant: variant.name().into(),
            step,
            test_acc: eval.map(|e| e.test_acc),
            own: BatchFields {
                method: variant.method.name().into(),
                batch: variant.batch,
                examples: step * variant.batch as u64,
                running_test_acc: eval.and_then(|e| e.running_test_acc),
            },
            training: match eval {
                Some(e) => TrainingStatus::evaluated(e.train_loss, lr),
                None => TrainingStatus::diverged(lr),
            },
        }
    }
}

/// One cell of the table: a variant's last evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    /// Variant name.
    pub variant: String,
    /// Method name.
    pub method: String,
    /// Mini-batch size.
    pub batch: usize,
    /// Final test accuracy with population statistics (`None`: diverged before any evaluation).
    pub test_acc: Option<f64>,
    /// Final test accuracy with the running averages.
    pub running_test_acc: Option<f64>,
    /// The step at which training diverged, if it did.
    pub diverged_at: Option<u64>,
}

/// The study's table: final test accuracy per batch size × method, for one batch mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    /// How the batches were drawn (`iid` or `grouped`).
    pub batches: BatchMode,
    /// Classes per batch (with `grouped`).
    pub classes_per_batch: Option<usize>,
    /// Examples every variant saw.
    pub examples: u64,
    /// One cell per variant, in the run's order.
    pub cells: Vec<Cell>,
}

/// The table of a run of `variants` from its metrics (each variant's lines in step order).
pub fn table(s: &Settings, variants: &[Variant], metrics: &[Metric]) -> Table {
    let cells = variants
        .iter()
        .map(|v| {
            let mine = || metrics.iter().filter(|m| m.variant == v.name());
            let last = mine().rfind(|m| !m.training.diverged);
            Cell {
                variant: v.name().to_string(),
                method: v.method.name().to_string(),
                batch: v.batch,
                test_acc: last.and_then(|m| m.test_acc),
                running_test_acc: last.and_then(|m| m.own.running_test_acc),
                diverged_at: mine().find(|m| m.training.diverged).map(|m| m.step),
            }
        })
        .collect();
    Table {
        batches: s.experiment.batches,
        classes_per_batch: (s.experiment.batches == BatchMode::Grouped).then_some(s.experiment.classes_per_batch),
        examples: s.common.steps * s.common.batch as u64,
        cells,
    }
}

impl Table {
    /// The batch sizes and methods present, in study order.
    fn axes(&self) -> (Vec<usize>, Vec<Method>) {
        let sizes = SIZES
            .into_iter()
            .filter(|b| self.cells.iter().any(|c| c.batch == *b))
            .collect();
        let methods = (Method::ALL.into_iter())
            .filter(|m| self.cells.iter().any(|c| c.method == m.name()))
            .collect();
        (sizes, methods)
    }

    /// The cell of `method` at `batch`, if it ran.
    fn cell(&self, method: Method, batch: usize) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.method == method.name() && c.batch == batch)
    }

    /// The table's rows as display cells: a row per method, a column per batch size, each cell
    /// "population / running" accuracy (or where it diverged).
    pub fn display_rows(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let (sizes, methods) = self.axes();
        let mut header = vec!["method".to_string()];
        header.extend(sizes.iter().map(|b| format!("batch {b}")));
        let rows = methods
            .iter()
            .map(|&m| {
                let mut row = vec![m.name().to_string()];
                row.extend(sizes.iter().map(|&b| match self.cell(m, b) {
                    None => String::new(),
                    Some(Cell {
                        diverged_at: Some(step),
                        ..
                    }) => format!("diverged at step {step}"),
                    Some(c) if m == Method::NoBn => percent(c.test_acc),
                    Some(c) => format!("{} / {}", percent(c.test_acc), percent(c.running_test_acc)),
                }));
                row
            })
            .collect();
        (header, rows)
    }

    /// The batch mode in words.
    pub fn mode_text(&self) -> String {
        match self.classes_per_batch {
            Some(k) => format!("grouped batches (each from {k} classes)"),
            None => "i.i.d. batches".into(),
        }
    }

    /// The table as Markdown (what `table.md` holds).
    pub fn markdown(&self) -> String {
        let (header, rows) = self.display_rows();
        format!(
            "Final test accuracy, {}, {} examples seen per variant; population statistics / running averages.\n\n{}",
            self.mode_text(),
            self.examples,
            markdown_table(&header, &rows)
        )
    }
}

impl Experiment for SmallBatch {
    type Settings = SmallBatchSettings;
    type Metric = Metric;
    const NAME: &'static str = "small-batch";

    fn memory_estimate(&self, s: &Settings, data: &Data) -> (u64, &'static str) {
        let net = s.conv_net();
        let (rows, cols) = (data.train.rows, data.train.cols);
        let batch = s.experiment.study.variants.iter().map(|v| v.batch).max().unwrap_or(1);
        (
            net.memory_estimate(rows, cols, data.classes, batch, driver::EVAL_CHUNK),
            "--channels, --hidden or --batch (or --threads: fewer variants at once)",
        )
    }

    /// The reference budget in the variant's own steps (see the module docs).
    fn variant_settings(&self, s: &Settings, variant: Variant) -> CommonSettings {
        let k = s.steps_per_reference_step(variant);
        let mut c = s.common.clone();
        c.batch = variant.batch;
        c.steps *= k;
        c.eval_every *= k;
        c.checkpoint_every = c.checkpoint_every.map(|n| n * k);
        c.population_batches *= k as usize;
        c
    }

    fn batch_order(&self, s: &Settings, c: &CommonSettings, _v: Variant, data: &Data) -> Result<Box<dyn BatchOrder>> {
        Ok(match s.experiment.batches {
            BatchMode::Iid => Box::new(EpochShuffler::new(data.train.len, c.batch, c.seed)?),
            BatchMode::Grouped => Box::new(ClassGroupedBatches::new(
                &data.train.labels[..data.train.len],
                c.batch,
                s.experiment.classes_per_batch,
                c.seed,
            )?),
        })
    }

    fn evaluate_running_too(&self, _s: &Settings) -> bool {
        true
    }

    fn build(&self, s: &Settings, variant: Variant, data: &Data, _rank: usize) -> Result<Built> {
        let config = s.common.bn_config();
        let bn = s.bn_variant(variant)?;
        let norm = |channels: usize, spatial: usize| -> Result<BatchNormLayer> {
            let config = BatchNormConfig {
                virtual_batch: variant.method.virtual_batch(),
                ..config
            };
            BatchNormLayer::with_variant(channels, spatial, config, bn)
        };
        let norm: Norm<'_> = (variant.method != Method::NoBn).then_some(&norm);
        let net = s.conv_net().build(
            data.train.rows,
            data.train.cols,
            data.classes,
            s.common.seed,
            norm,
            |_| 0,
        )?;
        Ok(Built { net, monitor: None })
    }

    fn optimizer(&self, s: &Settings, _variant: Variant) -> Sgd {
        Sgd::new(s.experiment.momentum, s.experiment.weight_decay)
    }

    fn lr(&self, s: &Settings, variant: Variant, step: u64) -> f64 {
        s.lr_at(variant, step)
    }

    fn metric(&self, s: &Settings, variant: Variant, eval: &Evaluation) -> Result<Metric> {
        Ok(Metric::new(s, variant, eval.step, Some(eval)))
    }

    fn diverged_line(&self, s: &Settings, variant: Variant, step: u64) -> Option<Metric> {
        Some(Metric::new(s, variant, step, None))
    }

    fn finish(&self, s: &Settings, o: &Outcome<Metric>) -> Result<Option<RunTable>> {
        let table = table(s, &s.experiment.study.variants, &o.metrics);
        write_outputs(s, o, &table)?;
        Ok(Some(RunTable::new(&table, table.markdown())?))
    }
}

impl Study for SmallBatch {
    const HELP: StudyHelp = StudyHelp {
        variants: "Variants to train, comma-separated, each METHOD-bB (methods bn, renorm, ghost4, ghost16, frozen, \
                   no-bn; e.g. bn-b2, ghost4-b64; default: all 23)",
        half_life: "Reference steps over which the learning rate halves (default: steps / 3)",
        channels: "Output channels of the two conv layers, `C1,C2` (default 8,16; 2,4 with --quick)",
        quick: "A short run for CI: 8 reference steps, evaluations every 4, a tiny net (2, 4 channels, 16 hidden), 2 \
                population batches (each can still be set by its flag)",
    };
}

/// Writes the plots and report.html.
fn write_outputs(s: &Settings, o: &Outcome<Metric>, table: &Table) -> Result<()> {
    let (c, e, out) = (&s.common, &s.experiment, &s.common.out);
    // Final accuracy against batch size, one line per method.
    let (sizes, methods) = table.axes();
    let by_size = |pick: fn(&Cell) -> Option<f64>| -> Vec<Series> {
        (methods.iter())
            .map(|&m| {
                let points = (sizes.iter())
                    .filter_map(|&b| table.cell(m, b).and_then(pick).map(|a| ((b as f64).log2(), a)))
                    .collect();
                Series::new(m.name(), points)
            })
            .filter(|series| !series.points.is_empty())
            .collect()
    };
    let mut figures = Vec::new();
    let plots: [(&str, &str, fn(&Cell) -> Option<f64>); 2] = [
        (
            "accuracy-vs-batch",
            "Final test accuracy against batch size (population statistics)",
            |c| c.test_acc,
        ),
        (
            "running-accuracy-vs-batch",
            "Final test accuracy against batch size (running averages)",
            |c| c.running_test_acc,
        ),
    ];
    for (stem, title, pick) in plots {
        let plot = LinePlot {
            labels: PlotLabels::new(title, "log2 of the batch size", "test accuracy"),
            series: &by_size(pick),
            y_range: Some((0.0, 1.0)),
        };
        figures.push((title.to_string(), report::write_line_plot(out, stem, &plot)?));
    }
    // Training curves per batch size: accuracy against examples seen, one line per method.
    for &b in &sizes {
        let series: Vec<Series> = (e.study.variants.iter())
            .filter(|v| v.batch == b)
            .map(|v| {
                let points = (o.metrics.iter())
                    .filter(|m| m.variant == v.name())
                    .filter_map(|m| m.test_acc.map(|a| (m.own.examples as f64, a)))
                    .collect();
                Series::new(v.method.name(), points)
            })
            .collect();
        let title = format!("Test accuracy during training, batch {b}");
        let plot = LinePlot {
            labels: PlotLabels::new(
                &title,
                "training examples seen",
                "test accuracy (population statistics)",
            ),
            series: &series,
            y_range: Some((0.0, 1.0)),
        };
        let svg = report::write_line_plot(out, &format!("curves-b{b}"), &plot)?;
        figures.push((title, svg));
    }

    let mut page = Page::new("Small and non-i.i.d. mini-batches");
    page.paragraph(&format!(
        "The conv net of the accelerate study (conv 5×5 {c1} → pool → conv 5×5 {c2} → pool → linear {h} → \
         linear, ReLU, no dropout) trained with SGD (momentum {m}) at batch sizes {sizes:?} on {mode}, every \
         variant seeing the same {examples} examples, the learning rate linear in the batch size ({lr} at batch \
         {b}). Each cell gives the final test accuracy with Algorithm 2's population statistics / with the \
         running averages.",
        c1 = e.study.channels[0],
        c2 = e.study.channels[1],
        h = e.hidden,
        m = e.momentum,
        mode = table.mode_text(),
        examples = table.examples,
        lr = c.lr,
        b = c.batch,
    ));
    let table = ("Final test accuracy (population / running)", table.display_rows());
    driver::finish_study_report(page, s, table, &e.study.variants, o, &figures)
}
