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
    p.add_argument("action", choices=["train", "evaluate"],
                   help="train (evaluate is retired: attnreg bench --dataset shapes measures the model)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of `python -m attnreg.toy.ACTION --help`")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.action == "evaluate":
        print(RETIRED, file=sys.stderr)
        return 2
    from ..toy.train import main

    check_sets(args.args)

    return main(args.args) or 0


def check_sets(argv: list[str]) -> None:
    """toy train's `--set KEY=VALUE ...`, checked against its config's fields and their types before anything
    is trained or written: a ValueError naming the pair, else nothing."""
    import dataclasses

    from ..options import OptionError, parse_finite, parse_int

    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--arch", default="unet")
    known.add_argument("--set", nargs="+", action="extend", default=[])
    a, _ = known.parse_known_args(argv)
    if a.arch == "mmdit":
        from ..toy.mmdit import MMDiTConfig as cls
    else:
        from ..toy.train import Config as cls
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    for pair in a.set:
        key, sep, value = pair.partition("=")
        if not sep or key not in defaults:
            what = "use KEY=VALUE" if not sep else f"unknown key {key!r}"
            raise ValueError(f"toy train --set {pair!r}: {what}; valid keys: {', '.join(defaults)}")
        default = defaults[key]
        try:
            if isinstance(default, tuple):
                [parse_int(x) for x in value.split(",")]
            elif isinstance(default, (int, float)) and not isinstance(default, bool):
                (parse_int if isinstance(default, int) else parse_finite)(value)
        except OptionError:
            kind = ("comma-separated integers" if isinstance(default, tuple)
                    else "an integer" if isinstance(default, int) else "a finite number")
            raise ValueError(f"toy train --set {pair}: {key} takes {kind}, got {value!r}") from None
