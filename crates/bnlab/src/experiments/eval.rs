//! `bnlab eval`: test accuracy of a checkpoint of either experiment (`paper-mlp`, `accelerate`),
//! optionally with batch norm folded into the linear layers and convolutions before it.

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
    let invalid = || format!("{}: the settings in the checkpoint are invalid", path.display());
    let unknown = || format!("{}: unknown variant `{}`", path.display(), ck.variant);
    let (variant, mut net, test, bn_stats) = match ck.experiment.as_str() {
        paper_mlp::EXPERIMENT => {
            let mut s: paper_mlp::Settings = serde_json::from_value(ck.settings.clone()).with_context(invalid)?;
            let variant = paper_mlp::Variant::from_name(&ck.variant).with_context(unknown)?;
            if let Some(d) = &opts.data {
                s.data_dir = d.clone();
            }
            s.bn_stats = opts.bn_stats.unwrap_or(s.bn_stats);
            s.check().with_context(invalid)?;
            let (train, test) = data::load(&s.data_dir)?;
            let classes = train.classes.max(test.classes);
            let (net, _) = paper_mlp::build(variant, train.features(), classes, s.init_std, s.seed)?;
            let net = restored(&ck, net, path, &s.data_dir)?;
            let net = with_stats(net, s.bn_stats, &s.eval_settings(), &train)?;
            (variant.name(), net, test, s.bn_stats)
        }
        accelerate::EXPERIMENT => {
            let mut s: accelerate::Settings = serde_json::from_value(ck.settings.clone()).with_context(invalid)?;
            let variant = accelerate::Variant::from_name(&ck.variant).with_context(unknown)?;
            if let Some(d) = &opts.data {
                s.data_dir = d.clone();
            }
            s.bn_stats = opts.bn_stats.unwrap_or(s.bn_stats);
            s.check().with_context(invalid)?;
            let (train, test) = data::load(&s.data_dir)?;
            let classes = train.classes.max(test.classes);
            let net = accelerate::build(&s, variant, train.rows, train.cols, classes)?;
            let net = restored(&ck, net, path, &s.data_dir)?;
            let net = with_stats(net, s.bn_stats, &s.eval_settings(), &train)?;
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

/// `net` with the BN statistics `bn_stats` asks for: Algorithm 2's estimate recomputed over the
/// run's training batches (`population`), or the checkpoint's as they are (`running`).
fn with_stats(mut net: Sequential, bn_stats: BnStats, e: &common::EvalSettings, train: &Dataset) -> Result<Sequential> {
    if bn_stats == BnStats::Population {
        ensure!(
            train.len >= e.batch,
            "the training set has fewer examples than one batch"
        );
        common::use_population_stats(e, &mut net, train)?;
    }
    Ok(net)
}
