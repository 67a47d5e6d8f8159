//! `bnlab bench --variant`: which batch-norm variants a run times, and the `"variant"` field of
//! its `--json` rows.

use crate::common::{bnlab_ok, expect_error};
use serde_json::Value;

/// The JSON rows (after the copy line) of `bnlab bench --json` on the smallest case with `extra`.
fn rows(extra: &[&str]) -> Vec<Value> {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec![
        "bench",
        "--json",
        "--threads",
        "1",
        "--min-time",
        "0.001",
        "--only",
        "NC[60,100]",
    ];
    args.extend_from_slice(extra);
    let (stdout, _) = bnlab_ok(tmp.path(), &args);
    let mut lines = stdout.lines().map(|l| serde_json::from_str::<Value>(l).unwrap());
    assert!(lines.next().unwrap().get("copy_gbps").is_some());
    lines.collect()
}

/// (variant, op) of each row, after checking its fields.
fn variant_ops(rows: &[Value]) -> Vec<(String, String)> {
    rows.iter()
        .map(|r| {
            let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys.len(), 5, "{r}");
            assert_eq!(
                (&r["layout"], &r["shape"]),
                (&Value::from("NC"), &serde_json::json!([60, 100]))
            );
            assert!(r["ms"].as_f64().is_some_and(|ms| ms > 0.0), "{r}");
            (
                r["variant"].as_str().unwrap().to_string(),
                r["op"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
fn bench_times_every_variant_by_default() {
    let want = pairs(&[
        ("bn", "fwd_train"),
        ("bn", "fwd_eval"),
        ("bn", "backward"),
        ("frozen", "fwd_train"),
        ("frozen", "backward"),
        ("renorm", "fwd_train"),
        ("renorm", "backward"),
        ("ghost", "fwd_train"),
        ("ghost", "backward"),
        ("masked", "fwd_train"),
        ("masked", "backward"),
        ("masked-random", "fwd_train"),
        ("masked-random", "backward"),
    ]);
    assert_eq!(variant_ops(&rows(&[])), want);
}

#[test]
fn bench_variant_selects_rows() {
    let want = pairs(&[
        ("frozen", "fwd_train"),
        ("frozen", "backward"),
        ("renorm", "fwd_train"),
        ("renorm", "backward"),
    ]);
    assert_eq!(variant_ops(&rows(&["--variant", "renorm,frozen"])), want);
    assert_eq!(
        variant_ops(&rows(&["--variant", "renorm", "--variant", "frozen"])),
        want
    );
    let masked = pairs(&[
        ("masked", "fwd_train"),
        ("masked", "backward"),
        ("masked-random", "fwd_train"),
        ("masked-random", "backward"),
    ]);
    assert_eq!(variant_ops(&rows(&["--variant", "masked-random,masked"])), masked);
    let tmp = tempfile::tempdir().unwrap();
    expect_error(
        tmp.path(),
        &["bench", "--variant", "ghostly"],
        &["--variant", "ghostly"],
    );
}
