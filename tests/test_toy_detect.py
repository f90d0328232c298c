import numpy as np
from PIL import Image
from scipy import ndimage

from attnreg.toy import detect, sample, score
from attnreg.toy.world import Obj, render

N = 300


def _truth(objs):
    return sorted((o.shape, o.colour) for o in objs)


def _found(image):
    return sorted((s, c) for s, c, _ in detect(image))


def degrade(img, rng, blur=1.0, noise=15.0):
    a = np.asarray(img).astype(np.float32)
    a = ndimage.gaussian_filter(a, sigma=(blur, blur, 0))
    a = a + rng.normal(0, noise, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def test_detector_clean_renders():
    ok = sum(_found(im) == _truth(objs) for im, _, objs in (sample(50_000 + i) for i in range(N)))
    assert ok / N >= 0.99


def test_detector_blur_and_noise():
    rng = np.random.default_rng(0)
    ok = 0
    for i in range(N):
        im, _, objs = sample(60_000 + i)
        ok += _found(degrade(im, rng, blur=rng.uniform(0.5, 1.0), noise=rng.uniform(5, 15))) == _truth(objs)
    assert ok / N >= 0.95


def test_detector_boxes_and_inputs():
    objs = [Obj("square", "red", 5, 6, 20), Obj("circle", "blue", 35, 30, 22)]
    im = render(objs)
    dets = detect(im)
    assert [(s, c) for s, c, _ in dets] == [("square", "red"), ("circle", "blue")]
    for (_, _, box), o in zip(dets, objs):
        assert np.abs(np.array(box) - np.array(o.box)).max() <= 1
    a = np.asarray(im)
    assert detect(a) == dets  # H x W x 3 uint8
    assert [d[:2] for d in detect(a.astype(np.float32) / 255)] == [d[:2] for d in dets]  # floats in [0, 1]
    assert detect(Image.new("RGB", (64, 64))) == []


def test_score():
    im = render([Obj("square", "red", 5, 6, 20), Obj("circle", "blue", 35, 30, 22)])
    s = score("a red square and a blue circle", im)
    assert s["success"] and s["shapes_present"] and s["extra_objects"] == 0
    s = score("a blue square and a red circle", im)  # attributes swapped: shapes right, colours wrong
    assert not s["success"] and s["shapes_present"]
    s = score("a red square", im)
    assert s["success"] and s["extra_objects"] == 1
    s = score("a red square and a red square", im)  # multiplicity counts
    assert not s["success"] and not s["shapes_present"]
    s = score("a triangle and a square", im)
    assert not s["success"] and not s["shapes_present"]
    assert score("a square", im)["success"]
