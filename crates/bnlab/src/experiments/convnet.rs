//! The small conv net of `accelerate` and `small-batch`, built from what a study varies in it.
//!
//! ```text
//! The network (per example; C1, C2 = `channels`, H = `hidden`; [·] = only in some variants):
//!   x [1, rows, cols]
//!   conv 5×5 pad 2 → [C1, rows, cols] → [norm] → ReLU|sigmoid → maxpool 2×2/2 → [LRN]
//!   conv 5×5 pad 2 → [C2, rows/2, cols/2] → [norm] → ReLU|sigmoid → maxpool 2×2/2 → [LRN]
//!   flatten (a no-op: the engine's buffers are already [batch, C2·h·w], NCHW per example)
//!   [dropout] → linear C2·h·w → H → [norm] → ReLU|sigmoid → [dropout] → linear H → classes
//! ```
//! Layers followed by a normalization have no bias (its β replaces it); a normalization followed
//! by a ReLU is one layer, the two fused ([`BatchNormLayer::with_relu`]). Conv weights are
//! He-initialised, linear weights from N(0, 2/fan_in), all drawn in layer order from one generator
//! seeded with the run's seed, so every variant of a study starts from the same weights.

use crate::engine::{
    BatchNormLayer, Conv2d, ConvInit, Dropout, Layer, Linear, Lrn, MaxPool2d, Relu, Sequential, Sigmoid,
};
use anyhow::{ensure, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// What a study chooses of the conv net.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvNet {
    /// Output channels of the two conv layers.
    pub channels: [usize; 2],
    /// Width of the hidden linear layer.
    pub hidden: usize,
    /// Sigmoid instead of ReLU.
    pub sigmoid: bool,
    /// Drop probability of a dropout layer before each linear layer (`None`: no dropout).
    pub dropout: Option<f32>,
    /// LRN after each pooling.
    pub lrn: bool,
}

/// The normalization a net puts after each conv layer and the hidden linear layer: `None` for
/// none, or a function giving the layer for `(channels, spatial)` (spatial = positions per
/// channel, 1 for the linear layer).
pub type Norm<'a> = Option<&'a dyn Fn(usize, usize) -> Result<BatchNormLayer>>;

impl ConvNet {
    /// The net for `[1, rows, cols]` images and `classes` classes, with `norm` after each conv and
    /// the hidden linear layer, weights drawn from `seed`; dropout layers (if any) draw their masks
    /// from `dropout_seed(k)` for the k-th of them (1, 2).
    pub fn build(
        &self,
        rows: usize,
        cols: usize,
        classes: usize,
        seed: u64,
        norm: Norm<'_>,
        dropout_seed: impl Fn(u64) -> u64,
    ) -> Result<Sequential> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut layers: Vec<Box<dyn Layer>> = Vec::new();
        let act = |size: usize| -> Box<dyn Layer> {
            match self.sigmoid {
                true => Box::new(Sigmoid { size }),
                false => Box::new(Relu { size }),
            }
        };
        let (mut c, mut h, mut w) = (1usize, rows, cols);
        for (i, &out_c) in self.channels.iter().enumerate() {
            let conv = Conv2d::new(c, out_c, h, w, (5, 5), 1, 2, norm.is_none(), ConvInit::He, &mut rng)?;
            (h, w) = conv.out_hw;
            layers.push(Box::new(conv));
            match norm {
                Some(norm) => layers.extend(self.norm_act(norm(out_c, h * w)?)),
                None => layers.push(act(out_c * h * w)),
            }
            let pool = MaxPool2d::new(out_c, h, w, 2, 2)
                .map_err(|e| anyhow::anyhow!("{rows}×{cols} images are too small for conv block {}: {e}", i + 1))?;
            (h, w) = pool.out_hw;
            layers.push(Box::new(pool));
            if self.lrn {
                layers.push(Box::new(Lrn::alexnet(out_c, h * w)));
            }
            c = out_c;
        }
        // Flatten: nothing to do, the buffer is [batch, c·h·w] already.
        let features = c * h * w;
        if let Some(p) = self.dropout {
            layers.push(Box::new(Dropout::new(features, p, dropout_seed(1))?));
        }
        let he = |fan_in: usize| (2.0 / fan_in as f32).sqrt();
        layers.push(Box::new(Linear::new(
            features,
            self.hidden,
            norm.is_none(),
            he(features),
            &mut rng,
        )));
        match norm {
            Some(norm) => layers.extend(self.norm_act(norm(self.hidden, 1)?)),
            None => layers.push(act(self.hidden)),
        }
        if let Some(p) = self.dropout {
            layers.push(Box::new(Dropout::new(self.hidden, p, dropout_seed(2))?));
        }
        layers.push(Box::new(Linear::new(
            self.hidden,
            classes,
            true,
            he(self.hidden),
            &mut rng,
        )));
        Sequential::new(layers)
    }

    /// A normalization layer and the activation after it: one layer, batch norm fused with its
    /// ReLU ([`BatchNormLayer::with_relu`], the same bits and checkpoints as the pair), or the
    /// layer and a sigmoid.
    fn norm_act(&self, norm: BatchNormLayer) -> Vec<Box<dyn Layer>> {
        match self.sigmoid {
            true => {
                let size = norm.input_size();
                vec![Box::new(norm), Box::new(Sigmoid { size })]
            }
            false => vec![Box::new(norm.with_relu())],
        }
    }

    /// An upper estimate of the bytes one network's training on batches of `batch` and
    /// evaluation in chunks of `eval_chunk` allocate for `[1, rows, cols]` images and `classes`
    /// classes: the weights with their gradients, momentum and all-reduce buffer; every layer's
    /// output for an evaluation chunk and, with its gradient, for a training batch; and the
    /// convolutions' unfolded inputs (im2col) for either (f32).
    pub fn memory_estimate(&self, rows: usize, cols: usize, classes: usize, batch: usize, eval_chunk: usize) -> u64 {
        let (c1, c2) = (self.channels[0] as u64, self.channels[1] as u64);
        let (hidden, classes) = (self.hidden as u64, classes as u64);
        let hw = (rows * cols) as u64;
        let features = c2 * (hw / 16);
        let params = 25 * c1 + 25 * c1 * c2 + features * hidden + hidden * classes + 4 * (c1 + c2 + hidden) + classes;
        // conv, BN, activation at full size, pool and LRN at a quarter, per block; then the head.
        let outputs =
            3 * c1 * hw + 2 * c1 * (hw / 4) + 3 * c2 * (hw / 4) + 2 * c2 * (hw / 16) + features + 4 * hidden + classes;
        let unfolded = 25 * hw + 25 * c1 * (hw / 4);
        let floats = 4 * params + batch as u64 * (2 * outputs + unfolded) + eval_chunk as u64 * (outputs + unfolded);
        4 * floats
    }
}

/// Rejects the SGD and net settings both conv studies share: those [`check_sgd`] rejects, a zero
/// channel count or hidden width.
pub fn check_training(momentum: f32, weight_decay: f32, channels: [usize; 2], hidden: usize) -> Result<()> {
    check_sgd(momentum, weight_decay)?;
    ensure!(
        channels.iter().all(|&c| c > 0) && hidden > 0,
        "--channels and --hidden must be > 0"
    );
    Ok(())
}

/// Rejects SGD settings that cannot train: a momentum outside [0, 1), a weight decay not finite or
/// below 0.
pub fn check_sgd(momentum: f32, weight_decay: f32) -> Result<()> {
    ensure!(
        momentum.is_finite() && (0.0..1.0).contains(&momentum),
        "--momentum must be in [0, 1)"
    );
    ensure!(
        weight_decay.is_finite() && weight_decay >= 0.0,
        "--weight-decay must be a finite number >= 0"
    );
    Ok(())
}

/// The learning rate's default half-life for a run of `steps` steps: a third of the run.
pub fn default_half_life(steps: u64) -> u64 {
    (steps / 3).max(1)
}
