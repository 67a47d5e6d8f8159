//! End-to-end tests of `bnlab accelerate`, running the built binary.
//!
//! `--quick` runs all six variants on the installed Fashion-MNIST (skipped with a note when it is
//! absent, unless `BNLAB_REQUIRE_DATA=1`); determinism, divergence and errors run on small
//! synthetic IDX files. Every command runs in a temporary working directory.

use crate::common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const ALL: [&str; 6] = [
    "baseline",
    "bn-baseline",
    "bn-x5",
    "bn-x30",
    "bn-x5-sigmoid",
    "baseline-sigmoid",
];

/// (learning-rate factor, decay speed-up) of each variant, from the list.
fn recipe(v: &str) -> (f64, f64) {
    match v {
        "baseline" | "bn-baseline" | "baseline-sigmoid" => (1.0, 1.0),
        "bn-x5" | "bn-x5-sigmoid" => (5.0, 6.0),
        "bn-x30" => (30.0, 6.0),
        _ => panic!("unknown variant {v}"),
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The Figure 3 table recomputed from metrics lines, independently of the library:
/// variant → (steps to the baseline's best or None, best accuracy, its first step).
type Expected = BTreeMap<String, (Option<u64>, Option<f64>, Option<u64>)>;
fn expected_table(lines: &[Value]) -> (Option<f64>, Expected) {
    let evals = |v: &str| -> Vec<(u64, f64)> {
        lines
            .iter()
            .filter(|m| m["variant"] == v && m["test_acc"].is_f64())
            .map(|m| (m["step"].as_u64().unwrap(), num(m, "test_acc")))
            .collect()
    };
    let target = evals("baseline")
        .iter()
        .map(|e| e.1)
        .fold(None, |b: Option<f64>, a| Some(b.map_or(a, |b| b.max(a))));
    let mut out = Expected::new();
    for v in ALL {
        let e = evals(v);
        let best = e
            .iter()
            .map(|x| x.1)
            .fold(None, |b: Option<f64>, a| Some(b.map_or(a, |b| b.max(a))));
        let best_step = best.and_then(|b| e.iter().find(|x| x.1 == b).map(|x| x.0));
        let reach = target.and_then(|t| e.iter().find(|x| x.1 >= t).map(|x| x.0));
        out.insert(v.to_string(), (reach, best, best_step));
    }
    (target, out)
}

/// `bnlab accelerate --quick` on Fashion-MNIST: every output file, the metrics lines (steps,
/// ranges, learning rates of each variant's schedule) and the table against a recomputation.
#[test]
fn quick_study_writes_every_output() {
    let Some((_tmp, out, stdout)) = quick_study("accelerate") else {
        return;
    };
    assert!(stdout.contains("| variant | steps to baseline's best"), "{stdout}");

    // metrics.jsonl: evaluations at 40, 80, 120 for each variant in order (or a divergence line
    // that ends the variant), accuracy in [0, 1], positive loss, the scheduled learning rate.
    let lines = metrics(&out);
    let mut seen = Vec::new();
    for m in &lines {
        let v = m["variant"].as_str().expect("variant");
        let step = m["step"].as_u64().expect("step");
        let (factor, speedup) = recipe(v);
        let lr = 0.01 * factor * 0.5f64.powf((step - 1) as f64 * speedup / 40.0);
        assert!((num(m, "lr") - lr).abs() <= 1e-12 * lr, "lr in {m}, expected {lr}");
        if m["diverged"] == true {
            assert!(m["test_acc"].is_null() && m["train_loss"].is_null(), "{m}");
        } else {
            assert_eq!(m["diverged"], false, "{m}");
            assert!(step % 40 == 0, "{m}");
            assert!((0.0..=1.0).contains(&num(m, "test_acc")), "{m}");
            assert!(num(m, "train_loss") > 0.0, "{m}");
        }
        if seen.last() != Some(&v) {
            seen.push(v);
        }
    }
    assert_eq!(seen, ALL, "variants in order, each once");
    for v in ALL {
        let steps: Vec<u64> = lines
            .iter()
            .filter(|m| m["variant"] == v && m["diverged"] == false)
            .map(|m| m["step"].as_u64().unwrap())
            .collect();
        let diverged = lines.iter().any(|m| m["variant"] == v && m["diverged"] == true);
        if !diverged {
            assert_eq!(steps, [40, 80, 120], "{v}");
        }
    }
    // BN lets the ×5 network learn within 120 steps; 10 classes make chance 10%.
    let last = |v: &str| {
        lines
            .iter()
            .rev()
            .find(|m| m["variant"] == v)
            .map(|m| m["test_acc"].as_f64().unwrap_or(0.0))
            .unwrap()
    };
    assert!(last("bn-x5") > 0.5, "bn-x5 did not learn: {}", last("bn-x5"));

    // table.json matches a recomputation from the metrics.
    let table = json(&out.join("table.json"));
    let (target, expected) = expected_table(&lines);
    assert_eq!(table["baseline_best_acc"].as_f64(), target);
    let rows = table["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 6);
    for (row, v) in rows.iter().zip(ALL) {
        assert_eq!(row["variant"], v);
        let (reach, best, best_step) = expected[v];
        assert_eq!(row["steps_to_baseline_best"].as_u64(), reach, "{v}: {row}");
        assert_eq!(row["best_test_acc"].as_f64(), best, "{v}: {row}");
        assert_eq!(row["best_step"].as_u64(), best_step, "{v}: {row}");
        if let (Some(r), Some(base)) = (reach, expected["baseline"].2) {
            assert!((num(row, "speedup") - base as f64 / r as f64).abs() < 1e-12, "{row}");
        }
    }
    assert_eq!(
        expected["baseline"].0, expected["baseline"].2,
        "baseline reaches its own best"
    );

    // table.md: one row per variant with the same figures.
    let md = read(&out.join("table.md"));
    for v in ALL {
        let line = md
            .lines()
            .find(|l| l.starts_with(&format!("| {v} |")))
            .unwrap_or_else(|| panic!("no row for {v} in table.md:\n{md}"));
        let reach = match expected[v].0 {
            Some(n) => n.to_string(),
            None => "never".to_string(),
        };
        assert!(line.contains(&format!("| {reach}")), "{line}");
        let best = format!("{:.2}%", expected[v].1.unwrap_or(0.0) * 100.0);
        assert!(expected[v].1.is_none() || line.contains(&best), "{line} lacks {best}");
    }

    // summary.json, plots, report.
    let summary = json(&out.join("summary.json"));
    for v in ALL {
        let r = &summary["variants"][v];
        assert!(num(r, "ms_per_step") > 0.0 && num(r, "seconds") > 0.0, "{v}: {r}");
    }
    assert_eq!(summary["settings"]["steps"], 120);
    let svg = svg_element(&out.join("accuracy.svg"));
    for v in ALL {
        assert!(svg.contains(v), "accuracy.svg lacks {v}");
    }
    check_png(&out.join("accuracy.png"));
    let html = read(&out.join("report.html"));
    assert!(
        html.contains("<table") && html.contains("<svg"),
        "report.html lacks the table or plot"
    );
    for v in ALL {
        assert!(html.contains(v), "report.html lacks {v}");
    }
}

fn run_tiny(cwd: &Path, data: &Path, out: &Path, extra: &[&str]) -> String {
    let args = accelerate_tiny_args(data, out, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    bnlab_ok(cwd, &args);
    read(&out.join("metrics.jsonl"))
}

/// The same seed gives the same metrics, bit for bit: again, and with one thread (the variants
/// one after another) instead of two (side by side), and with three variants on two threads (two
/// side by side, then the third on both threads).
#[test]
fn same_seed_gives_identical_metrics_for_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let v = ["--variants", "baseline,bn-x5", "--threads", "2"];
    let a = run_tiny(tmp.path(), &data, &tmp.path().join("a"), &v);
    let b = run_tiny(tmp.path(), &data, &tmp.path().join("b"), &v);
    assert_eq!(a.lines().count(), 6, "{a}");
    assert_eq!(a, b, "two runs with the same seed and threads differ");
    let one = ["--variants", "baseline,bn-x5", "--threads", "1"];
    let a1 = run_tiny(tmp.path(), &data, &tmp.path().join("a1"), &one);
    assert_eq!(a, a1, "1 thread and 2 threads (side by side) differ");
    let three = ["--variants", "baseline,bn-x5,bn-baseline", "--threads"];
    let t1 = run_tiny(
        tmp.path(),
        &data,
        &tmp.path().join("t1"),
        &[&three[..], &["1"]].concat(),
    );
    let t2 = run_tiny(
        tmp.path(),
        &data,
        &tmp.path().join("t2"),
        &[&three[..], &["2"]].concat(),
    );
    assert_eq!(t1, t2, "three variants: 1 thread and 2 threads differ");
    assert!(t1.starts_with(&a), "the first two variants' lines come first, in order");
    let c = run_tiny(
        tmp.path(),
        &data,
        &tmp.path().join("c"),
        &[&v[..], &["--seed", "2"]].concat(),
    );
    assert_ne!(a, c, "another seed gave the same metrics");
}

/// A learning rate far too large makes the baseline diverge: the study goes on, the divergence is
/// a metrics line and the step in the table's last column.
#[test]
fn a_diverging_variant_is_reported_not_fatal() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    run_tiny(
        tmp.path(),
        &data,
        &out,
        &["--variants", "baseline,bn-baseline", "--lr", "1e6"],
    );
    let lines = metrics(&out);
    let div = lines
        .iter()
        .find(|m| m["variant"] == "baseline" && m["diverged"] == true)
        .unwrap_or_else(|| panic!("baseline did not diverge at lr 1e6: {lines:?}"));
    let step = div["step"].as_u64().unwrap();
    assert!(
        !lines
            .iter()
            .any(|m| m["variant"] == "baseline" && m["step"].as_u64().unwrap() > step),
        "baseline went on after diverging"
    );
    assert!(
        lines.iter().any(|m| m["variant"] == "bn-baseline"),
        "bn-baseline did not run"
    );
    let table = json(&out.join("table.json"));
    assert_eq!(table["rows"][0]["diverged_at"].as_u64(), Some(step));
    let md = read(&out.join("table.md"));
    let row = md
        .lines()
        .find(|l| l.starts_with("| baseline |"))
        .expect("baseline row");
    assert!(row.ends_with(&format!("| {step} |")), "{md}");
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["variants"]["baseline"]["diverged_at"].as_u64(), Some(step));
    assert_eq!(summary["variants"]["baseline"]["steps"].as_u64(), Some(step));
}

/// A bad option gives one line on stderr, a nonzero exit and no output folder.
fn expect_bad(extra: &[&str], needles: &[&str]) {
    let (tmp, data, out) = scratch_with_synthetic_data();
    let args = accelerate_tiny_args(&data, &out, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    expect_error(tmp.path(), &args, needles);
    assert!(!out.exists(), "an output folder was created for `{}`", args.join(" "));
}

#[test]
fn error_unknown_variant() {
    expect_bad(&["--variants", "baseline,bn-x7"], &["bn-x7", "bn-x5-sigmoid"]);
}

#[test]
fn error_repeated_variant() {
    expect_bad(&["--variants", "bn-x5,bn-x5"], &["twice"]);
}

#[test]
fn error_steps_zero() {
    expect_bad(&["--steps", "0"], &["--steps"]);
}

#[test]
fn error_eval_every_zero() {
    expect_bad(&["--eval-every", "0"], &["--eval-every"]);
}

#[test]
fn error_lr_negative() {
    expect_bad(&["--lr", "-0.1"], &["--lr"]);
}

#[test]
fn error_channels_not_two() {
    expect_bad(&["--channels", "4,8,16"], &["--channels"]);
}

#[test]
fn error_missing_data_dir() {
    expect_bad(&["--data", "/nonexistent/fashion"], &["/nonexistent/fashion"]);
}

#[test]
fn error_batch_larger_than_allowed() {
    expect_bad(&["--batch", "100000"], &["--batch"]);
}

#[test]
fn error_batch_larger_than_the_training_set() {
    // The synthetic training set has 600 examples.
    expect_bad(&["--batch", "1000"], &["fewer examples than one batch"]);
}
