"""`attnreg toy train|evaluate ...`: the embedded model's training and its vanilla evaluation."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("toy", help="train or evaluate the embedded shapes model")
    p.add_argument("action", choices=["train", "evaluate"])
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of `python -m attnreg.toy.ACTION --help`")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.action == "train":
        from ..toy.train import main
    else:
        from ..toy.evaluate import main
    return main(args.args) or 0
