#!/usr/bin/env python3
"""Time one SGD training step of the paper's MNIST MLP in PyTorch on CPU (float32).

Run (PyTorch is never a dependency of the project; see bench/README.md for the venv):

    /tmp/torch/bin/python bench/torch_mlp.py --threads 2
    /tmp/torch/bin/python bench/torch_mlp.py --threads 2 --steps 1000 --variants bn

Network 784-100-100-100-10, sigmoid hidden units, softmax cross-entropy
(`F.cross_entropy`), plain SGD (lr 0.5, no momentum, no weight decay), batch 60.

* baseline: (Linear with bias -> sigmoid) x 3, then Linear 100->10 with bias.
* bn:       (Linear without bias -> BatchNorm1d(100) -> sigmoid) x 3, then Linear 100->10
            with bias (BatchNorm1d defaults: eps 1e-5, momentum 0.1, affine).

The data are random (standard-normal pixels, uniform labels), pre-generated in memory
(`--batches`, default 1000, cycled), so no data loading is timed. Each timed step is
`zero_grad`, forward, loss, backward, `optimizer.step()`. After `--warmup` steps (200)
of each variant, `--steps` steps (3000) per variant are timed one by one, the variants
alternating in `--blocks` (10) blocks, and the median is reported, one JSON line per
variant
(`mean_ms_per_step` is the mean over the same steps, the statistic bnlab's summary.json reports):

    {"variant":"bn","ms_per_step":M,"mean_ms_per_step":A,"threads":T,"framework":"pytorch"}
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH, SIZES, LR = 60, [784, 100, 100, 100, 10], 0.5


def make_model(variant):
    layers = []
    for i in range(3):
        if variant == "bn":
            layers += [nn.Linear(SIZES[i], SIZES[i + 1], bias=False), nn.BatchNorm1d(SIZES[i + 1])]
        else:
            layers += [nn.Linear(SIZES[i], SIZES[i + 1])]
        layers.append(nn.Sigmoid())
    layers.append(nn.Linear(SIZES[3], SIZES[4]))
    return nn.Sequential(*layers)


def make_step(variant, data):
    """Return a function doing training step i of `variant` (fresh model, seed 1)."""
    torch.manual_seed(1)
    model = make_model(variant).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)

    def step(i):
        x, y = data[i % len(data)]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def time_alternating(steps, warmup, n_steps, blocks):
    """Seconds of each timed call of `steps[v](i)`, per variant v: `warmup` untimed steps of
    each, then `n_steps` timed steps each, the variants alternating in `blocks` blocks so that
    load from other processes hits all alike; the step counter runs on across blocks."""
    for v in steps:
        for i in range(warmup):
            steps[v](i)
    times = {v: [] for v in steps}
    per_block = max(1, math.ceil(n_steps / blocks))
    for blk in range(blocks):
        for v in steps:
            for i in range(warmup + blk * per_block, warmup + (blk + 1) * per_block):
                t0 = time.perf_counter()
                steps[v](i)
                times[v].append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--steps", type=int, default=3000, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=200, help="untimed steps before timing")
    ap.add_argument("--blocks", type=int, default=10, help="alternating timed blocks per variant")
    ap.add_argument("--batches", type=int, default=1000, help="pre-generated random batches (cycled)")
    ap.add_argument("--variants", nargs="+", default=["baseline", "bn"], choices=["baseline", "bn"])
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(BATCH, SIZES[0], generator=gen),
             torch.randint(0, SIZES[-1], (BATCH,), generator=gen)) for _ in range(args.batches)]
    steps = {v: make_step(v, data) for v in args.variants}
    times = time_alternating(steps, args.warmup, args.steps, args.blocks)
    for variant in args.variants:
        ms = statistics.median(times[variant]) * 1e3
        mean_ms = statistics.fmean(times[variant]) * 1e3
        print(json.dumps({"variant": variant, "ms_per_step": round(ms, 5), "mean_ms_per_step": round(mean_ms, 5),
                          "threads": torch.get_num_threads(), "framework": "pytorch"},
                         separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
