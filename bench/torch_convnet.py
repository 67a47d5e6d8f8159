#!/usr/bin/env python3
"""Time one SGD training step of `bnlab accelerate`'s conv net in PyTorch on CPU (float32).

Run (PyTorch is never a dependency of the project; see bench/README.md for the venv):

    /tmp/torch/bin/python bench/torch_convnet.py --threads 2
    /tmp/torch/bin/python bench/torch_convnet.py --threads 2 --variants bn-baseline bn-x5

The network of `crates/bnlab/src/experiments/accelerate.rs` (defaults C1=8, C2=16, H=100),
on 1x28x28 images, batch 64:

    conv 5x5 pad 2 (1->C1) -> [BN2d] -> act -> maxpool 2/2 -> [LRN]
    conv 5x5 pad 2 (C1->C2) -> [BN2d] -> act -> maxpool 2/2 -> [LRN]
    flatten -> [dropout 0.5] -> linear C2*49->H -> [BN1d] -> act -> [dropout 0.5] -> linear H->10

Layers followed by BN have no bias. LRN is `nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)`
(bnlab's `Lrn::alexnet`). Variants as in bnlab: `baseline` (no BN, ReLU, dropout, LRN),
`bn-baseline` (the same with BN), `bn-x5` (BN, no dropout, no LRN), `bn-x5-sigmoid`,
`baseline-sigmoid`; the learning rate does not change the cost of a step and is fixed.
SGD with momentum 0.9 and weight decay 5e-4, softmax cross-entropy.

Data are random (pixels uniform in [0, 1], uniform labels), pre-generated in memory
(`--batches`, cycled), so no data loading is timed. Each timed step is `zero_grad`,
forward, loss, backward, `optimizer.step()`. After `--warmup` steps of each variant,
`--steps` steps per variant are timed one by one, the variants alternating in `--blocks`
blocks; the median and the mean are reported, one JSON line per variant:

    {"variant":"bn-baseline","ms_per_step":M,"mean_ms_per_step":A,"threads":T,"framework":"pytorch"}
"""
import argparse
import json
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_mlp import time_alternating  # same directory: the timing loop of both scripts

BATCH, CLASSES = 64, 10
VARIANTS = {
    # name: (bn, sigmoid, dropout, lrn)
    "baseline": (False, False, True, True),
    "bn-baseline": (True, False, True, True),
    "bn-x5": (True, False, False, False),
    "bn-x30": (True, False, False, False),
    "bn-x5-sigmoid": (True, True, False, False),
    "baseline-sigmoid": (False, True, True, True),
}


def make_model(variant, c1, c2, hidden):
    bn, sigmoid, dropout, lrn = VARIANTS[variant]
    act = nn.Sigmoid if sigmoid else nn.ReLU
    layers, cin, hw = [], 1, 28
    for cout in (c1, c2):
        layers.append(nn.Conv2d(cin, cout, 5, padding=2, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers += [act(), nn.MaxPool2d(2, 2)]
        if lrn:
            layers.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))
        cin, hw = cout, hw // 2
    layers.append(nn.Flatten())
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(cin * hw * hw, hidden, bias=not bn))
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(act())
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(hidden, CLASSES))
    return nn.Sequential(*layers)


def make_step(variant, data, args):
    """Return a function doing training step i of `variant` (fresh model, seed 1)."""
    torch.manual_seed(1)
    model = make_model(variant, args.c1, args.c2, args.hidden).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(i):
        x, y = data[i % len(data)]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--steps", type=int, default=400, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps before timing")
    ap.add_argument("--blocks", type=int, default=4, help="alternating timed blocks per variant")
    ap.add_argument("--batches", type=int, default=50, help="pre-generated random batches (cycled)")
    ap.add_argument("--c1", type=int, default=8, help="channels of the first conv")
    ap.add_argument("--c2", type=int, default=16, help="channels of the second conv")
    ap.add_argument("--hidden", type=int, default=100, help="width of the hidden linear layer")
    ap.add_argument("--variants", nargs="+", default=["bn-baseline"], choices=sorted(VARIANTS))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(BATCH, 1, 28, 28, generator=gen),
             torch.randint(0, CLASSES, (BATCH,), generator=gen)) for _ in range(args.batches)]
    steps = {v: make_step(v, data, args) for v in args.variants}
    times = time_alternating(steps, args.warmup, args.steps, args.blocks)
    for variant in args.variants:
        ms = statistics.median(times[variant]) * 1e3
        mean = statistics.fmean(times[variant]) * 1e3
        print(json.dumps({"variant": variant, "ms_per_step": round(ms, 4),
                          "mean_ms_per_step": round(mean, 4),
                          "threads": torch.get_num_threads(), "framework": "pytorch"},
                         separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
