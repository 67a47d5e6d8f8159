//! Evaluation with inference-mode batch norm: Algorithm 2's population statistics (re-estimated
//! over a fixed set of training batches before each evaluation) or the running averages, then
//! test accuracy in chunks (once per test condition), with a [`Probe`] watching the network after
//! each chunk. Every batch passes through a [`BatchPrep`] before the network sees it.

use super::settings::{BnStats, CommonSettings};
use crate::data::{gather, Dataset, EpochShuffler};
use crate::engine::loss::argmax_rows;
use crate::engine::{Layer, Mode, Sequential, State};
use crate::monitor::Monitor;
use anyhow::Result;

/// Test examples per inference forward pass.
pub const EVAL_CHUNK: usize = 1000;

/// What a forward pass of the driver is for, as [`BatchPrep::prepare`] is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The training step with this 0-based index (examples of the training split).
    Train(u64),
    /// A batch of Algorithm 2's population statistics (examples of the training split).
    Population,
    /// Test accuracy under the test condition with this index (examples of the test split; 0 for
    /// an experiment with one condition, see [`super::Experiment::test_conditions`]).
    Test(usize),
}

/// A batch the driver gathered, as [`BatchPrep::prepare`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Gathered<'a> {
    /// What the forward pass is for.
    pub pass: Pass,
    /// The split the examples come from: the training split for [`Pass::Train`] and
    /// [`Pass::Population`], the test split for [`Pass::Test`].
    pub split: &'a Dataset,
    /// The examples' indices in `split`, in batch order.
    pub indices: &'a [usize],
}

/// What turns each batch the driver gathers into the network's input (see
/// [`super::Experiment::prepare_batch`]).
pub trait BatchPrep {
    /// Called after the examples of `batch` are in `x` (`[batch, features]` as [`gather`] writes
    /// them) and before the network's forward pass: may rewrite `x` in place and set what `net`'s
    /// layers need to know about the batch (e.g. a padding mask, [`Sequential::set_mask`]).
    fn prepare(&mut self, batch: Gathered<'_>, x: &mut [f32], net: &mut Sequential) -> Result<()>;
}

/// The batches as gathered.
impl BatchPrep for () {
    fn prepare(&mut self, _: Gathered<'_>, _: &mut [f32], _: &mut Sequential) -> Result<()> {
        Ok(())
    }
}

/// Gathers the examples of `batch` into `x` and `y` ([`gather`]), then has `prep` prepare them
/// for `net`.
pub fn gather_prepared(
    batch: Gathered<'_>,
    x: &mut [f32],
    y: &mut [u8],
    prep: &mut dyn BatchPrep,
    net: &mut Sequential,
) -> Result<()> {
    gather(batch.split, batch.indices, x, y);
    prep.prepare(batch, x, net)
}

/// What an experiment's evaluations watch in a network besides accuracy (the paper's Figure 1b,c
/// percentiles: a [`Monitor`]).
pub trait Probe {
    /// Forgets what earlier evaluations recorded.
    fn clear(&mut self);
    /// Records what it watches in `net` after an inference chunk.
    fn record(&mut self, net: &Sequential);
}

/// Watches nothing.
impl Probe for () {
    fn clear(&mut self) {}
    fn record(&mut self, _net: &Sequential) {}
}

impl Probe for Monitor {
    fn clear(&mut self) {
        Monitor::clear(self)
    }
    fn record(&mut self, net: &Sequential) {
        Monitor::record(self, net)
    }
}

/// A monitor, if there is one ([`super::Built::monitor`]).
impl<P: Probe> Probe for Option<P> {
    fn clear(&mut self) {
        self.iter_mut().for_each(P::clear)
    }
    fn record(&mut self, net: &Sequential) {
        self.iter_mut().for_each(|p| p.record(net))
    }
}

/// Test accuracy of `net` with inference-mode BN as the run `s` asks, under each of `conditions`
/// test conditions (at least 1; `prep` sees each test chunk with [`Pass::Test`] of its
/// condition): with [`BnStats::Population`], every BN layer's statistics are first re-estimated
/// over a fixed set of training batches ([`use_population_stats`]), and put back afterwards
/// (evaluation leaves the training state as it found it). `probe` is cleared, then sees the
/// network after each inference chunk of [`EVAL_CHUNK`] test examples of condition 0.
///
/// Returns the accuracy under each condition, in order, and with `running_too` and
/// [`BnStats::Population`] on a network with BN, also the test accuracy with the running
/// statistics under condition 0 (evaluated first; the probe does not see it): the gap between the
/// two is what the running averages lose against Algorithm 2.
pub fn evaluate(
    s: &CommonSettings,
    net: &mut Sequential,
    train: &Dataset,
    test: &Dataset,
    probe: &mut impl Probe,
    running_too: bool,
    conditions: usize,
    prep: &mut dyn BatchPrep,
) -> Result<(Vec<f64>, Option<f64>)> {
    let accuracy = |correct: usize| correct as f64 / test.len.max(1) as f64;
    let population = s.bn_stats == BnStats::Population && !net.batchnorms().is_empty();
    let running = match running_too && population {
        true => Some(accuracy(count_correct(net, test, 0, prep, |_| {})?)),
        false => None,
    };
    let kept: Option<Vec<Vec<State>>> = population.then(|| net.batchnorms().iter().map(|bn| bn.state()).collect());
    if population {
        use_population_stats(s, net, train, prep)?;
    }
    probe.clear();
    let mut accuracies = vec![accuracy(count_correct(net, test, 0, prep, |net| probe.record(net))?)];
    for condition in 1..conditions {
        accuracies.push(accuracy(count_correct(net, test, condition, prep, |_| {})?));
    }
    if let Some(kept) = kept {
        for (bn, state) in net.batchnorms().into_iter().zip(kept) {
            for State { name, value } in state {
                bn.set_state(name, value)?;
            }
        }
    }
    Ok((accuracies, running))
}

/// Algorithm 2: replaces every BN layer's running statistics by its population estimate over
/// `s.population_batches` fixed training batches of `s.batch` examples (epoch 0 of a shuffle with
/// a seed derived from `s.seed`), each prepared by `prep` ([`Pass::Population`]). Does nothing to a
/// network without BN.
pub fn use_population_stats(
    s: &CommonSettings,
    net: &mut Sequential,
    train: &Dataset,
    prep: &mut dyn BatchPrep,
) -> Result<()> {
    if net.batchnorms().is_empty() {
        return Ok(());
    }
    let features = train.features();
    net.batchnorms().into_iter().for_each(|bn| bn.reset_population());
    let mut shuffler = EpochShuffler::new(train.len, s.batch, s.seed ^ 0x9e37_79b9_7f4a_7c15)?;
    let (mut x, mut y) = (vec![0.0f32; s.batch * features], vec![0u8; s.batch]);
    for b in 0..s.population_batches.min(shuffler.batches_per_epoch()) {
        let batch = Gathered {
            pass: Pass::Population,
            split: train,
            indices: shuffler.batch_indices(b as u64),
        };
        gather_prepared(batch, &mut x, &mut y, prep, net)?;
        net.forward(&x, s.batch, Mode::Collect)?;
    }
    for bn in net.batchnorms() {
        bn.use_population()?;
    }
    Ok(())
}

/// Test examples `net` classifies correctly in inference mode under test condition `condition`,
/// in chunks of [`EVAL_CHUNK`], each prepared by `prep` ([`Pass::Test`]); `on_chunk` sees the
/// network after each chunk.
pub fn count_correct(
    net: &mut Sequential,
    test: &Dataset,
    condition: usize,
    prep: &mut dyn BatchPrep,
    mut on_chunk: impl FnMut(&Sequential),
) -> Result<usize> {
    let features = test.features();
    let classes = net.output_size();
    let mut correct = 0usize;
    let mut x = vec![0.0f32; EVAL_CHUNK.min(test.len) * features];
    for start in (0..test.len).step_by(EVAL_CHUNK) {
        let n = EVAL_CHUNK.min(test.len - start);
        let x = &mut x[..n * features];
        test.images_f32(start..start + n, x);
        let indices: Vec<usize> = (start..start + n).collect();
        let batch = Gathered {
            pass: Pass::Test(condition),
            split: test,
            indices: &indices,
        };
        prep.prepare(batch, x, net)?;
        let logits = net.forward(x, n, Mode::Eval)?;
        correct += argmax_rows(logits, classes)
            .zip(&test.labels[start..start + n])
            .filter(|(p, &l)| *p == l as usize)
            .count();
        on_chunk(net);
    }
    Ok(correct)
}
