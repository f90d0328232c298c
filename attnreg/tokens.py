"""Targets: from words or phrases to the prompt's token indices, with the pipeline's own tokenizer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .options import split_list


class TargetError(ValueError):
    """A target that cannot be found among the prompt's tokens."""


@dataclass(frozen=True)
class Token:
    index: int  # position in the 77-token sequence (0 = SOS)
    text: str  # the BPE token, "</w>" stripped


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids with SOS and EOS, not truncated and not padded."""
    return tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids


def token_table(tokenizer, prompt: str) -> list[Token]:
    """Every token the text encoder sees (SOS .. first EOS), as the pipeline truncates them."""
    ids = prompt_ids(tokenizer, prompt)[: tokenizer.model_max_length]
    if ids[-1] != tokenizer.eos_token_id:
        ids[-1] = tokenizer.eos_token_id  # truncation keeps the EOS in the last slot
    return [Token(i, _clean(tokenizer.convert_ids_to_tokens(t))) for i, t in enumerate(ids)]


def eos_index(tokenizer, prompt: str) -> int:
    """Index of the first EOS token (the release restores its probability after editing)."""
    return len(token_table(tokenizer, prompt)) - 1


def format_tokens(tokens: list[Token]) -> str:
    return " ".join(f"{t.index}:{t.text}" for t in tokens)


def _clean(token: str) -> str:
    return token.replace("</w>", "")


_OCCURRENCE = re.compile(r"^(.*?)#(\d+)$")


def resolve_targets(tokenizer, prompt: str, targets: list[str | int]) -> list[int]:
    """Token indices of every sub-token of every target, in order, without duplicates.

    A target is a word or phrase ("dog", "teddy bear", "Photographers"), matched as a contiguous run of
    the prompt's tokens with the tokenizer's own normalisation (CLIP lower-cases), so words split into
    several tokens give all of them; "cat#2" picks the second "cat"; an int is a token index itself.
    """
    ids = prompt_ids(tokenizer, prompt)
    limit = tokenizer.model_max_length - 1  # the last slot holds EOS after truncation
    table = token_table(tokenizer, prompt)
    found: list[int] = []
    for target in targets:
        if isinstance(target, int):
            if not 1 <= target < len(table) - 1:
                raise TargetError(
                    f"target index {target} is not a word token of {prompt!r}; "
                    f"valid indices are 1..{len(table) - 2}: {format_tokens(table)}"
                )
            indices = [target]
        else:
            indices = find_phrase(tokenizer, ids, prompt, str(target), table, (1, len(ids) - 1))  # SOS and EOS out
            if indices[-1] >= limit:
                raise TargetError(
                    f"target {target!r} is at token {indices[0]} of {prompt!r}, past the "
                    f"{tokenizer.model_max_length}-token truncation; the text encoder only sees: {format_tokens(table)}"
                )
        found += [i for i in indices if i not in found]
    return found


def command_line_targets(text: str | None) -> list[str | int] | None:
    """--targets as typed, as `resolve_targets` takes them: comma-separated words or phrases, a number is a
    token index (as in Python), and a word named again means its next occurrence ("circle,circle" ->
    circle, circle#2; "cat#2,cat" -> cat#2, cat). None stays None (not given)."""
    if text is None:
        return None
    parts = split_list(text)
    taken: dict[str, set[int]] = {}
    for part in parts:  # occurrences named with #N are taken first, whatever their place
        match = _OCCURRENCE.match(part)
        if match:
            taken.setdefault(_word_key(match.group(1)), set()).add(int(match.group(2)))
    out: list[str | int] = []
    for part in parts:
        if part.isdigit():
            out.append(int(part))
            continue
        if _OCCURRENCE.match(part):
            out.append(part)
            continue
        used = taken.setdefault(_word_key(part), set())
        n = next(k for k in range(1, len(parts) + len(used) + 2) if k not in used)
        used.add(n)
        out.append(part if n == 1 else f"{part}#{n}")
    return out


def _word_key(text: str) -> str:
    return " ".join(text.lower().split())


def find_phrase(tokenizer, ids: list[int], prompt: str, target: str, table: list[Token], span: tuple[int, int],
                label: str = "tokens") -> list[int]:
    """The indices of `target` (a word or phrase, "cat#2" its second occurrence) as a contiguous run of the
    prompt's token `ids` within `span` (first, end), tokenised by `tokenizer`; a TargetError showing `table`
    (the prompt's `label`) when it is empty or not there."""
    text, occurrence = target.strip(), 1
    match = _OCCURRENCE.match(text)
    if match:
        text, occurrence = match.group(1).strip(), int(match.group(2))
    sub = tokenizer(text, add_special_tokens=False).input_ids if text else []
    if not sub:
        raise TargetError(f"empty target {target!r}; the prompt's {label} are: {format_tokens(table)}")
    first, end = span
    starts = [i for i in range(first, end - len(sub) + 1) if ids[i : i + len(sub)] == sub]
    if len(starts) < occurrence:
        where = "" if not starts else f" (it occurs {len(starts)} time(s))"
        raise TargetError(
            f"target {target!r} is not in the prompt {prompt!r}{where}; its {label} are: {format_tokens(table)}"
        )
    start = starts[occurrence - 1]
    return list(range(start, start + len(sub)))


# A documented lexical rule for when spaCy is not installed: split the prompt into phrases at
# conjunctions, prepositions and punctuation, and take the last content word of each phrase
# ("a painting of an elephant with glasses" -> painting, elephant, glasses).
_SPLIT_WORDS = (
    "and|with|without|on|in|inside|of|at|near|beside|behind|under|over|above|below|next to|by|"
    "from|for|to|into|onto|holding|wearing|while|or|then|than"
)
_SPLIT = re.compile(rf"[,;.:!?()]|\b(?:{_SPLIT_WORDS})\b", re.IGNORECASE)
_STOP = set(
    "a an the one two three four five some many several this that these those his her its their my our "
    "your is are was were be very big small large little tiny huge".split()
)


def _lexical_nouns(prompt: str) -> list[str]:
    nouns = []
    for phrase in _SPLIT.split(prompt):
        words = [w for w in re.findall(r"[A-Za-z][A-Za-z'-]*", phrase or "") if w.lower() not in _STOP]
        if words:
            nouns.append(words[-1])
    return nouns


@lru_cache(maxsize=1)
def _spacy_model():
    try:
        import spacy
    except ImportError:
        return None
    for name in ("en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf"):
        try:
            return spacy.load(name)
        except OSError:
            continue
    return None


def auto_targets(prompt: str, use_spacy: bool = True) -> tuple[list[str], str]:
    """The prompt's nouns and how they were found ("spacy" or "lexical rule")."""
    nlp = _spacy_model() if use_spacy else None
    if nlp is not None:
        nouns = [t.text for t in nlp(prompt) if t.pos_ in ("NOUN", "PROPN")]
        return _number_repeats(nouns), "spacy"
    return _number_repeats(_lexical_nouns(prompt)), "lexical rule"


def _number_repeats(words: list[str]) -> list[str]:
    """"cat", "cat" -> "cat", "cat#2", so repeated nouns point at different tokens."""
    seen: dict[str, int] = {}
    out = []
    for w in words:
        seen[w.lower()] = seen.get(w.lower(), 0) + 1
        out.append(w if seen[w.lower()] == 1 else f"{w}#{seen[w.lower()]}")
    return out


_SPLIT_TOKENS = set(_SPLIT_WORDS.replace("next to", "next|to").split("|"))


def modifier_indices(tokenizer, prompt: str, noun_index: int, exclude=()) -> list[int]:
    """The tokens that modify the noun starting at token `noun_index` of the CLIP `tokenizer`'s table
    (`modifier_columns` on its word tokens)."""
    return modifier_columns(token_table(tokenizer, prompt)[1:-1], noun_index, exclude)


def modifier_columns(words: list[Token], noun_column: int, exclude=()) -> list[int]:
    """The columns of the tokens that modify the noun starting at column `noun_column`: the run of content
    words right before it in its phrase ("a big shiny red ball" -> shiny, red), stopping at a stop word, a
    conjunction or preposition, or punctuation (the lexical rule of `auto_targets`). Columns in `exclude`
    (other targets) end the run too. `words`: the prompt's word tokens (no SOS/EOS) in order, each with
    its column, so any tokenizer's table works (CLIP's, or a T5 stream's in the joint sequence)."""
    place = next(p for p, t in enumerate(words) if t.index == noun_column)
    out = []
    for token in reversed(words[:place]):
        text = token.text.lower()
        if token.index in exclude or not text.isalpha() or text in _STOP or text in _SPLIT_TOKENS:
            break
        out.append(token.index)
    return out[::-1]
