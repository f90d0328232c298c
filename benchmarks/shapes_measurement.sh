#!/usr/bin/env bash
# The embedded model's measurement (issue 3): shapes 1obj/2obj/3obj, 30 prompts per kind (1obj has only its
# 18 distinct prompts), seeds 0-31, 50 steps, guidance 7.5; sd, attnreg (paper preset) and Attend-and-Excite.
# Two processes of one thread each (the two cores); resumable: rerun the same command after a stop.
# The work goes in phases, each a complete block of seeds, so a run stopped anywhere has the same seeds for
# every method it compares: sd and attnreg on seeds 0-15, Attend-and-Excite (about 3x their cost together)
# on 0-7, a follow-up on the 8 x 8 layers, then the remaining seeds. Score and report afterwards:
#   attnreg score OUT --metrics detect && attnreg report OUT
# Usage: bash benchmarks/shapes_measurement.sh [OUT]   (default runs/shapes-final)
set -euo pipefail
OUT=${1:-runs/shapes-final}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
bench() {
  "$(dirname "$PY")/torchrun" --standalone --nproc_per_node 2 -m attnreg.cli bench --dataset shapes --limit 30 \
    --steps 50 --guidance 7.5 --out "$OUT" --warmup --no-progress --metrics none --no-report "$@"
}
bench --methods sd,attnreg --seeds 0-15
bench --methods attend-and-excite --seeds 0-7
# a follow-up (archive/toy_regulation_findings.md): the paper loss on the 8 x 8 layers only (two-object prompts first); the
# report labels the two attnreg configurations by their hash
bench --methods attnreg --subsets 2obj --seeds 0-15 --set 'attnreg.layers=["down_blocks.1","mid_block","up_blocks.0"]'
bench --methods attnreg --subsets 1obj,3obj --seeds 0-15 --set 'attnreg.layers=["down_blocks.1","mid_block","up_blocks.0"]'
bench --methods sd,attnreg --seeds 16-31
bench --methods attend-and-excite --seeds 8-31
