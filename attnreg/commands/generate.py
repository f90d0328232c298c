"""`attnreg generate`: regulated images of a prompt, with the original beside them on request."""

from __future__ import annotations

import json

from ..files import atomic_save_image, atomic_write_text
from ..names import prompt_stem
from ..tokens import command_line_targets
from .common import (
    add_model_args, add_regulation_args, add_sampling_args, load_model, positive_int, prepare_run, regulation_config, seed,
    writable_folder,
)


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate images with attention regulation")
    g.add_argument("prompt", help="the text to draw")
    g.add_argument("--targets", default=None,
                   help="comma-separated target words or phrases; a number is a token index (attnreg tokens), a word named twice its next occurrence (circle,circle = circle,circle#2) (default: the prompt's nouns)")
    add_model_args(g)
    g.add_argument("--seed", type=seed, default=42,
                   help="noise seed, 0..2**64-1; the original uses the same (default: 42)")
    add_sampling_args(g)
    g.add_argument("-n", type=positive_int, default=1, help="images per prompt (default: 1)")
    g.add_argument("--out", default="outputs", help="output folder, made if missing (default: outputs)")
    g.add_argument("--compare", action="store_true", help="also write the unregulated image and a side-by-side")
    add_regulation_args(g)
    g.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import torch

    from ..regulator import AttentionRegulator

    if not args.prompt.strip():
        raise ValueError("the prompt is empty; give the text to draw, e.g. \"a red circle and a blue square\"")
    if args.edit_steps is not None and args.edit_steps > args.steps:
        raise ValueError(f"--edit-steps {args.edit_steps} is more than --steps {args.steps}")
    targets = command_line_targets(args.targets)
    if args.targets is not None and not targets:
        raise ValueError("--targets is empty; name words of the prompt, or leave it out for its nouns")
    config = regulation_config(args)
    prepare_run(args)
    out = writable_folder(args.out)
    pipe = load_model(args)
    reg = AttentionRegulator(pipe, config)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, num_images_per_prompt=args.n)
    if args.size:
        call.update(height=args.size, width=args.size)
    plan = reg.plan(args.prompt, targets, **call)
    info = reg.last_targets[0]
    if plan is None:  # never write an unregulated image under an attnreg name
        from ..tokens import format_tokens, token_table

        raise ValueError(f"no target found in {args.prompt!r} ({info['source']}); name them with --targets, "
                         f"from its tokens: {format_tokens(token_table(pipe.tokenizer, args.prompt))}")
    generator = lambda: torch.Generator("cpu").manual_seed(args.seed)  # noqa: E731 - same noise for both runs
    images = reg.run(args.prompt, plan, generator=generator(), **call).images
    plain = pipe(args.prompt, generator=generator(), **call).images if args.compare else [None] * len(images)
    stem = f"{prompt_stem(args.prompt)}_seed{args.seed}"
    written = write_images(out, stem, images, plain, args.prompt, info)
    atomic_write_text(out / f"{stem}.json", json.dumps(run_record(args, pipe, reg, info, call), indent=2, allow_nan=False))
    for path in written + [out / f"{stem}.json"]:
        print(path)
    return 0


def run_record(args, pipe, reg, info: dict, call: dict) -> dict:
    """What the JSON beside the images says: enough to make them again (every config field, the model's
    source, the versions, device, dtype and thread count), and a warning when nothing was edited."""
    import dataclasses

    from ..provenance import model_source, numerics, versions
    from ..regulator import NO_LAYERS

    return {
        "prompt": args.prompt, "targets": info, "seed": args.seed, "model": str(args.model or "embedded"),
        "model_source": model_source(pipe), "call": call, "config": dataclasses.asdict(reg.config),
        "edited_layers": sorted(reg.layers), "warnings": [] if reg.layers else [NO_LAYERS],
        **numerics(pipe), "versions": versions(),
    }


def write_images(out, stem: str, images, plain, prompt: str, info: dict) -> list:
    """STEM[_i]_attnreg.png, and with the originals STEM[_i]_original.png and a side-by-side _compare.png."""
    from ..figures import side_by_side

    written = []
    for i, (image, original) in enumerate(zip(images, plain)):
        name = stem if len(images) == 1 else f"{stem}_{i}"
        atomic_save_image(out / f"{name}_attnreg.png", image)  # a full disk leaves no cut PNG behind
        written.append(out / f"{name}_attnreg.png")
        if original is not None:
            atomic_save_image(out / f"{name}_original.png", original)
            caption = f"{prompt} | targets: " + ", ".join(f"{w} ({i})" for w, i in zip(info["tokens"], info["indices"]))
            atomic_save_image(out / f"{name}_compare.png", side_by_side(original, image, caption))
            written += [out / f"{name}_original.png", out / f"{name}_compare.png"]
    return written
