#!/usr/bin/env python3
"""Side-by-side table of bnlab's fused BN + ReLU / BN + add + ReLU, its unfused sequence and PyTorch.

Run from the repository root with the PyTorch venv's Python (see bench/README.md):

    cargo build --release -p bnlab
    /tmp/torch/bin/python bench/compare_fused.py --threads 2
    /tmp/torch/bin/python bench/compare_fused.py --threads 2 --rounds 3 --torch-args=--no-compile

It runs `BNLAB bench --json --variant fused --dtype f32 --threads T` (the fused ops and, in the same run, our
unfused sequence for the same work) and bench/torch_fused.py --threads T (PyTorch eager and
`torch.compile`) alternately for --rounds rounds, takes the per-case median over the rounds and
prints a Markdown table: per case and op, bnlab fused, bnlab unfused, PyTorch eager and compiled
(ms), and the speed-ups of the fused op over each (their ms / fused ms). A case whose tensor is
larger than the last-level cache (--llc-mib, 32) is marked: the issue's 1.4x target over the
unfused sequence is for those. Cases missing on one side are shown as "–".
This script itself needs only the standard library.
"""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_kernels import DASH, alternate, f, median_cases, median_copy, parse_args, raw_run  # noqa: E402

OPS = ["fwd_train_relu", "backward_relu", "fwd_train_add_relu", "backward_add_relu"]
# (column suffix of the op name, heading); "" is bnlab's fused op.
OTHERS = [("_unfused", "bnlab unfused"), ("", "PyTorch eager"), ("_compiled", "PyTorch compiled")]


def geomean(xs):
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def main():
    ap = parse_args("torch_fused.py", "--no-compile")
    ap.add_argument("--llc-mib", type=float, default=32, help="last-level cache size in MiB")
    args = ap.parse_args()
    t = str(args.threads)
    bn_cmd, pt_cmd, bn_runs, pt_runs = alternate(args, "fused")
    bn, pt = median_cases(bn_runs), median_cases(pt_runs)
    cases = list(dict.fromkeys(k[:2] for k in list(bn) + list(pt)))

    print(f"Threads: {t} (bnlab reports {bn_runs[0][0].get('threads', DASH)}, "
          f"PyTorch reports {pt_runs[0][0].get('threads', DASH)}); median of {args.rounds} alternating rounds. "
          f"Copy bandwidth: bnlab {f(median_copy(bn_runs), 1)} GB/s, PyTorch {f(median_copy(pt_runs), 1)} GB/s.\n")
    head = " | ".join(f"{h} ms | fused speed-up" for _, h in OTHERS)
    print(f"| layout | shape | op | bnlab fused ms | {head} |")
    print("|---|---|---|---:|" + "---:|---:|" * len(OTHERS))
    rows, speedups = [], {h: [] for _, h in OTHERS}
    beyond_llc = []
    for layout, shape in cases:
        big = math.prod(shape) * 4 > args.llc_mib * 2**20
        for op in OPS:
            fused = bn.get((layout, shape, op))
            row = {"layout": layout, "shape": list(shape), "op": op, "beyond_llc": big, "bnlab_fused_ms": fused}
            cells = []
            for suffix, heading in OTHERS:
                side = bn if suffix == "_unfused" else pt
                ms = side.get((layout, shape, op + suffix))
                sp = ms / fused if ms and fused else None
                row[heading] = {"ms": ms, "speedup": sp}
                if sp:
                    speedups[heading].append(sp)
                    if big and suffix == "_unfused":
                        beyond_llc.append(f"{op} {sp:.2f}×")
                cells.append(f"{f(ms, 4)} | {f'{sp:.2f}×' if sp else DASH}")
            rows.append(row)
            name = f"{layout}{' (beyond LLC)' if big else ''}"
            print(f"| {name} | [{','.join(map(str, shape))}] | {op} | {f(fused, 4)} | {' | '.join(cells)} |")

    print()
    for _, heading in OTHERS:
        xs = speedups[heading]
        g = geomean(xs)
        span = f"{min(xs):.2f}×–{max(xs):.2f}×" if xs else DASH
        print(f"Fused vs {heading}: geometric mean {f'{g:.2f}×' if g else DASH} over {len(xs)} cases, "
              f"range {span}; slower than it on {sum(x < 1 for x in xs)}.")
    if beyond_llc:
        print(f"Beyond the last-level cache ({args.llc_mib:g} MiB), fused vs unfused: " + ", ".join(beyond_llc)
              + " (target ≥ 1.40×).")

    if args.json_out:
        raw = {"threads": args.threads, "rounds": args.rounds, "bnlab_cmd": bn_cmd, "pytorch_cmd": pt_cmd,
               "bnlab_runs": [raw_run(run) for run in bn_runs], "pytorch_runs": [raw_run(run) for run in pt_runs],
               "rows": rows}
        with open(args.json_out, "w") as fh:
            json.dump(raw, fh, indent=1)
        print(f"raw numbers written to {args.json_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
