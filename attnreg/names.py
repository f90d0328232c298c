"""Text the user types, turned into names: comma lists and file-name stems of prompts."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata


def split_list(text: str | None, sep: str = ",") -> list[str] | None:
    """"a, b,,c" -> ["a", "b", "c"]; None stays None (an option that was not given)."""
    if text is None:
        return None
    return [t.strip() for t in text.split(sep) if t.strip()]


def option_value(text: str):
    """The VALUE of a `--set ...=VALUE`: JSON when it parses as JSON (a list becomes a tuple), else the text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text  # e.g. loss=relative
    return tuple(value) if isinstance(value, list) else value


def slug(text: str, limit: int = 60) -> str:
    """The words of `text` (any script, NFKC, lower-cased) joined by "-" and cut at `limit` characters;
    "x" when nothing is left (a prompt of emoji only)."""
    words = re.sub(r"[^\w]+", "-", unicodedata.normalize("NFKC", text).lower()).strip("-_")
    return words[:limit].strip("-_") or "x"


def prompt_stem(text: str, limit: int = 60) -> str:
    """A file-name stem for a prompt: its slug plus a short hash of the whole prompt, so prompts that
    differ only in symbols, in the order of emoji or past the cut never share a name."""
    return f"{slug(text, limit)}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:6]}"
