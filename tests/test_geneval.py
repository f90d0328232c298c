"""The GenEval scorer: its rules on hand-made detections, the shapes backend end to end on rendered scenes
with known answers (and resuming after a kill), the OWLv2 and CLIP backends on tiny random models, and the
GenEval and T2I-CompBench prompt sets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnreg.eval import DatasetError, MetricError, MetricModelError, load_dataset, score_dir, write_report
from attnreg.eval.geneval import (
    COLOURS, Detection, GenEvalError, check_classes, check_metadata, evaluate, keep, relative_position, summarise,
)
from attnreg.eval.io import atomic_save_image, atomic_write_json, image_path, item_key, record_path
from attnreg.toy.world import Obj, render

ROOT = Path(__file__).resolve().parents[1]


def det(x0, y0, x1, y1, score=0.95, colour=None):
    return Detection((x0, y0, x1, y1), score, colour)


def line(tag, include, exclude=None, prompt="a photo"):
    row = {"tag": tag, "prompt": prompt, "include": include}
    if exclude is not None:
        row["exclude"] = exclude
    return check_metadata(row)


def judge(meta, raw, colours=None):
    """Apply the rules; `colours` maps a class to the colour names its kept detections get."""
    asked = []

    def colours_of(name, dets):
        asked.append((name, len(dets)))
        return [d.colour for d in dets] if colours is None else colours[name][: len(dets)]

    correct, reasons = evaluate(meta, keep(raw, meta["tag"]), colours_of)
    return correct, reasons, asked


# -- the rules on hand-made detections ---------------------------------------------------------------------
def test_object_tags_pass_and_fail():
    single = line("single_object", [{"class": "dog", "count": 1}])
    assert judge(single, {"dog": [det(0, 0, 10, 10, 0.31)]})[0]
    correct, reasons, _ = judge(single, {"dog": [det(0, 0, 10, 10, 0.3)], "cat": [det(0, 0, 9, 9)]})
    assert not correct and reasons == ["expected dog >= 1, found 0"]  # 0.3 is not above 0.3
    two = line("two_object", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}])
    assert judge(two, {"dog": [det(0, 0, 5, 5)], "cat": [det(9, 9, 20, 20, 0.4)]})[0]
    correct, reasons, _ = judge(two, {"dog": [det(0, 0, 5, 5)]})
    assert not correct and reasons == ["expected cat >= 1, found 0"]


def test_counting_threshold_and_exclude():
    meta = line("counting", [{"class": "clock", "count": 2}], [{"class": "clock", "count": 3}])
    two = [det(0, 0, 5, 5, 0.99), det(10, 10, 15, 15, 0.95)]
    assert judge(meta, {"clock": two})[0]
    # a third clock above 0.9 breaks the exclude rule; one at 0.85 is not counted for a counting prompt
    correct, reasons, _ = judge(meta, {"clock": [*two, det(20, 20, 25, 25, 0.91)]})
    assert not correct and reasons == ["expected clock < 3, found 3"]
    assert judge(meta, {"clock": [*two, det(20, 20, 25, 25, 0.85)]})[0]
    correct, reasons, _ = judge(meta, {"clock": [two[0], det(10, 10, 15, 15, 0.85)]})
    assert not correct and reasons == ["expected clock >= 2, found 1"]
    # the same detections under another tag: the 0.3 threshold counts the 0.85 one
    other = line("two_object", [{"class": "clock", "count": 2}])
    assert judge(other, {"clock": [two[0], det(10, 10, 15, 15, 0.85)]})[0]


def test_colour_rules_use_the_most_confident_objects():
    meta = line("colors", [{"class": "car", "count": 1, "color": "pink"}])
    cars = [det(0, 0, 9, 9, 0.5), det(20, 20, 30, 30, 0.9)]
    correct, _, asked = judge(meta, {"car": cars}, {"car": ["pink", "red"]})
    assert correct and asked == [("car", 1)]  # only the most confident car is named
    correct, reasons, _ = judge(meta, {"car": cars}, {"car": ["red", "pink"]})
    assert not correct and reasons == ["expected pink car >= 1, found 1 red"]
    attr = line("color_attr", [{"class": "bus", "count": 1, "color": "green"},
                               {"class": "cup", "count": 1, "color": "purple"}])
    raw = {"bus": [det(0, 0, 9, 9)], "cup": [det(20, 0, 29, 9)]}
    assert judge(attr, raw, {"bus": ["green"], "cup": ["purple"]})[0]
    correct, reasons, _ = judge(attr, raw, {"bus": ["purple"], "cup": ["green"]})
    assert not correct and len(reasons) == 2
    # no colour is asked of a class that was not found
    _, _, asked = judge(attr, {"cup": [det(0, 0, 5, 5)]}, {"cup": ["purple"]})
    assert asked == [("cup", 1)]


def test_position_both_ways_and_the_margin():
    meta = line("position", [{"class": "teddy bear", "count": 1},
                             {"class": "dog", "count": 1, "position": ["right of", 0]}])
    bear, dog_right, dog_left = det(0, 40, 20, 60), det(60, 40, 80, 60), det(0, 0, 20, 20)
    assert judge(meta, {"teddy bear": [bear], "dog": [dog_right]})[0]
    correct, reasons, _ = judge(meta, {"teddy bear": [det(60, 40, 80, 60)], "dog": [det(0, 40, 20, 60)]})
    assert not correct and reasons == ["expected dog right of teddy bear, found left of instead"]
    assert relative_position(dog_left, bear) == {"above"}
    assert relative_position(bear, dog_left) == {"below"}
    assert relative_position(det(30, 30, 50, 50), det(0, 0, 20, 20)) == {"right of", "below"}
    # boxes 20 px wide: the offset shrinks by 0.1 x 40 px and must keep more than half its length
    assert relative_position(det(3, 0, 23, 20), det(0, 0, 20, 20)) == set()
    assert relative_position(det(8, 0, 28, 20), det(0, 0, 20, 20)) == set()
    assert relative_position(det(9, 0, 29, 20), det(0, 0, 20, 20)) == {"right of"}
    # the target clause must itself have passed
    correct, reasons, _ = judge(meta, {"dog": [dog_right]})
    assert not correct and reasons == ["expected teddy bear >= 1, found 0", "no teddy bear for dog to be right of"]


def test_keep_sorts_caps_and_deduplicates():
    raw = {"cup": [det(i, 0, i + 5, 5, 0.31 + i / 100) for i in range(20)], "cat": [det(0, 0, 1, 1, 0.1)]}
    kept = keep(raw, "two_object")
    assert list(kept) == ["cup"] and len(kept["cup"]) == 16
    assert [d.score for d in kept["cup"]] == sorted((d.score for d in raw["cup"]), reverse=True)[:16]
    overlapping = {"cup": [det(0, 0, 10, 10, 0.9), det(1, 0, 11, 10, 0.8), det(30, 30, 40, 40, 0.7)]}
    assert len(keep(overlapping, "two_object")["cup"]) == 3  # GenEval's default: no NMS
    assert [d.score for d in keep(overlapping, "two_object", max_overlap=0.5)["cup"]] == [0.9, 0.7]


def test_summary_is_the_mean_over_tags():
    results = ([{"tag": "counting", "prompt": "p1", "correct": c} for c in (True, False, False, False)]
               + [{"tag": "colors", "prompt": f"p{i}", "correct": True} for i in range(2, 10)]
               + [{"tag": "colors", "prompt": "p10", "correct": False}])
    s = summarise(results)
    assert s["images"] == 13 and s["prompts"] == 10
    assert s["tags"]["counting"] == {"score": 0.25, "correct": 1, "images": 4}
    assert s["overall"] == pytest.approx((0.25 + 8 / 9) / 2)  # not 9/13: every tag weighs the same
    assert s["correct_images"] == pytest.approx(9 / 13) and s["correct_prompts"] == pytest.approx(9 / 10)
    assert list(s["tags"]) == ["counting", "colors"]


def test_metadata_errors_name_the_field_and_the_valid_ones():
    good = {"tag": "position", "prompt": "a photo of a dog left of a cat",
            "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    assert check_metadata(good)["include"][1]["position"] == ["left of", 0]
    bad = [
        ({**good, "seed": 1}, "unknown field(s) 'seed' in the line; valid: tag, prompt, include, exclude"),
        ({**good, "tag": "colour"}, "unknown tag 'colour'; valid: single_object"),
        ({**good, "include": [{"class": "cat", "count": 1, "colour": "red"}]}, "unknown field(s) 'colour' in include"),
        ({**good, "include": [{"class": "cat", "count": 1, "color": "grey"}]}, "unknown color 'grey'; valid: red"),
        ({**good, "include": [{"class": "cat", "count": 0}]}, '"count" must be an integer >= 1'),
        ({**good, "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]}, "index in none: the first clause"),
        ({**good, "include": [good["include"][0], {**good["include"][1], "position": ["near", 0]}]},
         "relation one of left of, right of, above, below and index in 0..0; got ['near', 0]"),
        ({**good, "exclude": [{"class": "cat", "count": 2, "color": "red"}]}, "unknown field(s) 'color' in exclude"),
        ({**good, "include": []}, '"include" must be a non-empty list'),
    ]
    for row, message in bad:
        with pytest.raises(GenEvalError, match="^line 3(, (in|ex)clude\\[\\d\\])?: .*" + _re(message)):
            check_metadata(row, "line 3")
    check_classes(check_metadata(good), ("cat", "dog"), "owlv2")
    with pytest.raises(GenEvalError, match="class\\(es\\) 'dog' are not among the shapes detector's classes; valid: cat"):
        check_classes(check_metadata(good), ("cat",), "shapes")


def _re(text):
    import re

    return re.escape(text)


# -- the prompt sets -----------------------------------------------------------------------------------------
def test_geneval_and_t2i_compbench_prompt_sets():
    from collections import Counter

    from attnreg.eval.datasets import DATA

    g = load_dataset("geneval")
    assert Counter(p.subset for p in g) == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                                            "position": 100, "color_attr": 100}
    by_prompt = {p.prompt: p for p in g}
    assert by_prompt["a photo of two clocks"].targets == ("clocks",)
    assert by_prompt["a photo of two clocks"].metadata["exclude"] == [{"class": "clock", "count": 3}]
    assert by_prompt["a photo of an orange orange"].targets == ("orange#2",)
    assert by_prompt["a photo of a dog right of a teddy bear"].targets == ("teddy bear", "dog")
    assert {p.targets_source for p in g} == {"metadata"}
    t = load_dataset("t2i-compbench", ["numeracy", "3d_spatial"], limit=5)
    assert [p.subset for p in t] == ["numeracy"] * 5 + ["3d_spatial"] * 5 and all(p.targets for p in t)
    assert len(load_dataset("t2i-compbench")) == 2400
    for name in ("NOTICE", "geneval/LICENSE", "t2i-compbench/LICENSE"):
        assert (DATA / name).is_file()
    assert "MIT" in (DATA / "NOTICE").read_text()
    with pytest.raises(DatasetError, match="unknown subset\\(s\\) colours of data set 'geneval'; valid: color_attr"):
        load_dataset("geneval", ["colours"])


def test_a_bad_metadata_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "meta.jsonl"
    ok = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    path.write_text(json.dumps(ok) + "\n\n" + json.dumps({**ok, "image": "x.png"}) + "\n")
    with pytest.raises(DatasetError, match=f"{_re(str(path))}, line 3: unknown field\\(s\\) 'image'"):
        load_dataset(f"geneval:{path}")
    path.write_text(json.dumps(ok) + "\n{\"tag\": \n")
    with pytest.raises(DatasetError, match="line 2: not valid JSON"):
        load_dataset(f"geneval:{path}")


# -- the shapes backend end to end --------------------------------------------------------------------------
def inc(cls, count=1, **kw):
    return {"class": cls, "count": count, **kw}


# (metadata, scene, expected verdict): each tag passing and failing, on rendered 64 x 64 scenes
SCENES = [
    ("single_object", [inc("circle")], None, [Obj("circle", "red", 20, 20, 20)], True),
    ("single_object", [inc("circle")], None, [Obj("square", "red", 20, 20, 20)], False),
    ("two_object", [inc("circle"), inc("square")], None,
     [Obj("circle", "green", 4, 4, 18), Obj("square", "blue", 36, 36, 20)], True),
    ("two_object", [inc("circle"), inc("square")], None, [Obj("circle", "green", 4, 4, 18)], False),
    ("counting", [inc("triangle", 2)], [inc("triangle", 3)],
     [Obj("triangle", "yellow", 4, 4, 18), Obj("triangle", "white", 36, 36, 20)], True),
    ("counting", [inc("triangle", 2)], [inc("triangle", 3)],
     [Obj("triangle", "yellow", 4, 4, 16), Obj("triangle", "white", 40, 4, 16), Obj("triangle", "red", 20, 40, 16)],
     False),
    ("colors", [inc("square", color="blue")], None, [Obj("square", "blue", 10, 10, 24)], True),
    ("colors", [inc("square", color="blue")], None, [Obj("square", "green", 10, 10, 24)], False),
    ("position", [inc("square"), inc("circle", position=["left of", 0])], None,
     [Obj("circle", "red", 4, 20, 18), Obj("square", "white", 40, 20, 18)], True),
    ("position", [inc("square"), inc("circle", position=["left of", 0])], None,
     [Obj("circle", "red", 40, 20, 18), Obj("square", "white", 4, 20, 18)], False),
    ("color_attr", [inc("circle", color="red"), inc("triangle", color="yellow")], None,
     [Obj("circle", "red", 4, 4, 20), Obj("triangle", "yellow", 36, 36, 20)], True),
    ("color_attr", [inc("circle", color="red"), inc("triangle", color="yellow")], None,
     [Obj("circle", "yellow", 4, 4, 20), Obj("triangle", "red", 36, 36, 20)], False),
]


def shapes_folder(out: Path) -> dict:
    """A benchmark folder of the rendered SCENES with GenEval metadata; returns {key: expected verdict}."""
    expected = {}
    for i, (tag, include, exclude, scene, verdict) in enumerate(SCENES):
        meta = check_metadata({"tag": tag, "prompt": f"scene {i // 2}", "include": include,
                               **({"exclude": exclude} if exclude else {})})
        key = item_key(tag, "sd", meta["prompt"], i % 2, "abcdef")
        atomic_save_image(image_path(out, key), render(scene))
        atomic_write_json(record_path(out, key), {
            "key": key, "image": f"images/{key}.png", "dataset": "geneval:shapes", "subset": tag,
            "prompt": meta["prompt"], "targets": [include[0]["class"]], "seed": i % 2, "method": "sd", "config": {},
            "config_hash": "abcdef", "run": {"dataset": "geneval:shapes"}, "seconds": 1.0, "peak_memory_bytes": 2**20,
            "metadata": meta})
        expected[key] = verdict
    return expected


def test_shapes_backend_end_to_end(tmp_path):
    out = tmp_path / "bench"
    expected = shapes_folder(out)
    summary = score_dir(out, "geneval", geneval_detector="shapes", progress=False)
    assert summary["geneval"]["scored"] == len(SCENES)
    data = json.loads(Path(summary["geneval"]["file"]).read_text())
    assert data["settings"]["detector"] == "shapes"
    got = {k: v["correct"] for k, v in data["items"].items()}
    assert got == expected, {k: data["items"][k]["reason"] for k in got if got[k] != expected[k]}
    assert all(v["reason"] == "" for k, v in data["items"].items() if expected[k])
    report = write_report(out).read_text()
    assert "## GenEval" in report and "shapes world's exact detector" in report
    assert "| sd | 12 | 6 | 0.5000 |" in report  # every tag half right


def test_scorer_resumes_after_a_kill_without_scoring_twice(tmp_path, monkeypatch):
    from attnreg.eval.detectors import ShapesBackend

    out = tmp_path / "bench"
    shapes_folder(out)
    counts = tmp_path / "counts.txt"
    # a scorer killed (SIGKILL) while it scores its second batch of 8
    script = f"""
import os, signal
from attnreg.eval import score_dir
from attnreg.eval.detectors import ShapesBackend
real = ShapesBackend.detect
def detect(self, images):
    with open({str(counts)!r}, "a") as f:
        f.write(f"{{len(images)}}\\n")
    if sum(1 for _ in open({str(counts)!r})) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, images)
ShapesBackend.detect = detect
score_dir({str(out)!r}, "geneval", geneval_detector="shapes", progress=False)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert counts.read_text().split() == ["8", "4"]  # the second batch never finished
    seen = []
    real = ShapesBackend.detect
    monkeypatch.setattr(ShapesBackend, "detect", lambda self, images: seen.append(len(images)) or real(self, images))
    summary = score_dir(out, "geneval", geneval_detector="shapes", progress=False)
    assert seen == [4] and summary["geneval"]["scored"] == 4 and summary["geneval"]["skipped"] == 8
    data = json.loads(Path(summary["geneval"]["file"]).read_text())
    assert len(data["items"]) == len(SCENES) and not list((out / "scores").glob("*.partial.jsonl"))


def test_records_the_detector_cannot_score_are_refused_before_scoring(tmp_path):
    out = tmp_path / "bench"
    shapes_folder(out)
    with pytest.raises(MetricError, match="prompt 'scene \\d': class\\(es\\) '.*' are not among the owlv2 detector's classes; valid: person"):
        score_dir(out, "geneval", progress=False)
    with pytest.raises(MetricModelError, match="could not load the OWL model .*nowhere.*--owl-model PATH"):
        from attnreg.eval.metrics import check_metric_models

        check_metric_models(["geneval"], owl_model=str(tmp_path / "nowhere"))
    assert not (out / "scores").exists()


def test_bench_on_the_embedded_model_with_the_shapes_detector(tmp_path):
    from attnreg.eval import run_benchmark
    from attnreg.eval.io import iter_records

    meta = tmp_path / "shapes.jsonl"
    rows = [{"tag": "colors", "include": [inc("circle", color="red")], "prompt": "a red circle"},
            {"tag": "two_object", "include": [inc("circle"), inc("square")], "prompt": "a circle and a square"}]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(seeds="0", steps=2, out=tmp_path / "o", progress=False, report=False)
    with pytest.raises(MetricError, match="prompt 'a red circle': class\\(es\\) 'circle' are not among the owlv2 detector's classes"):
        run_benchmark(f"geneval:{meta}", "sd", metrics="geneval", **common)
    with pytest.raises(MetricError, match="metric geneval applies to none of the 2 prompts"):
        run_benchmark("file:" + str(_txt(tmp_path)), "sd", metrics="geneval", **common)
    assert not (tmp_path / "o").exists()  # nothing was made
    summary = run_benchmark(f"geneval:{meta}", "sd", metrics="geneval", metric_options={"geneval_detector": "shapes"},
                            **common)
    recs = list(iter_records(tmp_path / "o"))
    assert summary["generated"] == 2 and {r["metadata"]["tag"] for r in recs} == {"colors", "two_object"}
    assert {tuple(r["targets"]) for r in recs} == {("circle",), ("circle", "square")}
    assert summary["scores"]["geneval"]["scored"] == 2


def _txt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\na blue square\n")
    return path


# -- OWLv2 and CLIP backends on tiny random models -----------------------------------------------------------
def test_owl_and_clip_backends_run_on_tiny_models(tmp_path):
    from PIL import Image

    from attnreg.eval.detectors import OwlBackend, geneval_classes
    from attnreg.testing.metrics import tiny_clip, tiny_owl

    owl, clip = tiny_owl(tmp_path / "owl"), tiny_clip(tmp_path / "clip")
    backend = OwlBackend(str(owl), str(clip), min_score=0.0)
    images = [Image.new("RGB", (48, 40), (200, 30, 30)), render([Obj("circle", "blue", 10, 10, 30)])]
    found = backend.detect(images)
    assert len(found) == 2 and len(geneval_classes()) == 80
    for image, per_class in zip(images, found):
        assert per_class and set(per_class) <= set(geneval_classes())
        for dets in per_class.values():
            for d in dets:
                x0, y0, x1, y1 = d.box
                assert 0 <= x0 <= x1 <= image.size[0] and 0 <= y0 <= y1 <= image.size[1] and 0 <= d.score <= 1
        name, dets = next(iter(per_class.items()))
        colours = backend.colours(image, name, dets)
        assert len(colours) == len(dets) and set(colours) <= set(COLOURS)
    # the metric on a folder of GenEval records, through the same loaders as real models
    out = tmp_path / "bench"
    shapes_folder(out)
    for path in (out / "records").rglob("*.json"):
        record = json.loads(path.read_text())
        record["metadata"].update(include=[inc("dog", color="red"), inc("cat", position=["left of", 0])],
                                  exclude=[inc("cat", 2)])
        atomic_write_json(path, record)
    summary = score_dir(out, "geneval", owl_model=str(owl), clip_model=str(clip), geneval_threshold=0.0,
                        progress=False)
    data = json.loads(Path(summary["geneval"]["file"]).read_text())
    assert data["settings"]["detector"] == "owlv2" and data["settings"]["clip_model"] == str(clip)
    assert len(data["items"]) == len(SCENES)
    assert all(isinstance(v["correct"], bool) and isinstance(v["reason"], str) for v in data["items"].values())


@pytest.mark.parametrize("dataset,metric", [("geneval", "geneval"), ("geneval:my.jsonl", "geneval"), ("shapes", "detect"),
                                            ("t2i-compbench", "clip")])
def test_auto_metrics_are_each_data_sets_own_scorer(dataset, metric, tmp_path):
    from attnreg.eval.runner import BenchmarkOptions

    assert BenchmarkOptions(dataset=dataset, methods="sd", out=tmp_path / "o").metrics == [metric]
