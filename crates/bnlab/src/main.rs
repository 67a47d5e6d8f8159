//! The `bnlab` binary: parses arguments and dispatches; all work lives in the library.

mod cli;

use anyhow::{Context, Result};
use batchnorm::{Communicator, SingleProcess};
use bnlab::bench;
use bnlab::driver::settings::MAX_THREADS;
use bnlab::driver::{
    self, CommonSettings, Experiment, Finished, RunOptions, Settings, Start, VariantOf, VariantSummary,
};
use bnlab::experiments::accelerate::AccelerateSettings;
use bnlab::experiments::convnet::default_half_life;
use bnlab::experiments::eval::{self, EvalOptions};
use bnlab::experiments::padded::PaddedSettings;
use bnlab::experiments::paper_mlp::{PaperMlpSettings, Variant};
use bnlab::experiments::small_batch::{self, SmallBatchSettings};
use bnlab::experiments::{Accelerate, Padded, PaperMlp, Preset, SmallBatch, Study, StudySettings};
use bnlab::report::percent;
use cli::{
    AccelerateFlags, BenchArgs, Command, EvalArgs, ExperimentArgs, PaddedFlags, PaperMlpFlags, RunFlags,
    SmallBatchFlags, StudyArgs, StudyFlags, StudyVariant, VariantChoice,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

fn main() {
    // Output piped into a reader that stops early (`bnlab bench --json | head -1`) ends the
    // process quietly, as for any Unix filter, instead of a panic in `println!`.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match cli::parse() {
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
        Command::Accelerate(args) => run_study(&Accelerate, &args, accelerate_flags),
        Command::SmallBatch(args) => run_study(&SmallBatch, &args, small_batch_flags),
        Command::Padded(args) => run_study(&Padded, &args, padded_flags),
        Command::Eval(args) => run_eval(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The values of `all` that `picked` names, in `all`'s order (`default` when none is picked).
fn chosen<T: Copy + PartialEq>(all: &[T], default: &[T], picked: &[T]) -> Vec<T> {
    if picked.is_empty() {
        return default.to_vec();
    }
    all.iter().copied().filter(|v| picked.contains(v)).collect()
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
    let variants = chosen(&bench::Variant::ALL, bench::Variant::DEFAULT, &args.variant);
    let dtypes = chosen(&bench::Dtype::ALL, &bench::Dtype::ALL, &args.dtype);
    let min_time = bench::min_time(args.min_time)?;
    let pool = pool(args.threads)?;
    pool.install(|| {
        let threads = rayon::current_num_threads();
        let copy = bench::copy_gbps();
        if args.json {
            println!("{}", serde_json::json!({"copy_gbps": copy, "threads": threads}));
        } else {
            println!("threads {threads}, copy bandwidth {copy:.1} GB/s (read + write)");
            println!(
                "{:<13} {:<5} {:<6} {:<18} {:<26} {:>10} {:>8} {:>8}",
                "variant", "dtype", "layout", "shape", "op", "ms", "GB/s", "of copy"
            );
        }
        for case in cases {
            for (&variant, &dtype) in variants.iter().flat_map(|v| dtypes.iter().map(move |d| (v, d))) {
                for r in bench::run_case(&case, variant, dtype, min_time, clock)? {
                    if args.json {
                        println!("{}", serde_json::to_string(&r)?);
                    } else {
                        let shape = format!("{:?}", r.shape);
                        let pct = 100.0 * r.gbps() / copy;
                        println!(
                            "{:<13} {:<5} {:<6} {:<18} {:<26} {:>10.4} {:>8.1} {:>7.0}%",
                            r.variant,
                            r.dtype,
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
        }
        Ok(())
    })
}

/// The communicator of `--distributed`: MPI's world (one process outside `mpirun`).
#[cfg(feature = "mpi")]
fn communicator() -> Result<Arc<dyn Communicator>> {
    let comm = bnlab::parallel::mpi::MpiComm::init()?;
    if comm.size() > 1 {
        // A rank that panics ends the whole job instead of leaving the others in a collective.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            hook(info);
            bnlab::parallel::mpi::abort_job(101);
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
        bnlab::parallel::mpi::abort_job(1);
    }
}

/// Trains `experiment` as the flags say: a fresh run with the settings `fresh(out)` makes, or with
/// `--resume` the run's own settings with `--data` and `--threads` applied; in one process or as
/// one rank of `--distributed` training (if a rank fails, the whole job ends). Returns what the
/// run produced on rank 0, `None` on the other ranks.
fn train_experiment<E: Experiment>(
    experiment: &E,
    flags: &RunFlags,
    fresh: impl FnOnce(PathBuf) -> Result<Settings<E::Settings>>,
) -> Result<Option<Finished<E>>> {
    let comm = if flags.distributed {
        communicator()?
    } else {
        Arc::new(SingleProcess)
    };
    let (mut s, start) = match &flags.resume {
        Some(dir) => (driver::resume_settings::<E>(dir)?, Start::Resume),
        None => {
            let out = match &flags.out {
                Some(out) => out.clone(),
                None if flags.distributed => {
                    anyhow::bail!("--distributed needs --out: every process must write the same directory")
                }
                None => driver::rundir::new_run_dir(E::NAME)?,
            };
            let mut s = fresh(out)?;
            s.common.threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS));
            (s, Start::Fresh)
        }
    };
    if let Some(d) = &flags.data {
        s.common.data_dir = d.clone();
    }
    if let Some(t) = flags.threads {
        s.common.threads = t as usize;
    }
    let opts = RunOptions {
        start,
        overwrite: flags.overwrite,
        quiet: flags.quiet,
        comm: comm.clone(),
    };
    let finished = driver::run(experiment, &s, opts).inspect_err(|e| fail_job(comm.as_ref(), e))?;
    Ok((comm.rank() == 0).then_some(finished))
}

/// Prints each variant's timing and traffic lines, then where the report is.
fn print_summaries(summaries: &BTreeMap<&'static str, VariantSummary>, out: &std::path::Path, accuracy: bool) {
    for (name, r) in summaries {
        if accuracy {
            println!(
                "{name}: final test accuracy {} (best {}), {:.3} ms/step, {:.1} s",
                percent(r.final_test_acc),
                percent(r.best_test_acc),
                r.ms_per_step,
                r.seconds
            );
        } else {
            println!("{name}: {:.3} ms/step, {:.1} s", r.ms_per_step, r.seconds);
        }
        if r.collective_calls_per_step > 0.0 {
            println!(
                "{name}: {:.2} collective calls and {:.0} bytes sent per step and process",
                r.collective_calls_per_step, r.bytes_sent_per_step
            );
        }
    }
    println!("wrote {}", out.join("report.html").display());
}

/// Trains `experiment` ([`train_experiment`]) and, on rank 0, prints its table (Markdown), each
/// variant's timing lines and where the report is.
fn train_and_print<E: Experiment>(
    experiment: &E,
    flags: &RunFlags,
    fresh: impl FnOnce(PathBuf) -> Result<Settings<E::Settings>>,
) -> Result<()> {
    let Some(f) = train_experiment(experiment, flags, fresh)? else {
        return Ok(());
    };
    if let Some(table) = &f.table {
        print!("{}", table.markdown);
    }
    print_summaries(&f.outcome.summaries, &f.settings.common.out, false);
    Ok(())
}

fn run_paper_mlp(args: &ExperimentArgs<PaperMlpFlags>) -> Result<()> {
    let fresh = |out| {
        let variants = match args.experiment.variant {
            VariantChoice::Both => vec![Variant::Baseline, Variant::Bn],
            VariantChoice::Bn => vec![Variant::Bn],
            VariantChoice::Baseline => vec![Variant::Baseline],
        };
        let experiment = PaperMlpSettings {
            variants,
            init_std: args.experiment.init_std as f32,
        };
        Ok(Settings {
            common: CommonSettings {
                out,
                ..args.settings.clone()
            },
            experiment,
        })
    };
    let Some(f) = train_experiment(&PaperMlp, &args.run, fresh)? else {
        return Ok(());
    };
    print_summaries(&f.outcome.summaries, &f.settings.common.out, true);
    Ok(())
}

/// Trains study `S` ([`train_and_print`]): a fresh run starts from the study's own defaults
/// ([`Preset`]: `--quick`'s preset with it), then applies the flags every study has, then its own
/// flags (`own`, with the common settings); on rank 0 it prints the table.
fn run_study<S: Study, F: clap::Args>(
    study: &S,
    args: &StudyArgs<VariantOf<S>, F>,
    own: impl Fn(&F, &mut S::Settings, &CommonSettings),
) -> Result<()>
where
    VariantOf<S>: StudyVariant,
{
    let fresh = |out| {
        let common = CommonSettings {
            out,
            ..args.experiment_args.settings.clone()
        };
        let defaults = Settings::<S::Settings>::new(PathBuf::new());
        let mut experiment = if args.study.quick { defaults.quick() } else { defaults }.experiment;
        apply_study_flags(&args.study, experiment.study(), common.steps)?;
        own(&args.experiment_args.experiment, &mut experiment, &common);
        Ok(Settings { common, experiment })
    };
    train_and_print(study, &args.experiment_args.run, fresh)
}

/// Applies `accelerate`'s own flags.
fn accelerate_flags(flags: &AccelerateFlags, a: &mut AccelerateSettings, _: &CommonSettings) {
    a.hidden = flags.hidden.map_or(a.hidden, |h| h as usize);
}

/// Applies `small-batch`'s own flags (`common.steps` is the reference run's length).
fn small_batch_flags(flags: &SmallBatchFlags, e: &mut SmallBatchSettings, common: &CommonSettings) {
    e.batches = flags.batches;
    e.classes_per_batch = flags.classes_per_batch as usize;
    e.freeze_after = (flags.freeze_after).unwrap_or(small_batch::default_freeze_after(common.steps));
    e.hidden = flags.hidden.map_or(e.hidden, |h| h as usize);
}

/// Applies `padded`'s own flags.
fn padded_flags(flags: &PaddedFlags, e: &mut PaddedSettings, _: &CommonSettings) {
    e.train_lengths = flags.train_lengths;
    e.test_lengths = flags.test_lengths.clone();
    e.pad_value = flags.pad_value;
}

/// Sets `s` as the flags every study has say, for a run of `steps` steps: the variants and
/// channels given, the half-life given or [`default_half_life`]. Rejects `--channels` with other
/// than two numbers.
fn apply_study_flags<V: StudyVariant>(flags: &StudyFlags<V>, s: &mut StudySettings<V>, steps: u64) -> Result<()> {
    if let Some(v) = &flags.variants {
        s.variants = v.clone();
    }
    s.half_life = flags.half_life.unwrap_or(default_half_life(steps));
    if let Some(c) = &flags.channels {
        let [c1, c2] = c[..] else {
            anyhow::bail!("--channels takes two numbers, C1,C2 (got {})", c.len());
        };
        s.channels = [c1 as usize, c2 as usize];
    }
    Ok(())
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
