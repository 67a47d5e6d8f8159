//! Distribution monitoring: percentiles of a layer's input or output during training (the paper's
//! Figure 1b,c watches the input of a last-hidden-layer sigmoid). A library feature, usable with
//! any [`Sequential`] network: point a [`Monitor`] at a layer, feed it every batch of an
//! evaluation pass, and read the percentiles.

use crate::engine::Sequential;
use serde::Serialize;

/// Which side of the layer is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// The values going into the layer.
    Input,
    /// The values coming out of it.
    Output,
}

/// Collects one layer's values over several batches and summarizes them as percentiles, both
/// for one chosen unit (feature) and pooled over all units of the layer.
///
/// ```
/// use bnlab::monitor::{Monitor, Watch};
/// let mut m = Monitor::new(0, Watch::Output, 1, vec![15.0, 50.0, 85.0]);
/// m.record_values(&[0.0, 10.0, 1.0, 20.0, 2.0, 30.0], 2); // 3 examples × 2 units
/// let s = m.summary();
/// assert_eq!(s.unit[1], 20.0); // median of unit 1 (values 10, 20, 30)
/// assert_eq!(s.pooled[1], 6.0); // median of all six values
/// ```
#[derive(Debug, Clone)]
pub struct Monitor {
    /// Index of the watched layer in the network.
    pub layer: usize,
    /// Input or output of that layer.
    pub watch: Watch,
    /// The unit (feature index within an example) followed on its own.
    pub unit: usize,
    /// Percentiles to report, in [0, 100].
    pub percentiles: Vec<f64>,
    unit_values: Vec<f32>,
    all_values: Vec<f32>,
}

/// Percentiles of the watched values.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Percentiles of the chosen unit, in the order asked.
    pub unit: Vec<f64>,
    /// Percentiles pooled over every unit of the layer.
    pub pooled: Vec<f64>,
}

impl Monitor {
    /// A monitor of `layer`'s `watch` side, following `unit`.
    pub fn new(layer: usize, watch: Watch, unit: usize, percentiles: Vec<f64>) -> Self {
        Monitor {
            layer,
            watch,
            unit,
            percentiles,
            unit_values: Vec::new(),
            all_values: Vec::new(),
        }
    }

    /// Records the watched values of the network's last forward pass.
    pub fn record(&mut self, net: &Sequential) {
        let (values, width) = match self.watch {
            Watch::Input => (net.layer_input(self.layer), net.layers[self.layer].input_size()),
            Watch::Output => (net.activation(self.layer), net.layers[self.layer].output_size()),
        };
        let values = &values[..net.batch() * width];
        self.record_values(values, width);
    }

    /// Records values laid out as rows of `width` units.
    pub fn record_values(&mut self, values: &[f32], width: usize) {
        if self.unit < width {
            self.unit_values
                .extend(values.chunks_exact(width).map(|row| row[self.unit]));
        }
        self.all_values.extend_from_slice(values);
    }

    /// Percentiles of everything recorded since the last [`Monitor::clear`] (NaN if nothing).
    pub fn summary(&mut self) -> Summary {
        Summary {
            unit: percentiles(&mut self.unit_values, &self.percentiles),
            pooled: percentiles(&mut self.all_values, &self.percentiles),
        }
    }

    /// Forgets the recorded values (call before each evaluation).
    pub fn clear(&mut self) {
        self.unit_values.clear();
        self.all_values.clear();
    }
}

/// Percentiles `ps` (in [0, 100]) of `v` by linear interpolation between order statistics
/// (NumPy's default), in the order of `ps`. Reorders `v`. NaN for an empty `v`; values are
/// ordered by [`f32::total_cmp`] (a NaN ranks above +∞, or below −∞ if negative).
///
/// The order statistics are found by selection, not a full sort: O(n) per distinct rank needed
/// (two per percentile at most), so the pooled percentiles of an evaluation pass (a million
/// values in `paper-mlp`) do not pay for a full sort.
pub fn percentiles(v: &mut [f32], ps: &[f64]) -> Vec<f64> {
    if v.is_empty() {
        return vec![f64::NAN; ps.len()];
    }
    let positions: Vec<f64> = ps
        .iter()
        .map(|&p| (p.clamp(0.0, 100.0) / 100.0) * (v.len() - 1) as f64)
        .collect();
    let mut ranks: Vec<usize> = positions
        .iter()
        .flat_map(|&pos| [pos.floor() as usize, pos.ceil() as usize])
        .collect();
    ranks.sort_unstable();
    ranks.dedup();
    // Each rank is selected in the part right of the previous one: everything there is ≥ it.
    let mut order_stats = Vec::with_capacity(ranks.len());
    let mut start = 0;
    for &rank in &ranks {
        let (_, &mut x, _) = v[start..].select_nth_unstable_by(rank - start, f32::total_cmp);
        order_stats.push(x);
        start = rank + 1;
    }
    let at = |rank: usize| order_stats[ranks.binary_search(&rank).expect("every rank was selected")] as f64;
    positions
        .iter()
        .map(|&pos| {
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            let frac = pos - lo as f64;
            at(lo) * (1.0 - frac) + at(hi) * frac
        })
        .collect()
}
