#!/usr/bin/env python3
"""Time PyTorch's CPU `relu(bn(x))` and `relu(bn(x) + z)` in the format of `bnlab bench --json`.

Run (PyTorch is never a dependency of the project; see bench/README.md for the venv):

    /tmp/torch/bin/python bench/torch_fused.py --threads 2
    /tmp/torch/bin/python bench/torch_fused.py --threads 2 --no-compile   # eager only
    /tmp/torch/bin/python bench/torch_fused.py --threads 2 --dtype bf16   # bfloat16 x, z, dy

Output, one JSON object per line (the copy line and the cases of bench/torch_bn.py):

    {"copy_gbps": G, "threads": T}
    {"layout": "NCHW", "shape": [32,64,56,56], "op": "fwd_train_relu", "ms": M}
    {"layout": "NCHW", "shape": [32,64,56,56], "op": "fwd_train_relu_compiled", "ms": M}
    ...

The ops, each as PyTorch eager runs it (the name alone) and as `torch.compile` of the same
function (`_compiled`; left out with --no-compile or when compilation fails, which is written to
stderr):

* fwd_train_relu: `relu(F.batch_norm(x, running_mean, running_var, w, b, training=True))`
  (batch statistics, normalization, running-statistics update, then the ReLU). Eager runs it as
  torchvision's ResNet does, the ReLU in place on batch norm's output.
* fwd_train_add_relu: the same with the residual, `relu(bn(x) + z)` (eager: `out += z` and the
  ReLU in place, as torchvision's residual blocks do).
* backward_relu: the backward of the ReLU then batch norm's: `aten.threshold_backward(dy, y, 0)`
  (g = dy where y > 0, the gradient autograd passes on) and `aten.native_batch_norm_backward`
  from g with the saved mean and inverse standard deviation of a forward done once outside the
  timer: the kernels autograd calls, without the autograd graph's own overhead.
* backward_add_relu: the same work (the addition's backward passes g on as dz, no computation).

The compiled backward is `torch.compile` of that pair of aten calls (Inductor decomposes batch
norm's backward and fuses it with the ReLU's). NHWC tensors are `channels_last` (dy and z too).
Timing and the copy line as in bench/torch_bn.py (whose helpers this script imports):
interleaved passes, per case the median over samples of back-to-back calls.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_bn import CASES, DTYPES, EPS, MOMENTUM, add_timing_args, make_case, time_and_print  # noqa: E402

aten = torch.ops.aten
# Each case compiles the two functions again (other shapes); dynamo's default limit of 8
# compilations per function would silently run the later cases eager. Fail loudly instead.
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.fail_on_recompile_limit_hit = True


def forward_eager(x, z, w, b, rm, rv):
    """relu(bn(x)) or relu(bn(x) + z), in place after batch norm as torchvision does."""
    out = F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)
    if z is not None:
        out += z
    return out.relu_()


def forward_pure(x, z, w, b, rm, rv):
    """The same, out of place (what torch.compile traces)."""
    out = F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)
    if z is not None:
        out = out + z
    return F.relu(out)


def backward_pair(dy, y, x, w, rm, rv, save_mean, save_invstd):
    """The ReLU's backward, then batch norm's: dx, dγ, dβ (the residual's dz is g itself)."""
    g = aten.threshold_backward(dy, y, 0)
    return aten.native_batch_norm_backward(g, x, w, rm, rv, save_mean, save_invstd, True, EPS, [True, True, True])


def case_entries(layout, shape, gen, compile_ok, dtype=torch.float32):
    """(op, fn) of one case: eager and, when it compiles, torch.compile of the same; x, dy and z
    of `dtype` (parameters and statistics float32)."""
    x, dy, w, b, rm, rv = make_case(layout, shape, gen, dtype)
    z = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    if layout == "NHWC":
        z = z.contiguous(memory_format=torch.channels_last)
    entries = []
    for name, res in (("relu", None), ("add_relu", z)):
        _, save_mean, save_invstd = aten.native_batch_norm(x, w, b, rm.clone(), rv.clone(), True, MOMENTUM, EPS)
        y = forward_eager(x, res, w, b, rm.clone(), rv.clone())
        entries.append((f"fwd_train_{name}", lambda res=res: forward_eager(x, res, w, b, rm, rv)))
        bwd_args = (dy, y, x, w, rm, rv, save_mean, save_invstd)
        entries.append((f"backward_{name}", lambda a=bwd_args: backward_pair(*a)))
        if not compile_ok:
            continue
        try:
            fwd_c = torch.compile(forward_pure, dynamic=False)
            bwd_c = torch.compile(backward_pair, dynamic=False)
            fwd_c(x, res, w, b, rm, rv)
            bwd_c(*bwd_args)
        except Exception as e:  # noqa: BLE001 - any failure of the compiler leaves eager only
            print(f"torch.compile failed on {layout} {shape} {name} ({type(e).__name__}: {e}); eager only",
                  file=sys.stderr)
            continue
        entries.append((f"fwd_train_{name}_compiled", lambda res=res, f=fwd_c: f(x, res, w, b, rm, rv)))
        entries.append((f"backward_{name}_compiled", lambda a=bwd_args, f=bwd_c: f(*a)))
    return entries


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_timing_args(ap)
    ap.add_argument("--no-compile", action="store_true", help="time eager PyTorch only")
    ap.add_argument("--dtype", choices=list(DTYPES), default="f32",
                    help="element type of x, dy, z and the outputs (parameters and statistics stay float32)")
    ap.add_argument("--only", action="append", default=[],
                    help="time only the cases whose name LAYOUT[N,C,...] contains this (repeatable)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    entries = []  # (layout, shape, op, fn)
    for layout, shape in CASES:
        name = f"{layout}[{','.join(map(str, shape))}]"
        if args.only and not any(o in name for o in args.only):
            continue
        for op, fn in case_entries(layout, shape, gen, not args.no_compile, DTYPES[args.dtype]):
            entries.append((layout, shape, op, fn))
    time_and_print(entries, args)


if __name__ == "__main__":
    main()
