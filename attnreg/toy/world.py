"""The coloured-shapes world: scenes, captions and a fast PIL renderer.

A scene is 1 to 3 non-overlapping shapes (circle, square, upright triangle) in one of six colours
on a black background. Everything is a pure function of a seed, so any (scene, caption) pair can be
rebuilt exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 240),
    "yellow": (240, 225, 30),
    "purple": (160, 40, 220),
    "white": (245, 245, 245),
}
COLOUR_NAMES = tuple(COLOURS)

IMAGE_SIZE = 64
MIN_SIZE = 12  # side of the bounding box, pixels at 64 x 64
MAX_SIZE = 26
GAP = 4  # minimum empty pixels between two objects' boxes
MARGIN = 2  # minimum distance to the image border
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    x: int  # left
    y: int  # top
    size: int  # side of the (square) bounding box

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.x + self.size, self.y + self.size)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def place(rng: random.Random, shapes_colours: list[tuple[str, str]], image_size: int = IMAGE_SIZE) -> list[Obj]:
    """Random sizes and positions for the given (shape, colour) list, no two boxes closer than GAP."""
    max_size = MAX_SIZE
    for attempt in range(200):
        if attempt and attempt % 40 == 0:
            max_size = max(MIN_SIZE, max_size - 3)
        objs: list[Obj] = []
        ok = True
        for shape, colour in shapes_colours:
            for _ in range(30):
                s = rng.randint(MIN_SIZE, max_size)
                x = rng.randint(MARGIN, image_size - MARGIN - s)
                y = rng.randint(MARGIN, image_size - MARGIN - s)
                o = Obj(shape, colour, x, y, s)
                if all(not _overlaps(o.box, p.box, GAP) for p in objs):
                    objs.append(o)
                    break
            else:
                ok = False
                break
        if ok:
            return objs
    raise RuntimeError("could not place objects")


def random_scene(seed: int | random.Random, n_objects: int | None = None, image_size: int = IMAGE_SIZE) -> list[Obj]:
    """A scene of `n_objects` (default: uniform over 1..3) random shapes in random colours."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    n = n_objects if n_objects is not None else rng.randint(1, 3)
    sc = [(rng.choice(SHAPES), rng.choice(COLOUR_NAMES)) for _ in range(n)]
    return place(rng, sc, image_size)


def caption(objs: list[tuple[str | None, str]] | list[Obj], rng: random.Random | None = None, shuffle: bool = True) -> str:
    """`a red circle`, `a red circle and a blue square`, `a red circle, a blue square and a ...`.

    Objects are (colour, shape) pairs or `Obj`; colour None gives `a circle`. The order is shuffled
    with `rng` unless shuffle=False.
    """
    pairs = [(o.colour, o.shape) if isinstance(o, Obj) else tuple(o) for o in objs]
    if shuffle:
        rng = rng or random.Random(0)
        pairs = list(pairs)
        rng.shuffle(pairs)
    phrases = [f"a {c} {s}" if c else f"a {s}" for c, s in pairs]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def render(objs: list[Obj], image_size: int = IMAGE_SIZE, supersample: int = SUPERSAMPLE) -> Image.Image:
    """Draw the scene (anti-aliased by supersampling) on a black background."""
    k = supersample
    big = Image.new("RGB", (image_size * k, image_size * k), (0, 0, 0))
    d = ImageDraw.Draw(big)
    for o in objs:
        x0, y0, s = o.x * k, o.y * k, o.size * k
        col = COLOURS[o.colour]
        if o.shape == "circle":
            d.ellipse((x0, y0, x0 + s - 1, y0 + s - 1), fill=col)
        elif o.shape == "square":
            d.rectangle((x0, y0, x0 + s - 1, y0 + s - 1), fill=col)
        elif o.shape == "triangle":
            d.polygon([(x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1), (x0 + (s - 1) / 2, y0)], fill=col)
        else:
            raise ValueError(o.shape)
    if k == 1:
        return big
    return big.resize((image_size, image_size), Image.BOX)


def sample(seed: int, n_objects: int | None = None, plain_prob: float = 0.0) -> tuple[Image.Image, str, list[Obj]]:
    """(image, caption, objects) for one seed. With probability `plain_prob` a one-object scene is
    captioned without its colour (`a circle`)."""
    rng = random.Random(seed)
    objs = random_scene(rng, n_objects)
    if len(objs) == 1 and plain_prob and rng.random() < plain_prob:
        cap = caption([(None, objs[0].shape)], shuffle=False)
    else:
        cap = caption(objs, rng)
    return render(objs), cap, objs

