"""Files of a benchmark folder: atomic writes, deterministic names, reading records back.

    DIR/images/<key>.png      the image of one (prompt, seed, method)
    DIR/records/<key>.json    its record, written after the image: a record without its image, or an
                              image without its record, never counts as done
    DIR/scores/<metric>-<h>.json  per-item metric values (h: hash of the metric's settings)
    DIR/report.md, DIR/report_*.png
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..files import atomic_save_image, atomic_write_json  # noqa: F401 - the benchmark folder's writers
from ..files import slug


def stable_hash(*parts) -> str:
    """sha256 hex of the parts (json-encoded): the same on every machine and Python run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def noise_seed(prompt: str, seed: int) -> int:
    """The torch.Generator seed of image (prompt, seed): the same for every method and every sharding."""
    return int(stable_hash("noise", prompt, int(seed))[:15], 16)


def item_key(subset: str, method: str, prompt: str, seed: int, config_hash: str, targets=()) -> str:
    """<subset>/<method>/<prompt slug>-<hash of subset, prompt, targets>_s<seed>_<config hash>."""
    h = stable_hash("item", subset, prompt, [str(t) for t in targets])[:8]
    return f"{slug(subset, 40)}/{method}/{slug(prompt, 40)}-{h}_s{seed}_{config_hash[:6]}"


def image_path(out: Path, key: str) -> Path:
    return Path(out) / "images" / f"{key}.png"


def record_path(out: Path, key: str) -> Path:
    return Path(out) / "records" / f"{key}.json"


def is_done(out: Path, key: str) -> bool:
    """The item's record parses and its image opens: anything less (a truncated record, a 0-byte or cut
    PNG) is not done, and a rerun makes it again."""
    record, image = record_path(out, key), image_path(out, key)
    if not (record.is_file() and image.is_file()):
        return False
    try:
        json.loads(record.read_text(encoding="utf-8"))
        from PIL import Image

        with Image.open(image) as im:
            im.verify()
    except (OSError, ValueError, SyntaxError):
        return False
    return True


def damaged(out: Path, key: str) -> bool:
    """Some file of the item exists, but the item is not done."""
    return (record_path(out, key).exists() or image_path(out, key).exists()) and not is_done(out, key)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(out: Path) -> int:
    """Delete the temporary files of writes whose process is gone (".<name>.<pid>.tmp"); returns how many."""
    removed = 0
    for path in Path(out).rglob(".*.tmp"):
        try:
            pid = int(path.name.rsplit(".", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not pid_alive(pid):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def claim(out: Path, key: str) -> bool:
    """Take the item for this process: a claim file holding our pid, made atomically. False when a live
    process holds it; a claim whose process is gone is taken over. Two plain processes on one folder thus
    share the work instead of repeating it."""
    path = Path(out) / "claims" / f"{key}.claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(path.read_text() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and pid_alive(owner):
                return False
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(out: Path, key: str) -> None:
    (Path(out) / "claims" / f"{key}.claim").unlink(missing_ok=True)


def _read_records(out: Path):
    """(record, done) for every record of the folder that parses, sorted by file name."""
    root = Path(out) / "records"
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # never produced by our atomic writes; ignore rather than fail
        yield record, is_done(out, record.get("key", ""))


def iter_records(out: Path):
    """Every complete record of the folder (record and image present), sorted by key."""
    for record, done in _read_records(out):
        if done:  # a damaged image is left out, as a missing one is
            yield record


def records_without_image(out: Path) -> list[str]:
    """The keys of the records whose image is missing or does not open: `iter_records` leaves them out."""
    return [record.get("key", "?") for record, done in _read_records(out) if not done]


def check_folder(out: Path) -> Path:
    """`out` as a benchmark folder that exists, or a ValueError saying it does not."""
    out = Path(out)
    if not out.exists():
        raise ValueError(f"no such folder: {out}")
    if not out.is_dir():
        raise ValueError(f"{out} is a file, not a benchmark folder")
    return out


def missing_images_note(out: Path, keys: list[str], shown: int = 5) -> str:
    """One line naming the records left out for want of an image (the first `shown` of them)."""
    names = ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")
    return (f"{len(keys)} record(s) of {out} have no image (or one that does not open) and are left out: {names}; "
            "the same `attnreg bench` command makes them again")
