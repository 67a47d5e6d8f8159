//! Softmax cross-entropy over logits `[batch, classes]`.

use anyhow::{ensure, Result};

/// Mean softmax cross-entropy and its gradient with respect to the logits.
#[derive(Default)]
pub struct SoftmaxCrossEntropy {
    probs: Vec<f32>,
}

impl SoftmaxCrossEntropy {
    /// Mean loss of the batch; remembers the probabilities for [`Self::backward`].
    /// Rejects labels ≥ classes and mismatched lengths.
    pub fn forward(&mut self, logits: &[f32], labels: &[u8], classes: usize) -> Result<f32> {
        ensure!(
            classes > 0 && logits.len() == labels.len() * classes,
            "logits and labels disagree in length"
        );
        self.probs.resize(logits.len(), 0.0);
        let mut total = 0.0f64;
        for ((row, p), &label) in logits
            .chunks_exact(classes)
            .zip(self.probs.chunks_exact_mut(classes))
            .zip(labels)
        {
            ensure!(
                (label as usize) < classes,
                "label {label} is not below the {classes} classes"
            );
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0.0f32;
            for (q, &z) in p.iter_mut().zip(row) {
                *q = (z - max).exp();
                sum += *q;
            }
            p.iter_mut().for_each(|q| *q /= sum);
            total += (sum.ln() - (row[label as usize] - max)) as f64;
        }
        Ok((total / labels.len() as f64) as f32)
    }

    /// d(mean loss)/d(logits) = (softmax − one-hot)/batch, for the last forward.
    pub fn backward(&self, labels: &[u8], classes: usize, dlogits: &mut [f32]) {
        let scale = 1.0 / labels.len() as f32;
        for ((d, p), &label) in dlogits
            .chunks_exact_mut(classes)
            .zip(self.probs.chunks_exact(classes))
            .zip(labels)
        {
            for (j, (o, &q)) in d.iter_mut().zip(p).enumerate() {
                *o = (q - if j == label as usize { 1.0 } else { 0.0 }) * scale;
            }
        }
    }
}

/// Index of the largest logit of each row.
pub fn argmax_rows(logits: &[f32], classes: usize) -> impl Iterator<Item = usize> + '_ {
    logits.chunks_exact(classes).map(|row| {
        row.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
            )
            .0
    })
}
