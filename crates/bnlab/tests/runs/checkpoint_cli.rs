//! End-to-end tests of checkpoints, `--resume` and `bnlab eval`, running the built binary on
//! small synthetic IDX data: a run killed with SIGKILL and resumed matches an uninterrupted run bit
//! for bit; eval reproduces the run's accuracy, also with BN folded; divergence keeps the last good
//! checkpoint; damaged checkpoints and bad flags give one-line errors.

use crate::common::{
    assert_eval_and_fold, assert_killed_and_resumed_run_matches, bnlab, bnlab_ok, ckpt, eval_counts, expect_error,
    paper_mlp_args, read, s, scratch_with_synthetic_data, strs, synthetic_data, text, words, KILL_AND_RESUME_SCHEDULE,
};
use bnlab::engine::checkpoint::Checkpoint;
use std::path::{Path, PathBuf};

/// Kill a run with SIGKILL while it trains its two variants side by side (two threads, one each;
/// the second has a checkpoint), resume it, and compare with an uninterrupted run of the same seed
/// and threads: metrics.jsonl, interleaved when killed, ends the same.
#[test]
fn killed_and_resumed_run_matches_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let args = |out: &Path| -> Vec<String> {
        let extra = [
            KILL_AND_RESUME_SCHEDULE.as_slice(),
            &["--population-batches", "20", "--threads", "2", "--seed", "3"],
        ]
        .concat();
        paper_mlp_args(&data, out, &extra)
    };
    assert_killed_and_resumed_run_matches(
        tmp.path(),
        "paper-mlp",
        ["baseline", "bn"],
        6000,
        args,
        false,
        &[],
        &["final_test_acc"],
    );
}

/// `bnlab eval` gives the run's final accuracy; folded, the same within float rounding.
#[test]
fn eval_reproduces_the_final_accuracy_also_folded() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    bnlab_ok(
        tmp.path(),
        &strs(&paper_mlp_args(&data, &out, &["--steps", "300", "--eval-every", "100"])),
    );
    let metrics = read(&out.join("metrics.jsonl"));
    for variant in ["baseline", "bn"] {
        let last: serde_json::Value = metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .rfind(|m| m["variant"] == variant)
            .unwrap();
        let file = ckpt(&out, variant);
        let bn_layers = if variant == "bn" { 3 } else { 0 };
        let want = last["test_acc"].as_f64().unwrap();
        let (plain, correct) = assert_eval_and_fold(tmp.path(), &file, variant, want, bn_layers);
        assert!(plain.contains("at step 300"), "{plain}");
        // The statistics saved in the checkpoint are the last evaluation's population estimate.
        let (running, _) = bnlab_ok(
            tmp.path(),
            &["eval", "--checkpoint", s(&file), "--fold", "--bn-stats", "running"],
        );
        assert!(eval_counts(&running).0.abs_diff(correct) <= 1, "{running}");
    }
}

/// A learning rate that blows the weights up: the run stops naming the step, the checkpoint left
/// is the last good one (finite, earlier step) and still loads.
#[test]
fn divergence_names_the_step_and_keeps_the_last_good_checkpoint() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    let extra = words("--variant baseline --steps 200 --lr 1e37 --checkpoint-every 1");
    let o = bnlab(tmp.path(), &strs(&paper_mlp_args(&data, &out, &extra)));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("diverged"), "{stderr}");
    let step: u64 = stderr
        .split("step ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no step in {stderr}"));
    let kept = Checkpoint::read(&ckpt(&out, "baseline")).unwrap();
    assert!(
        kept.progress.step < step,
        "kept step {} vs diverged at {step}",
        kept.progress.step
    );
    assert!(
        stderr.contains(&format!("last good checkpoint (step {})", kept.progress.step)),
        "{stderr}"
    );
    let (ok, _) = bnlab_ok(tmp.path(), &["eval", "--checkpoint", s(&ckpt(&out, "baseline"))]);
    assert!(ok.contains(&format!("at step {}", kept.progress.step)), "{ok}");
}

/// Two variants side by side (two threads) where BN diverges at step 2 (and the baseline a few
/// steps later, unless it is stopped first): the run stops with a divergence error alone (not the
/// other's "stopped because another variant failed"), and the baseline does not train on to its
/// end.
#[test]
fn divergence_beside_another_variant_stops_both_and_names_the_diverged_one() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    let steps = 20_000;
    let extra = [
        "--threads",
        "2",
        "--steps",
        "20000",
        "--lr",
        "1e37",
        "--checkpoint-every",
        "1",
    ];
    let stderr = expect_error(tmp.path(), &strs(&paper_mlp_args(&data, &out, &extra)), &["diverged"]);
    assert!(!stderr.contains("another variant"), "{stderr}");
    let baseline = Checkpoint::read(&ckpt(&out, "baseline")).unwrap();
    assert!(baseline.progress.step < steps, "baseline trained on to its end");
    assert!(!out.join("summary.json").exists());
}

// ---------------------------------------------------------------------------------------------
// Hostile checkpoints and flags

/// A finished tiny BN run in `tmp`: (data dir, out dir).
fn tiny_run(tmp: &Path) -> (PathBuf, PathBuf) {
    let data = synthetic_data(tmp);
    let out = tmp.join("out");
    let extra = ["--variant", "bn", "--steps", "20", "--eval-every", "10"];
    bnlab_ok(tmp, &strs(&paper_mlp_args(&data, &out, &extra)));
    (data, out)
}

#[test]
fn eval_rejects_damaged_and_foreign_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, out) = tiny_run(tmp.path());
    let good = std::fs::read(ckpt(&out, "bn")).unwrap();
    let bad = tmp.path().join("bad.safetensors");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..good.len() - 7].to_vec(), "truncated or corrupt"),
        (good[..4].to_vec(), "truncated or corrupt"),
        (b"not a checkpoint at all".to_vec(), "not a valid safetensors file"),
        (
            std::fs::read(data.join("t10k-labels-idx1-ubyte")).unwrap(),
            "safetensors",
        ),
    ];
    for (bytes, needle) in cases {
        std::fs::write(&bad, bytes).unwrap();
        expect_error(tmp.path(), &["eval", "--checkpoint", s(&bad)], &[s(&bad), needle]);
    }
    let absent = tmp.path().join("absent.safetensors");
    expect_error(tmp.path(), &["eval", "--checkpoint", s(&absent)], &[s(&absent)]);
    // Data of another image size: the network does not fit the checkpoint.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    for f in std::fs::read_dir(&data).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            let mut b = std::fs::read(&f).unwrap();
            if b[3] == 3 {
                // images [n, 8, 8] → [n, 4, 4]: the top-left quarter of each.
                let body: Vec<u8> = b[16..].chunks_exact(64).flat_map(|img| img[..16].to_vec()).collect();
                b.truncate(16);
                b[8..12].copy_from_slice(&4u32.to_be_bytes());
                b[12..16].copy_from_slice(&4u32.to_be_bytes());
                b.extend(body);
            }
            std::fs::write(other.join(f.file_name().unwrap()), b).unwrap();
        }
    }
    expect_error(
        tmp.path(),
        &["eval", "--checkpoint", s(&ckpt(&out, "bn")), "--data", s(&other)],
        &["another architecture"],
    );
}

#[test]
fn resume_rejects_a_damaged_checkpoint_and_a_non_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, out) = tiny_run(tmp.path());
    let path = ckpt(&out, "bn");
    // The run's settings changed after the checkpoint: refused.
    let settings_path = out.join("settings.json");
    let settings = read(&settings_path);
    assert!(settings.contains("\"lr\": 0.5"), "{settings}");
    std::fs::write(&settings_path, settings.replace("\"lr\": 0.5", "\"lr\": 0.25")).unwrap();
    expect_error(
        tmp.path(),
        &["paper-mlp", "--resume", s(&out), "--quiet"],
        &[s(&path), "other settings"],
    );
    std::fs::write(&settings_path, settings).unwrap();
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    expect_error(
        tmp.path(),
        &["paper-mlp", "--resume", s(&out), "--quiet"],
        &[s(&path), "truncated"],
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    expect_error(tmp.path(), &["paper-mlp", "--resume", s(&empty)], &["settings.json"]);
}

#[test]
fn unwritable_checkpoint_directory_is_an_error() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("checkpoints"), "a file where the directory goes").unwrap();
    expect_error(
        tmp.path(),
        &strs(&paper_mlp_args(&data, &out, &["--steps", "2"])),
        &["checkpoints"],
    );
}

/// Invalid values of every numeric flag of every subcommand: a one-line error naming the flag,
/// before any work starts.
#[test]
fn bad_flags_of_every_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["eval"], "--checkpoint"),
        (&["eval", "--checkpoint", "x", "--threads", "0"], "--threads"),
        (&["eval", "--checkpoint", "x", "--threads=-2"], "--threads"),
        (&["eval", "--checkpoint", "x", "--bn-stats", "median"], "--bn-stats"),
        (&["paper-mlp", "--checkpoint-every", "0"], "--checkpoint-every"),
        (&["paper-mlp", "--checkpoint-every=-5"], "--checkpoint-every"),
        (&["paper-mlp", "--steps=-1"], "--steps"),
        (&["paper-mlp", "--batch=-10"], "--batch"),
        (&["paper-mlp", "--batch", "1"], "--batch"),
        (&["paper-mlp", "--lr", "0"], "--lr"),
        (&["paper-mlp", "--lr", "inf"], "--lr"),
        (&["paper-mlp", "--init-std", "0"], "--init-std"),
        (&["paper-mlp", "--population-batches", "0"], "--population-batches"),
        (&["paper-mlp", "--eval-every=-1"], "--eval-every"),
        (&["paper-mlp", "--resume", "x", "--steps", "5"], "--steps"),
        (&["paper-mlp", "--resume", "x", "--lr", "0.1"], "--lr"),
        (&["paper-mlp", "--resume", "x", "--threads", "0"], "--threads"),
        (&["bench", "--threads", "0"], "--threads"),
        (&["bench", "--min-time", "0"], "--min-time"),
        (&["bench", "--min-time=-1"], "--min-time"),
        (&["bench", "--only", "NCHW[1,2]", "--only", "zzz"], "--only"),
    ];
    for (args, needle) in cases {
        expect_error(tmp.path(), args, &[needle]);
    }
    // Refused before anything is measured or printed.
    let out = bnlab(tmp.path(), &["bench", "--only", "zzz"]);
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "stdout: {}",
        text(&out.stdout)
    );
}
