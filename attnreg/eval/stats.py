"""The benchmark's statistics: intervals, the paired comparison with the baseline (McNemar), how much
images changed, extra-object rates. Numbers only: report.py writes them down."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """Rate and its Wilson score interval."""
    if n == 0:
        return (math.nan, math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (p, max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95 % interval (Student t; normal when scipy is missing); n = 1 gives no interval."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return (mean, math.nan, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    try:
        from scipy.stats import t

        q = float(t.ppf(0.975, n - 1))
    except ImportError:
        q = Z95
    half = q * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)


def summarise(values: list) -> dict:
    """{"kind": "rate"|"mean", "value", "low", "high", "n"} of a list of booleans or numbers."""
    if values and all(isinstance(v, bool) for v in values):
        p, lo, hi = wilson(sum(values), len(values))
        return {"kind": "rate", "value": p, "low": lo, "high": hi, "n": len(values)}
    m, lo, hi = mean_ci([float(v) for v in values])
    return {"kind": "mean", "value": m, "low": lo, "high": hi, "n": len(values), "max": max(values, default=math.nan)}


def method_order(names) -> list[str]:
    """sd first (the baseline), then the others alphabetically."""
    names = sorted(set(names))
    return [n for n in names if n == "sd"] + [n for n in names if n != "sd"]


def method_labels(records: list[dict]):
    """A function record -> its method's label: the method name, with its configuration hash appended
    ("attnreg [532d86]") where one (data set, subset) holds that method in several configurations."""
    configs = defaultdict(set)
    for r in records:
        configs[(r["dataset"], r["subset"], r["method"])].add(r.get("config_hash", ""))

    def label(r):
        several = len(configs[(r["dataset"], r["subset"], r["method"])]) > 1
        return f"{r['method']} [{r.get('config_hash', '')}]" if several else r["method"]

    return label


def extra_objects(items: dict) -> dict[str, bool]:
    """{record key: the image has objects beyond those named} from the `detect` metric's items."""
    return {k: v["extra_objects"] > 0 for k, v in items.items() if isinstance(v.get("extra_objects"), (int, float))}


def paired_comparison(
    records: list[dict], values: dict[str, bool], baseline: str = "sd", extra: dict[str, bool] | None = None,
    out: Path | None = None,
) -> dict[tuple, dict]:
    """Each method against `baseline` on the (prompt, seed) pairs both have, per (dataset, subset).

    values: {record key: bool} (a success metric). Returns {(dataset, subset, method): {"n", "base", "rate",
    "diff", "low", "high", "wins", "losses", "p", "time_ratio"}}: rates on the common pairs, the paired
    difference with a 95 % Wald interval, wins = the method succeeds where the baseline fails, losses the
    reverse, p = exact two-sided McNemar test on wins vs losses, time_ratio = the method's total seconds /
    the baseline's on the same pairs. Methods run on fewer seeds (a partial run) are compared fairly this way.
    kept = of the pairs the baseline got right, the share the method still gets right. With `extra` ({record
    key: the image has objects beyond those named}), the two extra-object rates; with `out` (the benchmark
    folder), how much the images changed against the baseline's: mean absolute pixel difference (0-255)
    and SSIM, averaged over the pairs."""
    label = method_labels(records)  # two configurations of one method are two rows
    cells: dict[tuple, dict] = defaultdict(dict)  # (dataset, subset, method label) -> {(prompt, seed): record}
    for r in records:
        if r["key"] in values:
            cells[(r["dataset"], r["subset"], label(r))][(r["prompt"], r["seed"])] = r
    results = {}
    for (dataset, subset, method), mine in sorted(cells.items()):
        base = cells.get((dataset, subset, baseline))
        if method == baseline or not base:
            continue
        common = sorted(set(mine) & set(base))
        if not common:
            continue
        pairs = [(base[k], mine[k]) for k in common]
        row = _paired_row(pairs, values)
        if extra is not None:
            for name, side in (("base_extra", 0), ("extra", 1)):
                flags = [extra[p[side]["key"]] for p in pairs if p[side]["key"] in extra]
                row[name] = sum(flags) / len(flags) if flags else math.nan
        if out is not None:
            row["mad"], row["ssim"] = image_change(out, pairs)
        results[(dataset, subset, method)] = row
    return results


def _paired_row(pairs: list[tuple[dict, dict]], values: dict[str, bool]) -> dict:
    """The success rates, their paired difference and the McNemar test of (baseline, method) record pairs."""
    from scipy.stats import binomtest

    a = [bool(values[x["key"]]) for x, _ in pairs]
    b = [bool(values[y["key"]]) for _, y in pairs]
    n = len(pairs)
    wins = sum(y and not x for x, y in zip(a, b))
    losses = sum(x and not y for x, y in zip(a, b))
    diff = (wins - losses) / n
    se = math.sqrt(max(0.0, wins + losses - (wins - losses) ** 2 / n)) / n
    p = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0  # exact McNemar
    seconds = [sum(float(pair[side]["seconds"]) for pair in pairs) for side in (0, 1)]
    return {
        "n": n, "base": sum(a) / n, "rate": sum(b) / n, "diff": diff, "low": diff - Z95 * se,
        "high": diff + Z95 * se, "wins": wins, "losses": losses, "p": float(p),
        "time_ratio": seconds[1] / seconds[0] if seconds[0] else math.nan,
        "kept": sum(y for x, y in zip(a, b) if x) / sum(a) if any(a) else math.nan,
    }


def image_change(out: Path, pairs: list[tuple[dict, dict]]) -> tuple[float, float]:
    """Mean absolute pixel difference (0-255) and mean SSIM (scikit-image) between paired images."""
    import numpy as np
    from PIL import Image
    from skimage.metrics import structural_similarity

    mads, ssims = [], []
    for a, b in pairs:
        try:
            x, y = (np.asarray(Image.open(Path(out) / r["image"]).convert("RGB"), dtype=np.float64) for r in (a, b))
        except OSError:
            continue  # an unreadable image is left out of the mean, not fatal
        mads.append(float(np.abs(x - y).mean()))
        ssims.append(float(structural_similarity(x, y, channel_axis=-1, data_range=255.0, win_size=7)))
    return (sum(mads) / len(mads), sum(ssims) / len(ssims)) if mads else (math.nan, math.nan)
