"""`attnreg explain`: record the cross-attention of a plain and a regulated run and plot it."""

from __future__ import annotations

from ..explain import MAP_SCALES
from ..files import prompt_stem
from ..options import split_list
from ..tokens import command_line_targets
from .common import (
    add_model_args, add_regulation_args, add_sampling_args, int_list, load_model, prepare_run, regulation_config,
    seed, writable_folder,
)


def cmd_explain(args) -> int:
    from ..explain import explain

    steps_shown = int_list(args.steps_shown, "--steps-shown")
    violin_steps = int_list(args.violin_steps, "--violin-steps")
    for name, steps in (("--steps-shown", steps_shown), ("--violin-steps", violin_steps)):
        if steps == []:
            raise ValueError(f"{name} is empty; name steps in 0..{args.steps - 1}, or leave it out for the default")
        if steps is not None and not all(0 <= s < args.steps for s in steps):
            raise ValueError(f"{name} must be steps in 0..{args.steps - 1} (--steps {args.steps}), got {steps}")
    if violin_steps is not None and len(violin_steps) != 2:
        raise ValueError(f"--violin-steps takes two steps (before and after, e.g. 0,{args.steps - 1}), "
                         f"got {len(violin_steps)}: {violin_steps}")
    if not args.prompt.strip():
        raise ValueError("the prompt is empty; give the text to draw, e.g. \"a red circle and a blue square\"")
    config = regulation_config(args)
    if args.edit_steps is not None and args.edit_steps > args.steps:
        raise ValueError(f"--edit-steps {args.edit_steps} is more than --steps {args.steps}")
    prepare_run(args)
    out = writable_folder(args.out or f"outputs/explain_{prompt_stem(args.prompt)}_seed{args.seed}")
    pipe = load_model(args)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    if args.size:
        call.update(height=args.size, width=args.size)
    ex = explain(
        pipe, args.prompt, targets=command_line_targets(args.targets), seed=args.seed, steps_shown=steps_shown,
        config=config, out=out, violin_steps=violin_steps, preview=args.preview, map_scale=args.map_scale,
        record_layers=split_list(args.record_layers), **call,
    )
    for line in ex.diagnosis:
        print(line)
    for path in ex.files:
        print(path)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain", help="record the cross-attention of a plain and a regulated run and plot it (Figs. 2, 3)",
        description="Run PROMPT plainly and with attention regulation from the same seed; write maps.png, "
        "stats.png, compare.png and explain.json to --out, and print a diagnosis per target.",
    )
    p.add_argument("prompt", help="the text to draw")
    p.add_argument("--targets", default=None,
                   help="comma-separated target words or phrases; a number is a token index (attnreg tokens), a word named twice its next occurrence (circle,circle = circle,circle#2) (default: the prompt's nouns)")
    add_model_args(p)
    p.add_argument("--seed", type=seed, default=42, help="noise seed of both runs, 0..2**64-1 (default: 42)")
    add_sampling_args(p)
    p.add_argument("--steps-shown", default=None,
                   help="comma-separated steps of maps.png (default: 0,5,15,25,35,49 scaled to --steps)")
    p.add_argument("--violin-steps", default=None,
                   help="the two steps of stats.png (default: 0 and the last edited step)")
    p.add_argument("--record-layers", default=None, help="blocks or attn2 modules to record (default: the edited ones)")
    p.add_argument("--preview", default="latents", choices=["latents", "x0"],
                   help="intermediate images: the current latents (default, as in the paper) or the x0 prediction")
    p.add_argument("--map-scale", default="panel", choices=list(MAP_SCALES),
                   help="colours of the maps: each its own range (panel, default, as the paper) or one for all (figure)")
    p.add_argument("--out", default=None, help="output folder (default: outputs/explain_<prompt>_seed<N>)")
    add_regulation_args(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_explain)
