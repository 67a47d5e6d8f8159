//! The training engine: explicit forward/backward over flat `f32` buffers, one file per layer.
//!
//! A [`Layer`] maps a batch `[batch, input_size]` to `[batch, output_size]` (per-example sizes are
//! fixed at construction; convolutional layers flatten `[C, H, W]` per example). [`Sequential`]
//! chains layers, keeps every activation for backward, and hands the parameters to the optimizer.
//!
//! There is no `Flatten` layer: activations are already flat `[batch, features]` buffers (a conv
//! block's output `[batch, C, H, W]` in NCHW is the same memory as `[batch, C·H·W]`), so a linear
//! layer after a conv or pooling layer simply takes `C·H·W` inputs; [`Sequential::new`] checks
//! that the sizes connect.
//! [`checkpoint`] saves and restores a network, its optimizer and the run's progress (safetensors);
//! [`fold`] folds inference batch norm into the linear layers before it; [`mask`] has the position
//! mask of padded sequences and the layers that respect it.

pub mod activation;
pub mod batchnorm;
pub mod checkpoint;
pub mod conv;
pub mod dropout;
pub mod fold;
pub mod gemm;
pub mod linear;
pub mod loss;
pub mod lrn;
pub mod mask;
pub mod optimizer;
pub mod pool;
pub mod schedule;
mod simd;
pub mod state;

pub use activation::{Relu, Sigmoid};
pub use batchnorm::{BatchNormLayer, BnVariant};
pub use conv::{Conv2d, ConvInit};
pub use dropout::Dropout;
pub use linear::Linear;
pub use loss::SoftmaxCrossEntropy;
pub use lrn::Lrn;
pub use mask::{MaskedMeanPool, PositionMask, ZeroMasked};
pub use optimizer::Sgd;
pub use pool::MaxPool2d;
pub use schedule::LrSchedule;
pub use state::{State, StateValue};

use anyhow::{bail, ensure, Result};

/// What a forward pass is for. What each mode does in each batch-norm variant (frozen, renorm) is
/// in [`batchnorm`]'s module docs; below is plain batch norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Training: batch statistics, running statistics updated, dropout active.
    Train,
    /// Inference: fixed (running or population) statistics.
    Eval,
    /// Algorithm 2: batch statistics as in training, accumulated into each BN layer's population
    /// estimate; running statistics and parameters untouched.
    Collect,
}

/// A learnable tensor and its gradient, as the optimizer sees it.
pub struct Param<'a> {
    /// Name within its layer (`weight`, `bias`, `gamma`, `beta`).
    pub name: &'static str,
    /// The values.
    pub value: &'a mut [f32],
    /// ∂loss/∂value from the last backward.
    pub grad: &'a [f32],
    /// Whether weight decay applies (weights yes; biases and BN parameters no).
    pub decay: bool,
}

/// The parameters of a layer with a weight (decayed) and an optional bias (not decayed), in that
/// order: what [`Linear`] and [`Conv2d`] give the optimizer.
fn weight_and_bias<'a>(
    weight: &'a mut [f32],
    grad_weight: &'a [f32],
    bias: Option<&'a mut Vec<f32>>,
    grad_bias: &'a [f32],
) -> Vec<Param<'a>> {
    let mut p = vec![Param {
        name: "weight",
        value: weight,
        grad: grad_weight,
        decay: true,
    }];
    if let Some(b) = bias {
        p.push(Param {
            name: "bias",
            value: b,
            grad: grad_bias,
            decay: false,
        });
    }
    p
}

/// Folds inference batch norm over the `outputs` outputs of a [`Linear`] or [`Conv2d`] layer into
/// its `weight` (rows by output) and `bias` (zero when `None`; afterwards `Some`), and sizes its
/// `grad_bias`. Rejects a map over another channel count, naming the layer as `layer` with
/// `outputs` `unit`.
fn fold_batchnorm_into(
    bn: &::batchnorm::InferenceAffine,
    (weight, bias, grad_bias): (&mut [f32], &mut Option<Vec<f32>>, &mut Vec<f32>),
    outputs: usize,
    (layer, unit): (&str, &str),
) -> Result<()> {
    ensure!(
        bn.channels() == outputs,
        "cannot fold batch norm over {} channels into {layer} with {outputs} {unit}",
        bn.channels(),
    );
    *bias = Some(::batchnorm::fold_into_preceding(bn, bias.as_deref(), weight)?);
    *grad_bias = vec![0.0; outputs];
    Ok(())
}

/// One layer with explicit forward and backward.
pub trait Layer: Send {
    /// A short name for reports and checkpoints.
    fn name(&self) -> String;
    /// Features per example in.
    fn input_size(&self) -> usize;
    /// Features per example out: by default [`Layer::input_size`] (a layer that keeps the shape;
    /// [`Sequential::new`] rejects a network whose sizes do not connect).
    fn output_size(&self) -> usize {
        self.input_size()
    }
    /// y `[batch, output_size]` from x `[batch, input_size]`.
    fn forward(&mut self, x: &[f32], batch: usize, y: &mut [f32], mode: Mode) -> Result<()>;
    /// Parameter gradients (stored in the layer) and, when asked, dx, from x, y and dy.
    fn backward(&mut self, x: &[f32], y: &[f32], dy: &[f32], batch: usize, dx: Option<&mut [f32]>) -> Result<()>;
    /// Learnable parameters with their gradients.
    fn params(&mut self) -> Vec<Param<'_>>;
    /// This layer as batch norm, if it is one.
    fn as_batchnorm(&mut self) -> Option<&mut BatchNormLayer> {
        None
    }
    /// This layer as a fully connected layer, if it is one (for folding batch norm into it).
    fn as_linear(&mut self) -> Option<&mut Linear> {
        None
    }
    /// This layer as a convolution, if it is one (for folding batch norm into it).
    fn as_conv(&mut self) -> Option<&mut Conv2d> {
        None
    }
    /// The layers this one computes after its own transform, fused into its passes, by name (a
    /// batch norm made with [`BatchNormLayer::with_relu`]: `relu`); none by default. A
    /// checkpoint's architecture lists each after this layer as a layer of its own without
    /// parameters or state, so that a fused network and the unfused one have the same
    /// checkpoints.
    fn fused_layers(&self) -> Vec<String> {
        Vec::new()
    }
    /// Settings beyond the layer's name and sizes that its checkpoint state depends on (e.g. batch
    /// renorm's schedule), written into a checkpoint's architecture description so that a
    /// checkpoint of other settings is refused; none by default.
    fn settings(&self) -> Option<String> {
        None
    }
    /// Receives the position mask of the batch of the next forward pass ([`Sequential::set_mask`]);
    /// layers that do not mask ignore it (the default).
    fn set_mask(&mut self, mask: &PositionMask) {
        let _ = mask;
    }
    /// Non-learnable state a checkpoint must keep to continue training exactly (running
    /// statistics, generator positions); none by default.
    fn state(&self) -> Vec<State> {
        Vec::new()
    }
    /// Restores one tensor that [`Layer::state`] names. The checkpoint loader has already checked
    /// the element type and length against [`Layer::state`]; a layer rejects a name it does not have.
    fn set_state(&mut self, name: &str, value: StateValue) -> Result<()> {
        let _ = value;
        bail!("layer {} has no state named `{name}`", self.name())
    }
}

/// Layers applied in order, with the activations kept for backward.
pub struct Sequential {
    /// The layers.
    pub layers: Vec<Box<dyn Layer>>,
    input: Vec<f32>,
    acts: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    batch: usize,
}

impl Sequential {
    /// Chains `layers`; rejects layers whose sizes do not connect.
    pub fn new(layers: Vec<Box<dyn Layer>>) -> Result<Self> {
        ensure!(!layers.is_empty(), "a network needs at least one layer");
        for w in layers.windows(2) {
            ensure!(
                w[0].output_size() == w[1].input_size(),
                "layer {} gives {} features but {} takes {}",
                w[0].name(),
                w[0].output_size(),
                w[1].name(),
                w[1].input_size()
            );
        }
        let n = layers.len();
        Ok(Sequential {
            layers,
            input: Vec::new(),
            acts: vec![Vec::new(); n],
            grads: vec![Vec::new(); n],
            batch: 0,
        })
    }

    /// Features per example of the input.
    pub fn input_size(&self) -> usize {
        self.layers[0].input_size()
    }

    /// Features per example of the output.
    pub fn output_size(&self) -> usize {
        self.layers[self.layers.len() - 1].output_size()
    }

    /// Runs the layers on x `[batch, input_size]`; returns the output `[batch, output_size]`.
    pub fn forward(&mut self, x: &[f32], batch: usize, mode: Mode) -> Result<&[f32]> {
        ensure!(
            batch > 0 && x.len() == batch * self.input_size(),
            "input has {} values, expected {batch}×{}",
            x.len(),
            self.input_size()
        );
        self.batch = batch;
        self.input.clear();
        self.input.extend_from_slice(x);
        for i in 0..self.layers.len() {
            let out = batch * self.layers[i].output_size();
            let mut y = std::mem::take(&mut self.acts[i]);
            y.resize(out, 0.0);
            let x = if i == 0 { &self.input } else { &self.acts[i - 1] };
            let r = self.layers[i].forward(x, batch, &mut y, mode);
            self.acts[i] = y;
            r?;
        }
        Ok(self.acts.last().map(|v| v.as_slice()).unwrap_or(&[]))
    }

    /// Backward from d(loss)/d(output) of the last forward; fills every layer's parameter gradients.
    pub fn backward(&mut self, doutput: &[f32]) -> Result<()> {
        let n = self.layers.len();
        ensure!(
            doutput.len() == self.acts[n - 1].len(),
            "output gradient has the wrong length"
        );
        for i in (0..n).rev() {
            let dy = if i == n - 1 {
                doutput.to_vec()
            } else {
                std::mem::take(&mut self.grads[i])
            };
            let mut dx = if i > 0 {
                std::mem::take(&mut self.grads[i - 1])
            } else {
                Vec::new()
            };
            if i > 0 {
                dx.resize(self.batch * self.layers[i].input_size(), 0.0);
            }
            let x = if i == 0 { &self.input } else { &self.acts[i - 1] };
            let dxo = if i > 0 { Some(dx.as_mut_slice()) } else { None };
            let r = self.layers[i].backward(x, &self.acts[i], &dy, self.batch, dxo);
            if i > 0 {
                self.grads[i - 1] = dx;
            }
            if i < n - 1 {
                self.grads[i] = dy;
            }
            r?;
        }
        Ok(())
    }

    /// The output of layer `i` in the last forward pass (`[batch, output_size_i]`).
    pub fn activation(&self, i: usize) -> &[f32] {
        &self.acts[i]
    }

    /// The input of layer `i` in the last forward pass.
    pub fn layer_input(&self, i: usize) -> &[f32] {
        if i == 0 {
            &self.input
        } else {
            &self.acts[i - 1]
        }
    }

    /// Batch size of the last forward pass.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Every parameter of every layer, in layer order.
    pub fn params(&mut self) -> Vec<Param<'_>> {
        self.layers.iter_mut().flat_map(|l| l.params()).collect()
    }

    /// Hands every layer the position mask of the batch of the next forward pass (see [`mask`]):
    /// the masked layers use it in that forward and its backward.
    pub fn set_mask(&mut self, mask: &PositionMask) {
        self.layers.iter_mut().for_each(|l| l.set_mask(mask));
    }

    /// The batch-norm layers, in order.
    pub fn batchnorms(&mut self) -> Vec<&mut BatchNormLayer> {
        self.layers.iter_mut().filter_map(|l| l.as_batchnorm()).collect()
    }
}
