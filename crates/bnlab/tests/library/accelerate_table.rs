//! The Figure 3 table of `bnlab accelerate`: steps each variant needed to reach the baseline's best
//! test accuracy, computed by `figure3_table` from evaluation lines.

use bnlab::driver::{TrainingStatus, Variant as _};
use bnlab::experiments::accelerate::{figure3_table, Metric, Recipe, Settings, Variant};

fn eval(variant: &'static str, step: u64, acc: f64) -> Metric {
    Metric {
        variant: variant.into(),
        step,
        test_acc: Some(acc),
        training: TrainingStatus::evaluated(0.5, 0.01),
    }
}

fn diverged(variant: &'static str, step: u64) -> Metric {
    Metric {
        variant: variant.into(),
        step,
        test_acc: None,
        training: TrainingStatus::diverged(0.3),
    }
}

#[test]
fn steps_to_reach_the_baselines_best() {
    // The baseline peaks at 0.85 first at step 300 (again at 500, lower at the end); lines of the
    // variants are interleaved.
    let metrics = vec![
        eval("baseline", 100, 0.70),
        eval("bn-x5", 100, 0.84),
        eval("baseline", 200, 0.80),
        eval("bn-x5", 200, 0.851),
        eval("baseline", 300, 0.85),
        eval("bn-x5", 300, 0.80),
        eval("baseline", 400, 0.84),
        eval("bn-x5", 400, 0.90),
        eval("baseline", 500, 0.85),
        eval("baseline", 600, 0.83),
        eval("bn-x30", 100, 0.60),
        diverged("bn-x30", 150),
        eval("baseline-sigmoid", 100, 0.10),
        eval("baseline-sigmoid", 200, 0.849_999),
        eval("bn-baseline", 100, 0.5),
        eval("bn-baseline", 600, 0.85),
    ];
    let names = ["baseline", "bn-x5", "bn-x30", "baseline-sigmoid", "bn-baseline"];
    let t = figure3_table(&names, &metrics);
    assert_eq!(t.baseline_best_acc, Some(0.85));
    assert_eq!(t.baseline_best_step, Some(300));
    let row = |v: &str| t.rows.iter().find(|r| r.variant == v).expect("row");
    assert_eq!(t.rows.len(), 5);
    assert_eq!(
        t.rows.iter().map(|r| r.variant.as_str()).collect::<Vec<_>>(),
        names,
        "rows keep the given order"
    );

    let b = row("baseline");
    assert_eq!(b.steps_to_baseline_best, Some(300));
    assert_eq!(b.speedup, Some(1.0));
    assert_eq!((b.best_test_acc, b.best_step), (Some(0.85), Some(300)));

    // The first evaluation at or above the target counts, not the best one.
    let x5 = row("bn-x5");
    assert_eq!(x5.steps_to_baseline_best, Some(200));
    assert_eq!(x5.speedup, Some(1.5));
    assert_eq!((x5.best_test_acc, x5.best_step), (Some(0.90), Some(400)));
    assert_eq!(x5.diverged_at, None);

    let x30 = row("bn-x30");
    assert_eq!(x30.steps_to_baseline_best, None);
    assert_eq!(x30.speedup, None);
    assert_eq!((x30.best_test_acc, x30.best_step), (Some(0.60), Some(100)));
    assert_eq!(x30.diverged_at, Some(150));

    // Just below the target is "never".
    let sig = row("baseline-sigmoid");
    assert_eq!(sig.steps_to_baseline_best, None);
    assert_eq!(sig.best_step, Some(200));

    // Equal to the target (at the last step) reaches it.
    let bnb = row("bn-baseline");
    assert_eq!(bnb.steps_to_baseline_best, Some(600));
    assert_eq!(bnb.speedup, Some(0.5));

    let md = t.markdown();
    assert!(md.contains("85.00% (step 300)"), "{md}");
    assert!(md.contains("| bn-x5 | 200 | 1.5× | 90.00% | 400 | – |"), "{md}");
    assert!(md.contains("| bn-x30 | never | – | 60.00% | 100 | 150 |"), "{md}");
    assert!(md.contains("| baseline-sigmoid | never |"), "{md}");
}

#[test]
fn without_a_baseline_there_is_no_target() {
    let metrics = vec![eval("bn-x5", 100, 0.8), eval("bn-x5", 200, 0.9)];
    let t = figure3_table(&["bn-x5"], &metrics);
    assert_eq!((t.baseline_best_acc, t.baseline_best_step), (None, None));
    assert_eq!(t.rows[0].steps_to_baseline_best, None);
    assert_eq!((t.rows[0].best_test_acc, t.rows[0].best_step), (Some(0.9), Some(200)));
    let md = t.markdown();
    assert!(md.contains("| bn-x5 | n/a |"), "{md}");
}

#[test]
fn a_baseline_that_diverged_before_any_evaluation_gives_no_target() {
    let metrics = vec![diverged("baseline", 3), eval("bn-x5", 100, 0.8)];
    let t = figure3_table(&["baseline", "bn-x5"], &metrics);
    assert_eq!(t.baseline_best_acc, None);
    assert_eq!(t.rows[0].diverged_at, Some(3));
    assert_eq!(t.rows[0].best_test_acc, None);
    assert_eq!(t.rows[1].steps_to_baseline_best, None);
}

#[test]
fn recipes_follow_section_4_2() {
    let s = Settings::new("unused".into());
    let base = Variant::Baseline.recipe();
    assert!(!base.bn && base.dropout && base.lrn && !base.sigmoid);
    let x5 = Variant::BnX5.recipe();
    assert!(x5.bn && !x5.dropout && !x5.lrn && !x5.sigmoid);
    assert_eq!(
        (x5.lr_factor, x5.weight_decay_divisor, x5.decay_speedup),
        (5.0, 5.0, 6.0)
    );
    assert_eq!(Variant::BnX30.recipe().lr_factor, 30.0);
    assert!(Variant::BnX5Sigmoid.recipe().sigmoid && Variant::BnX5Sigmoid.recipe().bn);
    assert!(Variant::BaselineSigmoid.recipe().sigmoid && !Variant::BaselineSigmoid.recipe().bn);
    assert_eq!(Variant::BnBaseline.recipe(), Recipe { bn: true, ..base });
    // After one baseline half-life bn-x5's rate has halved 6 times, from 5× the base rate.
    let h = s.experiment.study.half_life;
    assert!((s.lr_at(Variant::Baseline, h) - s.common.lr / 2.0).abs() < 1e-15);
    assert!((s.lr_at(Variant::BnX5, h) - 5.0 * s.common.lr / 64.0).abs() < 1e-15);
    for &v in Variant::ALL {
        assert_eq!(v.name().parse::<Variant>(), Ok(v));
    }
    assert!("bn-x7".parse::<Variant>().unwrap_err().contains("bn-x7"));
}
