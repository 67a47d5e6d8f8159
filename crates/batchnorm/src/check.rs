//! Every argument check of the crate, each written once.
//!
//! A public function runs its checks first, before it computes or writes anything, and returns
//! the first one that fails; so on error its outputs (and a layer's state) are untouched. Which
//! checks a function runs, and in which order, is listed in its "Rejects" docs. The shape itself
//! (rank, zero dimensions, overflow) is checked by [`Layout::geometry`]; everything else is here.

use crate::{BatchStats, Element, Error, Geometry, GradSums, Layout, Momentum, SavedStats};

/// Checks `x` against a shape in a layout and returns the geometry: the shape as
/// [`Layout::geometry`] checks it, then `x`'s length ([`Error::BufferLength`] named `name`).
pub(crate) fn input<T>(name: &'static str, x: &[T], shape: &[usize], layout: Layout) -> Result<Geometry, Error> {
    let g = layout.geometry(shape)?;
    len(name, &g, x.len())?;
    Ok(g)
}

/// Checks `x` against a shape in a layout (as [`input`]), then the length of the buffer the pass
/// pairs it with (`y` or `dy`, named `name`), then the optional mask over positions (as
/// [`mask`]); returns the geometry and the number of values per channel the mask selects.
pub(crate) fn input_pair<T, U>(
    x: &[T],
    shape: &[usize],
    layout: Layout,
    (name, other): (&'static str, &[U]),
    mask: Option<&[bool]>,
) -> Result<(Geometry, u64), Error> {
    let g = input("x", x, shape, layout)?;
    len(name, &g, other.len())?;
    let count = self::mask(&g, mask)?;
    Ok((g, count))
}

/// Checks that a flat buffer holds exactly `g.len()` elements ([`Error::BufferLength`]).
pub(crate) fn len(name: &'static str, g: &Geometry, actual: usize) -> Result<(), Error> {
    if actual != g.len() {
        return Err(Error::BufferLength {
            name,
            expected: g.len(),
            actual,
        });
    }
    Ok(())
}

/// Checks an optional output buffer's length, when it is given.
pub(crate) fn len_opt<T>(name: &'static str, g: &Geometry, buf: Option<&[T]>) -> Result<(), Error> {
    buf.map_or(Ok(()), |b| len(name, g, b.len()))
}

/// Checks that a per-channel vector has one entry per channel ([`Error::FeatureMismatch`]).
pub(crate) fn channels(name: &'static str, channels: usize, actual: usize) -> Result<(), Error> {
    if actual != channels {
        return Err(Error::FeatureMismatch {
            name,
            expected: channels,
            actual,
        });
    }
    Ok(())
}

/// Checks ε: finite and > 0 ([`Error::InvalidEps`]).
pub(crate) fn eps(eps: f64) -> Result<(), Error> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::InvalidEps(eps));
    }
    Ok(())
}

/// Checks a momentum: an exponential one must be finite and in (0, 1] ([`Error::InvalidMomentum`]).
pub(crate) fn momentum(momentum: Momentum) -> Result<(), Error> {
    match momentum {
        Momentum::Exponential(m) if !(m.is_finite() && m > 0.0 && m <= 1.0) => Err(Error::InvalidMomentum(m)),
        _ => Ok(()),
    }
}

/// Checks optional γ and β against the channel count (named `gamma`, `beta`).
pub(crate) fn affine<T>(channels: usize, gamma: Option<&[T]>, beta: Option<&[T]>) -> Result<(), Error> {
    optional_per_channel(channels, [("gamma", gamma), ("beta", beta)])
}

/// Checks the optional parameter-gradient outputs against the channel count (named `dgamma`,
/// `dbeta`).
pub(crate) fn param_grads<T>(channels: usize, dgamma: Option<&[T]>, dbeta: Option<&[T]>) -> Result<(), Error> {
    optional_per_channel(channels, [("dgamma", dgamma), ("dbeta", dbeta)])
}

/// Checks each given per-channel slice against the channel count, in order, by its name.
fn optional_per_channel<T>(channels: usize, named: [(&'static str, Option<&[T]>); 2]) -> Result<(), Error> {
    for (name, v) in named {
        if let Some(v) = v {
            self::channels(name, channels, v.len())?;
        }
    }
    Ok(())
}

/// Checks fixed (inference) statistics against the channel count (named `mean`, `var`).
pub(crate) fn fixed_stats<T>(channels: usize, mean: &[T], var: &[T]) -> Result<(), Error> {
    self::channels("mean", channels, mean.len())?;
    self::channels("var", channels, var.len())
}

/// Checks saved statistics against the channel count (named `saved.mean`, `saved.inv_std`).
pub(crate) fn saved(saved: &SavedStats, channels: usize) -> Result<(), Error> {
    self::channels("saved.mean", channels, saved.mean.len())?;
    self::channels("saved.inv_std", channels, saved.inv_std.len())
}

/// Checks that batch statistics' `mean` and `m2` agree in length (the fields are public).
pub(crate) fn batch_stats(stats: &BatchStats) -> Result<(), Error> {
    channels("m2", stats.mean.len(), stats.m2.len())
}

/// Checks that gradient sums' two vectors agree in length (the fields are public).
pub(crate) fn grad_sums(sums: &GradSums) -> Result<(), Error> {
    channels("sum_dy_xhat", sums.sum_dy.len(), sums.sum_dy_xhat.len())
}

/// Checks gradient sums against the channel count (both vectors named `sums`).
pub(crate) fn grad_sums_channels(sums: &GradSums, channels: usize) -> Result<(), Error> {
    self::channels("sums", channels, sums.sum_dy.len())?;
    self::channels("sums", channels, sums.sum_dy_xhat.len())
}

/// Checks that training statistics rest on at least two values per channel (Algorithm 1's
/// variance needs them; PyTorch's rule): [`Error::TooFewValues`] with `count` and `shape`.
pub(crate) fn training_count(count: u64, shape: &[usize]) -> Result<(), Error> {
    if count < 2 {
        return Err(Error::TooFewValues {
            count,
            shape: shape.to_vec(),
        });
    }
    Ok(())
}

/// Checks that an input in `layout` of `shape` has a layer's `num_features` channels (named
/// `input`), after the shape itself.
pub(crate) fn layer_input(num_features: usize, shape: &[usize], layout: Layout) -> Result<Geometry, Error> {
    let g = layout.geometry(shape)?;
    channels("input", num_features, g.channels)?;
    Ok(g)
}

/// Checks what a layer's running-statistics update could reject, before anything is written:
/// the momentum, then the running vectors' lengths against `num_features`.
pub(crate) fn running_update<T: Element>(
    momentum: Momentum,
    num_features: usize,
    running_mean: &[T],
    running_var: &[T],
) -> Result<(), Error> {
    self::momentum(momentum)?;
    running_stats(num_features, running_mean, running_var)
}

/// Checks running statistics against the channel count (named `running_mean`, `running_var`).
pub(crate) fn running_stats<T>(channels: usize, running_mean: &[T], running_var: &[T]) -> Result<(), Error> {
    self::channels("running_mean", channels, running_mean.len())?;
    self::channels("running_var", channels, running_var.len())
}

/// Checks a preceding layer for folding into `out` channels: a non-empty `weight` whose length is
/// a multiple of `out` ([`Error::BufferLength`]), then the bias's length (named `bias`).
pub(crate) fn preceding_layer(out: usize, weight: usize, bias: Option<usize>) -> Result<(), Error> {
    if out == 0 || weight == 0 || !weight.is_multiple_of(out) {
        return Err(Error::BufferLength {
            name: "weight",
            expected: out.max(1) * (weight / out.max(1)).max(1),
            actual: weight,
        });
    }
    bias.map_or(Ok(()), |b| channels("bias", out, b))
}

/// Checks a batch-renormalization limit pair: `r_max` finite and ≥ 1, then `d_max` finite and
/// ≥ 0 ([`Error::InvalidRenormLimit`] with the names given).
pub(crate) fn renorm_limits(r_name: &'static str, r_max: f64, d_name: &'static str, d_max: f64) -> Result<(), Error> {
    if !(r_max.is_finite() && r_max >= 1.0) {
        return Err(Error::InvalidRenormLimit {
            name: r_name,
            bound: "≥ 1",
            value: r_max,
        });
    }
    if !(d_max.is_finite() && d_max >= 0.0) {
        return Err(Error::InvalidRenormLimit {
            name: d_name,
            bound: "≥ 0",
            value: d_max,
        });
    }
    Ok(())
}

/// Checks that a batch-renormalization schedule's warmup plus each ramp fits in a `u64` step
/// counter ([`Error::InvalidRenormSchedule`], naming the ramp).
pub(crate) fn renorm_ramps(warmup_steps: u64, r_ramp_steps: u64, d_ramp_steps: u64) -> Result<(), Error> {
    for (name, ramp) in [("r_ramp_steps", r_ramp_steps), ("d_ramp_steps", d_ramp_steps)] {
        if warmup_steps.checked_add(ramp).is_none() {
            return Err(Error::InvalidRenormSchedule {
                reason: format!("warmup_steps {warmup_steps} + {name} {ramp} overflows u64"),
            });
        }
    }
    Ok(())
}

/// Checks that a batch-renormalization layer can take one more step and returns the next step
/// count ([`Error::InvalidRenormSchedule`] at `u64::MAX`).
pub(crate) fn renorm_next_step(steps: u64) -> Result<u64, Error> {
    steps.checked_add(1).ok_or_else(|| Error::InvalidRenormSchedule {
        reason: "the step counter is at u64::MAX".into(),
    })
}

/// Checks a batch-renormalization update rate α: finite and in (0, 1] ([`Error::InvalidMomentum`]).
pub(crate) fn renorm_momentum(alpha: f64) -> Result<(), Error> {
    momentum(Momentum::Exponential(alpha))
}

/// Checks batch-renormalization moving statistics against the channel count (named
/// `moving_mean`, `moving_std`).
pub(crate) fn moving_stats<T>(channels: usize, moving_mean: &[T], moving_std: &[T]) -> Result<(), Error> {
    self::channels("moving_mean", channels, moving_mean.len())?;
    self::channels("moving_std", channels, moving_std.len())
}

/// Checks what a batch-renormalization backward needs from its forward: the saved statistics
/// and the per-channel r and d (named `saved.r`, `saved.d`) against the channel count.
pub(crate) fn renorm_saved(saved: &crate::RenormSaved, channels: usize) -> Result<(), Error> {
    self::saved(&saved.stats, channels)?;
    self::channels("saved.r", channels, saved.r.len())?;
    self::channels("saved.d", channels, saved.d.len())
}

/// Checks a ghost batch norm virtual batch size: at least 2 examples ([`Error::InvalidVirtualBatch`]).
pub(crate) fn virtual_batch(virtual_batch: usize) -> Result<(), Error> {
    if virtual_batch < 2 {
        return Err(Error::InvalidVirtualBatch(virtual_batch));
    }
    Ok(())
}

/// Checks that saved ghost statistics hold as many groups as the input makes
/// ([`Error::GhostGroupsMismatch`]).
pub(crate) fn ghost_groups(expected: usize, actual: usize) -> Result<(), Error> {
    if expected != actual {
        return Err(Error::GhostGroupsMismatch { expected, actual });
    }
    Ok(())
}

/// Checks an optional mask over positions (one `bool` per value of a channel, see
/// [`crate::batch_norm_train_masked`]): `g.per_channel()` entries ([`Error::BufferLength`] named
/// `mask`). Returns the number of values per channel it selects: its entries that are true, or
/// all `g.per_channel()` values without a mask.
pub(crate) fn mask(g: &Geometry, mask: Option<&[bool]>) -> Result<u64, Error> {
    let Some(mask) = mask else {
        return Ok(g.per_channel() as u64);
    };
    if mask.len() != g.per_channel() {
        return Err(Error::BufferLength {
            name: "mask",
            expected: g.per_channel(),
            actual: mask.len(),
        });
    }
    Ok(mask.iter().filter(|&&on| on).count() as u64)
}

/// Checks that a fused backward's ReLU mask was written for the input's geometry `g`
/// ([`Error::ReluMaskMismatch`]).
pub(crate) fn relu_mask(mask: &crate::ReluMask, g: &Geometry) -> Result<(), Error> {
    if mask.geometry() != Some(*g) {
        return Err(Error::ReluMaskMismatch {
            expected: *g,
            actual: mask.geometry(),
        });
    }
    Ok(())
}
