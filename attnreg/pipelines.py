"""Loading a text-to-image pipeline from a hub id or a local folder, on a device and dtype."""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}") from None


def default_model() -> Path:
    """The embedded shapes model shipped inside the package."""
    from .toy import model_path

    path = model_path()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded model is missing at {path}; pass --model PATH_OR_ID")
    return path


def load_pipeline(model: str | Path | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """A diffusers pipeline from `model` (local folder or hub id; None: the embedded model)."""
    from diffusers import DiffusionPipeline

    model = default_model() if model is None else model
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    extra = {}
    index = Path(model) / "model_index.json"
    if index.is_file() and "safety_checker" in json.loads(index.read_text()):
        extra = {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype, **extra)
    except OSError as err:
        raise OSError(
            f"could not load the pipeline {str(model)!r}: {err}. Without access to the model hub, pass a local "
            "folder saved with save_pretrained."
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
