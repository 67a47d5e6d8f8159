//! Atomic file replacement: a reader (or a crash) sees the old file or the new one, never a part;
//! and the clean-up of the temporary files a killed writer leaves behind.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The temporary file name [`write_atomic`] uses for `name` in process `pid`: `.{name}.tmp-{pid}`.
pub fn temp_name(name: &OsStr, pid: u32) -> OsString {
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!("{TEMP_MARK}{pid}"));
    tmp
}

const TEMP_MARK: &str = ".tmp-";

/// The writer's process id if `name` is one of [`temp_name`]'s names (`.` + a non-empty name +
/// `.tmp-` + a decimal process id), else `None`.
pub fn temp_name_pid(name: &OsStr) -> Option<u32> {
    let name = name.to_str()?;
    let rest = name.strip_prefix('.')?;
    let (target, pid) = rest.rsplit_once(TEMP_MARK)?;
    if target.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` exists on this machine (`kill(pid, 0)`: a process of another user
/// counts as existing).
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes the temporary files that [`write_atomic`] calls killed mid-write left in `dir`, and
/// returns their paths (sorted).
///
/// A file is removed only when all of these hold: its name is one of [`temp_name`]'s
/// (`.{name}.tmp-{pid}`; nothing else in `dir` is touched), it is a regular file (not a
/// directory or a symbolic link), and its writer is gone: no process `pid` exists on this
/// machine. The temporary files of live writers, this process's own included, are kept, so
/// calling this can never break a write in progress on this machine.
///
/// Meant for the start (or resume) of a run, while the run holds the lock of its directory: the
/// lock guarantees that no writer on another machine (a shared file system, where process ids
/// mean nothing) is using the directory. A process id reused by an unrelated process since the
/// kill keeps that file until a later call: harmless, as no reader opens temporary files.
///
/// # Errors
/// The I/O error of listing `dir` or of removing a file (a file that vanished meanwhile is not
/// an error).
pub fn remove_stale_temp_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Some(pid) = temp_name_pid(&entry.file_name()) else {
            continue;
        };
        if !entry.file_type()?.is_file() || process_exists(pid) {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => removed.push(entry.path()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    removed.sort();
    Ok(removed)
}

/// Writes `bytes` to `path` atomically: into a temporary file in the same directory, flushed to
/// disk (`fsync`), renamed over `path`, then the directory is flushed so the rename itself is
/// durable. On any error the temporary file is removed and `path` is left as it was; a kill
/// mid-write leaves the temporary file ([`temp_name`]), which [`remove_stale_temp_files`]
/// removes.
///
/// Fails (with the I/O error) when the directory does not exist or cannot be written, or `path`
/// has no file name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(temp_name(name, std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
