//! Pieces every experiment shares: one SGD training step (in one process, or as one rank of
//! data-parallel training), evaluation with inference-mode batch norm (Algorithm 2's population
//! statistics or the running averages), the `metrics.jsonl` writer, the settings table of a
//! report and the default output folder.

use super::progress::Progress;
use crate::atomic::write_atomic;
use crate::data::{gather, Dataset, EpochShuffler};
use crate::dist::{self, DataParallel};
use crate::engine::checkpoint::{Checkpoint, Progress as TrainProgress};
use crate::engine::loss::argmax_rows;
use crate::engine::{Mode, Sequential, Sgd, SoftmaxCrossEntropy};
use anyhow::{ensure, Context, Result};
use indicatif::MultiProgress;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// Which statistics BN uses at evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BnStats {
    /// The running (momentum) averages kept during training.
    Running,
    /// Algorithm 2: population statistics over `population_batches` training batches, recomputed
    /// at each evaluation.
    Population,
}

/// How an evaluation sets up batch norm before measuring.
#[derive(Debug, Clone, Copy)]
pub struct EvalSettings {
    /// BN statistics at evaluation.
    pub bn_stats: BnStats,
    /// Training batches for Algorithm 2's estimate.
    pub population_batches: usize,
    /// Size of those batches (the training batch size).
    pub batch: usize,
    /// The run's seed (the population batches come from a shuffle with a derived seed).
    pub seed: u64,
}

/// What the command line and `bnlab eval` do alike with either experiment's settings
/// (`paper_mlp::Settings`, `accelerate::Settings`), so that one code path serves both.
pub trait ExperimentSettings: Sized + serde::de::DeserializeOwned {
    /// The settings of the run in `dir` (its `settings.json`), with `out` set to `dir`.
    fn resume_settings(dir: &Path) -> Result<Self>;
    /// The IDX directory the run reads.
    fn data_dir(&self) -> &Path;
    /// The same, to change it.
    fn data_dir_mut(&mut self) -> &mut PathBuf;
    /// Worker threads.
    fn threads_mut(&mut self) -> &mut usize;
    /// BN statistics at evaluation.
    fn bn_stats_mut(&mut self) -> &mut BnStats;
    /// Rejects settings that cannot run.
    fn check_settings(&self) -> Result<()>;
    /// How evaluations set up batch norm.
    fn evaluation(&self) -> EvalSettings;
}

/// Implements [`ExperimentSettings`] for an experiment's settings type, which has the fields
/// `data_dir`, `threads` and `bn_stats` and the methods `check` and `eval_settings`, in a module
/// with `resume_settings(dir)`: the accessors are the same for every experiment.
macro_rules! impl_experiment_settings {
    ($settings:ty) => {
        impl $crate::experiments::common::ExperimentSettings for $settings {
            fn resume_settings(dir: &::std::path::Path) -> ::anyhow::Result<Self> {
                resume_settings(dir)
            }
            fn data_dir(&self) -> &::std::path::Path {
                &self.data_dir
            }
            fn data_dir_mut(&mut self) -> &mut ::std::path::PathBuf {
                &mut self.data_dir
            }
            fn threads_mut(&mut self) -> &mut usize {
                &mut self.threads
            }
            fn bn_stats_mut(&mut self) -> &mut $crate::experiments::common::BnStats {
                &mut self.bn_stats
            }
            fn check_settings(&self) -> ::anyhow::Result<()> {
                self.check()
            }
            fn evaluation(&self) -> $crate::experiments::common::EvalSettings {
                self.eval_settings()
            }
        }
    };
}
pub(crate) use impl_experiment_settings;

/// Test examples per inference forward pass.
pub const EVAL_CHUNK: usize = 1000;

/// Scratch buffers of a training step: one batch `x [batch, features]`, `y [batch]` and
/// `dlogits [batch, classes]`.
pub struct StepBuffers {
    /// Inputs of the batch.
    pub x: Vec<f32>,
    /// Labels of the batch.
    pub y: Vec<u8>,
    /// ∂loss/∂logits.
    pub dlogits: Vec<f32>,
    loss: SoftmaxCrossEntropy,
}

impl StepBuffers {
    /// Buffers for batches of `batch` examples with `features` inputs and `classes` outputs.
    pub fn new(batch: usize, features: usize, classes: usize) -> Self {
        StepBuffers {
            x: vec![0.0; batch * features],
            y: vec![0; batch],
            dlogits: vec![0.0; batch * classes],
            loss: SoftmaxCrossEntropy::default(),
        }
    }
}

/// One SGD step on the batch of `step` from `shuffler`: forward in [`Mode::Train`], softmax
/// cross-entropy, backward, update with learning rate `lr`. Returns the batch loss; when it is not
/// finite, nothing is updated (the caller decides what divergence means).
pub fn train_step(
    net: &mut Sequential,
    sgd: &mut Sgd,
    train: &Dataset,
    shuffler: &mut EpochShuffler,
    step: u64,
    lr: f32,
    buf: &mut StepBuffers,
) -> Result<f32> {
    let batch = buf.y.len();
    let classes = net.output_size();
    gather(train, shuffler.batch_indices(step), &mut buf.x, &mut buf.y);
    let logits = net.forward(&buf.x, batch, Mode::Train)?;
    let loss = buf.loss.forward(logits, &buf.y, classes)?;
    if !loss.is_finite() {
        return Ok(loss);
    }
    buf.loss.backward(&buf.y, classes, &mut buf.dlogits);
    net.backward(&buf.dlogits)?;
    sgd.step(net.params(), lr);
    Ok(loss)
}

/// [`train_step`] as rank `dp.rank()` of `dp.size()` in data-parallel training (see
/// [`crate::dist`]): this rank gathers its contiguous shard ([`dist::shard`]) of the global batch
/// of `step`, runs forward, loss and backward with ∂loss/∂logits scaled by its share n_r/N, then
/// sums the gradients and loss shares over the ranks ([`DataParallel::all_reduce`]) and applies
/// the summed gradients ([`Sgd::step_with_grads`]: momentum and weight decay as in
/// [`Sgd::step`]). `buf` holds one shard (`buf.y.len()` = this rank's shard of the global batch).
///
/// Returns the global batch's loss, the same bits on every rank; when it is not finite nothing is
/// updated, on every rank (so all ranks stop at the same step). The backward runs before the
/// decision: with synchronized batch norm it is a collective that every rank must enter.
///
/// With one rank this is exactly [`train_step`] (no scaling, no collective, the same bits).
#[allow(clippy::too_many_arguments)]
pub fn train_step_parallel(
    net: &mut Sequential,
    sgd: &mut Sgd,
    train: &Dataset,
    shuffler: &mut EpochShuffler,
    step: u64,
    lr: f32,
    buf: &mut StepBuffers,
    dp: &mut DataParallel,
) -> Result<f32> {
    if dp.size() == 1 {
        return train_step(net, sgd, train, shuffler, step, lr, buf);
    }
    let classes = net.output_size();
    let indices = shuffler.batch_indices(step);
    let global = indices.len();
    let shard = dist::shard(global, dp.rank(), dp.size());
    let local = shard.len();
    ensure!(
        buf.y.len() == local,
        "step buffers for {} examples, but this rank's shard has {local}",
        buf.y.len()
    );
    gather(train, &indices[shard], &mut buf.x, &mut buf.y);
    let logits = net.forward(&buf.x, local, Mode::Train)?;
    let loss = buf.loss.forward(logits, &buf.y, classes)?;
    // The derivative of the global batch's mean loss through this shard; gradients and loss
    // shares are then summed over ranks.
    let share = local as f32 / global as f32;
    buf.loss.backward(&buf.y, classes, &mut buf.dlogits);
    buf.dlogits.iter_mut().for_each(|d| *d *= share);
    net.backward(&buf.dlogits)?;
    let loss = dp.all_reduce(net, loss * share)?;
    if !loss.is_finite() {
        return Ok(loss);
    }
    sgd.step_with_grads(net.params(), dp.grads(), lr)?;
    Ok(loss)
}

/// The counters of [`train_loop`]: where it starts (step 0, or a checkpoint's), what it hands to
/// its checkpoints, and how it ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoopCounters {
    /// Steps trained (the diverged one included).
    pub steps: u64,
    /// Seconds spent in training steps (evaluations not counted).
    pub train_secs: f64,
    /// Wall-clock seconds of the whole loop (of every session of a resumed run).
    pub seconds: f64,
    /// Best test accuracy over evaluations.
    pub best_acc: Option<f64>,
    /// Test accuracy at the last evaluation.
    pub last_acc: Option<f64>,
    /// The step (1-based) whose loss was not finite, and that loss; the loop stopped there.
    pub diverged: Option<(u64, f32)>,
    /// Sum of the training losses since the last evaluation.
    pub loss_sum: f64,
    /// Number of losses in `loss_sum`.
    pub loss_n: u64,
}

impl LoopCounters {
    /// Milliseconds per training step.
    pub fn ms_per_step(&self) -> f64 {
        self.train_secs * 1e3 / self.steps.max(1) as f64
    }

    /// The counters as a checkpoint's progress (accuracies not yet measured are stored as −1).
    pub fn progress(&self, seed: u64) -> TrainProgress {
        let values = [
            ("loss_sum", self.loss_sum),
            ("loss_n", self.loss_n as f64),
            ("best_test_acc", self.best_acc.unwrap_or(-1.0)),
            ("last_test_acc", self.last_acc.unwrap_or(-1.0)),
            ("train_seconds", self.train_secs),
            ("seconds", self.seconds),
        ];
        TrainProgress {
            step: self.steps,
            seed,
            values: values.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        }
    }

    /// The counters a checkpoint's progress holds (see [`LoopCounters::progress`]). Rejects a
    /// progress without one of them.
    pub fn from_progress(p: &TrainProgress) -> Result<Self> {
        let get = |k: &str| {
            p.values
                .get(k)
                .copied()
                .with_context(|| format!("the checkpoint lacks progress value `{k}`"))
        };
        let acc = |v: f64| (v >= 0.0).then_some(v);
        Ok(LoopCounters {
            steps: p.step,
            train_secs: get("train_seconds")?,
            seconds: get("seconds")?,
            best_acc: acc(get("best_test_acc")?),
            last_acc: acc(get("last_test_acc")?),
            diverged: None,
            loss_sum: get("loss_sum")?,
            loss_n: get("loss_n")? as u64,
        })
    }
}

/// The training loop of `accelerate`'s variants, showing its progress on `run.progress`, from the
/// counters `start` (step `start.steps`; `LoopCounters::default()` for a new run) to step `steps`:
/// `step_fn(state, step)` trains 0-based step `step` and returns its loss; after every
/// `eval_every` steps and after the last, `eval_fn(state, steps_done, mean_loss_since_last_eval)`
/// evaluates (and records its metrics) and returns the test accuracy, or `None` where this
/// process does not evaluate (a data-parallel rank other than 0); after every `checkpoint_every`
/// steps and after the last (after that step's evaluation), `checkpoint_fn(state, counters)`.
/// Stops at the first loss that is not finite (no checkpoint is taken then), and with
/// [`Cancelled`] before any step once another variant has failed.
#[allow(clippy::too_many_arguments)]
pub fn train_loop<S, M>(
    run: &VariantRun<M>,
    start: LoopCounters,
    steps: u64,
    eval_every: u64,
    checkpoint_every: u64,
    state: &mut S,
    mut step_fn: impl FnMut(&mut S, u64) -> Result<f32>,
    mut eval_fn: impl FnMut(&mut S, u64, f64) -> Result<Option<f64>>,
    mut checkpoint_fn: impl FnMut(&mut S, &LoopCounters) -> Result<()>,
) -> Result<LoopCounters> {
    let progress = run.progress;
    progress.step(start.steps);
    let (clock, prior_secs) = (Instant::now(), start.seconds);
    let mut end = start;
    for step in start.steps..steps {
        run.check()?;
        let t = Instant::now();
        let loss = step_fn(state, step)?;
        end.train_secs += t.elapsed().as_secs_f64();
        end.steps = step + 1;
        progress.step(step + 1);
        if !loss.is_finite() {
            progress.diverged(step + 1, loss);
            end.diverged = Some((step + 1, loss));
            break;
        }
        end.loss_sum += loss as f64;
        end.loss_n += 1;
        if (step + 1) % eval_every == 0 || step + 1 == steps {
            let mean_loss = end.loss_sum / end.loss_n as f64;
            let acc = eval_fn(state, step + 1, mean_loss)?;
            (end.loss_sum, end.loss_n) = (0.0, 0);
            if let Some(acc) = acc {
                let rate = (step + 1) as f64 / end.train_secs.max(1e-9);
                progress.eval(step + 1, steps, mean_loss, acc, rate);
                end.best_acc = Some(end.best_acc.map_or(acc, |b| b.max(acc)));
                end.last_acc = Some(acc);
            }
        }
        if (step + 1) % checkpoint_every == 0 || step + 1 == steps {
            end.seconds = prior_secs + clock.elapsed().as_secs_f64();
            checkpoint_fn(state, &end)?;
        }
    }
    progress.finish();
    end.seconds = prior_secs + clock.elapsed().as_secs_f64();
    Ok(end)
}

/// Test accuracy with inference-mode BN. With [`BnStats::Population`], first re-estimates every BN
/// layer's statistics over a fixed set of training batches (Algorithm 2). `on_chunk` sees the
/// network after each inference chunk of [`EVAL_CHUNK`] test examples (for monitors).
pub fn evaluate(
    e: &EvalSettings,
    net: &mut Sequential,
    train: &Dataset,
    test: &Dataset,
    on_chunk: impl FnMut(&Sequential),
) -> Result<f64> {
    if e.bn_stats == BnStats::Population {
        use_population_stats(e, net, train)?;
    }
    let correct = count_correct(net, test, on_chunk)?;
    Ok(correct as f64 / test.len.max(1) as f64)
}

/// Algorithm 2: replaces every BN layer's running statistics by its population estimate over
/// `e.population_batches` fixed training batches (epoch 0 of a shuffle with a seed derived from
/// `e.seed`). Does nothing to a network without BN.
pub fn use_population_stats(e: &EvalSettings, net: &mut Sequential, train: &Dataset) -> Result<()> {
    if net.batchnorms().is_empty() {
        return Ok(());
    }
    let features = train.features();
    net.batchnorms().into_iter().for_each(|bn| bn.reset_population());
    let mut shuffler = EpochShuffler::new(train.len, e.batch, e.seed ^ 0x9e37_79b9_7f4a_7c15)?;
    let (mut x, mut y) = (vec![0.0f32; e.batch * features], vec![0u8; e.batch]);
    for b in 0..e.population_batches.min(shuffler.batches_per_epoch()) {
        gather(train, shuffler.batch_indices(b as u64), &mut x, &mut y);
        net.forward(&x, e.batch, Mode::Collect)?;
    }
    for bn in net.batchnorms() {
        bn.use_population()?;
    }
    Ok(())
}

/// Test examples `net` classifies correctly in inference mode, in chunks of [`EVAL_CHUNK`];
/// `on_chunk` sees the network after each chunk (for monitors).
pub fn count_correct(net: &mut Sequential, test: &Dataset, mut on_chunk: impl FnMut(&Sequential)) -> Result<usize> {
    let features = test.features();
    let classes = net.output_size();
    let mut correct = 0usize;
    let mut x = vec![0.0f32; EVAL_CHUNK.min(test.len) * features];
    for start in (0..test.len).step_by(EVAL_CHUNK) {
        let n = EVAL_CHUNK.min(test.len - start);
        let x = &mut x[..n * features];
        test.images_f32(start..start + n, x);
        let logits = net.forward(x, n, Mode::Eval)?;
        correct += argmax_rows(logits, classes)
            .zip(&test.labels[start..start + n])
            .filter(|(p, &l)| *p == l as usize)
            .count();
        on_chunk(net);
    }
    Ok(correct)
}

/// `metrics.jsonl`: one JSON object per line, flushed after each so a running study can be watched.
pub struct JsonLines {
    file: std::fs::File,
    path: PathBuf,
}

impl JsonLines {
    /// Creates (truncates) `path`.
    pub fn create(path: PathBuf) -> Result<Self> {
        let file = std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(JsonLines { file, path })
    }

    /// Opens `path` to append lines after those it holds.
    pub fn append(path: PathBuf) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(JsonLines { file, path })
    }

    /// Appends `value` as one line.
    pub fn write(&mut self, value: &impl Serialize) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(value)?)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// How an experiment's run begins, once its data is loaded: the checkpoint each variant (named
/// `names`) resumes from (all `None` for a fresh run; with `resuming`, checked to be the same on
/// every rank), the `metrics.jsonl` lines to keep (rank 0 of a resumed run: `kept(starts)`; other
/// ranks of a resumed run: none; a fresh run: `None`), and on rank 0 the checkpoints folder and,
/// for a fresh run, `settings.json` (`settings`) in `out`. Rejects checkpoints that belong to
/// another run (`settings`, `experiment`) or are damaged.
pub fn begin_run<M>(
    out: &Path,
    experiment: &str,
    names: &[&str],
    settings: &impl Serialize,
    resuming: bool,
    comm: &dyn batchnorm::Communicator,
    kept: impl FnOnce(&[Option<Checkpoint>]) -> Result<Vec<M>>,
) -> Result<(Vec<Option<Checkpoint>>, Option<Vec<M>>)> {
    let settings_json = serde_json::to_value(settings)?;
    let mut starts = Vec::new();
    for name in names {
        starts.push(match resuming {
            true => resume_point(&checkpoint_path(out, name), experiment, name, &settings_json)?,
            false => None,
        });
    }
    if resuming {
        check_same_starts(comm, &starts, out)?;
    }
    let root = comm.rank() == 0;
    let kept = match (resuming, root) {
        (true, true) => Some(kept(&starts)?),
        (true, false) => Some(Vec::new()),
        (false, _) => None,
    };
    if root {
        let dir = out.join("checkpoints");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create output directory {}", dir.display()))?;
        if !resuming {
            let path = out.join("settings.json");
            write_atomic(&path, serde_json::to_string_pretty(settings)?.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok((starts, kept))
}

/// A line of an experiment's `metrics.jsonl`: which variant and step it belongs to, which fix the
/// file's final order.
pub trait MetricLine: Serialize + Clone + Send {
    /// The variant's name.
    fn variant_name(&self) -> &str;
    /// Training steps done when the line was written.
    fn step(&self) -> u64;
}

/// What one variant's training gets from [`train_variants`]: its progress line, the sink for its
/// metrics lines, and the flag raised when another variant fails.
pub struct VariantRun<'a, M> {
    /// The variant's progress bar (or log lines).
    pub progress: &'a Progress,
    record: &'a (dyn Fn(&M) -> Result<()> + Sync),
    cancel: &'a AtomicBool,
}

impl<M> VariantRun<'_, M> {
    /// Writes one metrics line (to rank 0's `metrics.jsonl`) and keeps it for the outcome.
    pub fn record(&self, line: &M) -> Result<()> {
        (self.record)(line)
    }

    /// `Err` ([`Cancelled`]) once another variant has failed; training checks it every step.
    pub fn check(&self) -> Result<()> {
        match self.cancel.load(Ordering::Relaxed) {
            true => Err(Cancelled.into()),
            false => Ok(()),
        }
    }
}

/// Why a variant stopped early: another one, trained beside it, failed.
#[derive(Debug)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped because another variant failed")
    }
}

impl std::error::Error for Cancelled {}

/// Creates the output folder `out` and its `metrics.jsonl` (with `out` = `None`, nothing is
/// written: a data-parallel rank other than 0), then trains each of `variants` with
/// `train(index, variant, run)`, which records its metrics lines through `run`. With `kept` (a
/// resumed run), `metrics.jsonl` already holds those lines and is appended to.
///
/// With one process, two or more variants and two or more threads in the current rayon pool,
/// the variants train side by side: the threads are shared out into one pool per lane (as many
/// lanes as threads, at most one per variant), and each lane trains the next variant not yet
/// taken; the variants left over when the lanes do not divide their number train one after
/// another on all the threads (rather than leave lanes idle). The experiments' results do not
/// depend on the thread count (fixed splits in the kernels and matrix products), so this changes
/// only the time: their networks are too small to keep two threads busy in one step (on 2
/// threads the paper's MLP trains 2 variants in 2.7 s side by side against 4.3 s one after
/// another; 2 conv-net variants of 600 steps take 8.8 s against 11.1 s). Lines of variants trained side by side interleave while they
/// run; at the end `metrics.jsonl` is rewritten in variant order, then step order. If a variant
/// fails, the others stop (at their next step) and the first failure in variant order is
/// returned. Returns the metrics lines in that order and each variant's result under its name.
#[allow(clippy::too_many_arguments)]
pub fn train_variants<V, M, R>(
    out: Option<&Path>,
    kept: Option<Vec<M>>,
    variants: &[V],
    name: impl Fn(V) -> &'static str,
    steps: u64,
    quiet: bool,
    processes: usize,
    train: impl Fn(usize, V, &VariantRun<M>) -> Result<R> + Sync,
) -> Result<(Vec<M>, BTreeMap<&'static str, R>)>
where
    V: Copy + Send + Sync,
    M: MetricLine,
    R: Send,
{
    let file = match (out, kept.is_some()) {
        (Some(out), false) => {
            create_out(out)?;
            Some(JsonLines::create(out.join("metrics.jsonl"))?)
        }
        (Some(out), true) => Some(JsonLines::append(out.join("metrics.jsonl"))?),
        (None, _) => None,
    };
    let sink = Mutex::new((file, kept.unwrap_or_default()));
    let record = |m: &M| -> Result<()> {
        let mut sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = sink.0.as_mut() {
            f.write(m)?;
        }
        sink.1.push(m.clone());
        Ok(())
    };
    // Every variant's bar from the start, kept until all are done (a bar dropped from the group
    // early takes its line with it).
    let group = MultiProgress::new();
    let bars: Vec<Progress> = (variants.iter())
        .map(|&v| Progress::in_group(&group, name(v), steps, quiet || out.is_none()))
        .collect();
    let cancel = AtomicBool::new(false);
    let train_one = |i: usize| {
        let run = VariantRun {
            progress: &bars[i],
            record: &record,
            cancel: &cancel,
        };
        let result = train(i, variants[i], &run);
        if result.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        (i, result)
    };
    let lanes = lane_pools(variants.len(), processes)?;
    // With fewer variants left than lanes, the last ones train one after another on all threads
    // instead of leaving lanes idle.
    let together = lanes.as_ref().map_or(0, |p| variants.len() - variants.len() % p.len());
    let mut results = match lanes {
        Some(pools) => in_lanes(&pools, together, &cancel, train_one)?,
        None => Vec::new(),
    };
    for i in together..variants.len() {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        results.push(train_one(i));
    }
    results.sort_by_key(|(i, _)| *i);
    let summaries = first_failure_or(results.into_iter().map(|(i, r)| r.map(|r| (name(variants[i]), r))))?;
    let (file, mut metrics) = sink.into_inner().unwrap_or_else(PoisonError::into_inner);
    drop(file);
    let names: Vec<&str> = variants.iter().map(|&v| name(v)).collect();
    metrics.sort_by_key(|m| (names.iter().position(|&n| n == m.variant_name()), m.step()));
    if let Some(out) = out {
        let path = out.join("metrics.jsonl");
        let lines = metrics.iter().map(|m| serde_json::to_string(m).map(|l| l + "\n"));
        write_atomic(&path, lines.collect::<Result<String, _>>()?.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok((metrics, summaries))
}

/// Runs `train_one(i)` for i in `0..count`, each lane (one per pool, on its own thread) taking the
/// next i in turn until none is left or `cancel` is raised; returns (i, result) of each run.
fn in_lanes<R: Send>(
    pools: &[rayon::ThreadPool],
    count: usize,
    cancel: &AtomicBool,
    train_one: impl Fn(usize) -> (usize, Result<R>) + Sync,
) -> Result<Vec<(usize, Result<R>)>> {
    let next = AtomicUsize::new(0);
    let lane = |pool: &rayon::ThreadPool| {
        let mut done = Vec::new();
        while !cancel.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                break;
            }
            done.push(pool.install(|| train_one(i)));
        }
        done
    };
    let done = std::thread::scope(|scope| {
        let lanes: Vec<_> = pools.iter().map(|pool| scope.spawn(|| lane(pool))).collect();
        lanes.into_iter().map(|l| l.join()).collect::<Result<Vec<_>, _>>()
    });
    let done = done.map_err(|_| anyhow::anyhow!("a training thread panicked"))?;
    Ok(done.into_iter().flatten().collect())
}

/// The variants' results by name, or the first failure among them (in their order) that is not
/// just [`Cancelled`], if any.
fn first_failure_or<R>(results: impl Iterator<Item = Result<(&'static str, R)>>) -> Result<BTreeMap<&'static str, R>> {
    let (mut summaries, mut first_error) = (BTreeMap::new(), None::<anyhow::Error>);
    for result in results {
        match result {
            Ok((name, r)) => drop(summaries.insert(name, r)),
            Err(e)
                if first_error
                    .as_ref()
                    .is_none_or(|f| f.is::<Cancelled>() && !e.is::<Cancelled>()) =>
            {
                first_error = Some(e)
            }
            Err(_) => {}
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(summaries),
    }
}

/// The pools of [`train_variants`]' lanes, sharing out the current pool's threads: with one
/// process, at least two variants and at least two threads. `None`: one variant after another
/// on the current pool.
fn lane_pools(variants: usize, processes: usize) -> Result<Option<Vec<rayon::ThreadPool>>> {
    let threads = rayon::current_num_threads();
    let lanes = variants.min(threads);
    if processes > 1 || lanes < 2 {
        return Ok(None);
    }
    let pools = (0..lanes).map(|i| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads / lanes + usize::from(i < threads % lanes))
            .build()
    });
    let pools = pools.collect::<Result<Vec<_>, _>>();
    Ok(Some(pools.context("cannot start the training threads")?))
}

/// Creates the output folder `out`.
pub fn create_out(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create output directory {}", out.display()))
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The settings of a run as (name, value) rows for a report page.
pub fn settings_rows(s: &impl Serialize) -> Vec<(String, String)> {
    let v = serde_json::to_value(s).unwrap_or_default();
    let mut rows = Vec::new();
    if let Some(map) = v.as_object() {
        for (k, v) in map {
            rows.push((k.clone(), v.to_string().trim_matches('"').to_string()));
        }
    }
    rows
}

/// The data-parallel mode of a run in words, for its report: `processes` ranks sharing global
/// batches of `batch`, batch norm over the global batch (`bn_sync`) or over each shard.
pub fn data_parallel_text(processes: usize, batch: usize, bn_sync: bool) -> String {
    let bn = if bn_sync {
        format!("batch norm synchronized: statistics over the global batch of {batch} (--bn-sync on)")
    } else {
        format!(
            "batch norm per process: statistics over each process's shard of about {} (--bn-sync off)",
            batch / processes.max(1)
        )
    };
    format!(
        "Data-parallel training over {processes} MPI processes: each global batch of {batch} is split into \
         contiguous shards, gradients are summed over the processes; {bn}."
    )
}

/// A new default output directory under `runs/`.
pub fn default_out(prefix: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Path::new("runs").join(format!("{prefix}-{secs}"))
}

/// Where a run keeps the checkpoint of the variant named `variant`:
/// `OUT/checkpoints/<variant>.safetensors`.
pub fn checkpoint_path(out: &Path, variant: &str) -> PathBuf {
    out.join("checkpoints").join(format!("{variant}.safetensors"))
}

/// The training-defining part of a run's settings (as JSON): everything but where files are,
/// thread and process counts (checkpoints do not depend on them).
pub fn run_identity(settings: &serde_json::Value) -> serde_json::Value {
    let mut v = settings.clone();
    if let Some(m) = v.as_object_mut() {
        for key in ["out", "data_dir", "threads", "processes"] {
            m.remove(key);
        }
    }
    v
}

/// The checkpoint a resumed run continues `variant` of `experiment` from: `None` without a file
/// at `path`. Rejects a damaged file, a checkpoint of another experiment or variant, and one
/// written by a run whose settings differ from `settings` (beyond [`run_identity`]).
pub fn resume_point(
    path: &Path,
    experiment: &str,
    variant: &str,
    settings: &serde_json::Value,
) -> Result<Option<Checkpoint>> {
    if !path.exists() {
        return Ok(None);
    }
    let c = Checkpoint::read(path).with_context(|| format!("cannot resume from {}", path.display()))?;
    ensure!(
        c.experiment == experiment && c.variant == variant,
        "{}: a checkpoint of {}/{}, expected {experiment}/{variant}",
        path.display(),
        c.experiment,
        c.variant
    );
    let dir = path.parent().and_then(Path::parent).unwrap_or(Path::new("."));
    ensure!(
        run_identity(&c.settings) == run_identity(settings),
        "{}: written by a run with other settings than {}",
        path.display(),
        dir.join("settings.json").display()
    );
    Ok(Some(c))
}

/// The settings of the run in `dir` (its `settings.json`). Rejects a directory without a
/// readable, valid `settings.json`, saying it is not `what` to resume (e.g. "a paper-mlp run").
pub fn run_settings<S: serde::de::DeserializeOwned>(dir: &Path, what: &str) -> Result<S> {
    let path = dir.join("settings.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not {what} to resume: cannot read {}",
            dir.display(),
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid settings", path.display()))
}

/// On resuming as one of several data-parallel ranks: checks that every rank found the same
/// checkpoints (`starts`, one per variant) in `dir`, which each rank reads itself (one machine,
/// or a shared file system). One all-gather; every rank sees the same answer, so all of them
/// fail together rather than one waiting in a collective the others never reach.
pub fn check_same_starts(comm: &dyn batchnorm::Communicator, starts: &[Option<Checkpoint>], dir: &Path) -> Result<()> {
    if comm.size() < 2 {
        return Ok(());
    }
    let mine: Vec<f64> = starts
        .iter()
        .map(|c| c.as_ref().map_or(-1.0, |c| c.progress.step as f64))
        .collect();
    let mut all = vec![0.0; mine.len() * comm.size()];
    comm.all_gather_f64(&mine, &mut all)?;
    let steps = |v: &[f64]| -> Vec<String> {
        v.iter()
            .map(|&k| if k < 0.0 { "none".into() } else { format!("step {k}") })
            .collect()
    };
    for (r, theirs) in all.chunks(mine.len().max(1)).enumerate() {
        ensure!(
            theirs == &mine[..],
            "the ranks found different checkpoints in {} (rank {r}: {:?}, rank {}: {:?}): every rank \
             must read the same run directory (one machine, or a shared file system)",
            dir.display(),
            steps(theirs),
            comm.rank(),
            steps(&mine)
        );
    }
    Ok(())
}

/// Restores `net` and `sgd` from the checkpoint `ck` (read from `path`) a resumed variant of
/// `steps` steps and seed `seed` continues from, and returns the loop counters it holds. Rejects
/// what [`Checkpoint::restore`] rejects and a checkpoint past `steps` or of another seed.
pub fn restore_start(
    ck: &Checkpoint,
    net: &mut Sequential,
    sgd: &mut Sgd,
    steps: u64,
    seed: u64,
    path: &Path,
) -> Result<LoopCounters> {
    ck.restore(net, sgd)
        .with_context(|| format!("cannot resume from {}", path.display()))?;
    ensure!(
        ck.progress.step <= steps && ck.progress.seed == seed,
        "{}: step {} and seed {} do not fit this run",
        path.display(),
        ck.progress.step,
        ck.progress.seed
    );
    LoopCounters::from_progress(&ck.progress)
}

/// Whether a `metrics.jsonl` line (a JSON object with `variant` and `step`) is covered by the
/// checkpoints `starts` of the run's `variants` (names, in order): its variant has a checkpoint
/// at its step or later. A resumed run keeps exactly these lines and writes the others again.
pub fn covered_by_checkpoints(line: &serde_json::Value, variants: &[&str], starts: &[Option<Checkpoint>]) -> bool {
    let (Some(name), Some(step)) = (line["variant"].as_str(), line["step"].as_u64()) else {
        return false;
    };
    let at = variants.iter().position(|v| *v == name);
    at.and_then(|i| starts[i].as_ref())
        .is_some_and(|c| step <= c.progress.step)
}
