//! Checkpoints and `--resume` of `bnlab accelerate` (the conv-net study), running the built binary
//! on small synthetic IDX data: a study killed with SIGKILL and resumed matches an uninterrupted
//! one bit for bit (metrics, checkpoints, table), including a variant with dropout, whose
//! generator position is part of the checkpoint; and the invariant the data-parallel resume
//! relies on to move a restored dropout generator to another rank's position.

mod common;

use bnlab::engine::checkpoint::Checkpoint;
use bnlab::engine::{Dropout, Layer, Mode};
use common::{bnlab_ok, expect_error, read, s, synthetic_data};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ckpt(out: &Path, variant: &str) -> PathBuf {
    out.join("checkpoints").join(format!("{variant}.safetensors"))
}

/// Every tensor of two checkpoints equal, except the wall-clock progress values.
fn same_state(a: &Checkpoint, b: &Checkpoint) {
    let names: Vec<&str> = a.tensor_names().collect();
    assert_eq!(names, b.tensor_names().collect::<Vec<_>>());
    for name in names {
        if name.ends_with("seconds") {
            continue;
        }
        assert_eq!(a.tensor(name), b.tensor(name), "tensor {name} differs");
    }
    assert_eq!(a.progress.step, b.progress.step);
}

/// A study of `baseline` (dropout, LRN, weight decay, momentum) then `bn-x5` on the synthetic data.
fn study_args(data: &Path, out: &Path) -> Vec<String> {
    [
        "accelerate",
        "--variants",
        "baseline,bn-x5",
        "--steps",
        "6000",
        "--eval-every",
        "250",
        "--checkpoint-every",
        "500",
        "--channels",
        "2,4",
        "--hidden",
        "8",
        "--batch",
        "20",
        "--threads",
        "2",
        "--quiet",
        "--data",
    ]
    .iter()
    .map(|a| a.to_string())
    .chain([s(data).to_string(), "--out".into(), s(out).to_string()])
    .collect()
}

/// Kill the study with SIGKILL while it trains its second variant (the first finished, the second
/// has a checkpoint), resume it, and compare with an uninterrupted study of the same settings.
#[test]
fn killed_and_resumed_study_matches_uninterrupted_study() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let (full, killed) = (tmp.path().join("full"), tmp.path().join("killed"));
    let args = |out: &Path| study_args(&data, out);
    bnlab_ok(tmp.path(), &args(&full).iter().map(String::as_str).collect::<Vec<_>>());

    let mut child = Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(args(&killed))
        .current_dir(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !ckpt(&killed, "bn-x5").exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the study ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "no checkpoint after 300 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "the study was not killed mid-way: {status}");
    }
    let at_kill = Checkpoint::read(&ckpt(&killed, "bn-x5")).unwrap();
    assert!(at_kill.progress.step < 6000, "bn-x5 had finished when killed");
    let baseline_before = std::fs::read(ckpt(&killed, "baseline")).unwrap();
    assert!(!killed.join("summary.json").exists());

    // Resume without --threads: the study's recorded thread count is used.
    bnlab_ok(tmp.path(), &["accelerate", "--resume", s(&killed), "--quiet"]);
    assert_eq!(
        read(&full.join("metrics.jsonl")),
        read(&killed.join("metrics.jsonl")),
        "metrics.jsonl of the resumed study differs from the uninterrupted one"
    );
    assert_eq!(read(&full.join("table.md")), read(&killed.join("table.md")));
    assert_eq!(
        std::fs::read(ckpt(&killed, "baseline")).unwrap(),
        baseline_before,
        "the finished variant was retrained"
    );
    for v in ["baseline", "bn-x5"] {
        same_state(
            &Checkpoint::read(&ckpt(&full, v)).unwrap(),
            &Checkpoint::read(&ckpt(&killed, v)).unwrap(),
        );
    }
    let summary = |out: &Path| -> serde_json::Value { serde_json::from_str(&read(&out.join("summary.json"))).unwrap() };
    for v in ["baseline", "bn-x5"] {
        for key in ["final_test_acc", "best_test_acc", "steps"] {
            assert_eq!(summary(&full)["variants"][v][key], summary(&killed)["variants"][v][key]);
        }
    }
    assert!(killed.join("report.html").is_file());

    // Resuming a finished study retrains nothing and changes no metric.
    bnlab_ok(tmp.path(), &["accelerate", "--resume", s(&killed), "--quiet"]);
    assert_eq!(read(&full.join("metrics.jsonl")), read(&killed.join("metrics.jsonl")));
}

/// What `--resume` refuses: a directory that is not a study, a checkpoint of another experiment
/// or of other settings, and training flags beside it.
#[test]
fn resume_rejects_foreign_runs_and_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let out = tmp.path().join("study");
    let mut args = study_args(&data, &out);
    args[4] = "300".into(); // --steps
    bnlab_ok(tmp.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());

    expect_error(
        tmp.path(),
        &["accelerate", "--resume", s(&data)],
        &["is not an accelerate run to resume"],
    );
    expect_error(
        tmp.path(),
        &["accelerate", "--resume", s(&out), "--steps", "10"],
        &["cannot be used with"],
    );

    // A paper-mlp checkpoint in the study's place.
    let mlp = tmp.path().join("mlp");
    let mlp_args = [
        "paper-mlp",
        "--variant",
        "bn",
        "--steps",
        "20",
        "--batch",
        "10",
        "--quiet",
        "--data",
        s(&data),
        "--out",
        s(&mlp),
    ];
    bnlab_ok(tmp.path(), &mlp_args);
    std::fs::copy(mlp.join("checkpoints/bn.safetensors"), ckpt(&out, "bn-x5")).unwrap();
    expect_error(
        tmp.path(),
        &["accelerate", "--resume", s(&out)],
        &["a checkpoint of paper-mlp/bn, expected accelerate/bn-x5"],
    );

    // A checkpoint of a study with other settings (another seed).
    let other = tmp.path().join("other");
    let mut args = study_args(&data, &other);
    args[4] = "300".into();
    args.extend(["--seed".to_string(), "9".to_string()]);
    bnlab_ok(tmp.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());
    std::fs::copy(ckpt(&other, "bn-x5"), ckpt(&out, "bn-x5")).unwrap();
    expect_error(
        tmp.path(),
        &["accelerate", "--resume", s(&out)],
        &["written by a run with other settings"],
    );
}

/// A data-parallel study resumes every rank from rank 0's checkpoint and moves each dropout
/// generator to the rank's own position by scaling with the shard size; that is exact because a
/// training forward draws exactly one generator word per example and feature.
#[test]
fn dropout_generator_position_is_proportional_to_examples_masked() {
    for (batch, size, steps) in [(20, 8, 3), (7, 33, 5), (1, 100, 2)] {
        let mut d = Dropout::new(size, 0.5, 11).unwrap();
        let x = vec![1.0f32; batch * size];
        let mut y = vec![0.0f32; batch * size];
        for _ in 0..steps {
            d.forward(&x, batch, &mut y, Mode::Train).unwrap();
            d.forward(&x, batch, &mut y, Mode::Eval).unwrap();
        }
        assert_eq!(d.rng_position(), (steps * batch * size) as u128);
    }
}
