"""Is the `detect` scorer right about drawn squares? A check of its shape rule on a scored shapes folder.

The detector calls an object a square when it fills at least SQUARE_MIN_FILL of its bounding box (set on
renders: square 1.0, circle pi/4). Drawn squares have notched edges and slightly slanted sides, so some fall
under the threshold and are read as circles. This script prints, for the one-object pictures of one method,
each named shape's box fill and convex-hull fill (the hull fills notches; a circle's hull still fills about
pi/4 of its box), how often a hull threshold reads each shape as a square, and then every method's paired
table re-scored with that hull rule in place of the fill rule (triangles unchanged), beside the fill rule's.
An exploratory check: the project's scorer is unchanged.

    python benchmarks/square_check.py runs/shapes-mmdit-s4 [--hull 0.9] [--method sd]
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.spatial import ConvexHull

detect_module = importlib.import_module("attnreg.toy.detect")  # the module, not the function it exports


def hull_fill(mask: np.ndarray) -> float:
    """The convex hull of the mask's pixel squares, over its bounding box's area."""
    ys, xs = np.nonzero(mask)
    corners = np.stack([np.concatenate([xs, xs + 1, xs, xs + 1]), np.concatenate([ys, ys, ys + 1, ys + 1])], 1)
    return ConvexHull(corners).volume / float(mask.shape[0] * mask.shape[1])


def hull_rule(threshold: float):
    def classify(mask: np.ndarray) -> str:
        fill, asym = detect_module.shape_features(mask)
        if asym > detect_module.TRIANGLE_MIN_ASYM or fill <= detect_module.TRIANGLE_MAX_FILL:
            return "triangle"
        return "square" if hull_fill(mask) >= threshold else "circle"
    return classify


def records(folder: Path):
    for path in sorted((folder / "records").glob("*/*/*.json")):
        record = json.loads(path.read_text())
        yield record, Image.open(folder / record["image"]).convert("RGB")


def features(folder: Path, method: str, threshold: float) -> None:
    seen: dict[str, list] = {}
    plain = detect_module._classify_shape

    def spy(mask):
        fill, _ = detect_module.shape_features(mask)
        shape = plain(mask)
        seen_now.append((fill, hull_fill(mask), shape))
        return shape

    detect_module._classify_shape = spy
    try:
        for record, image in records(folder):
            if record["subset"] != "1obj" or record["method"] != method:
                continue
            seen_now: list = []
            detect_module.detect(image)
            if len(seen_now) == 1:
                seen.setdefault(record["prompt"].split()[-1], []).append(seen_now[0])
    finally:
        detect_module._classify_shape = plain
    print(f"one object, {method}: the named shape's fill and hull fill (10th / 50th / 90th percentiles)")
    print(f"| shape | n | box fill | hull fill | read by the fill rule (circle / square / triangle) | hull >= {threshold:g} |")
    print("|---|---|---|---|---|---|")
    for shape, rows in sorted(seen.items()):
        a = np.array([r[:2] for r in rows])
        read = [sum(1 for r in rows if r[2] == s) for s in ("circle", "square", "triangle")]
        hull = sum(1 for r in rows if r[1] >= threshold and r[2] != "triangle")
        q = lambda col: " / ".join(f"{v:.3f}" for v in np.percentile(a[:, col], [10, 50, 90]))  # noqa: E731
        print(f"| {shape} | {len(rows)} | {q(0)} | {q(1)} | {' / '.join(map(str, read))} | {hull} |")


def paired(verdicts: dict, rule: str, subset: str, method: str) -> str | None:
    from attnreg.eval.stats import mean_ci

    keys = [k for k in verdicts if k[:3] == (rule, subset, "sd") and (rule, subset, method, *k[3:]) in verdicts]
    if not keys:
        return None
    a = [verdicts[k] for k in keys]
    b = [verdicts[(rule, subset, method, *k[3:])] for k in keys]
    d = [int(y) - int(x) for x, y in zip(a, b)]
    n = len(d)
    mean, low, high = mean_ci(d)
    kept = sum(1 for x, y in zip(a, b) if x and y) / max(1, sum(a))
    return (f"| {rule} | {subset} | {method} | {n} | {100 * sum(a) / n:.1f} % | {100 * sum(b) / n:.1f} % | "
            f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] | "
            f"{sum(x > 0 for x in d)} / {sum(x < 0 for x in d)} | {100 * kept:.1f} % |")


def rescore(folder: Path, threshold: float) -> None:
    from attnreg.toy import score

    plain = detect_module._classify_shape
    rules = (("fill", plain), (f"hull {threshold:g}", hull_rule(threshold)))
    verdicts, methods = {}, set()
    try:
        for record, image in records(folder):  # each picture read once, scored by both rules
            method = record["method"]
            if method == "attnreg":
                method += f" (binding {record['config'].get('binding'):g}, concentration "
                method += f"{record['config'].get('concentration'):g})"
            methods.add(method)
            for rule, classify in rules:
                detect_module._classify_shape = classify
                key = (rule, record["subset"], method, record["prompt"], record["seed"])
                verdicts[key] = bool(score(record["prompt"], image)["success"])
    finally:
        detect_module._classify_shape = plain
    print("\nevery method paired with sd, by rule")
    print("| rule | kind | method | pairs | sd | method | difference [95 %] | wins / losses | kept |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rule, _ in rules:
        for subset in ("1obj", "2obj", "3obj"):
            for method in sorted(methods - {"sd"}):
                line = paired(verdicts, rule, subset, method)
                if line:
                    print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--hull", type=float, default=0.9, help="hull fill at or above which a non-triangle is a square")
    ap.add_argument("--method", default="sd", help="the method whose one-object pictures the features come from")
    args = ap.parse_args()
    features(args.folder, args.method, args.hull)
    rescore(args.folder, args.hull)


if __name__ == "__main__":
    main()
