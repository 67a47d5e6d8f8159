//! Checkpoints of `bnlab accelerate` (the conv-net study), running the built binary on small
//! synthetic IDX data: a study killed with SIGKILL and resumed matches an uninterrupted one bit for
//! bit (metrics, checkpoints, table), including a variant with dropout, whose generator position is
//! part of the checkpoint; the invariant the data-parallel resume relies on to move a restored
//! dropout generator to another rank's position; `bnlab eval` of a conv-net checkpoint, with batch
//! norm folded into the convolutions and the linear layer; and folding against the unfolded
//! network in the engine.

use crate::common::{
    accelerate_tiny_args, assert_eval_and_fold, assert_killed_and_resumed_study_matches, bnlab_ok, ckpt, expect_error,
    paper_mlp_args, read, s, strs, synthetic_data, KILL_AND_RESUME_SCHEDULE,
};
use bnlab::engine::{Dropout, Layer, Mode};
use bnlab::experiments::accelerate::{self, Settings, Variant};
use std::path::Path;

/// A study of `baseline` (dropout, LRN, weight decay, momentum) then `bn-x5` on the synthetic
/// data: 6,000 steps each (about a second), checkpoints every 500.
fn study_args(data: &Path, out: &Path) -> Vec<String> {
    let extra = [
        KILL_AND_RESUME_SCHEDULE.as_slice(),
        &["--variants", "baseline,bn-x5", "--threads", "1"],
    ]
    .concat();
    accelerate_tiny_args(data, out, &extra)
}

/// Kill the study with SIGKILL while it trains its second variant (one thread: the variants train
/// one after another, so the first finished; the second has a checkpoint), resume it, and compare
/// with an uninterrupted study of the same settings. (`paper-mlp`'s test kills two variants
/// training side by side.)
#[test]
fn killed_and_resumed_study_matches_uninterrupted_study() {
    assert_killed_and_resumed_study_matches(
        "accelerate",
        ["baseline", "bn-x5"],
        &KILL_AND_RESUME_SCHEDULE,
        accelerate_tiny_args,
    );
}

/// What `--resume` refuses: a directory that is not a study, a checkpoint of another experiment
/// or of other settings, and training flags beside it.
#[test]
fn resume_rejects_foreign_runs_and_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let out = tmp.path().join("study");
    let short = |out: &Path, extra: &[&str]| {
        let mut a = study_args(&data, out);
        let i = a.iter().position(|x| x == "--steps").unwrap();
        a[i + 1] = "300".into();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let args = short(&out, &[]);
    bnlab_ok(tmp.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());

    expect_error(
        tmp.path(),
        &["accelerate", "--resume", s(&data)],
        &["is not an accelerate run to resume"],
    );
    expect_error(
        tmp.path(),
        &["accelerate", "--resume", s(&out), "--steps", "10"],
        &["cannot be used with"],
    );

    // A paper-mlp checkpoint in the study's place.
    let mlp = tmp.path().join("mlp");
    let mlp_args = paper_mlp_args(&data, &mlp, &["--variant", "bn", "--steps", "20"]);
    bnlab_ok(tmp.path(), &strs(&mlp_args));
    std::fs::copy(mlp.join("checkpoints/bn.safetensors"), ckpt(&out, "bn-x5")).unwrap();
    expect_error(
        tmp.path(),
        &["accelerate", "--resume", s(&out)],
        &["a checkpoint of paper-mlp/bn, expected accelerate/bn-x5"],
    );

    // A checkpoint of a study with other settings (another seed).
    let other = tmp.path().join("other");
    let args = short(&other, &["--seed", "9"]);
    bnlab_ok(tmp.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());
    std::fs::copy(ckpt(&other, "bn-x5"), ckpt(&out, "bn-x5")).unwrap();
    expect_error(
        tmp.path(),
        &["accelerate", "--resume", s(&out)],
        &["written by a run with other settings"],
    );
}

/// A data-parallel study resumes every rank from rank 0's checkpoint and moves each dropout
/// generator to the rank's own position by scaling with the shard size; that is exact because a
/// training forward draws exactly one generator word per example and feature.
#[test]
fn dropout_generator_position_is_proportional_to_examples_masked() {
    for (batch, size, steps) in [(20, 8, 3), (7, 33, 5), (1, 100, 2)] {
        let mut d = Dropout::new(size, 0.5, 11).unwrap();
        let x = vec![1.0f32; batch * size];
        let mut y = vec![0.0f32; batch * size];
        for _ in 0..steps {
            d.forward(&x, batch, &mut y, Mode::Train).unwrap();
            d.forward(&x, batch, &mut y, Mode::Eval).unwrap();
        }
        assert_eq!(d.rng_position(), (steps * batch * size) as u128);
    }
}

/// `bnlab eval` of a conv-net checkpoint gives the study's final accuracy; with the three BN layers
/// of `bn-x5` folded (two into convolutions, one into the linear layer), the same within float
/// rounding; `baseline` (dropout, LRN) has none to fold.
#[test]
fn eval_reproduces_the_final_accuracy_also_folded() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path());
    let out = tmp.path().join("study");
    let args = accelerate_tiny_args(&data, &out, &["--variants", "baseline,bn-x5", "--steps", "60"]);
    bnlab_ok(tmp.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());
    let summary: serde_json::Value = serde_json::from_str(&read(&out.join("summary.json"))).unwrap();
    for (variant, bn_layers) in [("baseline", 0), ("bn-x5", 3)] {
        let want = summary["variants"][variant]["final_test_acc"].as_f64().unwrap();
        let (plain, _) = assert_eval_and_fold(tmp.path(), &ckpt(&out, variant), variant, want, bn_layers);
        assert!(plain.starts_with(&format!("{variant} at step 60")), "{plain}");
    }
}

/// Folding in the engine: the folded `bn-x5` conv net (BN after both convolutions and after the
/// hidden linear layer) computes the unfolded network's inference output within f32 rounding, on
/// statistics from a few training batches; a BN layer after an activation cannot be folded.
#[test]
fn folded_conv_net_computes_the_unfolded_network() {
    let mut s = Settings::new(std::env::temp_dir());
    s.experiment.study.channels = [3, 5];
    s.experiment.hidden = 16;
    let (rows, cols, classes, batch) = (12, 12, 4, 16);
    let mut net = accelerate::build(&s, Variant::BnX5, rows, cols, classes).unwrap();
    let x: Vec<f32> = (0..batch * rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0 + 0.5)
        .collect();
    for _ in 0..5 {
        net.forward(&x, batch, Mode::Train).unwrap();
    }
    let want = net.forward(&x, batch, Mode::Eval).unwrap().to_vec();
    let mut folded = bnlab::engine::fold::fold_batchnorm(net).unwrap();
    assert!(folded.batchnorms().is_empty());
    let got = folded.forward(&x, batch, Mode::Eval).unwrap();
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-4 * scale,
            "folded {g} vs unfolded {w} (scale {scale})"
        );
    }

    // BN after an activation (here: the sigmoid variant's layer order is conv, BN, sigmoid; put a
    // BN right after a sigmoid by hand) is refused with a message naming the layer.
    let layers: Vec<Box<dyn Layer>> = vec![
        Box::new(bnlab::engine::Sigmoid { size: 4 }),
        Box::new(bnlab::engine::BatchNormLayer::new(4, 1, batchnorm::BatchNormConfig::default()).unwrap()),
    ];
    let net = bnlab::engine::Sequential::new(layers).unwrap();
    let e = bnlab::engine::fold::fold_batchnorm(net)
        .err()
        .expect("BN after a sigmoid was folded");
    assert!(e.to_string().contains("cannot fold batch norm layer 1"), "{e}");
}
