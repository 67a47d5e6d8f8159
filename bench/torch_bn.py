#!/usr/bin/env python3
"""Time PyTorch's CPU batch normalization in the format of `bnlab bench --json`.

Run (PyTorch is never a dependency of the project; see bench/README.md for the venv):

    /tmp/torch/bin/python bench/torch_bn.py --threads 2
    /tmp/torch/bin/python bench/torch_bn.py --threads 2 --reps 50 --warmup 5
    /tmp/torch/bin/python bench/torch_bn.py --threads 2 --reuse-memory   # no per-call page faults
    /tmp/torch/bin/python bench/torch_bn.py --threads 2 --dtype bf16      # bfloat16 tensors
    /tmp/torch/bin/python bench/torch_bn.py --threads 2 --only 'NCHW[128'  # one case

Output, one JSON object per line:

    {"copy_gbps": G, "threads": T}
    {"layout": "NCHW", "shape": [32,64,56,56], "op": "fwd_train", "dtype": "f32", "ms": M}
    ...

* copy_gbps: `dst.copy_(src)` of a 256 MiB float32 buffer, 2 x bytes / seconds
  (read + write counted), median of the repeats.
* shape is always the logical [N,C,H,W] (or [N,C]); `layout` says how it is stored.
* dtype (`--dtype`, default f32): the element type of x, dy, y and dx: `f32` (float32),
  `bf16` (bfloat16) or `f16` (float16). The weight, bias and running statistics stay float32
  whatever the dtype (PyTorch's convention for half inputs on the CPU, and what
  `bnlab bench --dtype` times: `Element::Param` is f32), as do dgamma and dbeta.
  NHWC tensors are `x.contiguous(memory_format=torch.channels_last)` (dy too).
* fwd_train: `F.batch_norm(x, running_mean, running_var, weight, bias, training=True,
  momentum=0.1)`, i.e. batch statistics, normalization and the running-stats update.
* fwd_eval:  the same with training=False (uses the running statistics).
* backward:  dx, dgamma, dbeta only, timed by calling
  `torch.ops.aten.native_batch_norm_backward` directly with the saved mean / invstd of a
  forward pass done once outside the timer (this is the kernel autograd itself calls for
  CPU batch norm, without the autograd-graph overhead). If that op is unavailable the
  script falls back to `torch.autograd.grad(y, [x, w, b], dy, retain_graph=True)`.
  Which one was used is written to stderr.

Every output is allocated by PyTorch on each call, as in ordinary eager use. With glibc,
a tensor above the mmap threshold (at most 32 MiB, e.g. NCHW [128,64,56,56] = 98 MiB) is
a fresh mmap, so every call pays a page fault per 4 KiB page, which here costs more than
the kernel itself. `--reuse-memory` re-executes the script with MALLOC_MMAP_MAX_=0 and a
huge MALLOC_TRIM_THRESHOLD_, so freed outputs are reused without page faults (as a caching
allocator would); this times the kernels rather than the OS. (The `.out` ops are no help:
`native_batch_norm_backward.out` is generated as the functional op plus a copy.)

Timing: after `--warmup` calls, each sample times a chunk of back-to-back calls lasting
>= ~1 ms (one call for the large cases) and divides by the chunk length; the reported ms
is the median over the samples. With `--reps 0` (default) the number of samples is chosen
so that each case takes about `--target-s` seconds (0.5 s), between 5 and 2000 samples.
The samples are taken in `--passes` (5) interleaved passes over all cases (the copy
included), so a burst of load from other processes spreads over every case instead of
ruining one; results are printed at the end. On a shared machine, run it when idle: with
T threads on T cores, one busy core stalls every parallel region.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

EPS = 1e-5
MOMENTUM = 0.1

# `--dtype` names (as `bnlab bench --dtype` spells them) and the torch type of x, dy, y and dx.
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# (layout, logical shape)
CASES = [
    ("NC", [60, 100]),
    ("NC", [256, 4096]),
    ("NCHW", [32, 64, 56, 56]),
    ("NHWC", [32, 64, 56, 56]),
    ("NCHW", [64, 256, 14, 14]),
    ("NHWC", [64, 256, 14, 14]),
    ("NCHW", [128, 64, 56, 56]),
]


def fmt(d):
    """JSON with `key: value, ` spacing but compact lists, like the bnlab output."""
    parts = []
    for k, v in d.items():
        val = json.dumps(v, separators=(",", ":")) if isinstance(v, list) else json.dumps(v)
        parts.append(f"{json.dumps(k)}: {val}")
    return "{" + ", ".join(parts) + "}"


def sig(x, digits=6):
    return float(f"{x:.{digits}g}")


def calibrate(fn, reps, warmup, target_s, passes):
    """Warm up; return (calls per sample, samples per pass)."""
    for _ in range(warmup):
        fn()
    est = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        est.append(time.perf_counter() - t0)
    est = max(min(est), 1e-7)
    inner = max(1, math.ceil(1e-3 / est))  # chunk tiny calls so each sample is >= ~1 ms
    n = reps if reps > 0 else min(2000, max(5, int(target_s / (est * inner))))
    return inner, max(1, math.ceil(n / passes))


def sample(fn, inner, n):
    """n samples of seconds per call of fn(), each timing `inner` back-to-back calls."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return out


def copy_fn():
    n = 256 * 1024 * 1024 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * n * 4  # bytes read + written


def make_case(layout, shape, gen, dtype=torch.float32):
    """x and dy of `dtype` (drawn in float32 and rounded to it), float32 weight, bias and
    running statistics."""
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    w = torch.rand(c, generator=gen) + 0.5
    b = torch.randn(c, generator=gen)
    rm = torch.zeros(c)
    rv = torch.ones(c)
    return x, dy, w, b, rm, rv


def forward_fn(x, w, b, rm, rv, training):
    return lambda: F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)


def backward_fn(x, dy, w, b, rm, rv):
    """Return (callable timing only the backward, description)."""
    try:
        op_fwd = torch.ops.aten.native_batch_norm
        op_bwd = torch.ops.aten.native_batch_norm_backward
        _, save_mean, save_invstd = op_fwd(x, w, b, rm.clone(), rv.clone(), True, MOMENTUM, EPS)
        mask = [True, True, True]

        def fn():
            return op_bwd(dy, x, w, rm, rv, save_mean, save_invstd, True, EPS, mask)

        fn()
        return fn, "aten.native_batch_norm_backward"
    except (AttributeError, RuntimeError) as e:
        print(f"native_batch_norm_backward unavailable ({e}); using autograd", file=sys.stderr)
    xg = x.detach().clone().requires_grad_(True)
    wg = w.detach().clone().requires_grad_(True)
    bg = b.detach().clone().requires_grad_(True)
    y = F.batch_norm(xg, rm.clone(), rv.clone(), wg, bg, True, MOMENTUM, EPS)

    def fn():
        return torch.autograd.grad(y, [xg, wg, bg], dy, retain_graph=True)

    return fn, "torch.autograd.grad"


def add_timing_args(ap):
    """The options of the timing loop ([`time_and_print`]), shared with bench/torch_fused.py."""
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--reps", type=int, default=0, help="timed samples per case (0: auto, ~--target-s per case)")
    ap.add_argument("--passes", type=int, default=5, help="interleaved passes over all cases (samples split among them)")
    ap.add_argument("--target-s", type=float, default=0.5, help="seconds per case when --reps 0")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    ap.add_argument("--copy-reps", type=int, default=25, help="repeats of the 256 MiB copy")


def time_and_print(entries, args):
    """Time each (layout, shape, op, fn) of entries and the copy; print the JSON lines."""
    copy, copy_bytes = copy_fn()
    copy_plan = (1, max(1, math.ceil(args.copy_reps / args.passes)))
    sample(copy, 1, 2)  # warm-up
    plans = [calibrate(e[3], args.reps, args.warmup, args.target_s, args.passes) for e in entries]

    # Interleave: every pass times every case, so a burst of load from other processes
    # spreads over all cases instead of ruining one.
    copy_s, samples = [], [[] for _ in entries]
    for _ in range(args.passes):
        copy_s += sample(copy, *copy_plan)
        for e, plan, acc in zip(entries, plans, samples):
            acc += sample(e[3], *plan)

    gbps = copy_bytes / statistics.median(copy_s) / 1e9
    print(fmt({"copy_gbps": sig(gbps, 4), "threads": torch.get_num_threads()}))
    for (layout, shape, op, _), acc in zip(entries, samples):
        # Scripts without --dtype time float32 tensors.
        row = {"layout": layout, "shape": shape, "op": op, "dtype": getattr(args, "dtype", "f32")}
        print(fmt(dict(row, ms=sig(statistics.median(acc) * 1e3))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_timing_args(ap)
    ap.add_argument("--dtype", choices=list(DTYPES), default="f32",
                    help="element type of x, dy, y, dx (parameters and statistics stay float32)")
    ap.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                    help="time only the cases whose name (LAYOUT[N,C,...], e.g. NHWC[64,256,14,14]) "
                         "contains one of these strings, as `bnlab bench --only` (repeatable)")
    ap.add_argument("--reuse-memory", action="store_true",
                    help="re-exec with glibc malloc never using mmap nor trimming (no per-call page faults)")
    args = ap.parse_args()
    if args.reuse_memory and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40))
        os.execve(sys.executable, [sys.executable] + sys.argv, env)  # glibc reads these at start-up

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    entries, used = [], set()  # (layout, shape, op, fn)
    for layout, shape in CASES:
        x, dy, w, b, rm, rv = make_case(layout, shape, gen, DTYPES[args.dtype])
        name = f"{layout}[{','.join(map(str, shape))}]"
        if args.only and not any(o in name for o in args.only):
            continue  # drawn all the same, so every case gets the same data with or without --only
        bwd, how = backward_fn(x, dy, w, b, rm, rv)
        used.add(how)
        entries += [
            (layout, shape, "fwd_train", forward_fn(x, w, b, rm, rv, training=True)),
            (layout, shape, "fwd_eval", forward_fn(x, w, b, rm, rv, training=False)),
            (layout, shape, "backward", bwd),
        ]
    time_and_print(entries, args)
    print(f"backward timed with: {', '.join(sorted(used))}", file=sys.stderr)


if __name__ == "__main__":
    main()
