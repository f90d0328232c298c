"""`explain` and `attnreg explain` on the tiny SD pipeline: the four files, the numbers, bad input."""

import json

import numpy as np
import pytest
import torch

from attnreg import RegulationConfig
from attnreg.cli import main
from attnreg.explain import FILES, default_steps_shown, default_violin_steps, explain
from attnreg.testing import tiny_sd_pipeline

PROMPT = "a painting of an elephant with glasses"  # 1 a .. 5 elephant, 6 with, 7 glasses
STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def explained(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    ex = explain(pipe, PROMPT, targets=["elephant", "glasses"], seed=3, config=RegulationConfig.paper(iterations=4),
                 out=out, num_inference_steps=STEPS, guidance_scale=7.5)
    return ex, out


def test_default_steps():
    assert default_steps_shown(50) == [0, 5, 15, 25, 35, 49]
    assert default_steps_shown(4) == [0, 1, 2, 3]
    assert default_violin_steps(50, 25) == [0, 24]
    assert default_violin_steps(4, 1) == [0, 3]


def test_explain_writes_the_four_files(explained):
    ex, out = explained
    assert [p.name for p in ex.files] == list(FILES)
    for name in FILES:
        assert (out / name).stat().st_size > 0
    from PIL import Image

    assert Image.open(out / "maps.png").size[0] > 300
    assert ex.compare.width > 2 * ex.images["vanilla"].width


def test_explanation_numbers(explained, pipe):
    ex, out = explained
    numbers = json.loads((out / "explain.json").read_text())
    assert numbers["targets"]["indices"] == [5, 7]
    assert numbers["steps_shown"] == [0, 1, 2, 3] and numbers["violin_steps"] == [0, 1]
    for run in ("vanilla", "regulated"):
        tokens = numbers["runs"][run]["tokens"]
        assert [t["token"] for t in tokens] == ["a", "painting", "of", "an", "elephant", "with", "glasses"]
        for t in tokens:
            assert len(t["mean"]) == len(t["max"]) == len(t["p90"]) == STEPS
            assert all(0 <= v <= 1 for v in t["mean"] + t["max"] + t["p90"])
            assert all(q <= x + 1e-6 for q, x in zip(t["p90"], t["max"]))
    # regulation raises the targets' attention at the edited steps (the tiny model spreads it evenly)
    van = {t["token"]: t for t in numbers["runs"]["vanilla"]["tokens"]}
    reg = {t["token"]: t for t in numbers["runs"]["regulated"]["tokens"]}
    assert reg["glasses"]["mean"][0] > 2 * van["glasses"]["mean"][0]
    # the diagnosis: one line per target, in the paper's words
    assert len(ex.diagnosis) == 2 and ex.diagnosis[0].startswith("elephant: peak attention ")
    assert "at step 0" in ex.diagnosis[1] and "regulated:" in ex.diagnosis[1]
    assert numbers["diagnosis"] == ex.diagnosis
    # the plain run is the pipeline's own image for that seed
    plain = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(3), num_inference_steps=STEPS,
                 guidance_scale=7.5).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(ex.images["vanilla"]))
    # the figures are matplotlib Figures (inline in a notebook); one preview per shown step
    from matplotlib.figure import Figure

    assert isinstance(ex.maps_figure, Figure) and isinstance(ex.stats_figure, Figure)
    from attnreg.explain import maps_figure

    assert isinstance(maps_figure(ex, "figure"), Figure)
    assert all(len(ex.previews[r]) == STEPS and all(ex.previews[r]) for r in ("vanilla", "regulated"))
    assert ex.recorders["vanilla"].map(3).shape == (1, 7, 16, 16)
    # what was kept: 4 shown steps and 2 violin steps of 16 x 16 maps, 3 statistics at 4 steps, 7 tokens
    assert numbers["runs"]["vanilla"]["recorded_bytes"] == 4 * 7 * (4 * 256 + 2 * 256 + 3 * STEPS)
    assert numbers["runs"]["regulated"]["recorded_bytes"] == ex.recorders["regulated"].bound(1, STEPS)
    assert set(numbers["runs"]["vanilla"]["dominant_at_violin_steps"]) == {"0", "1"}


def test_explain_rejects_bad_input(pipe):
    with pytest.raises(ValueError, match="steps_shown"):
        explain(pipe, PROMPT, targets=["glasses"], steps_shown=[0, 9], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="guidance_scale"):
        explain(pipe, PROMPT, targets=["glasses"], num_inference_steps=STEPS, guidance_scale=1.0)
    with pytest.raises(ValueError, match="generator"):
        explain(pipe, PROMPT, targets=["glasses"], generator=torch.Generator(), num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="not in the prompt"):
        explain(pipe, PROMPT, targets=["zebra"], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="map_scale"):
        explain(pipe, PROMPT, targets=["glasses"], map_scale="row", num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="preview"):
        explain(pipe, PROMPT, targets=["glasses"], preview="noise", num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def saved_model(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd")
    pipe.save_pretrained(path)
    return path


def test_cli_explain(saved_model, tmp_path, capsys):
    out = tmp_path / "ex"
    code = main(["explain", PROMPT, "--targets", "elephant,glasses", "--model", str(saved_model), "--steps", "4",
                 "--steps-shown", "0,2,3", "--preview", "x0", "--out", str(out), "--seed", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    for name in FILES:
        assert (out / name).is_file() and str(out / name) in printed
    assert printed.startswith("elephant: peak attention ")
    assert json.loads((out / "explain.json").read_text())["steps_shown"] == [0, 2, 3]


def test_cli_explain_errors(saved_model, tmp_path, capsys):
    code = main(["explain", PROMPT, "--model", str(saved_model), "--steps", "4", "--steps-shown", "0,x",
                 "--out", str(tmp_path)])
    assert code == 2 and "--steps-shown" in capsys.readouterr().err
    code = main(["explain", PROMPT, "--targets", "zebra", "--model", str(saved_model), "--steps", "4",
                 "--out", str(tmp_path)])
    assert code == 2 and "zebra" in capsys.readouterr().err


def test_explain_sdxl_and_non_square(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from attnreg.testing import tiny_sdxl_pipeline

    ex = explain(tiny_sdxl_pipeline(), "a cat and a dog", targets=["cat", "dog"], seed=1, out=tmp_path / "xl",
                 num_inference_steps=3, preview="x0")
    assert all((tmp_path / "xl" / name).is_file() for name in FILES) and len(ex.diagnosis) == 2
    pipe = tiny_sd_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # no x0: latents shown
    ex = explain(pipe, "a cat and a dog", seed=1, num_inference_steps=3, preview="x0", height=96, width=64)
    assert ex.recorders["regulated"].map(0).shape == (1, 5, 16, 11)  # the image's aspect kept
    assert ex.targets["tokens"] == ["cat", "dog"]  # found by the noun rule
    assert ex.previews["vanilla"][0].size == (64, 96)
