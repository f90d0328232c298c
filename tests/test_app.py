"""`attnreg app` without a browser: the page's callbacks (attnreg.app.logic) as plain calls on the
embedded model, and the sub-command's options. The page itself: tests/test_app_browser.py."""

import argparse
import threading

import numpy as np
import pytest

from attnreg.app.logic import (
    EMBEDDED_EXAMPLES, MAX_IMAGES, Engine, InputError, Stopped, numbers_table, parse_targets, verdict,
)
from attnreg.regulator import GuidanceError
from attnreg.tokens import TargetError

DEMO = "a red circle and a blue square"
FEW_STEPS = 6


@pytest.fixture(scope="module")
def engine():
    return Engine.load(None)  # the embedded model


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# -- as the user types ------------------------------------------------------------------------------
def test_parse_targets():
    assert parse_targets(" circle , square,, ") == ["circle", "square"]
    assert parse_targets("") is None and parse_targets(None) is None and parse_targets(" , ") is None


def test_suggested_targets_are_the_nouns(engine):
    assert engine.suggest_targets(DEMO) == ["circle", "square"]
    assert engine.suggest_targets("a white square, a red triangle and a blue circle") == ["square", "triangle", "circle"]
    assert engine.suggest_targets("a red circle and a red circle") == ["circle", "circle#2"]
    assert engine.suggest_targets("   ") == []


def test_token_table_marks_what_each_target_becomes(engine):
    rows, note = engine.token_rows(DEMO, "")  # empty: the suggestions
    assert [r[0] for r in rows] == list(range(9))
    assert [r[1] for r in rows[1:-1]] == "a red circle and a blue square".split()
    assert {r[1]: r[2] for r in rows if r[2]} == {"circle": "circle", "square": "square"}
    assert "circle → 3:circle" in note and "square → 7:square" in note

    rows, note = engine.token_rows(DEMO, "blue square")  # a phrase: both of its tokens
    assert [r[0] for r in rows if r[2] == "blue square"] == [6, 7]

    rows, note = engine.token_rows("a teddybear", "teddybear")  # one word, several BPE tokens
    marked = [r for r in rows if r[2]]
    assert len(marked) >= 2 and "".join(r[1] for r in marked) == "teddybear"


def test_token_table_names_an_unknown_target(engine):
    rows, note = engine.token_rows(DEMO, "circle, dog")
    assert note.startswith("Problem:") and "'dog' is not in the prompt" in note and "7:square" in note
    assert [r[2] for r in rows if r[2]] == ["circle"]


# -- errors, as the page shows them ----------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    (dict(prompt="   "), "prompt is empty"),
    (dict(guidance=1), "Guidance must be > 1"),
    (dict(guidance=0.5), "Guidance must be > 1"),
    (dict(guidance="lots"), "Guidance must be a number"),
    (dict(guidance=None), "Guidance must be a number"),
    (dict(steps=0), "Steps must be a whole number from 1"),
    (dict(steps=2.5), "Steps must be a whole number"),
    (dict(seed=-1), "Seed must be a whole number from 0"),
    (dict(seed=None), "Seed must be a whole number"),
    (dict(n_images=MAX_IMAGES + 1), "Number of images must be a whole number from 1 to 4"),
    (dict(preset="fast"), "Preset must be one of auto, paper"),
])
def test_bad_values_give_one_readable_sentence(engine, change, words):
    values = dict(prompt=DEMO, targets_text="", seed=42, steps=FEW_STEPS, guidance=7.5, preset="auto", n_images=1)
    values.update(change)
    with pytest.raises(InputError) as err:
        engine.generate(**values)
    assert words in str(err.value)
    assert "Traceback" not in str(err.value)


def test_unknown_target_lists_the_tokens(engine):
    with pytest.raises(TargetError) as err:
        engine.generate(DEMO, "circle, dog", 42, FEW_STEPS, 7.5, "auto", 1)
    assert "'dog' is not in the prompt" in str(err.value) and "3:circle" in str(err.value)


def test_a_prompt_without_nouns_asks_for_targets(engine):
    with pytest.raises(InputError, match="No target found"):
        engine.generate("a, the", "", 0, FEW_STEPS, 7.5, "auto", 1)


def test_the_library_guidance_error_is_a_value_error():
    # the page shows every ValueError's message as it is: the library's own errors must stay ValueErrors
    assert issubclass(GuidanceError, ValueError) and issubclass(TargetError, ValueError)


# -- the run ---------------------------------------------------------------------------------------
def test_generate_two_pairs_with_maps_numbers_and_verdicts(engine):
    seen = []
    result = engine.generate(DEMO, "circle, square", 42, FEW_STEPS, 7.5, "auto", 2,
                             progress=lambda done, total, what: seen.append((done, total, what)))
    assert [p.seed for p in result.pairs] == [42, 43]
    for pair in result.pairs:
        assert pair.original.size == pair.regulated.size == (64, 64)
        assert np.abs(pixels(pair.original) - pixels(pair.regulated)).max() > 50  # regulation changed the image
        assert set(pair.verdicts) == {"original", "regulated"}
    assert np.abs(pixels(result.pairs[0].regulated) - pixels(result.pairs[1].regulated)).max() > 50  # seeds differ
    # progress: every UNet step of the four runs, in order
    assert [d for d, _, _ in seen] == list(range(4 * FEW_STEPS)) and {t for _, t, _ in seen} == {4 * FEW_STEPS}
    assert "pair 2 of 2 (seed 43)" in seen[-1][2]
    # the maps (explain's figure) and its numbers
    assert result.maps.width > 400 and result.maps.height > 400
    assert result.targets["indices"] == [3, 7] and result.targets["source"] == "given"
    assert result.numbers["targets"]["words"] == ["circle", "square"]
    assert len(result.table) == 2 * 7 and all(len(row) == len(result.table_headers) for row in result.table)
    targets = {(row[0], row[2]) for row in result.table if row[3] == "yes"}
    assert targets == {(run, w) for run in ("original", "regulated") for w in ("circle", "square")}
    assert len(result.diagnosis) == 2 and result.diagnosis[0].startswith("circle:")


def test_pair_one_is_explains_pair_and_later_pairs_match_their_seed(engine):
    """Pair k of a run with n images is what a run with one image and seed + k gives."""
    two = engine.generate(DEMO, "", 42, FEW_STEPS, 7.5, "auto", 2)
    one = engine.generate(DEMO, "", 43, FEW_STEPS, 7.5, "auto", 1)
    for kind in ("original", "regulated"):
        a, b = getattr(two.pairs[1], kind), getattr(one.pairs[0], kind)
        assert np.abs(pixels(a) - pixels(b)).max() <= 1, kind


def test_stop_ends_the_run_and_the_next_run_is_unchanged(engine):
    stop = threading.Event()

    def press_stop(done, total, what):
        if done == 3:
            stop.set()

    before = engine.generate(DEMO, "", 7, FEW_STEPS, 7.5, "auto", 1)
    with pytest.raises(Stopped) as err:
        engine.generate(DEMO, "", 7, FEW_STEPS, 7.5, "auto", 1, progress=press_stop, stop=stop)
    assert err.value.done == 4 and err.value.total == 2 * FEW_STEPS
    assert not engine.lock.locked()
    assert len(engine.pipe.unet._forward_pre_hooks) == 0  # the watch is gone
    after = engine.generate(DEMO, "", 7, FEW_STEPS, 7.5, "auto", 1)
    for kind in ("original", "regulated"):
        assert np.array_equal(pixels(getattr(before.pairs[0], kind)), pixels(getattr(after.pairs[0], kind)))


def test_the_first_example_fixes_the_missing_circle(engine):
    """The page's first example as it runs there (50 steps, guidance 7.5, auto): the plain model draws a
    red square, the regulated run the red circle (the README's demo)."""
    prompt, targets, seed = EMBEDDED_EXAMPLES[0]
    assert engine.default_steps == 50
    result = engine.generate(prompt, targets, seed, engine.default_steps, 7.5, "auto", 1)
    original, regulated = result.pairs[0].verdicts["original"], result.pairs[0].verdicts["regulated"]
    assert original.success is False and original.missing == ["red circle"] and "red square" in original.found
    assert regulated.success is True and sorted(regulated.found) == ["blue square", "red circle"]
    assert regulated.markdown.startswith("**RIGHT**") and original.markdown.startswith("**WRONG**")


@pytest.mark.slow
@pytest.mark.parametrize("example, outcome", list(zip(EMBEDDED_EXAMPLES, [(False, True), (False, True), (True, True), (False, False)])))
def test_every_example_is_as_its_comment_says(engine, example, outcome):
    """(original right, regulated right) for each of the page's examples, as run there (50 steps)."""
    prompt, targets, seed = example
    pair = engine.generate(prompt, targets, seed, engine.default_steps, 7.5, "auto", 1).pairs[0]
    assert (pair.verdicts["original"].success, pair.verdicts["regulated"].success) == outcome


# -- the detector's verdict ------------------------------------------------------------------------
def test_verdict_on_rendered_scenes():
    from attnreg.toy.world import Obj, render

    image = render([Obj("circle", "red", 6, 6, 20), Obj("square", "blue", 36, 36, 20)])
    good = verdict(DEMO, image)
    assert good.success is True and good.missing == [] and sorted(good.found) == ["blue square", "red circle"]
    assert good.text.startswith("right: ")
    bad = verdict("a red circle and a green triangle", image)
    assert bad.success is False and bad.missing == ["green triangle"]
    assert bad.text == "wrong: detector found red circle, blue square; missing green triangle"
    uncoloured = verdict("a square and a triangle", image)
    assert uncoloured.missing == ["a triangle"]
    extra = verdict("a red circle", image)
    assert extra.success is True and extra.extra == 1 and "1 extra object" in extra.text
    unknown = verdict("a cat", image)
    assert unknown.success is None and "names no circle" in unknown.text


def test_numbers_table_reads_explain_json():
    numbers = {"violin_steps": [0, 2], "runs": {
        "vanilla": {"steps": [0, 1, 2, 3], "tokens": [
            {"index": 3, "token": "circle", "target": True, "max": [0.1, 0.2, 0.3, 0.4], "mean": [0.01, 0.02, 0.03, 0.04]}]},
        "regulated": {"steps": [0, 1, 2, 3], "tokens": [
            {"index": 3, "token": "circle", "target": True, "max": [0.5, 0.6, 0.7, 0.8], "mean": [0.1, 0.1, 0.1, 0.1]}]},
    }}
    headers, rows = numbers_table(numbers)
    assert headers[4:7] == ["peak @ step 0", "peak @ step 2", "peak @ last step"]
    assert rows == [["original", 3, "circle", "yes", 0.1, 0.3, 0.4, 0.025],
                    ["regulated", 3, "circle", "yes", 0.5, 0.7, 0.8, 0.1]]


# -- the sub-command ---------------------------------------------------------------------------------
def app_parser():
    from attnreg.commands.app import cmd_app, register

    parser = argparse.ArgumentParser(prog="attnreg", exit_on_error=False)
    register(parser.add_subparsers(dest="command"))
    return parser, cmd_app


def test_app_options_default_to_localhost_and_the_embedded_model():
    from attnreg.commands.common import fill_sampler_defaults

    parser, cmd_app = app_parser()
    args = parser.parse_args(["app"])
    fill_sampler_defaults(args)  # as `attnreg` does after parsing: the embedded model's own 50 steps, guidance 7.5
    assert (args.host, args.port, args.model, args.device, args.steps, args.guidance, args.threads) == (
        "127.0.0.1", 7860, None, "cpu", 50, 7.5, 1)
    assert args.func is cmd_app
    args = parser.parse_args(["app", "--host", "0.0.0.0", "--port", "8000", "--steps", "20"])
    assert (args.host, args.port, args.steps) == ("0.0.0.0", 8000, 20)


@pytest.mark.parametrize("argv", [["app", "--port", "0"], ["app", "--port", "70000"], ["app", "--steps", "x"]])
def test_app_rejects_bad_options(argv, capsys):
    parser, _ = app_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(argv)


def test_the_cli_lists_the_app_command():
    from attnreg.cli import build_parser

    args = build_parser().parse_args(["app", "--port", "7999"])
    assert args.port == 7999 and args.func.__module__ == "attnreg.commands.app"


def test_a_busy_port_is_named_before_the_model_loads(capsys):
    import socket

    from attnreg.cli import main

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert main(["app", "--port", str(port)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"attnreg: error: port {port} on 127.0.0.1 is in use (another attnreg app?); choose another with --port, "
            f"e.g. --port {port + 1}")
        assert main(["app", "--host", "0.0.0.0", "--port", str(port)]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("attnreg app: warning: --host 0.0.0.0 opens the page to the network without a login")
    assert f"port {port} on 0.0.0.0 is in use" in error


def test_only_a_loopback_host_starts_without_a_warning():
    from attnreg.commands.app import open_to_network_warning

    assert open_to_network_warning("127.0.0.1", 7860) is None and open_to_network_warning("localhost", 7860) is None
    assert "without a login" in open_to_network_warning("0.0.0.0", 7860)
    assert "without a login" in open_to_network_warning("::", 7860)


def test_the_app_runs_on_an_mmdit_pipeline():
    """The page's run on an SD3 pipeline (the tiny config): progress counts the transformer's steps, the maps
    are drawn, and the regulated image differs."""
    from attnreg.testing.mmdit import tiny_sd3_pipeline

    engine = Engine(tiny_sd3_pipeline(t5=False), embedded=False, default_steps=4)
    seen = []
    result = engine.generate(DEMO, "circle, square", 1, 3, 5.0, "paper", 1,
                             progress=lambda done, total, what: seen.append(done))
    assert seen == list(range(2 * 3))
    assert result.maps.width > 100 and result.targets["indices"] == [3, 7]
    pair = result.pairs[0]
    assert np.abs(pixels(pair.original) - pixels(pair.regulated)).max() > 0
