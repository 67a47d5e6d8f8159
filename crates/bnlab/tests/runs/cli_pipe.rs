//! A reader that closes the pipe early (`bnlab bench --json | head -1`) ends bnlab quietly:
//! no panic message, no error line, as for any Unix filter.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// SIGPIPE's number on Linux and the BSDs.
#[cfg(unix)]
const SIGPIPE: i32 = 13;

#[test]
fn closed_stdout_pipe_is_not_a_panic() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(["bench", "--json", "--threads", "1", "--min-time", "0.001"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bnlab starts");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("copy_gbps"), "first line: {first:?}");
    // The reader is dropped here: the pipe is closed while bnlab still has lines to print.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "bnlab panicked: {stderr}");
    assert!(stderr.trim().is_empty(), "unexpected error output: {stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(SIGPIPE), "status: {}", out.status);
    }
}
