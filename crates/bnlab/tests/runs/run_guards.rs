//! What the run driver guards (issue 20's items that live in the driver): one writer per run
//! directory, no run written over another by mistake, default folders that never collide,
//! settings read back on resume checked like flags, the run's data checked on resume, memory
//! checked before it is spent, checkpoints that are the same bytes after kill and resume, and the
//! BN flags (`--bn-eps`, `--bn-momentum`) recorded and used.

use crate::common::{
    bnlab, bnlab_ok, ckpt, expect_error, fashion_mnist, metrics, paper_mlp_args as paper_mlp, read, run_and_kill_when,
    s, scratch_with_synthetic_data, strs, synthetic_data,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A finished `paper-mlp` run of 4 steps (evaluations every 2) on `data` into `out`.
fn run_four_steps(cwd: &Path, data: &Path, out: &Path) {
    bnlab_ok(
        cwd,
        &strs(&paper_mlp(data, out, &["--steps", "4", "--eval-every", "2"])),
    );
}

/// A second run writing a directory another run holds fails at once, naming the holder's pid;
/// the holder's files are untouched; once the holder is killed (SIGKILL), the directory is free.
#[test]
fn a_second_writer_is_refused_and_a_killed_one_frees_the_directory() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    let mut first = Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(paper_mlp(
            &data,
            &out,
            &["--steps", "100000000", "--eval-every", "1000000"],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !out.join("settings.json").exists() {
        assert!(first.try_wait().unwrap().is_none(), "the first run ended early");
        assert!(Instant::now() < deadline, "the first run wrote no settings.json");
        std::thread::sleep(Duration::from_millis(5));
    }
    let settings_before = read(&out.join("settings.json"));
    let started = Instant::now();
    let second = paper_mlp(&data, &out, &["--seed", "2", "--steps", "3", "--overwrite"]);
    let pid = first.id().to_string();
    expect_error(tmp.path(), &strs(&second), &["in use by another bnlab run", &pid]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the refusal was not immediate"
    );
    assert_eq!(
        read(&out.join("settings.json")),
        settings_before,
        "the second run wrote"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // The kernel released the killed run's lock: the directory can be taken again.
    bnlab_ok(tmp.path(), &strs(&second));
    assert!(metrics(&out).iter().all(|m| m["step"].as_u64().unwrap() <= 3));
}

/// A fresh run refuses a directory holding a run; with `--overwrite` it replaces it, and no
/// checkpoint of the old run's other variant is left behind.
#[test]
fn a_fresh_run_refuses_a_run_directory_unless_told_to_overwrite() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    run_four_steps(tmp.path(), &data, &out);
    assert!(ckpt(&out, "baseline").exists() && ckpt(&out, "bn").exists());
    let again = paper_mlp(&data, &out, &["--steps", "4", "--eval-every", "2", "--variant", "bn"]);
    expect_error(tmp.path(), &strs(&again), &["already holds a run", "--overwrite"]);
    assert!(ckpt(&out, "baseline").exists(), "the refused run removed a file");
    let mut over = again.clone();
    over.push("--overwrite".into());
    bnlab_ok(tmp.path(), &strs(&over));
    assert!(
        !ckpt(&out, "baseline").exists(),
        "a stale checkpoint of the old run survived"
    );
    assert!(metrics(&out).iter().all(|m| m["variant"] == "bn"));
}

/// Runs without `--out` started at the same moment get folders of their own under `runs/`.
#[test]
fn default_output_folders_never_collide() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let args = [
        "paper-mlp",
        "--batch",
        "10",
        "--quiet",
        "--steps",
        "2",
        "--data",
        s(&data),
    ];
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_bnlab"))
                .args(args)
                .current_dir(tmp.path())
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let dirs: Vec<PathBuf> = std::fs::read_dir(tmp.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 3, "{dirs:?}");
    for d in dirs {
        assert_eq!(
            metrics(&d).len(),
            2,
            "{}: one run's metrics (2 variants, one evaluation each)",
            d.display()
        );
    }
}

/// settings.json is input: values a flag could not take are refused on resume with the flag's
/// error, before any thread is started or file written.
#[test]
fn edited_settings_are_refused_on_resume() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    run_four_steps(tmp.path(), &data, &out);
    let original = read(&out.join("settings.json"));
    let cases: [(&str, serde_json::Value, &str); 5] = [
        ("threads", 20000.into(), "--threads"),
        ("threads", 0.into(), "--threads"),
        ("variants", serde_json::json!(["bn", "bn"]), "twice"),
        ("bn_eps", (-1.0).into(), "--bn-eps"),
        ("population_batches", 0.into(), "--population-batches"),
    ];
    for (key, value, needle) in cases {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        v[key] = value;
        std::fs::write(out.join("settings.json"), v.to_string()).unwrap();
        let metrics_before = read(&out.join("metrics.jsonl"));
        expect_error(tmp.path(), &["paper-mlp", "--resume", s(&out), "--quiet"], &[needle]);
        assert_eq!(
            read(&out.join("metrics.jsonl")),
            metrics_before,
            "{key}: a refused resume wrote"
        );
    }
}

/// A resume on other data than the run trained on is refused; the same data elsewhere is not.
#[test]
fn resume_checks_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(&tmp.path().join("data").tap_mkdir());
    let out = tmp.path().join("out");
    run_four_steps(tmp.path(), &data, &out);
    let copy = tmp.path().join("copy").tap_mkdir();
    for f in std::fs::read_dir(&data).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    // Other data: one label changed.
    let other = tmp.path().join("other").tap_mkdir();
    for f in std::fs::read_dir(&data).unwrap() {
        let f = f.unwrap().path();
        let mut bytes = std::fs::read(&f).unwrap();
        if f.ends_with("train-labels-idx1-ubyte") {
            let last = bytes.len() - 1;
            bytes[last] = (bytes[last] + 1) % 4;
        }
        std::fs::write(other.join(f.file_name().unwrap()), bytes).unwrap();
    }
    let resume = |d: &Path| -> Vec<String> {
        ["paper-mlp", "--resume", s(&out), "--quiet", "--data", s(d)]
            .map(String::from)
            .to_vec()
    };
    expect_error(
        tmp.path(),
        &strs(&resume(&other)),
        &["other data than the run trained on"],
    );
    bnlab_ok(tmp.path(), &strs(&resume(&copy)));
}

/// A net that cannot fit in memory is refused before anything is allocated or written, with the
/// estimate, the memory available and the flags to lower.
#[test]
fn a_run_that_does_not_fit_in_memory_is_refused_at_once() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    let started = Instant::now();
    let args = [
        "accelerate",
        "--variants",
        "bn-x5",
        "--channels",
        "4096,4096",
        "--hidden",
        "65536",
        "--steps",
        "2",
        "--quiet",
        "--data",
        s(&data),
        "--out",
        s(&out),
    ];
    expect_error(tmp.path(), &args, &["GiB", "available", "--channels"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the refusal took {:?}",
        started.elapsed()
    );
    assert!(!out.exists(), "an output folder was created");
}

/// Checkpoints are the same bytes whether a run was killed (SIGKILL) and resumed or not: run into
/// the same directory both times (the directory is part of the recorded settings).
#[test]
fn checkpoints_after_kill_and_resume_are_the_same_bytes() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    let args = paper_mlp(
        &data,
        &out,
        &[
            "--steps",
            "3000",
            "--eval-every",
            "500",
            "--checkpoint-every",
            "100",
            "--threads",
            "1",
        ],
    );
    bnlab_ok(tmp.path(), &strs(&args));
    let uninterrupted = ["baseline", "bn"].map(|v| std::fs::read(ckpt(&out, v)).unwrap());
    let metrics_uninterrupted = read(&out.join("metrics.jsonl"));
    std::fs::remove_dir_all(&out).unwrap();
    run_and_kill_when(tmp.path(), &args, &ckpt(&out, "bn"));
    bnlab_ok(tmp.path(), &["paper-mlp", "--resume", s(&out), "--quiet"]);
    for (v, bytes) in ["baseline", "bn"].iter().zip(uninterrupted) {
        assert!(
            std::fs::read(ckpt(&out, v)).unwrap() == bytes,
            "{v}: the checkpoint's bytes differ"
        );
    }
    assert_eq!(read(&out.join("metrics.jsonl")), metrics_uninterrupted);
}

/// `--bn-eps` and `--bn-momentum` reach the networks (other metrics with the running statistics)
/// and are recorded in settings.json and the report.
#[test]
fn bn_flags_are_used_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let run = |name: &str, extra: &[&str]| -> PathBuf {
        let out = tmp.path().join(name);
        let mut e = vec![
            "--steps",
            "20",
            "--eval-every",
            "10",
            "--variant",
            "bn",
            "--bn-stats",
            "running",
        ];
        e.extend_from_slice(extra);
        bnlab_ok(tmp.path(), &strs(&paper_mlp(&data, &out, &e)));
        out
    };
    let default = run("default", &[]);
    let cumulative = run("cumulative", &["--bn-momentum", "cumulative"]);
    let eps = run("eps", &["--bn-eps", "0.5"]);
    let settings =
        |out: &Path| -> serde_json::Value { serde_json::from_str(&read(&out.join("settings.json"))).unwrap() };
    assert_eq!(settings(&default)["bn_momentum"], 0.1);
    assert_eq!(settings(&default)["bn_eps"], 1e-5);
    assert_eq!(settings(&cumulative)["bn_momentum"], "cumulative");
    assert_eq!(settings(&eps)["bn_eps"], 0.5);
    assert_ne!(metrics(&cumulative), metrics(&default), "--bn-momentum changed nothing");
    assert_ne!(metrics(&eps), metrics(&default), "--bn-eps changed nothing");
    let report = read(&cumulative.join("report.html"));
    assert!(
        report.contains("bn_momentum") && report.contains("cumulative"),
        "the report lacks --bn-momentum"
    );
    expect_error(
        tmp.path(),
        &strs(&paper_mlp(&data, &tmp.path().join("x"), &["--bn-momentum", "1.5"])),
        &["--bn-momentum"],
    );
}

/// Without `--data` a run reads Debian's Fashion-MNIST (and records where).
#[test]
fn the_default_data_is_debians_fashion_mnist() {
    let Some(fashion) = fashion_mnist() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args = [
        "paper-mlp",
        "--variant",
        "bn",
        "--steps",
        "1",
        "--eval-every",
        "1",
        "--population-batches",
        "1",
        "--quiet",
        "--out",
        s(&out),
    ];
    bnlab_ok(tmp.path(), &args);
    let settings: serde_json::Value = serde_json::from_str(&read(&out.join("settings.json"))).unwrap();
    assert_eq!(settings["data_dir"], fashion);
    assert_eq!(settings["data_identity"]["train"]["examples"], 60000);
}

/// A bad `--min-time` is a one-line error, not a panic.
#[test]
fn bench_refuses_an_overflowing_min_time() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bnlab(tmp.path(), &["bench", "--min-time", "1e20", "--only", "NC[60,100]"]);
    assert!(!out.status.success());
    expect_error(
        tmp.path(),
        &["bench", "--min-time", "1e20", "--only", "NC[60,100]"],
        &["min-time"],
    );
}

trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}

impl TapMkdir for PathBuf {
    /// Creates the directory and returns its path.
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

mod settings_json {
    use bnlab::driver::settings::parse_settings;
    use bnlab::driver::{check_settings, Settings};
    use bnlab::experiments::accelerate::AccelerateSettings;
    use bnlab::experiments::paper_mlp::{self, PaperMlpSettings};
    use bnlab::experiments::{Accelerate, PaperMlp};
    use proptest::prelude::*;

    fn valid() -> String {
        serde_json::to_string_pretty(&paper_mlp::Settings::paper("out".into())).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// Any edit of a valid settings.json (bytes replaced, cut, inserted) parses or not and is
        /// checked or refused, never a panic (what the `settings` fuzz target explores further).
        #[test]
        fn edited_settings_json_never_panics(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8)
        ) {
            let mut bytes = valid().into_bytes();
            for (at, byte, kind) in edits {
                let i = at.index(bytes.len().max(1));
                match kind {
                    0 if !bytes.is_empty() => bytes[i] = byte,
                    1 => bytes.truncate(i),
                    _ => bytes.insert(i.min(bytes.len()), byte),
                }
            }
            let Ok(text) = std::str::from_utf8(&bytes) else { return Ok(()) };
            if let Ok(s) = parse_settings::<PaperMlpSettings>(text) {
                let s: Settings<PaperMlpSettings> = s;
                let _ = check_settings(&PaperMlp, &s);
            }
            if let Ok(s) = parse_settings::<AccelerateSettings>(text) {
                let _ = check_settings(&Accelerate, &s);
            }
        }
    }

    /// The settings a run writes read back as themselves and pass the checks.
    #[test]
    fn written_settings_read_back_and_pass() {
        let s: Settings<PaperMlpSettings> = parse_settings(&valid()).unwrap();
        assert_eq!(s, paper_mlp::Settings::paper("out".into()));
        check_settings(&PaperMlp, &s).unwrap();
    }
}
