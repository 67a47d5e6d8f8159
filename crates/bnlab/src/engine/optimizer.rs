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
        self.update(params.into_iter().map(|p| (p.value, p.grad, p.decay)), lr);
    }

    /// One update with the gradients `grads` (every parameter's, concatenated in order, e.g.
    /// averaged over data-parallel ranks) instead of those stored with the parameters.
    /// Rejects a `grads` whose length is not the parameters' total.
    pub fn step_with_grads(&mut self, params: Vec<Param<'_>>, grads: &[f32], lr: f32) -> anyhow::Result<()> {
        let total: usize = params.iter().map(|p| p.value.len()).sum();
        anyhow::ensure!(grads.len() == total, "{} gradients for {total} parameters", grads.len());
        let mut rest = grads;
        let tensors = params.into_iter().map(|p| {
            let (g, tail) = rest.split_at(p.value.len());
            rest = tail;
            (p.value, g, p.decay)
        });
        self.update(tensors, lr);
        Ok(())
    }

    fn update<'a>(&mut self, tensors: impl Iterator<Item = (&'a mut [f32], &'a [f32], bool)>, lr: f32) {
        let tensors: Vec<_> = tensors.collect();
        if self.velocity.len() != tensors.len() {
            self.velocity = tensors.iter().map(|(w, _, _)| vec![0.0; w.len()]).collect();
        }
        for ((value, grad, decay), v) in tensors.into_iter().zip(&mut self.velocity) {
            let wd = if decay { self.weight_decay } else { 0.0 };
            if self.momentum == 0.0 {
                for (w, &g) in value.iter_mut().zip(grad) {
                    *w -= lr * (g + wd * *w);
                }
            } else {
                for ((w, &g), vel) in value.iter_mut().zip(grad).zip(v.iter_mut()) {
                    *vel = self.momentum * *vel + g + wd * *w;
                    *w -= lr * *vel;
                }
            }
        }
    }
}
