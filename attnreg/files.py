"""Files: written so that an interrupted write leaves the previous file as it was, and named after prompts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Callable


def tmp_path(path: Path) -> Path:
    """The temporary name a write of `path` goes through: ".<name>.<pid>.tmp" beside it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


class WriteError(OSError):
    """A file that could not be written (a full disk, no permission): the message names its path."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message, without "[Errno 28]"


def atomic_write(path: Path, write: Callable) -> None:
    """`write(f)` into a temporary binary file, flush it to disk, then rename it over `path` (atomic on
    POSIX); a failed write removes its temporary file and leaves `path` untouched. An OSError of the disk
    comes out as a `WriteError` naming `path` (the errno alone does not say which file)."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: Path, data, indent: int = 1, sort_keys: bool = True, allow_nan: bool = True) -> None:
    """`data` as JSON; allow_nan=False refuses NaN and infinities (strict JSON, which other readers parse)."""
    atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")


def atomic_save_image(path: Path, image) -> None:
    """A PIL image as PNG."""
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def slug(text: str, limit: int = 60) -> str:
    """The words of `text` (any script, NFKC, lower-cased) joined by "-" and cut at `limit` characters;
    "x" when nothing is left (a prompt of emoji only)."""
    words = re.sub(r"[^\w]+", "-", unicodedata.normalize("NFKC", text).lower()).strip("-_")
    return words[:limit].strip("-_") or "x"


def prompt_stem(text: str, limit: int = 60) -> str:
    """A file-name stem for a prompt: its slug plus a short hash of the whole prompt, so prompts that
    differ only in symbols, in the order of emoji or past the cut never share a name."""
    return f"{slug(text, limit)}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:6]}"
