"""`attnreg tokens`: the prompt's token table, the indices targets resolve to."""

from __future__ import annotations

from ..names import split_list
from .common import model_name


def register(sub) -> None:
    t = sub.add_parser("tokens", help="print the prompt's token table (the indices targets resolve to)")
    t.add_argument("prompt", help="the text whose tokens are shown")
    t.add_argument("--targets", default=None, help="comma-separated target words to resolve to token indices")
    t.add_argument("--model", type=model_name, default=None,
                   help="use this pipeline's tokenizer: a folder, hub id, toy-unet or toy-mmdit (default: the CLIP tokenizer)")
    t.set_defaults(func=cmd_tokens)


def cmd_tokens(args) -> int:
    from ..tokens import token_table

    if args.model:
        from ..pipelines import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    else:
        from ..tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
    table = token_table(tokenizer, args.prompt)
    print("index  token")
    for t in table:
        print(f"{t.index:5d}  {t.text}")
    if args.targets:
        from ..tokens import resolve_targets

        print("targets:", resolve_targets(tokenizer, args.prompt, split_list(args.targets)))
    return 0
