//! A run's directory: one writer at a time, never a run written over another by mistake.
//!
//! - [`RunDir::claim`] creates the directory if needed and takes an exclusive lock on its
//!   `.lock` file (`flock`), held for the run's life: a second run writing the same directory
//!   fails at once, naming the holder's process id. The kernel releases the lock when the
//!   process ends, however it ends, so a killed run never blocks its own resume.
//! - A fresh run refuses a directory that already holds a run (its `settings.json`,
//!   `metrics.jsonl` or checkpoints) unless told to overwrite it; overwriting removes that run's
//!   files first, so no stale checkpoint of another variant survives.
//! - On resume, temporary files that a killed writer left are removed (under the lock).
//! - Before training, the directory is checked writable with the longest file name the run will
//!   write, so a bad or over-long `--out` fails before the first step, not at the first checkpoint.
//! - [`new_run_dir`] makes a default output folder that no other run can have.

use crate::atomic::{remove_stale_temp_files, temp_name, write_atomic};
use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The files of a run directory a fresh run with `overwrite` replaces (besides `checkpoints/`).
const RUN_FILES: [&str; 3] = ["settings.json", "metrics.jsonl", "summary.json"];

/// A run directory held by this process (the lock is released when it is dropped).
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: File,
}

impl RunDir {
    /// Creates `dir` (and its `checkpoints/`) if needed and locks it for this process.
    ///
    /// Rejects a directory that cannot be created, written or locked, and one another process
    /// holds (the error names its process id).
    pub fn claim(dir: &Path) -> Result<RunDir> {
        let checkpoints = dir.join("checkpoints");
        fs::create_dir_all(&checkpoints)
            .with_context(|| format!("cannot create output directory {}", checkpoints.display()))?;
        let path = dir.join(".lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "unknown" } else { holder };
                bail!(
                    "{} is in use by another bnlab run (process {holder}); wait for it to end or choose another --out",
                    dir.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        lock.set_len(0)
            .and_then(|_| lock.seek(SeekFrom::Start(0)))
            .and_then(|_| write!(lock, "{}", std::process::id()))
            .and_then(|_| lock.flush())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(RunDir {
            path: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// For a fresh run: refuses a directory that already holds a run, or with `overwrite`
    /// removes that run's files (`settings.json`, `metrics.jsonl`, `summary.json` and every file
    /// in `checkpoints/`).
    pub fn prepare_fresh(&self, overwrite: bool) -> Result<()> {
        let checkpoints = self.path.join("checkpoints");
        let mut found: Vec<PathBuf> = RUN_FILES
            .iter()
            .map(|f| self.path.join(f))
            .filter(|p| p.exists())
            .collect();
        for entry in fs::read_dir(&checkpoints).with_context(|| format!("cannot list {}", checkpoints.display()))? {
            let entry = entry.with_context(|| format!("cannot list {}", checkpoints.display()))?;
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                found.push(entry.path());
            }
        }
        if found.is_empty() {
            return Ok(());
        }
        if !overwrite {
            bail!(
                "{} already holds a run ({}); resume it with --resume, choose another --out, or pass --overwrite to replace it",
                self.path.display(),
                found[0].display()
            );
        }
        for path in found {
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        Ok(())
    }

    /// For a resumed run: removes the temporary files killed writers left in the directory and
    /// its `checkpoints/` (see [`remove_stale_temp_files`]).
    pub fn clean_stale(&self) -> Result<()> {
        for dir in [self.path.clone(), self.path.join("checkpoints")] {
            remove_stale_temp_files(&dir).with_context(|| format!("cannot clean {}", dir.display()))?;
        }
        Ok(())
    }

    /// Checks that every file the run will write in `checkpoints/` can be written: writes and
    /// removes a file whose temporary name is as long as the longest the run uses (the checkpoint
    /// of the variant with the longest of `names`).
    pub fn check_writable(&self, names: &[&str]) -> Result<()> {
        let longest = names.iter().map(|n| n.len()).max().unwrap_or(1);
        let probe = self
            .path
            .join("checkpoints")
            .join(format!("{}.safetensors", "p".repeat(longest)));
        let name = probe.file_name().unwrap_or_default();
        let tmp = probe.with_file_name(temp_name(name, std::process::id()));
        write_atomic(&probe, b"")
            .and_then(|_| fs::remove_file(&probe))
            .with_context(|| {
                format!(
                    "{} cannot be written (checked with {})",
                    self.path.display(),
                    tmp.display()
                )
            })
    }
}

/// Creates and returns a new output folder `runs/<experiment>-<unix time>` (with `-2`, `-3`, …
/// added if that name is taken): created atomically, so two runs started in the same second get
/// two folders.
pub fn new_run_dir(experiment: &str) -> Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let runs = Path::new("runs");
    fs::create_dir_all(runs).with_context(|| format!("cannot create {}", runs.display()))?;
    for n in 1..=1000u32 {
        let name = match n {
            1 => format!("{experiment}-{secs}"),
            n => format!("{experiment}-{secs}-{n}"),
        };
        let dir = runs.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    bail!("cannot find a free folder name under {}", runs.display())
}
