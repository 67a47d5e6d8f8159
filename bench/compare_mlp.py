#!/usr/bin/env python3
"""Side-by-side ms per training step of the paper's MLP: `bnlab paper-mlp` vs bench/torch_mlp.py.

Run from the repository root with the PyTorch venv's Python (see bench/README.md):

    cargo build --release -p bnlab
    /tmp/torch/bin/python bench/compare_mlp.py --threads 2 --steps 5000 --rounds 3

Each round runs `bnlab paper-mlp --steps S --eval-every S --variant V` once per variant (one
variant per process, so that it has all T threads: a run of both variants trains them side by
side, sharing the threads out; real Fashion-MNIST batches; bnlab's `ms_per_step` in
summary.json is training time / steps, evaluations excluded) and then `torch_mlp.py --steps S` (median of timed steps on random
in-memory data). Both sides' figures are means over the timed steps (a step preempted by
another process counts in full on both sides); bnlab's include gathering each batch from the
data set, PyTorch's do not. The table gives each side's median over the rounds and the ratio
bnlab / PyTorch. With `--before PATH` (e.g. main's release binary) that binary is timed too, in
each round right before `--bnlab`, for a before/after comparison under the same load.
This script itself needs only the standard library.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def bnlab_round(args, binary):
    ms = {}
    for variant in ("baseline", "bn"):
        with tempfile.TemporaryDirectory() as out:
            cmd = [binary, "paper-mlp", "--steps", str(args.steps), "--eval-every", str(args.steps),
                   "--variant", variant, "--threads", str(args.threads), "--quiet", "--out", out]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(out, "summary.json")) as f:
                ms[variant] = json.load(f)["variants"][variant]["ms_per_step"]
    return ms


def torch_round(args):
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [args.python, os.path.join(here, "torch_mlp.py"), "--threads", str(args.threads),
           "--steps", str(args.steps)]
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["variant"]: r["mean_ms_per_step"] for r in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bnlab", default="target/release/bnlab", help="path to the bnlab binary")
    ap.add_argument("--before", help="another bnlab binary timed in the same rounds (before/after)")
    ap.add_argument("--python", default=sys.executable, help="Python with torch (default: this one)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=5000, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians across them")
    args = ap.parse_args()

    before_runs, bn_runs, pt_runs = [], [], []
    for r in range(args.rounds):
        if args.before:
            print(f"round {r + 1}/{args.rounds}: bnlab before", file=sys.stderr, flush=True)
            before_runs.append(bnlab_round(args, args.before))
        print(f"round {r + 1}/{args.rounds}: bnlab", file=sys.stderr, flush=True)
        bn_runs.append(bnlab_round(args, args.bnlab))
        print(f"round {r + 1}/{args.rounds}: pytorch", file=sys.stderr, flush=True)
        pt_runs.append(torch_round(args))

    print(f"Threads: {args.threads}; {args.steps} steps per variant; median of {args.rounds} alternating rounds.\n")
    extra = " bnlab before ms/step | before / PyTorch |" if args.before else ""
    print(f"| variant |{extra} bnlab ms/step | PyTorch ms/step | bnlab / PyTorch |")
    print("|---|" + "---:|" * (5 if args.before else 3))
    for v in ("baseline", "bn"):
        b = statistics.median(run[v] for run in bn_runs)
        p = statistics.median(run[v] for run in pt_runs)
        row = f"| {v} |"
        if args.before:
            a = statistics.median(run[v] for run in before_runs)
            row += f" {a:.3f} | {a / p:.2f} |"
        print(f"{row} {b:.3f} | {p:.3f} | {b / p:.2f} |")
    print("\nrounds (bnlab, PyTorch" + (", bnlab before" if args.before else "") + "):")
    for i, (b, p) in enumerate(zip(bn_runs, pt_runs)):
        extra = f"  before {json.dumps(before_runs[i])}" if args.before else ""
        print(f"  bnlab {json.dumps(b)}  pytorch {json.dumps(p)}{extra}")


if __name__ == "__main__":
    main()
