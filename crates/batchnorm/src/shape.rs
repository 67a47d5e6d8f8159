//! Memory layouts, and the check of a shape against its layout ([`Layout::geometry`]); every other
//! argument check is in `check`.

use crate::Error;

/// How a tensor's dimensions are ordered in its flat, row-major buffer.
///
/// Batch norm needs only one fact about a layout: which dimension is the channel (feature)
/// dimension. Every layout reduces to a three-dimensional view `[outer, channels, inner]`
/// ([`Geometry`]), statistics being taken per channel over `outer × inner` values.
///
/// | layout | shape | statistics per channel over |
/// |---|---|---|
/// | `NC` | `[N, C]` | N |
/// | `NCHW` | `[N, C, H, W]` | N·H·W |
/// | `NHWC` | `[N, H, W, C]` | N·H·W |
/// | `ChannelsFirst` | `[N, C, d1, …, dk]`, k ≥ 0 | N·d1·…·dk |
/// | `ChannelsLast` | `[N, d1, …, dk, C]`, k ≥ 0 | N·d1·…·dk |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Fully connected: `[N, C]`.
    NC,
    /// Convolutional, channels first: `[N, C, H, W]`.
    NCHW,
    /// Convolutional, channels last: `[N, H, W, C]`.
    NHWC,
    /// `[N, C, …]` with any number (≥ 0) of trailing spatial dimensions (e.g. `NCL`, `NCDHW`).
    ChannelsFirst,
    /// `[N, …, C]` with any number (≥ 0) of spatial dimensions between batch and channel.
    ChannelsLast,
}

impl Layout {
    /// The layout's name as written in the docs and benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            Layout::NC => "NC",
            Layout::NCHW => "NCHW",
            Layout::NHWC => "NHWC",
            Layout::ChannelsFirst => "ChannelsFirst",
            Layout::ChannelsLast => "ChannelsLast",
        }
    }

    /// Checks `shape` against the layout and returns its `[outer, channels, inner]` view.
    ///
    /// Rejects: a rank the layout does not allow ([`Error::RankMismatch`]), a zero dimension
    /// ([`Error::EmptyInput`]), an element count that overflows ([`Error::ShapeOverflow`]).
    ///
    /// ```
    /// use batchnorm::{Geometry, Layout};
    /// let g = Layout::NHWC.geometry(&[8, 4, 4, 3]).unwrap();
    /// assert_eq!(g, Geometry { outer: 8 * 4 * 4, channels: 3, inner: 1 });
    /// ```
    pub fn geometry(self, shape: &[usize]) -> Result<Geometry, Error> {
        let rank_ok = match self {
            Layout::NC => shape.len() == 2,
            Layout::NCHW | Layout::NHWC => shape.len() == 4,
            Layout::ChannelsFirst | Layout::ChannelsLast => shape.len() >= 2,
        };
        if !rank_ok {
            let expected = match self {
                Layout::NC => "2",
                Layout::NCHW | Layout::NHWC => "4",
                _ => "at least 2",
            };
            return Err(Error::RankMismatch {
                layout: self.name(),
                expected,
                shape: shape.to_vec(),
            });
        }
        if shape.contains(&0) {
            return Err(Error::EmptyInput { shape: shape.to_vec() });
        }
        let product = |dims: &[usize]| dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let overflow = || Error::ShapeOverflow { shape: shape.to_vec() };
        product(shape).ok_or_else(overflow)?;
        let g = match self {
            Layout::NC | Layout::NCHW | Layout::ChannelsFirst => Geometry {
                outer: shape[0],
                channels: shape[1],
                inner: product(&shape[2..]).ok_or_else(overflow)?,
            },
            Layout::NHWC | Layout::ChannelsLast => Geometry {
                outer: product(&shape[..shape.len() - 1]).ok_or_else(overflow)?,
                channels: shape[shape.len() - 1],
                inner: 1,
            },
        };
        Ok(g)
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor seen as `[outer, channels, inner]`: element `(o, c, i)` is at `(o·channels + c)·inner + i`.
///
/// Channels-first layouts have `inner` = the spatial size (contiguous planes, one per `(n, c)`);
/// channels-last layouts and `NC` have `inner = 1` (contiguous rows of `channels` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Product of the dimensions before the channel dimension (and, for channels-last, the spatial ones).
    pub outer: usize,
    /// Number of channels (features), each with its own statistics, γ and β.
    pub channels: usize,
    /// Product of the dimensions after the channel dimension.
    pub inner: usize,
}

impl Geometry {
    /// Total number of elements.
    pub fn len(&self) -> usize {
        self.outer * self.channels * self.inner
    }

    /// Always false: a checked geometry has no zero dimension. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per channel (`m` in the paper): `outer × inner`.
    pub fn per_channel(&self) -> usize {
        self.outer * self.inner
    }
}
