#!/usr/bin/env bash
# The table on the embedded UNet model: shapes 1obj/2obj/3obj, 30 prompts per kind (1obj has its 18 distinct
# prompts), 50 steps, guidance 7.5, the `detect` scorer. Rows: sd and the default (`attnreg`, the auto preset)
# on seeds 0-31; the `paper` preset as shipped and on the 8 x 8 layers, and Attend-and-Excite at the setting
# chosen on the design set, on seeds 0-15. Every design choice was made on other prompts and seeds
# (benchmarks/archive/design_auto.py: shapes_prompts(., seed=1) minus these, seeds 1000+). Two processes of one
# thread each; resumable: rerun the same command after a stop. The phases come in the order the table needs
# them, each a complete block of seeds, so a run stopped anywhere is paired and balanced.
# The published rows were made by benchmarks/archive/shapes_auto_measurement_06bd657.sh at commit 06bd657
# (the default's binding rows with the autograd binding solver, the same verdicts as today's: RESULTS.md).
# Afterwards: attnreg score OUT --metrics detect && python benchmarks/shapes_table.py OUT
# Usage: bash benchmarks/shapes_auto_measurement.sh [OUT]   (default runs/shapes-auto)
set -euo pipefail
OUT=${1:-runs/shapes-auto}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
EIGHT='["down_blocks.1","mid_block","up_blocks.0"]'
bench() {
  "$(dirname "$PY")/torchrun" --standalone --nproc_per_node 2 -m attnreg.cli bench --dataset shapes --limit 30 \
    --steps 50 --guidance 7.5 --out "$OUT" --warmup --no-progress --metrics none --no-report "$@"
}
bench --methods sd,attnreg --seeds 0-15
bench --methods sd,attnreg --seeds 16-31
bench --methods attnreg-paper --seeds 0-15
bench --methods attnreg-paper --seeds 0-15 --set "attnreg-paper.layers=$EIGHT"
# Attend-and-Excite at the setting chosen on the design set (RESULTS.md: ae8_s40)
bench --methods attend-and-excite --seeds 0-15 --set "attend-and-excite.layers=$EIGHT" --set attend-and-excite.scale_factor=40
