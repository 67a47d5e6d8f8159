//! `BatchNorm`: a layer holding γ, β and running statistics over the stateless functions, with
//! its one-process and its synchronized (multi-worker) training passes.

use crate::args::Scope;
use crate::backward::{
    backward_eval_where, backward_where, fixed_input_grad, grad_sums_where, input_grad_where, GradSums,
};
use crate::check;
use crate::fold::InferenceAffine;
use crate::forward::{eval_where, normalize_where, train_where};
use crate::fused::{ReluBackward, ReluForward};
use crate::stats::{batch_stats_where, update_running_stats, BatchStats, Momentum, PopulationStats, SavedStats};
use crate::sync::{sync_batch_stats, sync_grad_sums, Communicator};
#[cfg(doc)]
use crate::{batch_norm_backward, batch_norm_backward_eval, batch_norm_eval, batch_norm_train};
use crate::{Affine, Element, Error, FixedStats, Grads, SmallBatch, View};

/// Settings of a [`BatchNorm`] layer (PyTorch's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormConfig {
    /// ε added to the variance (default 1e-5); must be finite and > 0.
    pub eps: f64,
    /// How running statistics average over batches (default `Exponential(0.1)`).
    pub momentum: Momentum,
    /// Learn γ and β (default true). Without, γ = 1 and β = 0 and no parameter gradients exist.
    pub affine: bool,
    /// Keep running statistics for inference (default true). Without, `forward_eval` is an error
    /// and inference must use batch statistics or a [`PopulationStats`] estimate.
    pub track_running_stats: bool,
    /// What a training batch of fewer than 2 values per channel does (default
    /// [`SmallBatch::Error`]: it is rejected).
    pub small_batch: SmallBatch,
    /// Ghost batch norm's virtual batch size v (default `None`: the whole batch): when set
    /// (v ≥ 2), training passes normalize each group of v consecutive examples with its own
    /// statistics (see [`crate::ghost_batch_norm_train`]); inference never uses groups. Local to
    /// a worker: the synchronized passes reject it.
    pub virtual_batch: Option<usize>,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig {
            eps: 1e-5,
            momentum: Momentum::Exponential(0.1),
            affine: true,
            track_running_stats: true,
            small_batch: SmallBatch::Error,
            virtual_batch: None,
        }
    }
}

/// A batch-norm layer over `num_features` channels: learned γ (`gamma`, initialized to 1) and β
/// (`beta`, 0), running mean (0) and running variance (1).
///
/// ```
/// use batchnorm::{BatchNorm, BatchNormConfig, Grads, Layout, View};
/// let mut bn = BatchNorm::<f32>::new(3, BatchNormConfig::default()).unwrap();
/// let x: Vec<f32> = (0..2 * 3 * 4).map(|i| i as f32).collect(); // NCHW [2, 3, 2, 2]
/// let x = View::new(&x, &[2, 3, 2, 2], Layout::NCHW);
/// let mut y = vec![0.0; x.data.len()];
/// let saved = bn.forward_train(x, &mut y).unwrap();
/// let (dy, mut dx) = (vec![1.0; y.len()], vec![0.0; y.len()]);
/// let (mut dgamma, mut dbeta) = (vec![0.0; 3], vec![0.0; 3]);
/// bn.backward(x, &dy, &saved, Grads::new(&mut dx, &mut dgamma, &mut dbeta)).unwrap();
/// assert_eq!(dbeta, vec![8.0; 3]);
/// bn.forward_eval(x, &mut y).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm<T: Element> {
    /// The layer's settings.
    pub config: BatchNormConfig,
    /// Number of channels.
    pub num_features: usize,
    /// γ, one per channel; empty when `affine` is false.
    pub gamma: Vec<T::Param>,
    /// β, one per channel; empty when `affine` is false.
    pub beta: Vec<T::Param>,
    /// Running mean; empty when `track_running_stats` is false.
    pub running_mean: Vec<T::Param>,
    /// Running (unbiased) variance; empty when `track_running_stats` is false.
    pub running_var: Vec<T::Param>,
    /// Training batches seen (drives [`Momentum::Cumulative`]).
    pub num_batches_tracked: u64,
    /// Frozen: training passes use the running statistics (see [`BatchNorm::freeze`]).
    pub(crate) frozen: bool,
}

impl<T: Element> BatchNorm<T> {
    /// A fresh layer. Rejects ε not finite and > 0, a momentum outside (0, 1] and a virtual
    /// batch size below 2 ([`Error::InvalidVirtualBatch`]).
    pub fn new(num_features: usize, config: BatchNormConfig) -> Result<Self, Error> {
        check::eps(config.eps)?;
        check::momentum(config.momentum)?;
        if let Some(v) = config.virtual_batch {
            check::virtual_batch(v)?;
        }
        let (params, stats) = (config.affine as usize, config.track_running_stats as usize);
        Ok(BatchNorm {
            config,
            num_features,
            gamma: vec![T::Param::from_f64(1.0); num_features * params],
            beta: vec![T::Param::from_f64(0.0); num_features * params],
            running_mean: vec![T::Param::from_f64(0.0); num_features * stats],
            running_var: vec![T::Param::from_f64(1.0); num_features * stats],
            num_batches_tracked: 0,
            frozen: false,
        })
    }

    /// Checks what [`BatchNorm::track`] could reject (see `check::running_update`), when the running
    /// statistics are tracked.
    fn check_track(&self) -> Result<(), Error> {
        if !self.config.track_running_stats {
            return Ok(());
        }
        let (mean, var) = (&self.running_mean, &self.running_var);
        check::running_update(self.config.momentum, self.num_features, mean, var)
    }

    /// Updates the running statistics with a training batch, when they are tracked (the caller has
    /// checked what the update could reject, with [`BatchNorm::check_track`]).
    fn track(&mut self, batch: &BatchStats) -> Result<(), Error> {
        if self.config.track_running_stats {
            let seen = self.num_batches_tracked + 1;
            let (mean, var) = (&mut self.running_mean, &mut self.running_var);
            update_running_stats(batch, self.config.momentum, seen, mean, var)?;
            self.num_batches_tracked = seen;
        }
        Ok(())
    }

    /// γ and β, or none without affine.
    pub(crate) fn affine(&self) -> Affine<'_, T> {
        if self.config.affine {
            Affine::new(&self.gamma, &self.beta)
        } else {
            Affine::NONE
        }
    }

    /// The running statistics; [`Error::NoRunningStats`] when they are not tracked.
    pub(crate) fn running(&self) -> Result<FixedStats<'_, T>, Error> {
        if !self.config.track_running_stats {
            return Err(Error::NoRunningStats);
        }
        Ok(FixedStats::new(&self.running_mean, &self.running_var))
    }

    /// `grads` without dγ and dβ when the layer has no affine parameters.
    pub(crate) fn param_grads<'a>(&self, grads: Grads<'a, T>) -> Grads<'a, T> {
        if self.config.affine {
            grads
        } else {
            Grads {
                dx: grads.dx,
                ..Grads::default()
            }
        }
    }

    /// Training forward (Algorithm 1) and, when tracked, a running-statistics update.
    /// Rejects what [`batch_norm_train`] rejects and an input whose channel count differs from
    /// `num_features`; on error nothing (running statistics included) is changed.
    ///
    /// A frozen layer ([`BatchNorm::freeze`]), and with [`SmallBatch::UseRunningStats`] a batch of
    /// fewer than 2 values per channel, is normalized with the running statistics instead
    /// ([`batch_norm_eval`]'s transform), which are not updated; then it rejects what
    /// [`batch_norm_eval`] rejects and [`Error::NoRunningStats`] when they are not tracked.
    ///
    /// With `config.virtual_batch` set (ghost batch norm), each group of that many consecutive
    /// examples is normalized with its own statistics ([`crate::ghost_batch_norm_train`], whose
    /// rejections it shares) and the running statistics are updated once, with the mean over
    /// groups of their means and unbiased variances ([`crate::update_ghost_running_stats`]); the
    /// returned statistics hold every group's, packed as [`crate::GhostSaved`] describes. A
    /// virtual batch size below 2 is rejected first ([`Error::InvalidVirtualBatch`]). Frozen, or
    /// with the small-batch policy on a batch of fewer than 2 values per channel, the layer
    /// ignores the groups (the running statistics normalize the whole batch).
    pub fn forward_train(&mut self, x: View<'_, T>, y: &mut [T]) -> Result<SavedStats, Error> {
        self.forward_train_where(x, Scope::ALL, y)
    }

    /// [`BatchNorm::forward_train`] writing the statistics for the backward into `saved` (any
    /// `SavedStats`, e.g. the previous step's) instead of returning new ones: a caller that
    /// keeps one between steps gives a ghost layer's packed statistics (groups × channels
    /// values per vector) back their memory, rather than having them allocated and freed every
    /// step. Rejects what [`BatchNorm::forward_train`] rejects; on error `saved`, like the
    /// rest, is unchanged.
    ///
    /// ```
    /// use batchnorm::{BatchNorm, BatchNormConfig, Layout, View};
    /// let config = BatchNormConfig { virtual_batch: Some(2), ..BatchNormConfig::default() };
    /// let mut bn = BatchNorm::<f32>::new(3, config).unwrap();
    /// let x: Vec<f32> = (0..4 * 3).map(|i| (i * i % 7) as f32).collect(); // NC [4, 3]
    /// let (x, mut y) = (View::new(&x, &[4, 3], Layout::NC), vec![0.0; 12]);
    /// let mut saved = bn.forward_train(x, &mut y).unwrap();
    /// bn.forward_train_into(x, &mut y, &mut saved).unwrap();
    /// assert_eq!(saved.mean.len(), 2 * 3); // two groups' statistics, packed
    /// ```
    pub fn forward_train_into(&mut self, x: View<'_, T>, y: &mut [T], saved: &mut SavedStats) -> Result<(), Error> {
        self.forward_train_where_into(x, Scope::ALL, y, saved)
    }

    /// [`BatchNorm::forward_train`] over the positions `scope.mask` selects (`None`: all of them),
    /// y +0.0 elsewhere; the mask's length is checked after the input's channel count. With
    /// `scope.relu`, fused with what follows (see [`BatchNorm::forward_train_relu`]).
    pub(crate) fn forward_train_where(
        &mut self,
        x: View<'_, T>,
        scope: Scope<'_, ReluForward<'_, T>>,
        y: &mut [T],
    ) -> Result<SavedStats, Error> {
        let mut saved = SavedStats {
            count: 0,
            mean: Vec::new(),
            inv_std: Vec::new(),
        };
        self.forward_train_where_into(x, scope, y, &mut saved)?;
        Ok(saved)
    }

    /// [`BatchNorm::forward_train_where`] into `saved` (see [`BatchNorm::forward_train_into`]).
    fn forward_train_where_into(
        &mut self,
        x: View<'_, T>,
        scope: Scope<'_, ReluForward<'_, T>>,
        y: &mut [T],
        saved: &mut SavedStats,
    ) -> Result<(), Error> {
        let ghost = self.ghost_for(&scope)?;
        let g = check::layer_input(self.num_features, x.shape, x.layout)?;
        let count = check::mask(&g, scope.mask)?;
        if self.uses_running_stats(count) {
            *saved = self.forward_frozen(x, scope, y, count)?;
            return Ok(());
        }
        // Everything the running-statistics update could reject is checked before y is written.
        self.check_track()?;
        if let Some(v) = ghost {
            return self.forward_ghost(x, v, y, saved);
        }
        let (stats, new) = train_where(x, scope, self.affine(), self.config.eps, y)?;
        self.track(&stats)?;
        *saved = new;
        Ok(())
    }

    /// Inference forward with the running statistics. Rejects [`Error::NoRunningStats`] when they
    /// are not tracked, and what [`batch_norm_eval`] rejects. A ghost layer normalizes with them
    /// too: inference never uses groups.
    pub fn forward_eval(&self, x: View<'_, T>, y: &mut [T]) -> Result<(), Error> {
        self.forward_eval_where(x, Scope::ALL, y)
    }

    /// [`BatchNorm::forward_eval`] at the positions `scope.mask` selects (`None`: all of them),
    /// +0.0 elsewhere; with `scope.relu`, fused with what follows.
    pub(crate) fn forward_eval_where(
        &self,
        x: View<'_, T>,
        scope: Scope<'_, ReluForward<'_, T>>,
        y: &mut [T],
    ) -> Result<(), Error> {
        let stats = self.running()?;
        check::layer_input(self.num_features, x.shape, x.layout)?;
        eval_where(x, scope, stats, self.affine(), self.config.eps, y)
    }

    /// Training backward: writes whichever of dx, dγ, dβ `grads` holds (dγ and dβ are ignored
    /// without affine). Rejects what [`batch_norm_backward`] rejects.
    ///
    /// A frozen layer, and with [`SmallBatch::UseRunningStats`] saved statistics of fewer than 2
    /// values per channel, backpropagates through the running statistics as constants
    /// ([`batch_norm_backward_eval`]'s transform; `saved` is then only checked for its channel
    /// count): it rejects what that function rejects and [`Error::NoRunningStats`].
    ///
    /// A ghost layer (`config.virtual_batch` set) backpropagates through each group's
    /// statistics, which `saved` holds packed ([`crate::GhostSaved`]), with
    /// [`crate::ghost_batch_norm_backward`], whose rejections it shares; it rejects first a
    /// virtual batch size below 2 ([`Error::InvalidVirtualBatch`]), then the input's shape and
    /// packed vectors of another length than groups × channels ([`Error::FeatureMismatch`]).
    /// `saved` must come from this layer's `forward_train` on the same input, the configuration
    /// unchanged.
    pub fn backward(&self, x: View<'_, T>, dy: &[T], saved: &SavedStats, grads: Grads<'_, T>) -> Result<(), Error> {
        self.backward_where(x, Scope::ALL, dy, saved, grads)
    }

    /// [`BatchNorm::backward`] over the positions `scope.mask` selects (`None`: all of them), dx
    /// +0.0 elsewhere; with `scope.relu`, through a fused ReLU (see [`BatchNorm::backward_relu`]).
    pub(crate) fn backward_where(
        &self,
        x: View<'_, T>,
        scope: Scope<'_, ReluBackward<'_, T>>,
        dy: &[T],
        saved: &SavedStats,
        grads: Grads<'_, T>,
    ) -> Result<(), Error> {
        let ghost = self.ghost_for(&scope)?;
        if self.uses_running_stats(saved.count) {
            return self.backward_fixed(x, scope, dy, Some(saved), grads);
        }
        check::layer_input(self.num_features, x.shape, x.layout)?;
        if let Some(v) = ghost {
            return self.backward_ghost(x, dy, saved, v, grads);
        }
        backward_where(x, scope, dy, saved, self.affine().gamma, self.param_grads(grads))
    }

    /// Inference-mode backward (running statistics as constants). Rejects
    /// [`Error::NoRunningStats`] when they are not tracked, and what [`batch_norm_backward_eval`] rejects.
    pub fn backward_eval(&self, x: View<'_, T>, dy: &[T], grads: Grads<'_, T>) -> Result<(), Error> {
        self.backward_eval_where(x, Scope::ALL, dy, grads)
    }

    /// [`BatchNorm::backward_eval`] over the positions `scope.mask` selects (`None`: all of them),
    /// dx +0.0 elsewhere; with `scope.relu`, through a fused ReLU.
    pub(crate) fn backward_eval_where(
        &self,
        x: View<'_, T>,
        scope: Scope<'_, ReluBackward<'_, T>>,
        dy: &[T],
        grads: Grads<'_, T>,
    ) -> Result<(), Error> {
        self.backward_fixed(x, scope, dy, None, grads)
    }

    /// The backward through the running statistics as constants, for inference
    /// ([`BatchNorm::backward_eval_where`]) and for a frozen training pass (see
    /// [`BatchNorm::backward`]), whose `saved` statistics are then checked for their channel count
    /// only, after the input's.
    fn backward_fixed(
        &self,
        x: View<'_, T>,
        scope: Scope<'_, ReluBackward<'_, T>>,
        dy: &[T],
        saved: Option<&SavedStats>,
        grads: Grads<'_, T>,
    ) -> Result<(), Error> {
        let stats = self.running()?;
        check::layer_input(self.num_features, x.shape, x.layout)?;
        if let Some(saved) = saved {
            check::saved(saved, self.num_features)?;
        }
        let (gamma, eps) = (self.affine().gamma, self.config.eps);
        backward_eval_where(x, scope, dy, stats, gamma, eps, self.param_grads(grads))
    }

    /// Replaces the running statistics by Algorithm 2's population estimate (and starts tracking
    /// them if the layer did not). Rejects an estimator of another channel count or with no batches.
    pub fn set_population_stats(&mut self, pop: &PopulationStats) -> Result<(), Error> {
        let (mean, var) = pop.finish::<T::Param>()?;
        check::channels("population", self.num_features, mean.len())?;
        self.running_mean = mean;
        self.running_var = var;
        self.config.track_running_stats = true;
        Ok(())
    }

    /// The inference transform as one affine map per channel (for folding into the previous layer).
    /// Rejects [`Error::NoRunningStats`] when running statistics are not tracked.
    pub fn inference_affine(&self) -> Result<InferenceAffine, Error> {
        InferenceAffine::new(self.running()?, self.affine(), self.config.eps)
    }

    /// Training forward of this rank's shard `x` with the global batch's statistics (merged over
    /// `comm`); updates the running statistics (when tracked) from the global batch, unbiased
    /// with the global count. Collective: every rank must call it.
    ///
    /// Rejects, before any communication, what [`crate::batch_stats`] rejects (an empty shard
    /// included), a `y` of the wrong length, an input whose channels differ from `num_features`,
    /// an invalid momentum and running statistics of the wrong length; after the merge, a global
    /// batch with fewer than 2 values per channel ([`Error::TooFewValues`], with the global count
    /// and this rank's shape). Transport failures are [`Error::Communication`]. On error `y` and
    /// the running statistics are unchanged.
    ///
    /// A frozen layer normalizes its shard with the running statistics, without communicating
    /// (every rank's layer must then be frozen); with [`SmallBatch::UseRunningStats`] a global
    /// batch of fewer than 2 values per channel is normalized so too (see
    /// [`BatchNorm::forward_train`]).
    ///
    /// Ghost groups are local to a worker: a layer with `config.virtual_batch` set is rejected
    /// before anything else, frozen or not ([`Error::GhostNotSynchronized`]).
    pub fn forward_train_sync(
        &mut self,
        comm: &dyn Communicator,
        x: View<'_, T>,
        y: &mut [T],
    ) -> Result<SavedStats, Error> {
        self.forward_train_sync_where(comm, x, None, y)
    }

    /// [`BatchNorm::forward_train_sync`] over the positions `mask` selects (`None`: all of them),
    /// y +0.0 elsewhere; the mask's length is checked after `y`'s, before any communication.
    pub(crate) fn forward_train_sync_where(
        &mut self,
        comm: &dyn Communicator,
        x: View<'_, T>,
        mask: Option<&[bool]>,
        y: &mut [T],
    ) -> Result<SavedStats, Error> {
        self.reject_ghost()?;
        let g = check::layer_input(self.num_features, x.shape, x.layout)?;
        if self.frozen {
            let count = check::mask(&g, mask)?;
            return self.forward_frozen(x, Scope { mask, relu: None }, y, count);
        }
        check::len("y", &g, y.len())?;
        check::mask(&g, mask)?;
        self.check_track()?;
        let local = batch_stats_where(x, mask)?;
        let global = sync_batch_stats(comm, &local)?;
        if self.uses_running_stats(global.count) {
            return self.forward_frozen(x, Scope { mask, relu: None }, y, global.count);
        }
        check::training_count(global.count, x.shape)?;
        let saved = global.saved(self.config.eps)?;
        normalize_where(x, mask, &saved, self.affine(), y)?;
        self.track(&global)?;
        Ok(saved)
    }

    /// Training backward of this rank's shard: merges Σ dy and Σ dy·x̂ over all ranks of `comm`,
    /// writes dx (when `grads` holds it) through the global statistics and, with affine, dγ and
    /// dβ of the *global* batch (identical on every rank). Returns this rank's own sums (its share
    /// of dγ = Σ dy·x̂ and dβ = Σ dy), for callers that sum parameter gradients over ranks
    /// themselves (data-parallel training). Collective: every rank must call it.
    ///
    /// Rejects what [`crate::grad_sums`] and [`crate::input_grad`] reject, an input whose channels
    /// differ from `num_features`, `dgamma`/`dbeta` of the wrong channel count (before anything is
    /// written), and transport failures ([`Error::Communication`]).
    ///
    /// A frozen layer, and with [`SmallBatch::UseRunningStats`] saved statistics of fewer than 2
    /// values per channel, backpropagates through the running statistics as constants: dx
    /// locally, dγ and dβ of the global batch (still collective); it rejects as
    /// [`batch_norm_backward_eval`] does and [`Error::NoRunningStats`].
    ///
    /// A layer with `config.virtual_batch` set is rejected before anything else
    /// ([`Error::GhostNotSynchronized`]).
    pub fn backward_sync(
        &self,
        comm: &dyn Communicator,
        x: View<'_, T>,
        dy: &[T],
        saved: &SavedStats,
        grads: Grads<'_, T>,
    ) -> Result<GradSums, Error> {
        self.backward_sync_where(comm, x, None, dy, saved, grads)
    }

    /// [`BatchNorm::backward_sync`] over the positions `mask` selects (`None`: all of them), dx
    /// +0.0 elsewhere.
    pub(crate) fn backward_sync_where(
        &self,
        comm: &dyn Communicator,
        x: View<'_, T>,
        mask: Option<&[bool]>,
        dy: &[T],
        saved: &SavedStats,
        grads: Grads<'_, T>,
    ) -> Result<GradSums, Error> {
        self.reject_ghost()?;
        // Frozen (or the small-batch policy): the running statistics as constants, read first as
        // the inference backward reads them; dx needs no other rank, dγ and dβ are still global.
        let frozen = self.uses_running_stats(saved.count);
        let running = frozen.then(|| self.running()).transpose()?;
        let g = check::layer_input(self.num_features, x.shape, x.layout)?;
        let grads = self.param_grads(grads);
        let (local, fixed_inv_std) = match running {
            Some(running) => {
                let (local, inv) = self.frozen_local_sums(&g, x.data, mask, dy, saved, running, &grads)?;
                (local, Some(inv))
            }
            None => {
                check::param_grads(g.channels, grads.dgamma.as_deref(), grads.dbeta.as_deref())?;
                (grad_sums_where(x, mask, dy, saved)?, None)
            }
        };
        let global = sync_grad_sums(comm, &local)?;
        let (Grads { dx, dgamma, dbeta }, gamma) = (grads, self.affine().gamma);
        match (dx, fixed_inv_std) {
            (Some(dx), Some(inv)) => fixed_input_grad(&g, dy, mask, None, gamma, &inv, dx),
            (Some(dx), None) => input_grad_where(x, mask, dy, saved, &global, gamma, dx)?,
            (None, _) => {}
        }
        global.write_param_grads(dgamma, dbeta)?;
        Ok(local)
    }
}
