#!/usr/bin/env python3
"""The table of BENCHMARKS.md's "Batch-norm variants vs plain batch norm" section.

Reads the JSON lines of several rounds of `bnlab bench --json` (the whole default run: every
variant, every case), or runs those rounds itself, and prints a Markdown table: per case, each
variant's time against plain batch norm's in the same round (frozen fwd_train against plain
fwd_eval, every other ratio op against the same op), the median over rounds; then each of issue
16's targets, met or missed, with the worst case's ratio.

    python3 bench/variants_table.py ROUND.jsonl ...          # saved rounds (one or more per file)
    python3 bench/variants_table.py --rounds 4 --threads 2   # runs target/release/bnlab 4 times
    python3 bench/variants_table.py --rounds 4 --threads 1 --cpu-time   # on a busy machine

A round starts at its first line (`{"copy_gbps": ..., "threads": ...}`), so several rounds may
share a file. Only the standard library is needed.
"""

import argparse
import json
import statistics
import subprocess
import sys

# (column, variant, its op, plain batch norm's op it is divided by)
RATIOS = [
    ("frozen fwd ÷ plain eval", "frozen", "fwd_train", "fwd_eval"),
    ("frozen bwd", "frozen", "backward", "backward"),
    ("renorm fwd", "renorm", "fwd_train", "fwd_train"),
    ("renorm bwd", "renorm", "backward", "backward"),
    ("ghost fwd", "ghost", "fwd_train", "fwd_train"),
    ("ghost bwd", "ghost", "backward", "backward"),
    ("masked fwd", "masked", "fwd_train", "fwd_train"),
    ("masked bwd", "masked", "backward", "backward"),
    ("masked-random fwd", "masked-random", "fwd_train", "fwd_train"),
    ("masked-random bwd", "masked-random", "backward", "backward"),
]

# Issue 16's targets: (what, the columns it covers, the largest ratio that meets it).
TARGETS = [
    ("frozen training forward no slower than plain inference", ["frozen fwd ÷ plain eval"], 1.0),
    ("frozen backward ≤ 0.6× plain backward", ["frozen bwd"], 0.6),
    ("renorm within 1.15× plain", ["renorm fwd", "renorm bwd"], 1.15),
    ("ghost within 1.15× plain", ["ghost fwd", "ghost bwd"], 1.15),
    (
        "masked within 1.3× plain (both masks)",
        ["masked fwd", "masked bwd", "masked-random fwd", "masked-random bwd"],
        1.3,
    ),
]


def case_name(row):
    return f"{row['layout']}[{','.join(str(d) for d in row['shape'])}]"


def parse_rounds(lines):
    """Rounds of rows: {(variant, case, op): ms}, a new round at each header line."""
    rounds, current = [], None
    for line in lines:
        line = line.strip()
        if not line:
            continue
        row = json.loads(line)
        if "copy_gbps" in row:
            current = {}
            rounds.append(current)
            continue
        if current is None:
            sys.exit("variants_table.py: a row before the first header line")
        if row.get("dtype", "f32") != "f32":
            continue  # the table compares f32 rows (`bnlab bench --dtype` adds bf16, f16)
        current[(row.get("variant", "bn"), case_name(row), row["op"])] = row["ms"]
    return rounds


def run_rounds(bnlab, rounds, threads, cpu_time, json_out):
    lines = []
    cmd = [bnlab, "bench", "--threads", str(threads), "--json", "--dtype", "f32"]
    cmd += ["--cpu-time"] if cpu_time else []
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}: {' '.join(cmd)}", file=sys.stderr)
        out = subprocess.run(
            cmd,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        lines.extend(out.splitlines())
    if json_out:
        with open(json_out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return lines


def ratio_table(rounds):
    """{case: {column: [ratio per round]}} and the plain BN medians {case: {op: ms}}, in case order."""
    cases = []
    for rnd in rounds:
        for (variant, case, _op) in rnd:
            if variant == "bn" and case not in cases:
                cases.append(case)
    ratios, plain = {}, {}
    for case in cases:
        ratios[case] = {}
        for column, variant, op, base in RATIOS:
            vals = [
                rnd[(variant, case, op)] / rnd[("bn", case, base)]
                for rnd in rounds
                if (variant, case, op) in rnd and ("bn", case, base) in rnd
            ]
            if vals:
                ratios[case][column] = vals
        plain[case] = {
            op: statistics.median(rnd[("bn", case, op)] for rnd in rounds if ("bn", case, op) in rnd)
            for op in ("fwd_train", "fwd_eval", "backward")
            if any(("bn", case, op) in rnd for rnd in rounds)
        }
    return cases, ratios, plain


def fmt(vals):
    return f"{statistics.median(vals):.2f}" if vals else "–"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="files of JSON lines of `bnlab bench --json` rounds")
    p.add_argument("--rounds", type=int, default=0, help="run this many rounds instead of reading files")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bnlab", default="target/release/bnlab")
    p.add_argument("--cpu-time", action="store_true", help="with --rounds: time in CPU time (needs --threads 1)")
    p.add_argument("--json-out", help="with --rounds: also save the rounds' JSON lines here")
    a = p.parse_args()
    if a.rounds > 0:
        lines = run_rounds(a.bnlab, a.rounds, a.threads, a.cpu_time, a.json_out)
    elif a.files:
        lines = [line for f in a.files for line in open(f)]
    else:
        p.error("give files of rounds or --rounds N")
    rounds = parse_rounds(lines)
    if not rounds:
        sys.exit("variants_table.py: no rounds")
    cases, ratios, plain = ratio_table(rounds)

    print(f"Medians over {len(rounds)} rounds of each variant's time ÷ plain batch norm's in the same round.\n")
    pairs = [(RATIOS[i][0].removesuffix(" fwd"), RATIOS[i][0], RATIOS[i + 1][0]) for i in range(2, len(RATIOS), 2)]
    header = ["case", "plain fwd_train / fwd_eval / bwd (ms)", "frozen fwd ÷ plain eval", "frozen bwd"]
    header += [f"{name} fwd / bwd" for name, _, _ in pairs]
    print("| " + " | ".join(header) + " |")
    print("|---|---|" + "---:|" * 2 + "---|" * len(pairs))
    for case in cases:
        r, b = ratios[case], plain[case]
        ms = " / ".join(f"{b[op]:.3g}" if op in b else "–" for op in ("fwd_train", "fwd_eval", "backward"))
        cells = [case, ms, fmt(r.get("frozen fwd ÷ plain eval")), fmt(r.get("frozen bwd"))]
        cells += [f"{fmt(r.get(f))} / {fmt(r.get(bwd))}" for _, f, bwd in pairs]
        print("| " + " | ".join(cells) + " |")

    print("\nTargets (issue 16), over every case:\n")
    for what, columns, limit in TARGETS:
        worst = [
            (statistics.median(ratios[case][col]), case, col)
            for case in cases
            for col in columns
            if col in ratios[case]
        ]
        if not worst:
            print(f"- {what}: not measured")
            continue
        value, case, col = max(worst)
        over = [f"{c} ({col_}: {v:.2f})" for v, c, col_ in worst if v > limit]
        verdict = "met" if value <= limit else f"missed in {len(over)} of {len(worst)} ratios: " + ", ".join(over)
        print(f"- {what}: worst {value:.2f} ({col}, {case}); {verdict}")


if __name__ == "__main__":
    main()
