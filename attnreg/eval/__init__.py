"""Benchmarking: data sets, methods, a resumable multi-process runner, metrics and reports.

    from attnreg.eval import run_benchmark, score_dir, write_report
    run_benchmark("ae", "sd,attnreg", seeds="0-3", model="path/to/sd", out="bench", limit=2)
    score_dir("bench", "clip", clip_model="path/to/clip")
    write_report("bench")
"""

from .datasets import DATASETS, DatasetError, Prompt, ae_prompts, load_dataset
from .methods import METHODS, Method, MethodError, register_method
from .metrics import METRICS, Metric, MetricError, register_metric, score_dir
from .scorers import MetricModelError
from .report import write_report
from .runner import ConfigMismatchError, parse_seeds, run_benchmark

__all__ = [
    "DATASETS", "DatasetError", "Prompt", "ae_prompts", "load_dataset",
    "METHODS", "Method", "MethodError", "register_method",
    "METRICS", "Metric", "MetricError", "MetricModelError", "register_metric", "score_dir",
    "write_report", "ConfigMismatchError", "parse_seeds", "run_benchmark",
]
