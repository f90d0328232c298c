"""What a model's folder and the user cache say about it: the model's `attnreg.json` (docs/attnreg-json.md) and
the stored calibrations (`attnreg calibrate` writes them; calibrate.py measures them). Plain file reading and
writing: the regulator reads its layers from here."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import files


CALIBRATION_VERSION = 1


class CalibrationError(ValueError):
    """Calibration cannot run on this model or these prompts, or its result cannot be written."""


def denoiser(pipe):
    """The model calibration reads and attnreg.json sits beside: the UNet, or SD3's/FLUX's transformer."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def model_folder(pipe) -> Path | None:
    """The local folder the pipeline was loaded from (its UNet's or transformer's parent), or None."""
    source = getattr(denoiser(pipe).config, "_name_or_path", None)
    if not source:
        return None
    folder = Path(source).parent
    return folder if (folder / "model_index.json").is_file() else None


def folder_spec(folder: Path) -> dict:
    """The `attnreg.json` in a model's folder (docs/attnreg-json.md), or {} when it has none."""
    spec = Path(folder) / "attnreg.json"
    return json.loads(spec.read_text()) if spec.is_file() else {}


def model_spec(unet) -> dict:
    """The model's `attnreg.json` beside the folder its UNet (or transformer, `unet` being the pipeline's
    denoiser) was loaded from, or {}."""
    source = getattr(unet.config, "_name_or_path", None)
    return folder_spec(Path(source).parent) if source else {}


def model_calibration_prompts(pipe) -> list[str]:
    return list(model_spec(denoiser(pipe)).get("calibration_prompts") or [])


def cache_dir() -> Path:
    base = os.environ.get("ATTNREG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "attnreg"
    )
    return Path(base)


def model_key(pipe) -> str:
    """A cache key for a model: where it was loaded from plus its UNet's (or transformer's) configuration."""
    model = denoiser(pipe)
    source = str(getattr(model.config, "_name_or_path", "") or "")
    config = json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")}, sort_keys=True, default=str)
    return hashlib.sha256(f"{Path(source).parent if source else ''}|{config}".encode()).hexdigest()[:16]


def cached_calibration_path(pipe) -> Path:
    return cache_dir() / f"{model_key(pipe)}.json"


def find_calibration(pipe) -> dict | None:
    """The model's calibration: its attnreg.json's "calibration", else the user cache's, else None."""
    found = model_spec(denoiser(pipe)).get("calibration")
    if found and found.get("version") == CALIBRATION_VERSION:
        return found
    path = cached_calibration_path(pipe)
    if path.is_file():
        try:
            found = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # a damaged cache entry is recomputed
        if found.get("version") == CALIBRATION_VERSION:
            return found
    return None


def _write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` so that an interrupted write leaves the previous file intact."""
    try:
        files.atomic_write_json(path, data, indent=2, sort_keys=False)
    except OSError as err:
        raise CalibrationError(f"cannot write {path}: {err.strerror or err}") from err


def write_calibration(folder: Path, result: dict) -> Path:
    """Store `result` under "calibration" in folder/attnreg.json, keeping the file's other keys."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"{folder} is not a folder")
    spec_path = folder / "attnreg.json"
    spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
    spec["calibration"] = result
    _write_json(spec_path, spec)
    return spec_path
