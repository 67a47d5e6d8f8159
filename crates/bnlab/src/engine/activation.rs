//! Element-wise nonlinearities.

use super::{Layer, Mode, Param};

/// Logistic sigmoid 1/(1 + e⁻ˣ); backward uses the saved output: dx = dy·y·(1 − y).
pub struct Sigmoid {
    /// Features per example.
    pub size: usize,
}

/// Rectified linear unit max(0, x); backward: dx = dy where x > 0.
pub struct Relu {
    /// Features per example.
    pub size: usize,
}

impl Layer for Sigmoid {
    fn name(&self) -> String {
        "sigmoid".into()
    }
    fn input_size(&self) -> usize {
        self.size
    }
    fn output_size(&self) -> usize {
        self.size
    }
    fn forward(&mut self, x: &[f32], _batch: usize, y: &mut [f32], _mode: Mode) -> anyhow::Result<()> {
        y.iter_mut().zip(x).for_each(|(o, &v)| *o = 1.0 / (1.0 + (-v).exp()));
        Ok(())
    }
    fn backward(
        &mut self,
        _x: &[f32],
        y: &[f32],
        dy: &[f32],
        _batch: usize,
        dx: Option<&mut [f32]>,
    ) -> anyhow::Result<()> {
        if let Some(dx) = dx {
            dx.iter_mut()
                .zip(y)
                .zip(dy)
                .for_each(|((o, &s), &g)| *o = g * s * (1.0 - s));
        }
        Ok(())
    }
    fn params(&mut self) -> Vec<Param<'_>> {
        Vec::new()
    }
}

impl Layer for Relu {
    fn name(&self) -> String {
        "relu".into()
    }
    fn input_size(&self) -> usize {
        self.size
    }
    fn output_size(&self) -> usize {
        self.size
    }
    fn forward(&mut self, x: &[f32], _batch: usize, y: &mut [f32], _mode: Mode) -> anyhow::Result<()> {
        y.iter_mut().zip(x).for_each(|(o, &v)| *o = v.max(0.0));
        Ok(())
    }
    fn backward(
        &mut self,
        x: &[f32],
        _y: &[f32],
        dy: &[f32],
        _batch: usize,
        dx: Option<&mut [f32]>,
    ) -> anyhow::Result<()> {
        if let Some(dx) = dx {
            dx.iter_mut()
                .zip(x)
                .zip(dy)
                .for_each(|((o, &v), &g)| *o = if v > 0.0 { g } else { 0.0 });
        }
        Ok(())
    }
    fn params(&mut self) -> Vec<Param<'_>> {
        Vec::new()
    }
}
