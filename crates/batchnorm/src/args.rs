//! The small argument structs of the public functions, and the order they take arguments in.
//!
//! Every public function and method of the crate takes its arguments in one order:
//!
//! 1. the communicator, for a collective (synchronized) call;
//! 2. the input tensor as a [`View`] (data, shape, layout), then `dy` (a flat buffer of the same
//!    shape) for a backward pass;
//! 3. statistics: [`crate::SavedStats`] (then [`crate::GradSums`]) or [`FixedStats`];
//! 4. parameters: [`Affine`] (γ, β) or γ alone for a backward pass, then ε (or a momentum);
//! 5. outputs last: `y`, `dx`, or [`Grads`] (dx, dγ, dβ), all written only when every check passed.

use crate::{Element, Layout};

/// A tensor's flat, row-major buffer with its shape and layout: the input of every kernel.
///
/// Argument order of the crate: (communicator,) input view, `dy`, statistics, parameters (γ, β,
/// then ε), outputs (`y`, `dx` or [`Grads`]) last.
///
/// ```
/// use batchnorm::{Layout, View};
/// let x = [1.0f32, 2.0, 3.0, 4.0];
/// let v = View::new(&x, &[2, 2], Layout::NC);
/// assert_eq!(v.geometry().unwrap().per_channel(), 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View<'a, T> {
    /// The elements, in `layout` order.
    pub data: &'a [T],
    /// The dimensions, as the layout orders them (e.g. `[N, C, H, W]` for [`Layout::NCHW`]).
    pub shape: &'a [usize],
    /// Which dimension is the channel dimension.
    pub layout: Layout,
}

impl<'a, T> View<'a, T> {
    /// `data` seen as a tensor of `shape` in `layout` (checked when a function uses it).
    pub fn new(data: &'a [T], shape: &'a [usize], layout: Layout) -> Self {
        View { data, shape, layout }
    }

    /// The shape's `[outer, channels, inner]` view (see [`Layout::geometry`], whose rejections
    /// it shares; the data's length is not checked here).
    pub fn geometry(&self) -> Result<crate::Geometry, crate::Error> {
        self.layout.geometry(self.shape)
    }
}

/// The affine parameters γ (scale) and β (shift), one per channel, in the tensor type's
/// parameter type ([`Element::Param`]: `f32` for `f32`, `bf16` and `f16` tensors). `None` means
/// γ = 1 or β = 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine<'a, T: Element> {
    /// γ, or `None` for γ = 1.
    pub gamma: Option<&'a [T::Param]>,
    /// β, or `None` for β = 0.
    pub beta: Option<&'a [T::Param]>,
}

impl<'a, T: Element> Affine<'a, T> {
    /// No affine transform: γ = 1, β = 0.
    pub const NONE: Self = Affine {
        gamma: None,
        beta: None,
    };

    /// γ and β both given.
    pub fn new(gamma: &'a [T::Param], beta: &'a [T::Param]) -> Self {
        Affine {
            gamma: Some(gamma),
            beta: Some(beta),
        }
    }
}

impl<T: Element> Default for Affine<'_, T> {
    fn default() -> Self {
        Affine::NONE
    }
}

/// Fixed per-channel statistics for inference (Algorithm 2): running or population mean and
/// variance, in the tensor type's parameter type ([`Element::Param`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedStats<'a, T: Element> {
    /// E\[x\] per channel.
    pub mean: &'a [T::Param],
    /// Var\[x\] per channel.
    pub var: &'a [T::Param],
}

impl<'a, T: Element> FixedStats<'a, T> {
    /// Mean and variance, one of each per channel.
    pub fn new(mean: &'a [T::Param], var: &'a [T::Param]) -> Self {
        FixedStats { mean, var }
    }
}

/// The outputs of a backward pass: each one given is written, each `None` is not computed
/// (a pass without `dx` reads x and dy once). dx has the tensor's type, dγ and dβ its parameter
/// type ([`Element::Param`]).
#[derive(Debug)]
pub struct Grads<'a, T: Element> {
    /// ∂ℓ/∂x, the shape of x.
    pub dx: Option<&'a mut [T]>,
    /// ∂ℓ/∂γ, one per channel.
    pub dgamma: Option<&'a mut [T::Param]>,
    /// ∂ℓ/∂β, one per channel.
    pub dbeta: Option<&'a mut [T::Param]>,
}

impl<T: Element> Default for Grads<'_, T> {
    /// No outputs.
    fn default() -> Self {
        Grads {
            dx: None,
            dgamma: None,
            dbeta: None,
        }
    }
}

impl<'a, T: Element> Grads<'a, T> {
    /// dx, dγ and dβ.
    pub fn new(dx: &'a mut [T], dgamma: &'a mut [T::Param], dbeta: &'a mut [T::Param]) -> Self {
        Grads {
            dx: Some(dx),
            dgamma: Some(dgamma),
            dbeta: Some(dbeta),
        }
    }

    /// dx alone.
    pub fn dx(dx: &'a mut [T]) -> Self {
        Grads {
            dx: Some(dx),
            dgamma: None,
            dbeta: None,
        }
    }

    /// dγ and dβ alone.
    pub fn params(dgamma: &'a mut [T::Param], dbeta: &'a mut [T::Param]) -> Self {
        Grads {
            dx: None,
            dgamma: Some(dgamma),
            dbeta: Some(dbeta),
        }
    }
}

/// What a pass covers: the positions `mask` selects (`None`: all of them, +0.0 written at the
/// others) and, with `relu`, the ReLU fused with it (`R`: a forward's [`crate::fused`] part or a
/// backward's).
pub(crate) struct Scope<'a, R> {
    pub mask: Option<&'a [bool]>,
    pub relu: Option<R>,
}

impl<'a, R> Scope<'a, R> {
    /// Every position, no ReLU.
    pub const ALL: Self = Scope { mask: None, relu: None };

    /// The positions `mask` selects, no ReLU.
    pub fn masked(mask: &'a [bool]) -> Self {
        Scope {
            mask: Some(mask),
            relu: None,
        }
    }

    /// Every position, through `relu`.
    pub fn relu(relu: R) -> Self {
        Scope {
            mask: None,
            relu: Some(relu),
        }
    }
}
