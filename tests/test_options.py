"""Option values parsed by their declared type: booleans, finite numbers, names, seeds."""

import pytest

from attnreg import RegulationConfig
from attnreg.commands.common import regulation_config
from attnreg.options import OptionError, config_options, parse_bool, parse_seed, parse_seeds


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("YES", True), ("1", True),
                                        ("false", False), ("False", False), ("no", False), ("0", False)])
def test_booleans_in_any_case(text, value):
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["maybe", "", "2", "t", "on"])
def test_anything_else_is_not_a_boolean(text):
    with pytest.raises(OptionError, match="boolean"):
        parse_bool(text)


def test_set_values_take_their_fields_types():
    values = config_options(["restore_special=False", "binding=2", "lift=1.5", "neglect_ratio=null", "edit_steps=3",
                             "layers=down_blocks.1,up_blocks.0", "loss=relative"])
    assert values == {"restore_special": False, "binding": 2, "lift": 1.5, "neglect_ratio": None, "edit_steps": 3,
                      "layers": ("down_blocks.1", "up_blocks.0"), "loss": "relative"}
    assert type(values["binding"]) is int  # as its JSON was: configurations hashed before keep their names
    assert config_options(['layers=["mid_block"]']) == {"layers": ("mid_block",)}


@pytest.mark.parametrize("pair,says", [
    ("text_units=maybe", "text_units takes a boolean (true/false, 1/0, yes/no), got 'maybe'"),
    ("fast=false", "option fast was removed: the relative loss has one solver (the scheduled one); --preset paper "
                   "gives the release's solver"),
    ("binding=abc", "binding takes a finite number, got 'abc'"),
    ("lr=nan", "lr takes a finite number, got 'nan'"),
    ("decay=-inf", "decay takes a finite number, got '-inf'"),
    ("iterations=2.5", "iterations takes an integer, got '2.5'"),
    ("neglect_ratio=x", "neglect_ratio takes a finite number or null, got 'x'"),
    ("preset=paper", "preset is not an option; choose the preset with --preset"),
])
def test_ill_typed_values_name_field_value_and_type(pair, says):
    with pytest.raises(OptionError) as err:
        config_options([pair])
    assert str(err.value) == f"--set {pair}: {says}"


def test_the_command_lines_config_is_the_typed_one():
    class Args:
        preset, layers, edit_steps, exact, compile = "auto", None, None, False, "auto"
        options = ["restore_special=False", "binding=0"]

    config = regulation_config(Args)
    assert config.restore_special is False and config.binding == 0.0 and config.preset == "custom"
    assert config == RegulationConfig(restore_special=False, binding=0.0)


def test_seeds_one_parser():
    assert parse_seeds("0-3,10,2") == [0, 1, 2, 3, 10]
    assert parse_seeds([4, 5]) == [4, 5] and parse_seeds(7) == [7]
    assert parse_seeds(f"{2**64 - 2}-{2**64 - 1}") == [2**64 - 2, 2**64 - 1]
    for bad, says in [("5-1", "runs backwards"), ("x", "use e.g. 0-63"), ("-3", "use e.g. 0-63"),
                      (str(2**64), "0..18446744073709551615"), ("0-99999999", "more than 1,000,000"), (",", "no seeds")]:
        with pytest.raises(OptionError, match=says):
            parse_seeds(bad)
    assert parse_seed(str(2**64 - 1)) == 2**64 - 1
    with pytest.raises(OptionError, match="not a seed"):
        parse_seed(str(2**64))
