//! Command-line arguments: parsing only; each subcommand calls into the library.
//!
//! The flags every experiment has are the library's [`CommonSettings`] (flattened); the
//! experiments' defaults for those without a default of their own are set here from each
//! experiment's [`Defaults`] (a study's: [`Preset::DEFAULTS`]), in [`command`]. The flags every
//! study has are [`StudyFlags`]; each study's help for them is its [`Study::HELP`].

use bnlab::driver::settings::{parse_positive, MAX_THREADS};
use bnlab::driver::{BnStats, CommonSettings, Defaults};
use bnlab::experiments::{accelerate, padded, paper_mlp, small_batch, Accelerate, Padded, Preset, SmallBatch, Study};
use clap::builder::ArgPredicate;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;

/// bnlab: batch normalization, measured and reproduced.
#[derive(Debug, Parser)]
#[command(name = "bnlab", version, about)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Time the batch-norm kernels (fwd_train, fwd_eval, backward) and their variants on the
    /// benchmark shapes.
    Bench(BenchArgs),
    /// Train the paper's MNIST MLP with and without batch norm (Figure 1) and write a report.
    PaperMlp(ExperimentArgs<PaperMlpFlags>),
    /// The paper's "accelerating BN networks" study (Figure 3) on a small conv net.
    Accelerate(StudyArgs<accelerate::Variant, AccelerateFlags>),
    /// Small and non-i.i.d. mini-batches: plain BN against batch renorm, ghost BN, frozen BN and
    /// no BN at batch sizes 2 to 64, the same examples seen.
    SmallBatch(StudyArgs<small_batch::Variant, SmallBatchFlags>),
    /// Padded sequences: batch norm over every position (padding included) against masked batch
    /// norm and no BN, trained on one length distribution and tested on several.
    Padded(StudyArgs<padded::Variant, PaddedFlags>),
    /// Test accuracy of a checkpoint (paper-mlp, accelerate, small-batch or padded), optionally
    /// with BN folded into the layers before it.
    Eval(EvalArgs),
}

/// Which networks `paper-mlp` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VariantChoice {
    /// Baseline and BN.
    Both,
    /// Only the BN network.
    Bn,
    /// Only the baseline.
    Baseline,
}

/// How a training run is started: where its files are, how many threads and processes run it,
/// whether it continues an earlier run. Not part of the run's settings.
#[derive(Debug, Args)]
#[group(id = "run", multiple = true)]
pub struct RunFlags {
    /// Directory with the four IDX files [default: /usr/share/datasets/fashion-mnist, Debian's
    /// Fashion-MNIST; with --resume, the run's]
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory (default: a new folder under runs/; required with --distributed).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace the run in --out if it holds one (its settings, metrics and checkpoints are
    /// removed first); without it such a directory is refused.
    #[arg(long)]
    pub overwrite: bool,
    /// Continue the run in this output directory from its checkpoints, with its settings
    /// (only --data, --threads, --quiet and --distributed may be given with it).
    #[arg(long, conflicts_with_all = ["out", "overwrite", "settings", "experiment"])]
    pub resume: Option<PathBuf>,
    /// Worker threads; with 2 or more, that many variants train at once, each on its share
    /// [default: all cores; with --resume, the run's]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=MAX_THREADS as i64))]
    pub threads: Option<u32>,
    /// No progress bar or log lines.
    #[arg(long)]
    pub quiet: bool,
    /// Data-parallel training over MPI: run under `mpirun -np P` (needs the `mpi` feature).
    #[arg(long)]
    pub distributed: bool,
}

/// Options of a training subcommand: the experiment's own flags `F`, the flags every experiment
/// has, and how the run is started.
#[derive(Debug, Args)]
pub struct ExperimentArgs<F: Args> {
    /// The experiment's own flags.
    #[command(flatten)]
    pub experiment: F,
    /// Flags every experiment has.
    #[command(flatten)]
    pub settings: CommonSettings,
    /// How the run is started.
    #[command(flatten)]
    pub run: RunFlags,
}

/// Options of a study's subcommand: the flags every study has (variants `V`), then those of
/// [`ExperimentArgs`] (the study's own `F` first).
#[derive(Debug, Args)]
pub struct StudyArgs<V: StudyVariant, F: Args> {
    /// The flags every study has.
    #[command(flatten)]
    pub study: StudyFlags<V>,
    /// The study's own flags, the flags every experiment has and how the run is started.
    #[command(flatten)]
    pub experiment_args: ExperimentArgs<F>,
}

/// What a study's variant type must be for `--variants`: parsed from its name.
pub trait StudyVariant: std::str::FromStr<Err = String> + Clone + Send + Sync + 'static {}
impl<V: std::str::FromStr<Err = String> + Clone + Send + Sync + 'static> StudyVariant for V {}

/// The flags every study has (its variants `V`). Their help here is generic: each study's
/// subcommand shows its own ([`Study::HELP`], set by [`command`]).
#[derive(Debug, Args)]
#[group(id = "study", multiple = true, conflicts_with = "resume")]
pub struct StudyFlags<V: StudyVariant> {
    /// Variants to train, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', value_parser = parse_variant::<V>)]
    pub variants: Option<Vec<V>>,
    /// Steps over which the learning rate halves (default: steps / 3).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub half_life: Option<u64>,
    /// Output channels of the two convolutions, `C1,C2`.
    #[arg(long, value_delimiter = ',', num_args = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub channels: Option<Vec<u32>>,
    /// A short run for CI (each of its presets can still be set by its flag).
    #[arg(long)]
    pub quick: bool,
}

/// `--variants`' parser: a variant's name.
fn parse_variant<V: StudyVariant>(name: &str) -> Result<V, String> {
    name.parse()
}

/// The flags only `paper-mlp` has.
#[derive(Debug, Args)]
#[group(id = "experiment", multiple = true)]
pub struct PaperMlpFlags {
    /// Networks to train.
    #[arg(long, value_enum, default_value_t = VariantChoice::Both)]
    pub variant: VariantChoice,
    /// Standard deviation of the Gaussian initial weights.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true, value_parser = parse_positive)]
    pub init_std: f64,
}

/// The flags only `accelerate` has.
#[derive(Debug, Args)]
#[group(id = "experiment", multiple = true)]
pub struct AccelerateFlags {
    /// Width of the hidden linear layer (default 100; 32 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub hidden: Option<u32>,
}

/// The flags only `small-batch` has. `--steps`, `--eval-every`, `--population-batches` and
/// `--lr` count at the reference batch `--batch`: a variant with batch B takes `--batch`/B times
/// as many steps at B/`--batch` times the rate.
#[derive(Debug, Args)]
#[group(id = "experiment", multiple = true)]
pub struct SmallBatchFlags {
    /// How mini-batches are drawn: shuffled epochs, or each batch from --classes-per-batch classes.
    #[arg(long, value_enum, default_value_t = small_batch::BatchMode::Iid)]
    pub batches: small_batch::BatchMode,
    /// Classes per mini-batch with --batches grouped.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub classes_per_batch: u32,
    /// Reference steps of plain BN before the frozen variants freeze (default: steps / 4).
    #[arg(long)]
    pub freeze_after: Option<u64>,
    /// Width of the hidden linear layer (default 100; 16 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub hidden: Option<u32>,
}

/// The flags only `padded` has.
#[derive(Debug, Args)]
#[group(id = "experiment", multiple = true)]
pub struct PaddedFlags {
    /// Lengths of the training sequences, MIN-MAX (uniform) or N; each image's rows are cut to its
    /// length and padded back to the image's height.
    #[arg(long, default_value = "8-28")]
    pub train_lengths: padded::Lengths,
    /// Test conditions after the training lengths, comma-separated (MIN-MAX or N each): every
    /// evaluation also measures the test set under these.
    #[arg(long, value_delimiter = ',', default_value = "28,4-10")]
    pub test_lengths: Vec<padded::Lengths>,
    /// What the padded steps hold: any number, nan, inf or -inf.
    #[arg(long, default_value = "0", allow_negative_numbers = true, value_parser = padded::parse_pad_value)]
    pub pad_value: f32,
}

/// Options of `bnlab eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A checkpoint written by `bnlab paper-mlp`, `accelerate` or `small-batch`
    /// (OUT/checkpoints/<variant>.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Directory with the four IDX files [default: the run's]
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Fold every BN layer into the linear layer or convolution before it and evaluate the folded
    /// network.
    #[arg(long)]
    pub fold: bool,
    /// BN statistics: Algorithm 2's population estimate (recomputed over the run's training
    /// batches) or the running statistics stored in the checkpoint [default: the run's]
    #[arg(long, value_enum)]
    pub bn_stats: Option<BnStats>,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=MAX_THREADS as i64))]
    pub threads: Option<u32>,
}

/// Options of `bnlab bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=MAX_THREADS as i64))]
    pub threads: Option<u32>,
    /// Minimum seconds spent timing each operation (the median of the repetitions is reported).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true, value_parser = parse_positive)]
    pub min_time: f64,
    /// Time only the cases whose name (`LAYOUT[N,C,…]`, e.g. `NHWC[64,256,14,14]`) contains one of
    /// these strings (repeatable; case-sensitive). Default: every case.
    #[arg(long, value_name = "SUBSTRING")]
    pub only: Vec<String>,
    /// Time each call in CPU time of the calling thread instead of wall-clock time: leaves out
    /// the time it was descheduled, for A/B comparisons on a busy machine. Needs --threads 1.
    #[arg(long)]
    pub cpu_time: bool,
    /// Batch-norm variants to time, comma-separated or repeated (bn: fwd_train, fwd_eval,
    /// backward; frozen, renorm, ghost, masked, masked-random: fwd_train, backward; masked: half
    /// of the positions valid as in padded sequences, masked-random: a random half). Default: all
    /// but fused, each case's variants one after the other in the same run.
    ///
    /// fused: batch norm fused with the ReLU after it, each op beside our unfused sequence for
    /// the same work: fwd_train_relu (training forward of relu(bn(x)), the ReLU and its 1-bit
    /// mask written in the pass that writes y), fwd_train_relu_unfused (batch norm's training
    /// forward, then a ReLU pass over y), backward_relu (dx, dγ, dβ from the saved statistics and
    /// the mask), backward_relu_unfused (a pass g = dy·[y > 0], then batch norm's backward from
    /// g), and the same four with a residual z: fwd_train_add_relu (relu(bn(x) + z)),
    /// fwd_train_add_relu_unfused (then one pass y = relu(y + z)), backward_add_relu (dz written
    /// too), backward_add_relu_unfused (g is dz).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub variant: Vec<bnlab::bench::Variant>,
    /// Element types of the tensors, comma-separated or repeated: f32, bf16, f16 (x, y, dy, dx,
    /// z, dz in the type; γ, β, statistics, dγ, dβ in f32). Default: all three, each variant's
    /// rows in f32, then bf16, then f16, so a default run takes about three times as long as one
    /// with --dtype f32. GB/s counts 4 bytes per f32 element and 2 per bf16 or f16 element.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub dtype: Vec<bnlab::bench::Dtype>,
}

/// The command line's parser: [`Cli`] with each experiment's defaults of the common flags
/// ([`paper_mlp::DEFAULTS`] and each study's [`Preset::DEFAULTS`] and [`Preset::QUICK`]).
pub fn command() -> clap::Command {
    Cli::command()
        .mut_subcommand("paper-mlp", |c| with_defaults(c, &paper_mlp::DEFAULTS))
        .mut_subcommand("accelerate", study_command::<Accelerate>)
        .mut_subcommand("small-batch", study_command::<SmallBatch>)
        .mut_subcommand("padded", study_command::<Padded>)
}

/// `c` as the subcommand of study `S`: with the study's help for the flags every study has
/// ([`StudyFlags`]), its defaults ([`with_defaults`]) and, with `--quick`, its preset's steps,
/// evaluation interval and population batches as the defaults of those flags.
fn study_command<S: Study>(c: clap::Command) -> clap::Command {
    let help = S::HELP;
    let c = c
        .mut_arg("variants", |a| a.help(help.variants))
        .mut_arg("half_life", |a| a.help(help.half_life))
        .mut_arg("channels", |a| a.help(help.channels))
        .mut_arg("quick", |a| a.help(help.quick));
    let quick = S::Settings::QUICK;
    // `--quick` is a SetTrue flag, whose implicit default `false` counts as present: the presets
    // apply when its value is `true`.
    let when_quick =
        |arg: clap::Arg, value: String| arg.default_value_if("quick", ArgPredicate::Equals("true".into()), value);
    with_defaults(c, &S::Settings::DEFAULTS)
        .mut_arg("steps", |a| when_quick(a, quick.steps.to_string()))
        .mut_arg("eval_every", |a| when_quick(a, quick.eval_every.to_string()))
        .mut_arg("population_batches", |a| {
            when_quick(a, quick.population_batches.to_string())
        })
}

/// `c` with `d` as the defaults of `--steps`, `--eval-every`, `--batch` and `--lr`.
fn with_defaults(c: clap::Command, d: &Defaults) -> clap::Command {
    let default = |a: clap::Arg, value: String| a.required(false).default_value(value);
    c.mut_arg("steps", |a| default(a, d.steps.to_string()))
        .mut_arg("eval_every", |a| default(a, d.eval_every.to_string()))
        .mut_arg("batch", |a| default(a, d.batch.to_string()))
        .mut_arg("lr", |a| default(a, d.lr.to_string()))
}

/// Parses the process's arguments with [`command`].
pub fn parse() -> Result<Cli, clap::Error> {
    let matches = command().try_get_matches()?;
    Cli::from_arg_matches(&matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The common settings `args` parse to.
    fn settings(args: &[&str]) -> CommonSettings {
        let matches = command().try_get_matches_from(args).unwrap();
        match Cli::from_arg_matches(&matches).unwrap().command {
            Command::PaperMlp(a) => a.settings,
            Command::Accelerate(a) => a.experiment_args.settings,
            Command::SmallBatch(a) => a.experiment_args.settings,
            Command::Padded(a) => a.experiment_args.settings,
            other => panic!("not a training command: {other:?}"),
        }
    }

    /// Each study's subcommand shows the study's own help for the flags every study has.
    #[test]
    fn studies_show_their_own_help_for_the_shared_flags() {
        fn help(subcommand: &str, arg: &str) -> String {
            let mut c = command();
            let sub = c.find_subcommand_mut(subcommand).unwrap();
            let a = sub.get_arguments().find(|a| a.get_id() == arg).unwrap();
            a.get_help().unwrap().to_string()
        }
        for (sub, h) in [
            ("accelerate", Accelerate::HELP),
            ("small-batch", SmallBatch::HELP),
            ("padded", Padded::HELP),
        ] {
            assert_eq!(help(sub, "variants"), h.variants, "{sub}");
            assert_eq!(help(sub, "half_life"), h.half_life, "{sub}");
            assert_eq!(help(sub, "channels"), h.channels, "{sub}");
            assert_eq!(help(sub, "quick"), h.quick, "{sub}");
        }
        assert_ne!(Accelerate::HELP.quick, SmallBatch::HELP.quick);
    }

    /// Each experiment's defaults apply without `--quick`, its presets with it, and a flag given
    /// wins over both.
    #[test]
    fn defaults_and_quick_presets() {
        let steps = |args: &[&str]| settings(args).steps;
        use bnlab::experiments::accelerate::AccelerateSettings;
        use bnlab::experiments::padded::PaddedSettings;
        use bnlab::experiments::small_batch::SmallBatchSettings;
        assert_eq!(steps(&["bnlab", "paper-mlp"]), paper_mlp::DEFAULTS.steps);
        assert_eq!(steps(&["bnlab", "accelerate"]), AccelerateSettings::DEFAULTS.steps);
        assert_eq!(
            steps(&["bnlab", "accelerate", "--quick"]),
            AccelerateSettings::QUICK.steps
        );
        assert_eq!(steps(&["bnlab", "accelerate", "--quick", "--steps", "7"]), 7);
        assert_eq!(steps(&["bnlab", "small-batch"]), SmallBatchSettings::DEFAULTS.steps);
        assert_eq!(
            steps(&["bnlab", "small-batch", "--quick"]),
            SmallBatchSettings::QUICK.steps
        );
        let s = settings(&["bnlab", "small-batch"]);
        assert_eq!((s.eval_every, s.batch, s.population_batches), (300, 64, 50));
        let s = settings(&["bnlab", "accelerate", "--quick"]);
        assert_eq!((s.eval_every, s.population_batches), (40, 5));
        let s = settings(&["bnlab", "padded"]);
        let d = PaddedSettings::DEFAULTS;
        assert_eq!(
            (s.steps, s.eval_every, s.batch, s.lr),
            (d.steps, d.eval_every, d.batch, d.lr)
        );
        assert_eq!(s.population_batches, 50);
        let s = settings(&["bnlab", "padded", "--quick"]);
        let q = PaddedSettings::QUICK;
        let q = (q.steps, q.eval_every, q.population_batches);
        assert_eq!((s.steps, s.eval_every, s.population_batches), q);
    }
}
