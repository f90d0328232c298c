import numpy as np

from attnreg.toy import COLOURS, SHAPES, caption, parse_prompt, prompt_targets, random_scene, render, sample, shapes_prompts
from attnreg.toy.world import GAP, IMAGE_SIZE


def test_render_is_deterministic():
    for seed in (0, 1, 12345):
        a, ca, oa = sample(seed)
        b, cb, ob = sample(seed)
        assert ca == cb and oa == ob
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert sample(1)[1] != sample(2)[1] or not np.array_equal(np.asarray(sample(1)[0]), np.asarray(sample(2)[0]))


def test_scene_content():
    counts = {1: 0, 2: 0, 3: 0}
    for seed in range(300):
        im, cap, objs = sample(seed)
        a = np.asarray(im)
        assert a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8
        counts[len(objs)] += 1
        assert sorted(parse_prompt(cap)) == sorted((o.colour, o.shape) for o in objs)
        for i, o in enumerate(objs):
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 and x1 <= IMAGE_SIZE and 0 <= y0 and y1 <= IMAGE_SIZE
            # the object's centre pixel has its palette colour
            cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
            if o.shape == "triangle":
                cy = y0 + 3 * o.size // 4
            assert np.abs(a[cy, cx].astype(int) - COLOURS[o.colour]).max() <= 2
            for p in objs[i + 1:]:  # boxes never overlap, and keep a gap
                q = p.box
                assert x1 + GAP <= q[0] or q[2] + GAP <= x0 or y1 + GAP <= q[1] or q[3] + GAP <= y0
        # the background (outside every box) is black
        mask = np.ones(a.shape[:2], bool)
        for o in objs:
            x0, y0, x1, y1 = o.box
            mask[y0:y1, x0:x1] = False
        assert a[mask].max() == 0
    assert min(counts.values()) > 60


def test_captions():
    assert caption([("red", "circle")], shuffle=False) == "a red circle"
    assert caption([("red", "circle"), ("blue", "square")], shuffle=False) == "a red circle and a blue square"
    assert caption([("red", "circle"), ("blue", "square"), (None, "triangle")], shuffle=False) == \
        "a red circle, a blue square and a triangle"
    objs = random_scene(3, n_objects=3)
    assert len(objs) == 3 and render(objs).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_parse_prompt_and_targets():
    p = "a red circle, a blue square and a triangle"
    assert parse_prompt(p) == [("red", "circle"), ("blue", "square"), (None, "triangle")]
    assert prompt_targets(p) == ["circle", "square", "triangle"]
    assert prompt_targets(p, colours=True) == ["red", "circle", "blue", "square", "triangle"]


def test_shapes_prompts():
    for kind in (1, 2, 3):
        ps = shapes_prompts(kind, 20, seed=0)
        assert ps == shapes_prompts(kind, 20, seed=0)
        assert ps != shapes_prompts(kind, 20, seed=1)
        assert len(ps) == 20
        for p in ps:
            named = parse_prompt(p)
            assert len(named) == kind and all(c is not None and s in SHAPES for c, s in named)
            assert len(set(prompt_targets(p))) == kind
        if kind > 1:
            assert len(set(ps)) == 20
    assert len(set(shapes_prompts(1, 18))) == 18  # every (colour, shape) once
