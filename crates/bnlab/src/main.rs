//! The `bnlab` binary: parses arguments and dispatches; all work lives in the library.

mod cli;

use anyhow::{Context, Result};
use bnlab::bench;
use clap::Parser;
use cli::{BenchArgs, Cli, Command};
use std::time::Duration;

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => run_bench(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Builds the rayon pool every subcommand runs in.
fn pool(threads: Option<u32>) -> Result<rayon::ThreadPool> {
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        b = b.num_threads(t as usize);
    }
    b.build().context("cannot start the worker threads")
}

fn run_bench(args: &BenchArgs) -> Result<()> {
    let pool = pool(args.threads)?;
    pool.install(|| {
        let threads = rayon::current_num_threads();
        let copy = bench::copy_gbps();
        if args.json {
            println!("{}", serde_json::json!({"copy_gbps": copy, "threads": threads}));
        } else {
            println!("threads {threads}, copy bandwidth {copy:.1} GB/s (read + write)");
            println!(
                "{:<6} {:<18} {:<10} {:>10} {:>8} {:>8}",
                "layout", "shape", "op", "ms", "GB/s", "of copy"
            );
        }
        for case in bench::default_cases() {
            for r in bench::run_case(&case, Duration::from_secs_f64(args.min_time))? {
                if args.json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    let shape = format!("{:?}", r.shape);
                    let pct = 100.0 * r.gbps() / copy;
                    println!(
                        "{:<6} {:<18} {:<10} {:>10.4} {:>8.1} {:>7.0}%",
                        r.layout,
                        shape,
                        r.op,
                        r.ms,
                        r.gbps(),
                        pct
                    );
                }
            }
        }
        Ok(())
    })
}
