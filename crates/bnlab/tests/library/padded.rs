//! Units of `bnlab padded`: the length distributions and their draws, the padded sequences a
//! batch becomes, the settings' padding value in `settings.json`, and the mask the experiment sets
//! before each forward pass.

use bnlab::driver::{Experiment, Gathered, Pass};
use bnlab::experiments::padded::{
    pad_sequences, pad_value_text, parse_pad_value, sequence_length, Lengths, Settings, Split,
};
use bnlab::experiments::Padded;

fn lengths(s: &str) -> Lengths {
    s.parse().unwrap()
}

#[test]
fn lengths_parse_display_and_padding() {
    assert_eq!(lengths("8-28"), Lengths { min: 8, max: 28 });
    assert_eq!(lengths("28"), Lengths { min: 28, max: 28 });
    assert_eq!(
        (lengths("8-28").to_string(), lengths("5-5").to_string()),
        ("8-28".into(), "5".into())
    );
    // Uniform over 8..=28: mean length 18 of 28 steps.
    assert_eq!(lengths("8-28").padding(28), 1.0 - 18.0 / 28.0);
    assert_eq!(lengths("28").padding(28), 0.0);
    for bad in ["0", "0-4", "5-3", "", "-", "a", "3-b", "1-2-3", "-4"] {
        assert!(bad.parse::<Lengths>().is_err(), "`{bad}` was accepted");
    }
}

/// The draws: within the range, the same for the same (seed, split, example), independent of the
/// others (each value of a range of 4 about a quarter of the time; the splits and seeds differ).
#[test]
fn sequence_lengths_are_uniform_and_fixed_per_example() {
    let l = lengths("3-6");
    let draw = |seed, split, i| sequence_length(seed, split, i, l);
    let mut seen = [0usize; 4];
    for i in 0..4000 {
        let n = draw(7, Split::Train, i);
        assert!((3..=6).contains(&n));
        assert_eq!(n, draw(7, Split::Train, i));
        seen[n - 3] += 1;
    }
    // 1000 expected per value; a biased or constant draw falls outside this band.
    assert!(seen.iter().all(|&c| (850..1150).contains(&c)), "{seen:?}");
    let differ = |f: &dyn Fn(usize) -> bool| (0..200).filter(|&i| f(i)).count() > 100;
    assert!(differ(&|i| draw(7, Split::Train, i) != draw(7, Split::Test, i)));
    assert!(differ(&|i| draw(7, Split::Train, i) != draw(8, Split::Train, i)));
    assert!((0..100).all(|i| sequence_length(1, Split::Test, i, lengths("28")) == 28));
}

/// An image `[rows, cols]` becomes the sequence `[cols, rows]`: feature f of step t is pixel
/// (t, f) for t below the length, the padding value after.
#[test]
fn padded_sequences_are_feature_major_and_padded_after_the_length() {
    let (rows, cols) = (3, 2);
    // Two images; pixel (t, f) of image n is 100·n + 10·t + f.
    let mut x: Vec<f32> = (0..2)
        .flat_map(|n| (0..rows).flat_map(move |t| (0..cols).map(move |f| (100 * n + 10 * t + f) as f32)))
        .collect();
    pad_sequences(&mut x, (rows, cols), &[2, 3], -7.0);
    #[rustfmt::skip]
    let want = [
        0.0, 10.0, -7.0, /* f = 1 */ 1.0, 11.0, -7.0,
        100.0, 110.0, 120.0, /* f = 1 */ 101.0, 111.0, 121.0,
    ];
    assert_eq!(x, want);
}

/// The table and report write a padding value readably: decimals in [1e-4, 1e6), scientific
/// notation outside, and the non-finite values by name; each text parses back to the value.
#[test]
fn pad_values_are_written_readably() {
    for (v, text) in [
        (0.0f32, "0"),
        (-0.5, "-0.5"),
        (1234.5, "1234.5"),
        (1e30, "1e30"),
        (-1e30, "-1e30"),
        (1e-5, "1e-5"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "-inf"),
        (f32::NAN, "NaN"),
    ] {
        assert_eq!(pad_value_text(v), text);
        let back = parse_pad_value(text).unwrap();
        assert!(back == v || (v.is_nan() && back.is_nan()), "{text}");
    }
}

#[test]
fn pad_values_parse_and_survive_settings_json() {
    for (text, want) in [
        ("0", 0.0f32),
        ("-1", -1.0),
        ("1e30", 1e30),
        ("inf", f32::INFINITY),
        ("-inf", f32::NEG_INFINITY),
    ] {
        assert_eq!(parse_pad_value(text), Ok(want), "{text}");
    }
    assert!(parse_pad_value("nan").unwrap().is_nan() && parse_pad_value("NaN").unwrap().is_nan());
    assert!(parse_pad_value("zero").is_err() && parse_pad_value("").is_err());
    for pad in [0.0f32, -0.5, 1e30, f32::MAX, f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        let mut s = Settings::new("out".into());
        s.experiment.pad_value = pad;
        let text = serde_json::to_string(&s).unwrap();
        let back: Settings = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back.experiment.pad_value.to_bits(),
            pad.to_bits(),
            "{pad} through {text}"
        );
    }
}

/// `prepare_batch` pads the batch with the lengths of its pass (the training lengths for
/// training and the population statistics, each condition's for its test pass) and hands the
/// network the matching mask.
#[test]
fn prepare_batch_pads_with_the_pass_lengths() {
    use bnlab::data::Dataset;
    use bnlab::driver::Data;
    let (rows, cols) = (6, 4);
    let ds = |n: usize| Dataset {
        pixels: (0..n * rows * cols).map(|i| (i % 251) as u8).collect(),
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        len: n,
        rows,
        cols,
        classes: 10,
    };
    let data = Data {
        train: ds(40),
        test: ds(20),
        classes: 10,
    };
    let mut s = Settings::new("out".into());
    s.experiment.train_lengths = lengths("2-5");
    s.experiment.test_lengths = vec![lengths("6"), lengths("1")];
    s.experiment.pad_value = 1e30;
    let variant = bnlab::experiments::padded::Variant::NoBn;
    let mut net = Padded.build(&s, variant, &data, 0).unwrap().net;
    let indices = [3usize, 17, 8];
    for (pass, split, lens) in [
        (Pass::Train(4), &data.train, lengths("2-5")),
        (Pass::Population, &data.train, lengths("2-5")),
        (Pass::Test(1), &data.test, lengths("6")),
        (Pass::Test(2), &data.test, lengths("1")),
    ] {
        let which = if pass == Pass::Train(4) || pass == Pass::Population {
            Split::Train
        } else {
            Split::Test
        };
        let mut x = vec![0.0f32; indices.len() * rows * cols];
        bnlab::data::gather(split, &indices, &mut x, &mut vec![0; indices.len()]);
        let mut want = x.clone();
        let want_lens: Vec<usize> = indices
            .iter()
            .map(|&i| sequence_length(s.common.seed, which, i, lens))
            .collect();
        pad_sequences(&mut want, (rows, cols), &want_lens, 1e30);
        let batch = Gathered {
            pass,
            split,
            indices: &indices,
        };
        Padded.prepare_batch(&s, variant, batch, &mut x, &mut net).unwrap();
        assert_eq!(x, want, "{pass:?}");
        // The mask reached the layers: a forward pass with it runs, and one of another batch fails.
        net.forward(&x, indices.len(), bnlab::engine::Mode::Eval).unwrap();
        assert!(net
            .forward(&x[..2 * rows * cols], 2, bnlab::engine::Mode::Eval)
            .is_err());
    }
    let beyond = Gathered {
        pass: Pass::Test(3),
        split: &data.test,
        indices: &indices,
    };
    let err = Padded.prepare_batch(&s, variant, beyond, &mut [0.0; 72], &mut net);
    assert!(err.unwrap_err().to_string().contains("no test condition 3"));
}
