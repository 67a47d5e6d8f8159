//! Inverted dropout: in [`Mode::Train`] each feature is kept with probability 1 − p and scaled by
//! 1/(1 − p), so the expected output equals the input; in Eval and Collect it is the identity.
//!
//! ```text
//! Shapes: x, y, mask [batch, size].
//! forward:  y = x·mask, mask_i = 1/(1 − p) if u_i ≥ p else 0, u_i ~ U[0, 1) drawn in order
//! backward: dx = dy·mask (dx = dy after an Eval/Collect forward)
//! ```
//! The u_i come from the layer's own ChaCha8 generator, so the same seed gives the same masks.

use super::{Layer, Mode, Param, State, StateValue};
use anyhow::{bail, ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `Dropout` with drop probability `p` and its own seeded generator.
pub struct Dropout {
    /// Features per example.
    pub size: usize,
    /// Probability of dropping a feature, in [0, 1).
    pub p: f32,
    seed: u64,
    rng: ChaCha8Rng,
    mask: Vec<f32>,
    /// Whether the last forward applied a mask (Train).
    masked: bool,
}

impl Dropout {
    /// Dropout over `size` features with drop probability `p` ∈ [0, 1), generator seeded by `seed`.
    pub fn new(size: usize, p: f32, seed: u64) -> Result<Self> {
        ensure!((0.0..1.0).contains(&p), "dropout probability {p} is not in [0, 1)");
        Ok(Dropout {
            size,
            p,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            mask: Vec::new(),
            masked: false,
        })
    }

    /// The seed given at construction.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Restarts the generator from the construction seed (the next masks repeat from the start).
    pub fn reset_rng(&mut self) {
        self.rng = ChaCha8Rng::seed_from_u64(self.seed);
    }

    /// Position in the generator's stream (words drawn so far), to save with a checkpoint.
    pub fn rng_position(&self) -> u128 {
        self.rng.get_word_pos()
    }

    /// Moves the generator to `pos` in the stream of the construction seed (resuming a checkpoint).
    pub fn set_rng_position(&mut self, pos: u128) {
        self.reset_rng();
        self.rng.set_word_pos(pos);
    }

    /// The mask of the last Train forward `[batch, size]` (0 or 1/(1 − p)).
    pub fn mask(&self) -> &[f32] {
        &self.mask
    }
}

impl Layer for Dropout {
    fn name(&self) -> String {
        format!("dropout{}", self.p)
    }
    fn input_size(&self) -> usize {
        self.size
    }

    fn forward(&mut self, x: &[f32], batch: usize, y: &mut [f32], mode: Mode) -> Result<()> {
        ensure!(
            x.len() == batch * self.size && y.len() == x.len(),
            "dropout buffers do not match the batch"
        );
        self.masked = mode == Mode::Train;
        if !self.masked {
            y.copy_from_slice(x);
            return Ok(());
        }
        let (p, scale) = (self.p, 1.0 / (1.0 - self.p));
        self.mask.resize(x.len(), 0.0);
        for m in self.mask.iter_mut() {
            *m = if self.rng.gen::<f32>() >= p { scale } else { 0.0 };
        }
        y.iter_mut().zip(x).zip(&self.mask).for_each(|((o, &v), &m)| *o = v * m);
        Ok(())
    }

    fn backward(&mut self, _x: &[f32], _y: &[f32], dy: &[f32], batch: usize, dx: Option<&mut [f32]>) -> Result<()> {
        ensure!(dy.len() == batch * self.size, "dropout dy does not match the batch");
        if let Some(dx) = dx {
            ensure!(dx.len() == dy.len(), "dropout dx does not match the batch");
            if self.masked {
                ensure!(
                    self.mask.len() == dy.len(),
                    "dropout backward without a forward of this batch"
                );
                dx.iter_mut()
                    .zip(dy)
                    .zip(&self.mask)
                    .for_each(|((o, &g), &m)| *o = g * m);
            } else {
                dx.copy_from_slice(dy);
            }
        }
        Ok(())
    }

    fn params(&mut self) -> Vec<Param<'_>> {
        Vec::new()
    }

    /// The generator's word position as two words (low, high), so resumed masks continue the stream.
    fn state(&self) -> Vec<State> {
        let pos = self.rng_position();
        vec![State {
            name: "rng_word_pos",
            value: StateValue::U64(vec![pos as u64, (pos >> 64) as u64]),
        }]
    }

    fn set_state(&mut self, name: &str, value: StateValue) -> Result<()> {
        match (name, value) {
            ("rng_word_pos", StateValue::U64(v)) if v.len() == 2 => {
                self.set_rng_position(u128::from(v[0]) | (u128::from(v[1]) << 64));
                Ok(())
            }
            (name, _) => bail!("dropout has no state `{name}` of that type and length"),
        }
    }
}
