"""Calibration: which cross-attention layers of a model read the prompt's objects, measured on the model.

The paper's layer choice (SD's 16 x 16 layers) was tuned on SD 1.4 and need not carry over to another
model (docs/decisions.md: on the embedded model it does not). So the `auto` preset edits the layers that a
few vanilla generations show to localise the target tokens, and this module finds them:

    result = calibrate(pipe)                 # a few vanilla runs, every cross-attention layer observed
    result["layers"]                         # the chosen attn2 modules
    write_calibration(folder, result)        # into attnreg.json beside the weights (atomic)

Per layer, on the conditional half, the head-averaged map of each target token is reduced to
  mass     = its mean attention over pixels, in units of a uniform 1/J (1 = what a flat row gives),
  contrast = (its 90th percentile - its mean) over pixels, in the same units: how much more the
             target's best tenth of the map gets than its average, i.e. a peak against a uniform map.
A layer's score is its mean contrast; a layer whose target maps are flat (however much mass) or
empty scores 0. The chosen layers are those within `keep` of the best score.

SD3 and FLUX (attnreg.joint) are calibrated the same way over their joint blocks (FLUX: the single-stream
ones too), on what their processor hands observers: the image-query rows at the target text columns,
the softmax over text + image keys, so J (the uniform row's width) is the text columns plus the image
tokens. Their regulator reads a calibration the model has but never runs one itself (`calibrates_on_first_use`).
"""

from __future__ import annotations

import logging

import torch

from . import files
from .config import RegulationConfig
from .families import joint_family
from .geometry import cross_attention_layers
from .joint.attention import editable_layers
from .modelspec import (CALIBRATION_VERSION, CalibrationError, cached_calibration_path, model_calibration_prompts)
from .options import DEFAULT_GUIDANCE
from .regulator import AttentionRegulator
from .tokens import auto_targets

log = logging.getLogger(__name__)


# Generic two- and three-object prompts, for a model that declares none (COCO-like objects, the nouns
# are the targets). A model trained on another world lists its own in attnreg.json ("calibration_prompts").
DEFAULT_PROMPTS = (
    "a cat and a dog",
    "a red apple and a green bowl",
    "a horse next to a car",
    "a bird on a bench",
    "a teddy bear and a clock",
    "a blue bicycle and a yellow umbrella",
    "an elephant with a hat and a book",
    "a cup and a banana on a table",
)




class LayerStats:
    """An observer (see recording.py's protocol) that accumulates per-layer target statistics."""

    def __init__(self, image_targets: list[list[int]], steps: int):
        self.image_targets = image_targets
        self.steps = steps
        self.sums: dict[str, dict[str, float]] = {}

    def wants(self, layer: str, step: int) -> bool:
        return step < self.steps

    @torch.no_grad()
    def record(self, layer: str, step: int, probs: torch.Tensor, state) -> None:
        batch, _heads, _pixels, n_text = probs.shape
        n = len(self.image_targets)
        rows = state.conditional(batch)
        if len(range(batch)[rows]) != n:
            raise CalibrationError(f"expected {n} images in the batch of {batch} during calibration")
        cond = probs[rows].float().mean(dim=1)  # (images, P, text columns), heads averaged
        n_tokens = state.row_width(_pixels, n_text)  # J: every key column of the row's softmax
        acc = self.sums.setdefault(layer, {"mass": 0.0, "contrast": 0.0, "count": 0, "pixels": _pixels})
        for image, targets in enumerate(self.image_targets):
            maps = cond[image][:, targets]  # (P, n)
            mean = maps.mean(dim=0)
            q90 = torch.quantile(maps, 0.9, dim=0)
            acc["mass"] += float((mean * n_tokens).sum())
            acc["contrast"] += float(((q90 - mean) * n_tokens).sum())
            acc["count"] += len(targets)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for layer, acc in self.sums.items():
            count = max(acc["count"], 1)
            side = int(round(acc["pixels"] ** 0.5))
            out[layer] = {"mass": acc["mass"] / count, "contrast": acc["contrast"] / count, "pixels": acc["pixels"],
                          "map": f"{side}x{side}" if side * side == acc["pixels"] else str(acc["pixels"])}
        return out


def choose_layers(stats: dict[str, dict[str, float]], keep: float = 0.5) -> list[str]:
    """The layers whose contrast is at least `keep` times the best one's (in forward order)."""
    best = max((s["contrast"] for s in stats.values()), default=0.0)
    if not best > 0:
        raise CalibrationError("no cross-attention layer localises the target tokens (every contrast is 0)")
    return [layer for layer, s in stats.items() if s["contrast"] >= keep * best]


def _calibration_targets(reg, prompts, targets) -> tuple[list[str], list[list[int]]]:
    """The prompts (given, the model's, or the generic ones) and their target token indices (the columns
    the regulator `reg` edits)."""

    prompts = list(prompts or model_calibration_prompts(reg.pipe) or DEFAULT_PROMPTS)
    if not prompts:
        raise CalibrationError("calibration needs at least one prompt")
    if targets is None:
        targets = [auto_targets(p)[0] for p in prompts]
    if len(targets) != len(prompts):
        raise CalibrationError(f"got {len(targets)} target lists for {len(prompts)} prompts")
    indices = [reg.resolve(p, list(t))["indices"] for p, t in zip(prompts, targets)]
    if not any(indices):
        raise CalibrationError("no target tokens found in the calibration prompts")
    return prompts, indices


def calibrate(
    pipe,
    prompts: list[str] | None = None,
    targets: list[list[str]] | None = None,
    seeds: list[int] = (0, 1),
    steps: int = 50,
    guidance_scale: float = DEFAULT_GUIDANCE,
    keep: float = 0.5,
    edit_fraction: float = 0.5,
    **call,
) -> dict:
    """Vanilla runs of `prompts` x `seeds`, every cross-attention layer (SD3/FLUX: every joint block)
    observed over the first `edit_fraction` of the steps (the ones regulation edits); returns the
    statistics and the choice. `call`: more keywords for the pipeline (height, max_sequence_length, ...)."""
    if getattr(pipe, "unet", None) is not None:
        layers = cross_attention_layers(pipe.unet)
        what = f"{type(pipe.unet).__name__} has no cross-attention layer (attn2)"
    elif joint_family(pipe) is not None:
        layers = editable_layers(pipe.transformer)
        what = f"{type(pipe.transformer).__name__} has no joint-attention block"
    else:
        raise CalibrationError(f"calibration reads a UNet's cross-attention or an SD3/FLUX transformer's joint "
                               f"attention; {type(pipe).__name__} has neither")
    if not layers:
        raise CalibrationError(f"{what} to calibrate")
    # A regulator that edits nothing (no plan) and lets the observer see every layer.
    reg = AttentionRegulator(pipe, RegulationConfig(layers=tuple(layers)))
    prompts, indices = _calibration_targets(reg, prompts, targets)
    observer = LayerStats([], max(1, int(steps * edit_fraction)))

    def stop_after_observed(pipe, step, timestep, callback_kwargs):
        if step + 1 >= observer.steps:
            pipe._interrupt = True  # diffusers skips the remaining steps; nothing after them is observed
        return {}

    with reg.observing(observer):
        for prompt, idx in zip(prompts, indices):
            if not idx:
                continue
            observer.image_targets = [idx] * len(seeds)
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            reg.run(prompt, None, generator=generators, num_images_per_prompt=len(seeds),
                    num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
                    callback_on_step_end=stop_after_observed, **call)
    stats = observer.summary()
    stats = {name: stats[name] for name in layers if name in stats}
    return {
        "version": CALIBRATION_VERSION,
        "layers": choose_layers(stats, keep),
        "keep": keep,
        "layer_stats": stats,
        "prompts": prompts,
        "seeds": list(seeds),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "observed_steps": observer.steps,
    }
























def calibrated_layers(pipe) -> tuple[str, ...] | None:
    """The layers of a model that has no stored calibration: calibrated now and cached in the user cache
    folder (one line says so), or None when that is not possible (the caller falls back to the structural
    rule). The regulator's first-use calibration (`AttentionRegulator.first_use_calibration`)."""
    path = cached_calibration_path(pipe)
    # a warning, so that Python users without a logging set-up see it too: it takes a while
    log.warning("calibrating this model's layers (first use; cached in %s)", path)
    try:
        result = calibrate(pipe)
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_json(path, result, indent=2, sort_keys=False)
    except (CalibrationError, OSError) as err:
        log.warning("calibration not possible (%s); using the structural layer rule", err)
        return None
    return tuple(result["layers"])
