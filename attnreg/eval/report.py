"""`attnreg report DIR`: report.md with means and 95 % intervals per (data set, subset, method), a bar
chart with the intervals, and an image grid per subset (rows = prompts, columns = methods, same seed).

The numbers come from stats.py, the pictures from `attnreg.figures`; this module reads the records and
writes the files."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path

from ..files import atomic_save_image, atomic_write_text
from .io import check_folder, iter_records, missing_images_note, records_without_image
from .metrics import load_scores
from .stats import extra_objects, method_labels, method_order, paired_comparison, summarise

# The headline value of each metric comes first in the tables and the chart.
PRIMARY = ("detect.success", "geneval.correct", "owl.all_found", "clip.full", "clip.min_object", "blip.text_text")


def _fmt(s: dict, digits: int = 3) -> str:
    if s["n"] == 0 or math.isnan(s["value"]):
        return "-"
    scale, unit = (100, " %") if s["kind"] == "rate" else (1, "")
    value = f"{s['value'] * scale:.{1 if scale == 100 else digits}f}"
    if math.isnan(s["low"]):
        return f"{value}{unit}"
    d = 1 if scale == 100 else digits
    return f"{value}{unit} [{s['low'] * scale:.{d}f}, {s['high'] * scale:.{d}f}]"


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


def write_report(out: str | Path) -> Path:
    """Write DIR/report.md, DIR/report_metrics.png and DIR/report_grid_<subset>.png; returns report.md."""
    from ..figures import bar_chart

    out = check_folder(out)
    records, table, columns = collect(out)
    no_image = records_without_image(out)
    if no_image:  # n counts images; say which records it leaves out
        warnings.warn(f"attnreg report: n counts {len(records)} of {len(records) + len(no_image)} records; "
                      f"{missing_images_note(out, no_image)}", stacklevel=2)
    if not records:
        raise ValueError(f"{out} holds no finished benchmark records (run `attnreg bench` first)")
    scores = load_scores(out)
    lines = _header(out, records, scores)
    if no_image:
        lines[-3:-3] = [f"- left out for want of an image: {len(no_image)} record(s): {', '.join(no_image)}"]
    lines += _geneval(records, scores)
    lines += _tables(table, columns)
    lines += _paired(out, records, scores, columns)
    chart = out / "report_metrics.png"
    bar_chart(table, [*columns, "seconds/image"], method_order(m for _, _, m in table), chart)
    lines += ["## Figures", "", f"![metrics]({chart.name})", ""]
    for (dataset, subset), path in _grids(out, records).items():
        lines += [f"![{dataset} {subset}]({path.name})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _header(out: Path, records: list[dict], scores: dict) -> list[str]:
    """The title, the runs, what was generated and how it was scored."""
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
    return lines


def _geneval(records: list[dict], scores: dict) -> list[str]:
    """GenEval's own summary per method, when the folder has geneval scores."""
    from .geneval import summary_lines

    data = scores.get("geneval")
    if not data:
        return []
    label = method_labels(records)
    by_method: dict[str, list] = {}
    for r in records:
        values = data["items"].get(r["key"])
        if values is not None:
            by_method.setdefault(label(r), []).append({"prompt": r["prompt"], "tag": values["tag"],
                                                        "correct": values["correct"]})
    return summary_lines({m: by_method[m] for m in method_order(by_method)}, data.get("settings", {}))


def _tables(table: dict, columns: list[str]) -> list[str]:
    """A table per (data set, subset): a row per method."""
    lines = []
    for dataset, subset in sorted({(d, s) for d, s, _ in table}):
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
    return lines


def _paired(out: Path, records: list[dict], scores: dict, columns: list[str]) -> list[str]:
    """The paired comparison with sd on the first success metric there is (none: no lines)."""
    success = next((c for c in PRIMARY if c in columns and c.split(".")[0] in scores), None)
    if not success:
        return []
    metric, field = success.split(".", 1)
    items = scores[metric]["items"]
    values = {k: v[field] for k, v in items.items() if isinstance(v.get(field), bool)}
    extra = extra_objects(items) if metric == "detect" else None
    rows = paired_comparison(records, values, extra=extra, out=out)
    if not rows:
        return []
    lines = [f"## Paired with sd ({success})", "",
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
    return lines


def _grids(out: Path, records: list[dict], max_prompts: int = 8) -> dict:
    """One grid per (dataset, subset): rows = the first prompts, columns = methods, at the first seed
    that every method has for that prompt."""
    from ..figures import image_grid
    from ..files import slug

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
        path = out / f"report_grid_{slug(dataset.replace('file:', ''), 20)}_{slug(subset, 30)}.png"
        atomic_save_image(path, image_grid(out, rows, methods, cells))
        written[(dataset, subset)] = path
    return written
