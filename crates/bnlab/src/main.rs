//! The `bnlab` binary: parses arguments and dispatches; all work lives in the library.

mod cli;

use anyhow::{Context, Result};
use batchnorm::{Communicator, SingleProcess};
use bnlab::bench;
use bnlab::experiments::accelerate;
use bnlab::experiments::common::ExperimentSettings;
use bnlab::experiments::eval::{self, EvalOptions};
use bnlab::experiments::paper_mlp::{self, Variant};
use clap::Parser;
use cli::{AccelerateArgs, BenchArgs, Cli, Command, EvalArgs, OnOff, PaperMlpArgs, VariantChoice};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn main() {
    // Output piped into a reader that stops early (`bnlab bench --json | head -1`) ends the
    // process quietly, as for any Unix filter, instead of a panic in `println!`.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // The message up to the usage block, on one line (a missing argument is named on the
            // lines after the first).
            let msg = e.to_string();
            let head: Vec<&str> = msg
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let line = head.join(" ");
            eprintln!(
                "{}",
                if line.is_empty() {
                    "error: invalid arguments"
                } else {
                    &line
                }
            );
            std::process::exit(2);
        }
    };
    let result = match cli.command {
        Command::Bench(args) => run_bench(&args),
        Command::PaperMlp(args) => run_paper_mlp(&args),
        Command::Accelerate(args) => run_accelerate(&args),
        Command::Eval(args) => run_eval(&args),
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
    anyhow::ensure!(
        !args.cpu_time || args.threads == Some(1),
        "--cpu-time needs --threads 1 (with more threads the work runs outside the timed thread)"
    );
    let clock = match args.cpu_time {
        true => bench::Clock::ThreadCpu,
        false => bench::Clock::Wall,
    };
    let cases: Vec<bench::Case> = bench::default_cases()
        .into_iter()
        .filter(|c| args.only.is_empty() || args.only.iter().any(|o| c.name().contains(o.as_str())))
        .collect();
    anyhow::ensure!(
        !cases.is_empty(),
        "--only {} matches no benchmark case (names look like NHWC[64,256,14,14])",
        args.only.join(" ")
    );
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
        for case in cases {
            for r in bench::run_case(&case, Duration::from_secs_f64(args.min_time), clock)? {
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

/// The communicator of `--distributed`: MPI's world (one process outside `mpirun`).
#[cfg(feature = "mpi")]
fn communicator() -> Result<Arc<dyn Communicator>> {
    let comm = bnlab::dist::mpi::MpiComm::init()?;
    if comm.size() > 1 {
        // A rank that panics ends the whole job instead of leaving the others in a collective.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            hook(info);
            bnlab::dist::mpi::abort_job(101);
        }));
    }
    Ok(Arc::new(comm))
}

#[cfg(not(feature = "mpi"))]
fn communicator() -> Result<Arc<dyn Communicator>> {
    anyhow::bail!(
        "--distributed needs a bnlab built with the `mpi` feature (cargo build --release -p bnlab --features mpi)"
    )
}

/// One rank of several failed: print its error and end every rank (`MPI_Abort`), so that none
/// waits forever in a collective and the job exits non-zero.
fn fail_job(comm: &dyn Communicator, e: &anyhow::Error) {
    if comm.size() > 1 {
        eprintln!("error (rank {} of {}): {e:#}", comm.rank(), comm.size());
        #[cfg(feature = "mpi")]
        bnlab::dist::mpi::abort_job(1);
    }
}

/// The flags `paper-mlp` and `accelerate` share.
struct RunFlags<'a> {
    distributed: bool,
    resume: Option<&'a Path>,
    data: Option<&'a PathBuf>,
    threads: Option<u32>,
    quiet: bool,
}

/// The course `paper-mlp` and `accelerate` share: the communicator, the settings (`fresh`'s, or
/// with `--resume` the run's own with `--data` and `--threads` applied), the pool, training (or
/// resuming) and, if a rank fails, the end of the whole job. Returns the settings and outcome on
/// rank 0, `None` on the other ranks.
fn train_experiment<S: ExperimentSettings + Sync, O: Send>(
    flags: RunFlags,
    fresh: impl FnOnce() -> Result<S>,
    run: fn(&S, bool, Arc<dyn Communicator>) -> Result<O>,
    resume: fn(&S, bool, Arc<dyn Communicator>) -> Result<O>,
) -> Result<Option<(S, O)>> {
    let comm = if flags.distributed {
        communicator()?
    } else {
        Arc::new(SingleProcess)
    };
    let root = comm.rank() == 0;
    let (mut s, pool, resuming) = match flags.resume {
        Some(dir) => {
            let mut s = S::resume_settings(dir)?;
            if let Some(d) = flags.data {
                *s.data_dir_mut() = d.clone();
            }
            let pool = pool(Some(flags.threads.unwrap_or(*s.threads_mut() as u32)))?;
            (s, pool, true)
        }
        None => (fresh()?, pool(flags.threads)?, false),
    };
    *s.threads_mut() = pool.current_num_threads();
    let outcome = pool.install(|| match resuming {
        true => resume(&s, flags.quiet, comm.clone()),
        false => run(&s, flags.quiet, comm.clone()),
    });
    let outcome = outcome.inspect_err(|e| fail_job(comm.as_ref(), e))?;
    Ok(root.then_some((s, outcome)))
}

/// The collective traffic line of a data-parallel variant (none for one process).
fn print_traffic(name: &str, calls_per_step: f64, bytes_per_step: f64) {
    if calls_per_step > 0.0 {
        println!(
            "{name}: {calls_per_step:.2} collective calls and {bytes_per_step:.0} bytes sent per step and process"
        );
    }
}

fn run_paper_mlp(args: &PaperMlpArgs) -> Result<()> {
    let flags = RunFlags {
        distributed: args.distributed,
        resume: args.resume.as_deref(),
        data: args.data.as_ref(),
        threads: args.threads,
        quiet: args.quiet,
    };
    let trained = train_experiment(
        flags,
        || Ok(new_settings(args)),
        paper_mlp::run_with,
        paper_mlp::resume_with,
    )?;
    let Some((s, outcome)) = trained else { return Ok(()) };
    for (name, r) in &outcome.summaries {
        println!(
            "{name}: final test accuracy {:.2}% (best {:.2}%), {:.3} ms/step, {:.1} s",
            r.final_test_acc * 100.0,
            r.best_test_acc * 100.0,
            r.ms_per_step,
            r.seconds
        );
        print_traffic(name, r.collective_calls_per_step, r.bytes_sent_per_step);
    }
    println!("wrote {}", s.out.join("report.html").display());
    Ok(())
}

fn run_accelerate(args: &AccelerateArgs) -> Result<()> {
    let flags = RunFlags {
        distributed: args.distributed,
        resume: args.resume.as_deref(),
        data: args.data.as_ref(),
        threads: args.threads,
        quiet: args.quiet,
    };
    let trained = train_experiment(
        flags,
        || new_accelerate_settings(args),
        accelerate::run_with,
        accelerate::resume_with,
    )?;
    let Some((s, outcome)) = trained else { return Ok(()) };
    print!("{}", outcome.table.markdown());
    for (name, r) in &outcome.summaries {
        println!("{name}: {:.3} ms/step, {:.1} s", r.ms_per_step, r.seconds);
        print_traffic(name, r.collective_calls_per_step, r.bytes_sent_per_step);
    }
    println!("wrote {}", s.out.join("report.html").display());
    Ok(())
}

/// The settings of a new study from the flags.
fn new_accelerate_settings(args: &AccelerateArgs) -> Result<accelerate::Settings> {
    let out = args.out.clone().unwrap_or_else(|| paper_mlp::default_out("accelerate"));
    let mut s = accelerate::Settings::new(out);
    if args.quick {
        s = s.quick();
    }
    if let Some(v) = &args.variants {
        s.variants = v.clone();
    }
    if let Some(steps) = args.steps {
        s.steps = steps;
        s.half_life = (steps / 3).max(1);
    }
    if let Some(e) = args.eval_every {
        s.eval_every = e;
    }
    s.checkpoint_every = args.checkpoint_every.unwrap_or(s.eval_every);
    if let Some(h) = args.half_life {
        s.half_life = h;
    }
    if let Some(c) = &args.channels {
        let [c1, c2] = c[..] else {
            anyhow::bail!("--channels takes two numbers, C1,C2 (got {})", c.len());
        };
        s.channels = [c1 as usize, c2 as usize];
    }
    if let Some(h) = args.hidden {
        s.hidden = h as usize;
    }
    s.lr = args.lr;
    s.batch = args.batch as usize;
    s.seed = args.seed;
    s.bn_stats = args.bn_stats;
    if let Some(d) = &args.data {
        s.data_dir = d.clone();
    }
    s.bn_sync = args.bn_sync == OnOff::On;
    Ok(s)
}

/// The settings of a new run from the flags.
fn new_settings(args: &PaperMlpArgs) -> paper_mlp::Settings {
    let mut s = paper_mlp::Settings::paper(args.out.clone().unwrap_or_else(|| paper_mlp::default_out("paper-mlp")));
    s.variants = match args.variant {
        VariantChoice::Both => vec![Variant::Baseline, Variant::Bn],
        VariantChoice::Bn => vec![Variant::Bn],
        VariantChoice::Baseline => vec![Variant::Baseline],
    };
    s.steps = args.steps;
    s.lr = args.lr;
    s.eval_every = args.eval_every;
    s.checkpoint_every = args.checkpoint_every.unwrap_or(args.eval_every);
    s.seed = args.seed;
    s.batch = args.batch as usize;
    s.init_std = args.init_std as f32;
    s.bn_stats = args.bn_stats;
    s.population_batches = args.population_batches as usize;
    if let Some(d) = &args.data {
        s.data_dir = d.clone();
    }
    s.bn_sync = args.bn_sync == OnOff::On;
    s
}

fn run_eval(args: &EvalArgs) -> Result<()> {
    let pool = pool(args.threads)?;
    let opts = EvalOptions {
        checkpoint: args.checkpoint.clone(),
        data: args.data.clone(),
        fold: args.fold,
        bn_stats: args.bn_stats,
    };
    let r = pool.install(|| eval::eval_checkpoint(&opts))?;
    let stats = serde_json::to_value(r.bn_stats)?;
    println!(
        "{} at step {}: test accuracy {:.2}% ({} of {}), BN statistics {}, {}",
        r.variant,
        r.step,
        r.accuracy() * 100.0,
        r.correct,
        r.total,
        stats.as_str().unwrap_or("?"),
        if args.fold {
            format!("{} BN layer(s) folded into the layers before them", r.folded)
        } else {
            "not folded".to_string()
        }
    );
    Ok(())
}
