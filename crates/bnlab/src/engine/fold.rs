//! Folding inference batch norm into the layers before it, for deployment.
//!
//! At inference a BN layer is one affine map per channel (its running or population statistics,
//! γ and β): y = x·scale + shift. Right after a linear layer (one channel per output) or a
//! convolution (one channel per output map, over all its positions) it merges into that layer's
//! weights, W' = diag(scale)·W, b' = scale·b + shift, so the folded network has no BN layers and
//! computes the same function up to float rounding (the fold is done in f64 and rounded once to
//! f32).

use super::{Layer, Relu, Sequential};
use anyhow::{bail, Context, Result};

/// The network with every batch-norm layer folded into the linear layer or convolution before
/// it, in inference mode (the BN layers' current running statistics, which may be Algorithm 2's
/// population estimate). Other layers are kept as they are; a batch norm fused with its ReLU
/// ([`super::BatchNormLayer::with_relu`]) leaves the ReLU as a layer of its own.
///
/// Rejects a BN layer that does not directly follow a linear layer or a convolution whose output
/// it normalizes (first in the network, after an activation or pooling, or over another number of
/// positions) and a BN layer without running statistics.
pub fn fold_batchnorm(net: Sequential) -> Result<Sequential> {
    let mut out: Vec<Box<dyn Layer>> = Vec::with_capacity(net.layers.len());
    for (i, mut layer) in net.layers.into_iter().enumerate() {
        let Some(bn) = layer.as_batchnorm() else {
            out.push(layer);
            continue;
        };
        let affine = bn
            .inference_affine()
            .with_context(|| format!("cannot fold batch norm layer {i}"))?;
        // The ReLU of a fused layer stays, as a layer of its own.
        let relu = (bn.has_relu()).then(|| Box::new(Relu { size: bn.input_size() }) as Box<dyn Layer>);
        let Some(prev) = out.last_mut() else {
            bail!("cannot fold batch norm layer {i}: no layer before it");
        };
        if let Some(linear) = prev.as_linear() {
            if bn.spatial == 1 {
                linear.fold_batchnorm(&affine)?;
                out.extend(relu);
                continue;
            }
        }
        if let Some(conv) = prev.as_conv() {
            if bn.spatial == conv.out_hw.0 * conv.out_hw.1 {
                conv.fold_batchnorm(&affine)?;
                out.extend(relu);
                continue;
            }
        }
        bail!(
            "cannot fold batch norm layer {i}: it follows {}, not a linear layer or convolution whose output it normalizes",
            prev.name()
        );
    }
    Sequential::new(out)
}
