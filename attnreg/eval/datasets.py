"""Prompt sets for `attnreg bench`: each a list of items (prompt, targets, subset).

    shapes        the embedded coloured-shapes world (attnreg.toy): subsets 1obj, 2obj, 3obj
    ae            the 276 Attend-and-Excite prompts: animal-animal 66, animal-object 144, object-object 66
    geneval       GenEval's 553 prompts (subsets: its six tags), each with its metadata for the GenEval scorer
    geneval:PATH  a metadata file in GenEval's format (one {"tag", "prompt", "include", "exclude"} per line)
    t2i-compbench T2I-CompBench's validation prompts (subsets: its eight categories)
    file:PATH     a .txt file (one prompt per line) or .jsonl ({"prompt": ..., "targets": [...], "subset": ...})

GenEval's and T2I-CompBench's files ship in data/ with their MIT licences (data/NOTICE).

The word lists of the A&E set live here and only here (ANIMALS, OBJECTS, COLOURS).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .geneval import TAGS


class DatasetError(ValueError):
    """An unknown data set or subset, or a malformed prompt file."""


@dataclass(frozen=True)
class Prompt:
    prompt: str
    targets: tuple[str, ...]
    subset: str
    dataset: str
    targets_source: str = field(default="given", compare=False)
    metadata: dict | None = field(default=None, compare=False, hash=False)  # GenEval's line, for its scorer


# -- the Attend-and-Excite prompt set (Chefer et al., SIGGRAPH 2023) -------------------------------
ANIMALS = ("cat", "dog", "bird", "bear", "lion", "horse", "elephant", "monkey", "frog", "turtle", "rabbit", "mouse")
OBJECTS = ("backpack", "glasses", "crown", "suitcase", "chair", "balloon", "bow", "car", "bowl", "bench", "clock", "apple")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray", "black", "white")
WORN_OBJECTS = ("glasses", "crown", "bow")  # "a {animal} with a {object}", no colour
AE_SUBSETS = ("animal-animal", "animal-object", "object-object")


def colour_for(i: int, j: int, second: bool = False) -> str:
    """The deterministic colour rule of the A&E set (the paper drew colours at random; its list was not
    published with a seed). For the pair of word-list positions (i, j):
    first colour  = COLOURS[(12 * i + j) % 11],
    second colour = COLOURS[(12 * i + j + 5) % 11] (always different from the first one)."""
    return COLOURS[(12 * i + j + (5 if second else 0)) % len(COLOURS)]


def ae_prompts() -> list[Prompt]:
    """The 276 prompts, in word-list order: 66 animal-animal, 144 animal-object, 66 object-object."""
    items = []
    for a, b in itertools.combinations(ANIMALS, 2):
        items.append(Prompt(f"a {a} and a {b}", (a, b), "animal-animal", "ae"))
    for i, a in enumerate(ANIMALS):
        for j, o in enumerate(OBJECTS):
            if o in WORN_OBJECTS:
                text = f"a {a} with a {o}"
            else:
                text = f"a {a} and a {colour_for(i, j)} {o}"
            items.append(Prompt(text, (a, o), "animal-object", "ae"))
    for (i, a), (j, b) in itertools.combinations(enumerate(OBJECTS), 2):
        text = f"a {colour_for(i, j)} {a} and a {colour_for(i, j, second=True)} {b}"
        items.append(Prompt(text, (a, b), "object-object", "ae"))
    return items


# -- the shapes world --------------------------------------------------------------------------------
SHAPES_SUBSETS = {"1obj": 1, "2obj": 2, "3obj": 3}
SHAPES_DEFAULT_N = 100  # prompts per subset when no --limit is given (1obj has only 18 distinct ones)


def shapes_prompts(subsets=None, limit: int | None = None) -> list[Prompt]:
    try:
        from attnreg import toy
        make, targets_of = toy.shapes_prompts, toy.prompt_targets
    except (ImportError, AttributeError) as err:
        raise DatasetError(
            f"the shapes data set needs attnreg.toy.shapes_prompts and attnreg.toy.prompt_targets, which are not "
            f"available in this installation ({err})"
        ) from None
    n = SHAPES_DEFAULT_N if limit is None else limit
    items = []
    for name in subsets or SHAPES_SUBSETS:
        # dict.fromkeys: past the world's distinct prompts (18 for 1obj) the generator repeats itself, and a
        # repeated prompt would be the same items again
        for prompt in dict.fromkeys(make(SHAPES_SUBSETS[name], n, seed=0)):
            items.append(Prompt(prompt, tuple(targets_of(prompt)), name, "shapes"))
    return items


# -- GenEval and T2I-CompBench (their files ship in data/, MIT, see data/NOTICE) ----------------------------
DATA = Path(__file__).parent / "data"
GENEVAL_FILE = DATA / "geneval" / "evaluation_metadata.jsonl"
T2I_COMPBENCH_SUBSETS = ("color", "shape", "texture", "spatial", "non_spatial", "complex", "numeracy", "3d_spatial")


def geneval_targets(metadata: dict) -> tuple[list[str], str]:
    """The include clauses' classes as the prompt writes them (GenEval's plurals add "s" or "es": "two
    clocks" -> "clocks"), each at its last mention ("an orange orange" -> "orange#2"). When a class is not
    in the prompt: the prompt's automatic targets."""
    from attnreg.tokens import auto_targets

    text = metadata["prompt"].lower()
    targets = []
    for clause in metadata["include"]:
        found = list(re.finditer(rf"\b{re.escape(clause['class'].lower())}(?:s|es)?\b", text))
        if not found:
            return auto_targets(metadata["prompt"])
        last = found[-1]
        nth = len(re.findall(rf"\b{re.escape(last.group(0))}\b", text[: last.end()]))
        target = last.group(0) if nth == 1 else f"{last.group(0)}#{nth}"
        if target not in targets:
            targets.append(target)
    return targets, "metadata"


def geneval_prompts(path: str | Path = GENEVAL_FILE, name: str = "geneval") -> list[Prompt]:
    """One item per metadata line, its subset the line's tag; the line is checked here, before anything runs."""
    from .geneval import GenEvalError, check_metadata

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"GenEval metadata file {str(path)!r} does not exist")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            metadata = check_metadata(json.loads(line), where)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where}: not valid JSON ({err.msg}): {line.strip()[:80]!r}") from None
        except GenEvalError as err:
            raise DatasetError(str(err)) from None
        targets, source = geneval_targets(metadata)
        items.append(Prompt(metadata["prompt"], tuple(targets), metadata["tag"], name, source, metadata))
    if not items:
        raise DatasetError(f"GenEval metadata file {str(path)!r} holds no prompts")
    return items


def t2i_compbench_prompts(subsets=None) -> list[Prompt]:
    """The validation prompts of each category (file <category>_val.txt); targets: the automatic ones."""
    from attnreg.tokens import auto_targets

    items = []
    for subset in subsets or T2I_COMPBENCH_SUBSETS:
        for line in (DATA / "t2i-compbench" / f"{subset}_val.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                targets, source = auto_targets(line.strip())
                items.append(Prompt(line.strip(), tuple(targets), subset, "t2i-compbench", source))
    return items


# -- prompt files -------------------------------------------------------------------------------------
def file_prompts(path: str | Path, name: str) -> list[Prompt]:
    """.txt: one prompt per line (blank lines and lines starting with # are skipped), targets found by
    attnreg's noun rule; .jsonl: one object per line with "prompt" and optional "targets" (list of words
    or a comma-separated string) and "subset" (default "all")."""
    from attnreg.tokens import auto_targets

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"prompt file {str(path)!r} does not exist")
    if path.suffix.lower() not in (".txt", ".jsonl", ".json"):
        raise DatasetError(f"prompt file {str(path)!r}: use .txt (one prompt per line) or .jsonl (one "
                           "{\"prompt\": ..., \"targets\": [...]} per line), not {path.suffix or 'no suffix'}")
    items = []
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or (not jsonl and text.startswith("#")):
            continue
        where = f"{path}, line {lineno}"
        if not jsonl:
            targets, source = auto_targets(text)
            items.append(Prompt(text, tuple(targets), "all", name, source))
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where}: not valid JSON ({err.msg}): {text[:80]!r}") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object with a \"prompt\" key, got {type(row).__name__}")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{where}: \"prompt\" is missing or not a non-empty string")
        targets = row.get("targets")
        source = "given"
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        if targets is None:
            targets, source = auto_targets(prompt)
        elif not isinstance(targets, list) or not all(isinstance(t, (str, int)) for t in targets):
            raise DatasetError(f"{where}: \"targets\" must be a list of words (or token indices)")
        subset = row.get("subset", "all")
        if not isinstance(subset, str) or not subset:
            raise DatasetError(f"{where}: \"subset\" must be a non-empty string")
        items.append(Prompt(prompt.strip(), tuple(targets), subset, name, source))
    if not items:
        raise DatasetError(f"prompt file {str(path)!r} holds no prompts")
    return items


DATASETS = {"shapes": tuple(SHAPES_SUBSETS), "ae": AE_SUBSETS, "geneval": TAGS, "t2i-compbench": T2I_COMPBENCH_SUBSETS,
            "geneval:PATH": ("its tags",), "file:PATH": ("all", "or the subsets named in the file")}


def load_dataset(spec: str, subsets: list[str] | None = None, limit: int | None = None) -> list[Prompt]:
    """The prompts of data set `spec`, optionally only some subsets and the first `limit` of each subset."""
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be >= 1, got {limit}")
    if spec == "ae":
        items = ae_prompts()
    elif spec == "shapes":
        if subsets:
            _check_subsets(spec, subsets, SHAPES_SUBSETS)
        items = shapes_prompts(subsets, limit)
    elif spec == "geneval":
        if subsets:
            _check_subsets(spec, subsets, TAGS)
        items = geneval_prompts()
    elif spec.startswith("geneval:"):
        items = geneval_prompts(spec[len("geneval:"):], spec)
    elif spec == "t2i-compbench":
        if subsets:
            _check_subsets(spec, subsets, T2I_COMPBENCH_SUBSETS)
        items = t2i_compbench_prompts(subsets)
    elif spec.startswith("file:"):
        items = file_prompts(spec[len("file:"):], spec)
    else:
        raise DatasetError(f"unknown data set {spec!r}; valid: shapes, ae, geneval, t2i-compbench, "
                           "geneval:PATH (GenEval's metadata format), file:PATH (.txt or .jsonl)")
    if subsets:
        _check_subsets(spec, subsets, {p.subset for p in items})
        items = [p for p in items if p.subset in subsets]
    # a repeated (prompt, targets, subset) would only repeat the same images: keep the first
    items = list({(p.prompt, p.targets, p.subset): p for p in reversed(items)}.values())[::-1]
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for p in items:
            seen[p.subset] = seen.get(p.subset, 0) + 1
            if seen[p.subset] <= limit:
                kept.append(p)
        items = kept
    return items


def _check_subsets(spec, subsets, valid) -> None:
    bad = [s for s in subsets if s not in valid]
    if bad:
        raise DatasetError(f"unknown subset(s) {', '.join(bad)} of data set {spec!r}; valid: {', '.join(sorted(valid))}")
