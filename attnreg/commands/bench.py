"""`attnreg bench`, `attnreg score`, `attnreg report`: the benchmark of attnreg.eval."""

from __future__ import annotations

import argparse

from ..names import split_list
from .common import add_sampling_args


def _add_metric_model_args(p: argparse.ArgumentParser) -> None:
    from ..eval.metrics import DEFAULT_BLIP, DEFAULT_CLIP, DEFAULT_OWL

    p.add_argument("--clip-model", default=None, help=f"CLIP id or local folder for clip and blip (default {DEFAULT_CLIP})")
    p.add_argument("--blip-model", default=None, help=f"BLIP captioner id or local folder (default {DEFAULT_BLIP})")
    p.add_argument("--owl-model", default=None, help=f"OWLv2/OWL-ViT id or local folder (default {DEFAULT_OWL})")
    p.add_argument("--owl-threshold", type=float, default=None, help="OWL detection score threshold (default 0.1)")


def _metric_options(args) -> dict:
    return {"clip_model": args.clip_model, "blip_model": args.blip_model, "owl_model": args.owl_model,
            "owl_threshold": args.owl_threshold}


def bench_options(args) -> dict:
    """The runner's options (`BenchmarkOptions` fields) from the parsed arguments of `bench` or `ablate`."""
    options = dict(
        dataset=args.dataset, seeds=args.seeds, model=args.model, out=args.out, steps=args.steps,
        guidance=args.guidance, size=args.size, limit=args.limit, subsets=split_list(args.subsets),
        device=args.device, dtype=args.dtype, progress=not args.no_progress,
    )
    options.update({k: getattr(args, k) for k in ("force", "warmup") if hasattr(args, k)})
    return options


def cmd_bench(args) -> int:
    import torch

    from ..eval.runner import parse_sets, run_benchmark

    torch.set_num_threads(args.threads)  # the images depend on it; the folder records it and refuses a mix
    options = bench_options(args)
    run_benchmark(options.pop("dataset"), args.methods, method_options=parse_sets(args.set), metrics=args.metrics,
                  metric_options=_metric_options(args), report=not args.no_report, **options)
    return 0


def cmd_score(args) -> int:
    from ..eval.metrics import score_dir

    score_dir(args.dir, args.metrics, device=args.device, progress=not args.no_progress, **_metric_options(args))
    return 0


def cmd_report(args) -> int:
    from ..eval.report import write_report

    print(write_report(args.dir))
    return 0


def _option_table() -> dict[str, dict]:
    """The options of the benchmark runner as `bench` declares them; `ablate` takes some with changes."""
    from ..eval.datasets import DATASETS
    from ..eval.methods import METHODS
    from ..eval.metrics import METRICS

    return {
        "--dataset": dict(required=True, help=f"{', '.join(DATASETS)}"),
        "--subsets": dict(default=None, help="comma-separated subsets (default: all)"),
        "--methods": dict(default="sd,attnreg", help=f"comma-separated, from: {', '.join(METHODS)} (default: sd,attnreg)"),
        "--seeds": dict(default="0-63", help="e.g. 0-63, 0,1,2 (default 0-63)"),
        "--model": dict(default=None, help="local pipeline folder or hub id (default: the embedded shapes model)"),
        "--out": dict(required=True, help="output folder"),
        "--metrics": dict(default="auto", help=f"comma-separated, from: {', '.join(METRICS)}; none; auto "
                          "(default: detect for shapes, clip otherwise)"),
        "--limit": dict(type=int, default=None, help="at most N prompts per subset"),
        "--device": dict(default="cpu", help="cpu, cuda, ... (each process takes its own GPU when distributed)"),
        "--dtype": dict(default="float32", choices=["float32", "float16", "bfloat16"]),
        "--set": dict(action="append", default=[], metavar="METHOD.OPTION=VALUE",
                      help="a method option (JSON value), e.g. attend-and-excite.max_iter_to_alter=10, "
                      "attnreg.edit_steps=20; repeatable"),
        "--threads": dict(type=int, default=1, help="torch CPU threads per process (default: 1)"),
        "--force": dict(action="store_true", help="write beside records of another configuration (never overwrites)"),
        "--warmup": dict(action="store_true", help="one untimed image per method first (fairer seconds/image)"),
        "--no-report": dict(action="store_true", help="do not write report.md at the end"),
        "--no-progress": dict(action="store_true"),
        "--debug": dict(action="store_true", help="show tracebacks"),
    }


def add_bench_options(p: argparse.ArgumentParser, *names: str, changes: dict[str, dict] | None = None) -> None:
    """Add the runner's options `names` to `p`, in that order, as `bench` has them; `changes` maps an
    option to the settings (default, help, ...) another command gives it."""
    table = _option_table()
    for name in names:
        p.add_argument(name, **{**table[name], **(changes or {}).get(name, {})})


def register(sub) -> None:
    from ..eval.metrics import METRICS

    b = sub.add_parser(
        "bench", help="generate a data set with several methods (resumable, multi-process), then score and report",
        description="Every (prompt, seed, method) writes DIR/images/<key>.png and DIR/records/<key>.json; a rerun "
        "skips finished items. Under `accelerate launch` or `torchrun` the items are shared among the processes.",
    )
    add_bench_options(b, "--dataset", "--subsets", "--methods", "--seeds", "--model", "--out", "--metrics")
    add_sampling_args(b)
    add_bench_options(b, "--limit", "--device", "--dtype", "--set", "--threads")
    b.set_defaults(on_interrupt="finished images are kept; the same command resumes")
    add_bench_options(b, "--force", "--warmup", "--no-report", "--no-progress", "--debug")
    _add_metric_model_args(b)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("score", help="compute metrics for a benchmark folder (resumable)")
    s.add_argument("dir")
    s.add_argument("--metrics", required=True, help=f"comma-separated, from: {', '.join(METRICS)}")
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--debug", action="store_true")
    _add_metric_model_args(s)
    s.set_defaults(func=cmd_score)

    r = sub.add_parser("report", help="write report.md and figures for a benchmark folder")
    r.add_argument("dir")
    r.add_argument("--debug", action="store_true")
    r.set_defaults(func=cmd_report)
