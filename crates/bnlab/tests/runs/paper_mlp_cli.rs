//! End-to-end tests of `bnlab paper-mlp`, running the built binary.
//!
//! The full run (both variants, 200 steps) uses the installed Fashion-MNIST; when it is absent
//! those tests print a note and pass, unless `BNLAB_REQUIRE_DATA=1` is set. Everything else runs
//! on small synthetic IDX files written into temporary directories, so the file finishes in
//! seconds. Every command runs in a temporary working directory, so a default `runs/` folder
//! never lands in the source tree.

use crate::common::*;
use std::path::Path;

use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Outputs

/// Checks every metrics line's fields; returns (variant, step) per line.
fn check_metric_lines(lines: &[Value]) -> Vec<(String, u64)> {
    lines
        .iter()
        .map(|m| {
            for key in ["test_acc", "train_loss", "p15", "p50", "p85"] {
                assert!(num(m, key).is_finite(), "`{key}` not finite in {m}");
            }
            let acc = num(m, "test_acc");
            assert!((0.0..=1.0).contains(&acc), "test_acc {acc}");
            assert!(num(m, "train_loss") > 0.0, "{m}");
            assert!(num(m, "p15") <= num(m, "p50") && num(m, "p50") <= num(m, "p85"), "{m}");
            let variant = m["variant"].as_str().expect("variant").to_string();
            let step = m["step"].as_u64().expect("step");
            (variant, step)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Full runs

/// The command of the brief, on Fashion-MNIST: all outputs and their contents; and the same
/// command again gives identical metrics.
#[test]
fn paper_mlp_writes_all_outputs_and_is_deterministic() {
    let Some(data) = fashion_mnist() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let args = |out: &Path, threads: &str| -> Vec<String> {
        [
            "paper-mlp",
            "--steps",
            "200",
            "--eval-every",
            "100",
            "--out",
            s(out),
            "--threads",
            threads,
            "--population-batches",
            "5",
            "--data",
            data,
        ]
        .iter()
        .map(|v| v.to_string())
        .collect()
    };
    // The two runs in parallel, to keep the test short. Two threads train the variants side by
    // side, one trains them one after another: the same metrics either way.
    let cwd = tmp.path().to_path_buf();
    let (args_a, args_b) = (args(&a, "2"), args(&b, "1"));
    let second = std::thread::spawn(move || {
        let refs: Vec<&str> = args_b.iter().map(String::as_str).collect();
        bnlab_ok(&cwd, &refs)
    });
    let refs: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let (stdout, _) = bnlab_ok(tmp.path(), &refs);
    second.join().unwrap();
    assert!(stdout.contains("report.html"), "stdout: {stdout}");

    // metrics.jsonl: 2 variants × 2 evaluations.
    let lines = metrics(&a);
    let keys = check_metric_lines(&lines);
    let expected: Vec<(String, u64)> = [("baseline", 100), ("baseline", 200), ("bn", 100), ("bn", 200)]
        .iter()
        .map(|(v, s)| (v.to_string(), *s))
        .collect();
    assert_eq!(keys, expected);

    // summary.json
    let summary: Value = serde_json::from_str(&read(&a.join("summary.json"))).expect("summary.json is JSON");
    for variant in ["baseline", "bn"] {
        let v = &summary["variants"][variant];
        let last = lines.iter().rfind(|m| m["variant"] == variant).unwrap();
        assert_eq!(num(v, "final_test_acc"), num(last, "test_acc"), "{variant}");
        let best = lines
            .iter()
            .filter(|m| m["variant"] == variant)
            .map(|m| num(m, "test_acc"))
            .fold(0.0, f64::max);
        assert_eq!(num(v, "best_test_acc"), best, "{variant}");
        for key in ["seconds", "ms_per_step"] {
            let x = num(v, key);
            assert!(x.is_finite() && x > 0.0, "{variant}.{key} = {x}");
        }
        assert!(
            num(v, "seconds") * 1e3 >= num(v, "ms_per_step") * 200.0,
            "{variant}: {v}"
        );
        assert_eq!(v["steps"], 200);
        // Well above chance (10 %) after 200 steps.
        assert!(num(v, "final_test_acc") > 0.3, "{variant}: {v}");
    }
    // The paper's point: batch norm trains faster.
    assert!(
        num(&summary["variants"]["bn"], "final_test_acc") > num(&summary["variants"]["baseline"], "final_test_acc"),
        "{summary}"
    );
    let settings = &summary["settings"];
    assert_eq!(settings["steps"], 200);
    assert_eq!(settings["eval_every"], 100);
    assert_eq!(settings["threads"], 2);
    assert_eq!(settings["population_batches"], 5);

    // Plots and the report with both inline.
    let html = read(&a.join("report.html"));
    for stem in ["accuracy", "distribution"] {
        let svg = svg_element(&a.join(format!("{stem}.svg")));
        assert!(html.contains(&svg), "report.html does not inline {stem}.svg");
        check_png(&a.join(format!("{stem}.png")));
    }
    assert!(html.contains("Figure 1a") && html.contains("Figure 1b"), "plot titles");

    // The same command again, with one thread: identical metrics.
    assert_eq!(
        read(&a.join("metrics.jsonl")),
        read(&b.join("metrics.jsonl")),
        "two runs with the same seed differ (2 threads, side by side, vs 1)"
    );
}

#[test]
fn variant_bn_trains_only_bn() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    let extra = words("--variant bn --steps 30 --eval-every 10 --batch 20 --threads 1");
    bnlab_ok(tmp.path(), &strs(&paper_mlp_args(&data, &out, &extra)));
    let keys = check_metric_lines(&metrics(&out));
    assert_eq!(
        keys,
        vec![("bn".to_string(), 10), ("bn".to_string(), 20), ("bn".to_string(), 30)]
    );
    let summary: Value = serde_json::from_str(&read(&out.join("summary.json"))).unwrap();
    let variants: Vec<&String> = summary["variants"].as_object().unwrap().keys().collect();
    assert_eq!(variants, vec!["bn"]);
    // The synthetic classes are easy.
    assert!(num(&summary["variants"]["bn"], "final_test_acc") > 0.9, "{summary}");
}

/// `--bn-stats running` runs, and changes the BN network's evaluation (not the baseline's).
#[test]
fn bn_stats_running_works_and_matters() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let run = |stats: &str| {
        let out = tmp.path().join(stats);
        let extra = [
            "--bn-stats",
            stats,
            "--steps",
            "20",
            "--eval-every",
            "10",
            "--batch",
            "20",
            "--threads",
            "2",
        ];
        bnlab_ok(tmp.path(), &strs(&paper_mlp_args(&data, &out, &extra)));
        let lines = metrics(&out);
        check_metric_lines(&lines);
        let summary: Value = serde_json::from_str(&read(&out.join("summary.json"))).unwrap();
        assert_eq!(summary["settings"]["bn_stats"], stats);
        lines
    };
    let (running, population) = (run("running"), run("population"));
    assert_eq!(running.len(), 4);
    let of = |lines: &[Value], v: &str| -> Vec<Value> { lines.iter().filter(|m| m["variant"] == v).cloned().collect() };
    assert_eq!(of(&running, "baseline"), of(&population, "baseline"));
    assert_ne!(
        of(&running, "bn"),
        of(&population, "bn"),
        "--bn-stats had no effect on the BN network"
    );
}

/// `--quiet`: "No progress bar or log lines". Without it (stderr not a terminal) there are log lines.
#[test]
fn quiet_means_no_log_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let args = |out: &Path, quiet: bool| {
        let mut v = vec![
            "paper-mlp".to_string(),
            "--steps".into(),
            "10".into(),
            "--eval-every".into(),
            "5".into(),
            "--batch".into(),
            "20".into(),
            "--data".into(),
            s(&data).into(),
            "--out".into(),
            s(out).into(),
        ];
        if quiet {
            v.push("--quiet".into());
        }
        v
    };
    let loud = args(&tmp.path().join("loud"), false);
    let (_, stderr) = bnlab_ok(tmp.path(), &loud.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        stderr.contains("step 10/10"),
        "no log lines without --quiet: {stderr:?}"
    );
    let quiet = args(&tmp.path().join("quiet"), true);
    let (_, stderr) = bnlab_ok(tmp.path(), &quiet.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(stderr, "", "--quiet still writes to stderr");
}

// ---------------------------------------------------------------------------------------------
// Errors: one line on stderr starting with `error:`, a nonzero exit, no panic.

/// A run that fails on `bad`; the other options are valid and small (those `bad` names are left out).
fn expect_bad_option(bad: &[&str], needles: &[&str]) {
    let (tmp, data, out) = scratch_with_synthetic_data();
    let base = [
        ("--steps", "2"),
        ("--batch", "10"),
        ("--data", s(&data)),
        ("--out", s(&out)),
    ];
    let named = |key: &str| bad.iter().any(|b| b.split('=').next() == Some(key));
    let mut args = vec!["paper-mlp"];
    for (key, value) in base.iter().filter(|(k, _)| !named(k)) {
        args.extend([*key, *value]);
    }
    args.extend_from_slice(bad);
    args.push("--quiet");
    expect_error(tmp.path(), &args, needles);
}

#[test]
fn error_missing_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    expect_error(
        tmp.path(),
        &[
            "paper-mlp",
            "--data",
            "/nonexistent",
            "--out",
            s(&out),
            "--steps",
            "2",
            "--quiet",
        ],
        &["/nonexistent", "dataset-fashion-mnist"],
    );
}

#[test]
fn error_truncated_idx_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let images = data.join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&images).unwrap();
    std::fs::write(&images, &bytes[..bytes.len() - 100]).unwrap();
    let out = tmp.path().join("out");
    let args = paper_mlp_args(&data, &out, &["--steps", "2"]);
    expect_error(tmp.path(), &strs(&args), &[s(&images), "truncated"]);
}

#[test]
fn error_steps_zero() {
    expect_bad_option(&["--steps", "0"], &["--steps"]);
}

#[test]
fn error_lr_negative() {
    expect_bad_option(&["--lr", "-1"], &["--lr"]);
}

#[test]
fn error_lr_negative_with_equals() {
    expect_bad_option(&["--lr=-1"], &["--lr"]);
}

#[test]
fn error_lr_nan() {
    expect_bad_option(&["--lr", "nan"], &["--lr"]);
}

#[test]
fn error_batch_zero() {
    expect_bad_option(&["--batch", "0"], &["--batch"]);
}

#[test]
fn error_threads_zero() {
    expect_bad_option(&["--threads", "0"], &["--threads"]);
}

#[test]
fn error_eval_every_zero() {
    expect_bad_option(&["--eval-every", "0"], &["--eval-every"]);
}

#[test]
fn error_out_not_writable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let out = file.join("out");
    let args = paper_mlp_args(&data, &out, &["--steps", "2"]);
    expect_error(tmp.path(), &strs(&args), &[s(&out)]);
}
