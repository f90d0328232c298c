"""Running `explain`: check the call, run the prompt plainly and regulated with a recorder attached,
keep the intermediate latents (or x0) and decode them, then gather the numbers and the figures."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RegulationConfig
from ..figures import MAP_SCALES, maps_figure, side_by_side, stats_figure
from ..pipelines import default_image_size
from ..recording import AttentionRecorder
from ..regulator import AttentionRegulator
from .numbers import RUNS, diagnose, explain_numbers

PAPER_STEPS_SHOWN = (0, 5, 15, 25, 35, 49)  # Figure 3, 50 steps
FILES = ("maps.png", "stats.png", "compare.png", "explain.json")
TEXT_VIEW_FILE = "maps_text.png"  # on an MMDiT, the maps as shares of the prompt's words, beside maps.png
_OWN_KWARGS = ("generator", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "output_type", "prompt_embeds")


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
    layers: list[str]  # the recorded attention layers (their maps are averaged; each is kept in
    # recorders[run].layer_maps at the shown steps, and its target numbers are in numbers["per_layer"])
    tokens: list[tuple[int, str]]  # the prompt's word tokens (index, text)
    images: dict  # run -> final PIL image
    previews: dict  # run -> [PIL image per shown step]
    recorders: dict  # run -> AttentionRecorder
    numbers: dict  # what explain.json holds
    diagnosis: list[str]
    maps_figure: object = None  # matplotlib Figure
    stats_figure: object = None  # matplotlib Figure
    maps_text_figure: object = None  # matplotlib Figure, MMDiT only: the maps in the prompt's words' units
    joint: bool = False  # the maps are joint attention (an MMDiT): a share of the whole row is not the text's
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
        if self.maps_text_figure is not None:
            self.maps_text_figure.savefig(out / TEXT_VIEW_FILE, dpi=110)
            self.files.append(out / TEXT_VIEW_FILE)
        return self.files


@dataclass
class _Plan:
    """The settings both runs share, checked before the first one starts."""

    prompt: str
    seed: int
    steps: int
    edit_steps: int
    steps_shown: list[int]
    violin_steps: list[int]
    info: dict  # AttentionRegulator.resolve()
    words: list[tuple[int, str]]  # the prompt's word tokens (index, text)
    per_word: dict  # target word -> its token indices
    layers: list[str]
    resolution: int | tuple[int, int]
    preview: str
    call: dict  # the pipeline's keywords
    maps_are: str  # what the recorded maps are, in words (the regulator says)
    joint: bool = False  # an MMDiT's joint attention


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
    """Run `prompt` plainly and regulated from the same seed, recording the cross-attention (on SD3 and
    FLUX: the image-to-text part of the joint attention, at the columns of the stream the targets are
    looked up in; see recording.py).

    targets: words (or token indices) to regulate; None: the prompt's nouns.
    steps_shown: the steps of maps.png (default Figure 3's, scaled to num_inference_steps).
    violin_steps: the two steps of stats.png (default: 0 and the last edited step).
    record_layers: blocks or attention modules whose maps are averaged (default: the edited layers).
    resolution: side of the recorded maps (the height, for a non-square image), or (height, width).
    preview: "latents" decodes the current latents after each shown step (as Figure 3), "x0" the
        scheduler's prediction of the clean sample where it gives one (DDIM, Euler, ...).
    map_scale: "panel" (each map its own colour range, as the paper) or "figure" (one range for all).
    out: a folder to write the four files to (None: nothing written).
    Every other keyword goes to the pipeline (num_inference_steps, guidance_scale, height, ...).
    """
    call = _checked_call(preview, map_scale, pipeline_kwargs)
    reg = AttentionRegulator(pipe, config)
    plan = _plan(reg, prompt, targets, seed, steps_shown, violin_steps, record_layers, resolution, preview, call)
    recorders, images, previews, seconds = {}, {}, {}, {}
    for run in RUNS:
        recorders[run], images[run], previews[run], seconds[run] = _run_once(reg, plan, run)
    ex = _explanation(plan, reg.config, recorders, images, previews, seconds, map_scale)
    if out is not None:
        ex.save(out)
    return ex


def _checked_call(preview: str, map_scale: str, pipeline_kwargs: dict) -> dict:
    """The pipeline's keywords, once the options and keywords explain cannot take are refused."""
    if preview not in ("latents", "x0"):
        raise ValueError(f"preview must be 'latents' or 'x0', got {preview!r}")
    if map_scale not in MAP_SCALES:
        raise ValueError(f"map_scale must be one of {', '.join(MAP_SCALES)}, got {map_scale!r}")
    for name in _OWN_KWARGS:
        if name in pipeline_kwargs:
            raise ValueError(f"explain sets {name} itself (one image from `seed`, PIL output); do not pass it")
    call = dict(pipeline_kwargs)
    if call.pop("num_images_per_prompt", 1) not in (None, 1):
        raise ValueError("explain makes one image per run; num_images_per_prompt must be 1")
    return call


def _call_settings(reg: AttentionRegulator, pipeline_kwargs: dict) -> tuple[int, int]:
    """(steps, edit_steps) of the call, checked by the regulator's own rules before the plain run (the
    regulated run, second, would find a bad call only after the first)."""
    steps = pipeline_kwargs.get("num_inference_steps")
    if steps is not None and steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
    return reg.call_steps(pipeline_kwargs)


def _plan(reg, prompt, targets, seed, steps_shown, violin_steps, record_layers, resolution, preview, call) -> _Plan:
    steps, edit_steps = _call_settings(reg, call)
    steps_shown, violin_steps = _chosen_steps(steps, edit_steps, steps_shown, violin_steps)
    info, words, per_word = _targets(reg, prompt, targets)
    height, width = call.get("height"), call.get("width")
    if isinstance(resolution, int) and height and width and height != width:
        resolution = (resolution, max(1, round(resolution * width / height)))  # keep the image's aspect
    layers = sorted(reg.layers if record_layers is None else reg.select_layers(record_layers))
    return _Plan(prompt=prompt, seed=seed, steps=steps, edit_steps=edit_steps, steps_shown=steps_shown,
                 violin_steps=violin_steps, info=info, words=words, per_word=per_word, layers=layers,
                 resolution=resolution, preview=preview, call=dict(call, num_inference_steps=steps),
                 maps_are=reg.maps_are, joint=hasattr(reg, "family"))


def _chosen_steps(steps: int, edit_steps: int, steps_shown, violin_steps) -> tuple[list[int], list[int]]:
    """The steps of maps.png and the two of stats.png, defaulted and checked against `steps`."""
    steps_shown = default_steps_shown(steps) if steps_shown is None else [int(s) for s in steps_shown]
    violin_steps = default_violin_steps(steps, edit_steps) if violin_steps is None else [int(s) for s in violin_steps]
    for name, chosen in (("steps_shown", steps_shown), ("violin_steps", violin_steps)):
        bad = [s for s in chosen if not 0 <= s < steps]
        if bad or not chosen:
            raise ValueError(f"{name} must be steps in 0..{steps - 1} (num_inference_steps={steps}), got {chosen}")
    if len(violin_steps) != 2:
        raise ValueError(f"violin_steps must be two steps, got {violin_steps}")
    return steps_shown, violin_steps


def _targets(reg, prompt: str, targets) -> tuple[dict, list[tuple[int, str]], dict]:
    """The resolved targets, the prompt's word tokens (index, text), and each target word's indices."""
    info = reg.resolve(prompt, targets)
    if not info["indices"]:
        raise ValueError(f"no targets given or found in {prompt!r}; pass targets=[...]")
    words = [(t.index, t.text) for t in reg.word_tokens(prompt)]
    if not words:
        raise ValueError("the prompt has no word tokens")
    per_word = {str(w): reg.resolve(prompt, [w])["indices"] for w in info["targets"]}
    return info, words, per_word


def _run_once(reg, plan: _Plan, run: str) -> tuple:
    """One run, "vanilla" or "regulated", recorded: (recorder, final image, previews, seconds)."""
    recorder = AttentionRecorder(
        layers=plan.layers, steps=plan.steps_shown, tokens=[i for i, _ in plan.words], resolution=plan.resolution,
        stats_steps="all", values_steps=plan.violin_steps, per_layer=True,
    )
    latents = {}

    def keep(pipe_, step, timestep, kw):
        if step in plan.steps_shown:
            latents[step] = kw["latents"][:1].detach().clone()
        return {}

    call = dict(plan.call, callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
    with recorder.attached(reg), _x0_capture(reg.pipe, latents, plan.steps_shown, enabled=plan.preview == "x0"):
        start = time.perf_counter()
        if run == "vanilla":
            result = reg.run(plan.prompt, None, generator=_generator(plan.seed), **call)
        else:
            result = reg(plan.prompt, targets=plan.info["targets"], generator=_generator(plan.seed), **call)
        seconds = time.perf_counter() - start
    size = plan.call.get("height"), plan.call.get("width")
    previews = [decode_latents(reg.pipe, latents[s], *size) if s in latents else None for s in plan.steps_shown]
    return recorder, result.images[0], previews, seconds


def _explanation(plan: _Plan, config, recorders, images, previews, seconds, map_scale: str) -> Explanation:
    """The numbers, the diagnosis and the three pictures of the two runs."""
    numbers = explain_numbers(
        prompt=plan.prompt, info=plan.info, seed=plan.seed, steps=plan.steps, edit_steps=plan.edit_steps,
        steps_shown=plan.steps_shown, violin_steps=plan.violin_steps, layers=plan.layers, words=plan.words,
        recorders=recorders, config=config, seconds=seconds, per_word=plan.per_word, maps_are=plan.maps_are,
    )
    diagnosis = diagnose(recorders, plan.words, plan.per_word, plan.violin_steps)
    numbers["diagnosis"] = diagnosis
    ex = Explanation(
        prompt=plan.prompt, targets=plan.info, seed=plan.seed, steps=plan.steps, edit_steps=plan.edit_steps,
        steps_shown=plan.steps_shown, violin_steps=plan.violin_steps, layers=plan.layers, tokens=plan.words,
        images=images, previews=previews, recorders=recorders, numbers=numbers, diagnosis=diagnosis, joint=plan.joint,
    )
    ex.maps_figure = maps_figure(ex, map_scale)
    if plan.joint:
        numbers["target_shares"] = target_shares(plan, recorders)
        ex.maps_text_figure = maps_figure(ex, map_scale, view="text")
    ex.stats_figure = stats_figure(ex)
    info = plan.info
    caption = f"{plan.prompt} | seed {plan.seed} | targets: " + ", ".join(
        f"{t} ({i})" for t, i in zip(info["tokens"], info["indices"]))
    ex.compare = side_by_side(images["vanilla"], images["regulated"], caption)
    return ex


def target_shares(plan: _Plan, recorders: dict) -> dict:
    """Per run and target token, at each shown step, its mean share of the whole joint row ("whole") and of
    the prompt's words ("text": per pixel, its map over the sum of every word's map)."""
    out = {}
    for run, recorder in recorders.items():
        out[run] = {}
        for index, token in zip(plan.info["indices"], plan.info["tokens"]):
            whole, text = [], []
            for step in [s for s in plan.steps_shown if s in recorder.maps]:
                whole.append(round(float(recorder.target_map(step, index).mean()), 5))
                text.append(round(float(recorder.target_map(step, index, "text").mean()), 4))
            out[run][f"{index}:{token}"] = {"steps": [s for s in plan.steps_shown if s in recorder.maps], "whole": whole,
                                            "text": text}
    return out


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
def decode_latents(pipe, latents: torch.Tensor, height: int | None = None, width: int | None = None):
    """A PIL image of (1, C, h, w) latents through the pipeline's VAE. FLUX's packed (1, tokens, C * 4)
    latents are unpacked first, with the pipeline's own `_unpack_latents`, for an image of `height` x
    `width` pixels (default: the pipeline's default size)."""
    vae = pipe.vae
    if latents.ndim == 3:
        default = default_image_size(pipe)
        latents = pipe._unpack_latents(latents, height or default, width or default, pipe.vae_scale_factor)
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
