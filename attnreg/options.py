"""Text the user types, turned into typed values: one parser per declared type, for the command line's
options and every `--set OPTION=VALUE` (a `RegulationConfig` field, parsed by the field's own type)."""

from __future__ import annotations

import json
import math
import types
import typing
from functools import lru_cache


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
MAX_SEEDS = 1_000_000  # a range longer than this is a typo, not a job

BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
BOOLEAN_TYPE = "a boolean (true/false, 1/0, yes/no)"
NOT_OPTIONS = {"preset": "choose the preset with --preset"}  # names a configuration, not a tuning


# Stable Diffusion's own sampler settings: the command line's, the benchmark's and calibration's defaults for a model
# whose attnreg.json does not name its own
DEFAULT_GUIDANCE = 7.5
DEFAULT_STEPS = 50


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


class OptionError(ValueError):
    """A typed value that does not parse as its type."""


def parse_bool(text: str) -> bool:
    """true/false, 1/0, yes/no in any case; anything else (Python's "False" is fine, "maybe" is not) is an error."""
    try:
        return BOOLEANS[text.strip().lower()]
    except KeyError:
        raise OptionError(f"{text!r} is not {BOOLEAN_TYPE}") from None


def parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise OptionError(f"{text!r} is not an integer") from None


def parse_finite(text: str) -> float | int:
    """A float that is a number: "inf" and "nan" parse in Python but make no setting meaningful. An integer
    stays an int, as its JSON did before values were typed, so configurations (and the benchmark's file
    names, which hash them) written with `binding=2` are found again."""
    try:
        return int(text.strip())
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise OptionError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise OptionError(f"{text!r} is not a finite number")
    return value


def parse_names(text: str) -> tuple[str, ...]:
    """Names separated by commas ("down_blocks.2,up_blocks.1"), or a JSON list of them."""
    if text.strip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise OptionError(f"{text!r} is not a JSON list of names") from None
        if not all(isinstance(v, str) for v in value):
            raise OptionError(f"{text!r} is not a list of names")
        return tuple(value)
    return tuple(split_list(text))


def parse_text(text: str) -> str:
    """Text as typed; a JSON string ('"relative"') is unquoted."""
    if text.strip().startswith('"'):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, str):
            return value
    return text


PARSERS = {bool: (parse_bool, BOOLEAN_TYPE), int: (parse_int, "an integer"), float: (parse_finite, "a finite number"),
           str: (parse_text, "text")}


def typed_value(text: str, kind) -> object:
    """`text` parsed as the type annotation `kind`: bool, int, float, str, tuple[str, ...], or any of these
    `| None` (then "null" or "none" is None)."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if type(None) in args and text.strip().lower() in ("null", "none"):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return typed_value(text, inner)
    if typing.get_origin(kind) is tuple:
        return parse_names(text)
    return PARSERS[kind][0](text)


def type_name(kind) -> str:
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (inner,) = [a for a in args if a is not type(None)]
        return f"{type_name(inner)} or null"
    if typing.get_origin(kind) is tuple:
        return "comma-separated names"
    return PARSERS[kind][1]


@lru_cache(maxsize=1)
def config_types() -> dict:
    """Every `RegulationConfig` field's declared type."""
    from .config import RegulationConfig

    return typing.get_type_hints(RegulationConfig)


def config_option(option: str, text: str, method: str = "") -> object:
    """The VALUE of `--set OPTION=VALUE` (`--set METHOD.OPTION=VALUE` with `method`) as the type of the
    `RegulationConfig` field OPTION. An unknown OPTION keeps its text (JSON when it parses), for the config to
    list every unknown one with the valid names."""
    pair = f"--set {method + '.' if method else ''}{option}={text}"
    if option in NOT_OPTIONS:
        raise OptionError(f"{pair}: {option} is not an option; {NOT_OPTIONS[option]}")
    from .config import REMOVED_OPTIONS

    if option in REMOVED_OPTIONS:
        raise OptionError(f"{pair}: option {option} was removed: {REMOVED_OPTIONS[option]}")
    kind = config_types().get(option)
    if kind is None:
        return option_value(text)
    try:
        return typed_value(text, kind)
    except OptionError:
        raise OptionError(f"{pair}: {option} takes {type_name(kind)}, got {text!r}") from None


def config_options(pairs: list[str]) -> dict:
    """["binding=0", "restore_special=false"] -> {"binding": 0.0, "restore_special": False}, each value by its
    field's type."""
    out = {}
    for pair in pairs:
        option, sep, value = pair.partition("=")
        if not sep or not option.strip():
            raise OptionError(f"bad --set {pair!r}: use OPTION=VALUE, e.g. --set binding=0")
        out[option.strip()] = config_option(option.strip(), value)
    return out


def parse_seed(text: str) -> int:
    """One seed of a torch generator: an integer in 0 .. 2**64 - 1."""
    value = parse_int(text)
    if not 0 <= value <= SEED_MAX:
        raise OptionError(f"{text} is not a seed: seeds are integers in 0..{SEED_MAX} (2**64 - 1)")
    return value


def parse_seeds(text: str | int | list, option: str = "--seeds") -> list[int]:
    """"0-63", "0,3,7", "0-3,10" -> list of seeds (in order, without repeats), each in 0 .. 2**64 - 1."""
    if isinstance(text, int):
        text = str(text)
    if isinstance(text, (list, tuple)):
        text = ",".join(str(s) for s in text)
    usage = f"bad {option} {text!r}: use e.g. 0-63, 0,1,2 or 0-3,10"
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            lo, hi = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise OptionError(usage) from None
        if hi < lo:
            raise OptionError(f"bad {option} {text!r}: the range {part} runs backwards (write {hi}-{lo})")
        if hi > SEED_MAX:
            raise OptionError(f"bad {option} {text!r}: seeds are integers in 0..{SEED_MAX} (2**64 - 1)")
        if hi - lo >= MAX_SEEDS:
            raise OptionError(f"bad {option} {text!r}: {part} holds more than {MAX_SEEDS:,} seeds")
        seen = set(seeds)
        seeds += [s for s in range(lo, hi + 1) if s not in seen]
    if not seeds:
        raise OptionError(f"bad {option} {text!r}: no seeds")
    return seeds
