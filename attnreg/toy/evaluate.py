"""Vanilla (no regulation) success rates of the toy model, measured with the exact detector.

    python -m attnreg.toy.evaluate --prompts 12 --seeds 4 [--model PATH] [--grid out.png]

For kind = 1, 2, 3 objects it takes `shapes_prompts(kind, prompts)`, generates `seeds` images per
prompt (seeds 0..seeds-1, DPMSolver, 50 steps, guidance 7.5 unless told otherwise) and prints
success / shapes_present rates and mean extra objects, as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from . import load_pipeline, score, shapes_prompts


def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 50, guidance: float = 7.5, batch: int = 32):
    """uint8 images, one per (prompt, seed), in prompt-major order; image i of prompt p uses seed i."""
    jobs = [(p, s) for p in prompts for s in seeds]
    out = []
    for b in range(0, len(jobs), batch):
        chunk = jobs[b:b + batch]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        res = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   height=64, width=64, output_type="np")
        out.extend((res.images * 255).round().astype(np.uint8))
    return out


def evaluate(pipe, n_prompts: int, n_seeds: int, kinds=(1, 2, 3), steps: int = 50, guidance: float = 7.5, prompt_seed: int = 0):
    report, images = {}, {}
    for kind in kinds:
        prompts = shapes_prompts(kind, n_prompts, seed=prompt_seed)
        imgs = generate(pipe, prompts, list(range(n_seeds)), steps, guidance)
        scores = [score(p, im) for p, im in zip([p for p in prompts for _ in range(n_seeds)], imgs)]
        report[kind] = {
            "n": len(scores),
            "success": float(np.mean([s["success"] for s in scores])),
            "shapes_present": float(np.mean([s["shapes_present"] for s in scores])),
            "extra_objects": float(np.mean([s["extra_objects"] for s in scores])),
            "mean_detected": float(np.mean([s["n_detected"] for s in scores])),
        }
        images[kind] = (prompts, imgs)
    return report, images


def save_grid(images: dict, path: str, per_kind: int = 16) -> None:
    from PIL import Image

    rows = []
    for kind, (prompts, imgs) in images.items():
        row = list(imgs[:per_kind]) + [np.zeros_like(imgs[0])] * max(0, per_kind - len(imgs))
        rows.append(np.concatenate(row, axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--kinds", default="1,2,3")
    ap.add_argument("--grid", default=None, help="write a PNG of the first images of each kind")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = load_pipeline(path=a.model)
    t = time.time()
    report, images = evaluate(pipe, a.prompts, a.seeds, [int(k) for k in a.kinds.split(",")], a.steps, a.guidance)
    report["seconds"] = round(time.time() - t, 1)
    report["setting"] = {"prompts": a.prompts, "seeds": a.seeds, "steps": a.steps, "guidance": a.guidance}
    print(json.dumps(report, indent=2))
    if a.grid:
        save_grid(images, a.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
