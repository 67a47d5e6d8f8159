//! The lab's experiments, each an [`Experiment`](crate::driver::Experiment) of the run driver
//! (declared here: [`PaperMlp`], [`Accelerate`], [`SmallBatch`], [`Padded`]; each module
//! implements its own): its settings, its variants, its networks and its outputs.
//!
//! - [`paper_mlp`]: the paper's MNIST experiment (Section 4.1, Figure 1).
//! - [`accelerate`]: the "accelerating BN networks" study (Section 4.2, Figure 3) on a small conv net.
//! - [`small_batch`]: small and non-i.i.d. mini-batches, plain BN against its variants.
//! - [`padded`]: padded sequences, batch norm over every position against masked batch norm.
//! - [`convnet`]: the conv net both conv studies build.
//! - [`eval`]: test accuracy of a checkpoint of either (`bnlab eval`).
//!
//! `accelerate`, `small-batch` and `padded` are studies ([`Study`]): their command lines share the
//! flags of their variants, learning-rate half-life, channels and `--quick`.

pub mod accelerate;
pub mod convnet;
pub mod eval;
pub mod padded;
pub mod paper_mlp;
pub mod small_batch;

use crate::driver::{CommonSettings, Defaults, Experiment, ExperimentSettings, Settings, Variant};
use anyhow::{ensure, Result};
use convnet::default_half_life;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The paper's MNIST experiment (Figure 1, [`paper_mlp`]): plain SGD, a diverging variant ends the
/// run.
#[derive(Debug, Clone, Copy, Default)]
pub struct PaperMlp;

/// The "accelerating BN networks" study (Figure 3, [`accelerate`]): SGD with momentum, a diverging
/// variant stops and the others go on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Accelerate;

/// The small-batch study ([`small_batch`]): SGD with momentum, a diverging variant stops and the
/// others go on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SmallBatch;

/// The padded-sequences study ([`padded`]): a diverging variant stops and the others go on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Padded;

/// A study (`accelerate`, `small-batch`, `padded`): an experiment whose command line has, beside
/// its own flags, the ones every study has: `--variants`, `--half-life`, `--channels` (of its two
/// convolutions) and `--quick`. The first three set the [`StudySettings`] in its settings; its
/// settings start from their [`Preset`].
pub trait Study: Experiment<Settings: Preset> {
    /// Its help for the flags every study has.
    const HELP: StudyHelp;
}

/// A study's help for the flags every study has ([`Study::HELP`]), one line each as `--help`
/// shows it.
#[derive(Debug, Clone, Copy)]
pub struct StudyHelp {
    /// `--variants`.
    pub variants: &'static str,
    /// `--half-life`.
    pub half_life: &'static str,
    /// `--channels`.
    pub channels: &'static str,
    /// `--quick`.
    pub quick: &'static str,
}

/// The settings every study has (the flags every study has set them), first in each study's own
/// settings and, in `settings.json`, beside them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudySettings<V> {
    /// Networks to train, in order (`--variants`).
    pub variants: Vec<V>,
    /// Steps over which the learning rate halves (`--half-life`; for studies whose variants scale
    /// it, the steps of the base rate or of the reference batch).
    pub half_life: u64,
    /// Output channels of the two convolutions (`--channels`).
    pub channels: [usize; 2],
}

impl<V: Variant> StudySettings<V> {
    /// Every variant, `channels`, and the learning rate halving every third of a run of `steps`
    /// steps ([`default_half_life`]).
    pub fn new(channels: [usize; 2], steps: u64) -> Self {
        StudySettings {
            variants: V::ALL.to_vec(),
            half_life: default_half_life(steps),
            channels,
        }
    }

    /// Rejects a half-life of 0 (the channels are checked with the net).
    pub fn check(&self) -> Result<()> {
        ensure!(self.half_life > 0, "--half-life must be > 0");
        Ok(())
    }
}

/// A study's own settings (`AccelerateSettings`, `SmallBatchSettings`, `PaddedSettings`): where
/// they start, by default and with `--quick` ([`Settings::new`], [`Settings::quick`]), and the
/// settings every study has in them.
pub trait Preset: ExperimentSettings {
    /// The study's choices of the common settings that have no default of their own.
    const DEFAULTS: Defaults;
    /// What `--quick` changes in the common settings and in the [`StudySettings`]: a run of
    /// seconds for CI.
    const QUICK: QuickPreset;

    /// The study's own settings by default (the run's length: [`Preset::DEFAULTS`]'s steps).
    fn defaults() -> Self;

    /// The settings every study has, in these.
    fn study(&mut self) -> &mut StudySettings<Self::Variant>;

    /// What `--quick` changes in the study's own settings besides [`Preset::QUICK`]: nothing by
    /// default.
    fn quick_own(&mut self) {}
}

impl<T: Preset> Settings<T> {
    /// The study's default settings, writing to `out`: [`Preset::DEFAULTS`] and
    /// [`Preset::defaults`].
    pub fn new(out: PathBuf) -> Self {
        Settings {
            common: CommonSettings::new(T::DEFAULTS, out),
            experiment: T::defaults(),
        }
    }

    /// The settings of a run of seconds for CI (`--quick`): [`Preset::QUICK`], then
    /// [`Preset::quick_own`].
    pub fn quick(mut self) -> Self {
        T::QUICK.apply(&mut self.common, self.experiment.study());
        self.experiment.quick_own();
        self
    }
}

/// A study's `--quick` preset ([`Preset::QUICK`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuickPreset {
    /// Training steps.
    pub steps: u64,
    /// Steps between evaluations.
    pub eval_every: u64,
    /// Training batches of the population statistics.
    pub population_batches: usize,
    /// Output channels of the two convolutions.
    pub channels: [usize; 2],
}

impl QuickPreset {
    /// `steps` steps evaluated every `eval_every`, `population_batches` population batches, a net
    /// of `channels`.
    pub const fn new(steps: u64, eval_every: u64, population_batches: usize, channels: [usize; 2]) -> Self {
        QuickPreset {
            steps,
            eval_every,
            population_batches,
            channels,
        }
    }

    /// Sets the preset's common settings (no checkpoints but the last) and its channels, with the
    /// learning rate halving every third of its steps ([`default_half_life`]).
    pub fn apply<V>(&self, common: &mut CommonSettings, study: &mut StudySettings<V>) {
        common.steps = self.steps;
        common.eval_every = self.eval_every;
        common.checkpoint_every = None;
        common.population_batches = self.population_batches;
        study.channels = self.channels;
        study.half_life = default_half_life(self.steps);
    }
}
