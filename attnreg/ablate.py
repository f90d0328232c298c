"""`attnreg ablate`: one regulation parameter swept over values with the benchmark runner (Fig. 5).

Every value is one configuration of the `attnreg` method of `attnreg.eval`; all of them, and the plain
`sd` baseline, go into one benchmark folder (their file names differ by a hash of the configuration,
so a rerun resumes and a value already done is not generated again). The result: fidelity with its
95 % interval and seconds per image against the parameter, `sd` as a dashed line.

    from attnreg.ablate import ablate
    result = ablate("edit_steps", [0, 5, 10, 25], dataset="shapes", seeds="0-7", limit=10, out="abl")
    result.figure; result.rows
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# --param name -> RegulationConfig field. beta is the paper's name for the regulariser's weight (Fig. 5),
# epsilon in the config.
PARAMS = {"layers": "layers", "edit_steps": "edit_steps", "beta": "epsilon", "iterations": "iterations"}


@dataclass
class Ablation:
    param: str
    values: list
    fidelity: str  # "metric.field"
    rows: list[dict]  # per value (and "sd"): fidelity and seconds summaries
    figure: object = None
    files: list[Path] = field(default_factory=list)


def parse_values(param: str, text: str | list) -> list:
    """--values for `param`: numbers separated by commas ("0,5,10,25"); for layers, layer sets separated
    by semicolons, the blocks of one set by commas or "+" ("down_blocks.2;down_blocks.2,up_blocks.1")."""
    if param not in PARAMS:
        raise ValueError(f"unknown --param {param!r}; valid: {', '.join(PARAMS)}")
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(";" if param == "layers" else ",") if p.strip()]
    else:
        parts = list(text)
    if not parts:
        raise ValueError(f"--values for {param} is empty")
    values = []
    for part in parts:
        if param == "layers":
            blocks = part.replace("+", ",").split(",") if isinstance(part, str) else list(part)
            blocks = tuple(b.strip() for b in blocks if b.strip())
            if not blocks:
                raise ValueError(f"an empty layer set in --values {text!r}")
            values.append(blocks)
            continue
        try:
            value = float(part) if param == "beta" else int(part)
        except (TypeError, ValueError):
            kind = "numbers" if param == "beta" else "integers"
            raise ValueError(f"--values for {param} must be comma-separated {kind}, got {part!r}") from None
        if value < 0 or (param == "iterations" and value < 1) or (param == "beta" and not math.isfinite(value)):
            raise ValueError(f"--values for {param}: {part!r} is out of range")
        values.append(value)
    if len(set(values)) != len(values):
        raise ValueError(f"--values for {param} repeats a value: {text!r}")
    return values


def label(value) -> str:
    return "+".join(value) if isinstance(value, (tuple, list)) else f"{value:g}" if isinstance(value, float) else str(value)


def default_fidelity(dataset: str) -> str:
    return "detect.success" if dataset == "shapes" else "clip.full"


def ablate(
    param: str,
    values,
    dataset: str = "shapes",
    seeds="0-7",
    out: str | Path = "ablate",
    limit: int | None = 10,
    metrics: str = "auto",
    fidelity: str | None = None,
    metric_options: dict | None = None,
    **bench_options,
) -> Ablation:
    """Run the benchmark for every value of `param` (and `sd` once), score, and plot.

    `bench_options` go to the runner as they are (`attnreg.eval.runner.BenchmarkOptions`: model, steps,
    device, progress, ...); the methods, their options, the metrics and the report are ablate's own."""
    from dataclasses import replace

    from .eval.metrics import score_dir
    from .eval.runner import BenchmarkOptions, run

    own = {"methods", "method_options", "report"} & set(bench_options)
    if own:
        raise TypeError(f"ablate sets {', '.join(sorted(own))} itself")
    values = parse_values(param, values)
    config_field = PARAMS[param]
    fidelity = fidelity or default_fidelity(dataset)
    if "." not in fidelity:
        raise ValueError(f"--fidelity must be METRIC.FIELD such as detect.success or clip.full, got {fidelity!r}")
    base = BenchmarkOptions(dataset, ["sd", "attnreg"], seeds=seeds, out=out, limit=limit, metrics=None,
                            report=False, **bench_options)
    for i, value in enumerate(values):
        run(replace(base, methods=["sd", "attnreg"] if i == 0 else ["attnreg"],
                    method_options={"attnreg": {config_field: value}}))
    if metrics == "auto":
        metrics = fidelity.split(".")[0]
    score_dir(base.out, metrics, device=base.device, progress=base.progress, **(metric_options or {}))

    rows = collect(base.out, param, values, fidelity, dataset, base.seeds)
    result = Ablation(param, values, fidelity, rows)
    result.figure = figure(result)
    base.out.mkdir(parents=True, exist_ok=True)
    png, js = base.out / f"ablate_{param}.png", base.out / f"ablate_{param}.json"
    result.figure.savefig(png, dpi=110)
    js.write_text(json.dumps({"param": param, "config_field": config_field, "values": [label(v) for v in values],
                              "fidelity": fidelity, "dataset": dataset, "seeds": base.seeds, "rows": rows}, indent=1))
    result.files = [png, js]
    return result


def collect(out: Path, param: str, values: list, fidelity: str, dataset: str, seeds: list[int]) -> list[dict]:
    """Per value of `param` (and `sd`): fidelity and seconds per image, with 95 % intervals."""
    from .eval.io import iter_records
    from .eval.metrics import load_scores
    from .eval.stats import summarise

    metric, field_name = fidelity.split(".", 1)
    scores = load_scores(out).get(metric, {}).get("items", {})
    config_field = PARAMS[param]
    wanted = {label(v): v for v in values}
    groups: dict[str, dict[str, list]] = {"sd": {"fidelity": [], "seconds": []}}
    groups.update({k: {"fidelity": [], "seconds": []} for k in wanted})
    for r in iter_records(out):
        if r.get("dataset") != dataset or r.get("seed") not in seeds:
            continue
        if r["method"] == "sd":
            key = "sd"
        elif r["method"] == "attnreg":
            value = r["config"].get(config_field)
            key = label(tuple(value) if isinstance(value, list) else value)
            if key not in wanted:
                continue
        else:
            continue
        groups[key]["seconds"].append(float(r["seconds"]))
        v = scores.get(r["key"], {}).get(field_name)
        if isinstance(v, (bool, int, float)):
            groups[key]["fidelity"].append(v)
    rows = []
    for key, g in groups.items():
        if not g["seconds"]:
            continue
        rows.append({"value": key, "n": len(g["seconds"]), "fidelity": summarise(g["fidelity"]),
                     "seconds": summarise(g["seconds"])})
    if not any(row["fidelity"]["n"] for row in rows):
        raise ValueError(f"no {fidelity} scores in {out}; is the metric right for data set {dataset!r}?")
    return rows


def figure(result: Ablation):
    """Fidelity and seconds per image against the parameter, with 95 % intervals; `sd` dashed."""
    from .figures import ablation_figure

    return ablation_figure(result)
