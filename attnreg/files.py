"""Writing files so that an interrupted write leaves the previous file as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def tmp_path(path: Path) -> Path:
    """The temporary name a write of `path` goes through: ".<name>.<pid>.tmp" beside it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: Path, write: Callable) -> None:
    """`write(f)` into a temporary binary file, flush it to disk, then rename it over `path` (atomic on
    POSIX); a failed write removes its temporary file and leaves `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: Path, data, indent: int = 1, sort_keys: bool = True, allow_nan: bool = True) -> None:
    """`data` as JSON; allow_nan=False refuses NaN and infinities (strict JSON, which other readers parse)."""
    atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")


def atomic_save_image(path: Path, image) -> None:
    """A PIL image as PNG."""
    atomic_write(path, lambda f: image.save(f, format="PNG"))
