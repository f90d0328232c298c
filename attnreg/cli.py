"""The `attnreg` command line: generate, tokens, and the sub-commands of the other parts."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path

# Modules that add their own sub-commands with `register(subparsers)`; optional parts may be absent.
SUBCOMMAND_MODULES = ("attnreg.toy.cli", "attnreg.eval.cli", "attnreg.explain", "attnreg.ablate")


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local pipeline folder or hub id (default: the embedded shapes model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The pipeline-call options every sub-command that generates shares."""
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")


def add_regulation_args(p: argparse.ArgumentParser) -> None:
    from .config import PRESETS

    p.add_argument("--preset", default="auto", metavar="{" + ",".join(PRESETS) + "}",
                   help="auto: layers and loss levels fitted to the model (default); paper: the authors' release")
    p.add_argument("--layers", default=None, help="comma-separated blocks or attn2 modules to edit (default: the model's)")
    p.add_argument("--edit-steps", type=int, default=None, help="edit the first N steps (default: half)")


def regulation_config(args):
    from .config import RegulationConfig

    overrides = {}
    if args.layers:
        overrides["layers"] = tuple(split_list(args.layers))
    if args.edit_steps is not None:
        overrides["edit_steps"] = args.edit_steps
    return RegulationConfig.from_preset(args.preset, **overrides)


def side_by_side(left, right, caption: str, labels=("original", "attnreg")):
    """Two images next to each other with labels above and `caption` written under them."""
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, 256 // max(left.width, 1))
    left, right = (im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in (left, right))
    font = ImageFont.load_default()
    lines = _wrap(caption, max(20, (left.width + right.width) // 7))
    pad, line_h = 8, 14
    canvas = Image.new("RGB", (left.width + right.width + 3 * pad, left.height + 2 * pad + line_h * (len(lines) + 1)), "white")
    canvas.paste(left, (pad, pad + line_h))
    canvas.paste(right, (2 * pad + left.width, pad + line_h))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), labels[0], fill="black", font=font)
    draw.text((2 * pad + left.width, 2), labels[1], fill="black", font=font)
    for i, line in enumerate(lines):
        draw.text((pad, 2 * pad + line_h + left.height + i * line_h), line, fill="black", font=font)
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def cmd_generate(args) -> int:
    import torch

    from .pipelines import load_pipeline
    from .regulator import AttentionRegulator

    config = regulation_config(args)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    reg = AttentionRegulator(pipe, config)
    targets = split_list(args.targets)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, num_images_per_prompt=args.n)
    if args.size:
        call.update(height=args.size, width=args.size)
    generator = lambda: torch.Generator("cpu").manual_seed(args.seed)  # noqa: E731 - same noise for both runs
    images = reg(args.prompt, targets=targets, generator=generator(), **call).images
    info = reg.last_targets[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(args.prompt)}_seed{args.seed}"
    written = []
    plain = pipe(args.prompt, generator=generator(), **call).images if args.compare else [None] * len(images)
    for i, (image, original) in enumerate(zip(images, plain)):
        name = stem if len(images) == 1 else f"{stem}_{i}"
        image.save(out / f"{name}_attnreg.png")
        written.append(out / f"{name}_attnreg.png")
        if original is not None:
            original.save(out / f"{name}_original.png")
            caption = f"{args.prompt} | targets: " + ", ".join(f"{w} ({i})" for w, i in zip(info["tokens"], info["indices"]))
            side_by_side(original, image, caption).save(out / f"{name}_compare.png")
            written += [out / f"{name}_original.png", out / f"{name}_compare.png"]
    (out / f"{stem}.json").write_text(json.dumps({
        "prompt": args.prompt, "targets": info, "seed": args.seed, "model": str(args.model or "embedded"),
        "call": call, "config": config.to_dict(), "edited_layers": sorted(reg.layers),
    }, indent=2))
    written.append(out / f"{stem}.json")
    for path in written:
        print(path)
    return 0


def cmd_tokens(args) -> int:
    from .tokens import token_table

    if args.model:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    else:
        from .tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
    table = token_table(tokenizer, args.prompt)
    print("index  token")
    for t in table:
        print(f"{t.index:5d}  {t.text}")
    if args.targets:
        from .tokens import resolve_targets

        print("targets:", resolve_targets(tokenizer, args.prompt, split_list(args.targets)))
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import CalibrationError, calibrate, model_folder, write_calibration
    from .pipelines import load_pipeline

    pipe = load_pipeline(args.model, args.device, args.dtype)
    prompts = None
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise CalibrationError(f"--prompts {args.prompts}: no such file (one prompt per line)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise CalibrationError(f"--prompts {args.prompts} holds no prompt")
    seeds = [int(s) for s in split_list(args.seeds)]
    result = calibrate(pipe, prompts=prompts, seeds=seeds, steps=args.steps, guidance_scale=args.guidance, keep=args.keep)
    print("layer                                                   map    mass  contrast")
    for layer, st in result["layer_stats"].items():
        mark = "*" if layer in result["layers"] else " "
        print(f"{mark} {layer:54s} {st['map']:>5s} {st['mass']:6.2f} {st['contrast']:8.3f}")
    folder = Path(args.out) if args.out else model_folder(pipe)
    if folder is None:
        raise CalibrationError("this model was not loaded from a local folder; pass --out FOLDER for its attnreg.json")
    print(write_calibration(folder, result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnreg", description="Attention Regulation for diffusers pipelines")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images with attention regulation")
    g.add_argument("prompt")
    g.add_argument("--targets", default=None, help="comma-separated target words (default: the prompt's nouns)")
    add_model_args(g)
    g.add_argument("--seed", type=int, default=42)
    add_sampling_args(g)
    g.add_argument("-n", type=int, default=1, help="images per prompt")
    g.add_argument("--out", default="outputs")
    g.add_argument("--compare", action="store_true", help="also write the unregulated image and a side-by-side")
    add_regulation_args(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("tokens", help="print the prompt's token table (the indices targets resolve to)")
    t.add_argument("prompt")
    t.add_argument("--targets", default=None)
    t.add_argument("--model", default=None, help="use this pipeline's tokenizer (default: the CLIP tokenizer)")
    t.set_defaults(func=cmd_tokens)

    c = sub.add_parser("calibrate", help="choose the layers the auto preset edits, from the model's own attention")
    add_model_args(c)
    c.add_argument("--prompts", default=None, help="a file with one prompt per line (default: the model's "
                   "attnreg.json calibration_prompts, else 8 generic two- and three-object prompts)")
    c.add_argument("--seeds", default="0,1", help="comma-separated seeds per prompt (default: 0,1)")
    c.add_argument("--steps", type=int, default=50, help="denoising steps; the first half are observed (default: 50)")
    c.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5)")
    c.add_argument("--keep", type=float, default=0.5, help="keep layers within this fraction of the best contrast")
    c.add_argument("--out", default=None, help="folder whose attnreg.json gets the result (default: the model's)")
    c.set_defaults(func=cmd_calibrate)

    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue  # that part is not installed
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    from .regulator import UnsupportedPipelineError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, UnsupportedPipelineError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"attnreg: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
