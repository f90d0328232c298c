"""Pictures for people: PIL composites of images side by side, and the matplotlib figures of `explain`,
`ablate` and the benchmark report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# matplotlib is imported inside the functions: the explain figures draw on a bare `Figure` (no backend
# needed), the report's chart on pyplot with the Agg backend, so that they work headless.

RUN_LABELS = {"vanilla": "Original", "regulated": "Attention Regulation"}  # explain's runs
MAP_SCALES = ("panel", "figure")  # colour range of each map in maps.png: its own, or one for the figure
MAP_VIEWS = ("whole", "text")  # what a map is a share of: the whole attention row, or the prompt's words


def side_by_side(left, right, caption: str, labels=("original", "attnreg")):
    """Two images next to each other with labels above and `caption` written under them."""
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, 256 // max(left.width, 1))
    left, right = (im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in (left, right))
    font = ImageFont.load_default()
    lines = _wrap(caption, max(20, (left.width + right.width) // 7))
    pad, line_h = 8, 14
    canvas = Image.new("RGB", (left.width + right.width + 3 * pad, left.height + 2 * pad + line_h * (len(lines) + 1)), "white")
    canvas.paste(left, (pad, pad + line_h))
    canvas.paste(right, (2 * pad + left.width, pad + line_h))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), labels[0], fill="black", font=font)
    draw.text((2 * pad + left.width, 2), labels[1], fill="black", font=font)
    for i, line in enumerate(lines):
        draw.text((pad, 2 * pad + line_h + left.height + i * line_h), line, fill="black", font=font)
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


# -- explain (the paper's Figs. 2, 3) -----------------------------------------------------------
def maps_figure(ex, scale: str = "panel", view: str = "whole"):
    """Figure 3's layout for an `Explanation`: per run, a row of intermediate images, then a row per
    target token.

    view: "whole" draws each target's attention as recorded (on an MMDiT: its share of the whole joint
    softmax, image keys included); "text" draws it as a share of the prompt's word tokens (per pixel, the
    target's map over the sum of every word's map: the units the MMDiT loss measures in).

    scale: "panel" stretches each map's colours over its own range (as the paper's figure seems to);
    "figure" uses one range for every map, so a collapsed token also looks weak. Either way each map
    is labelled with its peak value."""
    from matplotlib.figure import Figure

    from .explain.numbers import RUNS

    if scale not in MAP_SCALES:
        raise ValueError(f"map scale must be one of {', '.join(MAP_SCALES)}, got {scale!r}")
    if view not in MAP_VIEWS:
        raise ValueError(f"map view must be one of {', '.join(MAP_VIEWS)}, got {view!r}")
    targets = [(i, t) for i, t in zip(ex.targets["indices"], ex.targets["tokens"])]

    def target_map(recorder, step, index):
        return recorder.target_map(step, index, view)

    vmax = None
    if scale == "figure":
        vmax = max(float(target_map(rec, s, i).max()) for rec in ex.recorders.values()
                   for s in ex.steps_shown if s in rec.maps for i, _ in targets)
    n_cols, per_run = len(ex.steps_shown), 1 + len(targets)
    fig = Figure(figsize=(1.5 * n_cols + 1.6, 1.55 * 2 * per_run + 1.0), layout="constrained")
    grid = fig.add_gridspec(2, 1)
    for block, run in enumerate(RUNS):
        sub = grid[block].subgridspec(per_run, n_cols)
        recorder = ex.recorders[run]
        for c, step in enumerate(ex.steps_shown):
            ax = fig.add_subplot(sub[0, c])
            image = ex.previews[run][c]  # None where the scheduler ran fewer steps
            if image is not None:
                ax.imshow(image)
            ax.set_title(f"Step {step}", fontsize=10)
            _bare(ax)
            if c == 0:
                ax.set_ylabel(RUN_LABELS[run], fontsize=11)
            for r, (index, text) in enumerate(targets, start=1):
                ax = fig.add_subplot(sub[r, c])
                if step in recorder.maps:
                    m = target_map(recorder, step, index).numpy()
                    ax.imshow(m, cmap="viridis", vmin=0 if vmax else None, vmax=vmax)
                    ax.text(0.03, 0.97, f"{m.max():.2f}", transform=ax.transAxes, ha="left", va="top",
                            fontsize=7, color="white")
                _bare(ax)
                if c == n_cols - 1:
                    ax.yaxis.set_label_position("right")
                    ax.set_ylabel(f"\u201c{text}\u201d", fontsize=11, rotation=270, labelpad=14)
    units = "share of the prompt's words" if view == "text" else "share of the whole attention row"
    fig.suptitle(f"Prompt: {ex.prompt}\n({units})" if view == "text" or getattr(ex, "joint", False)
                 else f"Prompt: {ex.prompt}", fontsize=11)
    return fig


def stats_figure(ex):
    """Figure 2's layout for an `Explanation`: the final image, then violin plots of every word token's
    attention at the two violin steps; plain run above, regulated below; the dominant token in red."""
    from matplotlib.figure import Figure

    from .explain.numbers import RUNS, dominant_token

    labels = [text for _, text in ex.tokens]
    targets = set(ex.targets["indices"])
    values = {run: {s: ex.recorders[run].values[s][0].numpy() for s in ex.violin_steps} for run in RUNS}
    top = max(float(v.max()) for per_step in values.values() for v in per_step.values())
    top = min(1.0, max(top * 1.2, 1e-3))
    width = max(4.0, 0.55 * len(labels) + 1.0)
    fig = Figure(figsize=(2.8 + 2 * width, 6.4), layout="constrained")
    axes = fig.subplots(2, 3, gridspec_kw={"width_ratios": [2.4 / width, 1, 1]})
    for r, run in enumerate(RUNS):
        axes[r, 0].imshow(ex.images[run])
        _bare(axes[r, 0])
        axes[r, 0].set_ylabel(RUN_LABELS[run], fontsize=11)
        if r == 0:
            axes[r, 0].set_title("Image")
        for c, step in enumerate(ex.violin_steps, start=1):
            ax = axes[r, c]
            data = [_violin_safe(column) for column in values[run][step]]
            parts = ax.violinplot(data, positions=range(len(labels)), showmeans=True, showextrema=True, widths=0.8)
            dom = dominant_token(ex.recorders[run], ex.tokens, step)
            d = [i for i, _ in ex.tokens].index(dom[0])
            parts["bodies"][d].set_facecolor("tab:red")
            parts["bodies"][d].set_alpha(0.6)
            ax.annotate("dominant", xy=(d, dom[2]), xytext=(0, 14), textcoords="offset points",
                        ha="center", va="bottom", color="tab:red", fontsize=8,
                        arrowprops=dict(arrowstyle="->", color="tab:red"))
            ax.set_ylim(0, top)
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
            for tick, (index, _) in zip(ax.get_xticklabels(), ex.tokens):
                if index in targets:
                    tick.set_fontweight("bold")
            if r == 0:
                ax.set_title(f"Attention statistics at step {step}", fontsize=10)
    fig.suptitle(f"{ex.prompt}  (targets in bold)", fontsize=11)
    return fig


def _violin_safe(values: np.ndarray) -> np.ndarray:
    """A violin of constant values has no density; widen it by a hair so matplotlib can draw it."""
    if np.ptp(values) == 0:
        return values + np.linspace(-1e-6, 1e-6, len(values))
    return values


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# -- ablate (the paper's Fig. 5) ----------------------------------------------------------------
def ablation_figure(result):
    """Fidelity and seconds per image of an `Ablation` against the parameter, with 95 % intervals; `sd`
    dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    rows = [r for r in result.rows if r["value"] != "sd"]
    sd = next((r for r in result.rows if r["value"] == "sd"), None)
    numeric = result.param != "layers"
    xs = [float(r["value"]) for r in rows] if numeric else list(range(len(rows)))
    for ax, key, title in ((axes[0], "fidelity", result.fidelity), (axes[1], "seconds", "seconds per image")):
        ys = [r[key]["value"] for r in rows]
        # max(0, ...): a Wilson bound can sit a rounding error on the wrong side of a rate of 0 or 1
        lo = [max(0.0, r[key]["value"] - r[key]["low"]) if not math.isnan(r[key]["low"]) else 0 for r in rows]
        hi = [max(0.0, r[key]["high"] - r[key]["value"]) if not math.isnan(r[key]["high"]) else 0 for r in rows]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, label="attnreg")
        if sd is not None and sd[key]["n"]:
            ax.axhline(sd[key]["value"], color="gray", linestyle="--", label="sd")
            if not math.isnan(sd[key]["low"]):
                ax.axhspan(sd[key]["low"], sd[key]["high"], color="gray", alpha=0.15)
        if all(y >= 0 for y in ys if not math.isnan(y)):
            ax.set_ylim(bottom=0)  # rates, similarities of this kind and seconds: intervals below 0 mean nothing
        ax.set_xlabel(result.param)
        ax.set_title(title + " (95 % intervals)", fontsize=10)
        if not numeric:
            ax.set_xticks(xs, [r["value"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(f"Ablation of {result.param}", fontsize=11)
    return fig


# -- the benchmark report -----------------------------------------------------------------------
def bar_chart(table: dict, columns: list[str], methods: list[str], path) -> None:
    """Write a PNG to `path`: per column a bar per (subset, method) with its 95 % interval.

    table: {(dataset, subset, method): {column: summary}} (`attnreg.eval.stats.summarise`); methods in
    the order of the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_write

    subsets = sorted({(d, s) for d, s, _ in table})
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
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)


def image_grid(out, rows: list[tuple[str, int]], methods: list[str], cells: dict):
    """A PIL grid of benchmark images: a row per (prompt, seed) labelled on the left, a column per method.

    cells: {(prompt, seed, method): record}; a record's "image" is relative to `out`; a missing cell
    stays white."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    side, label_w, head_h = 128, 220, 16
    grid = Image.new("RGB", (label_w + side * len(methods), head_h + side * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, m in enumerate(methods):
        draw.text((label_w + j * side + 2, 2), m, fill="black", font=font)
    for i, (prompt, seed) in enumerate(rows):
        label = "\n".join(textwrap.wrap(prompt, 34)[:6] + [f"seed {seed}"])
        draw.text((2, head_h + i * side + 2), label, fill="black", font=font)
        for j, m in enumerate(methods):
            r = cells.get((prompt, seed, m))
            if r is None:
                continue
            with Image.open(Path(out) / r["image"]) as im:
                grid.paste(im.convert("RGB").resize((side, side), Image.NEAREST), (label_w + j * side, head_h + i * side))
    return grid
