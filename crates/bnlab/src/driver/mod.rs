//! The run driver: one owner of every experiment's run, from start to summary.
//!
//! An experiment ([`Experiment`]) is its settings (which name its variants:
//! [`ExperimentSettings`]), how to build a variant's network and optimizer, what a metrics line
//! holds, and what it writes at the end. Everything else is the driver's, the same for every
//! experiment:
//!
//! - **start and resume** ([`run`]): settings checked, data loaded and checked against the
//!   networks, `settings.json` written (a fresh run) or each variant's checkpoint found and
//!   checked to belong to this run (a resumed run: [`resume`]), `metrics.jsonl` cut back to what
//!   the checkpoints cover;
//! - **training** ([`train`]): one loop for every experiment: SGD steps (in one process, or as
//!   one rank of data-parallel training, [`crate::parallel`]), evaluations every `eval_every`
//!   steps and after the last ([`evaluate`]: Algorithm 2's population statistics or the running
//!   averages), checkpoints every `checkpoint_every` steps and after the last, divergence handled
//!   as the experiment says ([`Divergence`]);
//! - **lanes** ([`lanes`]): with one process and two or more threads, variants train side by side,
//!   each on its share of the run's threads; a failing variant stops the others;
//! - **outputs**: `metrics.jsonl` (put in variant and step order at the end), `summary.json`,
//!   then the experiment's own files (plots, `report.html`) and its table, if it makes one
//!   ([`RunTable`]: `table.json`, `table.md`).
//!
//! Results do not depend on the number of threads or lanes: the kernels and the matrix products
//! split work by shape only, so a run gives the same metrics, bit for bit, on any thread count.

pub mod evaluate;
pub mod lanes;
pub mod metrics;
pub mod progress;
pub mod resume;
pub mod rundir;
pub mod settings;
pub mod train;

pub use evaluate::{BatchPrep, Gathered, Pass, Probe, EVAL_CHUNK};
pub use metrics::{MetricLine, RunColumn, StudyLine, TrainingStatus};
pub use progress::Progress;
pub use settings::{BnMomentum, BnStats, CommonSettings, Defaults, ExperimentSettings, Settings};

use crate::data::{self, BatchOrder, Dataset, EpochShuffler};
use crate::engine::checkpoint::Checkpoint;
use crate::engine::{Sequential, Sgd};
use crate::monitor::{self, Monitor};
use crate::parallel::{self, DataParallel};
use crate::report::Page;
use anyhow::{bail, ensure, Context, Result};
use batchnorm::Communicator;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A variant of an experiment: one network and recipe it trains.
pub trait Variant: Copy + PartialEq + Debug + Send + Sync + 'static {
    /// Every variant, in the experiment's order.
    const ALL: &'static [Self];
    /// The name in flags, files and reports.
    fn name(self) -> &'static str;
    /// The variant called `name`, if any.
    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == name)
    }
}

/// What a variant does when its training loss stops being finite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Divergence {
    /// The run fails with an error that names the variant, the step and the last good checkpoint.
    Fail,
    /// The variant stops and its metrics get [`Experiment::diverged_line`]; the others go on.
    Record,
}

/// A training and test set, and the class count of the networks that learn them.
pub struct Data {
    /// The training split.
    pub train: Dataset,
    /// The test split.
    pub test: Dataset,
    /// Output classes of the networks.
    pub classes: usize,
}

impl Data {
    /// Reads the train and test splits of the IDX directory `dir` for networks with `classes`
    /// outputs. Rejects what [`data::load_with_classes`] rejects: among others a label outside
    /// `0..classes` and an empty split.
    pub fn load(dir: &Path, classes: usize) -> Result<Data> {
        let (train, test) = data::load_with_classes(dir, classes)?;
        Ok(Data { train, test, classes })
    }
}

impl Data {
    /// What identifies the data a run trains on: each split's example count and a CRC-32 of its
    /// pixels and labels. Recorded in `settings.json`; a resumed run refuses other data (a copy
    /// of the same data elsewhere is the same data).
    pub fn identity(&self) -> DataIdentity {
        let split = |d: &Dataset| {
            let mut h = crc32fast::Hasher::new();
            h.update(&d.pixels);
            h.update(&d.labels);
            SplitIdentity {
                examples: d.len,
                crc32: h.finalize(),
            }
        };
        DataIdentity {
            train: split(&self.train),
            test: split(&self.test),
        }
    }
}

/// See [`Data::identity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DataIdentity {
    /// The training split.
    pub train: SplitIdentity,
    /// The test split.
    pub test: SplitIdentity,
}

/// One split's part of a [`DataIdentity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SplitIdentity {
    /// Examples.
    pub examples: usize,
    /// CRC-32 of the pixels, then the labels.
    pub crc32: u32,
}

/// A network built for a variant, with what evaluation watches in it.
pub struct Built {
    /// The network.
    pub net: Sequential,
    /// A monitor of one of its layers, fed every test chunk of condition 0 at each evaluation
    /// ([`Evaluation::watched`]); `None`: nothing watched.
    pub monitor: Option<Monitor>,
}

/// One evaluation of a variant, as the driver measured it.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Training steps done.
    pub step: u64,
    /// Test-set accuracy (with the statistics the run's `bn_stats` names), under test condition 0.
    pub test_acc: f64,
    /// Test-set accuracy under each test condition ([`Experiment::test_conditions`]), in order:
    /// `[test_acc]` for an experiment with one.
    pub condition_test_acc: Vec<f64>,
    /// Test-set accuracy with the running statistics, when the run evaluates with population
    /// statistics and the experiment asks for both ([`Experiment::evaluate_running_too`]).
    pub running_test_acc: Option<f64>,
    /// Mean training loss over the steps since the previous evaluation.
    pub train_loss: f64,
    /// What the variant's monitor ([`Built::monitor`]) saw over the test set (`None` without one).
    pub watched: Option<monitor::Summary>,
}

/// The variant type of experiment `E` (its settings': [`ExperimentSettings::Variant`]).
pub type VariantOf<E> = <<E as Experiment>::Settings as ExperimentSettings>::Variant;

/// A table an experiment makes of a finished run ([`Experiment::finish`]): the driver writes it
/// into the run's folder as `table.json` and `table.md`, and the command line prints the Markdown.
#[derive(Debug, Clone, PartialEq)]
pub struct RunTable {
    /// `table.json`: the table as pretty JSON.
    pub json: String,
    /// `table.md`: the table as Markdown.
    pub markdown: String,
}

impl RunTable {
    /// The files of `table` and its Markdown `markdown`. Rejects a table that does not serialize.
    pub fn new(table: &impl Serialize, markdown: String) -> Result<RunTable> {
        let json = serde_json::to_string_pretty(table)?;
        Ok(RunTable { json, markdown })
    }
}

/// An experiment of the lab: its settings, variants, networks and outputs. The driver ([`run`])
/// does the rest.
pub trait Experiment: Sync {
    /// The name on the command line, in checkpoints and in default output folders.
    const NAME: &'static str;
    /// Output classes of its networks (labels outside `0..CLASSES` are an error); ten, as in
    /// every MNIST-format data set, unless the experiment says otherwise.
    const CLASSES: usize = 10;
    /// The experiment's own settings, beside [`CommonSettings`] in [`Settings`]: they name its
    /// variants, the ones the run trains and how the experiment's settings are checked.
    type Settings: ExperimentSettings;
    /// A line of its `metrics.jsonl`.
    type Metric: MetricLine;

    /// An upper estimate of the bytes one variant's training and evaluation allocate (network,
    /// optimizer state, step and evaluation buffers, what its monitor records; not the data) on
    /// `data`, and the flags that make it smaller. The driver refuses a run whose estimate (times
    /// the variants training at once, plus the data) exceeds the memory available, before
    /// building any network.
    fn memory_estimate(&self, s: &Settings<Self::Settings>, data: &Data) -> (u64, &'static str);

    /// The network of `variant` for the images of `data`, as data-parallel rank `rank` builds it
    /// (every rank the same initial weights; rank 0's is the one-process network).
    fn build(&self, s: &Settings<Self::Settings>, variant: VariantOf<Self>, data: &Data, rank: usize) -> Result<Built>;

    /// The common settings `variant` trains with: the run's own by default. An experiment whose
    /// variants differ in batch size, step count or evaluation schedule (e.g. the same number of
    /// examples seen at every batch size) returns each variant's here; the driver trains,
    /// evaluates (population statistics over batches of the variant's size), checkpoints and
    /// resumes each variant by its own. The settings must pass [`CommonSettings::check`].
    fn variant_settings(&self, s: &Settings<Self::Settings>, _variant: VariantOf<Self>) -> CommonSettings {
        s.common.clone()
    }

    /// The batches `variant` trains on, with `c` its settings ([`Experiment::variant_settings`]):
    /// by default an [`EpochShuffler`] over the training set in batches of `c.batch`, drawn from
    /// `c.seed`.
    fn batch_order(
        &self,
        _s: &Settings<Self::Settings>,
        c: &CommonSettings,
        _variant: VariantOf<Self>,
        data: &Data,
    ) -> Result<Box<dyn BatchOrder>> {
        Ok(Box::new(EpochShuffler::new(data.train.len, c.batch, c.seed)?))
    }

    /// Called on every batch the driver gathers ([`Gathered`]: what the pass is for, the split and
    /// the examples' indices; with data-parallel training, this rank's shard), after its examples
    /// are in `x` (`[batch, features]`, as [`data::gather`] writes them) and before `net`'s
    /// forward pass: the experiment may rewrite `x` in place and set what the network's layers need
    /// to know about the batch (e.g. the padding mask they share, [`Sequential::set_mask`]). What
    /// it does must follow from its arguments alone: a resumed run, `bnlab eval` and every rank
    /// call it on their own. Nothing by default.
    fn prepare_batch(
        &self,
        _s: &Settings<Self::Settings>,
        _variant: VariantOf<Self>,
        _batch: Gathered<'_>,
        _x: &mut [f32],
        _net: &mut Sequential,
    ) -> Result<()> {
        Ok(())
    }

    /// How many test conditions each evaluation measures: the test set is evaluated once per
    /// condition (with the same inference statistics), [`Experiment::prepare_batch`] told which
    /// by [`Pass::Test`]; the accuracies are [`Evaluation::condition_test_acc`]. One by default
    /// (0 counts as 1).
    fn test_conditions(&self, _s: &Settings<Self::Settings>) -> usize {
        1
    }

    /// Whether evaluations with population statistics also measure the accuracy with the running
    /// statistics ([`Evaluation::running_test_acc`], under test condition 0). No by default.
    fn evaluate_running_too(&self, _s: &Settings<Self::Settings>) -> bool {
        false
    }

    /// The optimizer of `variant`.
    fn optimizer(&self, s: &Settings<Self::Settings>, variant: VariantOf<Self>) -> Sgd;

    /// The learning rate of `variant` at 0-based `step` (the rate of that step's update).
    fn lr(&self, s: &Settings<Self::Settings>, variant: VariantOf<Self>, step: u64) -> f64;

    /// What a variant does when its loss stops being finite: by default [`Divergence::Record`]
    /// (the variant stops, the others go on).
    fn divergence(&self) -> Divergence {
        Divergence::Record
    }

    /// The metrics line of an evaluation of `variant`. Rejects an evaluation without what the
    /// line records (e.g. [`Evaluation::watched`] of a variant built with a monitor).
    fn metric(&self, s: &Settings<Self::Settings>, variant: VariantOf<Self>, eval: &Evaluation)
        -> Result<Self::Metric>;

    /// The metrics line of a variant that diverged at `step` ([`Divergence::Record`] only).
    fn diverged_line(&self, s: &Settings<Self::Settings>, variant: VariantOf<Self>, step: u64) -> Option<Self::Metric>;

    /// Adjusts a network just restored from `checkpoint` (written by rank 0 of a run of
    /// `writer_processes` processes) to this rank of this run. Nothing by default.
    fn after_restore(
        &self,
        _s: &Settings<Self::Settings>,
        _net: &mut Sequential,
        _writer_processes: usize,
        _dp: &DataParallel,
    ) -> Result<()> {
        Ok(())
    }

    /// Writes the experiment's own outputs of a finished run into `s.common.out` (plots,
    /// `report.html`) and returns its table, if it makes one (the driver writes it: [`RunTable`]).
    fn finish(&self, s: &Settings<Self::Settings>, outcome: &Outcome<Self::Metric>) -> Result<Option<RunTable>>;
}

/// The result of one variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantSummary {
    /// Test accuracy at the last evaluation (`None` if there was none).
    pub final_test_acc: Option<f64>,
    /// Best test accuracy over evaluations.
    pub best_test_acc: Option<f64>,
    /// Wall-clock seconds of the whole run (training and evaluations; every session of a resumed
    /// run).
    pub seconds: f64,
    /// Milliseconds per training step (training steps only; with variants side by side, on this
    /// variant's share of the threads).
    pub ms_per_step: f64,
    /// Steps trained.
    pub steps: u64,
    /// The step at which the training loss became non-finite, if it did.
    pub diverged_at: Option<u64>,
    /// Collective calls per training step of rank 0 (0 with one process).
    pub collective_calls_per_step: f64,
    /// Bytes rank 0 sent per training step (received: `processes` times as many).
    pub bytes_sent_per_step: f64,
}

/// Everything a run produced (on rank 0; other ranks of a data-parallel run get no metrics).
#[derive(Debug, Clone)]
pub struct Outcome<M> {
    /// All evaluations, variants in order, each variant's in step order.
    pub metrics: Vec<M>,
    /// Per variant, by name.
    pub summaries: BTreeMap<&'static str, VariantSummary>,
}

/// A run's result: what every experiment produces and the experiment's own report.
pub struct Finished<E: Experiment> {
    /// The settings the run trained with (on resume: the run's own).
    pub settings: Settings<E::Settings>,
    /// Metrics and summaries.
    pub outcome: Outcome<E::Metric>,
    /// The experiment's table (`None` without one, and on data-parallel ranks other than 0).
    pub table: Option<RunTable>,
}

/// How a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run into `out` (an existing `metrics.jsonl` there is replaced).
    Fresh,
    /// Continues the run in `out` from its checkpoints: every variant restarts from its checkpoint
    /// (a finished one is not retrained, one without a checkpoint starts afresh) and all outputs
    /// are written as an uninterrupted run would.
    Resume,
}

/// How the driver runs: not part of the settings.
pub struct RunOptions {
    /// A fresh run or a resumed one.
    pub start: Start,
    /// A fresh run into a directory that holds a run replaces it (its files are removed first)
    /// instead of being refused.
    pub overwrite: bool,
    /// No progress bars or log lines.
    pub quiet: bool,
    /// The ranks of data-parallel training ([`batchnorm::SingleProcess`] for one process).
    pub comm: Arc<dyn Communicator>,
}

impl RunOptions {
    /// A fresh run in one process, quiet or not.
    pub fn fresh(quiet: bool) -> Self {
        RunOptions {
            start: Start::Fresh,
            overwrite: false,
            quiet,
            comm: Arc::new(batchnorm::SingleProcess),
        }
    }

    /// A resumed run in one process.
    pub fn resume(quiet: bool) -> Self {
        RunOptions {
            start: Start::Resume,
            ..RunOptions::fresh(quiet)
        }
    }
}

/// The settings of the run of `experiment` in `dir` (its `settings.json`, with `out` = `dir`).
/// Rejects a directory without a readable, valid `settings.json`.
pub fn resume_settings<E: Experiment>(dir: &Path) -> Result<Settings<E::Settings>> {
    let article = if E::NAME.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    settings::read_settings(dir, &format!("{article} {} run", E::NAME))
}

/// Runs `experiment` with `settings` on `settings.common.threads` threads: trains every variant
/// (side by side where threads allow, see [`lanes`]), writes `settings.json`, `metrics.jsonl`,
/// checkpoints, `summary.json` and the experiment's outputs into `settings.common.out` (rank 0
/// only, holding the directory's lock: see [`rundir`]), and returns what the run produced. With
/// several ranks in `opts.comm`, every rank trains on its shard of each global batch and rank 0
/// alone evaluates, shows progress and writes files.
///
/// Rejects, before training: settings that cannot run ([`CommonSettings::check`],
/// [`ExperimentSettings::check`], a repeated variant, a batch that does not split over the ranks); an
/// output directory another run holds, one that already holds a run (a fresh run without
/// `opts.overwrite`) or that cannot be written; data that cannot be read or does not fit the
/// networks; a run whose memory estimate exceeds the memory available; and on resume, data
/// other than the run's ([`Data::identity`]) and a checkpoint that belongs to another run (other
/// settings, another architecture) or is damaged.
pub fn run<E: Experiment>(experiment: &E, settings: &Settings<E::Settings>, opts: RunOptions) -> Result<Finished<E>> {
    let mut s = settings.clone();
    s.common.processes = opts.comm.size();
    let variants = check_settings(experiment, &s)?;
    let names: Vec<&'static str> = variants.iter().map(|v| v.name()).collect();
    let resuming = opts.start == Start::Resume;
    let data = Data::load(&s.common.data_dir, E::CLASSES)?;
    let identity = data.identity();
    match (resuming, s.common.data_identity) {
        (false, _) => s.common.data_identity = Some(identity),
        (true, Some(recorded)) => ensure!(
            recorded == identity,
            "{} holds other data than the run trained on ({} and {} examples, CRC-32 {:08x} and {:08x}; the run's: \
             {} and {} examples, CRC-32 {:08x} and {:08x})",
            s.common.data_dir.display(),
            identity.train.examples,
            identity.test.examples,
            identity.train.crc32,
            identity.test.crc32,
            recorded.train.examples,
            recorded.test.examples,
            recorded.train.crc32,
            recorded.test.crc32
        ),
        (true, None) => bail!("the run's settings.json does not record its data (data_identity)"),
    }
    check_memory(experiment, &s, &data, variants.len())?;
    for &v in &variants {
        ensure!(
            data.train.len >= experiment.variant_settings(&s, v).batch,
            "the training set has fewer examples than one batch"
        );
    }
    // The networks must fit the images before anything is written.
    experiment.build(&s, variants[0], &data, 0)?;
    // Rank 0 writes the directory, and holds it until the run ends.
    let _held = match opts.comm.rank() {
        0 => {
            let dir = rundir::RunDir::claim(&s.common.out)?;
            match resuming {
                true => dir.clean_stale()?,
                false => dir.prepare_fresh(opts.overwrite)?,
            }
            dir.check_writable(&names)?;
            Some(dir)
        }
        _ => None,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(s.common.threads)
        .build()
        .context("cannot start the worker threads")?;
    pool.install(|| execute(experiment, &s, &variants, &data, &opts))
        .map(|(outcome, table)| Finished {
            settings: s,
            outcome,
            table,
        })
}

/// Checks settings as the command line would (from flags, or read back from `settings.json`):
/// [`CommonSettings::check`], [`ExperimentSettings::check`], at least one variant and none twice, a batch
/// that splits over `s.common.processes` ranks. Returns the variants.
pub fn check_settings<E: Experiment>(experiment: &E, s: &Settings<E::Settings>) -> Result<Vec<VariantOf<E>>> {
    s.common.check()?;
    s.experiment.check(&s.common)?;
    let variants = s.experiment.variants().to_vec();
    ensure!(!variants.is_empty(), "no variant to train");
    ensure!(
        (1..variants.len()).all(|i| !variants[..i].contains(&variants[i])),
        "--variants lists a variant twice"
    );
    for &v in &variants {
        let c = experiment.variant_settings(s, v);
        if c != s.common {
            c.check()
                .with_context(|| format!("the settings of variant `{}`", v.name()))?;
        }
        parallel::check_split(c.batch, s.common.processes, c.bn_sync)?;
    }
    Ok(variants)
}

/// Refuses a run whose memory estimate exceeds the memory available (see
/// [`Experiment::memory_estimate`]).
fn check_memory<E: Experiment>(experiment: &E, s: &Settings<E::Settings>, data: &Data, variants: usize) -> Result<()> {
    let (per_variant, flags) = experiment.memory_estimate(s, data);
    let at_once = match s.common.processes {
        1 => variants.min(s.common.threads).max(1) as u64,
        _ => 1,
    };
    let data_bytes = (data.train.pixels.len() + data.test.pixels.len()) as u64;
    let need = per_variant.saturating_mul(at_once).saturating_add(data_bytes);
    let need = need.saturating_add(need / 4); // allocator slack
    let Some(available) = available_memory() else {
        return Ok(());
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    ensure!(
        need <= available,
        "this run needs about {:.1} GiB ({at_once} variant(s) at once) but {:.1} GiB of memory is available; lower {flags}",
        gib(need),
        gib(available)
    );
    Ok(())
}

/// The memory available to new allocations (`MemAvailable` of `/proc/meminfo`), if known.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

type Executed<E> = (Outcome<<E as Experiment>::Metric>, Option<RunTable>);

fn execute<E: Experiment>(
    experiment: &E,
    s: &Settings<E::Settings>,
    variants: &[VariantOf<E>],
    data: &Data,
    opts: &RunOptions,
) -> Result<Executed<E>> {
    let comm = opts.comm.as_ref();
    let root = comm.rank() == 0;
    let names: Vec<&'static str> = variants.iter().map(|v| v.name()).collect();
    let begun = resume::begin_run::<E::Metric>(s, E::NAME, &names, opts.start == Start::Resume, comm)?;
    let out = root.then_some(s.common.out.as_path());
    let steps: Vec<u64> = variants
        .iter()
        .map(|&v| experiment.variant_settings(s, v).steps)
        .collect();
    let (metrics, summaries) = lanes::train_variants(
        out,
        begun.kept,
        &names,
        &steps,
        s.common.threads,
        opts.quiet,
        comm.size(),
        |i, run| {
            let mut dp = DataParallel::new(opts.comm.clone());
            let start = begun.starts[i].as_ref();
            train::train_variant(experiment, s, variants[i], start, data, &mut dp, run)
        },
    )?;
    let outcome = Outcome { metrics, summaries };
    if !root {
        return Ok((outcome, None));
    }
    let summary = serde_json::json!({ "variants": outcome.summaries, "settings": s });
    metrics::write_json(&s.common.out.join("summary.json"), &summary)?;
    let table = experiment.finish(s, &outcome)?;
    if let Some(t) = &table {
        metrics::write_table(&s.common.out, t)?;
    }
    Ok((outcome, table))
}

/// The data-parallel mode of a run in words, for its report: `processes` ranks sharing global
/// batches of `batch`, batch norm over the global batch (`bn_sync`) or over each shard.
pub fn data_parallel_text(s: &CommonSettings) -> String {
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
        "Data-parallel training over {} MPI processes: each global batch of {} is split into \
         contiguous shards, gradients are summed over the processes; {bn}.",
        s.processes, s.batch
    )
}

/// Ends a study's report `page`: with data-parallel training a paragraph on it
/// ([`data_parallel_text`]), the study's `table` (title, then header and rows), the table of runs (steps,
/// time per step and seconds of each of `variants`, from `outcome`), the `figures` (caption and
/// SVG, in order) and the settings `s`; then writes it into the run's folder as `report.html`.
pub fn finish_study_report<T: Serialize, V: Variant, M>(
    mut page: Page,
    s: &Settings<T>,
    table: (&str, (Vec<String>, Vec<Vec<String>>)),
    variants: &[V],
    outcome: &Outcome<M>,
    figures: &[(String, String)],
) -> Result<()> {
    if s.common.processes > 1 {
        page.paragraph(&data_parallel_text(&s.common));
    }
    let (title, (header, rows)) = table;
    page.table(title, &header, &rows);
    let names = variants.iter().map(|v| (v.name(), v.name()));
    let columns = [RunColumn::Steps, RunColumn::MsPerStep, RunColumn::Seconds];
    let (header, rows) = metrics::runs_table(names, &outcome.summaries, &columns);
    page.table("Runs", &header, &rows);
    for (caption, svg) in figures {
        page.figure(caption, svg);
    }
    page.settings("Settings", &metrics::settings_rows(s));
    page.write(&s.common.out.join("report.html"))?;
    Ok(())
}

/// Where a run keeps the checkpoint of the variant named `variant`:
/// `OUT/checkpoints/<variant>.safetensors`.
pub fn checkpoint_path(out: &Path, variant: &str) -> PathBuf {
    out.join("checkpoints").join(format!("{variant}.safetensors"))
}

/// Reads a checkpoint file (for `bnlab eval` and the tests).
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    Checkpoint::read(path).with_context(|| format!("cannot load checkpoint {}", path.display()))
}
