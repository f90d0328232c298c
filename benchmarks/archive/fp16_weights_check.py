"""Would the embedded model's weights stored in fp16 (computed in fp32) give the same images?

Converts every *.safetensors of attnreg/toy/model to fp16 in a temporary copy, loads both folders as
float32 pipelines, makes the same images with both and reports the pixel differences (0-255) and how
many of the shapes detector's verdicts (`attnreg.toy.score(...)["success"]`) differ.

    OMP_NUM_THREADS=1 python benchmarks/archive/fp16_weights_check.py --prompts 8 --seeds 0,1 --steps 50

--prompts is per kind (1, 2 and 3 objects): 8 gives 24 prompts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from attnreg.toy import load_pipeline, model_path, score, shapes_prompts


def fp16_copy(src: Path, dst: Path) -> int:
    """Copy the pipeline folder `src` to `dst` with every floating tensor stored in fp16; returns bytes saved."""
    shutil.copytree(src, dst)
    saved = 0
    for path in dst.rglob("*.safetensors"):
        before = path.stat().st_size
        tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
        saved += before - path.stat().st_size
    return saved


def images(pipe, prompts: list[str], seeds: list[int], steps: int) -> list[np.ndarray]:
    out = []
    for prompt in prompts:
        for seed in seeds:
            gen = torch.Generator("cpu").manual_seed(seed)
            img = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, generator=gen, output_type="np").images[0]
            out.append((img * 255).round().astype(np.uint8))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per kind (1, 2, 3 objects)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    prompts = [p for kind in (1, 2, 3) for p in shapes_prompts(kind, a.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        half = Path(tmp) / "model"
        saved = fp16_copy(model_path(), half)
        t0 = time.time()
        ref = load_pipeline()
        test = load_pipeline(path=half)
        dtypes = {str(p.dtype) for p in test.unet.parameters()} | {str(p.dtype) for p in test.vae.parameters()}
        a32 = images(ref, prompts, seeds, a.steps)
        a16 = images(test, prompts, seeds, a.steps)
    diff = [np.abs(x.astype(int) - y.astype(int)) for x, y in zip(a32, a16)]
    labels = [p for p in prompts for _ in seeds]
    v32 = [bool(score(p, x)["success"]) for p, x in zip(labels, a32)]
    v16 = [bool(score(p, x)["success"]) for p, x in zip(labels, a16)]
    report = {
        "images": len(diff), "prompts": len(prompts), "seeds": seeds, "steps": a.steps,
        "fp16_pipeline_param_dtypes": sorted(dtypes), "bytes_saved": saved,
        "max_pixel_diff": int(max(d.max() for d in diff)),
        "mean_pixel_diff": float(np.mean([d.mean() for d in diff])),
        "images_with_any_diff": sum(bool(d.any()) for d in diff),
        "images_max_diff_over_8": sum(int(d.max()) > 8 for d in diff),
        "success_fp32": sum(v32), "success_fp16": sum(v16),
        "verdicts_differ": sum(x != y for x, y in zip(v32, v16)),
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
