//! Checkpoints in the library: exact round trip of a trained network and its optimizer, and every
//! kind of damaged or foreign file rejected with its typed error (never a panic, never a partial
//! restore). Property tests feed arbitrary and mutated bytes to the loader.

use crate::common::checkpoints::{edit_tensors, progress, rewrite, trained, BATCH, CLASSES, FEATURES};
use batchnorm::BatchNormConfig;
use bnlab::engine::checkpoint::{architecture, Checkpoint, CheckpointError};
use bnlab::engine::{Dropout, Layer, Linear, Mode, Sequential, Sgd, SoftmaxCrossEntropy};
use bnlab::experiments::paper_mlp::{build, Variant};
use proptest::prelude::*;
use rand::SeedableRng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn capture(net: &mut Sequential, sgd: &Sgd) -> Checkpoint {
    let settings = serde_json::json!({"lr": 0.1, "steps": 3});
    Checkpoint::capture(net, sgd, &progress(), "test", "bn", settings).unwrap()
}

fn bn_bytes() -> Vec<u8> {
    let (mut net, sgd) = trained(Variant::Bn, 3);
    capture(&mut net, &sgd).to_bytes().unwrap()
}

/// [`bn_bytes`] with the metadata entry `key` set to `value` (checksums recomputed).
fn bn_bytes_with_metadata(key: &str, value: &str) -> Vec<u8> {
    rewrite(
        &bn_bytes(),
        |_| {},
        |m| {
            m.insert(key.into(), value.into());
        },
    )
}

/// Parses, then restores into a fresh BN network: the error of whichever step fails.
fn load_into_fresh(bytes: &[u8]) -> Result<(), CheckpointError> {
    let ck = Checkpoint::from_bytes(bytes)?;
    let (mut net, _) = build(Variant::Bn, FEATURES, CLASSES, 0.1, 99, BatchNormConfig::default()).unwrap();
    ck.restore(&mut net, &mut Sgd::new(0.9, 1e-4))
}

const WEIGHT: &str = "layers.0.linear.weight";

#[test]
fn round_trip_restores_everything_exactly() {
    let (mut net, sgd) = trained(Variant::Bn, 3);
    let ck = capture(&mut net, &sgd);
    let bytes = ck.to_bytes().unwrap();
    let back = Checkpoint::from_bytes(&bytes).unwrap();
    assert_eq!(back, ck, "parsing the written bytes gives the captured checkpoint");
    assert_eq!(back.progress, progress());
    assert_eq!(back.settings["lr"], 0.1);

    let (mut fresh, _) = build(Variant::Bn, FEATURES, CLASSES, 0.1, 99, BatchNormConfig::default()).unwrap();
    let mut fresh_sgd = Sgd::new(0.9, 1e-4);
    back.restore(&mut fresh, &mut fresh_sgd).unwrap();
    assert_eq!(fresh_sgd.velocity, sgd.velocity);
    assert_eq!(
        capture(&mut fresh, &fresh_sgd),
        ck,
        "the restored network captures identically"
    );

    // Names are stable: parameters, BN state and momentum buffers by layer index and kind.
    let names: Vec<&str> = ck.tensor_names().collect();
    for name in [
        WEIGHT,
        "layers.1.batchnorm.gamma",
        "layers.1.batchnorm.running_mean",
        "layers.1.batchnorm.population_mean",
        "layers.1.batchnorm.num_batches_tracked",
        "optimizer.velocity.layers.0.linear.weight",
        "progress.step",
        "progress.values.loss_sum",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let (_, dtype, shape) = ck.tensor("layers.1.batchnorm.population_mean").unwrap();
    assert_eq!((dtype.as_str(), shape), ("F64", &[100usize][..]));
}

/// Training on after a restore gives the same bits as training on without one.
#[test]
fn training_continues_identically_after_restore() {
    let (mut a, mut sa) = trained(Variant::Bn, 2);
    let ck = capture(&mut a, &sa);
    let (mut b, _) = build(Variant::Bn, FEATURES, CLASSES, 0.1, 5, BatchNormConfig::default()).unwrap();
    let mut sb = Sgd::new(0.9, 1e-4);
    Checkpoint::from_bytes(&ck.to_bytes().unwrap())
        .unwrap()
        .restore(&mut b, &mut sb)
        .unwrap();
    let x: Vec<f32> = (0..BATCH * FEATURES).map(|i| (i % 5) as f32 * 0.2).collect();
    let y: Vec<u8> = (0..BATCH).map(|i| (i % CLASSES) as u8).collect();
    for (net, sgd) in [(&mut a, &mut sa), (&mut b, &mut sb)] {
        let mut loss = SoftmaxCrossEntropy::default();
        let mut d = vec![0.0; BATCH * CLASSES];
        let logits = net.forward(&x, BATCH, Mode::Train).unwrap();
        loss.forward(logits, &y, CLASSES).unwrap();
        loss.backward(&y, CLASSES, &mut d);
        net.backward(&d).unwrap();
        sgd.step(net.params(), 0.1);
    }
    assert_eq!(capture(&mut a, &sa), capture(&mut b, &sb));
}

/// Dropout's generator position travels with the checkpoint, so resumed masks continue the stream.
#[test]
fn dropout_generator_position_is_restored() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let make = |rng: &mut rand_chacha::ChaCha8Rng| {
        let layers: Vec<Box<dyn Layer>> = vec![
            Box::new(Linear::new(4, 4, true, 0.1, rng)),
            Box::new(Dropout::new(4, 0.5, 3).unwrap()),
        ];
        Sequential::new(layers).unwrap()
    };
    let mut a = make(&mut rng);
    let x = vec![1.0f32; 8];
    a.forward(&x, 2, Mode::Train).unwrap();
    let ck = Checkpoint::capture(
        &mut a,
        &Sgd::new(0.0, 0.0),
        &progress(),
        "t",
        "v",
        serde_json::Value::Null,
    )
    .unwrap();
    let next_a = a.forward(&x, 2, Mode::Train).unwrap().to_vec();
    let mut b = make(&mut rng);
    ck.restore(&mut b, &mut Sgd::new(0.0, 0.0)).unwrap();
    assert_eq!(b.forward(&x, 2, Mode::Train).unwrap(), next_a.as_slice());
}

#[test]
fn saving_refuses_a_nan_state() {
    let (mut net, sgd) = trained(Variant::Baseline, 1);
    net.params()[0].value[5] = f32::NAN;
    let err = Checkpoint::capture(&mut net, &sgd, &progress(), "t", "v", serde_json::Value::Null).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::NonFinite { name } if name == WEIGHT),
        "{err}"
    );
}

#[test]
fn save_is_atomic_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let (mut net, sgd) = trained(Variant::Bn, 1);
    let ck = capture(&mut net, &sgd);
    ck.save(&path).unwrap();
    ck.save(&path).unwrap();
    assert_eq!(Checkpoint::read(&path).unwrap(), ck);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file is left behind");

    let under_file = path.join("x.safetensors");
    assert!(matches!(ck.save(&under_file), Err(CheckpointError::Write { .. })));
    assert!(matches!(
        Checkpoint::read(&dir.path().join("absent")),
        Err(CheckpointError::Read { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Hostile files

#[test]
fn truncated_file_is_rejected() {
    let bytes = bn_bytes();
    for len in [0, 5, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        let err = Checkpoint::from_bytes(&bytes[..len]).unwrap_err();
        assert!(matches!(err, CheckpointError::NotSafetensors(_)), "{len}: {err}");
        assert!(err.to_string().contains("truncated or corrupt"), "{err}");
    }
}

#[test]
fn not_a_safetensors_file_is_rejected() {
    for junk in [
        &b"hello, world"[..],
        &[0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1][..],
        &[0xff; 64][..],
    ] {
        let err = Checkpoint::from_bytes(junk).unwrap_err();
        assert!(matches!(err, CheckpointError::NotSafetensors(_)), "{err}");
    }
}

#[test]
fn oversized_header_is_rejected() {
    let mut bytes = bn_bytes();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        Checkpoint::from_bytes(&bytes),
        Err(CheckpointError::NotSafetensors(_))
    ));
}

#[test]
fn safetensors_without_bnlab_metadata_is_rejected() {
    let data = [0u8; 8];
    let view = TensorView::new(Dtype::F32, vec![2], &data).unwrap();
    let plain = safetensors::serialize([("w", view)], None).unwrap();
    assert!(matches!(
        Checkpoint::from_bytes(&plain),
        Err(CheckpointError::NotACheckpoint(_))
    ));
    let other = bn_bytes_with_metadata("format", "pytorch");
    let err = Checkpoint::from_bytes(&other).unwrap_err();
    assert!(matches!(err, CheckpointError::NotACheckpoint(_)), "{err}");
}

#[test]
fn other_format_version_is_rejected() {
    // Version 1 (before checksums) and a future version.
    for version in ["1", "3"] {
        let bytes = bn_bytes_with_metadata("format_version", version);
        let err = Checkpoint::from_bytes(&bytes).unwrap_err();
        assert!(matches!(err, CheckpointError::UnsupportedVersion { .. }), "{err}");
        assert!(err.to_string().contains("rerun"), "{err}");
    }
}

#[test]
fn settings_that_are_not_json_are_rejected() {
    let bytes = bn_bytes_with_metadata("settings", "{lr:");
    let err = Checkpoint::from_bytes(&bytes).unwrap_err();
    assert!(
        matches!(err, CheckpointError::BadMetadata { key: "settings", .. }),
        "{err}"
    );
}

#[test]
fn wrong_tensor_shape_is_rejected_before_anything_changes() {
    let bytes = edit_tensors(&bn_bytes(), |t| {
        let w = t.get_mut(WEIGHT).unwrap();
        w.1 = vec![100, FEATURES]; // same bytes, 2-D
    });
    let ck = Checkpoint::from_bytes(&bytes).unwrap();
    let (mut net, _) = build(Variant::Bn, FEATURES, CLASSES, 0.1, 99, BatchNormConfig::default()).unwrap();
    let before = architecture(&mut net);
    let w0 = net.params()[0].value.to_vec();
    let err = ck.restore(&mut net, &mut Sgd::new(0.9, 1e-4)).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::WrongShape { name, .. } if name == WEIGHT),
        "{err}"
    );
    assert_eq!(
        net.params()[0].value,
        w0.as_slice(),
        "a failed restore changed the weights"
    );
    assert_eq!(architecture(&mut net), before);
}

#[test]
fn wrong_dtype_is_rejected() {
    let bytes = edit_tensors(&bn_bytes(), |t| {
        let w = t.get_mut(WEIGHT).unwrap();
        let as_f64: Vec<u8> =
            w.2.chunks_exact(4)
                .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) as f64).to_le_bytes())
                .collect();
        *w = (Dtype::F64, w.1.clone(), as_f64);
    });
    let err = load_into_fresh(&bytes).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::WrongDtype { name, .. } if name == WEIGHT),
        "{err}"
    );
    let bytes = edit_tensors(&bn_bytes(), |t| {
        let w = t.get_mut(WEIGHT).unwrap();
        w.0 = Dtype::I32;
    });
    let err = Checkpoint::from_bytes(&bytes).unwrap_err();
    assert!(matches!(err, CheckpointError::WrongDtype { .. }), "{err}");
}

#[test]
fn missing_tensor_is_rejected() {
    for name in [
        "layers.1.batchnorm.running_var",
        "optimizer.velocity.layers.0.linear.weight",
    ] {
        let bytes = edit_tensors(&bn_bytes(), |t| {
            t.remove(name).unwrap();
        });
        let err = load_into_fresh(&bytes).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::MissingTensor { name: n } if n == name),
            "{err}"
        );
    }
    let bytes = edit_tensors(&bn_bytes(), |t| {
        t.remove("progress.step").unwrap();
    });
    assert!(matches!(
        Checkpoint::from_bytes(&bytes),
        Err(CheckpointError::MissingTensor { .. })
    ));
}

#[test]
fn unexpected_tensor_is_rejected() {
    let bytes = edit_tensors(&bn_bytes(), |t| {
        t.insert("layers.99.linear.weight".into(), (Dtype::F32, vec![1], vec![0; 4]));
    });
    let err = load_into_fresh(&bytes).unwrap_err();
    assert!(matches!(err, CheckpointError::UnexpectedTensor { .. }), "{err}");
}

#[test]
fn non_finite_tensor_is_rejected() {
    let bytes = edit_tensors(&bn_bytes(), |t| {
        t.get_mut(WEIGHT).unwrap().2[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    let err = load_into_fresh(&bytes).unwrap_err();
    assert!(matches!(err, CheckpointError::NonFinite { .. }), "{err}");
}

#[test]
fn another_architecture_is_rejected() {
    // The baseline network (biases, no BN) into the BN network.
    let (mut base, sgd) = trained(Variant::Baseline, 1);
    let bytes = capture(&mut base, &sgd).to_bytes().unwrap();
    let err = load_into_fresh(&bytes).unwrap_err();
    assert!(matches!(err, CheckpointError::Architecture { .. }), "{err}");
    assert!(err.to_string().contains("another architecture"), "{err}");
    // The same network on other input sizes.
    let (mut wide, _) = build(Variant::Bn, FEATURES * 2, CLASSES, 0.1, 1, BatchNormConfig::default()).unwrap();
    let ck = Checkpoint::from_bytes(&bn_bytes()).unwrap();
    assert!(matches!(
        ck.restore(&mut wide, &mut Sgd::new(0.9, 0.0)),
        Err(CheckpointError::Architecture { .. })
    ));
}

#[test]
fn error_messages_are_one_line() {
    let bytes = bn_bytes();
    let errors = [
        Checkpoint::from_bytes(&bytes[..10]).unwrap_err(),
        load_into_fresh(&edit_tensors(&bytes, |t| {
            t.remove(WEIGHT);
        }))
        .unwrap_err(),
    ];
    for e in errors {
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// Any bytes: an error or a checkpoint, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = load_into_fresh(&bytes);
    }

    /// A valid header followed by arbitrary bytes, or a valid file with a few bytes changed or
    /// cut: an error or a successful restore, never a panic.
    #[test]
    fn mutated_checkpoints_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = BN_BYTES.with(|b| b.clone());
        // Edits land in the 8-byte length and the JSON header most of the time.
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (at, value) in &edits {
            let i = at.index(header_end + 64);
            bytes[i] = *value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let _ = load_into_fresh(&bytes);
    }
}

thread_local! {
    static BN_BYTES: Vec<u8> = bn_bytes();
}
