#!/usr/bin/env python3
"""ms per training step of the paper's BN MLP: one process against `mpirun -np 2` data-parallel.

Run from the repository root (needs OpenMPI's mpirun and a bnlab built with the `mpi` feature):

    cargo build --release -p bnlab --features mpi
    python3 bench/compare_distributed.py --steps 3000 --rounds 2

Each round runs, in this order, `bnlab paper-mlp --variant bn --steps S --eval-every S` as one
process with T threads, as one process with 1 thread, and under `mpirun --oversubscribe -np 2`
with 1 thread per process, `--distributed`, with `--bn-sync on` and `--bn-sync off`. It reads
`ms_per_step` (training only), `collective_calls_per_step` and `bytes_sent_per_step` from each
run's summary.json and prints one table row per run with every round's figure.
This script needs only the standard library.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT_OK = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def runs(args):
    common = ["paper-mlp", "--variant", "bn", "--steps", str(args.steps), "--eval-every", str(args.steps),
              "--quiet"]
    mpi = [args.mpirun, "--oversubscribe", "-np", "2", args.bnlab]
    return [
        (f"1 process × {args.threads} threads", [args.bnlab, *common, "--threads", str(args.threads)]),
        ("1 process × 1 thread", [args.bnlab, *common, "--threads", "1"]),
        ("`mpirun -np 2` × 1 thread, `--bn-sync on`", [*mpi, *common, "--threads", "1", "--distributed"]),
        ("`mpirun -np 2` × 1 thread, `--bn-sync off`",
         [*mpi, *common, "--threads", "1", "--distributed", "--bn-sync", "off"]),
    ]


def run_one(cmd):
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, **ROOT_OK}
        subprocess.run([*cmd, "--out", out], check=True, stdout=subprocess.DEVNULL, env=env)
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)["variants"]["bn"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bnlab", default="target/release/bnlab", help="path to the bnlab binary (mpi feature)")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--threads", type=int, default=2, help="threads of the first one-process run")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    table = {name: [] for name, _ in runs(args)}
    for r in range(args.rounds):
        for name, cmd in runs(args):
            print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            table[name].append(run_one(cmd))

    print(f"{args.steps} steps; {args.rounds} rounds.\n")
    print("| run | ms/step, " + " / ".join(f"round {i + 1}" for i in range(args.rounds))
          + " | collective calls / step | bytes sent / step / process |")
    print("|---|---|---:|---:|")
    for name, rows in table.items():
        ms = " / ".join(f"{row['ms_per_step']:.3f}" for row in rows)
        last = rows[-1]
        print(f"| {name} | {ms} | {last['collective_calls_per_step']:g} | {last['bytes_sent_per_step']:,.0f} |")


if __name__ == "__main__":
    main()
