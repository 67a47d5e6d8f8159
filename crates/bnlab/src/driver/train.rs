//! Training: one SGD step (in one process, or as one rank of data-parallel training) and the one
//! training loop every experiment's variants run.

use super::evaluate::{evaluate, gather_prepared, BatchPrep, Gathered, Pass};
use super::lanes::VariantRun;
use super::resume::restore_start;
use super::{checkpoint_path, Data, Divergence, Evaluation, Experiment, Settings, Variant, VariantOf, VariantSummary};
use crate::atomic::write_atomic;
use crate::data::{BatchOrder, Dataset};
use crate::engine::checkpoint::{Checkpoint, CheckpointError, CheckpointProgress};
use crate::engine::{Mode, Sequential, Sgd, SoftmaxCrossEntropy};
use crate::monitor::Monitor;
use crate::parallel::{self, DataParallel};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// One SGD step on the batch of `step` from `order`, as rank `dp.rank()` of `dp.size()`, the batch
/// prepared by `prep` ([`Pass::Train`]): forward in [`Mode::Train`], softmax cross-entropy, backward, update with learning rate `lr`.
/// Returns the batch loss; when it is not finite, nothing is updated (the caller decides what
/// divergence means). `buf` holds this rank's shard of the batch (`buf.y.len()` examples).
///
/// With one rank this is the plain step on the whole batch. With more (data-parallel training,
/// see [`crate::parallel`]), this rank gathers its contiguous shard ([`parallel::shard`]) of the
/// global batch, runs forward, loss and backward with ∂loss/∂logits scaled by its share n_r/N,
/// then sums the gradients and loss shares over the ranks ([`DataParallel::all_reduce`]) and
/// applies the summed gradients ([`Sgd::step_with_grads`]: momentum and weight decay as in
/// [`Sgd::step`]). The returned loss is then the global batch's, the same bits on every rank, and
/// when it is not finite nothing is updated on any rank (so all ranks stop at the same step). The
/// backward runs before that decision: with synchronized batch norm it is a collective that every
/// rank must enter.
pub fn train_step(
    net: &mut Sequential,
    sgd: &mut Sgd,
    train: &Dataset,
    order: &mut dyn BatchOrder,
    step: u64,
    lr: f32,
    buf: &mut StepBuffers,
    dp: &mut DataParallel,
    prep: &mut dyn BatchPrep,
) -> Result<f32> {
    let classes = net.output_size();
    let indices = order.batch_indices(step);
    let global = indices.len();
    let shard = parallel::shard(global, dp.rank(), dp.size());
    let local = shard.len();
    ensure!(
        buf.y.len() == local,
        "step buffers for {} examples, but this rank's shard has {local}",
        buf.y.len()
    );
    let batch = Gathered {
        pass: Pass::Train(step),
        split: train,
        indices: &indices[shard],
    };
    gather_prepared(batch, &mut buf.x, &mut buf.y, prep, net)?;
    let logits = net.forward(&buf.x, local, Mode::Train)?;
    let loss = buf.loss.forward(logits, &buf.y, classes)?;
    if dp.size() == 1 {
        // One rank: no scaling, no collective.
        if !loss.is_finite() {
            return Ok(loss);
        }
        buf.loss.backward(&buf.y, classes, &mut buf.dlogits);
        net.backward(&buf.dlogits)?;
        sgd.step(net.params(), lr);
        return Ok(loss);
    }
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

/// The counters of a variant's training: where it starts (step 0, or a checkpoint's), what its
/// checkpoints hold, and how it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
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
    /// Wall-clock times are not part of it (see [`Timing`]): checkpoints of identical runs are
    /// identical bytes.
    pub fn progress(&self, seed: u64) -> CheckpointProgress {
        let values = [
            ("loss_sum", self.loss_sum),
            ("loss_n", self.loss_n as f64),
            ("best_test_acc", self.best_acc.unwrap_or(-1.0)),
            ("last_test_acc", self.last_acc.unwrap_or(-1.0)),
        ];
        CheckpointProgress {
            step: self.steps,
            seed,
            values: values.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        }
    }

    /// The counters a checkpoint's progress holds (see [`LoopCounters::progress`]) and the
    /// times `timing` holds. Rejects a progress without one of them, a loss count that is not a
    /// whole number of at most the steps done, and an accuracy outside [0, 1] (−1: none yet).
    pub fn from_progress(p: &CheckpointProgress, timing: Timing) -> Result<Self> {
        let get = |k: &str| {
            p.values
                .get(k)
                .copied()
                .with_context(|| format!("the checkpoint lacks progress value `{k}`"))
        };
        let acc = |k: &str| -> Result<Option<f64>> {
            let v = get(k)?;
            ensure!(
                v == -1.0 || (0.0..=1.0).contains(&v),
                "the checkpoint's `{k}` is {v}, not an accuracy"
            );
            Ok((v >= 0.0).then_some(v))
        };
        let loss_n = get("loss_n")?;
        ensure!(
            loss_n.fract() == 0.0 && (0.0..=p.step as f64).contains(&loss_n),
            "the checkpoint's loss count {loss_n} does not fit its step {}",
            p.step
        );
        Ok(LoopCounters {
            steps: p.step,
            train_secs: timing.train_seconds,
            seconds: timing.seconds,
            best_acc: acc("best_test_acc")?,
            last_acc: acc("last_test_acc")?,
            diverged: None,
            loss_sum: get("loss_sum")?,
            loss_n: loss_n as u64,
        })
    }

    /// The wall-clock times of the counters.
    pub fn timing(&self) -> Timing {
        Timing {
            train_seconds: self.train_secs,
            seconds: self.seconds,
        }
    }
}

/// The wall-clock time a variant has trained so far, kept beside its checkpoint in
/// `<variant>.timing.json` rather than in it, so that the checkpoints of two identical runs are
/// identical bytes; a resumed run adds its own time to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Seconds spent in training steps.
    pub train_seconds: f64,
    /// Wall-clock seconds of the whole loop.
    pub seconds: f64,
}

impl Timing {
    /// Where the timing of the checkpoint at `checkpoint` is kept.
    pub fn path(checkpoint: &Path) -> PathBuf {
        checkpoint.with_extension("timing.json")
    }

    /// The timing kept beside `checkpoint`: zero without a file (it is informative only).
    /// Rejects a file that does not parse or holds negative or non-finite times.
    pub fn read(checkpoint: &Path) -> Result<Timing> {
        let path = Timing::path(checkpoint);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Timing::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let t: Timing = serde_json::from_str(&text).with_context(|| format!("{}: invalid timing", path.display()))?;
        ensure!(
            [t.train_seconds, t.seconds].iter().all(|s| s.is_finite() && *s >= 0.0),
            "{}: times must be finite and >= 0",
            path.display()
        );
        Ok(t)
    }

    /// Writes the timing beside `checkpoint` (atomically).
    pub fn write(&self, checkpoint: &Path) -> Result<()> {
        let path = Timing::path(checkpoint);
        write_atomic(&path, serde_json::to_string(self)?.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// [`Experiment::prepare_batch`] of one variant, as the driver's loops take it ([`BatchPrep`]).
pub struct VariantPrep<'a, E: Experiment> {
    /// The experiment.
    pub experiment: &'a E,
    /// The run's settings.
    pub s: &'a Settings<E::Settings>,
    /// The variant whose batches it prepares.
    pub variant: VariantOf<E>,
}

impl<E: Experiment> BatchPrep for VariantPrep<'_, E> {
    fn prepare(&mut self, batch: Gathered<'_>, x: &mut [f32], net: &mut Sequential) -> Result<()> {
        self.experiment.prepare_batch(self.s, self.variant, batch, x, net)
    }
}

/// Trains `variant` of `experiment` from its checkpoint `start` (or from scratch) to the steps of
/// its settings ([`Experiment::variant_settings`]: batch size, steps, evaluation and checkpoint
/// schedule), as rank `dp.rank()` of `dp.size()`, showing progress and recording metrics lines
/// through `run`. Its batches are [`Experiment::batch_order`]'s, each prepared by
/// [`Experiment::prepare_batch`] (evaluation batches too).
///
/// After every `eval_every` steps and after the last: with several ranks, the replicas are checked
/// to be identical; rank 0 evaluates and records the experiment's metrics line. After every
/// `checkpoint_every` steps and after the last (after that step's evaluation): rank 0 saves a
/// checkpoint. Stops at the first loss that is not finite, as [`Experiment::divergence`] says,
/// and with [`super::lanes::Cancelled`] before any step once another variant has failed.
pub fn train_variant<E: Experiment>(
    experiment: &E,
    s: &Settings<E::Settings>,
    variant: VariantOf<E>,
    start: Option<&Checkpoint>,
    data: &Data,
    dp: &mut DataParallel,
    run: &VariantRun<E::Metric>,
) -> Result<VariantSummary> {
    let c = &experiment.variant_settings(s, variant);
    let (root, parallel) = (dp.rank() == 0, dp.size() > 1);
    let name = variant.name();
    let built = experiment.build(s, variant, data, dp.rank())?;
    let (mut net, mut monitor) = (built.net, built.monitor);
    if parallel && c.bn_sync {
        net.batchnorms()
            .into_iter()
            .for_each(|bn| bn.synchronize(Some(dp.comm())));
    }
    dp.take_traffic();
    let mut order = experiment.batch_order(s, c, variant, data)?;
    let mut prep = VariantPrep { experiment, s, variant };
    let mut sgd = experiment.optimizer(s, variant);
    let ckpt_path = checkpoint_path(&c.out, name);
    let mut counters = match start {
        Some(ck) => {
            let counters = restore_start(ck, &mut net, &mut sgd, c, &ckpt_path)?;
            let writer_processes = ck.settings["processes"].as_u64().unwrap_or(1).max(1) as usize;
            experiment.after_restore(s, &mut net, writer_processes, dp)?;
            counters
        }
        None => LoopCounters::default(),
    };
    let mut saved = start.map(|ck| ck.progress.step);
    let kept = |saved: Option<u64>| match saved {
        Some(step) => format!(
            "the last good checkpoint (step {step}) is kept in {}",
            ckpt_path.display()
        ),
        None => "no checkpoint had been written yet".to_string(),
    };
    let settings_json = serde_json::to_value(s)?;
    let local = parallel::shard(c.batch, dp.rank(), dp.size()).len();
    let mut buf = StepBuffers::new(local, data.train.features(), data.classes);
    let progress = run.progress;
    progress.step(counters.steps);
    let (clock, prior_secs) = (Instant::now(), counters.seconds);
    for step in counters.steps..c.steps {
        run.check()?;
        let t = Instant::now();
        let lr = experiment.lr(s, variant, step) as f32;
        let loss = train_step(
            &mut net,
            &mut sgd,
            &data.train,
            order.as_mut(),
            step,
            lr,
            &mut buf,
            dp,
            &mut prep,
        )?;
        counters.train_secs += t.elapsed().as_secs_f64();
        counters.steps = step + 1;
        progress.step(step + 1);
        if !loss.is_finite() {
            if experiment.divergence() == Divergence::Fail {
                bail!(
                    "training of `{name}` diverged at step {}: the loss is {loss} (try a smaller --lr); {}",
                    step + 1,
                    kept(saved)
                );
            }
            progress.diverged(step + 1, loss);
            counters.diverged = Some((step + 1, loss));
            break;
        }
        counters.loss_sum += loss as f64;
        counters.loss_n += 1;
        let last = step + 1 == c.steps;
        if (step + 1) % c.eval_every == 0 || last {
            if parallel {
                // Running statistics are compared only where they are used: population
                // evaluation overwrites them on rank 0.
                let running = c.bn_sync && c.bn_stats == super::BnStats::Running;
                dp.check_replicas(&mut net, running, step + 1)?;
            }
            if root {
                let running_too = experiment.evaluate_running_too(s);
                let conditions = experiment.test_conditions(s);
                let (accuracies, running_test_acc) = evaluate(
                    c,
                    &mut net,
                    &data.train,
                    &data.test,
                    &mut monitor,
                    running_too,
                    conditions,
                    &mut prep,
                )?;
                let test_acc = accuracies[0];
                let eval = Evaluation {
                    step: step + 1,
                    test_acc,
                    condition_test_acc: accuracies,
                    running_test_acc,
                    train_loss: counters.loss_sum / counters.loss_n as f64,
                    watched: monitor.as_mut().map(Monitor::summary),
                };
                let rate = (step + 1) as f64 / counters.train_secs.max(1e-9);
                progress.eval(step + 1, c.steps, eval.train_loss, test_acc, rate);
                run.record(&experiment.metric(s, variant, &eval)?)?;
                counters.best_acc = Some(counters.best_acc.map_or(test_acc, |b| b.max(test_acc)));
                counters.last_acc = Some(test_acc);
            }
            (counters.loss_sum, counters.loss_n) = (0.0, 0);
        }
        if root && ((step + 1) % c.checkpoint_every() == 0 || last) {
            counters.seconds = prior_secs + clock.elapsed().as_secs_f64();
            let capture = Checkpoint::capture(
                &mut net,
                &sgd,
                &counters.progress(c.seed),
                E::NAME,
                name,
                settings_json.clone(),
            );
            match (capture, experiment.divergence()) {
                (Ok(ck), _) => {
                    ck.save(&ckpt_path)?;
                    counters.timing().write(&ckpt_path)?;
                    saved = Some(step + 1);
                }
                // Weights that overflowed before the loss did: no checkpoint (the last good one
                // stays), and the variant is reported diverged at its first non-finite loss.
                (Err(CheckpointError::NonFinite { .. }), Divergence::Record) => {}
                (Err(e @ CheckpointError::NonFinite { .. }), Divergence::Fail) => bail!(
                    "training of `{name}` diverged by step {}: {e}; {}",
                    step + 1,
                    kept(saved)
                ),
                (Err(e), _) => return Err(anyhow!("{}: cannot checkpoint `{name}`: {e}", ckpt_path.display())),
            }
        }
    }
    progress.finish();
    counters.seconds = prior_secs + clock.elapsed().as_secs_f64();
    if let (Some((step, _)), true) = (counters.diverged, root) {
        if let Some(line) = experiment.diverged_line(s, variant, step) {
            run.record(&line)?;
        }
    }
    let traffic = dp.take_traffic();
    let steps = counters.steps.max(1) as f64;
    Ok(VariantSummary {
        final_test_acc: counters.last_acc,
        best_test_acc: counters.best_acc,
        seconds: counters.seconds,
        ms_per_step: counters.ms_per_step(),
        steps: counters.steps,
        diverged_at: counters.diverged.map(|d| d.0),
        collective_calls_per_step: traffic.calls as f64 / steps,
        bytes_sent_per_step: traffic.bytes_sent as f64 / steps,
    })
}
