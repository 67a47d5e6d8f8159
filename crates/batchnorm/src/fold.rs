//! Inference batch norm as one affine map per channel, and folded into the preceding layer.

use crate::check;
use crate::forward::{beta_at, gamma_at};
use crate::stats::inv_std;
use crate::{Affine, Element, Error, FixedStats};

/// Inference batch norm of one channel as y = x·scale + shift, with scale = γ/√(Var + ε) and
/// shift = β − E\[x\]·scale.
///
/// (The layer's own inference pass computes (x − E\[x\])·scale + β instead, which keeps full
/// precision when |E\[x\]| is large against the spread; this form is for folding.)
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceAffine {
    /// Per-channel multiplier.
    pub scale: Vec<f64>,
    /// Per-channel offset.
    pub shift: Vec<f64>,
}

impl InferenceAffine {
    /// Builds the map from fixed statistics and optional γ, β.
    /// Rejects vectors of different lengths and ε not finite and > 0.
    ///
    /// `T` is the type of the tensors the statistics belong to; only its parameter type
    /// ([`Element::Param`]) is read, and no tensor fixes it here, so name it (`f32` for the
    /// parameters of `f32`, `bf16` and `f16` tensors alike: the same map).
    ///
    /// ```
    /// use batchnorm::{Affine, FixedStats, InferenceAffine};
    /// let stats = FixedStats::<f64>::new(&[2.0], &[4.0]);
    /// let a = InferenceAffine::new(stats, Affine::new(&[3.0], &[1.0]), 1e-12).unwrap();
    /// assert!((a.scale[0] - 1.5).abs() < 1e-9 && (a.shift[0] - (1.0 - 3.0)).abs() < 1e-9);
    /// ```
    pub fn new<T: Element>(stats: FixedStats<'_, T>, affine: Affine<'_, T>, eps: f64) -> Result<Self, Error> {
        let (FixedStats { mean, var }, Affine { gamma, beta }) = (stats, affine);
        let channels = mean.len();
        check::channels("var", channels, var.len())?;
        check::affine(channels, gamma, beta)?;
        check::eps(eps)?;
        let scale: Vec<f64> = (0..channels)
            .map(|c| gamma_at(gamma, c) * inv_std(var[c].to_f64(), eps))
            .collect();
        let shift = (0..channels)
            .map(|c| beta_at(beta, c) - mean[c].to_f64() * scale[c])
            .collect();
        Ok(InferenceAffine { scale, shift })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.scale.len()
    }
}

/// Folds inference batch norm into the layer before it: for a linear layer (`weight` `[out, in]`)
/// or a convolution (`weight` `[out, in, kh, kw]`, PyTorch's/candle's OIHW), BN(W·x + b) equals
/// W'·x + b' with W' = diag(scale)·W and b' = scale·b + shift. `weight` is scaled in place; the
/// folded bias is returned (a layer without bias, as usual before BN, passes `None`). Arguments
/// in the crate's order: what is read (the map, the bias), then what is written (the weight).
///
/// Rejects: `weight` whose length is not a multiple of the channel count (or is empty), `bias` of
/// the wrong length.
///
/// ```
/// use batchnorm::{fold_into_preceding, InferenceAffine};
/// let bn = InferenceAffine { scale: vec![2.0], shift: vec![1.0] };
/// let mut w = vec![1.0f32, -1.0]; // one output, two inputs
/// let b = fold_into_preceding(&bn, None, &mut w).unwrap();
/// assert_eq!((w, b), (vec![2.0, -2.0], vec![1.0]));
/// ```
pub fn fold_into_preceding<T: Element>(
    bn: &InferenceAffine,
    bias: Option<&[T]>,
    weight: &mut [T],
) -> Result<Vec<T>, Error> {
    let out = bn.channels();
    check::channels("shift", out, bn.shift.len())?;
    check::preceding_layer(out, weight.len(), bias.map(<[T]>::len))?;
    let per_out = weight.len() / out;
    for (c, row) in weight.chunks_exact_mut(per_out).enumerate() {
        for w in row {
            *w = T::from_f64(w.to_f64() * bn.scale[c]);
        }
    }
    Ok((0..out)
        .map(|c| T::from_f64(bias.map_or(0.0, |b| b[c].to_f64()) * bn.scale[c] + bn.shift[c]))
        .collect())
}
