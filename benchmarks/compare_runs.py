"""The same method's `shapes` images in two `attnreg bench` folders, paired by key: the check that a code change
kept the pictures (a new solver against its parent commit, say). Both folders are made by the same command at
two commits; images are paired by (subset, prompt, seed), not by key, since a key can hold the checkout's path
(an embedded model's folder).

Per kind: each side's success (the `detect` scorer, run here on both), the paired difference new - old with
its 95 % interval, wins / losses, the share of pairs with the same verdict, byte-identical images and the
largest pixel change (0-255).

    python benchmarks/compare_runs.py runs/old runs/new [--method attnreg]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from attnreg.eval.io import iter_records
from attnreg.eval.stats import mean_ci
from attnreg.toy.detect import score


def load(folder: Path, method: str) -> dict[tuple, dict]:
    return {(r["subset"], r["prompt"], r["seed"]): r for r in iter_records(folder) if r["method"] == method}


def compare(old_dir: Path, new_dir: Path, method: str) -> list[dict]:
    """One row per subset, over the requests both folders hold."""
    old, new = load(old_dir, method), load(new_dir, method)
    by_subset = defaultdict(list)
    for key in sorted(old.keys() & new.keys()):
        a = np.asarray(Image.open(old_dir / old[key]["image"]).convert("RGB"))
        b = np.asarray(Image.open(new_dir / new[key]["image"]).convert("RGB"))
        prompt = old[key]["prompt"]
        by_subset[old[key]["subset"]].append((score(prompt, a)["success"], score(prompt, b)["success"],
                                              bool((a == b).all()), int(np.abs(a.astype(int) - b).max())))
    rows = []
    for subset, items in sorted(by_subset.items()):
        n = len(items)
        diff, lo, hi = mean_ci([float(y) - float(x) for x, y, _, _ in items])
        rows.append(dict(
            subset=subset, pairs=n, old=sum(x for x, *_ in items) / n, new=sum(y for _, y, *_ in items) / n,
            diff=diff, lo=lo, hi=hi, wins=sum(y and not x for x, y, *_ in items),
            losses=sum(x and not y for x, y, *_ in items), same=sum(x == y for x, y, *_ in items) / n,
            identical=sum(i for *_, i, _ in items), max_change=max(c for *_, c in items)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--method", default="attnreg")
    args = p.parse_args(argv)
    rows = compare(args.old, args.new, args.method)
    if not rows:
        p.error(f"no (subset, prompt, seed) of method {args.method!r} is in both folders")
    print(f"# {args.method}: {args.new} (new) against {args.old} (old), paired by (subset, prompt, seed); detect scorer")
    print("| kind | pairs | old | new | new - old [95 %] | wins / losses | same verdict | byte-identical | "
          "largest pixel change |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['subset']} | {r['pairs']} | {r['old']:.1%} | {r['new']:.1%} | "
              f"{100 * r['diff']:+.1f} pp [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] | {r['wins']} / {r['losses']} | "
              f"{r['same']:.1%} | {r['identical']} | {r['max_change']} |")
    pairs = sum(r["pairs"] for r in rows)
    same = sum(r["same"] * r["pairs"] for r in rows)
    print(f"\nall kinds: {round(same)} / {pairs} pairs the same verdict ({same / pairs:.1%}), "
          f"{sum(r['identical'] for r in rows)} byte-identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
