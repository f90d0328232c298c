"""`attnreg bench`, `attnreg score`, `attnreg report`: the benchmark of attnreg.eval."""

from __future__ import annotations

import argparse

from ..options import split_list
from .common import MODEL_HELP, add_sampling_args, add_threads_arg, model_name, positive_int


def _add_metric_model_args(p: argparse.ArgumentParser) -> None:
    from ..eval.scorers import DEFAULT_BLIP, DEFAULT_CLIP, DEFAULT_OWL

    p.add_argument("--clip-model", default=None, help=f"CLIP id or local folder for clip and blip (default {DEFAULT_CLIP}) "
                   "and geneval's colours (default openai/clip-vit-large-patch14)")
    p.add_argument("--blip-model", default=None, help=f"BLIP captioner id or local folder (default {DEFAULT_BLIP})")
    p.add_argument("--owl-model", default=None, help=f"OWLv2/OWL-ViT id or local folder (default {DEFAULT_OWL})")
    p.add_argument("--owl-threshold", type=float, default=None, help="OWL detection score threshold (default 0.1)")
    p.add_argument("--geneval-detector", default=None, choices=["owlv2", "shapes"],
                   help="the geneval metric's detector: owlv2 (--owl-model, colours by --clip-model, default "
                   "openai/clip-vit-large-patch14) or shapes (the embedded world's exact detector) (default owlv2)")
    p.add_argument("--geneval-threshold", type=float, default=None, help="geneval: detection threshold (default 0.3)")
    p.add_argument("--geneval-counting-threshold", type=float, default=None,
                   help="geneval: detection threshold of counting prompts (default 0.9)")


def _metric_options(args) -> dict:
    return {"clip_model": args.clip_model, "blip_model": args.blip_model, "owl_model": args.owl_model,
            "owl_threshold": args.owl_threshold, "geneval_detector": args.geneval_detector,
            "geneval_threshold": args.geneval_threshold, "geneval_counting_threshold": args.geneval_counting_threshold}


def bench_options(args) -> dict:
    """The runner's options (`BenchmarkOptions` fields) from the parsed arguments of `bench` or `ablate`."""
    options = dict(
        dataset=args.dataset, seeds=args.seeds, model=args.model, out=args.out, steps=args.steps,
        guidance=args.guidance, size=args.size, max_sequence_length=getattr(args, "max_sequence_length", None),
        limit=args.limit, subsets=split_list(args.subsets),
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


def register(sub) -> None:
    from ..eval.datasets import DATASETS
    from ..eval.methods import METHODS
    from ..eval.metrics import METRICS

    b = sub.add_parser(
        "bench", help="generate a data set with several methods (resumable, multi-process), then score and report",
        description="Every (prompt, seed, method) writes DIR/images/<key>.png and DIR/records/<key>.json; a rerun "
        "skips finished items. Under `accelerate launch` or `torchrun` the items are shared among the processes.",
    )
    b.add_argument("--dataset", required=True, help=f"{', '.join(DATASETS)}")
    b.add_argument("--subsets", default=None, help="comma-separated subsets (default: all)")
    b.add_argument("--methods", default="sd,attnreg", help=f"comma-separated, from: {', '.join(METHODS)} (default: sd,attnreg)")
    b.add_argument("--seeds", default="0-63", help="e.g. 0-63, 0,1,2 or 0-15,20 (default 0-63)")
    b.add_argument("--model", type=model_name, default=None, help=MODEL_HELP)
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--max-sequence-length", type=positive_int, default=None,
                   help="SD3 / FLUX only: the call's max_sequence_length, the T5 length (SD3 without T5: its zero "
                   "columns; the embedded MMDiT is trained for 8 and 256) (default: the pipeline's)")
    b.add_argument("--metrics", default="auto",
                   help=f"comma-separated, from: {', '.join(METRICS)}; none; auto (default: detect for shapes, geneval for geneval, clip otherwise)")
    add_sampling_args(b)
    b.add_argument("--limit", type=int, default=None, help="at most N prompts per subset")
    b.add_argument("--device", default="cpu", help="cpu, cuda, ... (each process takes its own GPU when distributed)")
    b.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the pipeline's dtype (default: float32)")
    b.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                   help="a method option (JSON value), e.g. attend-and-excite.max_iter_to_alter=10, attnreg.edit_steps=20; repeatable")
    add_threads_arg(b, " per process")
    b.set_defaults(on_interrupt="finished images are kept; the same command resumes")
    b.add_argument("--force", action="store_true", help="write beside records of another configuration (never overwrites)")
    b.add_argument("--warmup", action="store_true", help="one untimed image per method first (fairer seconds/image)")
    b.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_metric_model_args(b)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("score", help="compute metrics for a benchmark folder (resumable)")
    s.add_argument("dir", help="the benchmark folder (attnreg bench --out)")
    s.add_argument("--metrics", required=True, help=f"comma-separated, from: {', '.join(METRICS)}")
    s.add_argument("--device", default="cpu", help="where the metric models run: cpu, cuda, ... (default: cpu)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_metric_model_args(s)
    s.set_defaults(func=cmd_score)

    r = sub.add_parser("report", help="write report.md and figures for a benchmark folder")
    r.add_argument("dir", help="the benchmark folder (attnreg bench --out)")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    r.set_defaults(func=cmd_report)
