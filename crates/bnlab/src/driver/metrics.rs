//! A run's JSON files: `metrics.jsonl` (written line by line, cut back on resume to what the
//! checkpoints cover, so a continued run neither repeats nor loses a line, and put in variant
//! order at the end), `summary.json`, an experiment's `table.json` and `table.md`, and the
//! settings and runs tables of a report.

use super::VariantSummary;
use crate::atomic::write_atomic;
use crate::report::percent;
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// What an evaluation line says about training since the previous evaluation, for experiments
/// that record a divergence ([`super::Divergence::Record`]): the last fields of their metrics line,
/// flattened into it (`#[serde(flatten)]`), so the JSON keeps the keys `train_loss`, `lr` and
/// `diverged`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainingStatus {
    /// Mean training loss over the steps since the previous evaluation (`None` when diverged).
    pub train_loss: Option<f64>,
    /// Learning rate of the last step's update.
    pub lr: f64,
    /// Whether the training loss became NaN or infinite at this step (the variant stops).
    pub diverged: bool,
}

impl TrainingStatus {
    /// An evaluation's status: the mean training loss since the previous one and the last rate.
    pub fn evaluated(train_loss: f64, lr: f64) -> Self {
        TrainingStatus {
            train_loss: Some(train_loss),
            lr,
            diverged: false,
        }
    }

    /// The status on the line that reports a divergence, with the rate of the step that diverged.
    pub fn diverged(lr: f64) -> Self {
        TrainingStatus {
            train_loss: None,
            lr,
            diverged: true,
        }
    }
}

/// One line of a conv study's `metrics.jsonl` (`padded`, `small-batch`): the variant, the step,
/// the test accuracy (`None` on the line that reports divergence), the study's own fields `own`
/// (flattened: their keys stand beside these) and the [`TrainingStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyLine<V, E> {
    /// The variant.
    pub variant: V,
    /// Training steps done.
    pub step: u64,
    /// Test accuracy (`None` on the line that reports divergence).
    pub test_acc: Option<f64>,
    /// The study's own fields.
    #[serde(flatten)]
    pub own: E,
    /// Training since the previous evaluation: loss, learning rate, divergence.
    #[serde(flatten)]
    pub training: TrainingStatus,
}

/// A line of an experiment's `metrics.jsonl`: a JSON object with the `variant` (its name) and
/// the `step` it belongs to ([`line_place`]: they fix the file's final order), read back with
/// serde when a run resumes (deserializing rejects a line that is not one of the experiment's).
/// Every type that serde writes and reads is one.
pub trait MetricLine: Serialize + DeserializeOwned + Clone + Send {}

impl<T: Serialize + DeserializeOwned + Clone + Send> MetricLine for T {}

/// Whether a resumed run keeps the `metrics.jsonl` line `line` when its variant's checkpoint
/// covers its step: every line but one written when training stopped (a divergence,
/// `"diverged": true` of [`TrainingStatus`]), which lies past the last checkpoint and is written
/// again.
pub fn kept_on_resume(line: &Value) -> bool {
    line["diverged"].as_bool() != Some(true)
}

/// The variant name and step of a `metrics.jsonl` line (every line has both; `None` if it lacks
/// either).
pub fn line_place(line: &Value) -> Option<(&str, u64)> {
    Some((line["variant"].as_str()?, line["step"].as_u64()?))
}

/// `metrics.jsonl`: one JSON object per line, flushed after each so a running study can be watched.
pub struct JsonLines {
    file: std::fs::File,
    path: PathBuf,
}

impl JsonLines {
    /// Creates (truncates) `path`.
    pub fn create(path: PathBuf) -> Result<Self> {
        let file = std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(JsonLines { file, path })
    }

    /// Opens `path` to append lines after those it holds.
    pub fn append(path: PathBuf) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(JsonLines { file, path })
    }

    /// Appends `value` as one line.
    pub fn write(&mut self, value: &impl Serialize) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(value)?)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Rewrites `path` (atomically) with `lines`, one JSON object per line.
pub fn write_jsonl(path: &Path, lines: &[impl Serialize]) -> Result<()> {
    let lines = lines.iter().map(|m| serde_json::to_string(m).map(|l| l + "\n"));
    write_atomic(path, lines.collect::<Result<String, _>>()?.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes an experiment's table into `out`: `table.json` and `table.md`.
pub fn write_table(out: &Path, table: &super::RunTable) -> Result<()> {
    for (name, text) in [("table.json", &table.json), ("table.md", &table.markdown)] {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// A column of a report's table of runs ([`runs_table`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunColumn {
    /// Test accuracy at the last evaluation.
    FinalTestAcc,
    /// Best test accuracy over evaluations.
    BestTestAcc,
    /// Steps trained.
    Steps,
    /// Milliseconds per training step.
    MsPerStep,
    /// Wall-clock seconds of the run.
    Seconds,
}

impl RunColumn {
    /// The column's header.
    pub fn header(self) -> &'static str {
        match self {
            RunColumn::FinalTestAcc => "final test accuracy",
            RunColumn::BestTestAcc => "best test accuracy",
            RunColumn::Steps => "steps trained",
            RunColumn::MsPerStep => "ms / step",
            RunColumn::Seconds => "seconds",
        }
    }

    /// The cell of the run `r`.
    pub fn cell(self, r: &VariantSummary) -> String {
        match self {
            RunColumn::FinalTestAcc => percent(r.final_test_acc),
            RunColumn::BestTestAcc => percent(r.best_test_acc),
            RunColumn::Steps => r.steps.to_string(),
            RunColumn::MsPerStep => format!("{:.3}", r.ms_per_step),
            RunColumn::Seconds => format!("{:.1}", r.seconds),
        }
    }
}

/// A report's table of runs: the header (`variant`, then `columns`) and a row per variant of
/// `variants` (`(name, label)` pairs, in order) that has a summary: its label, then its cells.
pub fn runs_table<'a>(
    variants: impl IntoIterator<Item = (&'a str, &'a str)>,
    summaries: &BTreeMap<&'static str, VariantSummary>,
    columns: &[RunColumn],
) -> (Vec<String>, Vec<Vec<String>>) {
    let header = std::iter::once("variant")
        .chain(columns.iter().map(|c| c.header()))
        .map(String::from)
        .collect();
    let rows = (variants.into_iter())
        .filter_map(|(name, label)| summaries.get(name).map(|r| (label, r)))
        .map(|(label, r)| {
            let cells = columns.iter().map(|c| c.cell(r));
            std::iter::once(label.to_string()).chain(cells).collect()
        })
        .collect();
    (header, rows)
}

/// The settings of a run as (name, value) rows for a report page.
pub fn settings_rows(s: &impl Serialize) -> Vec<(String, String)> {
    let v = serde_json::to_value(s).unwrap_or_default();
    let mut rows = Vec::new();
    if let Some(map) = v.as_object() {
        for (k, v) in map {
            rows.push((k.clone(), v.to_string().trim_matches('"').to_string()));
        }
    }
    rows
}
