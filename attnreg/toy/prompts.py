"""Deterministic prompt lists of the coloured-shapes world, for the benchmark's `shapes` dataset."""

from __future__ import annotations

import random

from .detect import parse_prompt
from .world import COLOUR_NAMES, SHAPES, caption


def shapes_prompts(kind: int, n: int, seed: int = 0, distinct: bool = True) -> list[str]:
    """`n` prompts naming `kind` (1, 2 or 3) coloured objects, e.g. kind=2:
    'a red circle and a blue square'. Deterministic in (kind, n, seed).

    With ``distinct`` (default) the objects of one prompt have different shapes where possible
    (kind <= 3 always allows it) and different colours, so every target word occurs once, and no
    prompt repeats until all combinations are used.
    """
    if kind not in (1, 2, 3):
        raise ValueError("kind must be 1, 2 or 3")
    rng = random.Random(f"shapes-{kind}-{seed}")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        shapes = rng.sample(SHAPES, kind) if distinct else [rng.choice(SHAPES) for _ in range(kind)]
        colours = rng.sample(COLOUR_NAMES, kind) if distinct else [rng.choice(COLOUR_NAMES) for _ in range(kind)]
        p = caption(list(zip(colours, shapes)), shuffle=False)
        if p in seen and len(seen) < _n_combinations(kind, distinct):
            continue
        seen.add(p)
        out.append(p)
    return out


def _n_combinations(kind: int, distinct: bool) -> int:
    s, c = len(SHAPES), len(COLOUR_NAMES)
    if not distinct:
        return (s * c) ** kind
    n = 1
    for i in range(kind):
        n *= (s - i) * (c - i)
    return n


def prompt_targets(prompt: str, colours: bool = False) -> list[str]:
    """The target words of a prompt: its shape nouns ('a red circle and a blue square' ->
    ['circle', 'square']). With ``colours=True`` each colour word comes before its noun:
    ['red', 'circle', 'blue', 'square']."""
    out: list[str] = []
    for colour, shape in parse_prompt(prompt):
        if colours and colour:
            out.append(colour)
        out.append(shape)
    return out
