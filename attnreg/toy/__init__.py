"""The embedded toy model: a small Stable Diffusion trained here on coloured-shape scenes, with an
exact classical detector, so semantic fidelity can be measured on any machine.

- `world`: shapes (circle, square, triangle), colours (red, green, blue, yellow, purple, white),
  scenes of 1-3 non-overlapping objects on black, captions, a fast PIL renderer.
- `detect(image)` -> [(shape, colour, box)], `score(prompt, image)` -> dict with `success`,
  `shapes_present`, `extra_objects`; `parse_prompt(prompt)` -> [(colour|None, shape)].
- `shapes_prompts(kind, n, seed)` and `prompt_targets(prompt, colours=False)` for benchmarks.
- `model_path()` / `load_pipeline()`: the shipped `StableDiffusionPipeline` (attnreg/toy/model/),
  whose `attnreg.json` names the blocks the paper preset edits; `model_path("toy-mmdit")` /
  `load_pipeline(name="toy-mmdit")`: the MMDiT (SD3) model once trained and exported (attnreg/toy/model-mmdit/).
- `python -m attnreg.toy.train [--arch mmdit]`: the training code (see README.md here).
"""

from __future__ import annotations

import json
from pathlib import Path

from .detect import detect, parse_prompt, score
from .prompts import prompt_targets, shapes_prompts
from .world import COLOUR_NAMES, COLOURS, SHAPES, caption, random_scene, render, sample

__all__ = [
    "COLOURS", "COLOUR_NAMES", "MODELS", "ModelNotTrainedError", "SHAPES", "caption", "detect", "load_pipeline", "model_info", "model_path",
    "parse_prompt", "prompt_targets", "random_scene", "render", "sample", "score", "shapes_prompts",
]


# The embedded models by short name (`--model toy-unet`): their folders beside this file.
MODELS = {"toy-unet": "model", "toy-mmdit": "model-mmdit"}
DEFAULT_MODEL = "toy-unet"
TRAIN_COMMANDS = {"toy-mmdit": "attnreg toy train --arch mmdit --export attnreg/toy/model-mmdit --threads 1"}
HOW_TO_TRAIN = {
    "toy-mmdit": f"{TRAIN_COMMANDS['toy-mmdit']} (about 2 hours on 2 CPU cores; the same command resumes; see "
                 "attnreg/toy/README.md), or export an existing run with "
                 "attnreg toy train --arch mmdit --export-only --export attnreg/toy/model-mmdit",
}


class ModelNotTrainedError(ValueError):
    """An embedded model whose weights have not been exported yet."""


def model_path(name: str = DEFAULT_MODEL, check: bool = True) -> Path:
    """The folder of an embedded toy pipeline (``save_pretrained`` layout + ``attnreg.json``): "toy-unet" (the
    shipped StableDiffusionPipeline, the default) or "toy-mmdit" (a StableDiffusion3Pipeline). `check`: a
    ModelNotTrainedError saying how to train it when its weights are not exported there yet."""
    if name not in MODELS:
        raise ValueError(f"unknown embedded model {name!r}; valid: {', '.join(MODELS)}")
    folder = Path(__file__).resolve().with_name(MODELS[name])
    if check and not (folder / "model_index.json").is_file():
        raise ModelNotTrainedError(f"the embedded model {name!r} is not trained yet (no {folder}/model_index.json); "
                                   f"train and export it with: {HOW_TO_TRAIN.get(name, 'attnreg toy train')}")
    return folder


def model_info(path: str | Path | None = None) -> dict:
    """The model's ``attnreg.json`` (paper_layers, image_size, ...)."""
    return json.loads((Path(path or model_path()) / "attnreg.json").read_text())


def load_pipeline(device: str = "cpu", dtype="float32", path: str | Path | None = None, name: str = DEFAULT_MODEL):
    """The embedded toy pipeline `name` ("toy-unet": the shipped ``StableDiffusionPipeline``; "toy-mmdit": the
    ``StableDiffusion3Pipeline``), or the one saved at `path`, loaded offline."""
    from ..pipelines import load_pipeline as load

    return load(path or model_path(name), device, dtype)
