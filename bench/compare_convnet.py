#!/usr/bin/env python3
"""Side-by-side ms per training step of `bnlab accelerate`'s conv net vs bench/torch_convnet.py.

Run from the repository root with the PyTorch venv's Python (see bench/README.md):

    cargo build --release -p bnlab
    /tmp/torch/bin/python bench/compare_convnet.py --threads 2 --steps 300 --rounds 5

Each round runs `bnlab accelerate --variants V --steps S --eval-every S` once per variant (one
variant per process, so that it has all T threads; real Fashion-MNIST batches; bnlab's
`ms_per_step` in summary.json is the mean over the training steps, batch gathering included,
evaluations excluded) and then `torch_convnet.py --steps S --variants ...` (the same net, batch
64, SGD with momentum and weight decay, on random in-memory data; its median step). The table
gives every round's figures, each side's median over the rounds and the ratio bnlab / PyTorch.
With `--before PATH` (e.g. main's release binary) that binary is timed too, in each round right
before `--bnlab`, for a before/after comparison under the same load.
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
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as out:
            cmd = [binary, "accelerate", "--variants", variant, "--steps", str(args.steps),
                   "--eval-every", str(args.steps), "--threads", str(args.threads), "--quiet", "--out", out]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(out, "summary.json")) as f:
                ms[variant] = json.load(f)["variants"][variant]["ms_per_step"]
    return ms


def torch_round(args):
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [args.python, os.path.join(here, "torch_convnet.py"), "--threads", str(args.threads),
           "--steps", str(args.steps), "--variants", *args.variants]
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["variant"]: r["ms_per_step"] for r in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bnlab", default="target/release/bnlab", help="path to the bnlab binary")
    ap.add_argument("--before", help="another bnlab binary timed in the same rounds (before/after)")
    ap.add_argument("--python", default=sys.executable, help="Python with torch (default: this one)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=300, help="training steps per variant and round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians across them")
    ap.add_argument("--variants", nargs="+", default=["baseline", "bn-baseline", "bn-x5"])
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

    print(f"Threads: {args.threads}; {args.steps} steps per variant; {args.rounds} alternating rounds.\n")
    rounds = f"rounds 1–{args.rounds}"
    extra = f" bnlab before ms/step, {rounds} | before / PyTorch (medians) |" if args.before else ""
    print(f"| variant |{extra} bnlab ms/step, {rounds} | PyTorch ms/step, {rounds} | bnlab / PyTorch (medians) |")
    print("|---|" + ("---|---:|" if args.before else "") + "---|---|---:|")
    figures = lambda xs: " / ".join(f"{x:.2f}" for x in xs)
    for v in args.variants:
        b = [run[v] for run in bn_runs]
        p = [run[v] for run in pt_runs]
        row = f"| {v} |"
        if args.before:
            a = [run[v] for run in before_runs]
            row += f" {figures(a)} | {statistics.median(a) / statistics.median(p):.2f} |"
        ratio = statistics.median(b) / statistics.median(p)
        print(f"{row} {figures(b)} | {figures(p)} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
