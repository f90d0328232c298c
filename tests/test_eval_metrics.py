"""Metrics on tiny random CLIP, BLIP and OWLv2 models saved to folders and loaded back like real ones."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from attnreg.eval import MetricError, MetricModelError, score_dir, write_report
from attnreg.eval.io import atomic_save_image, atomic_write_json, image_path, item_key, iter_records, record_path
from attnreg.eval.metrics import Clip
from attnreg.testing.metrics import tiny_blip, tiny_clip, tiny_owl



def fake_bench(out, methods=("sd", "attnreg"), prompts=("a cat and a dog", "a red apple with a crown"), seeds=(0, 1),
               dataset="ae"):
    """A benchmark folder with random images and plausible records (no generation)."""
    rng = np.random.default_rng(0)
    for prompt in prompts:
        for seed in seeds:
            for m in methods:
                key = item_key("animal-animal", m, prompt, seed, "abcdef")
                img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
                atomic_save_image(image_path(out, key), img)
                atomic_write_json(record_path(out, key), {
                    "key": key, "image": f"images/{key}.png", "dataset": dataset, "subset": "animal-animal",
                    "prompt": prompt, "targets": [prompt.split()[1], prompt.split()[-1]], "seed": seed, "method": m,
                    "config": {}, "config_hash": "abcdef", "run": {"dataset": dataset, "model": "x", "steps": 2},
                    "seconds": 1.0 + (m != "sd") + 0.1 * seed, "peak_memory_bytes": 2**28,
                })
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_models")
    return {"clip": tiny_clip(root / "clip"), "blip": tiny_blip(root / "blip"), "owl": tiny_owl(root / "owl")}


def test_clip_blip_owl_on_tiny_models(tmp_path, models):
    out = fake_bench(tmp_path / "bench")
    summary = score_dir(out, "clip,blip,owl", clip_model=str(models["clip"]), blip_model=str(models["blip"]),
                        owl_model=str(models["owl"]), owl_threshold=0.5, progress=False)
    assert summary["clip"]["scored"] == 8 and summary["blip"]["scored"] == 8 and summary["owl"]["scored"] == 8
    files = {p.name.split("-")[0]: json.loads(p.read_text()) for p in (out / "scores").glob("*.json")}
    assert set(files) == {"clip", "blip", "owl"}
    assert files["clip"]["settings"]["clip_model"] == str(models["clip"])
    # min_object is the lowest of the halves' own full similarity (split on " and ", else " with ")
    halves = {"a cat and a dog": ["a cat", "a dog"], "a red apple with a crown": ["a red apple", "a crown"]}
    clip, recs = Clip(clip_model=str(models["clip"])), {r["key"]: r for r in iter_records(out)}
    for key, values in files["clip"]["items"].items():
        record = recs[key]
        with Image.open(out / record["image"]) as im:
            image = im.convert("RGB")
        each = [clip.score([{**record, "prompt": half}], [image])[0]["full"] for half in halves[record["prompt"]]]
        assert values["min_object"] == pytest.approx(min(each), abs=1e-5) and -1 <= values["full"] <= 1
    for values in files["blip"]["items"].values():
        assert -1 <= values["text_text"] <= 1 and isinstance(values["caption"], str)
    for values in files["owl"]["items"].values():
        assert isinstance(values["all_found"], bool) and 0 <= values["found_share"] <= 1
        assert all(0 <= s <= 1 for s in values["max_scores"].values())
    # resumable: nothing is scored twice
    again = score_dir(out, "clip", clip_model=str(models["clip"]), progress=False)
    assert again["clip"]["scored"] == 0 and again["clip"]["skipped"] == 8
    report = write_report(out).read_text()
    assert "clip.full" in report and "owl.all_found" in report and "blip.text_text" in report
    assert "+" in report and "x)" in report  # overhead vs sd
    assert (out / "report_metrics.png").is_file() and list(out.glob("report_grid_*.png"))


def test_unloadable_model_is_named(tmp_path, capsys):
    from attnreg.cli import main

    out = fake_bench(tmp_path / "bench", methods=("sd",), seeds=(0,))
    assert main(["score", str(out), "--metrics", "blip", "--blip-model", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not load the BLIP model" in err and "--blip-model PATH" in err
    with pytest.raises(MetricModelError, match=r"CLIP model .*nowhere.*--clip-model PATH"):
        score_dir(out, "clip", clip_model=str(tmp_path / "nowhere"), progress=False)
    with pytest.raises(MetricModelError, match="--owl-model"):
        score_dir(out, "owl", owl_model=str(tmp_path / "nowhere"), progress=False)


def test_bad_metric_names(tmp_path):
    out = fake_bench(tmp_path / "bench", methods=("sd",), seeds=(0,))
    with pytest.raises(MetricError, match="valid: detect, clip, blip, owl"):
        score_dir(out, "fid", progress=False)
    with pytest.raises(MetricError, match="unknown metric.*time.*every report has them"):
        score_dir(out, "clip,time", progress=False)  # a column of the records, not a metric
    with pytest.raises(MetricError, match="applies to none"):
        score_dir(out, "detect", progress=False)  # shapes only
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetricError, match="no finished"):
        score_dir(tmp_path / "empty", "clip", progress=False)


def test_a_folder_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(ValueError, match="no such folder: .*nowhere"):
        score_dir(tmp_path / "nowhere", "detect", progress=False)
    with pytest.raises(ValueError, match="no such folder: .*nowhere"):
        write_report(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_records_without_image_are_named(tmp_path):
    from attnreg.toy.world import caption, random_scene

    out = fake_bench(tmp_path / "bench", methods=("sd",), seeds=(0, 1, 2), prompts=(caption(random_scene(0, 2)),),
                     dataset="shapes")
    lost = sorted((out / "images").rglob("*.png"))[1]
    lost.unlink()
    key = str(lost.relative_to(out / "images").with_suffix(""))
    with pytest.warns(UserWarning, match=f"1 record.* have no image.*{re.escape(key)}"):
        summary = score_dir(out, "detect", progress=False)
    assert summary["detect"]["scored"] == 2 and summary["detect"]["no_image"] == [key]
    with pytest.warns(UserWarning, match=f"n counts 2 of 3 records.*{re.escape(key)}"):
        report = write_report(out).read_text()
    assert f"left out for want of an image: 1 record(s): {key}" in report


def test_detect_on_shapes_records(tmp_path):
    from attnreg.toy.world import caption, random_scene, render

    scene = random_scene(0, 2)
    prompt = caption(scene)
    out = fake_bench(tmp_path / "bench", methods=("sd",), seeds=(0, 1), prompts=(prompt,), dataset="shapes")
    keys = sorted(p for p in (out / "images").rglob("*.png"))
    render(scene).save(keys[0])  # one image shows the prompt exactly, the other is noise
    summary = score_dir(out, "detect", progress=False)
    assert summary["detect"]["scored"] == 2
    data = json.loads(next((out / "scores").glob("detect-*.json")).read_text())
    by_image = {k.split("/")[-1]: v for k, v in data["items"].items()}
    assert by_image[keys[0].stem]["success"] is True and by_image[keys[1].stem]["success"] is False
    assert "detect.success" in write_report(out).read_text()
