//! Data-parallel training of `accelerate` (the conv-net study): in-process ranks (threads) always;
//! real `mpirun` launches with the `mpi` feature.
//!
//! The tracking criterion is issue 8's, as for `paper-mlp` (`distributed.rs`): with synchronized
//! batch norm, a variant without dropout trained by 2 or 3 ranks stays within 0.2 points of test
//! accuracy and 1e-3 relative training loss of the one-process run of the same seed at every
//! evaluation (the runs compute the same global-batch gradient up to f32 summation order). The
//! replicas' parameters are compared by the run itself at every evaluation (a difference is an
//! error, which fails these tests).
//!
//! Fashion-MNIST is needed for the tracking runs; when it is absent they print a note and pass,
//! unless `BNLAB_REQUIRE_DATA=1`. The `mpirun` tests likewise need OpenMPI's `mpirun`, unless
//! `BNLAB_REQUIRE_MPI=1` (set by `.ci/run`).

use batchnorm::{Communicator, ThreadComm};
use bnlab::driver::{self, RunOptions, Start};
use bnlab::engine::checkpoint::Checkpoint;
use bnlab::engine::Mode;
use bnlab::experiments::accelerate::{self, Metric, Settings, Variant};
use bnlab::experiments::Accelerate;

type Outcome = driver::Outcome<Metric>;

/// A quiet run of `s` as one rank of `comm`, fresh or resumed.
fn start_with(start: Start, s: &Settings, comm: Arc<dyn Communicator>) -> anyhow::Result<Outcome> {
    let opts = RunOptions {
        start,
        overwrite: false,
        quiet: true,
        comm,
    };
    driver::run(&Accelerate, s, opts).map(|f| f.outcome)
}

fn run_with(s: &Settings, _quiet: bool, comm: Arc<dyn Communicator>) -> anyhow::Result<Outcome> {
    start_with(Start::Fresh, s, comm)
}

fn resume_with(s: &Settings, _quiet: bool, comm: Arc<dyn Communicator>) -> anyhow::Result<Outcome> {
    start_with(Start::Resume, s, comm)
}
use crate::common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A short study of one variant on `data`: the `--quick` network, 60 steps, evaluations every 20.
fn settings(data: &Path, out: &Path, variant: Variant) -> Settings {
    let mut s = Settings::new(out.to_path_buf()).quick();
    s.experiment.study.variants = vec![variant];
    s.common.steps = 60;
    s.common.eval_every = 20;
    s.common.data_dir = data.to_path_buf();
    s
}

/// Settings of seconds on [`synthetic_data`] (8×8 images, 600 training examples).
fn tiny(data: &Path, out: &Path, variants: &[Variant]) -> Settings {
    let mut s = Settings::new(out.to_path_buf());
    s.experiment.study.variants = variants.to_vec();
    s.common.steps = 30;
    s.common.eval_every = 10;
    s.experiment.study.half_life = 10;
    s.experiment.study.channels = [2, 4];
    s.experiment.hidden = 8;
    s.common.batch = 20;
    s.common.population_batches = 5;
    s.common.data_dir = data.to_path_buf();
    s
}

/// The output folder rank `r` is given: rank 0 the settings', the others their own (which they
/// must leave uncreated).
fn rank_out(s: &Settings, r: usize) -> PathBuf {
    match r {
        0 => s.common.out.clone(),
        r => PathBuf::from(format!("{}-rank{r}", s.common.out.display())),
    }
}

/// Runs the study as `p` in-process ranks; returns every rank's result, in rank order.
fn on_threads(s: &Settings, p: usize) -> Vec<anyhow::Result<Outcome>> {
    let comms = ThreadComm::group(p)
        .unwrap()
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>);
    on_comms(s, comms.collect(), run_with)
}

/// `f(settings of rank r, comms[r])` on one thread per rank (rank 0 writes into `s.common.out`, the
/// others are given folders of their own, see [`rank_out`]); the results in rank order.
fn on_comms(
    s: &Settings,
    comms: Vec<Arc<dyn Communicator>>,
    f: fn(&Settings, bool, Arc<dyn Communicator>) -> anyhow::Result<Outcome>,
) -> Vec<anyhow::Result<Outcome>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let mut s = s.clone();
                s.common.out = rank_out(&s, r);
                scope.spawn(move || f(&s, true, c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// [`on_threads`] that must succeed; checks that only rank 0 has metrics and files; returns
/// rank 0's outcome.
fn run_ranks(s: &Settings, p: usize) -> Outcome {
    let mut outcomes: Vec<Outcome> = on_threads(s, p)
        .into_iter()
        .enumerate()
        .map(|(r, o)| o.unwrap_or_else(|e| panic!("rank {r} of {p}: {e:#}")))
        .collect();
    for (r, o) in outcomes.iter().enumerate().skip(1) {
        assert!(o.metrics.is_empty(), "rank {r}: only rank 0 evaluates");
        assert!(!rank_out(s, r).exists(), "rank {r} created an output folder");
    }
    outcomes.swap_remove(0)
}

/// (step, test accuracy, training loss) of each evaluation.
fn points(metrics: &[Metric]) -> Vec<(u64, f64, f64)> {
    metrics
        .iter()
        .map(|m| (m.step, m.test_acc.unwrap(), m.training.train_loss.unwrap()))
        .collect()
}

/// The names of the files in `dir`.
fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// `bn-x5` (no dropout) with synchronized BN over 2 ranks and over 3 (a batch of 64: shards of
/// 21, 21, 22) tracks one process; rank 0 writes the files one process writes, the others none.
#[test]
fn ranks_track_one_process_with_bn_sync() {
    let Some(data) = fashion_mnist() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(Path::new(data), &dir.path().join("one"), Variant::BnX5);
    let one = driver::run(&Accelerate, &s, RunOptions::fresh(true)).unwrap().outcome;
    assert_eq!(one.metrics.len(), 3);
    let want = points(&one.metrics);
    for p in [2, 3] {
        s.common.out = dir.path().join(format!("p{p}"));
        let got = run_ranks(&s, p);
        assert_tracks(&format!("{p} ranks, bn-sync on"), &points(&got.metrics), &want);
        assert_eq!(
            files(&s.common.out),
            files(&dir.path().join("one")),
            "{p} ranks: output files"
        );
        // Per step: the gradient all-reduce and, for each of the 3 BN layers, one all-gather
        // forward and one backward; plus one replica check per evaluation (3 in 60 steps).
        assert_summary_records(&s.common.out, p, true, 7.0 + 3.0 / 60.0, " collective calls per step");
        assert!(read(&s.common.out.join("report.html")).contains(&format!("over {p} MPI processes")));
    }
    let summary: serde_json::Value = serde_json::from_str(&read(&dir.path().join("one/summary.json"))).unwrap();
    assert_eq!(summary["settings"]["processes"], 1);
    assert_eq!(summary["variants"]["bn-x5"]["collective_calls_per_step"], 0.0);
}

/// `out/summary.json` records a run over `processes` processes with BN synchronized or not
/// (`bn_sync`) and `calls` collective calls per step for `bn-x5` (within 1e-9); the message is
/// the count found, then `what`.
#[track_caller]
fn assert_summary_records(out: &Path, processes: usize, bn_sync: bool, calls: f64, what: &str) {
    let summary: serde_json::Value = serde_json::from_str(&read(&out.join("summary.json"))).unwrap();
    assert_eq!(summary["settings"]["processes"], processes);
    assert_eq!(summary["settings"]["bn_sync"], bn_sync);
    let found = summary["variants"]["bn-x5"]["collective_calls_per_step"]
        .as_f64()
        .unwrap();
    assert!((found - calls).abs() < 1e-9, "{found}{what}");
}

/// With per-rank BN statistics (`--bn-sync off`: each rank normalizes over its 32 examples)
/// training still works: the loss falls and the accuracy is far above chance (10%).
#[test]
fn bn_sync_off_still_trains() {
    let Some(data) = fashion_mnist() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(Path::new(data), &dir.path().join("off"), Variant::BnX5);
    s.common.bn_sync = false;
    let got = points(&run_ranks(&s, 2).metrics);
    let (first, last) = (got[0], got[got.len() - 1]);
    assert!(last.2 < first.2, "the loss must fall: {got:?}");
    assert!(last.1 > 0.5, "bn-sync off must still train: {got:?}");
    assert_summary_records(&s.common.out, 2, false, 1.0 + 3.0 / 60.0, ": one all-reduce per step");
    assert!(
        read(&s.common.out.join("report.html")).contains("--bn-sync off"),
        "the report names the mode"
    );
}

/// Each rank has its own dropout stream, rank 0's being one process's; variants without dropout
/// are the same network on every rank.
#[test]
fn dropout_streams_are_per_rank() {
    let s = Settings::new(PathBuf::from("unused"));
    let x: Vec<f32> = (0..4 * 64).map(|i| ((i * 37 % 101) as f32) / 101.0).collect();
    let out = |variant, rank| {
        let mut net = accelerate::build_for_rank(&s, variant, 8, 8, 4, rank).unwrap();
        net.forward(&x, 4, Mode::Train).unwrap().to_vec()
    };
    for variant in [Variant::Baseline, Variant::BnBaseline, Variant::BaselineSigmoid] {
        let mut one = accelerate::build(&s, variant, 8, 8, 4).unwrap();
        let one = one.forward(&x, 4, Mode::Train).unwrap().to_vec();
        assert_eq!(out(variant, 0), one, "{variant:?}: rank 0 draws one process's masks");
        assert_ne!(
            out(variant, 1),
            out(variant, 0),
            "{variant:?}: rank 1 draws its own masks"
        );
        assert_ne!(
            out(variant, 2),
            out(variant, 1),
            "{variant:?}: rank 2 draws its own masks"
        );
    }
    for variant in [Variant::BnX5, Variant::BnX30, Variant::BnX5Sigmoid] {
        assert_eq!(
            out(variant, 1),
            out(variant, 0),
            "{variant:?}: no dropout, same network"
        );
    }
}

/// A learning rate far too large makes the baseline diverge: every rank stops it at the same
/// step (decided on the global loss), rank 0 reports it, and the study goes on with the next
/// variant on every rank.
#[test]
fn a_diverging_variant_stops_every_rank_at_the_same_step() {
    let (_dir, data, out) = scratch_with_synthetic_data();
    let mut s = tiny(&data, &out, &[Variant::Baseline, Variant::BnX5]);
    s.common.lr = 1e6;
    let outcomes: Vec<Outcome> = on_threads(&s, 2).into_iter().map(|o| o.unwrap()).collect();
    let step = outcomes[0]
        .metrics
        .iter()
        .find(|m| m.variant == "baseline" && m.training.diverged)
        .unwrap_or_else(|| panic!("baseline did not diverge at lr 1e6: {:?}", outcomes[0].metrics))
        .step;
    for (r, o) in outcomes.iter().enumerate() {
        assert_eq!(o.summaries["baseline"].diverged_at, Some(step), "rank {r}");
        assert_eq!(o.summaries["baseline"].steps, step, "rank {r}");
        assert!(o.summaries["bn-x5"].steps > 0, "rank {r}: bn-x5 did not run");
    }
    assert!(
        outcomes[0].metrics.iter().any(|m| m.variant == "bn-x5"),
        "bn-x5 was not evaluated"
    );
}

/// `s` on `p` in-process ranks fails on every rank with an error containing `needle`; `what`
/// names the case when a rank ran.
#[track_caller]
fn assert_every_rank_fails(s: &Settings, p: usize, what: &str, needle: &str) {
    for (r, o) in on_threads(s, p).into_iter().enumerate() {
        let e = o.err().unwrap_or_else(|| panic!("rank {r}: {what} ran"));
        assert!(e.to_string().contains(needle), "rank {r}: {e}");
    }
}

/// A batch that cannot be split over the ranks is an error on every rank before anything is
/// written (no rank waits for another).
#[test]
fn impossible_splits_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let mut s = tiny(&data, &dir.path().join("out"), &[Variant::BnX5]);
    s.common.batch = 2;
    assert_every_rank_fails(&s, 3, "a batch of 2 over 3 ranks", "cannot be split over 3 processes");
    s.common.batch = 5;
    s.common.bn_sync = false;
    assert_every_rank_fails(&s, 3, "shards of 1 with per-rank BN", "--bn-sync off needs at least 2");
    assert!(!s.common.out.exists(), "an output folder was created");
}

// ---------------------------------------------------------------------------------------------
// The binary

#[test]
fn accelerate_bn_sync_takes_on_or_off() {
    let dir = tempfile::tempdir().unwrap();
    expect_error(dir.path(), &["accelerate", "--bn-sync", "maybe"], &["maybe"]);
}

#[cfg(not(feature = "mpi"))]
#[test]
fn accelerate_distributed_without_the_feature_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let args = accelerate_tiny_args(&data, &dir.path().join("out"), &["--distributed"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    expect_error(dir.path(), &args, &["`mpi` feature"]);
    assert!(!dir.path().join("out").exists());
}

#[cfg(feature = "mpi")]
mod mpi {
    use super::*;
    use std::process::Stdio;
    use std::time::Duration;

    /// `mpirun -np 2 bnlab accelerate --quick --distributed` (two variants, 40 steps) exits 0,
    /// rank 0 alone reports and writes the files of a one-process run, and the variant without
    /// dropout tracks one process.
    #[test]
    fn mpirun_two_processes_write_what_one_process_writes() {
        let (Some(data), Some(mpirun)) = (fashion_mnist(), mpirun()) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let args = |out: &Path| -> Vec<String> {
            [
                "accelerate",
                "--quick",
                "--variants",
                "bn-x5,bn-baseline",
                "--steps",
                "40",
                "--eval-every",
                "20",
                "--threads",
                "1",
                "--quiet",
                "--data",
                data,
                "--out",
                s(out),
            ]
            .map(String::from)
            .to_vec()
        };
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        let one_args = args(&one);
        bnlab_ok(dir.path(), &one_args.iter().map(String::as_str).collect::<Vec<_>>());
        let mut two_args = args(&two);
        two_args.push("--distributed".into());
        let out = mpirun_bnlab(&mpirun, 2, &two_args.iter().map(String::as_str).collect::<Vec<_>>())
            .current_dir(dir.path())
            .output()
            .unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "failed ({}):\n{stdout}\n{stderr}", out.status);
        assert_eq!(stdout.matches("wrote ").count(), 1, "rank 0 alone reports: {stdout}");
        assert!(stdout.contains("collective calls"), "{stdout}");
        assert_eq!(files(&two), files(&one), "output files");
        assert_eq!(files(dir.path()), BTreeSet::from(["one".into(), "two".into()]));
        assert_tracks(
            "mpirun -np 2, bn-x5",
            &evaluation_points(&two, Some("bn-x5")),
            &evaluation_points(&one, Some("bn-x5")),
        );
        let b = evaluation_points(&two, Some("bn-baseline"));
        assert_eq!(b.iter().map(|p| p.0).collect::<Vec<_>>(), [20, 40]);
        let summary: serde_json::Value = serde_json::from_str(&read(&two.join("summary.json"))).unwrap();
        assert_eq!(summary["settings"]["processes"], 2);
        assert!(read(&two.join("report.html")).contains("--bn-sync on"));
    }

    /// Outside `mpirun`, `accelerate --distributed` is one process: the same metrics as without.
    #[test]
    fn distributed_outside_mpirun_is_one_process() {
        if mpirun().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = synthetic_data(dir.path());
        let run = |name: &str, extra: &[&str]| {
            let out = dir.path().join(name);
            let args = accelerate_tiny_args(&data, &out, &[&["--variants", "baseline,bn-x5"], extra].concat());
            bnlab_ok(dir.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());
            read(&out.join("metrics.jsonl"))
        };
        assert_eq!(run("a", &[]), run("b", &["--distributed"]));
    }

    /// A rank that fails alone (rank 0 cannot create its output folder; rank 1 is already waiting
    /// in the first collective) ends the whole job with a non-zero exit instead of a hang.
    #[test]
    fn a_failing_rank_ends_the_job() {
        let Some(mpirun) = mpirun() else { return };
        let dir = tempfile::tempdir().unwrap();
        let data = synthetic_data(dir.path());
        std::fs::write(dir.path().join("file"), "").unwrap();
        let out = dir.path().join("file").join("out");
        let args = accelerate_tiny_args(&data, &out, &["--distributed", "--threads", "1"]);
        let mut job = spawn_mpi_job(&mpirun, 2, &strs(&args), Stdio::piped());
        let Some(status) = wait_for_exit(&mut job, Duration::from_secs(60)) else {
            let _ = job.kill();
            panic!("the job still runs 60 s after rank 0 failed");
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "the job must fail: {status}");
        assert!(stderr.contains("error (rank 0 of 2)"), "{stderr}");
        assert!(stderr.contains("cannot create output directory"), "{stderr}");
    }
}

/// A rank's communicator that fails every collective after the first `left` (as a crashed job
/// would): every rank fails at the same collective, so none waits for another.
struct FailAfter {
    inner: ThreadComm,
    left: AtomicUsize,
}

impl FailAfter {
    fn spend(&self) -> Result<(), batchnorm::Error> {
        match self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        {
            Ok(_) => Ok(()),
            Err(_) => Err(batchnorm::Error::Communication {
                message: "the test's job crashed".into(),
            }),
        }
    }
}

impl Communicator for FailAfter {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<(), batchnorm::Error> {
        self.spend()?;
        self.inner.all_gather_f64(send, recv)
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<(), batchnorm::Error> {
        self.spend()?;
        self.inner.all_gather_f32(send, recv)
    }
    fn barrier(&self) -> Result<(), batchnorm::Error> {
        self.spend()?;
        self.inner.barrier()
    }
}

/// A data-parallel study that stops mid-way (every rank's communicator fails after the same
/// number of collectives) resumes on 2 ranks with uneven shards (a batch of 21: 10 and 11
/// examples) from rank 0's checkpoints and ends with the metrics and checkpoints of an
/// uninterrupted 2-rank study, bit for bit. The baseline has dropout: each rank's generator,
/// restored at rank 0's position, is moved to its own.
#[test]
fn a_stopped_data_parallel_study_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_data(dir.path());
    let mut s = tiny(&data, &dir.path().join("full"), &[Variant::Baseline, Variant::BnX5]);
    s.common.batch = 21;
    s.common.checkpoint_every = Some(10);
    run_ranks(&s, 2);
    let full = s.common.out.clone();

    s.common.out = dir.path().join("stopped");
    let failing = ThreadComm::group(2).unwrap().into_iter().map(|inner| {
        Arc::new(FailAfter {
            inner,
            left: AtomicUsize::new(STOP_AFTER_CALLS),
        }) as Arc<dyn Communicator>
    });
    for (r, o) in on_comms(&s, failing.collect(), run_with).into_iter().enumerate() {
        let e = o.err().unwrap_or_else(|| panic!("rank {r}: the study did not stop"));
        assert!(format!("{e:#}").contains("the test's job crashed"), "rank {r}: {e:#}");
    }
    let step = |out: &Path, v: &str| Checkpoint::read(&ckpt(out, v)).map(|c| c.progress.step).ok();
    assert!(
        step(&s.common.out, "baseline").is_some_and(|k| (10..30).contains(&k)),
        "the stopped study should hold a checkpoint of the baseline mid-way: {:?}",
        step(&s.common.out, "baseline")
    );

    // Every rank reads the checkpoints (one machine, or a shared file system). Rank 1 is given a
    // folder of its own here: without the checkpoints in it, every rank refuses to resume.
    let resume_on_2_ranks = || {
        let resumed = driver::resume_settings::<Accelerate>(&s.common.out).unwrap();
        let comms = ThreadComm::group(2).unwrap().into_iter();
        on_comms(
            &resumed,
            comms.map(|c| Arc::new(c) as Arc<dyn Communicator>).collect(),
            resume_with,
        )
    };
    for (r, o) in resume_on_2_ranks().into_iter().enumerate() {
        let e = o
            .err()
            .unwrap_or_else(|| panic!("rank {r} resumed without rank 1's checkpoints"));
        assert!(
            format!("{e:#}").contains("every rank must read the same run directory"),
            "rank {r}: {e:#}"
        );
    }
    let rank1 = rank_out(&s, 1).join("checkpoints");
    std::fs::create_dir_all(&rank1).unwrap();
    for v in ["baseline", "bn-x5"] {
        if ckpt(&s.common.out, v).exists() {
            std::fs::copy(ckpt(&s.common.out, v), rank1.join(format!("{v}.safetensors"))).unwrap();
        }
    }
    for (r, o) in resume_on_2_ranks().into_iter().enumerate() {
        o.unwrap_or_else(|e| panic!("rank {r}: {e:#}"));
    }
    assert_eq!(
        read(&full.join("metrics.jsonl")),
        read(&s.common.out.join("metrics.jsonl"))
    );
    for v in ["baseline", "bn-x5"] {
        same_state(
            &Checkpoint::read(&ckpt(&full, v)).unwrap(),
            &Checkpoint::read(&ckpt(&s.common.out, v)).unwrap(),
        );
    }
}

/// Collectives the stopped study of [`a_stopped_data_parallel_study_resumes_bit_for_bit`] gets:
/// one gradient all-reduce per step and the replica checks at evaluations, so it stops in the
/// baseline's third ten steps.
const STOP_AFTER_CALLS: usize = 25;
