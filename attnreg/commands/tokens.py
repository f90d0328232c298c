"""`attnreg tokens`: the prompt's token table, the indices targets resolve to.

For an SD3 or FLUX folder every stream of the joint text sequence is shown, indexed by joint text column
as the regulator counts them (SD3: CLIP 0..76, then T5 from 77; FLUX: T5 from 0), and the stream targets
are looked up in is named; only the pipeline's tokenizers are loaded, not its models."""

from __future__ import annotations

from ..tokens import command_line_targets
from .common import model_name, positive_int


def register(sub) -> None:
    t = sub.add_parser("tokens", help="print the prompt's token table (the indices targets resolve to)")
    t.add_argument("prompt", help="the text whose tokens are shown")
    t.add_argument("--targets", default=None, help="comma-separated target words to resolve to token indices, as "
                   "generate takes them (a number is a token index; a word named twice its next occurrence)")
    t.add_argument("--model", type=model_name, default=None,
                   help="use this pipeline's tokenizer(s): a folder, hub id, toy-unet or toy-mmdit (default: the CLIP tokenizer)")
    t.add_argument("--text-stream", default=None, choices=["t5", "clip"],
                   help="SD3: the stream targets are looked up in (default: T5 where the pipeline has it)")
    t.add_argument("--max-sequence-length", type=positive_int, default=None,
                   help="SD3/FLUX: the T5 length of the call (default: the pipeline's, 256 for SD3, 512 for FLUX)")
    t.set_defaults(func=cmd_tokens)


def _print_table(table) -> None:
    print("index  token")
    for t in table:
        print(f"{t.index:5d}  {t.text}")


def cmd_tokens(args) -> int:
    from ..tokens import token_table

    if args.model:
        from ..pipelines import load_text_side

        text = load_text_side(args.model)
        if text is not None:
            return _joint_tokens(args, *text)
        from ..pipelines import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    else:
        from ..tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
    if args.text_stream or args.max_sequence_length:
        raise ValueError("--text-stream and --max-sequence-length are for SD3/FLUX models (--model FOLDER)")
    _print_table(token_table(tokenizer, args.prompt))
    if args.targets:
        from ..tokens import resolve_targets

        print("targets:", resolve_targets(tokenizer, args.prompt, command_line_targets(args.targets)))
    return 0


def _joint_tokens(args, family: str, tokenizers, length: int) -> int:
    """Every stream of the joint text sequence (the regulator's `token_tables`), and the targets' columns."""
    from ..joint import choose_text_stream, joint_token_tables, stream_columns

    length = args.max_sequence_length or length
    target = choose_text_stream(tokenizers, family, args.text_stream)
    tables = joint_token_tables(tokenizers, family, args.prompt, length)
    names = {"clip": "CLIP", "t5": "T5"}
    print(f"{'SD3' if family == 'sd3' else 'FLUX'}: the joint text sequence is "
          + ", then ".join(f"{names[s.name]} (from column {s.offset})" for s, _ in tables)
          + f"; targets are looked up in {names[target.name]}")
    for stream, table in tables:
        print(f"\n{names[stream.name]} (columns {stream.offset}..{stream.offset + stream.width(length) - 1},"
              f" {'the target stream' if stream == target else 'not searched for targets'}):")
        _print_table(table)
    if args.targets:
        columns = stream_columns(target, args.prompt, command_line_targets(args.targets), length)
        print(f"\ntargets ({names[target.name]} columns):", columns)
    return 0
