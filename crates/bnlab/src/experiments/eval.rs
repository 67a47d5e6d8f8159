//! `bnlab eval`: test accuracy of a checkpoint of either experiment (`paper-mlp`, `accelerate`),
//! optionally with batch norm folded into the linear layers and convolutions before it.

use super::common::ExperimentSettings;
use super::{accelerate, common, paper_mlp};
use crate::data::{self, Dataset};
use crate::engine::checkpoint::Checkpoint;
use crate::engine::fold::fold_batchnorm;
use crate::engine::{Sequential, Sgd};
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

pub use common::BnStats;

/// What `bnlab eval` does.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// IDX directory (default: the one the run trained on).
    pub data: Option<PathBuf>,
    /// Fold BN into the preceding linear layers and convolutions before evaluating.
    pub fold: bool,
    /// BN statistics (default: the run's `bn_stats`). `population` recomputes Algorithm 2's
    /// estimate over the run's training batches; `running` uses the statistics saved in the
    /// checkpoint as they are.
    pub bn_stats: Option<BnStats>,
}

/// The outcome of `bnlab eval`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    /// The network's variant (`baseline`, `bn`, `bn-x5`, …).
    pub variant: &'static str,
    /// Training steps the checkpoint had done.
    pub step: u64,
    /// Test examples classified correctly.
    pub correct: usize,
    /// Test examples.
    pub total: usize,
    /// BN statistics used.
    pub bn_stats: BnStats,
    /// BN layers folded away (0 without `--fold` or for a network without BN).
    pub folded: usize,
}

impl EvalResult {
    /// correct / total.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// Loads the checkpoint, rebuilds its network (from the settings it holds) and measures test
/// accuracy.
///
/// Rejects every damaged or foreign checkpoint [`Checkpoint::read`] and [`Checkpoint::restore`]
/// reject, a checkpoint of an unknown experiment or variant, settings that do not parse, and data
/// whose image size or class count does not fit the network (as an architecture mismatch).
pub fn eval_checkpoint(opts: &EvalOptions) -> Result<EvalResult> {
    let path = &opts.checkpoint;
    let ck = Checkpoint::read(path).with_context(|| format!("cannot load checkpoint {}", path.display()))?;
    let unknown = || format!("{}: unknown variant `{}`", path.display(), ck.variant);
    let (variant, mut net, test, bn_stats) = match ck.experiment.as_str() {
        paper_mlp::EXPERIMENT => {
            let (s, variant): (paper_mlp::Settings, _) = settings(&ck, opts, path, || {
                paper_mlp::Variant::from_name(&ck.variant).with_context(unknown)
            })?;
            let (net, test) = network(&ck, path, &s, |train, classes| {
                Ok(paper_mlp::build(variant, train.features(), classes, s.init_std, s.seed)?.0)
            })?;
            (variant.name(), net, test, s.bn_stats)
        }
        accelerate::EXPERIMENT => {
            let (s, variant): (accelerate::Settings, _) = settings(&ck, opts, path, || {
                accelerate::Variant::from_name(&ck.variant).with_context(unknown)
            })?;
            let (net, test) = network(&ck, path, &s, |train, classes| {
                accelerate::build(&s, variant, train.rows, train.cols, classes)
            })?;
            (variant.name(), net, test, s.bn_stats)
        }
        other => bail!(
            "{}: a checkpoint of experiment `{other}`; `bnlab eval` reads `{}` and `{}` checkpoints",
            path.display(),
            paper_mlp::EXPERIMENT,
            accelerate::EXPERIMENT
        ),
    };
    let mut folded = 0;
    if opts.fold {
        folded = net.batchnorms().len();
        net = fold_batchnorm(net)?;
    }
    let correct = common::count_correct(&mut net, &test, |_| {})?;
    Ok(EvalResult {
        variant,
        step: ck.progress.step,
        correct,
        total: test.len,
        bn_stats,
        folded,
    })
}

/// The settings the checkpoint holds, with `opts`' data directory and BN statistics, checked,
/// and its variant (`variant` parses it, after the settings parse and before they are checked).
fn settings<S: ExperimentSettings, V>(
    ck: &Checkpoint,
    opts: &EvalOptions,
    path: &Path,
    variant: impl FnOnce() -> Result<V>,
) -> Result<(S, V)> {
    let invalid = || format!("{}: the settings in the checkpoint are invalid", path.display());
    let mut s: S = serde_json::from_value(ck.settings.clone()).with_context(invalid)?;
    let variant = variant()?;
    if let Some(d) = &opts.data {
        *s.data_dir_mut() = d.clone();
    }
    if let Some(b) = opts.bn_stats {
        *s.bn_stats_mut() = b;
    }
    s.check_settings().with_context(invalid)?;
    Ok((s, variant))
}

/// The run's network, built by `build(train, classes)` from the settings `s`, with the
/// checkpoint's parameters and the BN statistics `s` asks for; and the test set.
fn network<S: ExperimentSettings>(
    ck: &Checkpoint,
    path: &Path,
    s: &S,
    build: impl FnOnce(&Dataset, usize) -> Result<Sequential>,
) -> Result<(Sequential, Dataset)> {
    let (train, test) = data::load(s.data_dir())?;
    let classes = train.classes.max(test.classes);
    let mut net = restored(ck, build(&train, classes)?, path, s.data_dir())?;
    // Algorithm 2's estimate recomputed over the run's training batches (`population`), or the
    // checkpoint's statistics as they are (`running`).
    let e = s.evaluation();
    if e.bn_stats == BnStats::Population {
        ensure!(
            train.len >= e.batch,
            "the training set has fewer examples than one batch"
        );
        common::use_population_stats(&e, &mut net, &train)?;
    }
    Ok((net, test))
}

/// `net` with the checkpoint's parameters and state (the optimizer's is read and dropped).
fn restored(ck: &Checkpoint, mut net: Sequential, path: &Path, data_dir: &Path) -> Result<Sequential> {
    ck.restore(&mut net, &mut Sgd::new(0.0, 0.0)).with_context(|| {
        format!(
            "cannot load checkpoint {} (data from {})",
            path.display(),
            data_dir.display()
        )
    })?;
    Ok(net)
}
