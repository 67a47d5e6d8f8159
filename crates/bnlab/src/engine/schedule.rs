//! Learning-rate schedules.

use serde::{Deserialize, Serialize};

/// The learning rate as a function of the step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum LrSchedule {
    /// Always `base`.
    Constant,
    /// `base · factor^⌊step / every⌋`.
    Step {
        /// Steps between drops.
        every: u64,
        /// Multiplier at each drop.
        factor: f64,
    },
    /// `base · rate^(step · speedup / every)`: smooth exponential decay; `speedup` > 1 decays
    /// faster (the paper's BN networks decay 6× faster).
    Exponential {
        /// Steps over which the rate is multiplied by `rate` (before speed-up).
        every: u64,
        /// Multiplier per `every` steps.
        rate: f64,
        /// Speed-up factor of the decay.
        speedup: f64,
    },
}

impl LrSchedule {
    /// Learning rate at `step` given the base rate.
    pub fn lr(&self, base: f64, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::Step { every, factor } => base * factor.powf((step / every.max(1)) as f64),
            LrSchedule::Exponential { every, rate, speedup } => {
                base * rate.powf(step as f64 * speedup / every.max(1) as f64)
            }
        }
    }
}
