#!/usr/bin/env bash
# Issue 13's measurement on the embedded MMDiT (SD3) model: shapes 1obj/2obj/3obj, 30 prompts per kind (1obj:
# its 18 distinct prompts), sd (the plain pipeline) and attnreg (the default `auto` preset: the model's
# calibrated joint block, binding on) on seeds 0-15, paired on the same noise, the `detect` scorer. The
# sampler is the model's own default (attnreg.json: 28 flow-matching Euler steps, guidance 7), not tuned on
# this table. Two processes of one thread each; resumable: rerun the same command after a stop.
# Afterwards: attnreg score OUT --metrics detect && attnreg report OUT
# Usage: bash benchmarks/shapes_mmdit_measurement.sh [OUT]   (default runs/shapes-mmdit)
set -euo pipefail
OUT=${1:-runs/shapes-mmdit}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
"$(dirname "$PY")/torchrun" --standalone --nproc_per_node 2 -m attnreg.cli bench --dataset shapes --limit 30 \
  --model toy-mmdit --steps 28 --guidance 7 --out "$OUT" --warmup --no-progress --metrics none --no-report \
  --methods sd,attnreg --seeds 0-15
