"""`attnreg toy train ...`: the embedded model's training. Its evaluation is `attnreg bench --dataset shapes`."""

from __future__ import annotations

import argparse
import sys

# `toy evaluate` is retired: bench measures the same rates (and more), resumably.
RETIRED = ("attnreg toy evaluate is retired; measure the embedded model with the benchmark, e.g. "
           "`attnreg bench --dataset shapes --methods sd --seeds 0-3 --limit 12 --out runs/vanilla` "
           "(the detector's rates per subset in runs/vanilla/report.md)")


def register(subparsers) -> None:
    p = subparsers.add_parser("toy", help="train the embedded shapes model (evaluate it with attnreg bench --dataset shapes)")
    p.add_argument("action", choices=["train", "evaluate"])
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of `python -m attnreg.toy.ACTION --help`")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.action == "evaluate":
        print(RETIRED, file=sys.stderr)
        return 2
    from ..toy.train import main

    return main(args.args) or 0
