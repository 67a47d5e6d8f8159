//! The lab's experiments, each an [`Experiment`](crate::driver::Experiment) of the run driver:
//! its settings, its variants, its networks and its outputs.
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

use crate::driver::Experiment;

/// A study (`accelerate`, `small-batch`, `padded`): an experiment whose command line has, beside
/// its own flags, the ones every study has: `--variants`, `--half-life`, `--channels` (of its two
/// convolutions) and `--quick`. What those flags set in its settings, and its words for them.
pub trait Study: Experiment {
    /// Its help for the flags every study has.
    const HELP: StudyHelp;

    /// Its own settings before any flag: the defaults, or `--quick`'s preset with `quick`.
    fn defaults(quick: bool) -> Self::Settings;

    /// The settings the flags every study has set, in `settings`.
    fn flag_settings(settings: &mut Self::Settings) -> FlagSettings<'_, Self::Variant>;
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

/// The settings of a study that the flags every study has set ([`Study::flag_settings`]).
#[derive(Debug)]
pub struct FlagSettings<'a, V> {
    /// Networks to train, in order (`--variants`).
    pub variants: &'a mut Vec<V>,
    /// Steps over which the learning rate halves (`--half-life`).
    pub half_life: &'a mut u64,
    /// Output channels of the two convolutions (`--channels`).
    pub channels: &'a mut [usize; 2],
}
