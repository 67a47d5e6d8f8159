//! Helpers shared by the test binaries (`library`, `runs`, `parallel`): running the built binary
//! (also under `mpirun`, or killed mid-run), locating Fashion-MNIST, writing small synthetic IDX
//! data, checking output files, checkpoints and one-line errors, seeded random inputs, and the
//! small trained network the checkpoint tests save and damage ([`checkpoints`]).
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The Debian package's Fashion-MNIST.
pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

pub fn bnlab(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("cannot start bnlab")
}

/// OpenMPI's `mpirun`, or `None` (with a note) when it is absent and not required
/// (`BNLAB_REQUIRE_MPI=1`, as `.ci/run` sets, makes its absence a failure).
pub fn mpirun() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("mpirun"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("BNLAB_REQUIRE_MPI").as_deref() != Ok("1"),
            "mpirun is not installed and BNLAB_REQUIRE_MPI=1: apt-get install openmpi-bin libopenmpi-dev"
        );
        println!("skipping: mpirun is absent (apt-get install openmpi-bin libopenmpi-dev)");
    }
    found
}

/// Starts `mpirun -np NP bnlab ARGS` ([`mpirun_bnlab`]) with its standard output discarded and its
/// standard error sent to `stderr`.
pub fn spawn_mpi_job(mpirun: &Path, np: usize, args: &[&str], stderr: Stdio) -> Child {
    mpirun_bnlab(mpirun, np, args)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("cannot start mpirun")
}

/// Waits for `child` to end, polling every 100 ms: its exit status, or `None` once `limit` has
/// passed (the child still running).
pub fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `mpirun --oversubscribe -np NP bnlab ARGS` (allowed as root).
pub fn mpirun_bnlab(mpirun: &Path, np: usize, args: &[&str]) -> Command {
    let mut c = Command::new(mpirun);
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "-np", &np.to_string(), env!("CARGO_BIN_EXE_bnlab")])
        .args(args);
    c
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

/// Fashion-MNIST, or `None` (with a note) when it is not installed and not required.
pub fn fashion_mnist() -> Option<&'static str> {
    let present = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    .iter()
    .all(|f| {
        let p = Path::new(FASHION_MNIST).join(f);
        p.is_file() || Path::new(&format!("{}.gz", p.display())).is_file()
    });
    if present {
        return Some(FASHION_MNIST);
    }
    assert!(
        std::env::var_os("BNLAB_REQUIRE_DATA").is_none(),
        "{FASHION_MNIST} is absent but BNLAB_REQUIRE_DATA is set"
    );
    println!("skipping: {FASHION_MNIST} is absent (apt-get install dataset-fashion-mnist)");
    None
}

/// An IDX file: the magic number with element type `type_byte`, the dimensions, then `data`.
pub fn idx_with_type(type_byte: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, type_byte, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

/// An IDX file of unsigned bytes (type 0x08), the type Fashion-MNIST uses.
pub fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    idx_with_type(0x08, dims, data)
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

/// An SVG file's `<svg …>…</svg>` element, after checking it is one.
pub fn svg_element(path: &Path) -> String {
    let svg = read(path);
    let (start, end) = (svg.find("<svg"), svg.rfind("</svg>"));
    match (start, end) {
        (Some(a), Some(b)) if a < b => svg[a..b + "</svg>".len()].to_string(),
        _ => panic!("{} is not an SVG document", path.display()),
    }
}

/// Decodes a PNG and checks it has a size and is not a single flat color.
pub fn check_png(path: &Path) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(file)
        .read_info()
        .unwrap_or_else(|e| panic!("{}: not a PNG: {e}", path.display()));
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).expect("PNG frame");
    assert!(
        frame.width > 100 && frame.height > 100,
        "{}: {}x{}",
        path.display(),
        frame.width,
        frame.height
    );
    let pixels = &buf[..frame.buffer_size()];
    assert!(
        pixels.iter().any(|&b| b != pixels[0]),
        "{}: the image is blank",
        path.display()
    );
}

/// Runs `bnlab args` in `cwd` and asserts it failed cleanly: a non-zero exit that is not a
/// panic's, and one `error:` line on stderr mentioning every needle. Returns that stderr.
pub fn expect_error(cwd: &Path, args: &[&str], needles: &[&str]) -> String {
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
    stderr
}

/// The lines of `out/metrics.jsonl` as JSON values.
pub fn metrics(out: &Path) -> Vec<Value> {
    read(&out.join("metrics.jsonl"))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad metrics line {l:?}: {e}")))
        .collect()
}

/// The evaluations in `out/metrics.jsonl` (of `variant` only, when given) as
/// `(step, test accuracy, training loss)`.
pub fn evaluation_points(out: &Path, variant: Option<&str>) -> Vec<(u64, f64, f64)> {
    metrics(out)
        .iter()
        .filter(|m| variant.is_none_or(|v| m["variant"] == v))
        .map(|m| (m["step"].as_u64().unwrap(), num(m, "test_acc"), num(m, "train_loss")))
        .collect()
}

/// `v[key]` as a number (panics when missing).
pub fn num(v: &Value, key: &str) -> f64 {
    v.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("`{key}` missing or not a number in {v}"))
}

/// A scratch folder holding [`synthetic_data`]: the folder (removed when dropped), the data
/// folder, and `folder/out` (not created) for a run's output.
pub fn scratch_with_synthetic_data() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let out = tmp.path().join("out");
    (tmp, data, out)
}

/// `bnlab paper-mlp` arguments on `data` into `out` with batches of 10, quietly, then `extra`; a
/// flag given in `extra` replaces its default (clap rejects a flag given twice).
pub fn paper_mlp_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    with_defaults(&["paper-mlp", "--batch", "10"], data, out, extra)
}

/// `defaults` (a subcommand, then flags each with one value), `--data data --out out --quiet`,
/// then `extra`; a default flag that `extra` gives again is left out.
fn with_defaults(defaults: &[&str], data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = defaults.iter().map(|a| a.to_string()).collect();
    args.extend(["--data", s(data), "--out", s(out), "--quiet"].map(String::from));
    for key in extra.iter().filter(|a| a.starts_with("--")) {
        if let Some(i) = args.iter().position(|a| a == key) {
            args.drain(i..i + 2);
        }
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The whitespace-separated words of `flags` (e.g. `"--steps 20 --lr 0.1"`), as `extra` arguments.
pub fn words(flags: &str) -> Vec<&str> {
    flags.split_whitespace().collect()
}

/// Central differences of `f` at `at` for the coordinates `idx` (all when `None`), step `h`.
pub fn central_diff(mut f: impl FnMut(&[f64]) -> f64, at: &[f64], h: f64, idx: Option<&[usize]>) -> Vec<f64> {
    let all: Vec<usize> = (0..at.len()).collect();
    let idx = idx.unwrap_or(&all);
    let mut p = at.to_vec();
    idx.iter()
        .map(|&i| {
            p[i] = at[i] + h;
            let up = f(&p);
            p[i] = at[i] - h;
            let down = f(&p);
            p[i] = at[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// The arguments as `&str`s, for [`bnlab`], [`bnlab_ok`] and [`expect_error`].
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `bnlab accelerate` arguments for a run of seconds on [`synthetic_data`] (30 steps, evaluations
/// every 10, channels 2,4, hidden 8, batch 20, quiet), then `extra`; a flag given in `extra`
/// replaces its default (clap rejects a flag given twice).
pub fn accelerate_tiny_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let defaults = [
        "accelerate",
        "--steps",
        "30",
        "--eval-every",
        "10",
        "--channels",
        "2,4",
        "--hidden",
        "8",
        "--batch",
        "20",
    ];
    with_defaults(&defaults, data, out, extra)
}

/// `bnlab <experiment> --quick --threads 2` on Fashion-MNIST into a new scratch folder's `out`:
/// the folder (removed when dropped), `out` and the run's stdout; `None` (after the note of
/// [`fashion_mnist`]) when the data set is absent.
pub fn quick_study(experiment: &str) -> Option<(tempfile::TempDir, PathBuf, String)> {
    let data = fashion_mnist()?;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args = [
        experiment,
        "--quick",
        "--threads",
        "2",
        "--data",
        data,
        "--out",
        s(&out),
        "--quiet",
    ];
    let (stdout, _) = bnlab_ok(tmp.path(), &args);
    Some((tmp, out, stdout))
}

/// `bnlab padded` arguments for a run of seconds on [`synthetic_data`] (8×8 images: sequences of 8
/// steps; 30 steps, evaluations every 10, channels 4,4, batch 20, training lengths 3-8, test
/// lengths 8 and 1-3, quiet), then `extra`; a flag given in `extra` replaces its default.
pub fn padded_tiny_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let defaults = [
        "padded",
        "--steps",
        "30",
        "--eval-every",
        "10",
        "--channels",
        "4,4",
        "--batch",
        "20",
        "--train-lengths",
        "3-8",
        "--test-lengths",
        "8,1-3",
    ];
    with_defaults(&defaults, data, out, extra)
}

/// `bnlab small-batch` arguments for a run of seconds on [`synthetic_data`] (reference batch 16:
/// 6 reference steps, evaluations every 3, channels 2,4, hidden 8, 2 population batches, quiet),
/// then `extra`; a flag given in `extra` replaces its default.
pub fn small_batch_tiny_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let defaults = [
        "small-batch",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--channels",
        "2,4",
        "--hidden",
        "8",
        "--batch",
        "16",
        "--population-batches",
        "2",
    ];
    with_defaults(&defaults, data, out, extra)
}

/// Asserts the tracking criterion of data-parallel runs (issue 8) between two lists of
/// evaluations `(step, test accuracy, training loss)`: the same steps, accuracy within 0.2
/// points, loss within 1e-3 relative.
#[track_caller]
pub fn assert_tracks(what: &str, got: &[(u64, f64, f64)], want: &[(u64, f64, f64)]) {
    assert_eq!(got.len(), want.len(), "{what}: evaluations");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0, w.0, "{what}: evaluation steps");
        assert!(
            (g.1 - w.1).abs() <= 0.002,
            "{what}: step {}: test accuracy {} vs one process {}",
            g.0,
            g.1,
            w.1
        );
        assert!(
            (g.2 - w.2).abs() <= 1e-3 * w.2.abs(),
            "{what}: step {}: training loss {} vs one process {}",
            g.0,
            g.2,
            w.2
        );
    }
}

/// `out/checkpoints/<variant>.safetensors`.
pub fn ckpt(out: &Path, variant: &str) -> PathBuf {
    out.join("checkpoints").join(format!("{variant}.safetensors"))
}

/// Every tensor of two checkpoints equal, except the wall-clock progress values.
pub fn same_state(a: &bnlab::engine::checkpoint::Checkpoint, b: &bnlab::engine::checkpoint::Checkpoint) {
    let names: Vec<&str> = a.tensor_names().collect();
    assert_eq!(names, b.tensor_names().collect::<Vec<_>>());
    for name in names {
        if name.ends_with("seconds") {
            continue;
        }
        assert_eq!(a.tensor(name), b.tensor(name), "tensor {name} differs");
    }
    assert_eq!(a.progress.step, b.progress.step);
}

/// Starts `bnlab args` in `cwd` and kills it with SIGKILL 20 ms after `file` appears (at most
/// 300 s); asserts that it was still running and died of the signal.
pub fn run_and_kill_when(cwd: &Path, args: &[String], file: &Path) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !file.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "no {} after 300 s", file.display());
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the run was not killed mid-way: {status}");
}

/// The schedule of the kill-and-resume scenarios ([`assert_killed_and_resumed_run_matches`]):
/// 6,000 steps, evaluations every 250, checkpoints every 500.
pub const KILL_AND_RESUME_SCHEDULE: [&str; 6] = ["--steps", "6000", "--eval-every", "250", "--checkpoint-every", "500"];

/// The kill-and-resume scenario of `bnlab <experiment>` (`paper-mlp`, `accelerate`) with two
/// variants of `steps` steps, where `args(out)` runs the whole thing into `out` in `cwd`: an
/// uninterrupted run; a run killed with SIGKILL once `variants[1]` has a checkpoint (trained
/// `one_after_another`, the first has finished by then; side by side, both are mid-way) and resumed
/// without `--threads` (the run's own thread count is used). Asserts the resumed run equals the
/// uninterrupted one bit for bit: metrics, the files `same_files`, every checkpoint tensor but the
/// timings, and the `summary_keys` of each variant in `summary.json`; that a variant finished
/// before the kill was not retrained; and that resuming the finished run changes nothing.
pub fn assert_killed_and_resumed_run_matches(
    cwd: &Path,
    experiment: &str,
    variants: [&str; 2],
    steps: u64,
    args: impl Fn(&Path) -> Vec<String>,
    one_after_another: bool,
    same_files: &[&str],
    summary_keys: &[&str],
) {
    use bnlab::engine::checkpoint::Checkpoint;
    let (full, killed) = (cwd.join("full"), cwd.join("killed"));
    bnlab_ok(cwd, &args(&full).iter().map(String::as_str).collect::<Vec<_>>());

    run_and_kill_when(cwd, &args(&killed), &ckpt(&killed, variants[1]));
    let at_kill = Checkpoint::read(&ckpt(&killed, variants[1])).unwrap();
    assert!(
        at_kill.progress.step < steps,
        "{} had finished when killed",
        variants[1]
    );
    // Trained one after another, the first variant had finished; side by side (paper-mlp with
    // two threads), it may have a checkpoint from before its end, or none yet.
    let first_before = std::fs::read(ckpt(&killed, variants[0])).ok();
    let first_finished = first_before
        .as_ref()
        .is_some_and(|_| Checkpoint::read(&ckpt(&killed, variants[0])).unwrap().progress.step == steps);
    assert!(!killed.join("summary.json").exists());
    assert_eq!(
        first_finished, one_after_another,
        "{} finished when killed (trained one after another: {one_after_another})",
        variants[0]
    );

    bnlab_ok(cwd, &[experiment, "--resume", s(&killed), "--quiet"]);
    for file in std::iter::once("metrics.jsonl").chain(same_files.iter().copied()) {
        assert_eq!(
            read(&full.join(file)),
            read(&killed.join(file)),
            "{file} of the resumed run differs from the uninterrupted one"
        );
    }
    if first_finished {
        assert_eq!(
            std::fs::read(ckpt(&killed, variants[0])).ok(),
            first_before,
            "the finished variant was retrained"
        );
    }
    for v in variants {
        same_state(
            &Checkpoint::read(&ckpt(&full, v)).unwrap(),
            &Checkpoint::read(&ckpt(&killed, v)).unwrap(),
        );
    }
    let summary = |out: &Path| -> Value { serde_json::from_str(&read(&out.join("summary.json"))).unwrap() };
    for v in variants {
        for key in summary_keys {
            assert_eq!(
                summary(&full)["variants"][v][key],
                summary(&killed)["variants"][v][key],
                "{v} {key}"
            );
        }
    }
    assert!(killed.join("report.html").is_file());

    // Resuming a finished run retrains nothing and changes no metric.
    bnlab_ok(cwd, &[experiment, "--resume", s(&killed), "--quiet"]);
    assert_eq!(read(&full.join("metrics.jsonl")), read(&killed.join("metrics.jsonl")));
}

/// The kill-and-resume scenario ([`assert_killed_and_resumed_run_matches`]) of a study
/// (`accelerate`, `small-batch`, `padded`) on the synthetic data, in a scratch folder: `variants`
/// trained one after another on one thread for 6,000 steps each, where `schedule` is
/// [`KILL_AND_RESUME_SCHEDULE`] in the study's counting and `args(data, out, extra)` the study's
/// arguments. Besides the metrics and checkpoints, `table.md`, `table.json` and each variant's
/// final and best accuracy and steps must match.
pub fn assert_killed_and_resumed_study_matches(
    experiment: &str,
    variants: [&str; 2],
    schedule: &[&str],
    args: impl Fn(&Path, &Path, &[&str]) -> Vec<String>,
) {
    let (tmp, data, _) = scratch_with_synthetic_data();
    let names = variants.join(",");
    let extra = [schedule, &["--variants", &names, "--threads", "1"]].concat();
    assert_killed_and_resumed_run_matches(
        tmp.path(),
        experiment,
        variants,
        6000,
        |out| args(&data, out, &extra),
        true,
        &["table.md", "table.json"],
        &["final_test_acc", "best_test_acc", "steps"],
    );
}

/// `bnlab eval` of the checkpoint `file` of `variant`, plain and with `--fold`: the plain accuracy
/// on the 200 test examples is `want_acc` exactly; folded, `bn_layers` BN layers are folded and at
/// most one prediction differs. Returns the plain output and its count of correct predictions.
pub fn assert_eval_and_fold(
    cwd: &Path,
    file: &Path,
    variant: &str,
    want_acc: f64,
    bn_layers: usize,
) -> (String, usize) {
    let (plain, _) = bnlab_ok(cwd, &["eval", "--checkpoint", s(file)]);
    let (correct, total) = eval_counts(&plain);
    assert_eq!(total, 200);
    assert_eq!(correct as f64 / total as f64, want_acc, "{variant}: {plain}");
    // Folding rounds W' = diag(s)·W and b' to f32 once: logits move by a few ulps, which can
    // flip a prediction only on a near tie. Allow 1 of the 200 test examples.
    let (folded, _) = bnlab_ok(cwd, &["eval", "--checkpoint", s(file), "--fold"]);
    assert!(
        eval_counts(&folded).0.abs_diff(correct) <= 1,
        "{variant}: {plain} vs {folded}"
    );
    assert!(folded.contains(&format!("{bn_layers} BN layer(s) folded")), "{folded}");
    (plain, correct)
}

/// The test accuracy line of `bnlab eval`: (correct, total).
pub fn eval_counts(stdout: &str) -> (usize, usize) {
    let inner = stdout
        .split('(')
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no (N of M) in {stdout:?}"));
    let nums: Vec<usize> = inner.split(" of ").map(|n| n.trim().parse().unwrap()).collect();
    (nums[0], nums[1])
}

// ---------------------------------------------------------------------------------------------
// Seeded random inputs.

pub fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values from N(mean, std²).
pub fn normal(r: &mut rand_chacha::ChaCha8Rng, n: usize, mean: f32, std: f32) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|_| mean + std * r.sample::<f32, _>(rand_distr::StandardNormal))
        .collect()
}

/// The paper's network on 16 inputs trained a few steps, and re-encoded checkpoint files: what the
/// checkpoint tests (`library::checkpoint`, `library::hardening`) save, damage and read back.
pub mod checkpoints {
    use std::collections::{BTreeMap, HashMap};

    use bnlab::engine::checkpoint::{checksum, CheckpointProgress, CHECKSUM_KEY};
    use bnlab::engine::{Mode, Sequential, Sgd, SoftmaxCrossEntropy};
    use bnlab::experiments::paper_mlp::{build, Variant};
    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};

    pub const FEATURES: usize = 16;
    pub const CLASSES: usize = 4;
    pub const BATCH: usize = 8;
    /// The step recorded by [`progress`].
    pub const STEPS: u64 = 3;

    /// The paper network of `variant` on 16 inputs after `steps` SGD steps with momentum, so every
    /// parameter, running statistic and momentum buffer holds a non-trivial value.
    pub fn trained(variant: Variant, steps: usize) -> (Sequential, Sgd) {
        let (mut net, _) = build(
            variant,
            FEATURES,
            CLASSES,
            0.1,
            7,
            batchnorm::BatchNormConfig::default(),
        )
        .unwrap();
        let mut sgd = Sgd::new(0.9, 1e-4);
        for step in 0..steps {
            let x: Vec<f32> = (0..BATCH * FEATURES)
                .map(|i| ((i * 31 + step * 7) % 17) as f32 / 17.0)
                .collect();
            let y: Vec<u8> = (0..BATCH).map(|i| ((i + step) % CLASSES) as u8).collect();
            sgd_step(&mut net, &mut sgd, &x, &y, CLASSES);
        }
        (net, sgd)
    }

    /// One SGD step (learning rate 0.1) of softmax cross-entropy on the batch `x` with `labels`.
    pub fn sgd_step(net: &mut Sequential, sgd: &mut Sgd, x: &[f32], labels: &[u8], classes: usize) {
        let mut loss = SoftmaxCrossEntropy::default();
        let mut dlogits = vec![0.0; labels.len() * classes];
        let logits = net.forward(x, labels.len(), Mode::Train).unwrap();
        loss.forward(logits, labels, classes).unwrap();
        loss.backward(labels, classes, &mut dlogits);
        net.backward(&dlogits).unwrap();
        sgd.step(net.params(), 0.1);
    }

    pub fn progress() -> CheckpointProgress {
        CheckpointProgress {
            step: STEPS,
            seed: 7,
            values: [("loss_sum".to_string(), 1.25), ("best".to_string(), 0.5)].into(),
        }
    }

    /// Tensors by name: element type, shape, bytes.
    pub type Tensors = HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

    /// The file re-encoded after `edit` changes its tensors, with every checksum recomputed (a
    /// consistent file whose values are wrong, as a careful editor would make it, so the edit
    /// reaches the checks after the checksum's); the rest of the metadata is kept unless `meta`
    /// changes it.
    pub fn rewrite(
        bytes: &[u8],
        edit: impl FnOnce(&mut Tensors),
        meta: impl FnOnce(&mut HashMap<String, String>),
    ) -> Vec<u8> {
        let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
        let mut metadata = header.metadata().clone().unwrap();
        meta(&mut metadata);
        let st = SafeTensors::deserialize(bytes).unwrap();
        let mut tensors: Tensors = st
            .iter()
            .map(|(n, v)| (n.to_string(), (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect();
        edit(&mut tensors);
        let sums: BTreeMap<&str, String> = tensors
            .iter()
            .map(|(n, (_, _, b))| (n.as_str(), format!("{:08x}", checksum(b))))
            .collect();
        metadata.insert(CHECKSUM_KEY.into(), serde_json::to_string(&sums).unwrap());
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, Some(metadata)).unwrap()
    }

    /// [`rewrite`] with the metadata kept.
    pub fn edit_tensors(bytes: &[u8], edit: impl FnOnce(&mut Tensors)) -> Vec<u8> {
        rewrite(bytes, edit, |_| {})
    }
}
