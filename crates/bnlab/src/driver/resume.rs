//! Where a run starts: for a fresh run, `settings.json` and the checkpoints folder; for a resumed
//! one, each variant's checkpoint (checked to belong to this run, the same on every rank) and the
//! `metrics.jsonl` lines those checkpoints cover.

use super::metrics::{kept_on_resume, line_place, truncate_jsonl, MetricLine};
use super::train::{LoopCounters, Timing};
use super::{checkpoint_path, CommonSettings, Settings};
use crate::atomic::write_atomic;
use crate::engine::checkpoint::Checkpoint;
use crate::engine::{Sequential, Sgd};
use anyhow::{ensure, Context, Result};
use batchnorm::Communicator;
use serde::Serialize;
use std::path::Path;

/// How a run begins, once its data is loaded.
pub struct Begun<M> {
    /// The checkpoint each variant resumes from (all `None` for a fresh run).
    pub starts: Vec<Option<Checkpoint>>,
    /// The `metrics.jsonl` lines to keep: `None` for a fresh run; rank 0 of a resumed run: the
    /// lines the checkpoints cover; other ranks of a resumed run: none.
    pub kept: Option<Vec<M>>,
}

/// Begins the run of `settings` (experiment `experiment`, variants `names`): with `resuming`,
/// finds each variant's checkpoint ([`resume_point`]), checks that every rank found the same
/// ([`check_same_starts`]) and on rank 0 cuts `metrics.jsonl` back to what they cover; on rank 0
/// of a fresh run writes `settings.json` (the directory and its checkpoints folder are
/// [`super::rundir::RunDir::claim`]'s).
pub fn begin_run<M: MetricLine>(
    settings: &Settings<impl Serialize>,
    experiment: &str,
    names: &[&str],
    resuming: bool,
    comm: &dyn Communicator,
) -> Result<Begun<M>> {
    let out = &settings.common.out;
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
        (true, true) => Some(kept_metrics(out, names, &starts)?),
        (true, false) => Some(Vec::new()),
        (false, _) => None,
    };
    if root && !resuming {
        let path = out.join("settings.json");
        write_atomic(&path, serde_json::to_string_pretty(settings)?.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(Begun { starts, kept })
}

/// Cuts `OUT/metrics.jsonl` back to the lines the checkpoints `starts` (one per variant of
/// `names`, in order) cover and returns them: a variant's lines up to its checkpoint's step that
/// [`kept_on_resume`] keeps, and that read as the experiment's lines `M`.
fn kept_metrics<M: MetricLine>(out: &Path, names: &[&str], starts: &[Option<Checkpoint>]) -> Result<Vec<M>> {
    let read = |line: &serde_json::Value| {
        serde_json::from_value::<M>(line.clone()).context("metrics.jsonl: a line is not a metrics record")
    };
    let covered = |line: &serde_json::Value| {
        kept_on_resume(line) && read(line).is_ok() && covered_by_checkpoints(line, names, starts)
    };
    let kept = truncate_jsonl(&out.join("metrics.jsonl"), covered)?;
    kept.iter().map(read).collect()
}

/// Whether a `metrics.jsonl` line (a JSON object with `variant` and `step`) is covered by the
/// checkpoints `starts` of the run's `variants` (names, in order): its variant has a checkpoint
/// at its step or later. A resumed run keeps exactly these lines and writes the others again.
pub fn covered_by_checkpoints(line: &serde_json::Value, variants: &[&str], starts: &[Option<Checkpoint>]) -> bool {
    let Some((name, step)) = line_place(line) else {
        return false;
    };
    let at = variants.iter().position(|v| *v == name);
    at.and_then(|i| starts[i].as_ref())
        .is_some_and(|c| step <= c.progress.step)
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

/// On resuming as one of several data-parallel ranks: checks that every rank found the same
/// checkpoints (`starts`, one per variant) in `dir`, which each rank reads itself (one machine,
/// or a shared file system). One all-gather; every rank sees the same answer, so all of them
/// fail together rather than one waiting in a collective the others never reach.
pub fn check_same_starts(comm: &dyn Communicator, starts: &[Option<Checkpoint>], dir: &Path) -> Result<()> {
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

/// Restores `net` and `sgd` from the checkpoint `ck` (read from `path`) a resumed variant of the
/// run `s` continues from, and returns the loop counters it holds. Rejects what
/// [`Checkpoint::restore`] rejects and a checkpoint past the run's steps or of another seed.
pub fn restore_start(
    ck: &Checkpoint,
    net: &mut Sequential,
    sgd: &mut Sgd,
    s: &CommonSettings,
    path: &Path,
) -> Result<LoopCounters> {
    ck.restore(net, sgd)
        .with_context(|| format!("cannot resume from {}", path.display()))?;
    ensure!(
        ck.progress.step <= s.steps && ck.progress.seed == s.seed,
        "{}: step {} and seed {} do not fit this run",
        path.display(),
        ck.progress.step,
        ck.progress.seed
    );
    LoopCounters::from_progress(&ck.progress, Timing::read(path)?)
        .with_context(|| format!("cannot resume from {}", path.display()))
}
