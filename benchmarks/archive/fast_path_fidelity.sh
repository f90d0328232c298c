#!/usr/bin/env bash
# Issue 12's fidelity check: the default (`auto`) with its fast path (`fast=true`, explicit here) on the
# images issue 9 measured with the exact solver (runs/shapes-auto: `attnreg`, seeds 0-15; the same prompts,
# noise, model and settings), then paired per (prompt, seed) by benchmarks/fast_path_fidelity.py.
# Two processes of one thread on disjoint seeds, into one folder (bench claims each item, so the two never
# make the same image); resumable: rerun the same command after a stop. 2obj/3obj x 30 prompts x 16 seeds.
# OPTION=fast_binding checks the binding solver's fast schedule the same way (the default with
# fast_binding=true against the default's own images); OPTION=closed_form the binding solver's hand-written
# gradient against the autograd one that made runs/shapes-auto (before it became the default on 2026-12-01).
# Usage: [OPTION=fast_binding] bash benchmarks/fast_path_fidelity.sh [OUT] [EXACT]
#        (default runs/fast-path or runs/fast-binding, runs/shapes-auto)
set -euo pipefail
OPTION=${OPTION:-fast}
OUT=${1:-runs/$([ "$OPTION" = fast ] && echo fast-path || echo fast-binding)}
EXACT=${2:-runs/shapes-auto}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
bench() {
  "$PY" -m attnreg.cli bench --dataset shapes --subsets 2obj,3obj --limit 30 --steps 50 --guidance 7.5 \
    --methods attnreg --set attnreg.$OPTION=true --threads 1 --out "$OUT" --warmup --no-progress --metrics none \
    --no-report "$@"
}
bench --seeds 0-7 &
first=$!
bench --seeds 8-15
wait "$first"
"$PY" -m attnreg.cli score "$OUT" --metrics detect --no-progress
"$PY" benchmarks/fast_path_fidelity.py "$OUT" "$EXACT" --option "$OPTION"
