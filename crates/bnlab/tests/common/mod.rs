//! Helpers shared by the end-to-end tests: running the built binary, synthetic IDX data, and
//! checking one-line errors.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bnlab(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("cannot start bnlab")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs bnlab and asserts success; returns stdout and stderr.
pub fn bnlab_ok(cwd: &Path, args: &[&str]) -> (String, String) {
    let out = bnlab(cwd, args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "bnlab {} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        args.join(" "),
        out.status
    );
    (stdout, stderr)
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

pub fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

/// A small learnable dataset in the standard file names (raw IDX): 8×8 images of 4 classes, each
/// class brighter in its own quarter of the image, with a deterministic pseudo-random texture.
pub fn synthetic_data(dir: &Path) -> PathBuf {
    let (rows, cols, classes) = (8u32, 8u32, 4u8);
    let mut state = 0x1234_5678u32;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    for (split, n) in [("train", 600u32), ("t10k", 200)] {
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let label = (i % classes as u32) as u8;
            labels.push(label);
            for p in 0..rows * cols {
                let quarter = ((p / cols) / (rows / 2)) * 2 + (p % cols) / (cols / 2);
                let base = if quarter == label as u32 { 160 } else { 40 };
                pixels.push((base + next() % 80) as u8);
            }
        }
        std::fs::write(
            dir.join(format!("{split}-images-idx3-ubyte")),
            idx(&[n, rows, cols], &pixels),
        )
        .unwrap();
        std::fs::write(dir.join(format!("{split}-labels-idx1-ubyte")), idx(&[n], &labels)).unwrap();
    }
    dir.to_path_buf()
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub fn expect_error(cwd: &Path, args: &[&str], needles: &[&str]) {
    let out = bnlab(cwd, args);
    let stderr = text(&out.stderr);
    let cmd = args.join(" ");
    assert!(!out.status.success(), "`bnlab {cmd}` succeeded");
    let code = out.status.code();
    assert!(code.is_some(), "`bnlab {cmd}` was killed by a signal");
    assert_ne!(code, Some(101), "`bnlab {cmd}` exited like a panic: {stderr}");
    assert!(!stderr.contains("panicked"), "`bnlab {cmd}` panicked: {stderr}");
    assert!(stderr.starts_with("error:"), "`bnlab {cmd}`: stderr {stderr:?}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "`bnlab {cmd}`: {stderr:?} does not mention {needle:?}"
        );
    }
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "`bnlab {cmd}`: the message is not one line: {stderr:?}"
    );
}
