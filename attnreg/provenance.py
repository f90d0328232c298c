"""What a record of a run needs for the run to be made again: the software's versions, the numerics that
change an image's last bits (device, dtype, CPU threads) and the model it was made with."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

PACKAGES = ("attnreg", "diffusers", "transformers", "torch")


def versions() -> dict[str, str | None]:
    """The installed version of attnreg and of the libraries its images depend on (None: not installed)."""
    from .version import __version__

    found = {"attnreg": __version__}
    for name in PACKAGES[1:]:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def numerics(pipe) -> dict:
    """The pipeline's device and dtype, and torch's CPU thread count (images move between thread counts)."""
    import torch

    return {"device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads()}


def model_source(pipe) -> str | None:
    """Where the pipeline was loaded from: a local folder as its absolute path, a hub id as given."""
    name = getattr(pipe, "name_or_path", None)
    if not name:
        return None
    path = Path(str(name)).expanduser()
    return str(path.resolve()) if path.exists() else str(name)
