#!/usr/bin/env bash
# Regenerates the tables of BENCHMARKS.md, one section at a time, into bench/out/<UTC time>/
# (one Markdown file per section, plus the raw JSON where a script writes it).
#
#   bench/run_all.sh [--threads T] [--python PY] [--dry-run] [SECTION ...]
#
# SECTION: kernels variants mlp convnet candle mpi (default: all, in that order; BENCHMARKS.md's
# sections 1, "Batch-norm variants vs plain batch norm" and 2 to 5). --threads: threads for both sides (default 2, the machine of
# BENCHMARKS.md). --python: a Python with torch and numpy (default /tmp/torch/bin/python, the
# venv bench/README.md sets up; the mpi section needs only python3). --dry-run: print the
# commands without running them.
#
# Section 1 takes the longest (two runs of 7 alternating rounds of both kernel benchmarks). Run
# it on an otherwise idle machine; from any directory. Builds the release binary first (with the `mpi` feature when the mpi section runs,
# which needs OpenMPI: see docs/distributed.md).
set -euo pipefail
cd "$(dirname "$0")/.."

threads=2 python=/tmp/torch/bin/python dry=0 sections=()
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        kernels | variants | mlp | convnet | candle | mpi) sections+=("$1"); shift ;;
        *) echo "run_all.sh: unknown argument \`$1\` (see the header of $0)" >&2; exit 2 ;;
    esac
done
[ ${#sections[@]} -gt 0 ] || sections=(kernels variants mlp convnet candle mpi)
wants() { [[ " ${sections[*]} " == *" $1 "* ]]; }

out="bench/out/$(date -u +%Y-%m-%dT%H%M%SZ)"
run() { # run FILE CMD...: CMD's stdout to FILE (and the terminal)
    local file="$1"; shift
    echo "+ $*  > $file" >&2
    if [ $dry -eq 0 ]; then "$@" | tee "$out/$file"; fi
}

if [ $dry -eq 0 ]; then
    mkdir -p "$out"
    if wants kernels || wants mlp || wants convnet; then
        "$python" -c 'import torch, numpy' || {
            echo "run_all.sh: $python lacks torch or numpy; see bench/README.md (Setup)" >&2
            exit 1
        }
    fi
    { echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
      echo "date $(date -u '+%Y-%m-%d %H:%M UTC')"
      echo "machine $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
      echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
      echo "threads $threads"
      "$python" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || true
    } | tee "$out/machine.txt"
fi

features=()
if wants mpi; then features=(--features mpi); fi
if wants kernels || wants variants || wants mlp || wants convnet || wants mpi; then
    echo "+ cargo build --release -p bnlab ${features[*]}" >&2
    [ $dry -eq 1 ] || cargo build --release -p bnlab "${features[@]}"
fi

# 1. Kernels: PyTorch with recycled outputs, then as called.
if wants kernels; then
    run 1-kernels-recycled.md "$python" bench/compare_kernels.py --threads "$threads" --rounds 7 \
        --torch-args=--reuse-memory --json-out "$out/1-kernels-recycled.json"
    run 1-kernels-as-called.md "$python" bench/compare_kernels.py --threads "$threads" --rounds 7 \
        --json-out "$out/1-kernels-as-called.json"
fi
# Batch-norm variants against plain batch norm: 4 rounds of the whole `bnlab bench` run.
if wants variants; then
    run variants.md python3 bench/variants_table.py --rounds 4 --threads "$threads" \
        --json-out "$out/variants.json"
fi
# 2. The paper's MLP.
if wants mlp; then
    run 2-mlp.md "$python" bench/compare_mlp.py --threads "$threads" --steps 5000 --rounds 3
fi
# 3. accelerate's conv net.
if wants convnet; then
    run 3-convnet.md "$python" bench/compare_convnet.py --threads "$threads" --steps 300 --rounds 5 \
        --variants baseline bn-baseline bn-x5
fi
# 4. batchnorm-candle against candle-nn (both sides in one process; the global rayon pool).
if wants candle; then
    run 4-candle.md env RAYON_NUM_THREADS="$threads" \
        cargo run --release -q -p batchnorm-candle --example bench_candle
fi
# 5. Data-parallel training over MPI.
if wants mpi; then
    run 5-mpi.md python3 bench/compare_distributed.py --threads "$threads" --steps 3000 --rounds 2
fi

if [ $dry -eq 0 ]; then
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/machine.txt"
    echo "tables in $out" >&2
fi
