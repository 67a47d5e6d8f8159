//! Fully connected layer: y = x·Wᵀ + b over a batch.

use super::gemm::{matmul_nn, matmul_nt_bias, Mat};
use super::{Layer, Mode, Param};
use anyhow::Result;
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// `Linear`: weight `[out, in]` (row-major, PyTorch's convention), optional bias `[out]`.
pub struct Linear {
    /// Input features.
    pub inputs: usize,
    /// Output features.
    pub outputs: usize,
    /// Weight `[outputs, inputs]`.
    pub weight: Vec<f32>,
    /// Bias `[outputs]`, if any.
    pub bias: Option<Vec<f32>>,
    grad_weight: Vec<f32>,
    grad_bias: Vec<f32>,
}

impl Linear {
    /// A layer with weights drawn from N(0, std²) and zero bias (when `bias`).
    pub fn new(inputs: usize, outputs: usize, bias: bool, std: f32, rng: &mut impl Rng) -> Self {
        let normal = Normal::new(0.0f32, std).expect("std is finite and >= 0");
        let weight = (0..inputs * outputs).map(|_| normal.sample(rng)).collect();
        Linear {
            inputs,
            outputs,
            weight,
            bias: bias.then(|| vec![0.0; outputs]),
            grad_weight: vec![0.0; inputs * outputs],
            grad_bias: vec![0.0; if bias { outputs } else { 0 }],
        }
    }
}

impl Linear {
    /// Folds inference batch norm that follows this layer into it: W ← diag(scale)·W,
    /// b ← scale·b + shift (b = 0 when the layer has none); afterwards the layer has a bias.
    /// Rejects a map whose channel count is not this layer's output count.
    pub fn fold_batchnorm(&mut self, bn: &::batchnorm::InferenceAffine) -> Result<()> {
        let params = (&mut self.weight[..], &mut self.bias, &mut self.grad_bias);
        super::fold_batchnorm_into(bn, params, self.outputs, ("a linear layer", "outputs"))
    }
}

impl Layer for Linear {
    fn name(&self) -> String {
        format!("linear{}x{}", self.inputs, self.outputs)
    }
    fn input_size(&self) -> usize {
        self.inputs
    }
    fn output_size(&self) -> usize {
        self.outputs
    }

    /// x `[batch, in]` → y `[batch, out]`: one pass of dot products with the bias added to each.
    fn forward(&mut self, x: &[f32], batch: usize, y: &mut [f32], _mode: Mode) -> Result<()> {
        anyhow::ensure!(
            x.len() == batch * self.inputs && y.len() == batch * self.outputs,
            "linear: buffer lengths do not match the batch"
        );
        let bias = self.bias.as_deref();
        matmul_nt_bias(batch, self.inputs, self.outputs, x, &self.weight, bias, y);
        Ok(())
    }

    /// dW = dyᵀ·x, db = Σ dy, dx = dy·W.
    fn backward(&mut self, x: &[f32], _y: &[f32], dy: &[f32], batch: usize, dx: Option<&mut [f32]>) -> Result<()> {
        anyhow::ensure!(
            x.len() == batch * self.inputs && dy.len() == batch * self.outputs,
            "linear: buffer lengths do not match the batch"
        );
        let dy_t = Mat::transposed(dy, self.outputs);
        matmul_nn(self.outputs, batch, self.inputs, dy_t, x, &mut self.grad_weight);
        if self.bias.is_some() {
            self.grad_bias.fill(0.0);
            for row in dy.chunks_exact(self.outputs) {
                self.grad_bias.iter_mut().zip(row).for_each(|(g, d)| *g += d);
            }
        }
        if let Some(dx) = dx {
            anyhow::ensure!(
                dx.len() == batch * self.inputs,
                "linear: buffer lengths do not match the batch"
            );
            matmul_nn(
                batch,
                self.outputs,
                self.inputs,
                Mat::rows(dy, self.outputs),
                &self.weight,
                dx,
            );
        }
        Ok(())
    }

    fn params(&mut self) -> Vec<Param<'_>> {
        super::weight_and_bias(&mut self.weight, &self.grad_weight, self.bias.as_mut(), &self.grad_bias)
    }

    fn as_linear(&mut self) -> Option<&mut Linear> {
        Some(self)
    }
}
