//! Variants side by side: with one process, two or more variants and two or more threads, the
//! run's threads are shared out into lanes (one rayon pool each, at most one lane per variant)
//! that each take the next variant not yet taken; the variants left over when the lanes do not
//! divide their number train one after another on all the threads (rather than leave lanes
//! idle). The networks of the lab are too small to keep two threads busy in one step, so lanes
//! cut a run's time; results do not change (the kernels and matrix products split work by shape
//! only). A failing variant stops the others at their next step.

use super::metrics::{line_place, write_jsonl, JsonLines, MetricLine};
use super::progress::Progress;
use super::VariantSummary;
use anyhow::{Context, Result};
use indicatif::MultiProgress;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

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

/// Creates `out/metrics.jsonl` in the run's directory (which [`super::rundir::RunDir::claim`]
/// created; with `out` = `None`, nothing is written: a data-parallel rank other than 0), then trains the variants named `names` with `train(index, run)`, which records
/// its metrics lines through `run`, on `threads` threads (in lanes, see the module docs). With
/// `kept` (a resumed run), `metrics.jsonl` already holds those lines and is appended to.
/// `steps[i]` is the step count of variant `i` (its progress bar's length).
///
/// Lines of variants trained side by side interleave while they run; at the end `metrics.jsonl`
/// is rewritten in variant order, then step order. If a variant fails, the others stop and the
/// first failure in variant order is returned. Returns the metrics lines in that order and each
/// variant's summary under its name.
#[allow(clippy::too_many_arguments)]
pub fn train_variants<M: MetricLine>(
    out: Option<&Path>,
    kept: Option<Vec<M>>,
    names: &[&'static str],
    steps: &[u64],
    threads: usize,
    quiet: bool,
    processes: usize,
    train: impl Fn(usize, &VariantRun<M>) -> Result<VariantSummary> + Sync,
) -> Result<(Vec<M>, BTreeMap<&'static str, VariantSummary>)> {
    let file = match (out, kept.is_some()) {
        (Some(out), false) => Some(JsonLines::create(out.join("metrics.jsonl"))?),
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
    let bars: Vec<Progress> = (names.iter().zip(steps))
        .map(|(name, &steps)| Progress::in_group(&group, name, steps, quiet || out.is_none()))
        .collect();
    let cancel = AtomicBool::new(false);
    let train_one = |i: usize| {
        let run = VariantRun {
            progress: &bars[i],
            record: &record,
            cancel: &cancel,
        };
        let result = train(i, &run);
        if result.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        (i, result)
    };
    let lanes = lane_pools(names.len(), threads, processes)?;
    // With fewer variants left than lanes, the last ones train one after another on all threads
    // instead of leaving lanes idle.
    let together = lanes.as_ref().map_or(0, |p| names.len() - names.len() % p.len());
    let mut results = match lanes {
        Some(pools) => in_lanes(&pools, together, &cancel, train_one)?,
        None => Vec::new(),
    };
    for i in together..names.len() {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        results.push(train_one(i));
    }
    results.sort_by_key(|(i, _)| *i);
    let summaries = first_failure_or(results.into_iter().map(|(i, r)| r.map(|r| (names[i], r))))?;
    let (file, mut metrics) = sink.into_inner().unwrap_or_else(PoisonError::into_inner);
    drop(file);
    // In variant order, then step order, as each line's JSON says ([`line_place`]).
    metrics.sort_by_cached_key(|m| {
        let line = serde_json::to_value(m).unwrap_or_default();
        let place = line_place(&line);
        (
            place.and_then(|(name, _)| names.iter().position(|&n| n == name)),
            place.map(|(_, step)| step),
        )
    });
    if let Some(out) = out {
        write_jsonl(&out.join("metrics.jsonl"), &metrics)?;
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

/// The pools of [`train_variants`]' lanes, sharing out `threads`: with one process, at least two
/// variants and at least two threads. `None`: one variant after another on the run's pool.
fn lane_pools(variants: usize, threads: usize, processes: usize) -> Result<Option<Vec<rayon::ThreadPool>>> {
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
