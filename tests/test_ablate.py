"""`attnreg ablate` on a tiny saved SD pipeline, the shapes prompts and the shapes detector."""

import json

import pytest

from attnreg.ablate import label, parse_values
from attnreg.cli import main
from attnreg.testing import tiny_sd_pipeline


def test_parse_values():
    assert parse_values("edit_steps", "0,5, 25") == [0, 5, 25]
    assert parse_values("beta", "0,0.09,1e-1") == [0.0, 0.09, 0.1]
    assert parse_values("layers", "down_blocks.2;down_blocks.2,up_blocks.1") == [
        ("down_blocks.2",), ("down_blocks.2", "up_blocks.1")]
    assert label(("down_blocks.2", "up_blocks.1")) == "down_blocks.2+up_blocks.1" and label(0.09) == "0.09"
    for param, text, match in (("iterations", "0", "out of range"), ("edit_steps", "a", "integers"),
                               ("beta", "", "empty"), ("gamma", "1", "unknown --param"), ("edit_steps", "1,1", "repeats")):
        with pytest.raises(ValueError, match=match):
            parse_values(param, text)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd_ablate")
    tiny_sd_pipeline().save_pretrained(path)
    return path


def ablate_argv(saved_model, out, seeds):
    return ["ablate", "--param", "edit_steps", "--values", "0,2", "--dataset", "shapes", "--subsets", "1obj",
            "--limit", "1", "--seeds", seeds, "--model", str(saved_model), "--steps", "3", "--out", str(out),
            "--no-progress"]


def test_cli_ablate(saved_model, tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(ablate_argv(saved_model, out, "0")) == 0
    printed = capsys.readouterr().out
    assert (out / "ablate_edit_steps.png").is_file() and str(out / "ablate_edit_steps.json") in printed
    data = json.loads((out / "ablate_edit_steps.json").read_text())
    assert [r["value"] for r in data["rows"]] == ["sd", "0", "2"]
    assert all(r["n"] == 1 and r["fidelity"]["kind"] == "rate" for r in data["rows"])


def test_cli_ablate_resumes(saved_model, tmp_path):
    out = tmp_path / "abl"
    assert main(ablate_argv(saved_model, out, "0-1")) == 0
    data = json.loads((out / "ablate_edit_steps.json").read_text())
    assert all(r["n"] == 2 for r in data["rows"])
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 6
    mtimes = [p.stat().st_mtime for p in images]
    assert main(ablate_argv(saved_model, out, "0-1")) == 0  # nothing new is generated, the same rows come back
    assert [p.stat().st_mtime for p in sorted((out / "images").rglob("*.png"))] == mtimes
    assert json.loads((out / "ablate_edit_steps.json").read_text())["rows"] == data["rows"]


def test_cli_ablate_bad_values(capsys):
    assert main(["ablate", "--param", "iterations", "--values", "0", "--out", "never-written"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["ablate", "--param", "iterations", "--values", "1"]) == 2  # a sweep names its folder
    assert "--out" in capsys.readouterr().err


def test_figure_tolerates_rounded_interval_bounds():
    from attnreg.ablate import Ablation, figure

    def s(value, low, high):
        return {"kind": "rate", "value": value, "low": low, "high": high, "n": 4}

    rows = [{"value": "sd", "n": 4, "fidelity": s(0.0, 1e-17, 0.5), "seconds": s(1.0, 0.9, 1.1)},
            {"value": "5", "n": 4, "fidelity": s(1.0, 0.5, 1.0 - 1e-17), "seconds": s(1.2, 1.1, 1.3)}]
    assert figure(Ablation("edit_steps", [5], "detect.success", rows)) is not None
