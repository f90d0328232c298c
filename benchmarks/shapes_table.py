"""The embedded UNet model's table: every method paired with sd, per kind, from a scored `shapes` benchmark folder, plus
rows of an earlier exported run (benchmarks/data/*.jsonl.gz) on the same prompts and noise.

An earlier run's rows are paired with this folder's sd only after checking that its own sd images got
the same detections on the pairs both have (same noise, same model, same code path): the script prints
that agreement, and leaves the earlier rows out when it is not complete.

    python benchmarks/shapes_table.py runs/shapes-auto --earlier benchmarks/data/shapes-final.jsonl.gz
    python benchmarks/shapes_table.py runs/shapes-auto --seeds 16-31          # one block of seeds only
    python benchmarks/shapes_table.py runs/shapes-auto --baseline "auto without binding (default until 2026-11-30)"
    python benchmarks/shapes_table.py runs/shapes-auto --modes     # how the pictures fail, and which ones change
    python benchmarks/shapes_table.py runs/shapes-mmdit --by-shape  # success by the shapes the prompt names

The auto preset's rows are named by their binding weight (`attnreg` ran with binding 0 and 2, `attnreg-bind`
with 1); the weight the preset has now is labelled the default.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from attnreg.config import RegulationConfig
from attnreg.eval.io import iter_records
from attnreg.eval.metrics import load_scores
from attnreg.eval.runner import parse_seeds
from attnreg.eval.stats import paired_comparison

# an earlier run's (method, config hash) -> the row's name here
EARLIER = {
    ("attnreg", "532d86"): "paper as shipped, 16 x 16 layers (earlier run)",
    ("attnreg", "2830fd"): "paper on the 8 x 8 layers (earlier run)",
    ("attend-and-excite", "72b5f3"): "Attend-and-Excite, defaults, 16 x 16 (earlier run)",
}
NAMES = {"sd": "sd", "attnreg-paper": "paper as shipped",
         "attend-and-excite": "Attend-and-Excite, tuned on the design set (8 x 8 blocks, scale_factor 40)"}
# the auto preset's rows are told apart by their binding and concentration weights (the `attnreg` method ran with
# binding 0 and 2, `attnreg-bind` with 1); the weights the preset has now are labelled the default
DEFAULT = RegulationConfig.from_preset("auto")
BINDING_NAMES = {0.0: "auto without binding (default until 2026-11-30)", 1.0: "auto, binding 1 (default 2026-11-30)",
                 2.0: "auto, binding 2 (default 2026-11-30 night to 2026-12-01)"}


def method_name(record: dict) -> str:
    if record["method"] not in ("attnreg", "attnreg-bind"):
        return NAMES.get(record["method"], record["method"])
    binding = float(record["config"].get("binding", 0.0))
    concentration = float(record["config"].get("concentration", 0.0))
    if (binding, concentration) == (DEFAULT.binding, DEFAULT.concentration):
        return f"attnreg default (auto, binding {binding:g}" + (f", concentration {concentration:g})" if concentration else ")")
    name = BINDING_NAMES.get(binding, f"auto, binding {binding:g}")
    return f"{name}, concentration {concentration:g}" if concentration else name


MODES = ("right", "wrong colour", "a shape drawn as another", "an object dropped")


def failure_mode(score: dict, named: int) -> str:
    """How a picture fails, from the detector's verdict: every named shape there but a colour wrong; a
    named shape missing while as many objects as named were drawn (one drawn with another's shape); or
    fewer objects than named."""
    if score["success"]:
        return MODES[0]
    if score["shapes_present"]:
        return MODES[1]
    return MODES[2] if len(score["detections"]) >= named else MODES[3]


def print_modes(rows: list[dict], baseline: str) -> None:
    """Per kind and method: how the pictures fail, and among the pairs the method changes against the
    baseline, how the baseline failed (wins) and how the method fails (losses: the "kept" misses)."""
    by = {(r["subset"], r["method"], r["prompt"], r["seed"]): r["mode"] for r in rows if "mode" in r}
    print(f"failure modes; wins: the baseline's ({baseline}) mode on the pairs the method fixes; losses: the "
          "method's mode on the pairs it breaks")
    print("| kind | method | pairs | " + " | ".join(MODES[1:]) + " | wins: " + " / ".join(MODES[1:])
          + " | losses: " + " / ".join(MODES[1:]) + " |")
    print("|---|---|---|" + "---|" * 5)
    for subset, method in sorted({(k[0], k[1]) for k in by}):
        pairs = [(by.get((subset, baseline) + k[2:]), mode) for k, mode in by.items() if k[:2] == (subset, method)]
        pairs = [(b, m) for b, m in pairs if b is not None]
        count = lambda ms: " / ".join(str(sum(x == mode for x in ms)) for mode in MODES[1:])  # noqa: E731
        wins = [b for b, m in pairs if b != MODES[0] and m == MODES[0]]
        losses = [m for b, m in pairs if b == MODES[0] and m != MODES[0]]
        shares = " | ".join(f"{100 * sum(m == mode for _, m in pairs) / len(pairs):.1f} %" for mode in MODES[1:])
        print(f"| {subset} | {method} | {len(pairs)} | {shares} | {count(wins)} | {count(losses)} |")


def print_by_shape(rows: list[dict], baseline: str) -> None:
    """Per kind and method: success on the prompts that name each shape, and on those that do not, with the
    baseline's rate on the same pairs; a model that cannot draw one shape caps every method on its prompts."""
    from attnreg.toy import parse_prompt
    from attnreg.toy.world import SHAPES

    base = {(r["subset"], r["prompt"], r["seed"]): r["success"] for r in rows if r["method"] == baseline}
    print(f"success by the shapes the prompt names (method / {baseline} on the same pairs)")
    print("| kind | method | " + " | ".join(f"names a {s} | no {s}" for s in SHAPES) + " |")
    print("|---|---|" + "---|---|" * len(SHAPES))
    for subset, method in sorted({(r["subset"], r["method"]) for r in rows}):
        mine = [r for r in rows if (r["subset"], r["method"]) == (subset, method)
                and (r["subset"], r["prompt"], r["seed"]) in base]
        cells = []
        for shape in SHAPES:
            for names in (True, False):
                part = [r for r in mine if (shape in {s for _, s in parse_prompt(r["prompt"])}) == names]
                if not part:
                    cells.append("-")
                    continue
                rate = sum(r["success"] for r in part) / len(part)
                was = sum(base[(r["subset"], r["prompt"], r["seed"])] for r in part) / len(part)
                cells.append(f"{100 * rate:.0f} / {100 * was:.0f} % ({len(part)})")
        print(f"| {subset} | {method} | " + " | ".join(cells) + " |")


def load(folder: Path) -> list[dict]:
    scores = load_scores(folder).get("detect", {}).get("items", {})
    rows = []
    for r in iter_records(folder):
        s = scores.get(r["key"])
        if s is None:
            continue
        rows.append({**r, "success": bool(s["success"]), "extra": s["extra_objects"] > 0,
                     "detections": s.get("detections"), "mode": failure_mode(s, len(r["targets"])),
                     "method": method_name(r)})
    return rows


def load_earlier(path: Path, sd_now: dict) -> list[dict]:
    with gzip.open(path, "rt") as f:
        old = [json.loads(line) for line in f]
    agree = total = 0
    for r in old:
        if r["method"] == "sd" and (r["subset"], r["prompt"], r["seed"]) in sd_now:
            total += 1
            agree += r["detect.detections"] == sd_now[(r["subset"], r["prompt"], r["seed"])]
    print(f"earlier run {path.name}: its sd detections equal this run's on {agree} of {total} common pairs")
    if not total or agree != total:
        print("  -> its rows are left out (not the same images)")
        return []
    rows = []
    for r in old:
        name = EARLIER.get((r["method"], r["config_hash"]))
        if name:
            rows.append({**r, "method": name, "config_hash": "", "image": None, "success": bool(r["detect.success"]),
                         "extra": r["detect.extra_objects"] > 0})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--earlier", action="append", default=[])
    ap.add_argument("--seeds", default=None, help="only these seeds, e.g. 16-31")
    ap.add_argument("--baseline", default="sd", help="the row every other is paired with (a method's name here)")
    ap.add_argument("--modes", action="store_true", help="also print how the pictures fail (this folder's rows)")
    ap.add_argument("--by-shape", action="store_true", help="also print success by the shapes the prompts name")
    a = ap.parse_args()
    folder = Path(a.folder)
    rows = load(folder)
    sd_now = {(r["subset"], r["prompt"], r["seed"]): r["detections"] for r in rows if r["method"] == "sd"}
    for path in a.earlier:
        rows += load_earlier(Path(path), sd_now)
    if a.seeds:
        keep = set(parse_seeds(a.seeds))
        rows = [r for r in rows if r["seed"] in keep]
    values = {r["key"]: r["success"] for r in rows}
    extra = {r["key"]: r["extra"] for r in rows}
    new = [r for r in rows if r.get("image")]
    table = paired_comparison(new, values, a.baseline, extra=extra, out=folder)
    table.update({k: v for k, v in paired_comparison(rows, values, a.baseline, extra=extra).items() if k not in table})
    seeds = {}
    for r in rows:
        seeds.setdefault((r["subset"], r["method"]), set()).add(r["seed"])
    print(f"paired with: {a.baseline}")
    print("| kind | method | seeds | pairs | baseline | method | difference [95 %] | wins / losses | McNemar p | kept "
          "| extra objects (sd -> method) | pixel diff | SSIM | time vs sd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (dataset, subset, method), r in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        s = sorted(seeds[(subset, method)])
        cells = [subset, method, f"{s[0]}-{s[-1]}", str(r["n"]), f"{100 * r['base']:.1f} %", f"{100 * r['rate']:.1f} %",
                 f"{100 * r['diff']:+.1f} pp [{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]",
                 f"{r['wins']} / {r['losses']}", f"{r['p']:.2g}", f"{100 * r['kept']:.1f} %",
                 f"{100 * r['base_extra']:.1f} -> {100 * r['extra']:.1f} %",
                 f"{r['mad']:.1f}" if "mad" in r else "-", f"{r['ssim']:.3f}" if "ssim" in r else "-",
                 "-" if "earlier run" in method else f"{r['time_ratio']:.2f}x"]  # another run's load
        print("| " + " | ".join(cells) + " |")
    if a.modes:
        print_modes(rows, a.baseline)
    if a.by_shape:
        print_by_shape(rows, a.baseline)


if __name__ == "__main__":
    main()
