"""The embedded toy model: a small Stable Diffusion trained here on coloured-shape scenes, with an
exact classical detector, so semantic fidelity can be measured on any machine.

- `world`: shapes (circle, square, triangle), colours (red, green, blue, yellow, purple, white),
  scenes of 1-3 non-overlapping objects on black, captions, a fast PIL renderer.
- `detect(image)` -> [(shape, colour, box)], `score(prompt, image)` -> dict with `success`,
  `shapes_present`, `extra_objects`; `parse_prompt(prompt)` -> [(colour|None, shape)].
- `shapes_prompts(kind, n, seed)` and `prompt_targets(prompt, colours=False)` for benchmarks.
- `model_path()` / `load_pipeline()`: the shipped `StableDiffusionPipeline` (attnreg/toy/model/),
  whose `attnreg.json` names the blocks the paper preset edits.
- `python -m attnreg.toy.train`: the training code that produced it (see README.md here).
"""

from __future__ import annotations

import json
from pathlib import Path

from .detect import detect, parse_prompt, score
from .prompts import prompt_targets, shapes_prompts
from .world import COLOUR_NAMES, COLOURS, SHAPES, caption, random_scene, render, sample

__all__ = [
    "COLOURS", "COLOUR_NAMES", "SHAPES", "caption", "detect", "load_pipeline", "model_info", "model_path",
    "parse_prompt", "prompt_targets", "random_scene", "render", "sample", "score", "shapes_prompts",
]


def model_path() -> Path:
    """The folder of the shipped toy pipeline (``save_pretrained`` layout + ``attnreg.json``)."""
    return Path(__file__).resolve().with_name("model")


def model_info(path: str | Path | None = None) -> dict:
    """The model's ``attnreg.json`` (paper_layers, image_size, ...)."""
    return json.loads((Path(path or model_path()) / "attnreg.json").read_text())


def load_pipeline(device: str = "cpu", dtype="float32", path: str | Path | None = None):
    """The shipped toy ``StableDiffusionPipeline`` (or the one saved at `path`), loaded offline."""
    from ..pipelines import load_pipeline as load

    return load(path or model_path(), device, dtype)
