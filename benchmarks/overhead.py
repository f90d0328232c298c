"""Overhead of Attention Regulation against the plain pipeline, every method measured in the same run.

Two models:
  --model sd15 (default): an SD 1.5-shaped pipeline (the real UNet and CLIP ViT-L text-encoder configs,
    random weights: no download needed, and speed does not depend on the weights), guidance 7.5, the first
    half of the steps edited on the structural layers (`down_blocks.2`, `up_blocks.1`: 16 x 16 maps at
    512 px) for every preset: the `auto` preset's calibration would take hours on a CPU and means nothing
    on random weights. Random weights never neglect a target, so `auto`'s gate hands every call back to
    SDPA; the `-every` rows switch the gate off (neglect_ratio=None) to show the cost of a call that is
    edited, the worst case.
  --model embedded: the embedded shapes model (attnreg.toy), 50 steps at 64 x 64, 2 two-object and 2
    three-object prompts, the calibrated layer.
  --model embedded-mmdit: the embedded MMDiT (SD3) model, its own sampler (28 steps, guidance 3), the same
    prompts, the calibrated joint block; `taca` (TextAttentionScaling) is a method here.

Methods: sd; auto (the default); paper; taca (MMDiT only); and on request auto-every, auto-no-concentration (binding 2 alone) and
auto-compiled(-every) (compile="on": torch.compile also on CPU; no
dispatch-mode operator count, since torch.compile does not run under one: benchmarks/archive/compiled_edit.py
counts the edit's launches alone; the profiler column counts them in the whole pipeline). They are timed in turn within each repeat (drift hits all alike);
seconds per image are medians over repeats. Then, per method, the ATen operator calls that compute (each at
least one kernel launch on a GPU; views apart) per image, with the extra over sd extrapolated to 50 steps
(the extra is per edited layer call, so it scales with the edited steps); the same as kernel launches counted
by the profiler (`count_launches`: leaf ATen operators plus inductor's generated kernels), the one
count that also covers the compiled rows; and the peak RSS of a fresh
process that builds the pipeline and makes one image with that method (ru_maxrss; on CUDA, the peak of
allocated memory in this process).

    OMP_NUM_THREADS=1 python benchmarks/overhead.py --model embedded --repeats 5
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --model embedded-mmdit --repeats 5
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --steps 4 --size 256 --repeats 5
    python benchmarks/overhead.py --device cuda --dtype float16 --steps 50 --repeats 5

The VAE decode is skipped (output_type="latent"): it is the same for all and not what we measure.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnreg import AttentionRegulator, RegulationConfig
from attnreg.tokenizer import load_clip_tokenizer

PROMPT, TARGETS = "a painting of an elephant with glasses", ["elephant", "glasses"]
METHODS = ("sd", "auto", "paper", "taca", "auto-every", "auto-compiled", "auto-compiled-every",
           "auto-no-concentration")


def sd15_pipeline(device: str, dtype: torch.dtype):
    """StableDiffusionPipeline with SD 1.5's UNet, VAE and text-encoder configs, random weights."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
    ))
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=load_clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


# Reshapes that never launch a kernel, though their schema does not mark them as views.
NO_KERNEL = {"aten._unsafe_view", "aten.reshape", "aten.contiguous"}


class OpCounter(TorchDispatchMode):
    """Counts ATen operator calls that compute (each is at least one kernel launch on a GPU); view
    operations (permute, unsqueeze, select, ...) are counted apart, since they launch nothing."""

    def __init__(self):
        super().__init__()
        self.counts, self.views = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        (self.views if func.is_view or name in NO_KERNEL else self.counts)[name] += 1
        return func(*args, **(kwargs or {}))


# Leaf operators that allocate, alias or hand back their input, and launch nothing.
NO_LAUNCH = {"empty", "empty_strided", "empty_like", "to", "lift_fresh", "detach", "detach_", "alias", "resolve_conj",
             "resolve_neg", "set_", "result_type", "is_nonzero"}


def _launches_a_kernel(name: str) -> bool:
    """An ATen operator by its profiler name ("aten::softmax"): False for views, reshapes and NO_LAUNCH."""
    short = name.split("::")[-1]
    if short in NO_LAUNCH or f"aten.{short}" in NO_KERNEL:
        return False
    packet = getattr(torch.ops.aten, short, None)
    return packet is None or not packet.overloads() or not getattr(packet, packet.overloads()[0]).is_view


def count_launches(run) -> int:
    """Kernel launches of `run()`, counted one way for eager and compiled code alike (the profiler): the
    ATen operators that call no other ATen operator (the ones that do the work), views and allocations
    apart, plus every kernel inductor generated (its C++ kernel profiling on, or a Triton kernel)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = list(prof.events())
    calls_aten = {id(e.cpu_parent) for e in events if e.cpu_parent is not None and e.name.startswith("aten::")}
    total = 0
    for e in events:
        if "cpp_fused" in e.name or e.name.startswith("triton_"):
            total += 1
        elif e.name.startswith("aten::") and id(e) not in calls_aten and _launches_a_kernel(e.name):
            total += 1
    return total


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:  # this process's own peak RSS: ru_maxrss would count the parent's RSS at fork (Linux keeps it over exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def embedded_pipeline(device: str, dtype: torch.dtype, name: str = "toy-unet"):
    from attnreg.toy import load_pipeline

    pipe = load_pipeline(device, dtype, name=name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embedded_prompts() -> list[tuple[str, list[str]]]:
    """Two two-object and two three-object prompts of the benchmark, with their shapes as targets."""
    from attnreg.toy.prompts import shapes_prompts
    from attnreg.toy.world import SHAPES

    prompts = shapes_prompts(2, 2) + shapes_prompts(3, 2)
    return [(p, [w.strip(",") for w in p.split() if w.strip(",") in SHAPES]) for p in prompts]


def config_of(method: str, layers) -> RegulationConfig:
    preset = "paper" if method == "paper" else "auto"
    overrides = {} if layers is None else {"layers": layers}
    if method.startswith("auto-compiled"):
        overrides["compile"] = "on"  # torch.compile on any device; its warm-up call pays the compiling
    if method == "auto-no-concentration":
        overrides["concentration"] = 0.0  # binding 2 alone
    if method.endswith("-every"):
        overrides["neglect_ratio"] = None  # every call edited
    return RegulationConfig.from_preset(preset, **overrides)


def build(args):
    """(pipeline, {method: one image's call}, edited layers per call, description)."""
    dtype = getattr(torch, args.dtype)
    if args.model in ("embedded", "embedded-mmdit"):
        name = "toy-mmdit" if args.model == "embedded-mmdit" else "toy-unet"
        pipe, work, layers = embedded_pipeline(args.device, dtype, name), embedded_prompts(), None
        what = f"embedded shapes model {name}, {len(work)} prompts (2 and 3 objects) per repeat"
    else:
        from attnreg.regulator import default_layers

        pipe, work = sd15_pipeline(args.device, dtype), [(PROMPT, TARGETS)]
        layers = default_layers(pipe.unet)
        what = "SD 1.5-shaped UNet (random weights), layers " + ", ".join(layers) + " for every preset"
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size,
                output_type="latent")
    methods, n_layers = {}, {}
    for name in args.methods:
        if name in ("sd", "taca"):  # no regulator: no edited layer calls to count per
            from attnreg.taca import TextAttentionScaling

            run = TextAttentionScaling(pipe) if name == "taca" else pipe
            methods[name] = lambda run=run: [run(p, generator=torch.Generator("cpu").manual_seed(0), **call)
                                             for p, _ in work]
            continue
        reg = AttentionRegulator(pipe, config_of(name, layers))
        n_layers[name] = len(reg.layers)
        methods[name] = lambda reg=reg: [reg(p, targets=t, generator=torch.Generator("cpu").manual_seed(0), **call)
                                         for p, t in work]
    return pipe, methods, n_layers, what, len(work)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", choices=["sd15", "embedded", "embedded-mmdit"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: 4 for sd15, 50 for embedded, 28 for embedded-mmdit)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: 3 for embedded-mmdit, else 7.5)")
    p.add_argument("--size", type=int, default=None, help="image size (default: 512 for sd15, 64 for embedded)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, from {', '.join(METHODS)} (default: sd,auto,paper; sd15 adds auto-every)")
    p.add_argument("--no-count", action="store_true", help="skip the operator count")
    p.add_argument("--no-time", action="store_true", help="no timed runs")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # internal: one method's peak RSS, printed
    args = p.parse_args(argv)
    mmdit = args.model == "embedded-mmdit"
    args.steps = args.steps or {"embedded": 50, "embedded-mmdit": 28}.get(args.model, 4)
    args.size = args.size or (512 if args.model == "sd15" else 64)
    args.guidance = args.guidance or (3.0 if mmdit else 7.5)
    default = ["sd", "auto"] + (["taca"] if mmdit else ["paper"]) + (["auto-every"] if args.model == "sd15" else [])
    args.methods = [m.strip() for m in args.methods.split(",")] if args.methods else default
    bad = [m for m in args.methods if m not in METHODS]
    if "taca" in args.methods and not mmdit:
        p.error("--methods: taca scales joint attention; it runs on --model embedded-mmdit only")
    if bad or "sd" not in args.methods:
        p.error(f"--methods: unknown {bad}" if bad else "--methods must include sd (the baseline)")
    if args.peak_of:
        args.methods = ["sd", args.peak_of] if args.peak_of != "sd" else ["sd"]
        _, methods, *_ = build(args)
        methods[args.peak_of]()
        print(f"PEAK {peak_memory_mb(args.device):.1f}")
        return 0

    import torch._inductor.config as inductor

    inductor.cpp.enable_kernel_profile = True  # the compiled rows' C++ kernels show in the profiler's count
    _, methods, n_layers, what, per_repeat = build(args)
    times = {m: [] for m in methods}
    if not args.no_time:
        for run in methods.values():
            run()  # warm-up (allocations, kernels)
        for _ in range(args.repeats):  # interleaved, so drift hits every method alike
            for name, run in methods.items():
                sync(args.device)
                start = time.perf_counter()
                run()
                sync(args.device)
                times[name].append((time.perf_counter() - start) / per_repeat)

    ops, views, launches = {}, {}, {}
    if not args.no_count:
        for name, run in methods.items():
            if "compiled" in name and args.no_time:
                run()  # compile first: compiling runs operators of its own
            launches[name] = count_launches(run) / per_repeat
            if "compiled" in name:
                continue  # torch.compile refuses to run under a dispatch mode: see benchmarks/archive/compiled_edit.py
            with OpCounter() as counter:
                run()
            ops[name] = sum(counter.counts.values()) / per_repeat
            views[name] = sum(counter.views.values()) / per_repeat

    memory = {}
    if not args.no_memory and not args.device.startswith("cuda"):
        for name in methods:  # a fresh process each: ru_maxrss is a process's peak, it never goes down
            cmd = [sys.executable, __file__, "--peak-of", name, "--model", args.model, "--device", args.device,
                   "--dtype", args.dtype, "--steps", str(args.steps), "--size", str(args.size),
                   "--guidance", str(args.guidance)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            memory[name] = float(done.stdout.strip().splitlines()[-1].split()[1])

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    edit_steps = args.steps // 2
    scale = 25 / edit_steps if edit_steps else float("nan")  # extra ops are per edited layer call
    fmt = lambda x, f="{:.3f}": f.format(x) if x is not None else "-"  # noqa: E731
    med = {m: statistics.median(t) if t else None for m, t in times.items()}
    layer_note = ", ".join(f"{m} {k}" for m, k in n_layers.items())
    print(f"# overhead: {what}, {args.size}x{args.size}, {args.steps} steps ({edit_steps} edited; layers: {layer_note}), "
          f"guidance {args.guidance:g}, {args.dtype}, {args.device} ({device_name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {0 if args.no_time else args.repeats}")
    print("| method | s / image (median) | min | max | ratio vs sd | peak RSS MB (own process) | vs sd "
          "| ATen compute ops / image | extra | extra at 50 steps | extra per edited layer call "
          "| launches / image (profiler) | extra at 50 steps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in methods:
        t = times[name]
        ratio = med[name] / med["sd"] if t else None
        extra = ops[name] - ops["sd"] if name in ops else None
        mem = memory.get(name)
        print(f"| {name} | {fmt(med[name])} | {fmt(min(t) if t else None)} | {fmt(max(t) if t else None)} | {fmt(ratio)} "
              f"| {fmt(mem, '{:.0f}')} | {fmt(mem / memory['sd'] if mem else None)} | {fmt(ops.get(name), '{:,.0f}')} "
              f"| {fmt(extra, '{:,.0f}')} | {fmt(extra * scale if extra is not None else None, '{:,.0f}')} "
              f"| {fmt(extra / (edit_steps * n_layers[name]) if extra is not None and edit_steps and name in n_layers else None, '{:.0f}')} "
              f"| {fmt(launches.get(name), '{:,.0f}')} "
              f"| {fmt((launches[name] - launches['sd']) * scale if launches else None, '{:,.0f}')} |")
    if ops:
        print("views, not counted: " + ", ".join(f"{m} {v:,.0f}" for m, v in views.items()) + " per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
