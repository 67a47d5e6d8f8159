//! `bnlab small-batch` end to end on the synthetic data: every output, the equal-examples-seen
//! bookkeeping (each variant's evaluations after the same examples, its steps and learning rate
//! scaled with its batch), both evaluations, grouped batches, and a killed run resumed bit for bit.

use crate::common::{
    assert_killed_and_resumed_study_matches, bnlab_ok, expect_error, metrics, num, read, small_batch_tiny_args, strs,
    synthetic_data, KILL_AND_RESUME_SCHEDULE,
};
use serde_json::Value;
use std::path::Path;

/// The variants of the end-to-end run: every method at a batch that divides the reference 16.
const VARIANTS: &str = "bn-b2,renorm-b4,frozen-b4,bn-b8,ghost4-b16,no-bn-b16";

fn run(data: &Path, out: &Path, extra: &[&str]) -> Vec<Value> {
    let args = small_batch_tiny_args(
        data,
        out,
        &[&["--variants", VARIANTS, "--threads", "2"], extra].concat(),
    );
    bnlab_ok(out.parent().unwrap(), &strs(&args));
    metrics(out)
}

/// Equal examples seen: with reference batch 16 and 6 reference steps evaluated every 3, a variant
/// of batch B takes 96/B steps and is evaluated after 48 and 96 examples, at rate
/// 0.02·B/16·0.5^(step/(2·16/B)) (half-life: a third of the run, in its own steps); BN variants
/// record both accuracies, `no-bn` only the population one (there are no statistics).
#[test]
fn every_variant_sees_the_same_examples_and_writes_every_output() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let out = tmp.path().join("out");
    let lines = run(&data, &out, &[]);
    for v in VARIANTS.split(',') {
        let batch: u64 = v.rsplit_once("-b").unwrap().1.parse().unwrap();
        let k = 16 / batch;
        let mine: Vec<&Value> = lines.iter().filter(|m| m["variant"] == v).collect();
        let examples: Vec<u64> = mine.iter().map(|m| m["examples"].as_u64().unwrap()).collect();
        assert_eq!(examples, [48, 96], "{v}: examples seen at its evaluations");
        for m in &mine {
            let step = m["step"].as_u64().unwrap();
            assert_eq!(step * batch, m["examples"].as_u64().unwrap(), "{m}");
            assert_eq!(m["batch"].as_u64(), Some(batch), "{m}");
            let lr = 0.02 * batch as f64 / 16.0 * 0.5f64.powf((step - 1) as f64 / (2 * k) as f64);
            assert!((num(m, "lr") - lr).abs() <= 1e-12 * lr, "lr in {m}, expected {lr}");
            assert!((0.0..=1.0).contains(&num(m, "test_acc")), "{m}");
            match v.starts_with("no-bn") {
                true => assert!(m["running_test_acc"].is_null(), "{m}"),
                false => assert!((0.0..=1.0).contains(&num(m, "running_test_acc")), "{m}"),
            }
        }
        let summary: Value = serde_json::from_str(&read(&out.join("summary.json"))).unwrap();
        assert_eq!(summary["variants"][v]["steps"].as_u64(), Some(96 / batch), "{v}");
    }
    let table: Value = serde_json::from_str(&read(&out.join("table.json"))).unwrap();
    assert_eq!(table["examples"], 96);
    assert_eq!(table["batches"], "iid");
    let cells = table["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 6);
    for cell in cells {
        let last = lines.iter().rev().find(|m| m["variant"] == cell["variant"]).unwrap();
        assert_eq!(cell["test_acc"], last["test_acc"], "{cell}");
        assert_eq!(cell["running_test_acc"], last["running_test_acc"], "{cell}");
    }
    let md = read(&out.join("table.md"));
    assert!(
        md.contains("| method | batch 2 | batch 4 | batch 8 | batch 16 |"),
        "{md}"
    );
    for file in [
        "report.html",
        "accuracy-vs-batch.svg",
        "running-accuracy-vs-batch.svg",
        "curves-b2.svg",
        "curves-b16.svg",
        "settings.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
}

/// `--batches grouped` trains on other batches than `iid` (so other metrics) and is recorded.
#[test]
fn grouped_batches_change_the_run_and_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let args = |out: &Path, mode: &str| {
        small_batch_tiny_args(
            &data,
            out,
            &["--variants", "bn-b8", "--batches", mode, "--threads", "1"],
        )
    };
    let (iid, grouped) = (tmp.path().join("iid"), tmp.path().join("grouped"));
    bnlab_ok(tmp.path(), &strs(&args(&iid, "iid")));
    bnlab_ok(tmp.path(), &strs(&args(&grouped, "grouped")));
    assert_ne!(read(&iid.join("metrics.jsonl")), read(&grouped.join("metrics.jsonl")));
    let table: Value = serde_json::from_str(&read(&grouped.join("table.json"))).unwrap();
    assert_eq!(
        (table["batches"].as_str(), table["classes_per_batch"].as_u64()),
        (Some("grouped"), Some(2))
    );
    assert!(read(&grouped.join("table.md")).contains("grouped batches (each from 2 classes)"));
}

/// A run of `bn-b4` then `frozen-b4` (frozen after a quarter of the run) killed while the second
/// trains and resumed equals the uninterrupted run bit for bit, the frozen state included.
#[test]
fn killed_and_resumed_study_matches_uninterrupted_study() {
    // Reference batch 16: 1500 reference steps are 6,000 of batch 4, checkpoints every 500.
    let schedule = KILL_AND_RESUME_SCHEDULE.map(|a| match a {
        "6000" => "1500",
        "250" | "500" => "125",
        a => a,
    });
    assert_killed_and_resumed_study_matches("small-batch", ["bn-b4", "frozen-b4"], &schedule, small_batch_tiny_args);
}

/// Settings the study cannot run are refused with one line and nothing written.
#[test]
fn bad_settings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let out = tmp.path().join("out");
    let cases: [(&[&str], &str); 4] = [
        (&["--variants", "bn-b64"], "must divide the reference --batch 16"),
        (&["--variants", "bn-b3"], "unknown variant `bn-b3`"),
        (&["--freeze-after", "6"], "--freeze-after must be below --steps"),
        (&["--batches", "sorted"], "invalid value 'sorted'"),
    ];
    for (extra, needle) in cases {
        expect_error(tmp.path(), &strs(&small_batch_tiny_args(&data, &out, extra)), &[needle]);
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
}
