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

from ..options import DEFAULT_GUIDANCE, config_option, option_value, parse_seeds  # noqa: F401 - parse_seeds: the runner's public name too
from ..provenance import model_source, versions
from .datasets import Prompt, load_dataset
from .io import (
    atomic_save_image, atomic_write_json, claim, damaged, image_path, is_done, item_key, iter_records, noise_seed,
    record_path, release, remove_stale_tmp, stable_hash,
)
from .methods import METHODS, AttnReg, check_methods, make_method

# The fields of a run that must agree for records to share a folder.
RUN_KEYS = ("dataset", "model", "steps", "guidance", "height", "width", "dtype", "max_sequence_length", "config_key")
# How a method's configuration names its images (item keys hash `RegulationConfig.to_dict()`): raised whenever
# that dict changes for the same method, so a folder never mixes two namings of one configuration.
CONFIG_KEY = 2


class ConfigMismatchError(ValueError):
    """The output folder holds records of another configuration."""


def parse_sets(pairs: list[str] | None) -> dict[str, dict]:
    """["attnreg.edit_steps=2", "attend-and-excite.thresholds={}"] -> {"attnreg": {"edit_steps": 2}, ...}.
    Options of Attention Regulation's methods are `RegulationConfig` fields, parsed by the field's type (their
    preset is the method's: attnreg, attnreg-paper); other methods' values are JSON when they parse, else text."""
    out: dict[str, dict] = {}
    for pair in pairs or []:
        if "=" not in pair or "." not in pair.split("=", 1)[0]:
            raise ValueError(f"bad --set {pair!r}: use METHOD.OPTION=VALUE, e.g. attend-and-excite.max_iter_to_alter=10")
        lhs, value = pair.split("=", 1)
        method, option = lhs.rsplit(".", 1)
        if isinstance(METHODS.get(method), type) and issubclass(METHODS[method], AttnReg):
            if option == "preset":
                raise ValueError(f"--set {pair}: preset is not an option; choose it by the method "
                                 f"(attnreg: auto, attnreg-paper: paper)")
            out.setdefault(method, {})[option] = config_option(option, value, method)
        else:
            out.setdefault(method, {})[option] = option_value(value)
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
    run = {k: run.get(k) for k in RUN_KEYS}  # a key a run leaves out (max_sequence_length) reads as None, as in records
    others = [c for c in existing_run_configs(out) if c != run]
    if others and not force:
        diff = {k: (others[0].get(k), run.get(k)) for k in RUN_KEYS if others[0].get(k) != run.get(k)}
        text = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        if "config_key" in diff:
            raise ConfigMismatchError(
                f"{out} was made by an attnreg that named configurations differently ({text}): its images and "
                "scores stay readable by `attnreg report`, but `attnreg bench` cannot add to it; use a new --out "
                "folder (the same seeds give the same images)")
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
        denoiser = root / "unet" if (root / "unet").is_dir() else root / "transformer"  # SD / SD3
        sample = json.loads((denoiser / "config.json").read_text())["sample_size"]
        vae = json.loads((root / "vae" / "config.json").read_text())
        return int(sample) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, TypeError, ValueError):
        return None


@dataclass
class BenchmarkOptions:
    """The settings of one run: `run_benchmark`'s arguments, checked at once and normalised (methods,
    seeds and metrics as lists, "auto" metrics resolved, out a Path)."""

    dataset: str
    methods: list[str] | str
    seeds: str | int | list = "0-63"
    model: str | None = None  # None: the embedded shapes model
    out: str | Path = "bench"
    steps: int = 50
    guidance: float = DEFAULT_GUIDANCE
    size: int | None = None  # None: the model's own image size
    max_sequence_length: int | None = None  # SD3 / FLUX: the T5 length (SD3 without T5: its zero columns); None: the pipeline's
    limit: int | None = None
    subsets: list[str] | None = None
    device: str = "cpu"
    dtype: str = "float32"
    method_options: dict[str, dict] | None = None
    metrics: list[str] | str | None = "auto"
    metric_options: dict | None = None
    force: bool = False
    warmup: bool = False  # one untimed image per method first: timings then exclude start-up costs
    progress: bool = True
    report: bool = True

    def __post_init__(self):
        from .metrics import check_metrics, parse_metrics

        methods = self.methods.split(",") if isinstance(self.methods, str) else self.methods
        self.methods = [m.strip() for m in methods if m.strip()]
        check_methods(self.methods)
        self.method_options = dict(self.method_options or {})
        unknown = [m for m in self.method_options if m not in self.methods]
        if unknown:
            raise ValueError(f"--set names method(s) {', '.join(unknown)} that are not in --methods {','.join(self.methods)}")
        self.seeds = parse_seeds(self.seeds)
        if self.metrics == "auto":  # each data set's own scorer; CLIP similarity where it has none
            self.metrics = {"shapes": "detect", "geneval": "geneval"}.get(self.dataset.partition(":")[0], "clip")
        self.metrics = parse_metrics(self.metrics)
        check_metrics(self.metrics)
        self.metric_options = dict(self.metric_options or {})
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file, not a folder")

    @property
    def model_id(self) -> str:
        """The model as records name it: an embedded model's folder by its short name, so that a folder of
        results made in one checkout resumes in another."""
        from ..toy import DEFAULT_MODEL, MODELS, model_path

        if self.model is None:
            return "embedded"
        for name in MODELS:
            if Path(self.model).resolve() == model_path(name, check=False):
                return "embedded" if name == DEFAULT_MODEL else name
        return str(self.model)

    def run_config(self, height: int) -> dict:
        """The fields that must agree for records to share a folder (RUN_KEYS)."""
        run = {"dataset": self.dataset, "model": self.model_id, "steps": self.steps, "guidance": self.guidance,
               "height": height, "width": height, "dtype": self.dtype, "config_key": CONFIG_KEY}
        if self.max_sequence_length is not None:  # only when given: folders made without it keep their records
            run["max_sequence_length"] = self.max_sequence_length
        return run


@dataclass
class Plan:
    """One process's share of a run: the pipeline, the methods made on it, and the items."""

    pipe: object
    state: object  # accelerate's PartialState
    device: str
    run: dict
    prompts: list[Prompt]
    made: dict  # method name -> Method
    configs: dict  # method name -> its config (stored in records)
    hashes: dict  # method name -> stable hash of (run, name, config)
    items: list[Item]
    shard: list[Item]
    pending: list[Item]

    @property
    def call(self) -> dict:
        h = self.run["height"]
        call = dict(num_inference_steps=self.run["steps"], guidance_scale=self.run["guidance"], height=h, width=h)
        if self.run.get("max_sequence_length") is not None:
            call["max_sequence_length"] = self.run["max_sequence_length"]
        return call


def run_benchmark(dataset: str, methods: list[str] | str, **options) -> dict:
    """Generate every (prompt, seed, method) not already in `out`; then score and report (main process).

    `options` are the fields of `BenchmarkOptions` (seeds, model, out, steps, ...).
    Returns a summary dict: total, done_before, generated, seconds, out, ..."""
    return run(BenchmarkOptions(dataset, methods, **options))


def run(opts: BenchmarkOptions) -> dict:
    """`run_benchmark` on options already made (the loop over this process's pending items)."""
    started = time.perf_counter()
    plan = plan_items(opts)
    if opts.warmup:
        warm_up(plan)
    bar = _progress_bar(plan, opts.progress)
    outcomes = {"generated": 0, "elsewhere": 0, "done": 0}
    for it in plan.pending:
        outcomes[run_item(plan, it, opts.out)] += 1
        bar.set_postfix(left=len(plan.pending) - outcomes["generated"], refresh=False)
        bar.update(1)
    bar.close()
    plan.state.wait_for_everyone()
    return finish(plan, opts, outcomes["generated"], outcomes["elsewhere"], started)


def _load(opts: BenchmarkOptions):
    """The pipeline and the process state, after every check that needs no image: the folder's
    configuration and numerics, the metric models, the prompts' targets. Returns (pipe, state, device, run)."""
    from attnreg.pipelines import default_image_size, load_pipeline

    model = opts.model
    if model is None:
        from ..toy import model_path

        model = model_path()
    early = _local_model_height(model, opts.size)
    if early is not None:  # refuse before the (slow) pipeline load when the folder says enough
        check_folder(opts.out, opts.run_config(early), opts.force)
    state = distributed_state(opts.device)
    device = opts.device
    if state.num_processes > 1 and str(device).startswith("cuda"):
        device = str(state.device)
    pipe = load_pipeline(model, device, opts.dtype)
    run = opts.run_config(opts.size or default_image_size(pipe))
    check_folder(opts.out, run, opts.force)  # before anything is written
    check_numerics(opts.out, numerics(device), opts.force)
    if state.is_main_process:
        from .metrics import check_metric_models

        check_metric_models(opts.metrics, device=device, **opts.metric_options)  # before any image
        stale = remove_stale_tmp(opts.out) if opts.out.is_dir() else 0
        if stale:
            print(f"attnreg bench: removed {stale} temporary file(s) of interrupted writes", file=sys.stderr)
    return pipe, state, device, run


def plan_items(opts: BenchmarkOptions) -> Plan:
    """Load and check everything, make the methods, and list this process's items (pending: not done)."""
    from attnreg.tokens import resolve_targets

    from .metrics import check_metric_records

    prompts = load_dataset(opts.dataset, opts.subsets, opts.limit)
    check_metric_records(opts.metrics, [{"prompt": p.prompt, "dataset": p.dataset, "metadata": p.metadata}
                                        for p in prompts], **opts.metric_options)
    pipe, state, device, run = _load(opts)
    for p in prompts:
        if not p.targets:
            raise ValueError(f"no targets for prompt {p.prompt!r} ({p.dataset}, subset {p.subset}); give them in the prompt file")
        resolve_targets(pipe.tokenizer, p.prompt, list(p.targets))  # TargetError names the prompt
    made = {name: make_method(name, pipe, **opts.method_options.get(name, {})) for name in opts.methods}
    configs = {name: m.config() for name, m in made.items()}
    hashes = {name: stable_hash(run, name, configs[name]) for name in opts.methods}
    # seed-major: a run stopped part-way has every prompt for its first seeds (a balanced, paired subset)
    # rather than every seed for its first prompts
    items = [
        Item(p, seed, name, item_key(p.subset, name, p.prompt, seed, hashes[name], p.targets))
        for seed in opts.seeds for p in prompts for name in opts.methods
    ]
    # every method of one (prompt, seed) goes to the same process: the shares of work stay even, and
    # methods are timed side by side on the same device
    per_group = len(opts.methods)
    shard = [it for i, it in enumerate(items) if (i // per_group) % state.num_processes == state.process_index]
    pending = [it for it in shard if not is_done(opts.out, it.key)]
    broken = sum(damaged(opts.out, it.key) for it in pending)
    if broken:
        print(f"attnreg bench: {broken} damaged item(s) (unreadable record or image) will be made again", file=sys.stderr)
    return Plan(pipe, state, device, run, prompts, made, configs, hashes, items, shard, pending)


def _progress_bar(plan: Plan, progress: bool):
    from tqdm.auto import tqdm

    state = plan.state
    return tqdm(
        total=len(plan.shard), initial=len(plan.shard) - len(plan.pending), unit="img", disable=not progress,
        desc=f"bench [{state.process_index + 1}/{state.num_processes}]", position=state.process_index,
        dynamic_ncols=True, file=sys.stderr,
    )


def warm_up(plan: Plan) -> None:
    """One untimed image per method that has work left, so the first timing has no start-up cost."""
    import torch

    for name in dict.fromkeys(it.method for it in plan.pending):
        first = next(it for it in plan.pending if it.method == name)
        generator = torch.Generator("cpu").manual_seed(0)
        plan.made[name].generate(first.prompt.prompt, list(first.prompt.targets), generator, **plan.call)


def run_item(plan: Plan, it: Item, out: Path) -> str:
    """Make one item unless another process has it: "generated", "elsewhere" (claimed by another
    process) or "done" (finished by another process since the plan was made)."""
    import torch

    if not claim(out, it.key):
        return "elsewhere"
    if is_done(out, it.key):
        release(out, it.key)
        return "done"
    device = plan.device
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    generator = torch.Generator("cpu").manual_seed(noise_seed(it.prompt.prompt, it.seed))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    image = plan.made[it.method].generate(it.prompt.prompt, list(it.prompt.targets), generator, **plan.call)
    if cuda:
        torch.cuda.synchronize(device)
    record = make_record(plan, it, time.perf_counter() - t0)
    atomic_save_image(image_path(out, it.key), image)
    atomic_write_json(record_path(out, it.key), record, allow_nan=False)  # last: a PNG without a record never counts
    release(out, it.key)
    return "generated"


def make_record(plan: Plan, it: Item, seconds: float) -> dict:
    """The JSON record of a finished item (call it right after the image: it reads the peak memory)."""
    import torch

    from attnreg.tokens import resolve_targets

    tokenizer, p = plan.pipe.tokenizer, it.prompt
    memory, memory_kind = peak_memory(plan.device)
    indices = resolve_targets(tokenizer, p.prompt, list(p.targets))
    ids = tokenizer(p.prompt).input_ids
    return {
        "key": it.key, "image": f"images/{it.key}.png", "dataset": p.dataset, "subset": p.subset,
        "prompt": p.prompt, "targets": list(p.targets), "targets_source": p.targets_source,
        "token_indices": indices, "tokens": [tokenizer.convert_ids_to_tokens(ids[i]).replace("</w>", "") for i in indices],
        "seed": it.seed, "noise_seed": noise_seed(p.prompt, it.seed), "method": it.method,
        "config": plan.configs[it.method], "config_hash": plan.hashes[it.method][:6], "model": plan.run["model"],
        "run": plan.run, "seconds": seconds, "peak_memory_bytes": memory, "peak_memory_kind": memory_kind,
        "device": str(plan.device), "process": plan.state.process_index, "processes": plan.state.num_processes,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "versions": versions(), "dtype": plan.run["dtype"], "model_source": model_source(plan.pipe),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **full_config(plan.made[it.method]),
        **({} if p.metadata is None else {"metadata": p.metadata}),
    }


def full_config(method) -> dict:
    """{"regulation_config": every RegulationConfig field} for Attention Regulation's methods (their "config",
    which names the records' files, leaves out fields at their old defaults); {} for other methods."""
    config = getattr(method, "reg_config", None)
    return {} if config is None else {"regulation_config": json.loads(json.dumps(config.to_dict()))}


def finish(plan: Plan, opts: BenchmarkOptions, generated: int, taken_elsewhere: int, started: float) -> dict:
    """The summary; on the main process also the totals line, the scores and the report."""
    state, items = plan.state, plan.items
    done_before = len(plan.shard) - len(plan.pending)
    summary = {
        "out": str(opts.out), "total": len(items), "done_before": done_before, "generated": generated,
        "taken_elsewhere": taken_elsewhere, "shard": len(plan.shard), "process": state.process_index,
        "processes": state.num_processes, "seconds": time.perf_counter() - started,
    }
    if not state.is_main_process:
        return summary
    summary["complete"] = sum(is_done(opts.out, it.key) for it in items)
    print(
        f"attnreg bench: {len(items)} items ({len(plan.prompts)} prompts x {len(opts.seeds)} seeds x "
        f"{len(opts.methods)} methods), {summary['complete']} complete, {generated} generated by this process, "
        f"{done_before} already done, {summary['seconds']:.1f} s, {state.num_processes} process(es) -> {opts.out}",
        file=sys.stderr,
    )
    if opts.metrics:
        from .metrics import score_dir

        summary["scores"] = score_dir(opts.out, opts.metrics, device=plan.device, progress=opts.progress,
                                      **opts.metric_options)
    if opts.report:
        from .report import write_report

        summary["report"] = str(write_report(opts.out))
    return summary
