"""`attnreg ablate`: one regulation parameter swept with the benchmark runner (Fig. 5)."""

from __future__ import annotations

import math

from ..ablate import PARAMS
from .bench import bench_options
from .common import add_model_args, add_sampling_args, prepare_run


def cmd_ablate(args) -> int:
    from ..ablate import ablate, parse_values
    from ..options import parse_seeds

    parse_seeds(args.seeds)
    values = parse_values(args.param, args.values)
    if args.param == "edit_steps" and max(values) > args.steps:
        raise ValueError(f"--values for edit_steps: {max(values)} is more than --steps {args.steps}")
    prepare_run(args)  # the device exists; --threads
    result = ablate(args.param, values, metrics=args.metrics, fidelity=args.fidelity,
                    metric_options={"clip_model": args.clip_model}, **bench_options(args))
    print(f"{'value':>24}  {'n':>4}  {result.fidelity:>24}  seconds/image")
    for row in result.rows:
        f, s = row["fidelity"], row["seconds"]
        print(f"{row['value']:>24}  {row['n']:>4}  {_interval(f):>24}  {_interval(s)}")
    for path in result.files:
        print(path)
    return 0


def _interval(s: dict) -> str:
    if not s["n"] or math.isnan(s["value"]):
        return "-"
    if math.isnan(s["low"]):
        return f"{s['value']:.3f}"
    return f"{s['value']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate", help="sweep one regulation parameter with the benchmark runner and plot fidelity and time (Fig. 5)",
        description="Run `attnreg bench` for every value of --param (method attnreg, plus sd once) into one "
        "folder, score it, and write ablate_<param>.png and .json.",
    )
    p.add_argument("--param", required=True, choices=list(PARAMS), help="beta is the config's epsilon")
    p.add_argument("--values", required=True,
                   help="comma-separated numbers; for layers, sets separated by ';' (e.g. 'down_blocks.2;down_blocks.2,up_blocks.1')")
    p.add_argument("--dataset", default="shapes", help="shapes, ae or file:PATH (default: shapes)")
    p.add_argument("--subsets", default=None, help="comma-separated subsets of the data set (default: all)")
    p.add_argument("--seeds", default="0-7", help="e.g. 0-7, 0,1,2 or 0-3,10 (default 0-7)")
    p.add_argument("--limit", type=int, default=10, help="prompts per subset (default 10)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--metrics", default="auto", help="metrics to score (default: the fidelity's metric)")
    p.add_argument("--fidelity", default=None, help="METRIC.FIELD plotted (default: detect.success on shapes, clip.full otherwise)")
    p.add_argument("--clip-model", default=None, help="CLIP id or folder for the clip metric")
    p.add_argument("--out", required=True, help="output folder (a sweep writes hundreds of images)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_ablate)
