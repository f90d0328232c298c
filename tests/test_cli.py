"""The command line's documented examples, on a tiny pipeline saved to a local folder."""

import json
from pathlib import Path

import pytest
from PIL import Image

from attnreg import RegulationConfig
from attnreg.cli import main
from attnreg.files import prompt_stem as slug
from attnreg.testing import tiny_sd_pipeline


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path)
    return str(path)


def test_tokens_prints_table_and_targets(capsys):
    assert main(["tokens", "a teddy bear and a cat", "--targets", "teddy bear,cat"]) == 0
    out = capsys.readouterr().out
    assert "    2  teddy" in out and "    6  cat" in out
    assert "targets: [2, 3, 6]" in out


def test_tokens_with_model_tokenizer(tiny_model, capsys):
    assert main(["tokens", "a cat and a dog", "--model", tiny_model]) == 0
    assert "    5  dog" in capsys.readouterr().out


def test_generate_compare_writes_predictable_files(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "a cat and a dog", "--targets", "cat,dog", "--model", tiny_model, "--steps", "4",
                 "--seed", "3", "--out", str(out), "--compare", "--preset", "paper"])
    assert code == 0

    stem = f"{slug('a cat and a dog')}_seed3"
    assert stem.startswith("a-cat-and-a-dog-") and len(stem) == len("a-cat-and-a-dog-123456_seed3")
    printed = capsys.readouterr().out.split()
    expected = [out / f"{stem}_attnreg.png", out / f"{stem}_original.png", out / f"{stem}_compare.png", out / f"{stem}.json"]
    assert printed == [str(p) for p in expected]
    regulated, original = Image.open(expected[0]), Image.open(expected[1])
    assert regulated.size == original.size == (64, 64)
    assert regulated.tobytes() != original.tobytes()
    compare = Image.open(expected[2])
    assert compare.width > 2 * 64 * 4 - 1  # both images, upscaled, side by side
    record = json.loads(expected[3].read_text())
    assert record["targets"]["indices"] == [2, 5] and record["config"]["delta"] == 80.0
    assert record["edited_layers"] and all(name.endswith("attn2") for name in record["edited_layers"])


def test_generate_defaults_to_the_auto_preset(tiny_model, tmp_path, capsys):
    assert main(["generate", "a cat and a dog", "--model", tiny_model, "--steps", "2", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["config"]["preset"] == "auto" and record["config"]["loss"] == "relative"
    assert record["config"] == {**RegulationConfig().to_dict(), "layers": record["config"]["layers"]}


def test_removed_exact_flag_says_what_replaces_it(tiny_model, tmp_path, capsys):
    assert main(["generate", "a cat and a dog", "--model", tiny_model, "--steps", "2", "--exact", "--out",
                 str(tmp_path)]) == 2
    assert "--exact was removed" in capsys.readouterr().err and not list(tmp_path.glob("*.png"))


def test_generate_set_overrides_any_config_field(tiny_model, tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["generate", "a red cat and a blue dog", "--model", tiny_model, "--steps", "2", "--set", "binding=0",
                 "--set", "neglect_ratio=null", "--set", "layers=[\"mid_block\"]", "--out", str(out)]) == 0
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["config"]["binding"] == 0 and record["config"]["neglect_ratio"] is None
    assert record["config"]["layers"] == ["mid_block"] and record["config"]["concentration"] == 2.0
    for bad, says in [("bindng=0", "unknown option(s) bindng; valid: binding,"), ("binding", "use OPTION=VALUE"),
                      ("binding=-1", "binding=-1 must be >= 0")]:
        assert main(["generate", "a cat", "--model", tiny_model, "--set", bad, "--out", str(tmp_path / "bad")]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_generate_bad_target_is_a_clear_error(tiny_model, tmp_path, capsys):
    code = main(["generate", "a cat and a dog", "--targets", "bird", "--model", tiny_model, "--steps", "2",
                 "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "'bird' is not in the prompt" in err and "2:cat" in err
    assert list(tmp_path.iterdir()) == []


def test_generate_unknown_layer_and_preset(tiny_model, tmp_path, capsys):
    assert main(["generate", "a cat", "--model", tiny_model, "--layers", "down_blocks.5", "--out", str(tmp_path)]) == 2
    assert "valid blocks: down_blocks.1, mid_block, up_blocks.0" in capsys.readouterr().err
    assert main(["generate", "a cat", "--model", tiny_model, "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "valid presets: auto, paper" in capsys.readouterr().err


def test_calibrate_prints_the_layers_and_writes_attnreg_json(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat and a dog\n\na red apple and a green bowl\n")
    assert main(["calibrate", "--model", tiny_model, "--prompts", str(prompts), "--seeds", "0", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    spec = json.loads((Path(tiny_model) / "attnreg.json").read_text())
    assert spec["calibration"]["prompts"] == ["a cat and a dog", "a red apple and a green bowl"]
    for layer in spec["calibration"]["layers"]:
        assert f"* {layer}" in out
    assert main(["calibrate", "--model", tiny_model, "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_names_never_collide():

    assert slug("a 🐱 and a 🐶") != slug("a 🐶 and a 🐱")
    assert slug("ein roter Kreis über einem Würfel").startswith("ein-roter-kreis-über-einem-würfel-")
    long = "a red circle " * 10
    assert slug(long + "and a blue square") != slug(long + "and a green square")


def test_version_and_interrupt(tiny_model, tmp_path, capsys, monkeypatch):
    from attnreg import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"attnreg {__version__}"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises while the model loads

    monkeypatch.setattr("attnreg.pipelines.load_pipeline", interrupted)
    assert main(["generate", "a cat", "--model", tiny_model, "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "attnreg: interrupted; nothing was written"


def test_an_unreachable_or_unknown_hub_id_fails_at_once(tmp_path, capsys):
    assert main(["generate", "a cat", "--model", "attnreg-test/no-such-model", "--out", str(tmp_path)]) == 2
    assert main(["tokens", "a cat", "--model", "attnreg-test/no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("pass a local folder" in line for line in err)
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("part,damage", [
    ("unet/diffusion_pytorch_model.safetensors", lambda b: b[: len(b) // 2]),  # a copy cut short
    ("vae/diffusion_pytorch_model.safetensors", lambda b: b""),
    ("unet/config.json", lambda b: b"{not json"),
])
def test_a_damaged_local_model_names_the_file(tiny_model, tmp_path, capsys, part, damage):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / part).write_bytes(damage((model / part).read_bytes()))
    assert main(["generate", "a cat", "--model", str(model), "--steps", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("attnreg: error: could not load the pipeline folder") and str(model / part) in err
    assert "hub" not in err
    assert not list(tmp_path.rglob("*.png"))


def test_a_failed_image_write_names_the_file_and_leaves_none(tiny_model, tmp_path):
    # A real write error: the child process may write files of at most 4 KiB (RLIMIT_FSIZE), less than a PNG.
    import os
    import resource
    import signal
    import subprocess
    import sys

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "attnreg.cli", "generate", "a cat and a dog", "--model", tiny_model,
                           "--steps", "1", "--preset", "paper", "--out", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300, preexec_fn=small_files)
    image = out / f"{slug('a cat and a dog')}_seed42_attnreg.png"
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"attnreg: error: cannot write {image}: File too large"
    assert list(out.iterdir()) == []  # neither the image, nor its temporary file, nor a JSON


def test_generate_prints_only_its_own_lines(tiny_model, tmp_path):
    # A fresh process: the libraries' one-time notices ("requires torchvision") and loading bars would
    # show there, and nowhere else.
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "attnreg.cli", "generate", "a cat and a dog", "--model", tiny_model,
                           "--steps", "1", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert all(line.startswith("attnreg: ") for line in done.stderr.splitlines()), done.stderr  # e.g. calibrating
    *notes, image, record = done.stdout.splitlines()
    assert all(line.startswith("attnreg: ") for line in notes), done.stdout  # the automatic targets
    assert [Path(image).name, Path(record).name] == [
        f"{slug('a cat and a dog')}_seed42_attnreg.png", f"{slug('a cat and a dog')}_seed42.json"]


def _record(out):
    return json.loads(next(Path(out).glob("*.json")).read_text())


def test_generate_record_says_how_to_make_the_image_again(tiny_model, tmp_path, capsys):
    import dataclasses

    import torch

    from attnreg.config import RegulationConfig

    run = ["generate", "a cat and a dog", "--model", tiny_model, "--steps", "1", "--seed", "5"]
    assert main(run + ["--out", str(tmp_path / "a")]) == 0
    record = _record(tmp_path / "a")
    assert set(record["config"]) == {f.name for f in dataclasses.fields(RegulationConfig)} | {"preset"}  # every field
    assert record["versions"]["attnreg"] and record["versions"]["diffusers"] and record["versions"]["transformers"]
    assert record["versions"]["torch"] == __import__("importlib.metadata").metadata.version("torch")
    assert record["model_source"] == str(Path(tiny_model).resolve()) and record["warnings"] == []
    assert (record["device"], record["dtype"], record["threads"]) == ("cpu", "float32", torch.get_num_threads())
    strict = next((tmp_path / "a").glob("*.json")).read_text()
    json.loads(strict, parse_constant=lambda name: pytest.fail(f"not strict JSON: {name}"))

    assert main(run + ["--dtype", "bfloat16", "--out", str(tmp_path / "b")]) == 0
    other = _record(tmp_path / "b")
    assert other["dtype"] == "bfloat16"
    assert {k for k in record if record[k] != other[k]} == {"dtype"}

    before = torch.get_num_threads()
    try:
        assert main(run + ["--threads", str(before + 1), "--out", str(tmp_path / "c")]) == 0
    finally:
        torch.set_num_threads(before)
    other = _record(tmp_path / "c")
    assert other["threads"] == before + 1
    assert {k for k in record if record[k] != other[k]} == {"threads"}


def test_a_regulator_with_no_layer_says_so(tiny_model, tmp_path, capsys):
    import shutil

    from attnreg.modelspec import CALIBRATION_VERSION

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "attnreg.json").write_text(json.dumps({"calibration": {"version": CALIBRATION_VERSION, "layers": []}}))
    with pytest.warns(UserWarning, match="no layer to edit"):
        assert main(["generate", "a cat and a dog", "--model", str(model), "--steps", "1",
                     "--out", str(tmp_path / "out")]) == 0
    record = _record(tmp_path / "out")
    assert record["edited_layers"] == [] and record["warnings"] and "no layer to edit" in record["warnings"][0]


def _subcommands():
    import argparse

    from attnreg.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_of_every_subcommand_has_help():
    import argparse

    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, parser in _subcommands().items()
               for a in parser._actions if not isinstance(a, argparse._HelpAction) and a.help in (None, "", argparse.SUPPRESS)]
    assert missing == []


def test_threads_means_the_same_in_every_subcommand():
    having = {name: next(a for a in parser._actions if "--threads" in a.option_strings)
              for name, parser in _subcommands().items() if "--threads" in parser._option_string_actions}
    assert set(having) >= {"generate", "explain", "calibrate", "bench", "ablate", "app"}
    assert all(a.default == 1 and "default: 1 in every sub-command" in a.help for a in having.values())


def test_image_k_of_n_is_the_image_of_seed_plus_k_alone(tiny_model, tmp_path, capsys):
    run = ["generate", "a cat and a dog", "--model", tiny_model, "--steps", "2", "--compare"]
    assert main(run + ["--seed", "3", "-n", "2", "--out", str(tmp_path / "two")]) == 0
    assert main(run + ["--seed", "4", "--out", str(tmp_path / "one")]) == 0
    stem = slug("a cat and a dog")
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == sorted(f"{stem}_seed{s}{end}" for s in (3, 4)
                           for end in ("_attnreg.png", "_original.png", "_compare.png", ".json"))
    for end in ("_attnreg.png", "_original.png"):
        alone, in_two = (Image.open(tmp_path / d / f"{stem}_seed4{end}") for d in ("one", "two"))
        assert alone.tobytes() == in_two.tobytes()
    assert Image.open(tmp_path / "two" / f"{stem}_seed3_attnreg.png").tobytes() != alone.tobytes()
    assert [_record_of(tmp_path / "two" / f"{stem}_seed{s}.json")["seed"] for s in (3, 4)] == [3, 4]


def _record_of(path):
    return json.loads(Path(path).read_text())


@pytest.mark.parametrize("quiet", [False, True])
def test_generate_shows_a_progress_bar_on_a_terminal_only(tiny_model, tmp_path, quiet):
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    parent, child = pty.openpty()  # standard error is a terminal (80 columns); standard output a pipe
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    argv = [sys.executable, "-m", "attnreg.cli", "generate", "a cat and a dog", "--model", tiny_model, "--steps", "2",
            "--preset", "paper", "--out", str(tmp_path)] + (["--quiet"] if quiet else [])
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=child, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.close(child)
    terminal = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # the terminal is closed and read to its end
            break
        if not chunk:
            break
        terminal += chunk
    os.close(parent)
    assert done.returncode == 0
    assert ("attnreg generate: " in terminal.decode(errors="replace")) is not quiet
    assert "%|" not in done.stdout and [Path(line).suffix for line in done.stdout.splitlines()[-2:]] == [".png", ".json"]


@pytest.mark.parametrize("command", ["generate", "explain", "ablate", "bench", "calibrate", "app"])
def test_steps_and_guidance_left_out_are_the_models_own(command, tmp_path):
    from attnreg.cli import build_parser
    from attnreg.commands.common import fill_sampler_defaults
    from attnreg.options import DEFAULT_GUIDANCE, DEFAULT_STEPS

    own = tmp_path / "own"
    own.mkdir()
    (own / "attnreg.json").write_text(json.dumps({"num_inference_steps": 28, "guidance_scale": 3.0}))
    plain = tmp_path / "plain"
    plain.mkdir()
    parser = build_parser()
    positional = {"generate": ["a cat"], "explain": ["a cat"], "ablate": ["--param", "iterations", "--values", "1,2", "--out", "o"],
                  "bench": ["--dataset", "shapes", "--out", "o"]}
    given = positional.get(command, [])

    def parsed(*extra):
        args = parser.parse_args([command, *given, *extra])
        fill_sampler_defaults(args)
        return args.steps, args.guidance

    assert parsed("--model", str(own)) == (28, 3.0)
    assert parsed("--model", str(plain)) == (DEFAULT_STEPS, DEFAULT_GUIDANCE)
    assert parsed("--model", str(own), "--steps", "7", "--guidance", "5") == (7, 5.0)
