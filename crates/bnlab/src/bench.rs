//! `bnlab bench`: times the batch-norm kernels on the shapes of BENCHMARKS.md, beside a plain
//! memory copy measured in the same run (the bandwidth ceiling), for plain batch norm and each
//! [`Variant`] in the same run.

use batchnorm::{
    BatchNorm, BatchNormConfig, BatchRenorm, BatchRenormConfig, Grads, Layout, RenormSaved, RenormSchedule, SavedStats,
    View,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use std::time::{Duration, Instant};

/// One benchmark case: a layout and the logical shape `[N, C, …]` (for NHWC: `[N, C, H, W]` too,
/// stored channels-last).
#[derive(Debug, Clone)]
pub struct Case {
    /// Storage layout.
    pub layout: Layout,
    /// Logical shape, channels second.
    pub shape: Vec<usize>,
}

/// The cases of the kernel issue, in order.
pub fn default_cases() -> Vec<Case> {
    let c = |layout, shape: &[usize]| Case {
        layout,
        shape: shape.to_vec(),
    };
    vec![
        c(Layout::NC, &[60, 100]),
        c(Layout::NC, &[256, 4096]),
        c(Layout::NCHW, &[32, 64, 56, 56]),
        c(Layout::NHWC, &[32, 64, 56, 56]),
        c(Layout::NCHW, &[64, 256, 14, 14]),
        c(Layout::NHWC, &[64, 256, 14, 14]),
        c(Layout::NCHW, &[128, 64, 56, 56]),
    ]
}

impl Case {
    /// `LAYOUT[N,C,…]`, e.g. `NHWC[64,256,14,14]` (the logical shape, channels second).
    pub fn name(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("{}[{}]", self.layout.name(), dims.join(","))
    }
}

/// A batch-norm variant `bnlab bench` times (`--variant`; its rows' `"variant"`).
///
/// Each is one entry here and one case of the private layer it times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// Plain batch norm: `fwd_train`, `fwd_eval` and `backward`.
    Bn,
    /// A frozen `BatchNorm` layer: `fwd_train` (normalizing with the running statistics) and
    /// `backward` (through them as constants).
    Frozen,
    /// `BatchRenorm` with [`RenormSchedule::paper`], past its warm-up and ramps (r_max = 3,
    /// d_max = 5): `fwd_train` (with the moving-statistics update) and `backward`.
    Renorm,
    /// Ghost batch norm: a `BatchNorm` layer with virtual batches of [`GHOST_EXAMPLES`] examples
    /// (NC: [`GHOST_EXAMPLES_NC`]): `fwd_train` and `backward`.
    Ghost,
    /// Masked batch norm (`BatchNorm::forward_train_masked`, `backward_masked`) with half of the
    /// positions valid as padded sequences leave them ([`MaskPattern::Padded`]): `fwd_train` and
    /// `backward`.
    Masked,
    /// Masked batch norm with a scattered mask, a random half of the positions valid
    /// ([`MaskPattern::Random`]): `fwd_train` and `backward`.
    MaskedRandom,
}

/// Which half of the positions the masked rows select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskPattern {
    /// Padded sequences: on NC inputs the first half of the examples; on feature maps (either
    /// layout) each example's first half of its positions (row-major over the spatial
    /// dimensions), the rest padding.
    Padded,
    /// Scattered: a random half of the mask's entries (of the examples on NC inputs), the same
    /// for every run.
    Random,
}

impl MaskPattern {
    /// The mask of this pattern for `examples` examples of `per_example` positions each (1 on NC
    /// inputs): one `bool` per value of a channel, row-major `[N, positions]`. Half of the
    /// entries are true, rounded down: for [`MaskPattern::Padded`], half of the examples (NC) or
    /// of each example's positions; for [`MaskPattern::Random`], half of all entries.
    ///
    /// ```
    /// use bnlab::bench::MaskPattern;
    /// assert_eq!(MaskPattern::Padded.mask(4, 1), [true, true, false, false]);
    /// assert_eq!(MaskPattern::Padded.mask(2, 3), [true, false, false, true, false, false]);
    /// assert_eq!(MaskPattern::Random.mask(10, 7).iter().filter(|&&on| on).count(), 35);
    /// ```
    pub fn mask(self, examples: usize, per_example: usize) -> Vec<bool> {
        let len = examples * per_example;
        match self {
            MaskPattern::Padded if per_example == 1 => (0..len).map(|k| k < examples / 2).collect(),
            MaskPattern::Padded => (0..len).map(|i| i % per_example < per_example / 2).collect(),
            MaskPattern::Random => {
                let mut mask: Vec<bool> = (0..len).map(|i| i < len / 2).collect();
                mask.shuffle(&mut ChaCha8Rng::seed_from_u64(11));
                mask
            }
        }
    }
}

/// Examples per virtual batch of the `ghost` rows, on feature maps.
pub const GHOST_EXAMPLES: usize = 4;

/// Examples per virtual batch of the `ghost` rows on NC inputs (one value per channel and
/// example, so larger groups).
pub const GHOST_EXAMPLES_NC: usize = 16;

impl Variant {
    /// Every variant, in the order they are timed (the default of `--variant`).
    pub const ALL: [Variant; 6] = [
        Variant::Bn,
        Variant::Frozen,
        Variant::Renorm,
        Variant::Ghost,
        Variant::Masked,
        Variant::MaskedRandom,
    ];

    /// The name in `--variant` and in the rows: `bn`, `frozen`, `renorm`, `ghost`, `masked`,
    /// `masked-random`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Bn => "bn",
            Variant::Frozen => "frozen",
            Variant::Renorm => "renorm",
            Variant::Ghost => "ghost",
            Variant::Masked => "masked",
            Variant::MaskedRandom => "masked-random",
        }
    }

    /// The operations timed, in order.
    pub fn ops(self) -> &'static [Op] {
        match self {
            Variant::Bn => &[Op::FwdTrain, Op::FwdEval, Op::Backward],
            _ => &[Op::FwdTrain, Op::Backward],
        }
    }
}

/// An operation `bnlab bench` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The training forward (for plain batch norm: statistics, normalization and running-statistics
    /// update).
    FwdTrain,
    /// The inference forward.
    FwdEval,
    /// The training backward: dx, dγ and dβ.
    Backward,
}

impl Op {
    /// The name in the rows: `fwd_train`, `fwd_eval`, `backward`.
    pub fn name(self) -> &'static str {
        match self {
            Op::FwdTrain => "fwd_train",
            Op::FwdEval => "fwd_eval",
            Op::Backward => "backward",
        }
    }
}

/// One variant's layer ready to be timed, with what its backward needs from one training forward.
enum Timed {
    /// The kernel crate's `BatchNorm` (plain, frozen or ghost).
    Bn { layer: BatchNorm<f32>, saved: SavedStats },
    /// The kernel crate's `BatchNorm` through its masked passes with this mask.
    Masked {
        layer: BatchNorm<f32>,
        mask: Vec<bool>,
        saved: SavedStats,
    },
    /// The kernel crate's `BatchRenorm`.
    Renorm {
        layer: BatchRenorm<f32>,
        saved: RenormSaved,
    },
}

impl Timed {
    /// `variant`'s layer over `channels` channels, after one training forward of `x` into `y`.
    fn new(variant: Variant, channels: usize, x: View<'_, f32>, y: &mut [f32]) -> Result<Timed, batchnorm::Error> {
        Ok(match variant {
            Variant::Masked | Variant::MaskedRandom => {
                let pattern = match variant {
                    Variant::Masked => MaskPattern::Padded,
                    _ => MaskPattern::Random,
                };
                let g = x.layout.geometry(x.shape)?;
                let mask = pattern.mask(x.shape[0], g.outer * g.inner / x.shape[0]);
                let mut layer = BatchNorm::<f32>::new(channels, BatchNormConfig::default())?;
                let saved = layer.forward_train_masked(x, &mask, y)?;
                Timed::Masked { layer, mask, saved }
            }
            Variant::Bn | Variant::Frozen | Variant::Ghost => {
                let virtual_batch = match (variant, x.layout) {
                    (Variant::Ghost, Layout::NC) => Some(GHOST_EXAMPLES_NC),
                    (Variant::Ghost, _) => Some(GHOST_EXAMPLES),
                    _ => None,
                };
                let config = BatchNormConfig {
                    virtual_batch,
                    ..BatchNormConfig::default()
                };
                let mut layer = BatchNorm::<f32>::new(channels, config)?;
                if variant == Variant::Frozen {
                    layer.freeze();
                }
                let saved = layer.forward_train(x, y)?;
                Timed::Bn { layer, saved }
            }
            Variant::Renorm => {
                let limits = RenormSchedule::paper();
                let config = BatchRenormConfig {
                    limits,
                    ..BatchRenormConfig::default()
                };
                let mut layer = BatchRenorm::<f32>::new(channels, config)?;
                layer.steps = limits.warmup_steps() + limits.r_ramp_steps().max(limits.d_ramp_steps());
                let saved = layer.forward_train(x, y)?;
                Timed::Renorm { layer, saved }
            }
        })
    }

    fn forward_train(&mut self, x: View<'_, f32>, y: &mut [f32]) -> Result<(), batchnorm::Error> {
        match self {
            Timed::Bn { layer, .. } => layer.forward_train(x, y).map(drop),
            Timed::Masked { layer, mask, .. } => layer.forward_train_masked(x, mask, y).map(drop),
            Timed::Renorm { layer, .. } => layer.forward_train(x, y).map(drop),
        }
    }

    fn forward_eval(&self, x: View<'_, f32>, y: &mut [f32]) -> Result<(), batchnorm::Error> {
        match self {
            Timed::Bn { layer, .. } => layer.forward_eval(x, y),
            Timed::Masked { layer, mask, .. } => layer.forward_eval_masked(x, mask, y),
            Timed::Renorm { layer, .. } => layer.forward_eval(x, y),
        }
    }

    fn backward(&self, x: View<'_, f32>, dy: &[f32], grads: Grads<'_, f32>) -> Result<(), batchnorm::Error> {
        match self {
            Timed::Bn { layer, saved } => layer.backward(x, dy, saved, grads),
            Timed::Masked { layer, mask, saved } => layer.backward_masked(x, mask, dy, saved, grads),
            Timed::Renorm { layer, saved } => layer.backward(x, dy, saved, grads),
        }
    }
}

/// One line of `bnlab bench --json` after the first.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// The variant's name ([`Variant::name`]).
    pub variant: &'static str,
    /// Layout name.
    pub layout: String,
    /// Logical shape.
    pub shape: Vec<usize>,
    /// `fwd_train`, `fwd_eval` or `backward`.
    pub op: &'static str,
    /// Median milliseconds per call.
    pub ms: f64,
}

impl Record {
    /// Effective bandwidth in GB/s counting `transfers` whole-tensor transfers of f32 (3 for
    /// `fwd_train`, 2 for `fwd_eval`, 5 for `backward`).
    pub fn gbps(&self) -> f64 {
        let transfers = match self.op {
            "fwd_train" => 3.0,
            "fwd_eval" => 2.0,
            _ => 5.0,
        };
        let bytes = self.shape.iter().product::<usize>() as f64 * 4.0 * transfers;
        bytes / (self.ms * 1e-3) / 1e9
    }
}

/// What a benchmark measures each call with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Wall-clock time (what users see).
    Wall,
    /// CPU time of the calling thread: leaves out the time it was descheduled, for A/B
    /// comparisons on a busy machine. Only meaningful with one worker thread (the work then runs
    /// on the calling thread, itself a worker of the pool).
    ThreadCpu,
}

impl Clock {
    /// Milliseconds one call of `f` takes on this clock.
    fn time_ms(self, f: &mut impl FnMut()) -> f64 {
        match self {
            Clock::Wall => {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            }
            Clock::ThreadCpu => {
                let t = thread_cpu_secs();
                f();
                (thread_cpu_secs() - t) * 1e3
            }
        }
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The longest `--min-time` accepted, in seconds (one hour per measured operation).
pub const MAX_MIN_TIME_SECS: f64 = 3600.0;

/// A `--min-time` that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// Not a number of seconds in `0..=MAX_MIN_TIME_SECS` (negative, NaN, infinite, or too large).
    #[error("--min-time {secs} is not a time in seconds between 0 and {MAX_MIN_TIME_SECS}")]
    MinTime {
        /// The value given.
        secs: f64,
    },
}

/// The [`Duration`] of a `--min-time` of `secs` seconds, for [`run_case`].
///
/// # Errors
/// [`BenchError::MinTime`] for a negative, NaN or infinite value, or one above
/// [`MAX_MIN_TIME_SECS`] (where `Duration::from_secs_f64` would overflow and panic, the run
/// would never end anyway).
///
/// ```
/// use bnlab::bench::min_time;
/// assert_eq!(min_time(0.25).unwrap(), std::time::Duration::from_millis(250));
/// assert!(min_time(1e20).is_err());
/// ```
pub fn min_time(secs: f64) -> Result<Duration, BenchError> {
    if !(0.0..=MAX_MIN_TIME_SECS).contains(&secs) {
        return Err(BenchError::MinTime { secs });
    }
    Duration::try_from_secs_f64(secs).map_err(|_| BenchError::MinTime { secs })
}

/// Median of the wall-clock times of repeated calls of `f`: at least `min_reps` calls and
/// `min_time` in all, after one warm-up call.
pub fn median_ms(f: impl FnMut(), min_reps: usize, min_time: Duration) -> f64 {
    median_ms_on(Clock::Wall, f, min_reps, min_time)
}

/// [`median_ms`] with each call timed on `clock` (`min_time` is still wall-clock time).
pub fn median_ms_on(clock: Clock, mut f: impl FnMut(), min_reps: usize, min_time: Duration) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_reps || start.elapsed() < min_time {
        times.push(clock.time_ms(&mut f));
        if times.len() >= 10_000 {
            break;
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Copy bandwidth (GB/s, read + write counted) of a 256 MiB buffer on the current rayon pool.
pub fn copy_gbps() -> f64 {
    let n = 64 << 20;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let chunk = 1 << 16;
    let ms = median_ms(
        || {
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
        },
        5,
        Duration::from_millis(500),
    );
    (2 * n * 4) as f64 / (ms * 1e-3) / 1e9
}

/// Storage shape of a case (NHWC: `[N, H, W, C]`).
fn storage_shape(case: &Case) -> Vec<usize> {
    match case.layout {
        Layout::NHWC => vec![case.shape[0], case.shape[2], case.shape[3], case.shape[1]],
        _ => case.shape.clone(),
    }
}

/// Times `variant`'s operations ([`Variant::ops`]) on one case in f32, each call on `clock`.
pub fn run_case(
    case: &Case,
    variant: Variant,
    min_time: Duration,
    clock: Clock,
) -> Result<Vec<Record>, batchnorm::Error> {
    let shape = storage_shape(case);
    let n: usize = shape.iter().product();
    let channels = case.shape[1];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0..3.0)).collect();
    let dy: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let (mut y, mut dx) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (mut dgamma, mut dbeta) = (vec![0.0f32; channels], vec![0.0f32; channels]);
    let xv = View::new(&x, &shape, case.layout);
    let mut layer = Timed::new(variant, channels, xv, &mut y)?;
    let reps = 5;
    let mut err = Ok(());
    let mut out = Vec::new();
    for &op in variant.ops() {
        let mut keep = |r: Result<(), batchnorm::Error>| {
            if let Err(e) = r {
                err = Err(e);
            }
        };
        let ms = match op {
            Op::FwdTrain => median_ms_on(clock, || keep(layer.forward_train(xv, &mut y)), reps, min_time),
            Op::FwdEval => median_ms_on(clock, || keep(layer.forward_eval(xv, &mut y)), reps, min_time),
            Op::Backward => median_ms_on(
                clock,
                || keep(layer.backward(xv, &dy, Grads::new(&mut dx, &mut dgamma, &mut dbeta))),
                reps,
                min_time,
            ),
        };
        out.push(Record {
            variant: variant.name(),
            layout: case.layout.name().to_string(),
            shape: case.shape.clone(),
            op: op.name(),
            ms,
        });
    }
    err.map(|_| out)
}
