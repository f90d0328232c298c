"""Issue 12's fidelity table: the fast path's images against the exact solver's, paired by (prompt, seed).

Both folders are `attnreg bench` runs on `shapes` scored with `detect` (benchmarks/fast_path_fidelity.sh
makes the fast one). Per kind: success of each, the paired difference fast - exact with its 95 % interval,
wins / losses (fast right where exact was wrong / the reverse), kept (of the pairs exact got right, the
share fast still gets right), and how much the images differ (mean absolute pixel difference 0-255, SSIM).

    python benchmarks/fast_path_fidelity.py runs/fast-path runs/shapes-auto
    python benchmarks/fast_path_fidelity.py runs/fast-binding runs/shapes-auto --option fast_binding

The exact side's records are those whose configuration is the fast side's but for the option (a folder can
hold several configurations of `attnreg`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnreg.eval.io import iter_records
from attnreg.eval.metrics import load_scores
from attnreg.eval.stats import paired_comparison


def without(config: dict, option: str) -> dict:
    return {k: v for k, v in config.items() if k != option}


def load(folder: Path, name: str, option: str, on: bool, like: list[dict] | None = None) -> list[dict]:
    """The folder's scored `attnreg` records whose configuration has `option` on (or off) and, given `like`,
    is otherwise one of those configurations; renamed `name`, with absolute image paths (the pairs come
    from two folders)."""
    scores = load_scores(folder).get("detect", {}).get("items", {})
    rows = []
    for r in iter_records(folder):
        if r["method"] != "attnreg" or bool(r["config"].get(option, False)) != on or r["key"] not in scores:
            continue
        if like is not None and without(r["config"], option) not in like:
            continue
        rows.append({**r, "method": name, "key": f"{name}/{r['key']}", "image": str((folder / r["image"]).resolve()),
                     "success": bool(scores[r["key"]]["success"]), "extra": scores[r["key"]]["extra_objects"] > 0})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fast", help="the fast path's bench folder")
    ap.add_argument("exact", help="the exact solver's bench folder (issue 9's runs/shapes-auto)")
    ap.add_argument("--option", default="fast",
                    help="the configuration field that is on in FAST and off in EXACT: fast (issue 12) or fast_binding")
    a = ap.parse_args()
    fast = load(Path(a.fast), "fast", a.option, True)
    like = [without(c, a.option) for c in {json.dumps(r["config"], sort_keys=True): r["config"] for r in fast}.values()]
    rows = load(Path(a.exact), "exact", a.option, False, like) + fast
    values = {r["key"]: r["success"] for r in rows}
    extra = {r["key"]: r["extra"] for r in rows}
    table = paired_comparison(rows, values, baseline="exact", extra=extra, out=Path("/"))
    seeds: dict[str, set] = {}
    for r in rows:
        if r["method"] == "fast":
            seeds.setdefault(r["subset"], set()).add(r["seed"])
    print("| kind | seeds | pairs | exact | fast | fast - exact [95 %] | wins / losses | McNemar p | kept "
          "| extra objects (exact -> fast) | pixel diff | SSIM | time fast / exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (_dataset, subset, _method), r in sorted(table.items()):
        s = sorted(seeds[subset])
        print(f"| {subset} | {s[0]}-{s[-1]} ({len(s)}) | {r['n']} | {100 * r['base']:.1f} % | {100 * r['rate']:.1f} % "
              f"| {100 * r['diff']:+.1f} pp [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}] | {r['wins']} / {r['losses']} "
              f"| {r['p']:.2g} | {100 * r['kept']:.1f} % | {100 * r['base_extra']:.1f} -> {100 * r['extra']:.1f} % "
              f"| {r['mad']:.2f} | {r['ssim']:.3f} | {r['time_ratio']:.2f}x |")


if __name__ == "__main__":
    main()
