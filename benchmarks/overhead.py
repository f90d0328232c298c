"""Overhead of Attention Regulation against the plain pipeline, measured in the same run.

An SD 1.5-shaped pipeline (the real UNet and CLIP ViT-L text-encoder configs, random weights: no
download needed, and speed does not depend on the weights) at 512 x 512 with guidance 7.5, N steps
with the first half edited on the paper's layers. Prints seconds per image (median of repeats) for
both, their ratio, peak memory, and the ATen operator calls that regulation adds per image: a
device-independent proxy for GPU kernel launches, which is what made the release cost 48.8 %.

    python benchmarks/overhead.py                                  # CPU: 4 steps, 3 repeats
    python benchmarks/overhead.py --device cuda --dtype float16 --steps 50 --repeats 5

The VAE decode is skipped (output_type="latent"): it is the same for both and not what we measure.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnreg import AttentionRegulator, RegulationConfig
from attnreg.tokenizer import load_clip_tokenizer

PROMPT, TARGETS = "a painting of an elephant with glasses", ["elephant", "glasses"]


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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--preset", default="paper")
    p.add_argument("--no-count", action="store_true", help="skip the operator count (slow on CPU)")
    p.add_argument("--no-time", action="store_true", help="only count operators (no warm-up, no timed runs)")
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    pipe = sd15_pipeline(args.device, dtype)
    reg = AttentionRegulator(pipe, RegulationConfig.from_preset(args.preset))
    call = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size, output_type="latent")
    methods = {
        "sd": lambda g: pipe(PROMPT, generator=g, **call),
        "attnreg": lambda g: reg(PROMPT, targets=TARGETS, generator=g, **call),
    }

    times = {m: [] for m in methods}
    memory = {}
    if not args.no_time:
        methods["sd"](torch.Generator("cpu").manual_seed(0))  # warm-up (allocations, kernels)
        methods["attnreg"](torch.Generator("cpu").manual_seed(0))
    for _ in range(0 if args.no_time else args.repeats):  # interleaved, so drift hits both alike
        for name, run in methods.items():
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            sync(args.device)
            start = time.perf_counter()
            run(torch.Generator("cpu").manual_seed(0))
            sync(args.device)
            times[name].append(time.perf_counter() - start)
            memory[name] = peak_memory_mb(args.device)

    ops, views = {}, {}
    if not args.no_count:
        for name, run in methods.items():
            with OpCounter() as counter:
                run(torch.Generator("cpu").manual_seed(0))
            ops[name], views[name] = sum(counter.counts.values()), sum(counter.views.values())

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    fmt = lambda x: f"{x:.3f}" if x is not None else "-"  # noqa: E731
    med = {m: statistics.median(t) if t else None for m, t in times.items()}
    print(f"# overhead: SD 1.5-shaped UNet, {args.size}x{args.size}, {args.steps} steps ({args.steps // 2} edited, "
          f"{len(reg.layers)} layers), guidance 7.5, {args.dtype}, {args.device} ({device_name}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {0 if args.no_time else args.repeats}")
    print("| method | s / image (median) | min | max | ratio vs sd | peak memory MB | ATen compute ops / image | extra ops |")
    print("|---|---|---|---|---|---|---|---|")
    for name in methods:
        t = times[name]
        ratio = med[name] / med["sd"] if t else None
        extra = ops[name] - ops["sd"] if ops else "-"
        print(f"| {name} | {fmt(med[name])} | {fmt(min(t) if t else None)} | {fmt(max(t) if t else None)} | {fmt(ratio)} | "
              f"{memory.get(name, float('nan')):.0f} | {ops.get(name, '-')} | {extra} |")
    if ops:
        edited_calls = (args.steps // 2) * len(reg.layers)
        print(f"extra ATen compute ops per edited layer call: {(ops['attnreg'] - ops['sd']) / edited_calls:.0f} "
              f"(views, not counted: sd {views['sd']}, attnreg {views['attnreg']} per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
