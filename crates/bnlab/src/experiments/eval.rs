//! `bnlab eval`: test accuracy of a checkpoint of any experiment (`paper-mlp`, `accelerate`,
//! `small-batch`, `padded`: under its training lengths), optionally with batch norm folded into
//! the linear layers and convolutions before it.

use super::{Accelerate, Padded, PaperMlp, SmallBatch};
use crate::driver::evaluate::{count_correct, use_population_stats};
use crate::driver::train::VariantPrep;
use crate::driver::{self, BnStats, Data, Experiment, ExperimentSettings, Settings, Variant, VariantOf};
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
/// reject, a checkpoint of an unknown experiment or variant, settings that do not parse or do not
/// pass the run's checks, and data whose image size or class count does not fit the network (as
/// an architecture mismatch).
pub fn eval_checkpoint(opts: &EvalOptions) -> Result<EvalResult> {
    let ck = driver::read_checkpoint(&opts.checkpoint)?;
    match ck.experiment.as_str() {
        PaperMlp::NAME => eval_with(&PaperMlp, &ck, opts),
        Accelerate::NAME => eval_with(&Accelerate, &ck, opts),
        SmallBatch::NAME => eval_with(&SmallBatch, &ck, opts),
        Padded::NAME => eval_with(&Padded, &ck, opts),
        other => bail!(
            "{}: a checkpoint of experiment `{other}`; `bnlab eval` reads `{}`, `{}`, `{}` and `{}` checkpoints",
            opts.checkpoint.display(),
            PaperMlp::NAME,
            Accelerate::NAME,
            SmallBatch::NAME,
            Padded::NAME
        ),
    }
}

/// [`eval_checkpoint`] of a checkpoint `ck` of `experiment`.
fn eval_with<E: Experiment>(experiment: &E, ck: &Checkpoint, opts: &EvalOptions) -> Result<EvalResult> {
    let path = &opts.checkpoint;
    let invalid = || format!("{}: the settings in the checkpoint are invalid", path.display());
    let mut s: Settings<E::Settings> = serde_json::from_value(ck.settings.clone()).with_context(invalid)?;
    let variant = VariantOf::<E>::from_name(&ck.variant)
        .with_context(|| format!("{}: unknown variant `{}`", path.display(), ck.variant))?;
    if let Some(d) = &opts.data {
        s.common.data_dir = d.clone();
    }
    if let Some(b) = opts.bn_stats {
        s.common.bn_stats = b;
    }
    // Threads are not the checkpoint's business here: the caller's pool runs the evaluation.
    s.common.threads = s.common.threads.clamp(1, driver::settings::MAX_THREADS);
    s.common.check().with_context(invalid)?;
    s.experiment.check(&s.common).with_context(invalid)?;
    let data = Data::load(&s.common.data_dir, E::CLASSES)?;
    let mut net = experiment.build(&s, variant, &data, 0)?.net;
    ck.restore(&mut net, &mut Sgd::new(0.0, 0.0)).with_context(|| {
        format!(
            "cannot load checkpoint {} (data from {})",
            path.display(),
            s.common.data_dir.display()
        )
    })?;
    // Algorithm 2's estimate recomputed over the variant's training batches (`population`), or
    // the checkpoint's statistics as they are (`running`).
    let c = experiment.variant_settings(&s, variant);
    let mut prep = VariantPrep {
        experiment,
        s: &s,
        variant,
    };
    if c.bn_stats == BnStats::Population {
        ensure!(
            data.train.len >= c.batch,
            "the training set has fewer examples than one batch"
        );
        use_population_stats(&c, &mut net, &data.train, &mut prep)?;
    }
    let mut folded = 0;
    if opts.fold {
        folded = net.batchnorms().len();
        net = fold_batchnorm(net)?;
    }
    // Test condition 0: an experiment's own test set (for `padded`, the training lengths).
    let correct = count_correct(&mut net, &data.test, 0, &mut prep, |_| {})?;
    Ok(EvalResult {
        variant: variant.name(),
        step: ck.progress.step,
        correct,
        total: data.test.len,
        bn_stats: s.common.bn_stats,
        folded,
    })
}
