//! Command-line arguments: parsing only; each subcommand calls into the library.

use clap::{Args, Parser, Subcommand};

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
    /// Time the batch-norm kernels (fwd_train, fwd_eval, backward) on the benchmark shapes.
    Bench(BenchArgs),
    /// Train the paper's MNIST MLP with and without batch norm (Figure 1) and write a report.
    PaperMlp(PaperMlpArgs),
    /// The paper's "accelerating BN networks" study (Figure 3) on a small conv net.
    Accelerate(AccelerateArgs),
    /// Test accuracy of a checkpoint (paper-mlp or accelerate), optionally with BN folded into the
    /// layers before it.
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

/// Options of `bnlab paper-mlp`.
#[derive(Debug, Args)]
pub struct PaperMlpArgs {
    /// Networks to train.
    #[arg(long, value_enum, default_value_t = VariantChoice::Both)]
    pub variant: VariantChoice,
    /// Training steps per network.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true, value_parser = parse_positive)]
    pub lr: f64,
    /// Steps between evaluations on the test set.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub eval_every: u64,
    /// Seed of initialization and shuffling.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Mini-batch size.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(2..=60000))]
    pub batch: u32,
    /// Standard deviation of the Gaussian initial weights.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true, value_parser = parse_positive)]
    pub init_std: f64,
    /// BN statistics used at evaluation: Algorithm 2's population estimate or the running averages.
    #[arg(long, value_enum, default_value_t = bnlab::experiments::paper_mlp::BnStats::Population)]
    pub bn_stats: bnlab::experiments::paper_mlp::BnStats,
    /// Training batches averaged for the population statistics.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub population_batches: u32,
    /// Directory with the four IDX files [default: /usr/share/datasets/fashion-mnist, Debian's
    /// Fashion-MNIST; with --resume, the run's]
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Output directory (default: a new folder under runs/).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Steps between checkpoints (OUT/checkpoints/<variant>.safetensors; one is also written at
    /// the end of each variant) [default: --eval-every]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: Option<u64>,
    /// Continue the run in this output directory from its checkpoints, with its settings
    /// (only --data, --threads, --quiet and --distributed may be given with it).
    #[arg(long, conflicts_with_all = ["variant", "steps", "lr", "eval_every", "seed", "batch", "init_std",
        "bn_stats", "population_batches", "out", "checkpoint_every", "bn_sync"])]
    pub resume: Option<std::path::PathBuf>,
    /// Worker threads; with 2 or more, both networks train at once, each on its share
    /// [default: all cores; with --resume, the run's]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// No progress bar or log lines.
    #[arg(long)]
    pub quiet: bool,
    /// Data-parallel training over MPI: run under `mpirun -np P` (needs the `mpi` feature).
    #[arg(long)]
    pub distributed: bool,
    /// With --distributed: batch norm over the global batch (on) or over each process's shard (off).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub bn_sync: OnOff,
}

/// Options of `bnlab accelerate`.
#[derive(Debug, Args)]
pub struct AccelerateArgs {
    /// Variants to train, comma-separated (baseline, bn-baseline, bn-x5, bn-x30, bn-x5-sigmoid,
    /// baseline-sigmoid; default: all six).
    #[arg(long, value_delimiter = ',')]
    pub variants: Option<Vec<bnlab::experiments::accelerate::Variant>>,
    /// Training steps per variant (default 4000; 120 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: Option<u64>,
    /// Steps between evaluations on the test set (default 200; 40 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub eval_every: Option<u64>,
    /// Steps over which the baseline's learning rate halves (default: steps / 3).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub half_life: Option<u64>,
    /// Base (baseline) learning rate.
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true, value_parser = parse_positive)]
    pub lr: f64,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..=60000))]
    pub batch: u32,
    /// Output channels of the two conv layers, `C1,C2` (default 8,16; 4,8 with --quick).
    #[arg(long, value_delimiter = ',', num_args = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub channels: Option<Vec<u32>>,
    /// Width of the hidden linear layer (default 100; 32 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub hidden: Option<u32>,
    /// Seed of initialization, shuffling and dropout.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// BN statistics used at evaluation: Algorithm 2's population estimate or the running averages.
    #[arg(long, value_enum, default_value_t = bnlab::experiments::common::BnStats::Population)]
    pub bn_stats: bnlab::experiments::common::BnStats,
    /// A short run for CI: 120 steps, evaluations every 40, a smaller net (4, 8 channels, 32 hidden).
    #[arg(long)]
    pub quick: bool,
    /// Directory with the four IDX files [default: /usr/share/datasets/fashion-mnist, Debian's
    /// Fashion-MNIST; with --resume, the run's]
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Output directory (default: a new folder under runs/).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Steps between checkpoints (OUT/checkpoints/<variant>.safetensors; one is also written at
    /// the end of each variant) [default: --eval-every]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: Option<u64>,
    /// Continue the study in this output directory from its checkpoints, with its settings
    /// (only --data, --threads, --quiet and --distributed may be given with it).
    #[arg(long, conflicts_with_all = ["variants", "steps", "eval_every", "half_life", "lr", "batch", "channels",
        "hidden", "seed", "bn_stats", "quick", "out", "checkpoint_every", "bn_sync"])]
    pub resume: Option<std::path::PathBuf>,
    /// Worker threads; with 2 or more, as many variants train at once, each on its share
    /// [default: all cores; with --resume, the run's]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// No progress bar or log lines.
    #[arg(long)]
    pub quiet: bool,
    /// Data-parallel training over MPI: run under `mpirun -np P` (needs the `mpi` feature).
    #[arg(long)]
    pub distributed: bool,
    /// With --distributed: batch norm over the global batch (on) or over each process's shard (off).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub bn_sync: OnOff,
}

/// A switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// Options of `bnlab eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A checkpoint written by `bnlab paper-mlp` or `bnlab accelerate`
    /// (OUT/checkpoints/<variant>.safetensors).
    #[arg(long)]
    pub checkpoint: std::path::PathBuf,
    /// Directory with the four IDX files [default: the run's]
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Fold every BN layer into the linear layer or convolution before it and evaluate the folded
    /// network.
    #[arg(long)]
    pub fold: bool,
    /// BN statistics: Algorithm 2's population estimate (recomputed over the run's training
    /// batches) or the running statistics stored in the checkpoint [default: the run's]
    #[arg(long, value_enum)]
    pub bn_stats: Option<bnlab::experiments::paper_mlp::BnStats>,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
}

/// Options of `bnlab bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
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
}

/// A finite number > 0.
pub fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a number > 0, got `{s}`")),
    }
}
