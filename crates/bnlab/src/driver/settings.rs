//! The settings every experiment shares: one struct that is at once the command line's flags
//! (`#[command(flatten)]`) and the first half of `settings.json` (`#[serde(flatten)]`), and the
//! whole settings of a run, [`Settings`]: these common ones beside the experiment's own.

use anyhow::{ensure, Result};
use batchnorm::{BatchNormConfig, Momentum};
use clap::builder::RangedU64ValueParser;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The most worker threads a run may ask for (on the command line or in a `settings.json` read
/// back on resume).
pub const MAX_THREADS: usize = 1024;

/// Which statistics batch norm uses at evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BnStats {
    /// The running (momentum) averages kept during training.
    Running,
    /// Algorithm 2: population statistics over `population_batches` training batches, recomputed
    /// at each evaluation.
    Population,
}

/// How batch norm's running statistics average over batches (`--bn-momentum`): a number m in
/// (0, 1] (`running ← (1 − m)·running + m·batch`) or `cumulative` (the mean of every batch so far).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BnMomentum {
    /// Exponential moving average with this momentum.
    Exponential(f64),
    /// Cumulative average.
    Cumulative(CumulativeTag),
}

/// The word `cumulative` in `settings.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CumulativeTag {
    /// `"cumulative"`.
    Cumulative,
}

impl BnMomentum {
    /// The kernel crate's momentum.
    pub fn momentum(self) -> Momentum {
        match self {
            BnMomentum::Exponential(m) => Momentum::Exponential(m),
            BnMomentum::Cumulative(_) => Momentum::Cumulative,
        }
    }
}

impl std::fmt::Display for BnMomentum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BnMomentum::Exponential(m) => write!(f, "{m}"),
            BnMomentum::Cumulative(_) => f.write_str("cumulative"),
        }
    }
}

/// Parses `--bn-momentum`: a number in (0, 1] or `cumulative`.
pub fn parse_bn_momentum(s: &str) -> Result<BnMomentum, String> {
    if s == "cumulative" {
        return Ok(BnMomentum::Cumulative(CumulativeTag::Cumulative));
    }
    match s.parse::<f64>() {
        Ok(m) if m.is_finite() && m > 0.0 && m <= 1.0 => Ok(BnMomentum::Exponential(m)),
        _ => Err(format!("expected a number in (0, 1] or `cumulative`, got `{s}`")),
    }
}

/// A finite number > 0.
pub fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a number > 0, got `{s}`")),
    }
}

/// `on` or `off`.
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected `on` or `off`, got `{s}`")),
    }
}

/// Settings every experiment has. As flags, the experiments' defaults for `--steps`,
/// `--eval-every`, `--batch` and `--lr` are set by the command line ([`Defaults`]); the fields
/// without a flag (`data_dir`, `out`, `threads`, `processes`) are set from how the run is started.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[group(id = "settings", multiple = true)]
pub struct CommonSettings {
    /// Training steps per variant.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Steps between evaluations on the test set (and after the last step).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub eval_every: u64,
    /// Steps between checkpoints (`OUT/checkpoints/<variant>.safetensors`; one is also written at
    /// the end of each variant) [default: --eval-every]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: Option<u64>,
    /// Seed of initialization, shuffling (and dropout).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Mini-batch size.
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(2..=60000))]
    pub batch: usize,
    /// SGD learning rate (the base rate, for experiments whose variants scale it).
    #[arg(long, allow_negative_numbers = true, value_parser = parse_positive)]
    pub lr: f64,
    /// BN statistics used at evaluation: Algorithm 2's population estimate or the running averages.
    #[arg(long, value_enum, default_value_t = BnStats::Population)]
    pub bn_stats: BnStats,
    /// Training batches averaged for the population statistics.
    #[arg(long, default_value_t = 50, value_parser = RangedU64ValueParser::<usize>::new().range(1..=10000))]
    pub population_batches: usize,
    /// Batch norm's ε, added to the variance.
    #[arg(long, default_value_t = 1e-5, allow_negative_numbers = true, value_parser = parse_positive)]
    pub bn_eps: f64,
    /// Momentum of batch norm's running statistics: a number in (0, 1] or `cumulative`.
    #[arg(long, default_value = "0.1", value_parser = parse_bn_momentum)]
    pub bn_momentum: BnMomentum,
    /// With --distributed: batch norm over the global batch (`on`) or over each process's shard
    /// (`off`).
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub bn_sync: bool,
    /// IDX data directory (`--data`).
    #[arg(skip = PathBuf::from(crate::data::DEFAULT_DATA_DIR))]
    pub data_dir: PathBuf,
    /// Output directory (`--out`).
    #[arg(skip)]
    pub out: PathBuf,
    /// Worker threads (`--threads`).
    #[arg(skip = 1usize)]
    pub threads: usize,
    /// Data-parallel processes (recorded: the communicator decides).
    #[arg(skip = 1usize)]
    pub processes: usize,
    /// The data the run trains on (set when it starts; checked on resume).
    #[arg(skip)]
    #[serde(default)]
    pub data_identity: Option<super::DataIdentity>,
}

/// The defaults an experiment gives the common flags that have no default of their own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    /// `--steps`.
    pub steps: u64,
    /// `--eval-every`.
    pub eval_every: u64,
    /// `--batch`.
    pub batch: usize,
    /// `--lr`.
    pub lr: f64,
}

impl Defaults {
    /// `--steps steps --eval-every eval_every --batch batch --lr lr`.
    pub const fn new(steps: u64, eval_every: u64, batch: usize, lr: f64) -> Self {
        Defaults {
            steps,
            eval_every,
            batch,
            lr,
        }
    }
}

impl CommonSettings {
    /// The settings of a run with every flag at its default (`defaults` for those the experiment
    /// chooses), reading Debian's Fashion-MNIST, writing to `out`, one thread and one process.
    pub fn new(defaults: Defaults, out: PathBuf) -> Self {
        let bn = BatchNormConfig::default();
        let momentum = match bn.momentum {
            Momentum::Exponential(m) => BnMomentum::Exponential(m),
            Momentum::Cumulative => BnMomentum::Cumulative(CumulativeTag::Cumulative),
        };
        CommonSettings {
            steps: defaults.steps,
            eval_every: defaults.eval_every,
            checkpoint_every: None,
            seed: 1,
            batch: defaults.batch,
            lr: defaults.lr,
            bn_stats: BnStats::Population,
            population_batches: 50,
            bn_eps: bn.eps,
            bn_momentum: momentum,
            bn_sync: true,
            data_dir: PathBuf::from(crate::data::DEFAULT_DATA_DIR),
            out,
            threads: 1,
            processes: 1,
            data_identity: None,
        }
    }

    /// Steps between checkpoints.
    pub fn checkpoint_every(&self) -> u64 {
        self.checkpoint_every.unwrap_or(self.eval_every)
    }

    /// The configuration of every batch-norm layer of the run's networks.
    pub fn bn_config(&self) -> BatchNormConfig {
        BatchNormConfig {
            eps: self.bn_eps,
            momentum: self.bn_momentum.momentum(),
            ..BatchNormConfig::default()
        }
    }

    /// Rejects settings that cannot run, with the flag to change: the same ranges as the
    /// command line's, for settings read back from `settings.json` too.
    pub fn check(&self) -> Result<()> {
        ensure!(self.steps > 0, "--steps must be > 0");
        ensure!(self.eval_every > 0, "--eval-every must be > 0");
        ensure!(self.checkpoint_every() > 0, "--checkpoint-every must be > 0");
        ensure!(
            (2..=60000).contains(&self.batch),
            "--batch must be in 2..=60000 (batch norm needs 2 values per feature)"
        );
        ensure!(self.lr.is_finite() && self.lr > 0.0, "--lr must be a finite number > 0");
        ensure!(
            (1..=10000).contains(&self.population_batches),
            "--population-batches must be in 1..=10000"
        );
        ensure!(
            self.bn_eps.is_finite() && self.bn_eps > 0.0,
            "--bn-eps must be a finite number > 0"
        );
        if let BnMomentum::Exponential(m) = self.bn_momentum {
            ensure!(m.is_finite() && m > 0.0 && m <= 1.0, "--bn-momentum must be in (0, 1]");
        }
        ensure!(
            (1..=MAX_THREADS).contains(&self.threads),
            "--threads must be in 1..={MAX_THREADS}"
        );
        ensure!(self.processes >= 1, "the process count must be at least 1");
        Ok(())
    }
}

/// An experiment's own settings, beside [`CommonSettings`] in [`Settings`]: what the driver reads
/// in them.
pub trait ExperimentSettings: Serialize + serde::de::DeserializeOwned + Clone + std::fmt::Debug + Send + Sync {
    /// The experiment's variants.
    type Variant: super::Variant;

    /// Rejects settings that cannot run, with the flag to change; `common` are the run's common
    /// settings (checked by the driver before).
    fn check(&self, common: &CommonSettings) -> Result<()>;

    /// The variants the run trains, in order.
    fn variants(&self) -> &[Self::Variant];
}

/// Everything that defines a run: the settings every experiment has and the experiment's own
/// `S`, side by side in one `settings.json` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings<S> {
    /// The common settings.
    #[serde(flatten)]
    pub common: CommonSettings,
    /// The experiment's own.
    #[serde(flatten)]
    pub experiment: S,
}

/// The settings of the run in `dir` (its `settings.json`), with `out` set to `dir`. Rejects a
/// directory without a readable, valid `settings.json`, saying it is not `what` to resume (e.g.
/// "a paper-mlp run").
pub fn read_settings<S: serde::de::DeserializeOwned>(dir: &Path, what: &str) -> Result<Settings<S>> {
    use anyhow::Context;
    let path = dir.join("settings.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not {what} to resume: cannot read {}",
            dir.display(),
            path.display()
        )
    })?;
    let mut s: Settings<S> = parse_settings(&text).with_context(|| format!("{}: invalid settings", path.display()))?;
    s.common.out = dir.to_path_buf();
    Ok(s)
}

/// Settings from the text of a `settings.json`. Rejects text that is not JSON or lacks a field
/// (the values themselves are checked by [`super::check_settings`]).
pub fn parse_settings<S: serde::de::DeserializeOwned>(text: &str) -> Result<Settings<S>> {
    Ok(serde_json::from_str(text)?)
}
