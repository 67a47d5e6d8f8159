//! Shared helpers: deterministic data, paired modules (ours and candle-nn's on equal variables),
//! and a scaled error measure.
#![allow(dead_code)]

use batchnorm_candle::BatchNormConfig;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

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
    let mut init = vec![
        ("running_mean", tensor(seed, &[c], -0.2, 0.2, dtype)?),
        ("running_var", tensor(seed + 1, &[c], 0.5, 1.5, dtype)?),
    ];
    if config.affine {
        init.push(("weight", tensor(seed + 2, &[c], 0.5, 1.5, dtype)?));
        init.push(("bias", tensor(seed + 3, &[c], -0.5, 0.5, dtype)?));
    }
    for vm in [&ours_vm, &theirs_vm] {
        let mut vm = vm.clone();
        for (name, t) in &init {
            vm.set_one(name, t)?;
        }
    }
    Ok(Pair {
        ours,
        theirs,
        ours_vm,
        theirs_vm,
    })
}
