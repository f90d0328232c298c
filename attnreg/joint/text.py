"""The joint text sequence of SD3 and FLUX: its streams (SD3: 77 CLIP columns, then T5 or zero columns; FLUX: T5
alone), their tokens, and where a target word's columns are."""

from __future__ import annotations

from dataclasses import dataclass

from ..tokens import TargetError, Token, eos_index, find_phrase, format_tokens, resolve_targets, token_table

CLIP_LENGTH = 77  # SD3's CLIP stream: tokenizer_max_length


def t5_table(tokenizer, prompt: str, length: int) -> list[Token]:
    """Every T5 token the text encoder sees at `length` (words .. EOS), as the pipeline truncates them."""
    ids = tokenizer(prompt, truncation=True, max_length=length, add_special_tokens=True).input_ids
    return [Token(i, tokenizer.convert_ids_to_tokens(t).replace("\u2581", "") or "\u2581") for i, t in enumerate(ids)]


def resolve_t5_targets(tokenizer, prompt: str, targets: list[str | int], length: int) -> list[int]:
    """T5 token indices (0 = the first word; T5 has no SOS) of every sub-token of every target, as
    `tokens.resolve_targets` does for CLIP: phrases, "cat#2", ints as token indices. A target past the
    `length`-token truncation is a TargetError naming it and what the encoder sees."""
    full = tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids
    table = t5_table(tokenizer, prompt, length)
    found: list[int] = []
    past: list[str] = []
    for target in targets:
        if isinstance(target, int):
            if not 0 <= target < len(table) - 1:
                raise TargetError(f"target index {target} is not a word token of {prompt!r} in T5; valid indices are "
                                  f"0..{len(table) - 2}: {format_tokens(table)}")
            indices = [target]
        else:
            indices = find_phrase(tokenizer, full, prompt, str(target), table, (0, len(full)), "T5 tokens")
            start = indices[0]
            if indices[-1] >= length - 1:  # the last slot holds EOS after truncation
                past.append(f"{target!r} (T5 token {start})")
                continue
        found += [i for i in indices if i not in found]
    if past:
        raise TargetError(
            f"target{'s' if len(past) > 1 else ''} {', '.join(past)} of {prompt!r} {'are' if len(past) > 1 else 'is'} past "
            f"the {length}-token truncation (max_sequence_length); the text encoder only sees: {format_tokens(table)}")
    return found


@dataclass(frozen=True)
class TextStream:
    """Where a pipeline's target tokens are found and where they sit in the joint text sequence."""

    name: str  # "t5" or "clip"
    tokenizer: object
    offset: int  # column of the stream's token 0 in the joint text sequence

    def resolve(self, prompt: str, targets: list, length: int) -> list[int]:
        if self.name == "clip":
            return resolve_targets(self.tokenizer, prompt, targets)
        return resolve_t5_targets(self.tokenizer, prompt, targets, length)

    def table(self, prompt: str, length: int) -> list[Token]:
        return token_table(self.tokenizer, prompt) if self.name == "clip" else t5_table(self.tokenizer, prompt, length)

    def width(self, length: int) -> int:
        """How many columns of the joint text sequence the stream holds (`length`: the T5 length)."""
        return CLIP_LENGTH if self.name == "clip" else length

    def eos(self, prompt: str, length: int) -> int:
        if self.name == "clip":
            return eos_index(self.tokenizer, prompt)
        return len(t5_table(self.tokenizer, prompt, length)) - 1


def text_streams(pipe, family: str) -> tuple[TextStream, ...]:
    """Every stream of the joint text sequence that has a tokenizer, in column order: SD3's CLIP (0..76)
    and, where the pipeline has a T5 tokenizer, its T5 (77 on); FLUX's T5 (0 on). `pipe` is anything with
    the pipeline's tokenizer attributes."""
    if family == "flux":
        return (TextStream("t5", pipe.tokenizer_2, 0),)
    clip = TextStream("clip", pipe.tokenizer, 0)
    t5 = getattr(pipe, "tokenizer_3", None)
    if t5 is None or getattr(pipe, "text_encoder_3", None) is None:  # without T5 its columns are zeros
        return (clip,)
    return (clip, TextStream("t5", t5, CLIP_LENGTH))


def word_tokens(stream: TextStream, table: list[Token]) -> list[Token]:
    """The word tokens of a stream's table: without SOS (CLIP's column 0) and the first EOS."""
    return table[1:-1] if stream.name == "clip" else table[:-1]


def choose_text_stream(pipe, family: str, choice: str | None = None) -> TextStream:
    """The stream targets are looked up in: T5 where the pipeline has it (SD3's tokenizer_3, FLUX's
    tokenizer_2), else SD3's CLIP; `choice` ("t5" or "clip") overrides for SD3."""
    if family == "flux":
        if choice not in (None, "t5"):
            raise ValueError(f"FLUX's joint attention sees T5 tokens only; text_stream={choice!r} is not possible")
        return TextStream("t5", pipe.tokenizer_2, 0)
    if choice not in (None, "t5", "clip"):
        raise ValueError(f"text_stream must be 't5' or 'clip', got {choice!r}")
    streams = {s.name: s for s in text_streams(pipe, family)}
    has_t5 = "t5" in streams
    if choice == "t5" and not has_t5:
        raise ValueError("text_stream='t5' needs the pipeline's T5 encoder; this SD3 pipeline has text_encoder_3=None "
                         "(its T5 columns are zeros), use 'clip'")
    return streams["clip"] if choice == "clip" or not has_t5 else streams["t5"]


def stream_table(stream: TextStream, prompt: str, length: int) -> list[Token]:
    """A stream's tokens (SOS/words/EOS as its encoder sees them), indexed by joint text column."""
    return [Token(t.index + stream.offset, t.text) for t in stream.table(prompt, length)]


def joint_token_tables(pipe, family: str, prompt: str, length: int) -> list[tuple[TextStream, list[Token]]]:
    """Every stream of the joint text sequence with its tokens, indexed by joint text column. `pipe`: the
    pipeline, or anything with its tokenizer attributes (`attnreg tokens` loads only those)."""
    return [(s, stream_table(s, prompt, length)) for s in text_streams(pipe, family)]


def stream_columns(stream: TextStream, prompt: str, targets: list, length: int) -> list[int]:
    """The joint text columns of `targets`, looked up in `stream` (a TargetError naming its tokens)."""
    return [stream.offset + i for i in stream.resolve(prompt, targets, length)]
