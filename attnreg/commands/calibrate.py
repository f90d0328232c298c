"""`attnreg calibrate`: choose the layers the auto preset edits, from the model's own attention."""

from __future__ import annotations

from pathlib import Path

from ..options import parse_seeds
from .common import add_model_args, add_steps_and_guidance, fraction, load_model, prepare_run, writable_folder


def register(sub) -> None:
    c = sub.add_parser("calibrate", help="choose the layers the auto preset edits, from the model's own attention")
    add_model_args(c)
    c.add_argument("--prompts", default=None, help="a file with one prompt per line (default: the model's "
                   "attnreg.json calibration_prompts, else 8 generic two- and three-object prompts)")
    c.add_argument("--seeds", default="0,1", help="seeds per prompt, e.g. 0-3 or 0,1,5 (default: 0,1)")
    add_steps_and_guidance(c, steps_help="denoising steps; the first half are observed")
    c.add_argument("--keep", type=fraction, default=0.5,
                   help="keep layers within this fraction of the best contrast, in (0, 1] (default: 0.5)")
    c.add_argument("--out", default=None, help="folder whose attnreg.json gets the result (default: the model's)")
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from ..calibrate import calibrate
    from ..modelspec import CalibrationError, model_folder, write_calibration

    seeds = parse_seeds(args.seeds)
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
    pipe = load_model(args)
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
