"""What the sub-commands share: the parser class, argument types that check a value where it is typed,
and the options of models, sampling and regulation."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..options import DEFAULT_GUIDANCE, DEFAULT_STEPS, OptionError, config_options, parse_seed, split_list


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


def seed(text: str) -> int:
    """--seed: a torch generator's seed, 0 .. 2**64 - 1."""
    try:
        return parse_seed(text)
    except OptionError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def fraction(text: str) -> float:
    """A share in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def guidance_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    if not value > 1:
        raise argparse.ArgumentTypeError(
            f"{text} must be > 1: attnreg edits the conditional half of classifier-free guidance")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


MODEL_HELP = ("local pipeline folder, hub id, or an embedded shapes model: toy-unet (the default) or toy-mmdit "
              "(SD3-style, once trained)")


def model_name(text: str) -> str | None:
    """--model as the commands use it: an embedded model's short name resolved to its folder ("toy-unet", the
    default, to None), anything else unchanged. A short name whose weights are not exported is a usage error
    saying how to train them."""
    from ..toy import MODELS, DEFAULT_MODEL, model_path

    if text == DEFAULT_MODEL:
        return None
    if text in MODELS:
        try:
            return str(model_path(text))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=model_name, default=None, help=MODEL_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the pipeline's dtype; the optimisation always runs in float32 (default: float32)")
    add_threads_arg(p)


def add_threads_arg(p: argparse.ArgumentParser, note: str = "") -> None:
    """--threads, one meaning in every sub-command: torch's CPU threads, 1 unless given."""
    p.add_argument("--threads", type=positive_int, default=1,
                   help=f"torch CPU threads{note} (default: 1 in every sub-command, the fast setting on small CPUs, "
                   "where more threads contend; the images depend on the count, so keep it fixed)")


SAMPLER_DEFAULT = "the model's attnreg.json {key}, else {value}"


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The pipeline-call options every sub-command that generates shares; --steps and --guidance left out are
    the model's own (`fill_sampler_defaults`)."""
    add_steps_and_guidance(p)
    p.add_argument("--size", type=image_size, default=None, help="image height and width, a multiple of 8 (default: the model's)")


def add_steps_and_guidance(p: argparse.ArgumentParser, steps_help: str = "denoising steps") -> None:
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"{steps_help} (default: {SAMPLER_DEFAULT.format(key='num_inference_steps', value=DEFAULT_STEPS)})")
    p.add_argument("--guidance", type=guidance_scale, default=None,
                   help="classifier-free guidance scale, > 1 (default: "
                   f"{SAMPLER_DEFAULT.format(key='guidance_scale', value=DEFAULT_GUIDANCE)})")


def sampler_defaults(model: str | None) -> tuple[int, float]:
    """(steps, guidance) a model is sampled with: its attnreg.json `num_inference_steps` and `guidance_scale`
    (docs/attnreg-json.md) when it names them, else Stable Diffusion's 50 and 7.5. `model`: a local folder, a
    hub id (no attnreg.json here) or None for the default embedded model."""
    from ..modelspec import folder_spec
    from ..toy import model_path

    info = folder_spec(Path(model) if model else model_path(check=False))
    return int(info.get("num_inference_steps", DEFAULT_STEPS)), float(info.get("guidance_scale", DEFAULT_GUIDANCE))


def fill_sampler_defaults(args) -> None:
    """`--steps` and `--guidance` left out (None) become the model's own (`sampler_defaults`)."""
    if getattr(args, "steps", 0) is not None and getattr(args, "guidance", 0) is not None:
        return
    steps, guidance = sampler_defaults(getattr(args, "model", None))
    if getattr(args, "steps", 0) is None:
        args.steps = steps
    if getattr(args, "guidance", 0) is None:
        args.guidance = guidance


def prepare_run(args) -> None:
    """Checks and settings every generating command needs before a model loads: the device exists, the
    thread count is set."""
    import torch

    from ..pipelines import check_device

    check_device(args.device)
    torch.set_num_threads(getattr(args, "threads", 1))


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
    from ..config import COMPILE_CHOICES, DEFAULT_PRESET, PRESETS

    p.add_argument("--preset", default=DEFAULT_PRESET, metavar="{" + ",".join(PRESETS) + "}",
                   help="auto: layers and loss levels fitted to the model (default); paper: the authors' release")
    p.add_argument("--layers", default=None, help="comma-separated blocks or attn2 modules to edit (default: the model's)")
    p.add_argument("--edit-steps", type=non_negative_int, default=None, help="edit the first N steps (default: half)")
    p.add_argument("--exact", action="store_true", help="removed: the default has one solver per loss (using it "
                   "is an error that says so)")
    p.add_argument("--compile", default="auto", choices=COMPILE_CHOICES,
                   help="the default's solver through torch.compile: auto = on CUDA only (default), on (also CPU: the first "
                   "call compiles for tens of seconds), off = eager; a failed compile falls back to eager with a warning")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", dest="options",
                   help="any RegulationConfig field (attnreg/config.py) but preset, repeatable, applied last; the value is "
                   "parsed by the field's type (booleans: true/false, 1/0, yes/no; numbers finite; null for None; "
                   "layers comma-separated): --set binding=0 (no modifier binding), --set neglect_ratio=null")


def regulation_config(args):
    from ..config import RegulationConfig

    overrides = {}
    if args.layers is not None:
        if not split_list(args.layers):
            raise ValueError("--layers is empty; name blocks or attn2 modules, or leave it out for the model's layers")
        overrides["layers"] = tuple(split_list(args.layers))
    if args.edit_steps is not None:
        overrides["edit_steps"] = args.edit_steps
    if getattr(args, "exact", False):
        raise ValueError("--exact was removed: the default has one solver per loss (the same pictures within the "
                         "benchmark's noise); --preset paper gives the authors' release")
    if getattr(args, "compile", "auto") != "auto":
        overrides["compile"] = args.compile
    overrides.update(config_options(getattr(args, "options", [])))
    return RegulationConfig.from_preset(args.preset, **overrides)




def int_list(text: str | None, name: str) -> list[int] | None:
    """"0,5,15" -> [0, 5, 15]; a ValueError naming the option otherwise."""
    if text is None:
        return None
    try:
        return [int(x) for x in split_list(text)]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated step numbers such as 0,5,15, got {text!r}") from None


def load_model(args):
    """The pipeline of --model (a folder, hub id or embedded model's short name), or the embedded shapes
    model when none is given."""
    from ..pipelines import load_pipeline

    from ..toy import MODELS, model_path

    model = args.model
    if model is None or model in MODELS:  # also when args were not made by the parser
        model = model_path(model or "toy-unet")
    return load_pipeline(model, args.device, args.dtype)
