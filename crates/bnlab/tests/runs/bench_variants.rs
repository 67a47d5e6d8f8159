//! `bnlab bench --variant`: which batch-norm variants a run times, and the `"variant"` field of
//! its `--json` rows; the fused rows (`--variant fused`) in JSON and in the table; `--dtype` and
//! the rows' `"dtype"`.

use crate::common::{bnlab_ok, expect_error, FUSED_OPS};
use serde_json::Value;

/// The standard output of `bnlab bench` on the smallest case (1 thread, 1 ms per op) with
/// `extra`.
fn bench_smallest(extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["bench", "--threads", "1", "--min-time", "0.001", "--only", "NC[60,100]"];
    args.extend_from_slice(extra);
    bnlab_ok(tmp.path(), &args).0
}

/// The JSON rows (after the copy line) of `bnlab bench --json` on the smallest case with `extra`.
fn rows(extra: &[&str]) -> Vec<Value> {
    let stdout = bench_smallest(&[&["--json"], extra].concat());
    let mut lines = stdout.lines().map(|l| serde_json::from_str::<Value>(l).unwrap());
    assert!(lines.next().unwrap().get("copy_gbps").is_some());
    lines.collect()
}

/// (variant, op) of each f32 row, after checking every row's fields.
fn variant_ops(rows: &[Value]) -> Vec<(String, String)> {
    variant_dtype_ops(rows)
        .into_iter()
        .filter(|(_, dtype, _)| dtype == "f32")
        .map(|(variant, _, op)| (variant, op))
        .collect()
}

/// (variant, dtype, op) of each row, after checking its fields (a finite positive time).
fn variant_dtype_ops(rows: &[Value]) -> Vec<(String, String, String)> {
    rows.iter()
        .map(|r| {
            let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys.len(), 6, "{r}");
            assert_eq!(
                (&r["layout"], &r["shape"]),
                (&Value::from("NC"), &serde_json::json!([60, 100]))
            );
            assert!(r["ms"].as_f64().is_some_and(|ms| ms > 0.0 && ms.is_finite()), "{r}");
            let field = |k: &str| r[k].as_str().unwrap().to_string();
            (field("variant"), field("dtype"), field("op"))
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// The (variant, op) rows of variants that bench training only: `fwd_train` and `backward` of
/// each, in order.
fn training_ops(variants: &[&str]) -> Vec<(String, String)> {
    let ops = variants.iter().flat_map(|&v| [(v, "fwd_train"), (v, "backward")]);
    pairs(&ops.collect::<Vec<_>>())
}

/// `want`'s (variant, op) rows with each variant's rows once per dtype of `dtypes`, in order.
fn in_dtypes(want: &[(String, String)], dtypes: &[&str]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for block in want.chunk_by(|a, b| a.0 == b.0) {
        for dtype in dtypes {
            out.extend(block.iter().map(|(v, op)| (v.clone(), dtype.to_string(), op.clone())));
        }
    }
    out
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
    // Every dtype by default, each variant's rows in f32, then bf16, then f16.
    assert_eq!(variant_dtype_ops(&rows(&[])), in_dtypes(&want, &["f32", "bf16", "f16"]));
}

/// `--dtype` picks the rows' element types (in the order f32, bf16, f16 whatever the order
/// given), their `"dtype"` field and the table's dtype column say which; every op of every
/// variant, fused included, runs in the half types with finite times; `--help` documents it.
#[test]
fn bench_dtype_selects_rows() {
    let fused: Vec<(&str, &str)> = FUSED_OPS.iter().map(|&op| ("fused", op)).collect();
    let want = pairs(
        &[
            &[("bn", "fwd_train"), ("bn", "fwd_eval"), ("bn", "backward")],
            &fused[..],
        ]
        .concat(),
    );
    let half = rows(&["--variant", "bn,fused", "--dtype", "f16,bf16"]);
    assert_eq!(variant_dtype_ops(&half), in_dtypes(&want, &["bf16", "f16"]));
    let repeated = rows(&["--variant", "bn", "--dtype", "bf16", "--dtype", "f32"]);
    assert_eq!(variant_dtype_ops(&repeated), in_dtypes(&want[..3], &["f32", "bf16"]));
    let table = bench_smallest(&["--variant", "bn", "--dtype", "f16"]);
    let lines: Vec<Vec<&str>> = table.lines().skip(2).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        table.lines().nth(1).unwrap().split_whitespace().nth(1),
        Some("dtype"),
        "{table}"
    );
    assert_eq!(lines.len(), 3, "{table}");
    for (words, (_, op)) in lines.iter().zip(&want) {
        // variant, dtype, layout, shape (`[60, 100]`: two words), op.
        assert_eq!(
            (words[0], words[1], words[2], words[5]),
            ("bn", "f16", "NC", op.as_str()),
            "{table}"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    expect_error(tmp.path(), &["bench", "--dtype", "f64"], &["--dtype", "f64"]);
    let (help, _) = bnlab_ok(tmp.path(), &["bench", "--help"]);
    assert!(
        help.contains("--dtype") && help.contains("bf16") && help.contains("f16"),
        "{help}"
    );
}

#[test]
fn bench_variant_selects_rows() {
    let want = training_ops(&["frozen", "renorm"]);
    assert_eq!(variant_ops(&rows(&["--variant", "renorm,frozen"])), want);
    assert_eq!(
        variant_ops(&rows(&["--variant", "renorm", "--variant", "frozen"])),
        want
    );
    let masked = training_ops(&["masked", "masked-random"]);
    assert_eq!(variant_ops(&rows(&["--variant", "masked-random,masked"])), masked);
    let tmp = tempfile::tempdir().unwrap();
    expect_error(
        tmp.path(),
        &["bench", "--variant", "ghostly"],
        &["--variant", "ghostly"],
    );
}

/// `--variant fused` (not in the default run, which the test above pins): each fused op and its
/// unfused sequence, as JSON rows and as table lines, and `--help` says what each op is.
#[test]
fn bench_fused_rows_come_out() {
    let ops = FUSED_OPS;
    let want: Vec<(&str, &str)> = ops.iter().map(|&op| ("fused", op)).collect();
    assert_eq!(variant_ops(&rows(&["--variant", "fused"])), pairs(&want));
    let table = bench_smallest(&["--variant", "fused", "--dtype", "f32"]);
    let lines: Vec<Vec<&str>> = table.lines().skip(2).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines.len(), ops.len(), "{table}");
    for (words, op) in lines.iter().zip(ops) {
        // variant, dtype, layout, shape (`[60, 100]`: two words), op.
        assert_eq!(
            (words[0], words[1], words[2], words[5]),
            ("fused", "f32", "NC", op),
            "{table}"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let (help, _) = bnlab_ok(tmp.path(), &["bench", "--help"]);
    for op in ops {
        assert!(
            help.contains(&format!("{op} (")),
            "--help does not say what {op} is:\n{help}"
        );
    }
}
