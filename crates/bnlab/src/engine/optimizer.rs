//! Stochastic gradient descent with momentum and weight decay.

use super::Param;

/// SGD: v ← μ·v + (g + λ·w); w ← w − η·v (PyTorch's convention; with μ = 0, λ = 0 plain SGD).
pub struct Sgd {
    /// Momentum μ.
    pub momentum: f32,
    /// L2 weight decay λ (applied to parameters marked `decay`).
    pub weight_decay: f32,
    /// Velocity per parameter tensor, in the order `params` are given.
    pub velocity: Vec<Vec<f32>>,
}

impl Sgd {
    /// An optimizer with no state yet.
    pub fn new(momentum: f32, weight_decay: f32) -> Self {
        Sgd {
            momentum,
            weight_decay,
            velocity: Vec::new(),
        }
    }

    /// One update with learning rate `lr` of every parameter (same order every call).
    pub fn step(&mut self, params: Vec<Param<'_>>, lr: f32) {
        if self.velocity.len() != params.len() {
            self.velocity = params.iter().map(|p| vec![0.0; p.value.len()]).collect();
        }
        for (p, v) in params.into_iter().zip(&mut self.velocity) {
            let wd = if p.decay { self.weight_decay } else { 0.0 };
            if self.momentum == 0.0 {
                for (w, &g) in p.value.iter_mut().zip(p.grad) {
                    *w -= lr * (g + wd * *w);
                }
            } else {
                for ((w, &g), vel) in p.value.iter_mut().zip(p.grad).zip(v.iter_mut()) {
                    *vel = self.momentum * *vel + g + wd * *w;
                    *w -= lr * *vel;
                }
            }
        }
    }
}
