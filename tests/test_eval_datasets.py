"""Data sets of `attnreg bench`: the A&E set, prompt files, errors."""

import json
from collections import Counter

import pytest

from attnreg.eval.datasets import ANIMALS, COLOURS, OBJECTS, DatasetError, ae_prompts, load_dataset
from attnreg.eval.io import noise_seed
from attnreg.eval.metrics import split_prompt
from attnreg.eval.scorers import IMAGENET_TEMPLATES
from attnreg.eval.runner import parse_seeds, parse_sets


def test_ae_set_has_276_prompts():
    items = ae_prompts()
    assert len(items) == 276
    assert Counter(p.subset for p in items) == {"animal-animal": 66, "animal-object": 144, "object-object": 66}
    assert len({p.prompt for p in items}) == 276
    assert (len(ANIMALS), len(OBJECTS), len(COLOURS)) == (12, 12, 11)
    assert items[0].prompt == "a cat and a dog" and items[0].targets == ("cat", "dog")
    worn = [p.prompt for p in items if " with " in p.prompt]
    assert len(worn) == 36 and "a cat with a crown" in worn
    for p in items:
        for t in p.targets:
            assert f" {t}" in p.prompt
        if p.subset == "object-object":
            c1, c2 = p.prompt.split()[1], p.prompt.split()[5]
            assert c1 in COLOURS and c2 in COLOURS and c1 != c2
    assert ae_prompts() == items  # deterministic


def test_limit_and_subsets():
    items = load_dataset("ae", subsets=["animal-animal", "object-object"], limit=2)
    assert [p.subset for p in items] == ["animal-animal"] * 2 + ["object-object"] * 2
    with pytest.raises(DatasetError, match="animal-animal"):
        load_dataset("ae", subsets=["animals"])


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="valid: shapes, ae, geneval, t2i-compbench, geneval:PATH .*, file:PATH"):
        load_dataset("coco")


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na cat and a dog\n\na red apple with a crown\n")
    items = load_dataset(f"file:{txt}")
    assert [p.prompt for p in items] == ["a cat and a dog", "a red apple with a crown"]
    assert items[0].targets == ("cat", "dog") and items[0].dataset == f"file:{txt}"
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "a cat and a dog", "targets": ["cat"], "subset": "x"}) + "\n"
                  + json.dumps({"prompt": "a frog on a bench"}) + "\n")
    items = load_dataset(f"file:{jl}")
    assert items[0].targets == ("cat",) and items[0].subset == "x"
    assert items[1].targets == ("frog", "bench") and items[1].subset == "all"
    # exact repeats are dropped; the same prompt with other targets is another item
    jl.write_text("\n".join(json.dumps(r) for r in [{"prompt": "a cat and a dog"}, {"prompt": "a cat and a dog"},
                                                     {"prompt": "a cat and a dog", "targets": ["cat"]}]))
    assert [p.targets for p in load_dataset(f"file:{jl}")] == [("cat", "dog"), ("cat",)]


@pytest.mark.parametrize("line", ['{"prompt": "a cat"', '["a cat"]', '{"targets": ["cat"]}', '{"prompt": "a cat", "targets": 3}'])
def test_malformed_line_names_the_line(tmp_path, line):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"prompt": "a dog"}\n\n' + line + "\n")
    with pytest.raises(DatasetError, match="line 3"):
        load_dataset(f"file:{jl}")


def test_seeds_sets_and_noise():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_seeds("5") == [5]
    with pytest.raises(ValueError, match="seeds"):
        parse_seeds("3-1")
    assert parse_sets(["attend-and-excite.thresholds={}", "attnreg.edit_steps=2", "attnreg.layers=[\"up_blocks.0\"]"]) == {
        "attend-and-excite": {"thresholds": {}}, "attnreg": {"edit_steps": 2, "layers": ("up_blocks.0",)}}
    with pytest.raises(ValueError, match="METHOD.OPTION"):
        parse_sets(["edit_steps=2"])
    # a stable hash, not Python's hash(): fixed across runs and machines
    assert noise_seed("a cat and a dog", 0) == noise_seed("a cat and a dog", 0) != noise_seed("a cat and a dog", 1)
    assert noise_seed("a cat and a dog", 0) == 0x0 + int(__import__("hashlib").sha256(
        b'["noise", "a cat and a dog", 0]').hexdigest()[:15], 16)


def test_clip_conventions():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert split_prompt("a cat and a red apple") == ["a cat", "a red apple"]
    assert split_prompt("a cat with a crown") == ["a cat", "a crown"]
    assert split_prompt("a cat") == ["a cat"]


def test_shapes_set():
    assert len(load_dataset("shapes", subsets=["1obj"])) == 18  # all distinct one-shape prompts
    one = load_dataset("shapes", subsets=["1obj"], limit=30)  # a limit past 18 does not repeat prompts
    assert len(one) == len({p.prompt for p in one}) == 18
    items = load_dataset("shapes", limit=3)
    assert Counter(p.subset for p in items) == {"1obj": 3, "2obj": 3, "3obj": 3}
    for p in items:
        assert len(p.targets) == int(p.subset[0]) and all(t in p.prompt for t in p.targets)
    assert load_dataset("shapes", subsets=["2obj"], limit=2) == [p for p in items if p.subset == "2obj"][:2]
    with pytest.raises(DatasetError, match="1obj"):
        load_dataset("shapes", subsets=["4obj"])



def test_bar_chart_accepts_rates_of_zero(tmp_path):
    # at a rate of 0 the Wilson lower bound can exceed the rate by rounding; the chart must not fail
    from attnreg.figures import bar_chart

    cell = {"value": 0.0, "low": 1e-17, "high": 0.138}
    table = {("shapes", "2obj", "sd"): {"detect.success": cell}, ("shapes", "2obj", "attnreg"): {"detect.success": cell}}
    bar_chart(table, ["detect.success"], ["sd", "attnreg"], tmp_path / "chart.png")
    assert (tmp_path / "chart.png").is_file()


def test_paired_comparison_uses_common_pairs_only():
    from attnreg.eval.stats import paired_comparison

    def rec(method, prompt, seed, seconds):
        return {"key": f"{method}-{prompt}-{seed}", "dataset": "shapes", "subset": "2obj", "method": method,
                "prompt": prompt, "seed": seed, "seconds": seconds}

    records = [rec("sd", p, s, 1.0) for p in "ab" for s in range(4)]
    records += [rec("ae", p, s, 3.0) for p in "ab" for s in range(2)]  # a partial run: seeds 0-1 only
    ok = {("sd", "a", 0): False, ("sd", "a", 1): False, ("sd", "b", 0): True, ("sd", "b", 1): True,
          ("ae", "a", 0): True, ("ae", "a", 1): True, ("ae", "b", 0): True, ("ae", "b", 1): False}
    values = {r["key"]: ok.get((r["method"], r["prompt"], r["seed"]), True) for r in records}
    (key, row), = paired_comparison(records, values).items()
    assert key == ("shapes", "2obj", "ae")
    assert row["n"] == 4 and row["base"] == 0.5 and row["rate"] == 0.75  # sd's seeds 2-3 are left out
    assert (row["wins"], row["losses"]) == (2, 1) and row["diff"] == 0.25
    assert row["low"] < 0.25 < row["high"] and row["p"] == 1.0  # binomial: 2 of 3 discordant pairs
    assert row["time_ratio"] == 3.0
    assert row["kept"] == 0.5  # sd right on (b, 0) and (b, 1); ae keeps (b, 0) only
    # a second configuration of the same method is its own row, not merged into the first
    records += [{**rec("ae", p, s, 2.0), "key": f"ae2-{p}-{s}", "config_hash": "bbbbbb"} for p in "ab" for s in range(4)]
    values.update({f"ae2-{p}-{s}": False for p in "ab" for s in range(4)})
    rows = paired_comparison(records, values)
    assert sorted(m for _, _, m in rows) == ["ae []", "ae [bbbbbb]"]
    assert rows[("shapes", "2obj", "ae []")]["rate"] == 0.75 and rows[("shapes", "2obj", "ae [bbbbbb]")]["rate"] == 0.0


def test_image_change_and_extra_object_rates(tmp_path):
    import numpy as np
    from PIL import Image

    from attnreg.eval.stats import image_change, paired_comparison

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    b = a.copy()
    b[:8] = 255 - b[:8]  # a quarter of the image changed
    for name, arr in (("a.png", a), ("b.png", b)):
        Image.fromarray(arr).save(tmp_path / name)
    same = image_change(tmp_path, [({"image": "a.png"}, {"image": "a.png"})])
    assert same == (0.0, 1.0)
    mad, ssim = image_change(tmp_path, [({"image": "a.png"}, {"image": "b.png"})])
    assert mad == np.abs(a.astype(float) - b).mean() and ssim < 0.9

    records = [{"key": f"{m}{s}", "dataset": "shapes", "subset": "2obj", "method": m, "prompt": "p", "seed": s,
                "seconds": 1.0, "image": "a.png" if m == "sd" else "b.png"} for m in ("sd", "x") for s in range(2)]
    values = {r["key"]: True for r in records}
    extra = {"sd0": False, "sd1": False, "x0": True, "x1": False}
    (_, row), = paired_comparison(records, values, extra=extra, out=tmp_path).items()
    assert (row["base_extra"], row["extra"]) == (0.0, 0.5) and row["kept"] == 1.0
    assert row["mad"] == mad
