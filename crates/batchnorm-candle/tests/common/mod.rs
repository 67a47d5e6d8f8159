//! Shared helpers: deterministic data, paired modules (ours and candle-nn's on equal variables),
//! forward and backward in one call, a scaled error measure and the tolerances derived for it.
//!
//! # Tolerances of the variant tests
//!
//! Errors are measured by [`scaled_err`] (max |ours − reference| / max |reference|). A value
//! behind per-channel sums over m values, compared with the `f64` reference on the same values,
//! gets ([`tol_fused`], [`tol_composed`]):
//!
//! - 2·ε_T for the final rounding to the tensor's type T (≤ 1 ulp at the largest value, doubled);
//! - 4·(m + 16)·u for the sums, u the unit roundoff of the type they are computed in: naive
//!   summation of m terms errs by at most (m − 1)·u·Σ|terms| (Higham), which reaches the outputs
//!   through O(1) factors; the data keep |mean| within a few σ (values in [−1, 3] or similar), so
//!   that the terms stay within a small factor of the largest output, folded into the 4. The fused
//!   kernels sum in `f64` whatever the tensor type (u = 2⁻⁵³) and compute the element-wise
//!   passes of `f32` tensors in `f32` (4·ε_f32 more, as the kernel crate's tests state); the
//!   composed candle ops sum in the compute type itself (u = 2⁻²⁴ for `f32`).
//!
//! Two implementations are compared with the sum of their tolerances. A formula bug (m for
//! m − 1, a missing term, a wrong group) errs by 1/m or more: orders of magnitude above these.
#![allow(dead_code)]

use batchnorm::{Grads, Layout, View};
use batchnorm_candle::BatchNormConfig;
use candle_core::{DType, Device, Result, Tensor, Var, WithDType};
use candle_nn::{VarBuilder, VarMap};

/// f64 unit roundoff.
pub const U64: f64 = f64::EPSILON / 2.0;

/// Machine epsilon of a float dtype.
pub fn eps_of(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON,
        DType::F32 => f32::EPSILON as f64,
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
        other => panic!("not a float dtype: {other:?}"),
    }
}

/// Tolerance of the fused path against the `f64` reference for values behind sums over `m`
/// values per channel (see the module docs).
pub fn tol_fused(dtype: DType, m: usize) -> f64 {
    let kernel_rel = if dtype == DType::F64 {
        0.0
    } else {
        4.0 * eps_of(DType::F32)
    };
    2.0 * eps_of(dtype) + 4.0 * (m as f64 + 16.0) * U64 + kernel_rel
}

/// Tolerance of the composed path against the `f64` reference for values behind sums over `m`
/// values per channel, summed in the compute type (see the module docs).
pub fn tol_composed(dtype: DType, m: usize) -> f64 {
    let compute = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    2.0 * eps_of(dtype) + 4.0 * (m as f64 + 16.0) * eps_of(compute) / 2.0
}

/// A tensor's values as `f64`, flattened.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("a float tensor")
}

/// An `f64` CPU tensor of `shape` holding `v`.
pub fn from_f64s(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).expect("matching length")
}

/// Asserts `scaled_err(got, want) <= tol`, naming the value.
#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = scaled_err(got, want);
    assert!(e <= tol, "{what}: scaled error {e:e} > tolerance {tol:e}");
}

/// Asserts two tensors hold the same values bit for bit (as `f64`, which widens exactly).
#[track_caller]
pub fn assert_bits(what: &str, a: &Tensor, b: &Tensor) {
    let (a, b) = (f64s(a), f64s(b));
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (k, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x.to_bits() == y.to_bits(), "{what}[{k}]: {x:e} vs {y:e} differ in bits");
    }
}

/// Runs `forward` on `x` (made a variable) and backpropagates Σ y·w: `[y, dx]`, then `dγ, dβ`
/// when `params` are given.
pub fn forward_backward(
    forward: impl Fn(&Tensor) -> Result<Tensor>,
    params: Option<(&Tensor, &Tensor)>,
    x: &Tensor,
    w: &Tensor,
) -> Result<Vec<Tensor>> {
    forward_backward2(|x, _| forward(x), params, x, None, w)
}

/// [`forward_backward`] of a forward with a second input `z` (e.g. a residual), made a variable
/// too when given: `[y, dx]`, then `dγ, dβ` when `params` are given, then dz when `z` is.
pub fn forward_backward2(
    forward: impl Fn(&Tensor, Option<&Tensor>) -> Result<Tensor>,
    params: Option<(&Tensor, &Tensor)>,
    x: &Tensor,
    z: Option<&Tensor>,
    w: &Tensor,
) -> Result<Vec<Tensor>> {
    let xv = Var::from_tensor(x)?;
    let zv = z.map(Var::from_tensor).transpose()?;
    let y = forward(xv.as_tensor(), zv.as_ref().map(Var::as_tensor))?;
    let grads = (&y * w)?.sum_all()?.backward()?;
    let get = |t: &Tensor, what: &str| {
        grads
            .get(t)
            .cloned()
            .unwrap_or_else(|| panic!("no gradient for {what}"))
    };
    let mut out = vec![y.clone(), get(xv.as_tensor(), "x")];
    if let Some((g, b)) = params {
        out.push(get(g, "weight"));
        out.push(get(b, "bias"));
    }
    if let Some(zv) = &zv {
        out.push(get(zv.as_tensor(), "z"));
    }
    Ok(out)
}

/// The names of [`forward_backward`]'s results (and of [`forward_backward2`]'s, dz last).
pub const OUTPUTS: [&str; 5] = ["y", "dx", "dgamma", "dbeta", "dz"];

/// Deterministic values in [lo, hi) (SplitMix64), so every run sees the same data.
pub fn values(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            lo + (hi - lo) * ((z >> 11) as f64 / (1u64 << 53) as f64)
        })
        .collect()
}

/// A tensor of `shape` with deterministic values in [lo, hi), in `dtype`.
pub fn tensor(seed: u64, shape: &[usize], lo: f64, hi: f64, dtype: DType) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(values(seed, n, lo, hi), shape, &Device::Cpu)?.to_dtype(dtype)
}

/// max |a − b| / max |b|: the error relative to the reference's scale (dx has entries near zero
/// by cancellation, so an element-wise relative error would be meaningless there).
pub fn scaled_err(a: &Tensor, b: &Tensor) -> f64 {
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Our module and candle-nn's, each on its own `VarMap` holding equal values: γ in [0.5, 1.5),
/// β in [−0.5, 0.5), running mean in [−0.2, 0.2), running variance in [0.5, 1.5).
pub struct Pair {
    pub ours: batchnorm_candle::BatchNorm,
    pub theirs: candle_nn::BatchNorm,
    pub ours_vm: VarMap,
    pub theirs_vm: VarMap,
}

pub fn pair(c: usize, dtype: DType, config: BatchNormConfig, seed: u64) -> Result<Pair> {
    let dev = Device::Cpu;
    let ours_vm = VarMap::new();
    let theirs_vm = VarMap::new();
    let ours = batchnorm_candle::batch_norm(c, config, VarBuilder::from_varmap(&ours_vm, dtype, &dev))?;
    let theirs = candle_nn::batch_norm(c, config, VarBuilder::from_varmap(&theirs_vm, dtype, &dev))?;
    let stats = [("running_mean", -0.2, 0.2), ("running_var", 0.5, 1.5)];
    for vm in [&ours_vm, &theirs_vm] {
        init_vars(vm, &stats, config.affine, c, dtype, seed)?;
    }
    Ok(Pair {
        ours,
        theirs,
        ours_vm,
        theirs_vm,
    })
}

/// Sets a `VarMap`'s per-channel variables (`c` values in `dtype`, deterministic from `seed`):
/// each of `stats` (name, low, high) uniform in its range, then with `affine` γ (`weight`) in
/// [0.5, 1.5) and β (`bias`) in [−0.5, 0.5).
pub fn init_vars(
    vm: &VarMap,
    stats: &[(&str, f64, f64)],
    affine: bool,
    c: usize,
    dtype: DType,
    seed: u64,
) -> Result<()> {
    let mut vm = vm.clone();
    let params = [("weight", 0.5, 1.5), ("bias", -0.5, 0.5)];
    let vars = stats.iter().chain(if affine { &params[..] } else { &[] });
    for (seed, (name, lo, hi)) in (seed..).zip(vars) {
        vm.set_one(name, tensor(seed, &[c], *lo, *hi, dtype)?)?;
    }
    Ok(())
}

/// Two of our layers on equal variables (as [`pair`] sets them), one computing through the fused
/// kernels and one through composed candle ops, each passed through `setup` (e.g. to make it a
/// ghost layer).
pub fn paths(
    c: usize,
    dtype: DType,
    config: BatchNormConfig,
    seed: u64,
    setup: impl Fn(batchnorm_candle::BatchNorm) -> Result<batchnorm_candle::BatchNorm>,
) -> Result<(batchnorm_candle::BatchNorm, batchnorm_candle::BatchNorm)> {
    let fused = setup(pair(c, dtype, config, seed)?.ours)?;
    let composed = setup(pair(c, dtype, config, seed)?.ours)?.with_compute(batchnorm_candle::ComputePath::Composed);
    Ok((fused, composed))
}

/// Checks one training step's results ([`forward_backward`]'s `[y, dx, dγ, dβ]`) of the fused and
/// the composed path against the `f64` reference `want`, each within its tolerance for sums over
/// `m` values per channel.
#[track_caller]
pub fn check_paths(what: &str, fused: &[Tensor], composed: &[Tensor], want: &[Tensor], dtype: DType, m: usize) {
    assert_eq!(fused.len(), want.len(), "{what}: outputs");
    assert_eq!(composed.len(), want.len(), "{what}: outputs");
    for (k, w) in want.iter().enumerate() {
        assert_close(
            &format!("{what} fused {}", OUTPUTS[k]),
            &fused[k],
            w,
            tol_fused(dtype, m),
        );
        assert_close(
            &format!("{what} composed {}", OUTPUTS[k]),
            &composed[k],
            w,
            tol_composed(dtype, m),
        );
    }
}

/// The reference's `[y, dx, dγ, dβ]` as tensors: y and dx of `shape`, dγ and dβ of `[C]`.
pub fn reference_outputs(y: &[f64], dx: &[f64], dgamma: &[f64], dbeta: &[f64], shape: &[usize]) -> Vec<Tensor> {
    let c = [shape[1]];
    vec![
        from_f64s(y, shape),
        from_f64s(dx, shape),
        from_f64s(dgamma, &c),
        from_f64s(dbeta, &c),
    ]
}

/// Checks two per-channel statistics of each path's layer after a step (e.g. the running mean and
/// variance, in that order in `fused`, `composed` and `want`) against the `f64` reference, each
/// within its path's tolerance for sums over `m` values per channel.
#[track_caller]
pub fn check_stats(what: &str, fused: [&Tensor; 2], composed: [&Tensor; 2], want: [&[f64]; 2], dtype: DType, m: usize) {
    for k in 0..2 {
        let w = from_f64s(want[k], &[want[k].len()]);
        assert_close(
            &format!("{what} fused statistic {k}"),
            fused[k],
            &w,
            tol_fused(dtype, m),
        );
        assert_close(
            &format!("{what} composed statistic {k}"),
            composed[k],
            &w,
            tol_composed(dtype, m),
        );
    }
}

/// The running mean and variance of a layer.
pub fn running(bn: &batchnorm_candle::BatchNorm) -> [&Tensor; 2] {
    [bn.running_mean(), bn.running_var()]
}

/// One training step of a kernel-crate layer on `x` (channels first) with upstream gradient `w`,
/// as [`forward_backward`]'s `[y, dx, dγ, dβ]`: `step` runs the layer's forward and backward on
/// the buffers it is given (x, dy, y, grads). dγ and dβ are in `T`'s parameter type (`f32` for
/// the half types).
pub fn kernel_step<T: batchnorm::Element<Param: WithDType> + WithDType>(
    x: &Tensor,
    w: &Tensor,
    step: impl FnOnce(View<'_, T>, &[T], &mut [T], Grads<'_, T>),
) -> Result<Vec<Tensor>> {
    let (shape, dev) = (x.dims(), x.device());
    let (n, c) = (x.elem_count(), shape[1]);
    let (xs, dy) = (x.flatten_all()?.to_vec1::<T>()?, w.flatten_all()?.to_vec1::<T>()?);
    let (mut y, mut dx) = (vec![T::default(); n], vec![T::default(); n]);
    let (mut dgamma, mut dbeta) = (vec![T::Param::default(); c], vec![T::Param::default(); c]);
    let grads = Grads::new(&mut dx, &mut dgamma, &mut dbeta);
    step(View::new(&xs, shape, Layout::ChannelsFirst), &dy, &mut y, grads);
    Ok(vec![
        Tensor::from_vec(y, shape, dev)?,
        Tensor::from_vec(dx, shape, dev)?,
        Tensor::from_vec(dgamma, c, dev)?,
        Tensor::from_vec(dbeta, c, dev)?,
    ])
}

/// Asserts that [`forward_backward`]'s results `got` hold the bits of `want`'s.
#[track_caller]
pub fn assert_outputs_bits(what: &str, got: &[Tensor], want: &[Tensor]) {
    assert_eq!(got.len(), want.len(), "{what}: outputs");
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        assert_bits(&format!("{what} {}", OUTPUTS[k]), a, b);
    }
}

/// Asserts that [`forward_backward`]'s results `got` are within `tol` of `want`'s
/// ([`assert_close`]).
#[track_caller]
pub fn assert_outputs_close(what: &str, got: &[Tensor], want: &[Tensor], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: outputs");
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        assert_close(&format!("{what} {}", OUTPUTS[k]), a, b, tol);
    }
}

/// Runs `case(dtype, case, seed)` for `f32` and `f64` and each of `cases` (a shape, or a shape
/// with settings), case i with the seed `seed0 + 10·i`.
pub fn for_cases<C: Copy>(cases: &[C], seed0: u64, mut case: impl FnMut(DType, C, u64) -> Result<()>) -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for (i, &c) in cases.iter().enumerate() {
            case(dtype, c, seed0 + 10 * i as u64)?;
        }
    }
    Ok(())
}

/// Runs three training steps of our layer (`ours`, its training forward, with its γ and β
/// `params`) and of a kernel-crate layer on the same data (x in [−1, 3) and the upstream gradient
/// in [−1, 1) of `shape` in `T`, seeds from `seed`), and asserts the same bits for y, dx, dγ, dβ
/// and for the statistics after each step: `kernel` runs the kernel layer's forward and backward
/// on the buffers given and returns its statistics, `stats` returns ours, in the same order.
pub fn assert_steps_match_kernel<T: batchnorm::Element<Param = T> + WithDType>(
    ours: impl Fn(&Tensor) -> Result<Tensor>,
    params: Option<(&Tensor, &Tensor)>,
    stats: impl Fn() -> Vec<Tensor>,
    shape: &[usize],
    seed: u64,
    mut kernel: impl FnMut(View<'_, T>, &[T], &mut [T], Grads<'_, T>) -> Vec<Vec<T>>,
) -> Result<()> {
    for step in 0..3 {
        let x = tensor(seed + 5 + step, shape, -1.0, 3.0, T::DTYPE)?;
        let w = tensor(seed + 7 + step, shape, -1.0, 1.0, T::DTYPE)?;
        let got = forward_backward(&ours, params, &x, &w)?;
        let mut kernel_stats = Vec::new();
        let want = kernel_step::<T>(&x, &w, |x, dy, y, grads| kernel_stats = kernel(x, dy, y, grads))?;
        let what = format!("{shape:?} {:?} step {step}", T::DTYPE);
        assert_outputs_bits(&what, &got, &want);
        for (k, (a, b)) in stats().iter().zip(kernel_stats).enumerate() {
            assert_bits(
                &format!("{what} statistic {k}"),
                a,
                &Tensor::new(b.as_slice(), x.device())?,
            );
        }
    }
    Ok(())
}

/// Per-channel tensors as vectors of `T` (to copy a layer's parameters into a kernel-crate layer).
pub fn vecs<T: WithDType, const N: usize>(tensors: [&Tensor; N]) -> Result<[Vec<T>; N]> {
    let mut out = Vec::with_capacity(N);
    for t in tensors {
        out.push(t.to_vec1::<T>()?);
    }
    out.try_into()
        .map_err(|_| candle_core::Error::Msg("one vector per tensor".into()))
}
