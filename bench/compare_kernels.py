#!/usr/bin/env python3
"""Side-by-side table of `bnlab bench` and PyTorch's CPU batch norm (bench/torch_bn.py).

Run from the repository root with the PyTorch venv's Python (see bench/README.md):

    cargo build --release -p bnlab
    /tmp/torch/bin/python bench/compare_kernels.py --threads 2
    /tmp/torch/bin/python bench/compare_kernels.py --threads 2 --rounds 5 \\
        --torch-args=--reuse-memory --json-out /tmp/compare.json
    /tmp/torch/bin/python bench/compare_kernels.py --threads 2 --dtype bf16   # bf16 tensors on both sides

It runs `BNLAB bench --json --threads T` and `torch_bn.py --threads T` alternately
(bnlab, torch, bnlab, torch, ...) for --rounds rounds, takes the per-case median over the
rounds and prints a Markdown table. --dtype (f32, bf16 or f16; default f32) is passed to
both sides: x, dy, y, dx of that type, parameters and statistics float32 on both. GB/s counts
whole tensor transfers at that type's element size: 3 x tensor bytes for fwd_train (read x
for the statistics, read x + write y), 2 for fwd_eval, 5 for backward. Cases missing on one
side are shown as "–".
This script itself needs only the standard library.
"""
import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys

TRANSFERS = {"fwd_train": 3, "fwd_eval": 2, "backward": 5}
OUT_OF_CACHE = ("NCHW", (128, 64, 56, 56))
# Bytes of one element of each --dtype.
ELEMENT_BYTES = {"f32": 4, "bf16": 2, "f16": 2}
DASH = "–"


def run_json(cmd, dtype="f32"):
    """Run cmd, return (copy line dict, {(layout, shape, op): ms}) from its JSON lines (rows of
    another dtype than `dtype` left out; a row without one is float32)."""
    header, cases = {}, {}
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    except OSError as e:
        print(f"cannot run {cmd[0]}: {e}", file=sys.stderr)
        return header, cases
    if proc.returncode != 0:
        print(f"warning: {' '.join(cmd)} exited with {proc.returncode}", file=sys.stderr)
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "copy_gbps" in d:
            header = d
        elif {"layout", "shape", "op", "ms"} <= d.keys() and d.get("dtype", "f32") == dtype:
            cases[(d["layout"], tuple(d["shape"]), d["op"])] = float(d["ms"])
    return header, cases


def median_cases(runs):
    keys = []
    for _, cases in runs:
        keys += [k for k in cases if k not in keys]
    return {k: statistics.median([c[k] for _, c in runs if k in c]) for k in keys}


def median_copy(runs):
    vals = [h["copy_gbps"] for h, _ in runs if "copy_gbps" in h]
    return statistics.median(vals) if vals else None


def raw_run(run):
    header, cases = run
    return {"header": header,
            "cases": [{"layout": k[0], "shape": list(k[1]), "op": k[2], "ms": ms} for k, ms in cases.items()]}


def gbps(key, ms, dtype="f32"):
    if ms is None or ms <= 0:
        return None
    return TRANSFERS.get(key[2], 0) * math.prod(key[1]) * ELEMENT_BYTES[dtype] / (ms * 1e-3) / 1e9


def f(x, nd=3):
    if x is None:
        return DASH
    return f"{x:.{nd}f}" if abs(x) < 10 else f"{x:.{max(nd - 2, 1)}f}"


def parse_args(script, torch_args_example):
    """The options of a side-by-side script: bnlab's and PyTorch's commands, threads, rounds."""
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.split("\n")[0])
    ap.add_argument("--bnlab", default="target/release/bnlab", help="path to the bnlab binary")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; per-case median across them")
    ap.add_argument("--python", default=sys.executable, help="Python with torch (default: this one)")
    ap.add_argument("--torch-script", default=os.path.join(here, script))
    ap.add_argument("--torch-args", default="", help=f"extra arguments for {script}, e.g. {torch_args_example}")
    ap.add_argument("--bnlab-args", default="", help="extra arguments for bnlab bench")
    ap.add_argument("--dtype", choices=list(ELEMENT_BYTES), default="f32",
                    help="element type of the tensors on both sides (passed to the PyTorch script "
                         "when not f32, so that script must take --dtype for the others)")
    ap.add_argument("--json-out", help="write all raw numbers to this file")
    return ap


def alternate(args, variant):
    """Run `bnlab bench --variant VARIANT` and the torch script alternately for args.rounds rounds:
    (bnlab command, PyTorch command, bnlab runs, PyTorch runs), each run as run_json returns it."""
    t = str(args.threads)
    bn_cmd = [args.bnlab, "bench", "--json", "--variant", variant, "--dtype", args.dtype, "--threads", t]
    bn_cmd += shlex.split(args.bnlab_args)
    pt_cmd = [args.python, args.torch_script, "--threads", t] + shlex.split(args.torch_args)
    if args.dtype != "f32":
        pt_cmd += ["--dtype", args.dtype]
    bn_runs, pt_runs = [], []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: bnlab", file=sys.stderr, flush=True)
        bn_runs.append(run_json(bn_cmd, args.dtype))
        print(f"round {r + 1}/{args.rounds}: pytorch", file=sys.stderr, flush=True)
        pt_runs.append(run_json(pt_cmd, args.dtype))
    return bn_cmd, pt_cmd, bn_runs, pt_runs


def main():
    args = parse_args("torch_bn.py", "--reuse-memory").parse_args()
    t = str(args.threads)
    bn_cmd, pt_cmd, bn_runs, pt_runs = alternate(args, "bn")

    bn, pt = median_cases(bn_runs), median_cases(pt_runs)
    bn_copy, pt_copy = median_copy(bn_runs), median_copy(pt_runs)
    keys = list(pt) + [k for k in bn if k not in pt]  # torch_bn.py's case order first
    cases = list(dict.fromkeys(k[:2] for k in keys))
    ops = list(TRANSFERS)
    keys.sort(key=lambda k: (cases.index(k[:2]), ops.index(k[2]) if k[2] in ops else len(ops)))

    print(f"Threads: {t} (bnlab reports {bn_runs[0][0].get('threads', DASH)}, "
          f"PyTorch reports {pt_runs[0][0].get('threads', DASH)}); {args.dtype} tensors on both sides; "
          f"median of {args.rounds} alternating rounds.\n")
    print("| layout | shape | op | bnlab ms | PyTorch ms | speed-up | bnlab GB/s | PyTorch GB/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    rows, ratios = [], []
    for k in keys:
        b, p = bn.get(k), pt.get(k)
        sp = p / b if b and p else None
        if sp:
            ratios.append(sp)
        row = {"layout": k[0], "shape": list(k[1]), "op": k[2], "bnlab_ms": b, "pytorch_ms": p,
               "speedup": sp, "bnlab_gbps": gbps(k, b, args.dtype), "pytorch_gbps": gbps(k, p, args.dtype)}
        rows.append(row)
        shape = "[" + ",".join(map(str, k[1])) + "]"
        sp_s = f"{sp:.2f}×" if sp else DASH
        print(f"| {k[0]} | {shape} | {k[2]} | {f(b, 4)} | {f(p, 4)} | {sp_s} | "
              f"{f(row['bnlab_gbps'], 1)} | {f(row['pytorch_gbps'], 1)} |")

    geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
    print()
    print(f"Geometric-mean speed-up (PyTorch ms / bnlab ms) over {len(ratios)} cases: "
          f"{f'{geo:.2f}×' if geo else DASH}. Copy bandwidth: bnlab {f(bn_copy, 1)} GB/s, "
          f"PyTorch {f(pt_copy, 1)} GB/s.")
    fracs = []
    for row in rows:
        if (row["layout"], tuple(row["shape"])) != OUT_OF_CACHE:
            continue
        fb = row["bnlab_gbps"] / bn_copy if row["bnlab_gbps"] and bn_copy else None
        fp = row["pytorch_gbps"] / pt_copy if row["pytorch_gbps"] and pt_copy else None
        row["bnlab_copy_fraction"], row["pytorch_copy_fraction"] = fb, fp
        fracs.append(f"{row['op']} {f'{fb:.0%}' if fb else DASH} (PyTorch {f'{fp:.0%}' if fp else DASH} of its own)")
    if fracs:
        print(f"Out of cache, {OUT_OF_CACHE[0]} [{','.join(map(str, OUT_OF_CACHE[1]))}], "
              f"fraction of bnlab's copy bandwidth reached by bnlab: " + "; ".join(fracs) + ".")

    if args.json_out:
        raw = {
            "threads": args.threads, "rounds": args.rounds, "dtype": args.dtype,
            "bnlab_cmd": bn_cmd, "pytorch_cmd": pt_cmd,
            "bnlab_runs": [raw_run(run) for run in bn_runs],
            "pytorch_runs": [raw_run(run) for run in pt_runs],
            "bnlab_copy_gbps": bn_copy, "pytorch_copy_gbps": pt_copy,
            "geomean_speedup": geo, "rows": rows,
        }
        with open(args.json_out, "w") as fh:
            json.dump(raw, fh, indent=1)
        print(f"raw numbers written to {args.json_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
