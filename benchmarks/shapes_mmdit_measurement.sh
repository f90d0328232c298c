#!/usr/bin/env bash
# The table on the embedded MMDiT (SD3) model: shapes 1obj/2obj/3obj, 30 prompts per kind (1obj: its 18
# distinct prompts), sd (the plain pipeline), attnreg (the default `auto` preset: the model's calibrated joint
# blocks, the loss in the words' units) and taca (gamma 1.2 on the first 3 of 28 steps), paired on the same
# noise, the `detect` scorer. The sampler is the model's own (attnreg.json: 28 flow-matching Euler steps,
# guidance 3; the table of the previous weights, commit a3cf703, ran at guidance 7) with the pipeline's default 256 zero columns, the layout the shipped model is trained
# for. Two processes of one thread each; resumable: rerun the same command after a stop.
# Afterwards: attnreg score OUT --metrics detect && attnreg report OUT
# Usage: bash benchmarks/shapes_mmdit_measurement.sh [OUT] [SEEDS] [SUBSETS]   (default runs/shapes-mmdit, 0-15,
# 1obj,2obj,3obj)
set -euo pipefail
OUT=${1:-runs/shapes-mmdit}
SEEDS=${2:-0-15}
SUBSETS=${3:-1obj,2obj,3obj}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
"$(dirname "$PY")/torchrun" --standalone --nproc_per_node 2 -m attnreg.cli bench --dataset shapes --limit 30 \
  --model toy-mmdit --steps 28 --guidance 3 --out "$OUT" --warmup --no-progress --subsets "$SUBSETS" \
  --metrics none --no-report --methods sd,attnreg,taca --seeds "$SEEDS"
