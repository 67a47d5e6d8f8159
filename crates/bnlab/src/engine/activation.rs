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

/// `impl Layer` for an element-wise layer of `size` features: forward maps each input `v` to
/// `value`; backward maps each `dy` (as `g`) to `grad`, where `s` is the saved output when
/// `from_output` is true and the saved input otherwise. No parameters.
macro_rules! elementwise_layer {
    ($layer:ident, $name:literal, |$v:ident| $value:expr, from_output: $from_output:literal, |$s:ident, $g:ident| $grad:expr) => {
        impl Layer for $layer {
            fn name(&self) -> String {
                $name.into()
            }
            fn input_size(&self) -> usize {
                self.size
            }
            fn output_size(&self) -> usize {
                self.size
            }
            fn forward(&mut self, x: &[f32], _batch: usize, y: &mut [f32], _mode: Mode) -> anyhow::Result<()> {
                y.iter_mut().zip(x).for_each(|(o, &$v)| *o = $value);
                Ok(())
            }
            fn backward(
                &mut self,
                x: &[f32],
                y: &[f32],
                dy: &[f32],
                _batch: usize,
                dx: Option<&mut [f32]>,
            ) -> anyhow::Result<()> {
                let saved = if $from_output { y } else { x };
                if let Some(dx) = dx {
                    dx.iter_mut()
                        .zip(saved)
                        .zip(dy)
                        .for_each(|((o, &$s), &$g)| *o = $grad);
                }
                Ok(())
            }
            fn params(&mut self) -> Vec<Param<'_>> {
                Vec::new()
            }
        }
    };
}

elementwise_layer!(Sigmoid, "sigmoid", |v| 1.0 / (1.0 + (-v).exp()), from_output: true, |s, g| g * s * (1.0 - s));
elementwise_layer!(Relu, "relu", |v| v.max(0.0), from_output: false, |v, g| if v > 0.0 { g } else { 0.0 });
