//! The lab's defences against hostile or damaged input outside the run driver (issue 20):
//! bounded checkpoint reads, per-tensor checksums and state invariants, byte-stable checkpoints,
//! clean-up of a killed writer's temporary files, the class count fixed by the experiment, empty
//! splits, error messages that name the real cause once and stay short, and `bench --min-time`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bnlab::atomic::{remove_stale_temp_files, temp_name, temp_name_pid, write_atomic};
use bnlab::bench::{min_time, BenchError, MAX_MIN_TIME_SECS};
use bnlab::data::{load, load_split, load_with_classes, DataError, Split};
use bnlab::engine::checkpoint::{Checkpoint, CheckpointError, CHECKSUM_KEY, MAX_HEADER_BYTES};
use bnlab::engine::{Sequential, Sgd};
use bnlab::experiments::paper_mlp::Variant;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::alloc_tracking::largest_allocation;
use crate::common::checkpoints::{self, progress, Tensors, STEPS};
use crate::common::idx;

// ---------------------------------------------------------------------------------------------
// The cost of a call.

/// Runs `f`; returns its result, the largest single allocation it made on this thread, and the
/// time it took.
fn measured<R>(f: impl FnOnce() -> R) -> (R, usize, Duration) {
    let start = Instant::now();
    let (r, largest) = largest_allocation(f);
    (r, largest, start.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Checkpoints of the paper's BN network.

/// The BN network after `STEPS` SGD steps with momentum, so every tensor holds a non-trivial value.
fn trained() -> (Sequential, Sgd) {
    checkpoints::trained(Variant::Bn, STEPS as usize)
}

fn capture_with(net: &mut Sequential, sgd: &Sgd, settings: serde_json::Value) -> Checkpoint {
    Checkpoint::capture(net, sgd, &progress(), "test", "bn", settings).unwrap()
}

fn bn_bytes() -> Vec<u8> {
    let (mut net, sgd) = trained();
    capture_with(&mut net, &sgd, serde_json::json!({"lr": 0.1}))
        .to_bytes()
        .unwrap()
}

/// The file re-encoded after `edit` changes its tensors, with every checksum recomputed (a
/// consistent file whose values are wrong, as a careful editor would make it).
fn resigned(bytes: &[u8], edit: impl FnOnce(&mut Tensors)) -> Vec<u8> {
    checkpoints::edit_tensors(bytes, edit)
}

/// An edit of a file's tensors.
type TensorEdit = Box<dyn Fn(&mut Tensors)>;
/// An edit of a file's checksum entries.
type ChecksumEdit = Box<dyn Fn(&mut BTreeMap<String, String>)>;

fn set_f32(t: &mut (Dtype, Vec<usize>, Vec<u8>), i: usize, v: f32) {
    t.2[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// 1. Bounded reads.

/// Reading the checkpoint `path` is refused as not safetensors with a message naming `needle`,
/// at once: no allocation of `max_bytes` or more, under 500 ms.
#[track_caller]
fn assert_not_safetensors_at_once(path: &Path, needle: &str, max_bytes: usize) {
    let (result, largest, took) = measured(|| Checkpoint::read(path));
    let err = result.unwrap_err();
    assert!(matches!(err, CheckpointError::NotSafetensors(_)), "{err}");
    assert!(err.to_string().contains(needle), "{err}");
    assert!(largest < max_bytes, "largest allocation {largest} bytes");
    assert!(took < Duration::from_millis(500), "took {took:?}");
}

/// A 4 GiB sparse file whose safetensors header length is 2^60: refused from its first 8 bytes,
/// at once and without a large allocation (today's reader read all 4 GiB first).
#[test]
fn huge_header_length_on_a_sparse_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.safetensors");
    let mut head = (1u64 << 60).to_le_bytes().to_vec();
    head.extend_from_slice(b"{\"__metadata__\":{}}");
    std::fs::write(&path, &head).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(1 << 32).unwrap(); // sparse: no disk blocks behind the zeros
    drop(file);
    assert_not_safetensors_at_once(&path, "header length", 1 << 20);
}

/// A header length within the cap but past the end of the file, and a valid header whose
/// tensor data ends before the (sparse, 4 GiB) file does: both refused before the data is read.
#[test]
fn lengths_are_checked_against_the_real_file_size() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.safetensors");
    let mut bytes = 4096u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b' '; 100]);
    std::fs::write(&short, &bytes).unwrap();
    let err = Checkpoint::read(&short).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");

    let tiny = dir.path().join("tiny.safetensors");
    std::fs::write(&tiny, [1, 2, 3, 4]).unwrap();
    let err = Checkpoint::read(&tiny).unwrap_err();
    assert!(matches!(err, CheckpointError::NotSafetensors(_)), "{err}");
    assert!(err.to_string().contains("truncated or corrupt"), "{err}");

    let over = dir.path().join("over.safetensors");
    std::fs::write(&over, MAX_HEADER_BYTES.saturating_add(1).to_le_bytes()).unwrap();
    let err = Checkpoint::read(&over).unwrap_err();
    assert!(err.to_string().contains("exceeds the limit"), "{err}");

    let padded = dir.path().join("padded.safetensors");
    let good = bn_bytes();
    std::fs::write(&padded, &good).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&padded)
        .unwrap()
        .set_len(1 << 32)
        .unwrap();
    assert_not_safetensors_at_once(&padded, "tensor data", 4 << 20);
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo failed");
}

/// Devices, a directory and a FIFO (with no writer: opening it must not block) are refused as
/// what they are, at once.
#[test]
fn non_regular_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    for (path, kind) in [
        (PathBuf::from("/dev/zero"), "a character device"),
        (PathBuf::from("/dev/urandom"), "a character device"),
        (dir.path().to_path_buf(), "a directory"),
        (fifo, "a FIFO"),
    ] {
        let (result, largest, took) = measured(|| Checkpoint::read(&path));
        let err = result.unwrap_err();
        assert!(
            matches!(&err, CheckpointError::NotARegularFile { kind: k, .. } if *k == kind),
            "{}: {err}",
            path.display()
        );
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        assert!(largest < 1 << 20, "{}: largest allocation {largest}", path.display());
        assert!(took < Duration::from_millis(500), "{}: took {took:?}", path.display());
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Checksums and invariants.

/// Flipping one byte of any tensor's data is caught by that tensor's CRC-32, named in the error.
#[test]
fn a_flipped_data_byte_is_refused_naming_the_tensor() {
    let good = bn_bytes();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let (_, meta) = SafeTensors::read_metadata(&good).unwrap();
    let st = SafeTensors::deserialize(&good).unwrap();
    let data_start = 8 + header_len;
    let mut tested = 0;
    for (name, info) in meta.tensors() {
        let (start, end) = info.data_offsets;
        assert_eq!(st.tensor(&name).unwrap().data().len(), end - start);
        for at in [start, (start + end) / 2, end - 1] {
            let mut bad = good.clone();
            bad[data_start + at] ^= 0x01;
            let err = Checkpoint::from_bytes(&bad).unwrap_err();
            assert!(
                matches!(&err, CheckpointError::Checksum { name: n, expected, found }
                    if *n == name && expected != found),
                "{name} byte {at}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&name) && msg.contains("corrupt"), "{msg}");
            tested += 1;
        }
    }
    assert!(tested > 30, "only {tested} flips tried");
}

/// A file without checksums for every tensor (or with one for a tensor it lacks) is refused.
#[test]
fn checksums_must_cover_exactly_the_tensors() {
    let good = bn_bytes();
    let (_, header) = SafeTensors::read_metadata(&good).unwrap();
    let st = SafeTensors::deserialize(&good).unwrap();
    let tensors: Vec<(String, TensorView<'_>)> = st.iter().map(|(n, v)| (n.to_string(), v)).collect();
    let sums: BTreeMap<String, String> =
        serde_json::from_str(&header.metadata().as_ref().unwrap()[CHECKSUM_KEY]).unwrap();
    let edits: [ChecksumEdit; 3] = [
        Box::new(|s| {
            s.remove("layers.0.linear.weight");
        }),
        Box::new(|s| {
            s.insert("layers.99.linear.weight".into(), "00000000".into());
        }),
        Box::new(|s| {
            s.insert("layers.0.linear.weight".into(), "xyz".into());
        }),
    ];
    for edit in edits {
        let mut edited = sums.clone();
        edit(&mut edited);
        let mut metadata = header.metadata().clone().unwrap();
        metadata.insert(CHECKSUM_KEY.into(), serde_json::to_string(&edited).unwrap());
        let bytes = safetensors::serialize(tensors.clone(), Some(metadata)).unwrap();
        let err = Checkpoint::from_bytes(&bytes).unwrap_err();
        assert!(
            matches!(err, CheckpointError::BadMetadata { key, .. } if key == CHECKSUM_KEY),
            "{err}"
        );
    }
    // No checksums at all.
    let mut metadata = header.metadata().clone().unwrap();
    metadata.remove(CHECKSUM_KEY);
    let bytes = safetensors::serialize(tensors, Some(metadata)).unwrap();
    assert!(matches!(
        Checkpoint::from_bytes(&bytes),
        Err(CheckpointError::BadMetadata { key: CHECKSUM_KEY, .. })
    ));
}

/// Finite but impossible values, written consistently (checksums recomputed), are refused on
/// load: a negative running or population variance (a variance is a mean of squares, ≥ 0), and
/// more batches tracked than steps taken (each step runs one training forward pass).
#[test]
fn impossible_state_is_refused() {
    let good = bn_bytes();
    let cases: [(&str, TensorEdit); 3] = [
        (
            "layers.1.batchnorm.running_var",
            Box::new(|t| set_f32(t.get_mut("layers.1.batchnorm.running_var").unwrap(), 0, -5.0)),
        ),
        (
            "layers.1.batchnorm.population_var",
            Box::new(|t| {
                let v = t.get_mut("layers.1.batchnorm.population_var").unwrap();
                v.2[8..16].copy_from_slice(&(-1e-3f64).to_le_bytes());
            }),
        ),
        (
            "layers.1.batchnorm.num_batches_tracked",
            Box::new(|t| {
                let v = t.get_mut("layers.1.batchnorm.num_batches_tracked").unwrap();
                v.2.copy_from_slice(&(STEPS + 1).to_le_bytes());
            }),
        ),
    ];
    for (name, edit) in cases {
        let bytes = resigned(&good, edit);
        let err = Checkpoint::from_bytes(&bytes).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::Invariant { name: n, .. } if n == name),
            "{name}: {err}"
        );
        assert_eq!(err.to_string().lines().count(), 1);
    }
    // progress.step edited down to 0 with trained batch norms (a restart with trained weights).
    let bytes = resigned(&good, |t| {
        t.get_mut("progress.step")
            .unwrap()
            .2
            .copy_from_slice(&0u64.to_le_bytes());
    });
    assert!(matches!(
        Checkpoint::from_bytes(&bytes),
        Err(CheckpointError::Invariant { .. })
    ));
    // A NaN in a state tensor is refused by the parser already, not only by `restore`.
    let bytes = resigned(&good, |t| {
        set_f32(t.get_mut("layers.1.batchnorm.running_mean").unwrap(), 3, f32::NAN)
    });
    assert!(matches!(
        Checkpoint::from_bytes(&bytes),
        Err(CheckpointError::NonFinite { .. })
    ));
    // The untouched file, re-signed the same way, still loads: the edits are what is refused.
    Checkpoint::from_bytes(&resigned(&good, |_| {})).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. Stable bytes.

/// Two captures of the same state and progress serialize to the same bytes, whatever order the
/// settings' keys were inserted in and however often the file is written; the metadata keys
/// appear in sorted order, and the file stays readable by the `safetensors` crate itself.
#[test]
fn identical_state_gives_identical_bytes() {
    let (mut net, sgd) = trained();
    let mut a = serde_json::Map::new();
    for (k, v) in [
        ("steps", 3.into()),
        ("lr", 0.1.into()),
        ("variants", serde_json::json!(["bn", "baseline"])),
    ] {
        a.insert(k.to_string(), v);
    }
    let mut b = serde_json::Map::new();
    for (k, v) in [
        ("variants", serde_json::json!(["bn", "baseline"])),
        ("lr", 0.1.into()),
        ("steps", 3.into()),
    ] {
        b.insert(k.to_string(), v);
    }
    let first = capture_with(&mut net, &sgd, serde_json::Value::Object(a))
        .to_bytes()
        .unwrap();
    for _ in 0..20 {
        let again = capture_with(&mut net, &sgd, serde_json::Value::Object(b.clone()))
            .to_bytes()
            .unwrap();
        assert!(first == again, "two captures of one state serialize differently");
    }
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpoint::from_bytes(&first).unwrap();
    ck.save(&dir.path().join("a.safetensors")).unwrap();
    ck.save(&dir.path().join("b.safetensors")).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("a.safetensors")).unwrap(),
        std::fs::read(dir.path().join("b.safetensors")).unwrap()
    );
    assert_eq!(std::fs::read(dir.path().join("a.safetensors")).unwrap(), first);

    let header_len = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&first[8..8 + header_len]).unwrap();
    let keys = [
        "architecture",
        "experiment",
        "format",
        "format_version",
        "optimizer",
        "settings",
        CHECKSUM_KEY,
        "variant",
    ];
    let at: Vec<usize> = keys
        .iter()
        .map(|k| {
            header
                .find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("{k} missing"))
        })
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "metadata keys out of order: {header}"
    );
    let settings = &ck.settings;
    assert_eq!(
        settings.to_string(),
        r#"{"lr":0.1,"steps":3,"variants":["bn","baseline"]}"#
    );
    let st = SafeTensors::deserialize(&first).unwrap();
    assert_eq!(st.len(), ck.tensor_names().count());
}

// ---------------------------------------------------------------------------------------------
// 4. Stale temporary files.

/// The id of a process that has exited (and been reaped).
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn stale_temp_files_of_dead_writers_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dead = dead_pid();
    let name = std::ffi::OsStr::new("bn.safetensors");
    assert_eq!(temp_name(name, 42), ".bn.safetensors.tmp-42");
    assert_eq!(temp_name_pid(&temp_name(name, 42)), Some(42));
    let stale = d.join(temp_name(name, dead));
    let stale_metrics = d.join(temp_name(std::ffi::OsStr::new("metrics.jsonl"), dead));
    let live = d.join(temp_name(name, std::process::id()));
    let keep = [
        d.join("bn.safetensors"),
        d.join(".hidden"),
        d.join(".x.tmp-12ab"),
        d.join("..tmp-5"),
        d.join("bn.safetensors.tmp-1"),
        live.clone(),
    ];
    for p in keep.iter().chain([&stale, &stale_metrics]) {
        std::fs::write(p, b"x").unwrap();
    }
    // A directory with a temporary file's name is not ours to remove.
    let dir_named_like_temp = d.join(temp_name(std::ffi::OsStr::new("sub"), dead));
    std::fs::create_dir(&dir_named_like_temp).unwrap();

    let mut want = vec![stale.clone(), stale_metrics.clone()];
    want.sort();
    assert_eq!(remove_stale_temp_files(d).unwrap(), want);
    assert!(!stale.exists() && !stale_metrics.exists());
    for p in &keep {
        assert!(p.exists(), "{} was removed", p.display());
    }
    assert!(dir_named_like_temp.is_dir());
    assert!(
        remove_stale_temp_files(d).unwrap().is_empty(),
        "a second call finds nothing"
    );
    // A completed write leaves no temporary file to find.
    write_atomic(&d.join("bn.safetensors"), b"y").unwrap();
    assert!(!live.exists() || std::fs::read(&live).unwrap() == b"x");
    assert!(remove_stale_temp_files(d).unwrap().is_empty());
    assert!(remove_stale_temp_files(&d.join("absent")).is_err());
}

// ---------------------------------------------------------------------------------------------
// 5. Data: the class count, empty splits, real causes, short lines.

/// Writes both splits: `n` 2×2 images each, with the given labels.
fn write_data(dir: &Path, train_labels: &[u8], test_labels: &[u8]) {
    for (split, labels) in [(Split::Train, train_labels), (Split::Test, test_labels)] {
        let n = labels.len() as u32;
        let pixels: Vec<u8> = (0..4 * n).map(|k| (k * 13 % 256) as u8).collect();
        std::fs::write(dir.join(split.images_file()), idx(&[n, 2, 2], &pixels)).unwrap();
        std::fs::write(dir.join(split.labels_file()), idx(&[n], labels)).unwrap();
    }
}

#[test]
fn labels_outside_the_fixed_class_count_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_data(dir.path(), &[0, 1, 9, 3], &[2, 200, 1]);
    // `load` widens to the largest label; the experiment's fixed count refuses label 200.
    assert_eq!(load(dir.path()).unwrap().0.classes, 201);
    let err = load_with_classes(dir.path(), 10).unwrap_err();
    let labels = dir.path().join(Split::Test.labels_file());
    match &err {
        DataError::LabelOutOfRange {
            path,
            index,
            label,
            classes,
        } => assert_eq!((path, *index, *label, *classes), (&labels, 1, 200, 10)),
        other => panic!("expected LabelOutOfRange, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("label 200") && msg.contains(&labels.display().to_string()),
        "{msg}"
    );
    // The first bad training label is reported first.
    let err = load_with_classes(dir.path(), 5).unwrap_err();
    assert!(
        matches!(err, DataError::LabelOutOfRange { index: 2, label: 9, .. }),
        "{err}"
    );
    // Within the count: both splits get exactly it, even when the data uses fewer classes.
    write_data(dir.path(), &[0, 1, 2, 3], &[2, 1, 0]);
    let (train, test) = load_with_classes(dir.path(), 10).unwrap();
    assert_eq!((train.classes, test.classes), (10, 10));
}

#[test]
fn an_empty_split_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for (train, test, empty) in [
        (&[0u8, 1][..], &[][..], Split::Test),
        (&[][..], &[1u8][..], Split::Train),
    ] {
        write_data(dir.path(), train, test);
        let want = dir.path().join(empty.images_file());
        for err in [
            load(dir.path()).unwrap_err(),
            load_with_classes(dir.path(), 10).unwrap_err(),
            load_split(dir.path(), empty).unwrap_err(),
        ] {
            match &err {
                DataError::Empty { path } => assert_eq!(path, &want),
                other => panic!("expected Empty, got {other:?}"),
            }
        }
    }
}

/// An IDX header of 255 dimensions gives one short line, not a list of 255 sizes.
#[test]
fn a_header_of_255_dimensions_gives_a_short_line() {
    let dims = vec![7u32; 255];
    let p = Path::new("dims");
    for err in [
        bnlab::data::parse_images(&idx(&dims, &[]), p).unwrap_err(),
        bnlab::data::parse_labels(&idx(&dims, &[]), p).unwrap_err(),
        bnlab::data::parse_images(&idx(&vec![u32::MAX; 255], &[]), p).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(matches!(err, DataError::BadDims { .. }), "{msg}");
        assert!(msg.len() < 200 && !msg.contains('\n'), "{} chars: {msg}", msg.len());
        assert!(msg.contains("255 sizes"), "{msg}");
    }
}

/// How many times `needle` occurs in the message `main` prints (`{:#}` of the error chain).
fn printed_count(err: DataError, needle: &str) -> (usize, String) {
    let printed = format!("{:#}", anyhow::Error::from(err));
    (printed.matches(needle).count(), printed)
}

/// A directory, a symbolic-link loop, a FIFO, a device and an unreadable file in a data file's
/// place are each reported as what they are, never as "file not found", and the OS error is said
/// once in the printed chain.
#[test]
fn data_file_problems_name_their_real_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_data(d, &[0, 1], &[1]);
    let images = d.join(Split::Train.images_file());
    let put = |make: &dyn Fn(&Path)| {
        std::fs::remove_file(&images).ok();
        std::fs::remove_dir(&images).ok();
        make(&images);
    };

    // A symbolic-link loop: the OS's ELOOP, said once.
    put(&|p| {
        std::os::unix::fs::symlink(p, p).unwrap();
    });
    let err = load(d).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
    let (count, printed) = printed_count(err, "os error");
    assert_eq!(count, 1, "{printed}");
    assert!(printed.contains("symbolic links"), "{printed}");
    assert!(!printed.contains("not found"), "{printed}");

    // A dangling symbolic link.
    put(&|p| std::os::unix::fs::symlink(d.join("nowhere"), p).unwrap());
    let err = load(d).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::NotAFile {
                kind: "a symbolic link to nothing",
                ..
            }
        ),
        "{err}"
    );

    // A FIFO with no writer (must not hang) and a device (must not be read forever).
    put(&|p| mkfifo(p));
    assert!(matches!(load(d), Err(DataError::NotAFile { kind: "a FIFO", .. })));
    put(&|p| std::os::unix::fs::symlink("/dev/zero", p).unwrap());
    let (result, largest, _) = measured(|| load(d));
    assert!(matches!(
        result,
        Err(DataError::NotAFile {
            kind: "a character device",
            ..
        })
    ));
    assert!(largest < 1 << 20, "largest allocation {largest}");

    // A symbolic-link loop as the data directory itself.
    let looped = d.join("loop");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let err = load(&looped).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
    assert!(err.to_string().contains("symbolic links"), "{err}");

    // An unreadable file: permission denied, said once (root reads anything, so only when not root).
    std::fs::remove_file(&images).unwrap();
    write_data(d, &[0, 1], &[1]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&images, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(&images).is_err() {
        let err = load(d).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err}");
        let (count, printed) = printed_count(err, "Permission denied");
        assert_eq!(count, 1, "{printed}");
    } else {
        println!("running as root: the permission case cannot be produced");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. bench --min-time.

#[test]
fn min_time_out_of_range_is_a_clean_error() {
    for secs in [1e20, f64::INFINITY, f64::NAN, -1.0, MAX_MIN_TIME_SECS * 1.0001] {
        let err = min_time(secs).unwrap_err();
        assert!(matches!(err, BenchError::MinTime { .. }), "{secs}: {err}");
        assert!(err.to_string().contains("--min-time"), "{err}");
    }
    assert_eq!(min_time(0.0).unwrap(), Duration::ZERO);
    assert_eq!(min_time(1.5).unwrap(), Duration::from_millis(1500));
    assert_eq!(min_time(MAX_MIN_TIME_SECS).unwrap(), Duration::from_secs(3600));
}
