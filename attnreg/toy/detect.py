"""A classical, exact detector for the coloured-shapes world, and a prompt scorer.

Foreground = pixels whose brightest channel exceeds a threshold; objects = its connected
components (scipy.ndimage), holes filled, tiny specks dropped. Each object's colour is the palette
colour nearest (RGB) to the mean of its brighter pixels; its shape comes from the fill ratio
(area / bounding-box area: square 1.0, circle pi/4, triangle 0.5) with the position of the widest
row as a tie-breaker (an upright triangle is widest at the bottom). Thresholds were set on renders
(clean, blurred and noisy), never on model outputs.
"""

from __future__ import annotations

import re

import numpy as np
from scipy import ndimage

from .world import COLOUR_NAMES, COLOURS, SHAPES

FG_THRESHOLD = 90  # brightest channel, 0..255
MIN_AREA = 30  # pixels at 64 x 64; the smallest rendered object (12 x 12 triangle) has about 70
SQUARE_MIN_FILL = 0.89
TRIANGLE_MAX_FILL = 0.6
TRIANGLE_MIN_ASYM = 0.3  # (mean width of the bottom quarter - top quarter) / box width

_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)


def _as_array(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        a = np.moveaxis(a, 0, -1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.max() <= 1.0 + 1e-6:
            a = a * 255.0
        a = np.clip(a, 0, 255)
    return a.astype(np.float32)


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """(fill ratio, bottom-heaviness) of a binary mask cropped to its bounding box."""
    h, w = mask.shape
    fill = float(mask.sum()) / float(h * w)
    widths = mask.sum(axis=1).astype(np.float32)
    q = max(1, int(round(h / 4)))
    asym = float(widths[-q:].mean() - widths[:q].mean()) / float(w)
    return fill, asym


def _classify_shape(mask: np.ndarray) -> str:
    fill, asym = shape_features(mask)
    if asym > TRIANGLE_MIN_ASYM or fill <= TRIANGLE_MAX_FILL:
        return "triangle"
    return "square" if fill >= SQUARE_MIN_FILL else "circle"


def detect(image, threshold: float = FG_THRESHOLD, min_area: int = MIN_AREA) -> list[tuple[str, str, tuple[int, int, int, int]]]:
    """Objects in `image` (PIL image or H x W x 3 array) as (shape, colour, (x0, y0, x1, y1)) tuples,
    x1/y1 exclusive, sorted by position (top to bottom, then left to right)."""
    a = _as_array(image)
    scale = a.shape[0] / 64.0
    fg = a.max(axis=-1) > threshold
    fg = ndimage.binary_opening(fg, structure=np.ones((2, 2), bool)) if fg.any() else fg
    lab, n = ndimage.label(fg)
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        comp = ndimage.binary_fill_holes(lab[sl] == i)
        if comp.sum() < min_area * scale * scale:
            continue
        px = a[sl][comp]
        bright = px.max(axis=-1)
        core = px[bright >= np.percentile(bright, 50)]
        mean = core.mean(axis=0)
        # the object's own half-maximum contour: where a blurred edge crosses the true edge
        m = ndimage.binary_fill_holes(comp & (a[sl].max(axis=-1) > 0.5 * float(mean.max())))
        m = ndimage.binary_opening(m, structure=np.ones((2, 2), bool))
        if m.sum() < min_area * scale * scale / 2:
            continue
        ys, xs = np.nonzero(m)
        sub = (slice(sl[0].start + ys.min(), sl[0].start + ys.max() + 1), slice(sl[1].start + xs.min(), sl[1].start + xs.max() + 1))
        m = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        sl = sub
        # compare chromaticity-normalised colours so that dim (blurred) pixels still match
        c = mean / max(1.0, mean.max()) * 255.0
        colour = COLOUR_NAMES[int(np.argmin(((_PALETTE - c) ** 2).sum(axis=1)))]
        shape = _classify_shape(m)
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        out.append((shape, colour, (x0, y0, x1, y1)))
    out.sort(key=lambda o: (o[2][1], o[2][0]))
    return out


_PHRASE = re.compile(r"\b(?:a|an|one)\s+(?:(" + "|".join(COLOUR_NAMES) + r")\s+)?(" + "|".join(SHAPES) + r")s?\b")


def parse_prompt(prompt: str) -> list[tuple[str | None, str]]:
    """The (colour or None, shape) pairs a prompt names, in order: 'a red circle and a square' ->
    [('red', 'circle'), (None, 'square')]."""
    return [(m.group(1), m.group(2)) for m in _PHRASE.finditer(prompt.lower())]


def match(named: list[tuple[str | None, str]], detected: list[tuple[str, str]]) -> bool:
    """True if every named object can be assigned its own detected object (right shape, and right
    colour when one is named). Coloured requirements are matched first, so the greedy choice is
    exact."""
    pool = list(detected)
    for colour, shape in sorted(named, key=lambda p: p[0] is None):
        for k, (s, c) in enumerate(pool):
            if s == shape and (colour is None or c == colour):
                del pool[k]
                break
        else:
            return False
    return True


def score(prompt: str, image, detections=None) -> dict:
    """Score an image against a prompt of this world.

    Returns ``success`` (every named object present with the right colour, counting
    multiplicity), ``shapes_present`` (every named shape present, counting multiplicity, colours
    ignored), ``extra_objects`` (detected objects beyond the number named), ``n_named``,
    ``n_detected`` and ``detections``.
    """
    named = parse_prompt(prompt)
    dets = detect(image) if detections is None else detections
    pairs = [(s, c) for s, c, _ in dets]
    return {
        "success": match(named, pairs),
        "shapes_present": match([(None, s) for _, s in named], pairs),
        "extra_objects": max(0, len(dets) - len(named)),
        "n_named": len(named),
        "n_detected": len(dets),
        "detections": dets,
    }
