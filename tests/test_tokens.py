"""Targets to token indices with the real CLIP tokenizer."""

import pytest

from attnreg.tokenizer import load_clip_tokenizer
from attnreg.tokens import TargetError, auto_targets, command_line_targets, eos_index, resolve_targets, token_table


@pytest.fixture(scope="module")
def tok():
    return load_clip_tokenizer()


def test_standard_sd_ids(tok):
    assert tok("a cat and a dog").input_ids == [49406, 320, 2368, 537, 320, 1929, 49407]


def test_words_phrases_case(tok):
    assert resolve_targets(tok, "a cat and a dog", ["cat", "dog"]) == [2, 5]
    assert resolve_targets(tok, "A Cat and a DOG", ["cat", "Dog"]) == [2, 5]
    assert resolve_targets(tok, "a teddy bear on a bench", ["teddy bear", "bench"]) == [2, 3, 6]
    # a word split into several tokens gives all of them
    assert resolve_targets(tok, "a hippopotamus in a river", ["hippopotamus"]) == [2, 3, 4]


def test_repeated_words_and_indices(tok):
    prompt = "a cat and a cat and a dog"
    assert resolve_targets(tok, prompt, ["cat"]) == [2]
    assert resolve_targets(tok, prompt, ["cat#2", "dog"]) == [5, 8]
    assert resolve_targets(tok, prompt, [2, 5]) == [2, 5]


def test_unknown_target_lists_tokens(tok):
    with pytest.raises(TargetError, match=r"'bird' is not in the prompt.*1:a 2:cat 3:and 4:a 5:dog"):
        resolve_targets(tok, "a cat and a dog", ["bird"])
    with pytest.raises(TargetError, match="occurs 1 time"):
        resolve_targets(tok, "a cat and a dog", ["cat#2"])
    with pytest.raises(TargetError, match="valid indices are 1..5"):
        resolve_targets(tok, "a cat and a dog", [9])


def test_target_past_truncation(tok):
    prompt = "a " + "very " * 80 + "small dog"
    with pytest.raises(TargetError, match="past the 77-token truncation"):
        resolve_targets(tok, prompt, ["dog"])
    assert eos_index(tok, prompt) == 76
    assert len(token_table(tok, prompt)) == 77


def test_auto_targets_lexical_rule(tok):
    nouns, how = auto_targets("a painting of an elephant with glasses", use_spacy=False)
    assert how == "lexical rule"
    assert nouns == ["painting", "elephant", "glasses"]
    assert auto_targets("a red circle and a blue square", use_spacy=False)[0] == ["circle", "square"]
    nouns, _ = auto_targets("a cat and a cat", use_spacy=False)
    assert resolve_targets(tok, "a cat and a cat", nouns) == [2, 5]


def test_automatic_targets_past_the_truncation_are_dropped_with_a_warning():
    import warnings

    from attnreg import AttentionRegulator
    from attnreg.testing import tiny_sd_pipeline

    reg = AttentionRegulator(tiny_sd_pipeline())
    prompt = "a cat and " + "a very very red " * 20 + "dog"  # "dog" lies past token 77
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = reg.resolve(prompt, None)
    assert info["targets"] == ["cat"] and any("dropped" in str(w.message) and "dog" in str(w.message) for w in caught)


def test_command_line_targets_repeats_and_indices():
    assert command_line_targets("circle,circle") == ["circle", "circle#2"]
    assert command_line_targets("cat#2, cat") == ["cat#2", "cat"]
    assert command_line_targets("circle,circle#2,circle") == ["circle", "circle#2", "circle#3"]
    assert command_line_targets("3,circle") == [3, "circle"]
    assert command_line_targets(None) is None and command_line_targets("") == []


def test_command_line_targets_on_the_command_line(capsys):
    from attnreg.cli import main

    prompt = "a red circle and a blue circle"
    assert main(["tokens", prompt, "--targets", "circle,circle"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "targets: [3, 7]"
    assert main(["tokens", prompt, "--targets", "7"]) == 0  # a token index, as in Python
    assert capsys.readouterr().out.splitlines()[-1] == "targets: [7]"
