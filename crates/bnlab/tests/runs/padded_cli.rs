//! End-to-end tests of `bnlab padded`, running the built binary.
//!
//! `--quick` runs the three variants on the installed Fashion-MNIST (skipped with a note when it
//! is absent, unless `BNLAB_REQUIRE_DATA=1`); the padding-value invariance, kill-and-resume,
//! `bnlab eval` and the flag errors run on small synthetic IDX data (8×8 images: sequences of 8
//! steps). Every command runs in a temporary working directory.

use crate::common::*;
use serde_json::Value;
use std::path::Path;

const ALL: [&str; 3] = ["bn", "masked-bn", "no-bn"];

fn json(path: &Path) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metrics lines of `variant`.
fn lines_of<'a>(lines: &'a [Value], variant: &str) -> Vec<&'a Value> {
    lines.iter().filter(|m| m["variant"] == variant).collect()
}

/// `bnlab padded --quick` on Fashion-MNIST: every output file; the metrics lines (steps, the
/// scheduled learning rate, one accuracy per test condition in order, the first the training
/// lengths'); the table against the last lines.
#[test]
fn quick_study_writes_every_output() {
    let Some((_tmp, out, stdout)) = quick_study("padded") else {
        return;
    };
    assert!(
        stdout.contains("| variant | lengths 8-28 (36% padding, as trained)"),
        "{stdout}"
    );

    let lines = metrics(&out);
    let conditions = ["8-28", "28", "4-10"];
    for v in ALL {
        let mine = lines_of(&lines, v);
        let steps: Vec<u64> = mine.iter().map(|m| m["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [10, 20, 30], "{v}");
        for m in mine {
            assert_eq!(m["diverged"], false, "{m}");
            let step = m["step"].as_u64().unwrap();
            let lr = 0.05 * 0.5f64.powf((step - 1) as f64 / 10.0);
            assert!((num(m, "lr") - lr).abs() <= 1e-12 * lr, "lr in {m}, expected {lr}");
            let c = m["conditions"].as_array().expect("conditions");
            let lengths: Vec<&str> = c.iter().map(|c| c["lengths"].as_str().unwrap()).collect();
            assert_eq!(lengths, conditions, "{m}");
            assert!(c.iter().all(|c| (0.0..=1.0).contains(&num(c, "test_acc"))), "{m}");
            assert_eq!(
                c[0]["test_acc"], m["test_acc"],
                "condition 0 is the training lengths: {m}"
            );
            assert!(num(m, "train_loss") > 0.0, "{m}");
        }
    }
    // Masked BN learns within 30 steps: 10 classes make chance 10%, a network that learned
    // nothing (or whose padding reached its statistics as NaN) stays there; the quick run of
    // 30 steps reaches about 27%, so twice chance is the bar.
    let last = |v: &str| *lines_of(&lines, v).last().unwrap();
    assert!(num(last("masked-bn"), "test_acc") > 0.2, "{}", last("masked-bn"));

    // table.json: the last line of each variant, per condition; the padding fractions of 28 steps.
    let table = json(&out.join("table.json"));
    let padding: Vec<f64> = table["padding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_f64().unwrap())
        .collect();
    assert_eq!(padding, [1.0 - 18.0 / 28.0, 0.0, 1.0 - 7.0 / 28.0]);
    let rows = table["rows"].as_array().expect("rows");
    for (row, v) in rows.iter().zip(ALL) {
        assert_eq!(row["variant"], v);
        let want: Vec<&Value> = last(v)["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["test_acc"])
            .collect();
        let got: Vec<&Value> = row["test_acc"].as_array().unwrap().iter().collect();
        assert_eq!(got, want, "{v}");
    }
    let md = read(&out.join("table.md"));
    for v in ALL {
        let acc = format!("{:.2}%", num(last(v), "test_acc") * 100.0);
        assert!(
            md.lines().any(|l| l.starts_with(&format!("| {v} | {acc} |"))),
            "{v} {acc}:\n{md}"
        );
    }

    let summary = json(&out.join("summary.json"));
    for v in ALL {
        assert_eq!(summary["variants"][v]["steps"], 30, "{v}");
        assert!(ckpt(&out, v).is_file(), "no checkpoint of {v}");
    }
    for plot in ["accuracy-vs-padding", "curves"] {
        let svg = svg_element(&out.join(format!("{plot}.svg")));
        assert!(ALL.iter().all(|v| svg.contains(v)), "{plot}.svg lacks a variant");
        check_png(&out.join(format!("{plot}.png")));
    }
    let html = read(&out.join("report.html"));
    assert!(html.contains("<table") && html.contains("<svg") && html.contains("masked-bn"));
}

/// The metrics lines of one tiny run with `--pad-value pad` (and `extra`), by variant.
fn tiny_run(cwd: &Path, data: &Path, name: &str, extra: &[&str]) -> Vec<Value> {
    let out = cwd.join(name);
    bnlab_ok(cwd, &strs(&padded_tiny_args(data, &out, extra)));
    metrics(&out)
}

/// Issue 19: a garbage padding value must not change masked BN's metrics at all. With
/// `--pad-value` 1e30, -1e30, nan or inf instead of 0, every metrics line of `masked-bn` (and of
/// `no-bn`, the masked network without BN) is the same text, bit for bit. `bn`, whose first
/// convolution and statistics read the padding, learns nothing: with ±1e30 its statistics are the
/// padding's, every sequence normalizes to the same values and it predicts one class, a quarter
/// of the balanced test set under every test condition, where with padding 0 it learns; with NaN
/// or ∞ its statistics are NaN, which the ReLU passes on (as IEEE 754 and PyTorch have it), and
/// the run records the divergence at the first step (one metrics line, no accuracy).
///
/// In `masked-bn` the padding is zeroed (`ZeroMasked`) before the first convolution, so what this
/// test holds is the mask reaching every layer in every pass; that masked batch norm itself
/// ignores padding (its values and its amount) is held by the library's `engine_masked` tests.
#[test]
fn garbage_padding_changes_no_bit_of_masked_bn() {
    let (tmp, data, _) = scratch_with_synthetic_data();
    let zero = tiny_run(tmp.path(), &data, "zero", &["--pad-value", "0"]);
    let text = |lines: &[Value], v: &str| -> Vec<String> { lines_of(lines, v).iter().map(|m| m.to_string()).collect() };
    let accuracies = |lines: &[Value], v: &str| -> Vec<f64> {
        (lines_of(lines, v).iter())
            .flat_map(|m| m["conditions"].as_array().unwrap().iter().map(|c| num(c, "test_acc")))
            .collect()
    };
    assert!(!lines_of(&zero, "masked-bn").is_empty());
    assert!(
        num(lines_of(&zero, "bn").last().unwrap(), "test_acc") > 0.3,
        "bn learns with padding 0"
    );
    for pad in ["1e30", "-1e30", "nan", "inf"] {
        let dirty = tiny_run(tmp.path(), &data, &format!("pad{pad}"), &["--pad-value", pad]);
        for v in ["masked-bn", "no-bn"] {
            assert_eq!(text(&dirty, v), text(&zero, v), "{v} with --pad-value {pad}");
        }
        if ["nan", "inf"].contains(&pad) {
            let bn = lines_of(&dirty, "bn");
            let diverged = |m: &Value| m["diverged"] == true && m["step"] == 1 && m["test_acc"].is_null();
            assert!(
                bn.len() == 1 && diverged(bn[0]),
                "bn with --pad-value {pad} diverges at once: {:?}",
                text(&dirty, "bn")
            );
            continue;
        }
        let bn = accuracies(&dirty, "bn");
        assert!(
            bn.len() == 9 && bn.iter().all(|&a| a == 0.25),
            "bn with --pad-value {pad}: {bn:?}"
        );
    }
}

/// Kill the study with SIGKILL while it trains its second variant, resume it, and compare with an
/// uninterrupted study: the same metrics, table and checkpoints, bit for bit.
#[test]
fn killed_and_resumed_study_matches_uninterrupted_study() {
    assert_killed_and_resumed_study_matches(
        "padded",
        ["masked-bn", "bn"],
        &KILL_AND_RESUME_SCHEDULE,
        padded_tiny_args,
    );
}

/// `bnlab eval` of a padded checkpoint measures the test set under the training lengths: the
/// accuracy of the run's last evaluation, exactly. `--fold` folds `bn`'s two batch norms into
/// their convolutions (at most one prediction moves), and is refused for `masked-bn`, whose
/// batch norms write 0 at padded steps, which no folded convolution does.
#[test]
fn eval_of_a_checkpoint_matches_the_last_evaluation() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    bnlab_ok(tmp.path(), &strs(&padded_tiny_args(&data, &out, &[])));
    let lines = metrics(&out);
    for v in ALL {
        let want = num(lines_of(&lines, v).last().unwrap(), "test_acc");
        if v == "bn" {
            assert_eval_and_fold(tmp.path(), &ckpt(&out, v), v, want, 2);
            continue;
        }
        let (stdout, _) = bnlab_ok(tmp.path(), &["eval", "--checkpoint", s(&ckpt(&out, v))]);
        let (correct, total) = eval_counts(&stdout);
        assert_eq!(correct as f64 / total as f64, want, "{v}: {stdout}");
    }
    let masked = ckpt(&out, "masked-bn");
    let args = ["eval", "--checkpoint", s(&masked), "--fold"];
    expect_error(tmp.path(), &args, &["cannot fold batch norm", "masked"]);
}

/// Bad flags and settings are refused with one line naming the problem.
#[test]
fn bad_flags_are_rejected_with_one_line() {
    let (tmp, data, out) = scratch_with_synthetic_data();
    let cwd = tmp.path();
    let err = |extra: &[&str], needles: &[&str]| {
        expect_error(cwd, &strs(&padded_tiny_args(&data, &out, extra)), needles);
    };
    err(
        &["--train-lengths", "0-5"],
        &["--train-lengths", "lengths must be >= 1"],
    );
    err(&["--train-lengths", "6-3"], &["MIN is above MAX"]);
    err(&["--train-lengths", "a-b"], &["expected lengths MIN-MAX or N"]);
    err(&["--test-lengths", "8,,3"], &["--test-lengths"]);
    err(&["--test-lengths", "9"], &["lengths 9", "at most 8"]);
    err(&["--pad-value", "zero"], &["--pad-value", "expected a number"]);
    err(&["--channels", "1,2,3"], &["--channels takes two numbers"]);
    err(&["--variants", "bn,layer-norm"], &["unknown variant `layer-norm`"]);
    err(&["--half-life", "0"], &["--half-life"]);
    assert!(!out.exists(), "a refused run wrote {}", out.display());
}
