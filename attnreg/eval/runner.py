"""`attnreg bench`: every (prompt, seed, method) of a data set, one PNG and one JSON record each.

Resumable (finished items are skipped), sharded across processes under `accelerate launch` / `torchrun`
(results do not depend on the sharding: each image has its own generator, seeded from a stable hash of
(prompt, seed)), and refuses to mix configurations in one folder unless forced.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .datasets import Prompt, load_dataset
from .io import (
    atomic_save_image, atomic_write_json, claim, damaged, image_path, is_done, item_key, iter_records, noise_seed,
    record_path, release, remove_stale_tmp, stable_hash,
)
from .methods import check_methods, make_method

# The fields of a run that must agree for records to share a folder.
RUN_KEYS = ("dataset", "model", "steps", "guidance", "height", "width", "dtype")


class ConfigMismatchError(ValueError):
    """The output folder holds records of another configuration."""


def parse_seeds(text: str | int | list) -> list[int]:
    """"0-63", "0,3,7", "0-3,10" -> list of ints (in order, without repeats)."""
    if isinstance(text, int):
        return [text]
    if isinstance(text, (list, tuple)):
        return [int(s) for s in text]
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(lo), int(hi)
                if hi < lo:
                    raise ValueError
                new = list(range(lo, hi + 1))
            else:
                new = [int(part)]
        except ValueError:
            raise ValueError(f"bad --seeds {text!r}: use e.g. 0-63, 0,1,2 or 0-3,10") from None
        seeds += [s for s in new if s not in seeds]
    if not seeds:
        raise ValueError(f"bad --seeds {text!r}: no seeds")
    return seeds


def parse_sets(pairs: list[str] | None) -> dict[str, dict]:
    """["attnreg.edit_steps=2", "attend-and-excite.thresholds={}"] -> {"attnreg": {"edit_steps": 2}, ...}.
    Values are JSON when they parse as JSON, else strings."""
    out: dict[str, dict] = {}
    for pair in pairs or []:
        if "=" not in pair or "." not in pair.split("=", 1)[0]:
            raise ValueError(f"bad --set {pair!r}: use METHOD.OPTION=VALUE, e.g. attend-and-excite.max_iter_to_alter=10")
        lhs, value = pair.split("=", 1)
        method, option = lhs.rsplit(".", 1)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        if isinstance(value, list):
            value = tuple(value)
        out.setdefault(method, {})[option] = value
    return out


@dataclass(frozen=True)
class Item:
    prompt: Prompt
    seed: int
    method: str
    key: str


def distributed_state(device: str):
    """accelerate's PartialState (cpu=True without a GPU); one process when not launched distributed."""
    import torch
    from accelerate import PartialState

    cpu = str(device).startswith("cpu") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def peak_memory(device) -> tuple[int, str]:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process max RSS (resource.getrusage)"


def existing_run_configs(out: Path) -> list[dict]:
    seen = []
    for record in iter_records(out):
        run = {k: record.get("run", {}).get(k) for k in RUN_KEYS}
        if run not in seen:
            seen.append(run)
    return seen


def check_folder(out: Path, run: dict, force: bool) -> None:
    others = [c for c in existing_run_configs(out) if c != run]
    if others and not force:
        diff = {k: (others[0].get(k), run.get(k)) for k in RUN_KEYS if others[0].get(k) != run.get(k)}
        text = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ConfigMismatchError(
            f"{out} already holds records of another configuration ({text}). Use another --out folder, or --force "
            "to add this configuration beside them (nothing already written is deleted or overwritten: file "
            "names include a hash of the configuration)."
        )


def numerics(device) -> dict:
    """What changes an image's last bits besides the configuration: torch's version, its CPU thread count
    (attnreg's images moved by up to 127/255 between thread counts) and the kind of device."""
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device).split(":")[0]}


def check_numerics(out: Path, now: dict, force: bool) -> None:
    """Refuse to add images made with other numerics to a folder (records of before this check carry no
    thread count; their torch version and device are still compared)."""
    for record in iter_records(out):
        there = {"torch": record.get("torch"), "threads": record.get("threads"),
                 "device": str(record.get("device", "")).split(":")[0] or None}
        diff = {k: (there[k], now[k]) for k in now if there[k] is not None and there[k] != now[k]}
        if diff and not force:
            text = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ConfigMismatchError(
                f"{out} holds images made with other numerics ({text}); the same settings give other pixels, "
                "so a resumed run must match (for threads: --threads). Use another --out folder, or --force."
            )


def _local_model_height(model, size) -> int | None:
    """The default image side of a local diffusers folder, read from its configs (None: unknown)."""
    if size:
        return size
    try:
        root = Path(model)
        unet = json.loads((root / "unet" / "config.json").read_text())
        vae = json.loads((root / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, TypeError, ValueError):
        return None


def run_benchmark(
    dataset: str,
    methods: list[str] | str,
    seeds="0-63",
    model: str | None = None,
    out: str | Path = "bench",
    steps: int = 50,
    guidance: float = 7.5,
    size: int | None = None,
    limit: int | None = None,
    subsets: list[str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    method_options: dict[str, dict] | None = None,
    metrics: list[str] | str | None = "auto",
    metric_options: dict | None = None,
    force: bool = False,
    warmup: bool = False,
    progress: bool = True,
    report: bool = True,
) -> dict:
    """Generate every (prompt, seed, method) not already in `out`; then score and report (main process).

    warmup: make one untimed image per method first (timings then exclude start-up costs).
    Returns a summary dict: total, done_before, generated, seconds, out."""
    import torch
    from tqdm.auto import tqdm

    from attnreg.pipelines import load_pipeline
    from attnreg.tokens import resolve_targets

    started = time.perf_counter()
    methods = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    methods = [m for m in methods if m]
    check_methods(methods)
    method_options = method_options or {}
    unknown = [m for m in method_options if m not in methods]
    if unknown:
        raise ValueError(f"--set names method(s) {', '.join(unknown)} that are not in --methods {','.join(methods)}")
    seeds = parse_seeds(seeds)
    if metrics == "auto":
        metrics = "detect" if dataset == "shapes" else "clip"
    from .metrics import check_metric_models, check_metrics, parse_metrics

    check_metrics(parse_metrics(metrics))
    prompts = load_dataset(dataset, subsets, limit)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    model_id = "embedded" if model is None else str(model)

    if model is None:
        from ..toy import model_path

        model = model_path()
    early = _local_model_height(model, size)
    if early is not None:  # refuse before the (slow) pipeline load when the folder says enough
        check_folder(out, {"dataset": dataset, "model": model_id, "steps": steps, "guidance": guidance,
                           "height": early, "width": early, "dtype": dtype}, force)

    state = distributed_state(device)
    if state.num_processes > 1 and str(device).startswith("cuda"):
        device = str(state.device)
    pipe = load_pipeline(model, device, dtype)
    height = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    run = {"dataset": dataset, "model": model_id, "steps": steps, "guidance": guidance, "height": height,
           "width": height, "dtype": dtype}
    check_folder(out, run, force)  # before anything is written
    check_numerics(out, numerics(device), force)
    if state.is_main_process:
        check_metric_models(parse_metrics(metrics), device=device, **(metric_options or {}))  # before any image
        stale = remove_stale_tmp(out) if out.is_dir() else 0
        if stale:
            print(f"attnreg bench: removed {stale} temporary file(s) of interrupted writes", file=sys.stderr)

    for p in prompts:
        if not p.targets:
            raise ValueError(f"no targets for prompt {p.prompt!r} ({p.dataset}, subset {p.subset}); give them in the prompt file")
        resolve_targets(pipe.tokenizer, p.prompt, list(p.targets))  # TargetError names the prompt

    made = {name: make_method(name, pipe, **method_options.get(name, {})) for name in methods}
    method_configs = {name: m.config() for name, m in made.items()}
    config_hash = {name: stable_hash(run, name, method_configs[name]) for name in methods}
    # seed-major: a run stopped part-way has every prompt for its first seeds (a balanced, paired subset)
    # rather than every seed for its first prompts
    items = [
        Item(p, seed, name, item_key(p.subset, name, p.prompt, seed, config_hash[name], p.targets))
        for seed in seeds for p in prompts for name in methods
    ]
    # every method of one (prompt, seed) goes to the same process: the shares of work stay even, and
    # methods are timed side by side on the same device
    per_group = len(methods)
    shard = [it for i, it in enumerate(items) if (i // per_group) % state.num_processes == state.process_index]
    pending = [it for it in shard if not is_done(out, it.key)]
    broken = sum(damaged(out, it.key) for it in pending)
    if broken:
        print(f"attnreg bench: {broken} damaged item(s) (unreadable record or image) will be made again", file=sys.stderr)
    call = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=height)

    bar = tqdm(
        total=len(shard), initial=len(shard) - len(pending), unit="img", disable=not progress,
        desc=f"bench [{state.process_index + 1}/{state.num_processes}]", position=state.process_index,
        dynamic_ncols=True, file=sys.stderr,
    )
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if warmup:  # one untimed image per method that has work left, so the first timing has no start-up cost
        for name in dict.fromkeys(it.method for it in pending):
            first = next(it for it in pending if it.method == name)
            made[name].generate(first.prompt.prompt, list(first.prompt.targets), torch.Generator("cpu").manual_seed(0), **call)
    generated = taken_elsewhere = 0
    for it in pending:
        if not claim(out, it.key):
            taken_elsewhere += 1  # another process on this folder is making it
            bar.update(1)
            continue
        if is_done(out, it.key):  # finished by another process since the list was made
            release(out, it.key)
            bar.update(1)
            continue
        generator = torch.Generator("cpu").manual_seed(noise_seed(it.prompt.prompt, it.seed))
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        image = made[it.method].generate(it.prompt.prompt, list(it.prompt.targets), generator, **call)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        memory, memory_kind = peak_memory(device)
        indices = resolve_targets(pipe.tokenizer, it.prompt.prompt, list(it.prompt.targets))
        ids = pipe.tokenizer(it.prompt.prompt).input_ids
        atomic_save_image(image_path(out, it.key), image)
        record = {
            "key": it.key, "image": f"images/{it.key}.png", "dataset": it.prompt.dataset, "subset": it.prompt.subset,
            "prompt": it.prompt.prompt, "targets": list(it.prompt.targets), "targets_source": it.prompt.targets_source,
            "token_indices": indices, "tokens": [pipe.tokenizer.convert_ids_to_tokens(ids[i]).replace("</w>", "") for i in indices],
            "seed": it.seed, "noise_seed": noise_seed(it.prompt.prompt, it.seed), "method": it.method,
            "config": method_configs[it.method], "config_hash": config_hash[it.method][:6], "model": model_id, "run": run,
            "seconds": seconds, "peak_memory_bytes": memory, "peak_memory_kind": memory_kind,
            "device": str(device), "process": state.process_index, "processes": state.num_processes,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_json(record_path(out, it.key), record)  # last: a PNG without a record never counts
        release(out, it.key)
        generated += 1
        bar.set_postfix(left=len(pending) - generated, refresh=False)
        bar.update(1)
    bar.close()
    state.wait_for_everyone()

    summary = {
        "out": str(out), "total": len(items), "done_before": len(shard) - len(pending), "generated": generated,
        "taken_elsewhere": taken_elsewhere,
        "shard": len(shard), "process": state.process_index, "processes": state.num_processes,
        "seconds": time.perf_counter() - started,
    }
    if not state.is_main_process:
        return summary
    complete = sum(is_done(out, it.key) for it in items)
    summary["complete"] = complete
    print(
        f"attnreg bench: {len(items)} items ({len(prompts)} prompts x {len(seeds)} seeds x {len(methods)} methods), "
        f"{complete} complete, {generated} generated by this process, {len(shard) - len(pending)} already done, "
        f"{summary['seconds']:.1f} s, {state.num_processes} process(es) -> {out}",
        file=sys.stderr,
    )
    if parse_metrics(metrics):
        from .metrics import score_dir

        summary["scores"] = score_dir(out, metrics, device=device, progress=progress, **(metric_options or {}))
    if report:
        from .report import write_report

        summary["report"] = str(write_report(out))
    return summary
