//! Checkpoints and `--resume` of `bnlab accelerate` (the conv-net study), running the built binary
//! on small synthetic IDX data: a study killed with SIGKILL and resumed matches an uninterrupted
//! one bit for bit (metrics, checkpoints, table), including a variant with dropout, whose
//! generator position is part of the checkpoint; and the invariant the data-parallel resume
//! relies on to move a restored dropout generator to another rank's position.

mod common;

use bnlab::engine::{Dropout, Layer, Mode};
use common::{
    accelerate_tiny_args, assert_killed_and_resumed_run_matches, bnlab_ok, ckpt, expect_error, s, synthetic_data,
};
use std::path::Path;

/// A study of `baseline` (dropout, LRN, weight decay, momentum) then `bn-x5` on the synthetic
/// data: 6,000 steps each (about a second), checkpoints every 500.
fn study_args(data: &Path, out: &Path) -> Vec<String> {
    let extra = [
        "--variants",
        "baseline,bn-x5",
        "--steps",
        "6000",
        "--eval-every",
        "250",
        "--checkpoint-every",
        "500",
        "--threads",
        "2",
    ];
    accelerate_tiny_args(data, out, &extra)
}

/// Kill the study with SIGKILL while it trains its second variant (the first finished, the second
/// has a checkpoint), resume it, and compare with an uninterrupted study of the same settings.
#[test]
fn killed_and_resumed_study_matches_uninterrupted_study() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    assert_killed_and_resumed_run_matches(
        tmp.path(),
        "accelerate",
        ["baseline", "bn-x5"],
        6000,
        |out| study_args(&data, out),
        &["table.md"],
        &["final_test_acc", "best_test_acc", "steps"],
    );
}

/// What `--resume` refuses: a directory that is not a study, a checkpoint of another experiment
/// or of other settings, and training flags beside it.
#[test]
fn resume_rejects_foreign_runs_and_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let out = tmp.path().join("study");
    let short = |out: &Path, extra: &[&str]| {
        let mut a = study_args(&data, out);
        let i = a.iter().position(|x| x == "--steps").unwrap();
        a[i + 1] = "300".into();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let args = short(&out, &[]);
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
    let args = short(&other, &["--seed", "9"]);
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
