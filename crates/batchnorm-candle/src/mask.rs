//! The mask of a masked forward: which batch and spatial positions of an input enter the
//! statistics.

use std::sync::OnceLock;

use candle_core::{DType, Result, Tensor};

use crate::ops::MaskBits;

/// A checked mask for an input `x` of shape `[N, C, d1, …, dk]`: one entry per example and
/// position, `[N, d1, …, dk]` (`[N]` for `[N, C]`), shared by the channels; nonzero means the
/// position is valid. Held as `u8` 0/1 on the input's device, and as `bool`s on the host once
/// they are asked for (the fused kernels and the valid count need them).
pub(crate) struct Mask {
    on: Tensor,
    bits: OnceLock<MaskBits>,
}

impl Mask {
    /// Checks `mask` against `x`: its shape, an integer dtype (`u8`, `u32`, `i64`), the device.
    pub(crate) fn new(mask: &Tensor, x: &Tensor) -> Result<Mask> {
        let mut want = vec![x.dim(0)?];
        want.extend_from_slice(&x.dims()[2..]);
        if mask.dims() != want.as_slice() {
            candle_core::bail!(
                "batch-norm mask has shape {:?}, an input of shape {:?} needs {want:?} (one entry per example and position, shared by the channels)",
                mask.dims(),
                x.dims()
            )
        }
        if !matches!(mask.dtype(), DType::U8 | DType::U32 | DType::I64) {
            candle_core::bail!(
                "batch-norm mask must have an integer dtype (u8, u32 or i64; nonzero = valid), got {:?}",
                mask.dtype()
            )
        }
        if !mask.device().same_device(x.device()) {
            candle_core::bail!(
                "batch-norm mask is on {:?}, the input on {:?}",
                mask.device().location(),
                x.device().location()
            )
        }
        Ok(Mask {
            on: mask.ne(0u32)?,
            bits: OnceLock::new(),
        })
    }

    /// One `bool` per value of a channel, row-major over `[N, d1, …, dk]` (the kernels' layout),
    /// on the host (copied from the device once).
    pub(crate) fn bits(&self) -> Result<MaskBits> {
        if let Some(bits) = self.bits.get() {
            return Ok(bits.clone());
        }
        let bits: MaskBits = self
            .on
            .flatten_all()?
            .to_vec1::<u8>()?
            .into_iter()
            .map(|b| b != 0)
            .collect();
        Ok(self.bits.get_or_init(|| bits).clone())
    }

    /// The number of valid positions (values per channel that enter the statistics).
    pub(crate) fn count(&self) -> Result<usize> {
        Ok(self.bits()?.iter().filter(|&&on| on).count())
    }

    /// The mask broadcast over the channels of `x`: `[N, C, d1, …, dk]`, `u8`.
    pub(crate) fn broadcast(&self, x: &Tensor) -> Result<Tensor> {
        self.on.unsqueeze(1)?.broadcast_as(x.shape())
    }
}
