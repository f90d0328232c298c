"""`attnreg generate`: regulated images of a prompt, with the original beside them on request."""

from __future__ import annotations

import json

from ..files import atomic_save_image, atomic_write_text
from ..files import prompt_stem
from ..options import SEED_MAX
from ..tokens import command_line_targets
from .common import (
    add_model_args, add_regulation_args, add_sampling_args, load_model, positive_int, prepare_run, regulation_config, seed,
    writable_folder,
)


MAX_IMAGES = 64  # -n above this needs --yes: a typo should not start hours of work (attnreg bench makes data sets)


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate images with attention regulation")
    g.add_argument("prompt", help="the text to draw")
    g.add_argument("--targets", default=None,
                   help="comma-separated target words or phrases; a number is a token index (attnreg tokens), a word named twice its next occurrence (circle,circle = circle,circle#2) (default: the prompt's nouns)")
    add_model_args(g)
    g.add_argument("--seed", type=seed, default=42,
                   help="noise seed, 0..2**64-1; the original uses the same (default: 42)")
    add_sampling_args(g)
    g.add_argument("-n", type=positive_int, default=1,
                   help=f"images, made one at a time: image k (from 0) uses seed + k and is what --seed SEED+k -n 1 "
                   f"makes, under the same file names; at most {MAX_IMAGES} without --yes (default: 1)")
    g.add_argument("--yes", action="store_true", help=f"allow -n above {MAX_IMAGES}")
    g.add_argument("--out", default="outputs", help="output folder, made if missing (default: outputs)")
    g.add_argument("--compare", action="store_true", help="also write the unregulated image and a side-by-side")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bar (it shows only when standard error is a terminal)")
    add_regulation_args(g)
    g.set_defaults(func=cmd_generate)


def image_seeds(first: int, n: int) -> list[int]:
    """The seeds of `-n n` from `--seed first`: image k uses first + k (as the app's pair k does)."""
    if first + n - 1 > SEED_MAX:
        raise ValueError(f"-n {n} from --seed {first} runs past the last seed, {SEED_MAX}; "
                         f"start at --seed {SEED_MAX - n + 1} or lower")
    return [first + k for k in range(n)]


def cmd_generate(args) -> int:
    import sys

    import torch
    from tqdm.auto import tqdm

    from ..regulator import AttentionRegulator

    if not args.prompt.strip():
        raise ValueError("the prompt is empty; give the text to draw, e.g. \"a red circle and a blue square\"")
    if args.edit_steps is not None and args.edit_steps > args.steps:
        raise ValueError(f"--edit-steps {args.edit_steps} is more than --steps {args.steps}")
    if args.n > MAX_IMAGES and not args.yes:
        raise ValueError(f"-n {args.n} is more than {MAX_IMAGES} images; add --yes to make them all "
                         "(or attnreg bench for a data set)")
    seeds = image_seeds(args.seed, args.n)
    targets = command_line_targets(args.targets)
    if args.targets is not None and not targets:
        raise ValueError("--targets is empty; name words of the prompt, or leave it out for its nouns")
    config = regulation_config(args)
    prepare_run(args)
    out = writable_folder(args.out)
    pipe = load_model(args)
    reg = AttentionRegulator(pipe, config)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    if args.size:
        call.update(height=args.size, width=args.size)
    plan = reg.plan(args.prompt, targets, **call)  # the same for every image: a run of -n 1 makes the same plan
    info = reg.last_targets[0]
    if plan is None:  # never write an unregulated image under an attnreg name
        from ..tokens import format_tokens, token_table

        raise ValueError(f"no target found in {args.prompt!r} ({info['source']}); name them with --targets, "
                         f"from its tokens: {format_tokens(token_table(pipe.tokenizer, args.prompt))}")
    bar = tqdm(total=len(seeds) * args.steps * (2 if args.compare else 1), unit="step", desc="attnreg generate",
               file=sys.stderr, leave=False, disable=args.quiet or not sys.stderr.isatty())

    def step_done(pipe, step, timestep, callback_kwargs):
        bar.update(1)
        return {}

    with bar:
        for image_seed in seeds:  # one at a time, so that each image is exactly the one its seed makes alone
            generator = lambda: torch.Generator("cpu").manual_seed(image_seed)  # noqa: E731 - same noise for both
            image = reg.run(args.prompt, plan, generator=generator(), callback_on_step_end=step_done, **call).images[0]
            plain = (pipe(args.prompt, generator=generator(), callback_on_step_end=step_done, **call).images[0]
                     if args.compare else None)
            stem = f"{prompt_stem(args.prompt)}_seed{image_seed}"
            written = write_images(out, stem, image, plain, args.prompt, info)
            record = run_record(args, image_seed, pipe, reg, info, call)
            atomic_write_text(out / f"{stem}.json", json.dumps(record, indent=2, allow_nan=False))
            for path in written + [out / f"{stem}.json"]:
                bar.write(str(path), file=sys.stdout)  # above the bar, as each image is done
            args.on_interrupt = "the images listed above are kept"
    return 0


def run_record(args, image_seed: int, pipe, reg, info: dict, call: dict) -> dict:
    """What the JSON beside the images says: enough to make them again (every config field, the model's
    source, the versions, device, dtype and thread count), and a warning when nothing was edited."""

    from ..provenance import model_source, numerics, versions
    from ..regulator import NO_LAYERS

    return {
        "prompt": args.prompt, "targets": info, "seed": image_seed, "model": str(args.model or "embedded"),
        "model_source": model_source(pipe), "call": call, "config": reg.config.to_dict(),
        "edited_layers": sorted(reg.layers), "warnings": [] if reg.layers else [NO_LAYERS],
        **numerics(pipe), "versions": versions(),
    }


def write_images(out, stem: str, image, original, prompt: str, info: dict) -> list:
    """STEM_attnreg.png, and with the original STEM_original.png and a side-by-side STEM_compare.png."""
    from ..figures import side_by_side

    atomic_save_image(out / f"{stem}_attnreg.png", image)  # a full disk leaves no cut PNG behind
    if original is None:
        return [out / f"{stem}_attnreg.png"]
    atomic_save_image(out / f"{stem}_original.png", original)
    caption = f"{prompt} | targets: " + ", ".join(f"{w} ({i})" for w, i in zip(info["tokens"], info["indices"]))
    atomic_save_image(out / f"{stem}_compare.png", side_by_side(original, image, caption))
    return [out / f"{stem}_attnreg.png", out / f"{stem}_original.png", out / f"{stem}_compare.png"]
