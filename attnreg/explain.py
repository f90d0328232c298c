"""`attnreg explain`: why a target goes missing, and what regulation changes (the paper's Figs. 2, 3).

One prompt, one seed, two runs (plain and regulated, the same starting noise), both recorded with an
`AttentionRecorder`. The result: the intermediate images and each target's attention map over the
steps (maps.png, Fig. 3's layout), violin plots of every prompt token's attention at two steps
(stats.png, Fig. 2's layout), the two final images side by side (compare.png), the per-token,
per-step numbers (explain.json) and a one-line diagnosis per target.

    from attnreg.explain import explain
    ex = explain(pipe, "a painting of an elephant with glasses", targets=["elephant", "glasses"], seed=42)
    ex.maps_figure; ex.stats_figure; ex.compare; print("\\n".join(ex.diagnosis))
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import RegulationConfig
from .recording import AttentionRecorder
from .regulator import AttentionRegulator, pipeline_default as _default, select_layers
from .tokens import resolve_targets, token_table

RUNS = ("vanilla", "regulated")
RUN_LABELS = {"vanilla": "Original", "regulated": "Attention Regulation"}
PAPER_STEPS_SHOWN = (0, 5, 15, 25, 35, 49)  # Figure 3, 50 steps
FILES = ("maps.png", "stats.png", "compare.png", "explain.json")
MAP_SCALES = ("panel", "figure")  # colour range of each map in maps.png: its own, or one for the figure


@dataclass
class Explanation:
    """What `explain` found; the figures display inline in a notebook."""

    prompt: str
    targets: dict  # AttentionRegulator.resolve(): words, indices, tokens, source
    seed: int
    steps: int
    edit_steps: int
    steps_shown: list[int]
    violin_steps: list[int]
    layers: list[str]  # the recorded cross-attention layers (their maps are averaged)
    tokens: list[tuple[int, str]]  # the prompt's word tokens (index, text)
    images: dict  # run -> final PIL image
    previews: dict  # run -> [PIL image per shown step]
    recorders: dict  # run -> AttentionRecorder
    numbers: dict  # what explain.json holds
    diagnosis: list[str]
    maps_figure: object = None  # matplotlib Figure
    stats_figure: object = None  # matplotlib Figure
    compare: object = None  # PIL image
    files: list[Path] = field(default_factory=list)

    def save(self, out: str | Path) -> list[Path]:
        """Write maps.png, stats.png, compare.png and explain.json into `out`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.maps_figure.savefig(out / "maps.png", dpi=110)
        self.stats_figure.savefig(out / "stats.png", dpi=110)
        self.compare.save(out / "compare.png")
        (out / "explain.json").write_text(json.dumps(self.numbers, indent=1))
        self.files = [out / name for name in FILES]
        return self.files


def default_steps_shown(steps: int) -> list[int]:
    """Figure 3's steps (0, 5, 15, 25, 35, 49 of 50), scaled to `steps`."""
    if steps == 50:
        return list(PAPER_STEPS_SHOWN)
    shown = [round(s / 49 * (steps - 1)) for s in PAPER_STEPS_SHOWN]
    return list(dict.fromkeys(shown))


def default_violin_steps(steps: int, edit_steps: int) -> list[int]:
    """Figure 2's steps: the first step and the last edited one (0 and 24 of 50)."""
    return [0, edit_steps - 1 if edit_steps > 1 else steps - 1]


def explain(
    pipe,
    prompt: str,
    targets: list[str | int] | None = None,
    seed: int = 0,
    steps_shown: list[int] | None = None,
    config: RegulationConfig | None = None,
    out: str | Path | None = None,
    *,
    violin_steps: list[int] | None = None,
    record_layers: list[str] | None = None,
    resolution: int | tuple[int, int] = 16,
    preview: str = "latents",
    map_scale: str = "panel",
    **pipeline_kwargs,
) -> Explanation:
    """Run `prompt` plainly and regulated from the same seed, recording the cross-attention.

    targets: words (or token indices) to regulate; None: the prompt's nouns.
    steps_shown: the steps of maps.png (default Figure 3's, scaled to num_inference_steps).
    violin_steps: the two steps of stats.png (default: 0 and the last edited step).
    record_layers: blocks or attn2 modules whose maps are averaged (default: the edited layers).
    resolution: side of the recorded maps (the height, for a non-square image), or (height, width).
    preview: "latents" decodes the current latents after each shown step (as Figure 3), "x0" the
        scheduler's prediction of the clean sample where it gives one (DDIM, Euler, ...).
    map_scale: "panel" (each map its own colour range, as the paper) or "figure" (one range for all).
    out: a folder to write the four files to (None: nothing written).
    Every other keyword goes to the pipeline (num_inference_steps, guidance_scale, height, ...).
    """
    if preview not in ("latents", "x0"):
        raise ValueError(f"preview must be 'latents' or 'x0', got {preview!r}")
    if map_scale not in MAP_SCALES:
        raise ValueError(f"map_scale must be one of {', '.join(MAP_SCALES)}, got {map_scale!r}")
    for name in ("generator", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "output_type", "prompt_embeds"):
        if name in pipeline_kwargs:
            raise ValueError(f"explain sets {name} itself (one image from `seed`, PIL output); do not pass it")
    if pipeline_kwargs.pop("num_images_per_prompt", 1) not in (None, 1):
        raise ValueError("explain makes one image per run; num_images_per_prompt must be 1")
    reg = AttentionRegulator(pipe, config)
    steps = int(pipeline_kwargs.get("num_inference_steps") or _default(pipe, "num_inference_steps"))
    guidance = pipeline_kwargs.get("guidance_scale", _default(pipe, "guidance_scale"))
    if steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
    if guidance <= 1:
        raise ValueError(f"explain compares against regulation, which needs guidance_scale > 1 (got {guidance})")
    pipeline_kwargs["num_inference_steps"] = steps
    edit_steps = steps // 2 if reg.config.edit_steps is None else reg.config.edit_steps
    steps_shown = default_steps_shown(steps) if steps_shown is None else [int(s) for s in steps_shown]
    violin_steps = default_violin_steps(steps, edit_steps) if violin_steps is None else [int(s) for s in violin_steps]
    for name, chosen in (("steps_shown", steps_shown), ("violin_steps", violin_steps)):
        bad = [s for s in chosen if not 0 <= s < steps]
        if bad or not chosen:
            raise ValueError(f"{name} must be steps in 0..{steps - 1} (num_inference_steps={steps}), got {chosen}")
    if len(violin_steps) != 2:
        raise ValueError(f"violin_steps must be two steps, got {violin_steps}")

    info = reg.resolve(prompt, targets)
    if not info["indices"]:
        raise ValueError(f"no targets given or found in {prompt!r}; pass targets=[...]")
    table = token_table(pipe.tokenizer, prompt)
    words = [(t.index, t.text) for t in table[1:-1]]
    if not words:
        raise ValueError("the prompt has no word tokens")
    per_word = {str(w): resolve_targets(pipe.tokenizer, prompt, [w]) for w in info["targets"]}
    height, width = pipeline_kwargs.get("height"), pipeline_kwargs.get("width")
    if isinstance(resolution, int) and height and width and height != width:
        resolution = (resolution, max(1, round(resolution * width / height)))  # keep the image's aspect
    layers = sorted(reg.layers if record_layers is None else select_layers(pipe.unet, tuple(record_layers)))

    recorders, images, previews, seconds = {}, {}, {}, {}
    for run in RUNS:
        recorder = AttentionRecorder(
            layers=layers, steps=steps_shown, tokens=[i for i, _ in words], resolution=resolution,
            stats_steps="all", values_steps=violin_steps,
        )
        latents = {}

        def keep(pipe_, step, timestep, kw, latents=latents):
            if step in steps_shown:
                latents[step] = kw["latents"][:1].detach().clone()
            return {}

        call = dict(pipeline_kwargs, callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
        with recorder.attached(reg), _x0_capture(pipe, latents, steps_shown, enabled=preview == "x0"):
            start = time.perf_counter()
            if run == "vanilla":
                result = reg.run(prompt, None, generator=_generator(seed), **call)
            else:
                result = reg(prompt, targets=info["targets"], generator=_generator(seed), **call)
            seconds[run] = time.perf_counter() - start
        recorders[run], images[run] = recorder, result.images[0]
        previews[run] = [decode_latents(pipe, latents[s]) if s in latents else None for s in steps_shown]

    numbers = _numbers(prompt, info, seed, steps, edit_steps, steps_shown, violin_steps, layers, words,
                       recorders, reg.config, seconds, per_word)
    diagnosis = diagnose(recorders, words, per_word, violin_steps)
    numbers["diagnosis"] = diagnosis
    ex = Explanation(
        prompt=prompt, targets=info, seed=seed, steps=steps, edit_steps=edit_steps, steps_shown=steps_shown,
        violin_steps=violin_steps, layers=layers, tokens=words, images=images, previews=previews,
        recorders=recorders, numbers=numbers, diagnosis=diagnosis,
    )
    ex.maps_figure = maps_figure(ex, map_scale)
    ex.stats_figure = stats_figure(ex)
    from .figures import side_by_side

    caption = f"{prompt} | seed {seed} | targets: " + ", ".join(f"{t} ({i})" for t, i in zip(info["tokens"], info["indices"]))
    ex.compare = side_by_side(images["vanilla"], images["regulated"], caption)
    if out is not None:
        ex.save(out)
    return ex


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


class _x0_capture:
    """Wrap the scheduler's step to keep its x0 prediction at the shown steps (where it has one)."""

    def __init__(self, pipe, store: dict, steps: list[int], enabled: bool):
        self.pipe, self.store, self.steps, self.enabled, self.count = pipe, store, set(steps), enabled, 0

    def __enter__(self):
        if not self.enabled:
            return self
        scheduler, original = self.pipe.scheduler, self.pipe.scheduler.step

        def step(*args, **kwargs):
            output = original(*args, **kwargs)
            x0 = output[1] if isinstance(output, tuple) and len(output) > 1 else getattr(output, "pred_original_sample", None)
            if self.count in self.steps and x0 is not None:
                self.store[("x0", self.count)] = x0[:1].detach().clone()
            self.count += 1
            return output

        scheduler.step = step
        return self

    def __exit__(self, *exc):
        if self.enabled:
            del self.pipe.scheduler.step  # the class's own method again
            for key in [k for k in self.store if isinstance(k, tuple)]:
                self.store[key[1]] = self.store.pop(key)  # x0 replaces the latents where there is one
        return False


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor):
    """A PIL image of (1, C, h, w) latents through the pipeline's VAE."""
    vae = pipe.vae
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        z = z + shift
    image = vae.decode(z, return_dict=False)[0]
    if not torch.isfinite(image).all() and vae.dtype != torch.float32:  # SDXL's VAE overflows in fp16
        dtype = vae.dtype
        image = vae.to(torch.float32).decode(z.float(), return_dict=False)[0]
        vae.to(dtype)
    return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]


# -- the numbers --------------------------------------------------------------------------------
def _numbers(prompt, info, seed, steps, edit_steps, steps_shown, violin_steps, layers, words, recorders, config,
             seconds, per_word) -> dict:
    runs = {}
    for run, recorder in recorders.items():
        recorded_steps, _ = recorder.statistic("mean")
        tokens = []
        for k, (index, text) in enumerate(words):
            entry = {"index": index, "token": text, "target": index in info["indices"]}
            for name in ("mean", "max", "p90"):
                entry[name] = [round(float(recorder.stats[s][name][0, k]), 5) for s in recorded_steps]
            tokens.append(entry)
        dominant = {str(s): dominant_token(recorder, words, s)[1] for s in violin_steps}
        runs[run] = {"seconds_with_recording": round(seconds[run], 3), "recorded_bytes": recorder.nbytes(),
                     "steps": recorded_steps, "dominant_at_violin_steps": dominant, "tokens": tokens}
    return {
        "prompt": prompt,
        "seed": seed,
        "targets": {"words": [str(t) for t in info["targets"]], "indices": info["indices"], "tokens": info["tokens"],
                    "per_word": per_word, "source": info["source"]},
        "num_inference_steps": steps,
        "edit_steps": edit_steps,
        "steps_shown": steps_shown,
        "violin_steps": violin_steps,
        "recorded_layers": layers,
        "statistics": "over the pixels of the head- and layer-averaged map of the conditional half",
        "config": config.to_dict(),
        "runs": runs,
    }


def _peak(recorder, words, indices, step) -> float:
    """The largest pixel value at `step` over the given token indices."""
    ks = [k for k, (i, _) in enumerate(words) if i in indices]
    return float(recorder.stats[step]["max"][0, ks].max())


def dominant_token(recorder, words, step, exclude=()) -> tuple[int, str, float] | None:
    """(index, text, peak) of the word token with the highest peak attention at `step`."""
    peaks = recorder.stats[step]["max"][0]
    best = None
    for k, (index, text) in enumerate(words):
        if index in exclude:
            continue
        if best is None or float(peaks[k]) > best[2]:
            best = (index, text, float(peaks[k]))
    return best


def _trend(before: float, after: float) -> str:
    if after < 0.9 * before:
        return "fell"
    if after > 1.1 * before:
        return "rose"
    return "barely moved"


def diagnose(recorders, words, per_word: dict, violin_steps) -> list[str]:
    """One line per target: its peak attention at the two violin steps, against the dominant token,
    without regulation, then with it."""
    a, b = violin_steps
    vanilla, regulated = recorders["vanilla"], recorders["regulated"]
    lines = []
    for word, indices in per_word.items():
        va, vb = _peak(vanilla, words, indices, a), _peak(vanilla, words, indices, b)
        line = f"{word}: peak attention {_trend(va, vb)} from {va:.2f} at step {a} to {vb:.2f} at step {b}"
        dom = dominant_token(vanilla, words, b, exclude=indices)
        if dom is not None:
            d_index, d_text, db = dom
            da = _peak(vanilla, words, [d_index], a)
            verb = {"fell": "fell", "rose": "rose", "barely moved": "stayed"}[_trend(da, db)]
            line += f" while {d_text} {verb} {'at' if verb == 'stayed' else 'to'} {db:.2f}"
        ra, rb = _peak(regulated, words, indices, a), _peak(regulated, words, indices, b)
        line += f"; regulated: {word} {ra:.2f} -> {rb:.2f}"
        if dom is not None:
            line += f", {dom[1]} {_peak(regulated, words, [dom[0]], b):.2f} at step {b}"
        lines.append(line)
    return lines


# -- the figures --------------------------------------------------------------------------------
def maps_figure(ex: Explanation, scale: str = "panel"):
    """Figure 3's layout: per run, a row of intermediate images, then a row per target token.

    scale: "panel" stretches each map's colours over its own range (as the paper's figure seems to);
    "figure" uses one range for every map, so a collapsed token also looks weak. Either way each map
    is labelled with its peak value."""
    from matplotlib.figure import Figure

    if scale not in MAP_SCALES:
        raise ValueError(f"map scale must be one of {', '.join(MAP_SCALES)}, got {scale!r}")
    targets = [(i, t) for i, t in zip(ex.targets["indices"], ex.targets["tokens"])]
    vmax = None
    if scale == "figure":
        vmax = max(float(rec.maps[s][0, rec.token_index(i)].max()) for rec in ex.recorders.values()
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
                    m = recorder.maps[step][0, recorder.token_index(index)].numpy()
                    ax.imshow(m, cmap="viridis", vmin=0 if vmax else None, vmax=vmax)
                    ax.text(0.03, 0.97, f"{m.max():.2f}", transform=ax.transAxes, ha="left", va="top",
                            fontsize=7, color="white")
                _bare(ax)
                if c == n_cols - 1:
                    ax.yaxis.set_label_position("right")
                    ax.set_ylabel(f"\u201c{text}\u201d", fontsize=11, rotation=270, labelpad=14)
    fig.suptitle(f"Prompt: {ex.prompt}", fontsize=11)
    return fig


def stats_figure(ex: Explanation):
    """Figure 2's layout: the final image, then violin plots of every word token's attention at the
    two violin steps; plain run above, regulated below; the dominant token in red."""
    from matplotlib.figure import Figure

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
