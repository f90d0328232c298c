"""The `attnreg` command line: generate, tokens, and the sub-commands of the other parts."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import re
import sys
import unicodedata
from pathlib import Path

# Modules that add their own sub-commands with `register(subparsers)`; optional parts may be absent.
SUBCOMMAND_MODULES = ("attnreg.toy.cli", "attnreg.eval.cli", "attnreg.explain", "attnreg.ablate", "attnreg.app.command")


def slug(text: str, limit: int = 60) -> str:
    """A file-name stem for a prompt: its words (any script, lower-cased) joined by "-", cut at `limit`
    characters, plus a short hash of the whole prompt, so prompts that differ only in symbols, order of
    emoji or past the cut never share a name."""
    words = re.sub(r"[^\w]+", "-", unicodedata.normalize("NFKC", text).lower()).strip("-_")[:limit].strip("-")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:6]
    return f"{words or 'prompt'}-{digest}"


class Parser(argparse.ArgumentParser):
    """argparse with one line per usage error (exit code 2), not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer (>= 1)")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative integer (>= 0)")
    return value


def image_size(text: str) -> int:
    value = _int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"{text} is not a positive multiple of 8 (the VAE halves the size 3 times)")
    return value


def guidance_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 1:
        raise argparse.ArgumentTypeError(
            f"{text} must be > 1: attnreg edits the conditional half of classifier-free guidance")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local pipeline folder or hub id (default: the embedded shapes model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the pipeline's dtype; the optimisation always runs in float32 (default: float32)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's own; results depend on it, so keep it fixed)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The pipeline-call options every sub-command that generates shares."""
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default: 50)")
    p.add_argument("--guidance", type=guidance_scale, default=7.5, help="classifier-free guidance scale, > 1 (default: 7.5)")
    p.add_argument("--size", type=image_size, default=None, help="image height and width, a multiple of 8 (default: the model's)")


def prepare_run(args) -> None:
    """Checks and settings every generating command needs before a model loads: the device exists, the
    thread count is set."""
    from .pipelines import check_device

    check_device(args.device)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def writable_folder(path: str) -> Path:
    """`path` as a folder that exists and takes files, or a ValueError naming the problem."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".attnreg-write-test-{id(out)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {path} cannot be written: {err.strerror or err}") from None
    return out


def add_regulation_args(p: argparse.ArgumentParser) -> None:
    from .config import PRESETS

    p.add_argument("--preset", default="auto", metavar="{" + ",".join(PRESETS) + "}",
                   help="auto: layers and loss levels fitted to the model (default); paper: the authors' release")
    p.add_argument("--layers", default=None, help="comma-separated blocks or attn2 modules to edit (default: the model's)")
    p.add_argument("--edit-steps", type=non_negative_int, default=None, help="edit the first N steps (default: half)")


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

    if not args.prompt.strip():
        raise ValueError("the prompt is empty; give the text to draw, e.g. \"a red circle and a blue square\"")
    if args.edit_steps is not None and args.edit_steps > args.steps:
        raise ValueError(f"--edit-steps {args.edit_steps} is more than --steps {args.steps}")
    config = regulation_config(args)
    prepare_run(args)
    out = writable_folder(args.out)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    reg = AttentionRegulator(pipe, config)
    targets = split_list(args.targets)
    if args.targets is not None and not targets:
        raise ValueError("--targets is empty; name words of the prompt, or leave it out for its nouns")
    info = reg.resolve(args.prompt, targets)
    if not info["indices"]:
        # Never write an unregulated image under an attnreg name.
        from .tokens import format_tokens, token_table

        raise ValueError(f"no target found in {args.prompt!r} ({info['source']}); name them with --targets, "
                         f"from its tokens: {format_tokens(token_table(pipe.tokenizer, args.prompt))}")
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, num_images_per_prompt=args.n)
    if args.size:
        call.update(height=args.size, width=args.size)
    generator = lambda: torch.Generator("cpu").manual_seed(args.seed)  # noqa: E731 - same noise for both runs
    images = reg(args.prompt, targets=targets, generator=generator(), **call).images
    info = reg.last_targets[0]
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
        from .pipelines import load_tokenizer

        tokenizer = load_tokenizer(args.model)
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

    prompts = None
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise CalibrationError(f"--prompts {args.prompts}: no such file (one prompt per line)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise CalibrationError(f"--prompts {args.prompts} holds no prompt")
    prepare_run(args)
    if args.out:
        writable_folder(args.out)
    pipe = load_pipeline(args.model, args.device, args.dtype)
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
    from . import __version__

    parser = Parser(prog="attnreg", description="Attention Regulation for diffusers pipelines")
    parser.add_argument("--version", action="version", version=f"attnreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images with attention regulation")
    g.add_argument("prompt", help="the text to draw")
    g.add_argument("--targets", default=None, help="comma-separated target words (default: the prompt's nouns)")
    add_model_args(g)
    g.add_argument("--seed", type=non_negative_int, default=42, help="noise seed; the original uses the same (default: 42)")
    add_sampling_args(g)
    g.add_argument("-n", type=positive_int, default=1, help="images per prompt (default: 1)")
    g.add_argument("--out", default="outputs", help="output folder, made if missing (default: outputs)")
    g.add_argument("--compare", action="store_true", help="also write the unregulated image and a side-by-side")
    add_regulation_args(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("tokens", help="print the prompt's token table (the indices targets resolve to)")
    t.add_argument("prompt", help="the text whose tokens are shown")
    t.add_argument("--targets", default=None, help="comma-separated target words to resolve to token indices")
    t.add_argument("--model", default=None, help="use this pipeline's tokenizer (default: the CLIP tokenizer)")
    t.set_defaults(func=cmd_tokens)

    c = sub.add_parser("calibrate", help="choose the layers the auto preset edits, from the model's own attention")
    add_model_args(c)
    c.add_argument("--prompts", default=None, help="a file with one prompt per line (default: the model's "
                   "attnreg.json calibration_prompts, else 8 generic two- and three-object prompts)")
    c.add_argument("--seeds", default="0,1", help="comma-separated seeds per prompt (default: 0,1)")
    c.add_argument("--steps", type=positive_int, default=50, help="denoising steps; the first half are observed (default: 50)")
    c.add_argument("--guidance", type=guidance_scale, default=7.5, help="guidance scale, > 1 (default: 7.5)")
    c.add_argument("--keep", type=float, default=0.5, help="keep layers within this fraction of the best contrast (default: 0.5)")
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

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # usage errors (2), --help and --version (0): a code, also when called in-process
        return done.code if isinstance(done.code, int) else 2
    try:
        return args.func(args)
    except (ValueError, OSError, UnsupportedPipelineError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"attnreg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = getattr(args, "on_interrupt", "nothing was written")
        print(f"attnreg: interrupted; {kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
