"""`attnreg report DIR`: report.md with means and 95 % intervals per (data set, subset, method), a bar
chart with the intervals, and an image grid per subset (rows = prompts, columns = methods, same seed)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from ..files import atomic_write_text
from .io import iter_records
from .metrics import load_scores

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


def _fmt(s: dict, digits: int = 3) -> str:
    if s["n"] == 0 or math.isnan(s["value"]):
        return "-"
    scale, unit = (100, " %") if s["kind"] == "rate" else (1, "")
    value = f"{s['value'] * scale:.{1 if scale == 100 else digits}f}"
    if math.isnan(s["low"]):
        return f"{value}{unit}"
    d = 1 if scale == 100 else digits
    return f"{value}{unit} [{s['low'] * scale:.{d}f}, {s['high'] * scale:.{d}f}]"


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


def collect(out: Path) -> tuple[list[dict], dict, list[str]]:
    """The records, the table {(dataset, subset, method label): {column: summary}}, and the columns."""
    records = list(iter_records(out))
    scores = load_scores(out)
    label = method_labels(records)
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    columns: list[str] = []
    for r in records:
        g = groups[(r["dataset"], r["subset"], label(r))]
        g["seconds/image"].append(float(r["seconds"]))
        g["peak memory (MiB)"].append(r["peak_memory_bytes"] / 2**20)
        for metric, data in sorted(scores.items()):
            values = data["items"].get(r["key"])
            if not values:
                continue
            for field, v in values.items():
                if isinstance(v, (bool, int, float)) and not (isinstance(v, float) and math.isnan(v)):
                    col = f"{metric}.{field}"
                    g[col].append(v)
                    if col not in columns:
                        columns.append(col)
    table = {key: {col: summarise(vals) for col, vals in cols.items()} for key, cols in groups.items()}
    columns.sort(key=lambda c: (PRIMARY.index(c) if c in PRIMARY else len(PRIMARY), c))
    return records, table, columns


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
    from scipy.stats import binomtest

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
        a = [bool(values[base[k]["key"]]) for k in common]
        b = [bool(values[mine[k]["key"]]) for k in common]
        n = len(common)
        wins = sum(y and not x for x, y in zip(a, b))
        losses = sum(x and not y for x, y in zip(a, b))
        diff = (wins - losses) / n
        se = math.sqrt(max(0.0, wins + losses - (wins - losses) ** 2 / n)) / n
        p = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
        seconds = [sum(float(c[k]["seconds"]) for k in common) for c in (base, mine)]
        row = {
            "n": n, "base": sum(a) / n, "rate": sum(b) / n, "diff": diff, "low": diff - Z95 * se,
            "high": diff + Z95 * se, "wins": wins, "losses": losses, "p": float(p),
            "time_ratio": seconds[1] / seconds[0] if seconds[0] else math.nan,
            "kept": sum(y for x, y in zip(a, b) if x) / sum(a) if any(a) else math.nan,
        }
        if extra is not None:
            for name, cell in (("base_extra", base), ("extra", mine)):
                flags = [extra[cell[k]["key"]] for k in common if cell[k]["key"] in extra]
                row[name] = sum(flags) / len(flags) if flags else math.nan
        if out is not None:
            row["mad"], row["ssim"] = image_change(out, [(base[k], mine[k]) for k in common])
        results[(dataset, subset, method)] = row
    return results


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


# The headline value of each metric comes first in the tables and the chart.
PRIMARY = ("detect.success", "owl.all_found", "clip.full", "clip.min_object", "blip.text_text")


def write_report(out: str | Path) -> Path:
    """Write DIR/report.md, DIR/report_metrics.png and DIR/report_grid_<subset>.png; returns report.md."""
    out = Path(out)
    records, table, columns = collect(out)
    if not records:
        raise ValueError(f"{out} holds no finished benchmark records (run `attnreg bench` first)")
    scores = load_scores(out)
    lines = [f"# Benchmark report: {out.name}", ""]
    runs = sorted({tuple(sorted(r.get("run", {}).items())) for r in records})
    for run in runs:
        lines.append("- run: " + ", ".join(f"{k}={v}" for k, v in run))
    seeds = sorted({r["seed"] for r in records})
    lines.append(f"- {len(records)} images, {len({r['prompt'] for r in records})} prompts, {len(seeds)} seeds "
                 f"({seeds[0]}..{seeds[-1]})")
    for metric, data in sorted(scores.items()):
        settings = ", ".join(f"{k}={v}" for k, v in data.get("settings", {}).items()) or "no settings"
        lines.append(f"- {metric}: {settings} ({len(data.get('items', {}))} images scored)")
    lines += ["", "Rates (%) with Wilson 95 % intervals; means with Student-t 95 % intervals; "
              "overhead = mean seconds per image / that of `sd` in the same subset - 1.", ""]
    subsets = sorted({(d, s) for d, s, _ in table})
    for dataset, subset in subsets:
        lines += [f"## {dataset} / {subset}", ""]
        methods = method_order(m for d, s, m in table if (d, s) == (dataset, subset))
        sd = table.get((dataset, subset, "sd"), {}).get("seconds/image")
        head = ["method", "n", *columns, "seconds/image", "overhead vs sd", "peak memory, max (MiB)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for m in methods:
            row = table[(dataset, subset, m)]
            sec = row["seconds/image"]
            overhead = "-" if not sd or m == "sd" else f"{(sec['value'] / sd['value'] - 1) * 100:+.1f} % ({sec['value'] / sd['value']:.2f}x)"
            mem = row["peak memory (MiB)"]
            cells = [m, str(sec["n"]), *(_fmt(row[c]) if c in row else "-" for c in columns), _fmt(sec, 3), overhead,
                     f"{mem['max']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    success = next((c for c in PRIMARY if c in columns and c.split(".")[0] in scores), None)
    if success:
        metric, field = success.split(".", 1)
        values = {k: v[field] for k, v in scores[metric]["items"].items() if isinstance(v.get(field), bool)}
        extra = None
        if metric == "detect":
            extra = {k: v["extra_objects"] > 0 for k, v in scores[metric]["items"].items()
                     if isinstance(v.get("extra_objects"), (int, float))}
        rows = paired_comparison(records, values, extra=extra, out=out)
        if rows:
            lines += [f"## Paired with sd ({success})", "",
                      "On the (prompt, seed) pairs both methods have: rates, the difference with a 95 % Wald "
                      "interval, wins/losses (this method right where sd is wrong / the reverse), exact McNemar "
                      "p, kept (of the pairs sd got right, the share still right), the extra-object rates (sd -> "
                      "method; images with more objects than named), how much the image changed against sd's "
                      "(mean absolute pixel difference 0-255, SSIM), and total seconds / those of sd.", "",
                      "| data set / subset | method | pairs | sd | method | difference | wins / losses | p | kept "
                      "| extra objects | pixel diff | SSIM | time |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for (dataset, subset, m), r in rows.items():
                extra_cell = (f"{r['base_extra'] * 100:.1f} -> {r['extra'] * 100:.1f} %" if "extra" in r else "-")
                lines.append(
                    f"| {dataset} / {subset} | {m} | {r['n']} | {r['base'] * 100:.1f} % | {r['rate'] * 100:.1f} % | "
                    f"{r['diff'] * 100:+.1f} pp [{r['low'] * 100:+.1f}, {r['high'] * 100:+.1f}] | "
                    f"{r['wins']} / {r['losses']} | {r['p']:.2g} | {r['kept'] * 100:.1f} % | {extra_cell} | "
                    f"{r['mad']:.1f} | {r['ssim']:.3f} | {r['time_ratio']:.2f}x |")
            lines.append("")
    chart = _bar_chart(out, table, [*columns, "seconds/image"])
    lines += ["## Figures", "", f"![metrics]({chart.name})", ""]
    for (dataset, subset), path in _grids(out, records).items():
        lines += [f"![{dataset} {subset}]({path.name})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _bar_chart(out: Path, table: dict, columns: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(table)
    subsets = sorted({(d, s) for d, s, _ in keys})
    methods = method_order(m for _, _, m in keys)
    fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.6), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, col in zip(axes[0], columns):
        for j, m in enumerate(methods):
            xs, ys, err = [], [], [[], []]
            for i, (d, s) in enumerate(subsets):
                cell = table.get((d, s, m), {}).get(col)
                if not cell or math.isnan(cell["value"]):
                    continue
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(cell["value"])
                lo = cell["low"] if not math.isnan(cell["low"]) else cell["value"]
                hi = cell["high"] if not math.isnan(cell["high"]) else cell["value"]
                # max(0, .): at a rate of 0 or 1 the Wilson bound equals the rate up to rounding
                err[0].append(max(0.0, cell["value"] - lo))
                err[1].append(max(0.0, hi - cell["value"]))
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=m)
        ax.set_xticks(range(len(subsets)), [s for _, s in subsets], rotation=20, fontsize=8)
        ax.set_title(col, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "report_metrics.png"
    tmp = out / ".report_metrics.png.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _grids(out: Path, records: list[dict], max_prompts: int = 8) -> dict:
    """One grid per (dataset, subset): rows = the first prompts, columns = methods, at the first seed
    that every method has for that prompt."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    by_subset = defaultdict(list)
    for r in records:
        by_subset[(r["dataset"], r["subset"])].append(r)
    written = {}
    for (dataset, subset), recs in sorted(by_subset.items()):
        methods = method_order(r["method"] for r in recs)
        cells = {(r["prompt"], r["seed"], r["method"]): r for r in recs}
        rows = []
        for prompt in dict.fromkeys(r["prompt"] for r in recs):
            seeds = sorted({s for p, s, _ in cells if p == prompt})
            seed = next((s for s in seeds if all((prompt, s, m) in cells for m in methods)), seeds[0])
            rows.append((prompt, seed))
            if len(rows) == max_prompts:
                break
        side, label_w, head_h = 128, 220, 16
        grid = Image.new("RGB", (label_w + side * len(methods), head_h + side * len(rows)), "white")
        draw = ImageDraw.Draw(grid)
        for j, m in enumerate(methods):
            draw.text((label_w + j * side + 2, 2), m, fill="black", font=font)
        for i, (prompt, seed) in enumerate(rows):
            import textwrap

            label = "\n".join(textwrap.wrap(prompt, 34)[:6] + [f"seed {seed}"])
            draw.text((2, head_h + i * side + 2), label, fill="black", font=font)
            for j, m in enumerate(methods):
                r = cells.get((prompt, seed, m))
                if r is None:
                    continue
                with Image.open(out / r["image"]) as im:
                    grid.paste(im.convert("RGB").resize((side, side), Image.NEAREST), (label_w + j * side, head_h + i * side))
        from ..names import slug

        path = out / f"report_grid_{slug(dataset.replace('file:', ''), 20)}_{slug(subset, 30)}.png"
        tmp = path.with_name("." + path.name + ".tmp")
        grid.save(tmp, format="PNG")
        tmp.replace(path)
        written[(dataset, subset)] = path
    return written
