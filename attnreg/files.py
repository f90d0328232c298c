"""Writing files so that an interrupted write leaves the previous file as it was."""

from __future__ import annotations

import os
from pathlib import Path


def tmp_path(path: Path) -> Path:
    """The temporary name a write of `path` goes through: ".<name>.<pid>.tmp" beside it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file, flush it to disk, then rename it over `path` (atomic on POSIX); a failed
    write removes its temporary file and leaves `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
