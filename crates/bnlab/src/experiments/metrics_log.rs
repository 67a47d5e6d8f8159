//! `metrics.jsonl` across an interruption: on resume the log is cut back to what the checkpoints
//! cover, so the continued run neither repeats nor loses a line.

use crate::atomic::write_atomic;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// Rewrites the JSON-lines file `path` (atomically) keeping the lines `keep` accepts, in order,
/// and returns them. A missing file counts as empty. A final line that is not valid JSON is a write
/// torn by the interruption and is dropped; an invalid line before the last is an error.
pub fn truncate_jsonl(path: &Path, keep: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut kept = Vec::new();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Value>(line) {
            Ok(v) if keep(&v) => {
                out.push_str(line);
                out.push('\n');
                kept.push(v);
            }
            Ok(_) => {}
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => bail!("{}: line {} is not valid JSON: {e}", path.display(), i + 1),
        }
    }
    write_atomic(path, out.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(kept)
}
