//! `bnlab eval`: test accuracy of a paper-mlp checkpoint, optionally with batch norm folded into
//! the linear layers before it.

use super::paper_mlp::{build, count_correct, use_population_stats, BnStats, Settings, Variant, EXPERIMENT};
use crate::data;
use crate::engine::checkpoint::Checkpoint;
use crate::engine::fold::fold_batchnorm;
use crate::engine::Sgd;
use anyhow::{bail, ensure, Context, Result};
use std::path::PathBuf;

/// What `bnlab eval` does.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// IDX directory (default: the one the run trained on).
    pub data: Option<PathBuf>,
    /// Fold BN into the preceding linear layers before evaluating.
    pub fold: bool,
    /// BN statistics (default: the run's `bn_stats`). `population` recomputes Algorithm 2's
    /// estimate over the run's training batches; `running` uses the statistics saved in the
    /// checkpoint as they are.
    pub bn_stats: Option<BnStats>,
}

/// The outcome of `bnlab eval`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    /// The network (`baseline` or `bn`).
    pub variant: Variant,
    /// Training steps the checkpoint had done.
    pub step: u64,
    /// Test examples classified correctly.
    pub correct: usize,
    /// Test examples.
    pub total: usize,
    /// BN statistics used.
    pub bn_stats: BnStats,
    /// BN layers folded away (0 without `--fold` or for the baseline).
    pub folded: usize,
}

impl EvalResult {
    /// correct / total.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// Loads the checkpoint, rebuilds its network and measures test accuracy.
///
/// Rejects every damaged or foreign checkpoint [`Checkpoint::read`] and [`Checkpoint::restore`]
/// reject, a checkpoint of another experiment, settings that do not parse, and data whose image
/// size or class count does not fit the network (as an architecture mismatch).
pub fn eval_checkpoint(opts: &EvalOptions) -> Result<EvalResult> {
    let path = &opts.checkpoint;
    let ck = Checkpoint::read(path).with_context(|| format!("cannot load checkpoint {}", path.display()))?;
    ensure!(
        ck.experiment == EXPERIMENT,
        "{}: a checkpoint of experiment `{}`; `bnlab eval` reads `{EXPERIMENT}` checkpoints",
        path.display(),
        ck.experiment
    );
    let mut s: Settings = serde_json::from_value(ck.settings.clone())
        .with_context(|| format!("{}: the settings in the checkpoint are invalid", path.display()))?;
    let Some(variant) = Variant::from_name(&ck.variant) else {
        bail!("{}: unknown variant `{}`", path.display(), ck.variant);
    };
    if let Some(d) = &opts.data {
        s.data_dir = d.clone();
    }
    s.bn_stats = opts.bn_stats.unwrap_or(s.bn_stats);
    s.check()
        .with_context(|| format!("{}: the settings in the checkpoint are invalid", path.display()))?;
    let (train, test) = data::load(&s.data_dir)?;
    let classes = train.classes.max(test.classes);
    let (mut net, _) = build(variant, train.features(), classes, s.init_std, s.seed)?;
    ck.restore(&mut net, &mut Sgd::new(0.0, 0.0)).with_context(|| {
        format!(
            "cannot load checkpoint {} (data from {})",
            path.display(),
            s.data_dir.display()
        )
    })?;
    if s.bn_stats == BnStats::Population {
        ensure!(
            train.len >= s.batch,
            "the training set has fewer examples than one batch"
        );
        use_population_stats(&s, &mut net, &train)?;
    }
    let mut folded = 0;
    if opts.fold {
        folded = net.batchnorms().len();
        net = fold_batchnorm(net)?;
    }
    let correct = count_correct(&mut net, &test, None)?;
    Ok(EvalResult {
        variant,
        step: ck.progress.step,
        correct,
        total: test.len,
        bn_stats: s.bn_stats,
        folded,
    })
}
