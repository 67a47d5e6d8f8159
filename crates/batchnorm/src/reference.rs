//! Naive `f64` versions of every operation, written straight from the paper: the specification
//! the fast kernels are tested against. Slow, simple, no cleverness. Inputs are `f64` slices over
//! a checked [`Geometry`]; they panic on inconsistent lengths (they are for tests).

use crate::Geometry;

/// Index of element (o, c, i).
fn at(g: &Geometry, o: usize, c: usize, i: usize) -> usize {
    (o * g.channels + c) * g.inner + i
}

/// Zeroed dx (the shape of `g`), dγ and dβ (one per channel) to accumulate a backward into.
fn zero_grads(g: &Geometry) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    (vec![0.0; g.len()], vec![0.0; g.channels], vec![0.0; g.channels])
}

/// Every element of `g` as (its index, its channel), in memory order: per channel, in the order
/// of its values.
fn elements(g: &Geometry) -> impl Iterator<Item = (usize, usize)> {
    let g = *g;
    (0..g.len()).map(move |k| (k, (k / g.inner) % g.channels))
}

/// The values of channel `c`, in order.
pub fn channel_values(g: &Geometry, x: &[f64], c: usize) -> Vec<f64> {
    let mut v = Vec::with_capacity(g.per_channel());
    for o in 0..g.outer {
        for i in 0..g.inner {
            v.push(x[at(g, o, c, i)]);
        }
    }
    v
}

/// Per-channel mean μ_B and biased variance σ²_B (Algorithm 1), by the textbook two-pass formulas.
pub fn mean_var(g: &Geometry, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
    (0..g.channels)
        .map(|c| {
            let v = channel_values(g, x, c);
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / v.len() as f64;
            (m, var)
        })
        .unzip()
}

/// Algorithm 1: y = γ·(x − μ_B)/√(σ²_B + ε) + β. Returns (y, mean, biased var).
pub fn forward_train(g: &Geometry, x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mean, var) = mean_var(g, x);
    let y = forward_eval(g, x, &mean, &var, gamma, beta, eps);
    (y, mean, var)
}

/// Inference: y = γ·(x − mean)/√(var + ε) + β with given statistics.
pub fn forward_eval(
    g: &Geometry,
    x: &[f64],
    mean: &[f64],
    var: &[f64],
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> Vec<f64> {
    elements(g)
        .map(|(k, c)| gamma[c] * (x[k] - mean[c]) / (var[c] + eps).sqrt() + beta[c])
        .collect()
}

/// Training backward by the paper's chain rule, term by term (Section 3):
/// ∂ℓ/∂x̂ᵢ = ∂ℓ/∂yᵢ·γ; ∂ℓ/∂σ² = Σ ∂ℓ/∂x̂ᵢ·(xᵢ − μ)·(−½)(σ² + ε)^(−3/2);
/// ∂ℓ/∂μ = Σ ∂ℓ/∂x̂ᵢ·(−1/√(σ² + ε)) + ∂ℓ/∂σ²·Σ −2(xᵢ − μ)/m;
/// ∂ℓ/∂xᵢ = ∂ℓ/∂x̂ᵢ/√(σ² + ε) + ∂ℓ/∂σ²·2(xᵢ − μ)/m + ∂ℓ/∂μ/m;
/// ∂ℓ/∂γ = Σ ∂ℓ/∂yᵢ·x̂ᵢ; ∂ℓ/∂β = Σ ∂ℓ/∂yᵢ. Returns (dx, dγ, dβ).
pub fn backward_train(g: &Geometry, x: &[f64], dy: &[f64], gamma: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mean, var) = mean_var(g, x);
    let m = g.per_channel() as f64;
    let (mut dx, mut dgamma, mut dbeta) = zero_grads(g);
    for c in 0..g.channels {
        let sd = (var[c] + eps).sqrt();
        let idx: Vec<usize> = (0..g.outer)
            .flat_map(|o| (0..g.inner).map(move |i| (o, i)))
            .map(|(o, i)| at(g, o, c, i))
            .collect();
        let dxhat: Vec<f64> = idx.iter().map(|&k| dy[k] * gamma[c]).collect();
        let dvar: f64 = idx
            .iter()
            .zip(&dxhat)
            .map(|(&k, d)| d * (x[k] - mean[c]) * -0.5 * (var[c] + eps).powf(-1.5))
            .sum();
        let dmean: f64 = dxhat.iter().map(|d| -d / sd).sum::<f64>()
            + dvar * idx.iter().map(|&k| -2.0 * (x[k] - mean[c])).sum::<f64>() / m;
        for (&k, d) in idx.iter().zip(&dxhat) {
            dx[k] = d / sd + dvar * 2.0 * (x[k] - mean[c]) / m + dmean / m;
            dgamma[c] += dy[k] * (x[k] - mean[c]) / sd;
            dbeta[c] += dy[k];
        }
    }
    (dx, dgamma, dbeta)
}

/// Inference-mode backward with fixed statistics: dx = dy·γ/√(var + ε). Returns (dx, dγ, dβ).
pub fn backward_eval(
    g: &Geometry,
    x: &[f64],
    dy: &[f64],
    mean: &[f64],
    var: &[f64],
    gamma: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut dx, mut dgamma, mut dbeta) = zero_grads(g);
    for (k, c) in elements(g) {
        let sd = (var[c] + eps).sqrt();
        dx[k] = dy[k] * gamma[c] / sd;
        dgamma[c] += dy[k] * (x[k] - mean[c]) / sd;
        dbeta[c] += dy[k];
    }
    (dx, dgamma, dbeta)
}

/// Running statistics after one batch: exponential (`Some(momentum)`) or cumulative (`None`,
/// `batches_seen` including this one) average of μ_B and the unbiased m/(m−1)·σ²_B.
pub fn running_update(
    running_mean: &[f64],
    running_var: &[f64],
    batch_mean: &[f64],
    batch_var: &[f64],
    m: usize,
    momentum: Option<f64>,
    batches_seen: u64,
) -> (Vec<f64>, Vec<f64>) {
    let w = momentum.unwrap_or(1.0 / batches_seen as f64);
    let unbiased = m as f64 / (m as f64 - 1.0);
    let mean = running_mean
        .iter()
        .zip(batch_mean)
        .map(|(r, b)| (1.0 - w) * r + w * b)
        .collect();
    let var = running_var
        .iter()
        .zip(batch_var)
        .map(|(r, b)| (1.0 - w) * r + w * b * unbiased)
        .collect();
    (mean, var)
}

/// Algorithm 2 over a list of equally sized batches given as per-batch (mean, biased var):
/// E\[x\] = mean of μ_B, Var\[x\] = m/(m−1)·mean of σ²_B.
pub fn population(batches: &[(Vec<f64>, Vec<f64>)], m: usize) -> (Vec<f64>, Vec<f64>) {
    let channels = batches[0].0.len();
    let b = batches.len() as f64;
    let mean = (0..channels)
        .map(|c| batches.iter().map(|(mu, _)| mu[c]).sum::<f64>() / b)
        .collect();
    let var = (0..channels)
        .map(|c| m as f64 / (m as f64 - 1.0) * batches.iter().map(|(_, v)| v[c]).sum::<f64>() / b)
        .collect();
    (mean, var)
}

/// Frozen batch norm's training forward: y = γ·(x − μ_run)/√(σ²_run + ε) + β, running statistics
/// unchanged (the caller keeps them): the inference transform ([`forward_eval`]) with the running
/// statistics.
pub fn frozen_forward(
    g: &Geometry,
    x: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> Vec<f64> {
    forward_eval(g, x, running_mean, running_var, gamma, beta, eps)
}

/// Frozen batch norm's backward, the running statistics constants: dx = γ·dy/√(σ²_run + ε),
/// dγ = Σ dy·x̂, dβ = Σ dy with x̂ = (x − μ_run)/√(σ²_run + ε): the inference-mode backward
/// ([`backward_eval`]) with the running statistics. Returns (dx, dγ, dβ).
pub fn frozen_backward(
    g: &Geometry,
    x: &[f64],
    dy: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    gamma: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    backward_eval(g, x, dy, running_mean, running_var, gamma, eps)
}

/// Batch renormalization's per-channel corrections (Ioffe 2017, Algorithm 1):
/// σ_B = √(ε + σ²_B) (biased), r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max).
/// Returns (μ_B, σ_B, r, d).
#[allow(clippy::type_complexity)]
pub fn renorm_corrections(
    g: &Geometry,
    x: &[f64],
    moving_mean: &[f64],
    moving_std: &[f64],
    eps: f64,
    r_max: f64,
    d_max: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mean, var) = mean_var(g, x);
    let sigma_b: Vec<f64> = var.iter().map(|v| (eps + v).sqrt()).collect();
    let clip = |v: f64, lo: f64, hi: f64| {
        if v < lo {
            lo
        } else if v > hi {
            hi
        } else {
            v
        }
    };
    let r = (0..g.channels)
        .map(|c| clip(sigma_b[c] / moving_std[c], 1.0 / r_max, r_max))
        .collect();
    let d = (0..g.channels)
        .map(|c| clip((mean[c] - moving_mean[c]) / moving_std[c], -d_max, d_max))
        .collect();
    (mean, sigma_b, r, d)
}

/// Batch renormalization's training forward: x̂ = (x − μ_B)/σ_B·r + d, y = γ·x̂ + β (r, d from
/// [`renorm_corrections`]). Returns (y, μ_B, σ_B, r, d).
#[allow(clippy::type_complexity)]
pub fn renorm_forward_train(
    g: &Geometry,
    x: &[f64],
    moving_mean: &[f64],
    moving_std: &[f64],
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
    r_max: f64,
    d_max: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mean, sigma_b, r, d) = renorm_corrections(g, x, moving_mean, moving_std, eps, r_max, d_max);
    let xhat = |k: usize, c: usize| (x[k] - mean[c]) / sigma_b[c] * r[c] + d[c];
    let y = elements(g).map(|(k, c)| gamma[c] * xhat(k, c) + beta[c]).collect();
    (y, mean, sigma_b, r, d)
}

/// Batch renormalization's backward with r and d constants, by the chain rule term by term as
/// [`backward_train`] (Section 3 of Ioffe & Szegedy 2015) with ∂ℓ/∂x̂₀ = ∂ℓ/∂y·γ·r, where
/// x̂₀ = (x − μ_B)/σ_B and σ_B = √(σ²_B + ε): ∂ℓ/∂σ² = Σ ∂ℓ/∂x̂₀·(x − μ)·(−½)(σ² + ε)^(−3/2);
/// ∂ℓ/∂μ = Σ −∂ℓ/∂x̂₀/σ_B + ∂ℓ/∂σ²·Σ −2(x − μ)/m; ∂ℓ/∂x = ∂ℓ/∂x̂₀/σ_B + ∂ℓ/∂σ²·2(x − μ)/m + ∂ℓ/∂μ/m;
/// ∂ℓ/∂γ = Σ ∂ℓ/∂y·x̂ with x̂ = x̂₀·r + d; ∂ℓ/∂β = Σ ∂ℓ/∂y. Returns (dx, dγ, dβ).
#[allow(clippy::too_many_arguments)]
pub fn renorm_backward(
    g: &Geometry,
    x: &[f64],
    dy: &[f64],
    r: &[f64],
    d: &[f64],
    gamma: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let gamma_r: Vec<f64> = gamma.iter().zip(r).map(|(g, r)| g * r).collect();
    let (dx, _, dbeta) = backward_train(g, x, dy, &gamma_r, eps);
    let (mean, var) = mean_var(g, x);
    let mut dgamma = vec![0.0; g.channels];
    for (k, c) in elements(g) {
        let xhat = (x[k] - mean[c]) / (var[c] + eps).sqrt() * r[c] + d[c];
        dgamma[c] += dy[k] * xhat;
    }
    (dx, dgamma, dbeta)
}

/// Batch renormalization's inference: y = γ·(x − μ)/σ + β with the moving mean and standard
/// deviation.
pub fn renorm_eval(
    g: &Geometry,
    x: &[f64],
    moving_mean: &[f64],
    moving_std: &[f64],
    gamma: &[f64],
    beta: &[f64],
) -> Vec<f64> {
    elements(g)
        .map(|(k, c)| gamma[c] * (x[k] - moving_mean[c]) / moving_std[c] + beta[c])
        .collect()
}

/// Batch renormalization's moving-statistics update: μ ← μ + α(μ_B − μ), σ ← σ + α(σ_B − σ).
/// Returns (μ, σ).
pub fn renorm_update(
    moving_mean: &[f64],
    moving_std: &[f64],
    batch_mean: &[f64],
    sigma_b: &[f64],
    alpha: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mean = moving_mean
        .iter()
        .zip(batch_mean)
        .map(|(m, b)| m + alpha * (b - m))
        .collect();
    let std = moving_std
        .iter()
        .zip(sigma_b)
        .map(|(s, b)| s + alpha * (b - s))
        .collect();
    (mean, std)
}

/// Ghost batch norm's groups of a batch of `batch` examples in `g`: the outer rows of each group
/// of `virtual_batch` consecutive examples, the last group holding the rest. Example n owns outer
/// rows n·(outer/batch) to (n+1)·(outer/batch) (one row for channels-first layouts; its spatial
/// positions for channels-last ones).
pub fn ghost_group_rows(g: &Geometry, batch: usize, virtual_batch: usize) -> Vec<std::ops::Range<usize>> {
    let rows_per_example = g.outer / batch;
    (0..batch)
        .step_by(virtual_batch)
        .map(|first| {
            let end = (first + virtual_batch).min(batch);
            first * rows_per_example..end * rows_per_example
        })
        .collect()
}

/// Where outer rows `rows` of a tensor of geometry `g` lie in its buffer: element (o, c, i) is at
/// (o·C + c)·inner + i, so consecutive outer rows are one contiguous run.
fn rows_span(g: &Geometry, rows: &std::ops::Range<usize>) -> std::ops::Range<usize> {
    let row = g.channels * g.inner;
    rows.start * row..rows.end * row
}

/// The elements of outer rows `rows` of `x` as a tensor of their own geometry.
fn gather_rows(g: &Geometry, x: &[f64], rows: &std::ops::Range<usize>) -> (Geometry, Vec<f64>) {
    let sub = Geometry {
        outer: rows.len(),
        ..*g
    };
    (sub, x[rows_span(g, rows)].to_vec())
}

/// Writes a tensor gathered by [`gather_rows`] back into rows `rows` of `out`.
fn scatter_rows(g: &Geometry, rows: &std::ops::Range<usize>, sub: &[f64], out: &mut [f64]) {
    out[rows_span(g, rows)].copy_from_slice(sub);
}

/// Ghost batch norm's training forward (Hoffer et al. 2017): each group of `virtual_batch`
/// consecutive examples (of `batch`; see [`ghost_group_rows`]) normalized by Algorithm 1 with its
/// own μ and biased σ². Returns y and, per group, (μ, biased σ², values per channel).
#[allow(clippy::type_complexity)]
pub fn ghost_forward_train(
    g: &Geometry,
    batch: usize,
    virtual_batch: usize,
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<(Vec<f64>, Vec<f64>, usize)>) {
    let mut y = vec![0.0; x.len()];
    let mut groups = Vec::new();
    for rows in ghost_group_rows(g, batch, virtual_batch) {
        let (sg, xs) = gather_rows(g, x, &rows);
        let (ys, mean, var) = forward_train(&sg, &xs, gamma, beta, eps);
        scatter_rows(g, &rows, &ys, &mut y);
        groups.push((mean, var, sg.per_channel()));
    }
    (y, groups)
}

/// Ghost batch norm's training backward: each group's chain rule ([`backward_train`]) through
/// its own statistics; dγ and dβ summed over the groups. Returns (dx, dγ, dβ).
pub fn ghost_backward_train(
    g: &Geometry,
    batch: usize,
    virtual_batch: usize,
    x: &[f64],
    dy: &[f64],
    gamma: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut dx, mut dgamma, mut dbeta) = zero_grads(g);
    for rows in ghost_group_rows(g, batch, virtual_batch) {
        let (sg, xs) = gather_rows(g, x, &rows);
        let (_, dys) = gather_rows(g, dy, &rows);
        let (dxs, dgs, dbs) = backward_train(&sg, &xs, &dys, gamma, eps);
        scatter_rows(g, &rows, &dxs, &mut dx);
        for c in 0..g.channels {
            dgamma[c] += dgs[c];
            dbeta[c] += dbs[c];
        }
    }
    (dx, dgamma, dbeta)
}

/// Running statistics after one ghost mini-batch whose groups had (μ, biased σ², m) `groups`:
/// the mean over groups of μ and of the unbiased m/(m−1)·σ², each group weighing the same,
/// averaged in as [`running_update`] does (`Some(momentum)`, or cumulative with
/// `batches_seen` including this batch). Returns (mean, var).
pub fn ghost_running_update(
    running_mean: &[f64],
    running_var: &[f64],
    groups: &[(Vec<f64>, Vec<f64>, usize)],
    momentum: Option<f64>,
    batches_seen: u64,
) -> (Vec<f64>, Vec<f64>) {
    let w = momentum.unwrap_or(1.0 / batches_seen as f64);
    let n = groups.len() as f64;
    let mut mean = Vec::new();
    let mut var = Vec::new();
    for c in 0..running_mean.len() {
        let mu = groups.iter().map(|(m, _, _)| m[c]).sum::<f64>() / n;
        let v = groups
            .iter()
            .map(|(_, v, m)| *m as f64 / (*m as f64 - 1.0) * v[c])
            .sum::<f64>()
            / n;
        mean.push((1.0 - w) * running_mean[c] + w * mu);
        var.push((1.0 - w) * running_var[c] + w * v);
    }
    (mean, var)
}

/// Masked batch norm's selection, written out: the positions `(o, i)` whose mask entry
/// (`mask[o·inner + i]`, one per value of a channel, shared by all channels) is true, in order,
/// and `v` gathered at them into an `[m, C]` tensor (row r = the r-th selected position) with its
/// geometry. Masked batch norm is plain batch norm over these m rows, 0 at the other positions.
#[allow(clippy::type_complexity)]
pub fn masked_gather(g: &Geometry, v: &[f64], mask: &[bool]) -> (Geometry, Vec<f64>, Vec<(usize, usize)>) {
    assert_eq!(mask.len(), g.per_channel(), "one mask entry per value of a channel");
    let positions: Vec<(usize, usize)> = (0..g.outer)
        .flat_map(|o| (0..g.inner).map(move |i| (o, i)))
        .filter(|&(o, i)| mask[o * g.inner + i])
        .collect();
    let rows = Geometry {
        outer: positions.len(),
        channels: g.channels,
        inner: 1,
    };
    let gathered = positions
        .iter()
        .flat_map(|&(o, i)| (0..g.channels).map(move |c| v[at(g, o, c, i)]))
        .collect();
    (rows, gathered, positions)
}

/// The inverse of [`masked_gather`]'s gathering: the `[m, C]` values `rows` put back at their
/// positions of a tensor of geometry `g`, 0 everywhere else.
pub fn masked_scatter(g: &Geometry, rows: &[f64], positions: &[(usize, usize)]) -> Vec<f64> {
    let mut out = vec![0.0; g.len()];
    for (r, &(o, i)) in positions.iter().enumerate() {
        for c in 0..g.channels {
            out[at(g, o, c, i)] = rows[r * g.channels + c];
        }
    }
    out
}

/// Masked batch norm's statistics: per channel the mean μ_B and biased variance σ²_B of the m
/// selected values (two-pass, as [`mean_var`]). Returns (mean, var, m).
pub fn masked_mean_var(g: &Geometry, x: &[f64], mask: &[bool]) -> (Vec<f64>, Vec<f64>, usize) {
    let (rows, xs, _) = masked_gather(g, x, mask);
    let (mean, var) = mean_var(&rows, &xs);
    (mean, var, rows.outer)
}

/// Masked training forward: y = γ·(x − μ_B)/√(σ²_B + ε) + β at the selected positions, with μ_B
/// and σ²_B of the selected values ([`masked_mean_var`]); y = 0 at the other positions.
/// Returns (y, mean, biased var).
pub fn masked_forward_train(
    g: &Geometry,
    x: &[f64],
    mask: &[bool],
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (rows, xs, positions) = masked_gather(g, x, mask);
    let (y, mean, var) = forward_train(&rows, &xs, gamma, beta, eps);
    (masked_scatter(g, &y, &positions), mean, var)
}

/// Masked inference: y = γ·(x − mean)/√(var + ε) + β at the selected positions, 0 elsewhere.
#[allow(clippy::too_many_arguments)]
pub fn masked_forward_eval(
    g: &Geometry,
    x: &[f64],
    mask: &[bool],
    mean: &[f64],
    var: &[f64],
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> Vec<f64> {
    let (rows, xs, positions) = masked_gather(g, x, mask);
    masked_scatter(g, &forward_eval(&rows, &xs, mean, var, gamma, beta, eps), &positions)
}

/// A backward pass `f(rows, x, dy)` over the selected values of x and dy gathered into rows
/// ([`masked_gather`]), its dx scattered back (0 at the other positions). Returns (dx, dγ, dβ).
fn masked_backward(
    g: &Geometry,
    x: &[f64],
    mask: &[bool],
    dy: &[f64],
    f: impl FnOnce(&Geometry, &[f64], &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>),
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (rows, xs, positions) = masked_gather(g, x, mask);
    let (_, dys, _) = masked_gather(g, dy, mask);
    let (dx, dgamma, dbeta) = f(&rows, &xs, &dys);
    (masked_scatter(g, &dx, &positions), dgamma, dbeta)
}

/// Masked training backward: the chain rule of [`backward_train`] over the m selected values
/// (x and dy at the other positions enter nothing), dx = 0 at the other positions (the forward
/// writes a constant there); dγ = Σ dy·x̂ and dβ = Σ dy over the selected positions.
/// Returns (dx, dγ, dβ).
pub fn masked_backward_train(
    g: &Geometry,
    x: &[f64],
    mask: &[bool],
    dy: &[f64],
    gamma: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    masked_backward(g, x, mask, dy, |rows, x, dy| backward_train(rows, x, dy, gamma, eps))
}

/// Masked inference-mode backward with fixed statistics: [`backward_eval`] over the selected
/// values, dx = 0 at the other positions. Returns (dx, dγ, dβ).
#[allow(clippy::too_many_arguments)]
pub fn masked_backward_eval(
    g: &Geometry,
    x: &[f64],
    mask: &[bool],
    dy: &[f64],
    mean: &[f64],
    var: &[f64],
    gamma: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    masked_backward(g, x, mask, dy, |rows, x, dy| {
        backward_eval(rows, x, dy, mean, var, gamma, eps)
    })
}

/// The ReLU: t where t > 0, 0 where t ≤ 0; a NaN propagates.
pub fn relu(t: f64) -> f64 {
    if t > 0.0 || t.is_nan() {
        t
    } else {
        0.0
    }
}

/// What the ReLU keeps of its input t: t > 0 (and NaN, which propagates); its derivative there is
/// 1, elsewhere 0 (at t = 0 exactly too: PyTorch's convention).
pub fn relu_keeps(t: f64) -> bool {
    t > 0.0 || t.is_nan()
}

/// `relu(y + z)` of a batch norm output `y` and a residual `z` (`None`: `relu(y)`). Returns (the
/// output, its input t = y + z).
pub fn add_relu(y: &[f64], z: Option<&[f64]>) -> (Vec<f64>, Vec<f64>) {
    let t: Vec<f64> = match z {
        Some(z) => y.iter().zip(z).map(|(a, b)| a + b).collect(),
        None => y.to_vec(),
    };
    (t.iter().map(|&v| relu(v)).collect(), t)
}

/// Training forward of `relu(bn(x) + z)` (`z` `None`: `relu(bn(x))`): Algorithm 1
/// ([`forward_train`]), plus z, through the ReLU. Returns (y, t = bn(x) + z, mean, biased var).
#[allow(clippy::type_complexity)]
pub fn relu_forward_train(
    g: &Geometry,
    x: &[f64],
    z: Option<&[f64]>,
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (bn, mean, var) = forward_train(g, x, gamma, beta, eps);
    let (y, t) = add_relu(&bn, z);
    (y, t, mean, var)
}

/// Inference forward of `relu(bn(x) + z)` with given statistics ([`forward_eval`]). Returns
/// (y, t = bn(x) + z).
#[allow(clippy::too_many_arguments)]
pub fn relu_forward_eval(
    g: &Geometry,
    x: &[f64],
    z: Option<&[f64]>,
    mean: &[f64],
    var: &[f64],
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>) {
    add_relu(&forward_eval(g, x, mean, var, gamma, beta, eps), z)
}

/// The upstream gradient through the ReLU: dy where the forward's ReLU kept its input
/// (`kept`, [`relu_keeps`] of t), 0 elsewhere. It is also ∂ℓ/∂z of `relu(bn(x) + z)`.
pub fn relu_backward(dy: &[f64], kept: &[bool]) -> Vec<f64> {
    dy.iter().zip(kept).map(|(&d, &k)| if k { d } else { 0.0 }).collect()
}

/// Batch norm's backward `bn_backward` (from an upstream gradient to (dx, dγ, dβ)) behind a ReLU
/// that kept `kept`: the chain rule through the ReLU ([`relu_backward`]), then `bn_backward`.
/// Returns (dx, dγ, dβ, dz).
#[allow(clippy::type_complexity)]
fn behind_relu(
    dy: &[f64],
    kept: &[bool],
    bn_backward: impl FnOnce(&[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>),
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let dz = relu_backward(dy, kept);
    let (dx, dgamma, dbeta) = bn_backward(&dz);
    (dx, dgamma, dbeta, dz)
}

/// Training backward of `relu(bn(x) + z)` (or `relu(bn(x))`), given which outputs the forward's
/// ReLU kept: [`relu_backward`], then [`backward_train`]. Returns (dx, dγ, dβ, dz).
#[allow(clippy::type_complexity)]
pub fn relu_backward_train(
    g: &Geometry,
    x: &[f64],
    kept: &[bool],
    dy: &[f64],
    gamma: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    behind_relu(dy, kept, |dz| backward_train(g, x, dz, gamma, eps))
}

/// Inference-mode backward of `relu(bn(x) + z)` with fixed statistics, given which outputs the
/// forward's ReLU kept: [`relu_backward`], then [`backward_eval`]. Returns (dx, dγ, dβ, dz).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn relu_backward_eval(
    g: &Geometry,
    x: &[f64],
    kept: &[bool],
    dy: &[f64],
    mean: &[f64],
    var: &[f64],
    gamma: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    behind_relu(dy, kept, |dz| backward_eval(g, x, dz, mean, var, gamma, eps))
}
