//! `bnlab bench`: times the batch-norm kernels on the shapes of BENCHMARKS.md, beside a plain
//! memory copy measured in the same run (the bandwidth ceiling), for plain batch norm and each
//! [`Variant`] in the same run; with [`Variant::Fused`], batch norm fused with the ReLU (and the
//! residual addition) that follows it beside our unfused sequence for the same work; each in
//! every [`Dtype`] asked for (f32, and the half types bf16 and f16).

use batchnorm::{
    bf16, f16, BatchNorm, BatchNormConfig, BatchRenorm, BatchRenormConfig, Element, Grads, Layout, ReluMask,
    RenormSaved, RenormSchedule, SavedStats, View,
};
use half::slice::HalfFloatSliceExt;
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
    /// Plain batch norm fused with what follows it, `relu(bn(x))` and `relu(bn(x) + z)`
    /// (`BatchNorm::forward_train_relu`, `backward_relu`, `forward_train_add_relu`,
    /// `backward_add_relu`), each op followed by our unfused sequence for the same work (its
    /// `_unfused` row, see [`Op`]), so that their ratio is measured in one run. Not in the
    /// default run ([`Variant::DEFAULT`]).
    Fused,
}

/// The element type of the tensors a row times (`--dtype`; its rows' `"dtype"`): x, y, dy, dx
/// (and the fused rows' z, dz) in this type; γ, β, the statistics, dγ and dβ in `f32` whatever
/// it is (the kernel crate's `Element::Param`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    /// `f32`.
    F32,
    /// `bf16` (`batchnorm::bf16`).
    Bf16,
    /// `f16` (`batchnorm::f16`).
    F16,
}

impl Dtype {
    /// Every dtype, in the order a case's rows are timed.
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::Bf16, Dtype::F16];

    /// The name in `--dtype` and in the rows: `f32`, `bf16`, `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => f32::NAME,
            Dtype::Bf16 => bf16::NAME,
            Dtype::F16 => f16::NAME,
        }
    }

    /// Bytes per element: 4 for `f32`, 2 for the half types.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => std::mem::size_of::<f32>(),
            Dtype::Bf16 => std::mem::size_of::<bf16>(),
            Dtype::F16 => std::mem::size_of::<f16>(),
        }
    }
}

/// A tensor element type the bench times: its values go through `f32` (exactly one way, rounded
/// once the other), the only arithmetic the unfused sequence's passes do on them.
trait BenchElement: Element<Param = f32> {
    /// Whether the unfused passes convert block by block ([`BenchElement::widen_slice`],
    /// [`BenchElement::narrow_slice`]) rather than element by element: for `f16`, whose
    /// element conversions are a software routine unless the build targets F16C.
    const BLOCKS: bool = false;
    /// The value as an `f32` (exact).
    fn widen(self) -> f32;
    /// `v` rounded to this type (round-to-nearest-even; the identity for `f32`).
    fn narrow(v: f32) -> Self;
    /// `src` widened into `dst` (of the same length), as [`BenchElement::widen`] each.
    fn widen_slice(src: &[Self], dst: &mut [f32]) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s.widen());
    }
    /// `src` rounded into `dst` (of the same length), as [`BenchElement::narrow`] each.
    fn narrow_slice(src: &[f32], dst: &mut [Self]) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = Self::narrow(s));
    }
}

impl BenchElement for f32 {
    fn widen(self) -> f32 {
        self
    }
    fn narrow(v: f32) -> f32 {
        v
    }
}

impl BenchElement for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
}

/// Blocks through `half`'s slice conversions: F16C where the CPU has it (detected at run time),
/// as a user's own element-wise pass over `f16` would convert.
impl BenchElement for f16 {
    const BLOCKS: bool = true;
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(v: f32) -> f16 {
        f16::from_f32(v)
    }
    fn widen_slice(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn narrow_slice(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
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
    /// Every variant, in the order they are timed.
    pub const ALL: [Variant; 7] = [
        Variant::Bn,
        Variant::Frozen,
        Variant::Renorm,
        Variant::Ghost,
        Variant::Masked,
        Variant::MaskedRandom,
        Variant::Fused,
    ];

    /// The variants timed when `--variant` is not given: every one but [`Variant::Fused`] (the
    /// last of [`Variant::ALL`], whose eight rows per case would make the default run half as
    /// long again).
    pub const DEFAULT: &'static [Variant] = Variant::ALL.split_at(6).0;

    /// The name in `--variant` and in the rows: `bn`, `frozen`, `renorm`, `ghost`, `masked`,
    /// `masked-random`, `fused`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Bn => "bn",
            Variant::Frozen => "frozen",
            Variant::Renorm => "renorm",
            Variant::Ghost => "ghost",
            Variant::Masked => "masked",
            Variant::MaskedRandom => "masked-random",
            Variant::Fused => "fused",
        }
    }

    /// The operations timed, in order.
    pub fn ops(self) -> &'static [Op] {
        match self {
            Variant::Bn => &[Op::FwdTrain, Op::FwdEval, Op::Backward],
            // Each fused op, then its unfused sequence: the last eight of `Op::ALL`.
            Variant::Fused => Op::ALL.split_at(3).1,
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
    /// The fused training forward of `relu(bn(x))`: batch norm's training forward with the ReLU
    /// in the pass that writes y, and the 1-bit mask of the outputs it kept.
    FwdTrainRelu,
    /// The same work unfused: batch norm's training forward into y, then a ReLU pass over y in
    /// place.
    FwdTrainReluUnfused,
    /// The fused training backward of `relu(bn(x))`: dx, dγ and dβ from the saved statistics and
    /// the mask of [`Op::FwdTrainRelu`], the mask applied in the passes that read dy.
    BackwardRelu,
    /// The same work unfused: a ReLU-backward pass g = dy·\[y > 0\] (reading the unfused
    /// forward's y and dy, writing g), then batch norm's backward from g.
    BackwardReluUnfused,
    /// The fused training forward of `relu(bn(x) + z)`: as [`Op::FwdTrainRelu`], z added in the
    /// same pass.
    FwdTrainAddRelu,
    /// The same work unfused: batch norm's training forward into y, then one pass
    /// y = relu(y + z) in place.
    FwdTrainAddReluUnfused,
    /// The fused training backward of `relu(bn(x) + z)`: as [`Op::BackwardRelu`], and
    /// dz = dy·\[kept\] written out of the pass that writes dx.
    BackwardAddRelu,
    /// The same work unfused: the ReLU-backward pass of [`Op::BackwardReluUnfused`] (its g is dz,
    /// as the addition's backward passes it on unchanged), then batch norm's backward from g.
    BackwardAddReluUnfused,
}

impl Op {
    /// Every operation, in the order of this enum.
    pub const ALL: [Op; 11] = [
        Op::FwdTrain,
        Op::FwdEval,
        Op::Backward,
        Op::FwdTrainRelu,
        Op::FwdTrainReluUnfused,
        Op::BackwardRelu,
        Op::BackwardReluUnfused,
        Op::FwdTrainAddRelu,
        Op::FwdTrainAddReluUnfused,
        Op::BackwardAddRelu,
        Op::BackwardAddReluUnfused,
    ];

    /// The name in the rows: `fwd_train`, `fwd_eval`, `backward`, `fwd_train_relu`,
    /// `fwd_train_relu_unfused`, `backward_relu`, `backward_relu_unfused`, `fwd_train_add_relu`,
    /// `fwd_train_add_relu_unfused`, `backward_add_relu`, `backward_add_relu_unfused`.
    pub fn name(self) -> &'static str {
        match self {
            Op::FwdTrain => "fwd_train",
            Op::FwdEval => "fwd_eval",
            Op::Backward => "backward",
            Op::FwdTrainRelu => "fwd_train_relu",
            Op::FwdTrainReluUnfused => "fwd_train_relu_unfused",
            Op::BackwardRelu => "backward_relu",
            Op::BackwardReluUnfused => "backward_relu_unfused",
            Op::FwdTrainAddRelu => "fwd_train_add_relu",
            Op::FwdTrainAddReluUnfused => "fwd_train_add_relu_unfused",
            Op::BackwardAddRelu => "backward_add_relu",
            Op::BackwardAddReluUnfused => "backward_add_relu_unfused",
        }
    }

    /// Whole-tensor transfers the operation needs at the least, the count of [`Record::gbps`]:
    /// `fwd_train` 3 (x read for the statistics, x read and y written), `fwd_eval` 2,
    /// `backward` 5 (x and dy read for the sums, x and dy read and dx written); the residual adds
    /// one (z read in the forward, dz written in the backward); the 1-bit mask is not counted. An
    /// `_unfused` row counts as its fused row (the same work), so their GB/s compare as their
    /// times do.
    pub fn transfers(self) -> f64 {
        match self {
            Op::FwdEval => 2.0,
            Op::FwdTrain | Op::FwdTrainRelu | Op::FwdTrainReluUnfused => 3.0,
            Op::FwdTrainAddRelu | Op::FwdTrainAddReluUnfused => 4.0,
            Op::Backward | Op::BackwardRelu | Op::BackwardReluUnfused => 5.0,
            Op::BackwardAddRelu | Op::BackwardAddReluUnfused => 6.0,
        }
    }
}

/// One variant's layer ready to be timed, with what its backward needs from one training forward.
enum Timed<T: BenchElement> {
    /// The kernel crate's `BatchNorm` (plain, frozen or ghost). Its timed training forwards
    /// refill `saved` (`BatchNorm::forward_train_into`), as a training loop that keeps it between
    /// steps does, whichever of the three it is.
    Bn { layer: BatchNorm<T>, saved: SavedStats },
    /// The kernel crate's `BatchNorm` through its masked passes with this mask.
    Masked {
        layer: BatchNorm<T>,
        mask: Vec<bool>,
        saved: SavedStats,
    },
    /// The kernel crate's `BatchRenorm`.
    Renorm { layer: BatchRenorm<T>, saved: RenormSaved },
    /// A plain `BatchNorm` through its fused passes and through the unfused sequence.
    Fused(Box<FusedRows<T>>),
}

impl<T: BenchElement> Timed<T> {
    /// `variant`'s layer over `channels` channels, after one training forward of `x` into `y`.
    fn new(variant: Variant, channels: usize, x: View<'_, T>, y: &mut [T]) -> Result<Timed<T>, batchnorm::Error> {
        Ok(match variant {
            Variant::Masked | Variant::MaskedRandom => {
                let pattern = match variant {
                    Variant::Masked => MaskPattern::Padded,
                    _ => MaskPattern::Random,
                };
                let g = x.layout.geometry(x.shape)?;
                let mask = pattern.mask(x.shape[0], g.outer * g.inner / x.shape[0]);
                let mut layer = BatchNorm::<T>::new(channels, BatchNormConfig::default())?;
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
                let mut layer = BatchNorm::<T>::new(channels, config)?;
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
                let mut layer = BatchRenorm::<T>::new(channels, config)?;
                layer.steps = limits.warmup_steps() + limits.r_ramp_steps().max(limits.d_ramp_steps());
                let saved = layer.forward_train(x, y)?;
                Timed::Renorm { layer, saved }
            }
            Variant::Fused => Timed::Fused(Box::new(FusedRows::new(channels, x, y)?)),
        })
    }

    /// One call of `op` on `io.x` (writing y, or the gradients from dy).
    fn run(&mut self, op: Op, io: Io<'_, T>) -> Result<(), batchnorm::Error> {
        let Io { x, y, dy, grads } = io;
        match (self, op) {
            (Timed::Fused(rows), op) => rows.run(op, Io { x, y, dy, grads }),
            (Timed::Bn { layer, saved }, Op::FwdTrain) => layer.forward_train_into(x, y, saved),
            (Timed::Masked { layer, mask, .. }, Op::FwdTrain) => layer.forward_train_masked(x, mask, y).map(drop),
            (Timed::Renorm { layer, .. }, Op::FwdTrain) => layer.forward_train(x, y).map(drop),
            (Timed::Bn { layer, .. }, Op::FwdEval) => layer.forward_eval(x, y),
            (Timed::Masked { layer, mask, .. }, Op::FwdEval) => layer.forward_eval_masked(x, mask, y),
            (Timed::Renorm { layer, .. }, Op::FwdEval) => layer.forward_eval(x, y),
            // `Op::Backward`, the only other operation these variants time (`Variant::ops`).
            (Timed::Bn { layer, saved }, _) => layer.backward(x, dy, saved, grads),
            (Timed::Masked { layer, mask, saved }, _) => layer.backward_masked(x, mask, dy, saved, grads),
            (Timed::Renorm { layer, saved }, _) => layer.backward(x, dy, saved, grads),
        }
    }
}

/// One timed call's tensors: the input x, the output y, the upstream gradient dy, and where the
/// gradients go.
struct Io<'a, T: Element> {
    x: View<'a, T>,
    y: &'a mut [T],
    dy: &'a [T],
    grads: Grads<'a, T>,
}

impl<'a, T: Element> Io<'a, T> {
    fn new(x: View<'a, T>, y: &'a mut [T], dy: &'a [T], grads: Grads<'a, T>) -> Io<'a, T> {
        Io { x, y, dy, grads }
    }
}

/// The fused rows' layer and buffers: a plain `BatchNorm`, the saved statistics and ReLU mask of
/// its last training forward, the residual z, and the gradients only these rows write (the
/// unfused sequence's g = dy·\[y > 0\], the fused backward's dz).
///
/// In the half types the unfused sequence rounds y to the type before its ReLU pass (as two
/// separate ops must store it), so its results may differ from the fused ops' by that rounding;
/// in `f32` they are the same bits.
struct FusedRows<T: BenchElement> {
    layer: BatchNorm<T>,
    saved: SavedStats,
    mask: ReluMask,
    z: Vec<T>,
    g: Vec<T>,
    dz: Vec<T>,
}

/// Elements per task of the unfused sequence's element-wise passes (as in [`copy_gbps`]).
const PASS_CHUNK: usize = 1 << 16;

impl<T: BenchElement> FusedRows<T> {
    /// The rows' state for an input `x`, after one fused training forward of it into `y`.
    fn new(channels: usize, x: View<'_, T>, y: &mut [T]) -> Result<FusedRows<T>, batchnorm::Error> {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let n = x.data.len();
        let mut layer = BatchNorm::<T>::new(channels, BatchNormConfig::default())?;
        let mut mask = ReluMask::new();
        let saved = layer.forward_train_relu(x, y, &mut mask)?;
        Ok(FusedRows {
            layer,
            saved,
            mask,
            z: (0..n).map(|_| T::narrow(rng.gen_range(-1.0..1.0))).collect(),
            g: vec![T::narrow(0.0); n],
            dz: vec![T::narrow(0.0); n],
        })
    }

    /// One call of `op`. The unfused backward reads the y its forward (the op before it in
    /// [`Variant::ops`]) left; a fused backward, the mask of the last fused forward.
    fn run(&mut self, op: Op, Io { x, y, dy, grads }: Io<'_, T>) -> Result<(), batchnorm::Error> {
        let FusedRows {
            layer,
            saved,
            mask,
            z,
            g,
            dz,
        } = self;
        match op {
            Op::FwdTrain => layer.forward_train_into(x, y, saved)?,
            Op::FwdEval => layer.forward_eval(x, y)?,
            Op::Backward => layer.backward(x, dy, saved, grads)?,
            Op::FwdTrainRelu => *saved = layer.forward_train_relu(x, y, mask)?,
            Op::FwdTrainAddRelu => *saved = layer.forward_train_add_relu(x, z, y, mask)?,
            Op::FwdTrainReluUnfused | Op::FwdTrainAddReluUnfused => {
                *saved = layer.forward_train(x, y)?;
                let residual = (op == Op::FwdTrainAddReluUnfused).then_some(z.as_slice());
                add_relu_pass(y, residual);
            }
            Op::BackwardRelu => layer.backward_relu(x, dy, mask, saved, grads)?,
            Op::BackwardAddRelu => layer.backward_add_relu(x, dy, mask, saved, grads, dz)?,
            Op::BackwardReluUnfused | Op::BackwardAddReluUnfused => {
                relu_backward_pass(g, dy, y);
                layer.backward(x, g, saved, grads)?;
            }
        }
        Ok(())
    }
}

/// The unfused sequence's pass after batch norm, in place: y = relu(y + z) with the residual,
/// y = relu(y) without (relu(t) = t where t is not ≤ 0, NaN included, +0.0 elsewhere, as the
/// kernel crate's fused passes have it), computed in `f32` and rounded once to `T`.
fn add_relu_pass<T: BenchElement>(y: &mut [T], z: Option<&[T]>) {
    match z {
        None => y.par_chunks_mut(PASS_CHUNK).for_each(|y| add_relu_chunk(y, None)),
        Some(z) => y
            .par_chunks_mut(PASS_CHUNK)
            .zip(z.par_chunks(PASS_CHUNK))
            .for_each(|(y, z)| add_relu_chunk(y, Some(z))),
    }
}

/// Elements of the `f32` blocks of the unfused passes over a type with [`BenchElement::BLOCKS`].
const CONVERT_BLOCK: usize = 1024;

/// [`add_relu_pass`] over one chunk, element by element or through `f32` blocks
/// ([`BenchElement::BLOCKS`]).
fn add_relu_chunk<T: BenchElement>(y: &mut [T], z: Option<&[T]>) {
    let relu = |t: f32| if t <= 0.0 { 0.0 } else { t };
    if !T::BLOCKS {
        match z {
            None => y.iter_mut().for_each(|v| *v = T::narrow(relu(v.widen()))),
            Some(z) => (y.iter_mut().zip(z)).for_each(|(v, &z)| *v = T::narrow(relu(v.widen() + z.widen()))),
        }
        return;
    }
    let (mut yb, mut zb) = ([0.0f32; CONVERT_BLOCK], [0.0f32; CONVERT_BLOCK]);
    for (k, y) in y.chunks_mut(CONVERT_BLOCK).enumerate() {
        let yb = &mut yb[..y.len()];
        T::widen_slice(y, yb);
        if let Some(z) = z {
            let zb = &mut zb[..y.len()];
            T::widen_slice(&z[k * CONVERT_BLOCK..][..y.len()], zb);
            yb.iter_mut().zip(zb.iter()).for_each(|(v, &z)| *v += z);
        }
        yb.iter_mut().for_each(|v| *v = relu(*v));
        T::narrow_slice(yb, y);
    }
}

/// The unfused sequence's ReLU backward: g = dy where the ReLU's output y is > 0 (it kept t),
/// 0 elsewhere; y element by element or through `f32` blocks ([`BenchElement::BLOCKS`]).
fn relu_backward_pass<T: BenchElement>(g: &mut [T], dy: &[T], y: &[T]) {
    g.par_chunks_mut(PASS_CHUNK)
        .zip(dy.par_chunks(PASS_CHUNK).zip(y.par_chunks(PASS_CHUNK)))
        .for_each(|(g, (dy, y))| {
            if !T::BLOCKS {
                for ((g, &dy), &y) in g.iter_mut().zip(dy).zip(y) {
                    *g = if y.widen() > 0.0 { dy } else { T::narrow(0.0) };
                }
                return;
            }
            // dy through f32 too (exactly), so that the select is one on f32 lanes.
            let (mut gb, mut dyb, mut yb) = (
                [0.0f32; CONVERT_BLOCK],
                [0.0f32; CONVERT_BLOCK],
                [0.0f32; CONVERT_BLOCK],
            );
            for ((g, dy), y) in (g.chunks_mut(CONVERT_BLOCK).zip(dy.chunks(CONVERT_BLOCK))).zip(y.chunks(CONVERT_BLOCK))
            {
                let n = g.len();
                T::widen_slice(dy, &mut dyb[..n]);
                T::widen_slice(y, &mut yb[..n]);
                for ((g, &dy), &y) in gb[..n].iter_mut().zip(&dyb[..n]).zip(&yb[..n]) {
                    *g = if y > 0.0 { dy } else { 0.0 };
                }
                T::narrow_slice(&gb[..n], g);
            }
        });
}

/// One line of `bnlab bench --json` after the first.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// The variant's name ([`Variant::name`]).
    pub variant: &'static str,
    /// The tensors' element type ([`Dtype::name`]).
    pub dtype: &'static str,
    /// Layout name.
    pub layout: String,
    /// Logical shape.
    pub shape: Vec<usize>,
    /// The operation's name ([`Op::name`]).
    pub op: &'static str,
    /// Median milliseconds per call.
    pub ms: f64,
}

impl Record {
    /// Effective bandwidth in GB/s counting [`Op::transfers`] whole-tensor transfers (3 for
    /// `fwd_train`, 2 for `fwd_eval`, 5 for `backward`) of [`Dtype::bytes`] per element (4 for
    /// `f32`, 2 for `bf16` and `f16`); an unknown op or dtype name counts 0.
    pub fn gbps(&self) -> f64 {
        let transfers = Op::ALL
            .iter()
            .find(|o| o.name() == self.op)
            .map_or(0.0, |o| o.transfers());
        let element_bytes = Dtype::ALL
            .iter()
            .find(|d| d.name() == self.dtype)
            .map_or(0, |d| d.bytes());
        let bytes = self.shape.iter().product::<usize>() as f64 * element_bytes as f64 * transfers;
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

/// Times `variant`'s operations ([`Variant::ops`]) on one case with tensors of `dtype`, each
/// call on `clock`. The inputs are the same draws in every dtype, rounded to it.
///
/// # Errors
/// The kernel crate's error where one of its calls rejects the case.
pub fn run_case(
    case: &Case,
    variant: Variant,
    dtype: Dtype,
    min_time: Duration,
    clock: Clock,
) -> Result<Vec<Record>, batchnorm::Error> {
    match dtype {
        Dtype::F32 => run_case_in::<f32>(case, variant, min_time, clock),
        Dtype::Bf16 => run_case_in::<bf16>(case, variant, min_time, clock),
        Dtype::F16 => run_case_in::<f16>(case, variant, min_time, clock),
    }
}

/// [`run_case`] with tensors of `T`.
fn run_case_in<T: BenchElement>(
    case: &Case,
    variant: Variant,
    min_time: Duration,
    clock: Clock,
) -> Result<Vec<Record>, batchnorm::Error> {
    let shape = storage_shape(case);
    let n: usize = shape.iter().product();
    let channels = case.shape[1];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x: Vec<T> = (0..n).map(|_| T::narrow(rng.gen_range(-2.0..3.0))).collect();
    let dy: Vec<T> = (0..n).map(|_| T::narrow(rng.gen_range(-1.0..1.0))).collect();
    let (mut y, mut dx) = (vec![T::narrow(0.0); n], vec![T::narrow(0.0); n]);
    let (mut dgamma, mut dbeta) = (vec![0.0f32; channels], vec![0.0f32; channels]);
    let xv = View::new(&x, &shape, case.layout);
    let mut layer = Timed::new(variant, channels, xv, &mut y)?;
    let reps = 5;
    let mut err = Ok(());
    let mut out = Vec::new();
    for &op in variant.ops() {
        let mut call = || {
            let grads = Grads::new(&mut dx, &mut dgamma, &mut dbeta);
            let io = Io::new(xv, &mut y, &dy, grads);
            if let Err(e) = layer.run(op, io) {
                err = Err(e);
            }
        };
        let ms = median_ms_on(clock, &mut call, reps, min_time);
        out.push(Record {
            variant: variant.name(),
            dtype: T::NAME,
            layout: case.layout.name().to_string(),
            shape: case.shape.clone(),
            op: op.name(),
            ms,
        });
    }
    err.map(|_| out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unfused passes through `f32` blocks ([`BenchElement::BLOCKS`], `f16`) give the bits
    /// of the same passes element by element (relu(y + z) rounded once; g = dy where y > 0), on
    /// a length that ends in a partial block and a partial chunk, with zeros, negative zeros and
    /// values that round.
    #[test]
    fn unfused_passes_in_blocks_compute_the_element_wise_results() {
        let n = PASS_CHUNK + CONVERT_BLOCK * 3 + 17;
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut value = || match rng.gen_range(0..8) {
            0 => 0.0,
            1 => -0.0,
            _ => rng.gen_range(-3.0f32..3.0),
        };
        let y: Vec<f16> = (0..n).map(|_| f16::from_f32(value())).collect();
        let z: Vec<f16> = (0..n).map(|_| f16::from_f32(value())).collect();
        let dy: Vec<f16> = (0..n).map(|_| f16::from_f32(value())).collect();
        let relu = |t: f32| if t <= 0.0 { 0.0 } else { t };
        let bits = |v: &[f16]| v.iter().map(|h| h.to_bits()).collect::<Vec<_>>();
        let (mut relu_y, mut add_relu_y, mut g) = (y.clone(), y.clone(), vec![f16::from_f32(1.0); n]);
        add_relu_pass(&mut relu_y, None);
        add_relu_pass(&mut add_relu_y, Some(&z));
        relu_backward_pass(&mut g, &dy, &y);
        let want_relu: Vec<f16> = y.iter().map(|v| f16::from_f32(relu(v.to_f32()))).collect();
        let want_add: Vec<f16> = (y.iter().zip(&z))
            .map(|(v, z)| f16::from_f32(relu(v.to_f32() + z.to_f32())))
            .collect();
        let want_g: Vec<f16> = (dy.iter().zip(&y))
            .map(|(&d, v)| if v.to_f32() > 0.0 { d } else { f16::ZERO })
            .collect();
        assert_eq!(bits(&relu_y), bits(&want_relu));
        assert_eq!(bits(&add_relu_y), bits(&want_add));
        assert_eq!(bits(&g), bits(&want_g));
        assert!(want_add.iter().any(|v| v.to_f32() > 0.0) && want_g.contains(&f16::ZERO));
    }

    /// The unfused rows do the fused rows' work: the kernel crate's fused ops give the unfused
    /// sequence's bits (its docs), so y after each forward, and dx, dγ, dβ after each backward
    /// (dz against the unfused g), must be equal bit for bit, on an input whose ReLU drops part of
    /// every channel.
    #[test]
    fn unfused_rows_compute_the_fused_rows_results() {
        let (shape, layout) = ([3, 5, 2, 4], Layout::NHWC); // stored [N, H, W, C], C = 4
        let n: usize = shape.iter().product();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0..3.0)).collect();
        let dy: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let xv = View::new(&x, &shape, layout);
        let mut y = vec![0.0; n];
        let mut rows = FusedRows::new(4, xv, &mut y).unwrap();
        let mut results = Vec::new();
        for &op in Variant::Fused.ops() {
            let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; n], vec![0.0; 4], vec![0.0; 4]);
            let grads = Grads::new(&mut dx, &mut dgamma, &mut dbeta);
            let io = Io::new(xv, &mut y, &dy, grads);
            rows.run(op, io).unwrap();
            let out = match op.name().starts_with("fwd") {
                true => vec![y.clone()],
                false if op == Op::BackwardAddRelu => vec![dx, dgamma, dbeta, rows.dz.clone()],
                false if op == Op::BackwardAddReluUnfused => vec![dx, dgamma, dbeta, rows.g.clone()],
                false => vec![dx, dgamma, dbeta],
            };
            results.push((op, out.concat()));
        }
        assert!(y.contains(&0.0) && y.iter().any(|&v| v > 0.0));
        for pair in results.chunks(2) {
            let (fused, unfused) = (&pair[0], &pair[1]);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fused.1), bits(&unfused.1), "{:?} vs {:?}", fused.0, unfused.0);
        }
    }
}
