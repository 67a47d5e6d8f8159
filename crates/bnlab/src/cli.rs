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
    #[arg(long, default_value_t = 0.5, value_parser = parse_positive)]
    pub min_time: f64,
}

/// A finite number > 0.
pub fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a number > 0, got `{s}`")),
    }
}
