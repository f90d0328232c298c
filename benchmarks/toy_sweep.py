"""Does Attention Regulation help two-object fidelity on the embedded toy model? A small sweep.

Two sub-commands, both on a frozen copy of the toy pipeline (cp -r attnreg/toy/model /tmp/toy_snapshot):

  # 1. where the cross-attention mass goes (SOS / targets / other words / first EOS / padding)
  OMP_NUM_THREADS=1 python benchmarks/toy_sweep.py mass --model /tmp/toy_snapshot --out runs/toy_sweep/mass.json

  # 2. detector success on 2-object prompts, many seeds batched in ONE pipeline call per prompt
  OMP_NUM_THREADS=1 python benchmarks/toy_sweep.py bench --model /tmp/toy_snapshot --prompts 12 --seeds 16 \
      --steps 50 --configs vanilla,paper,edit5 --out runs/toy_sweep/bench.jsonl

Every config sees the same prompts (attnreg.toy.shapes_prompts(2, n, seed=0)) and the same initial
noise (one torch.Generator("cpu").manual_seed(seed) per image, seeds 0..S-1). Results are appended to
a jsonl file, one line per (config, prompt); a rerun skips the (config, prompt) pairs already there.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from attnreg import AttentionRegulator, RegulationConfig
from attnreg.toy import load_pipeline, prompt_targets, score, shapes_prompts

PAPER16 = ("down_blocks.0", "up_blocks.1")
LAYERS8 = ("down_blocks.1", "mid_block", "up_blocks.0")
ALL = PAPER16 + LAYERS8

# name -> RegulationConfig overrides (None: the plain pipeline)
CONFIGS: dict[str, dict | None] = {
    "vanilla": None,
    "paper": {},
    "edit5": {"edit_steps": 5},
    "edit10": {"edit_steps": 10},
    "layers8": {"layers": LAYERS8},
    "all": {"layers": ALL},
    "lr10": {"lr": 10.0},
    "lr1": {"lr": 1.0},
    "iter5": {"iterations": 5},
    "iter1": {"iterations": 1},
    # targets scaled to the model's range: peaks ~0.03-0.05, mean ~0.02 at 2 targets
    "scaled": {"high_target": 0.1, "per_target_share": 0.05},
    "scaled_mild": {"high_target": 0.2, "per_target_share": 0.1},
    "eps1": {"epsilon": 1.0},
    "eps10": {"epsilon": 10.0},
    "eps100": {"epsilon": 100.0},
    "scaled_mild_8": {"high_target": 0.2, "per_target_share": 0.1, "layers": LAYERS8},
    "scaled_edit10": {"high_target": 0.1, "per_target_share": 0.05, "edit_steps": 10},
    "scaled_lr10": {"high_target": 0.1, "per_target_share": 0.05, "lr": 10.0},
}


def make_regulator(pipe, overrides: dict) -> AttentionRegulator:
    return AttentionRegulator(pipe, RegulationConfig.from_preset("paper", **overrides))


class MassObserver:
    """Per (layer, step): mean attention of SOS, targets (mean, peak, q90), other words, first EOS, padding."""

    def __init__(self, steps, targets_idx, eos):
        self.steps, self.t, self.eos = set(steps), list(targets_idx), eos
        self.rows: list[dict] = []

    def wants(self, layer, step):
        return step in self.steps

    @torch.no_grad()
    def record(self, layer, step, probs, state):
        n = state.plan.n_images
        cond = probs[probs.shape[0] - n :].float()  # (images, heads, P, J)
        e, t = self.eos, self.t
        words = [j for j in range(1, e) if j not in t]
        per_pixel_mean = cond.mean(dim=(0, 1, 2))  # (J,)
        tmaps = cond[..., t]  # (I, H, P, n)
        row = {
            "layer": layer,
            "step": step,
            "pixels": cond.shape[2],
            "sos": per_pixel_mean[0].item(),
            "targets_each_mean": per_pixel_mean[t].mean().item(),
            "targets_each_peak": tmaps.amax(dim=2).mean().item(),  # max over pixels, mean over img/head/target
            "targets_each_q90": torch.quantile(tmaps.transpose(2, 3).flatten(0, 2), 0.9, dim=1).mean().item(),
            "other_words_total": per_pixel_mean[words].sum().item(),
            "eos": per_pixel_mean[e].item(),
            "padding_total": per_pixel_mean[e + 1 :].sum().item(),
            "row_sum": per_pixel_mean.sum().item(),
        }
        self.rows.append(row)


def cmd_mass(args):
    pipe = load_pipeline(path=args.model)
    from attnreg.tokens import eos_index, resolve_targets

    prompts = shapes_prompts(2, args.prompts, seed=0)
    out = []
    for cfg_name in args.configs.split(","):
        overrides = dict(CONFIGS[cfg_name] or {})
        if CONFIGS[cfg_name] is None:
            overrides["edit_steps"] = 0  # plan set, nothing edited: observers see the vanilla run
        reg = make_regulator(pipe, {**overrides, "layers": overrides.get("layers", PAPER16)})
        # observe every cross-attention layer: wrap them all by listing an observer
        for prompt in prompts:
            targets = prompt_targets(prompt)
            idx = resolve_targets(pipe.tokenizer, prompt, targets)
            obs = MassObserver(args.obs_steps, idx, eos_index(pipe.tokenizer, prompt))
            reg.state.observers.append(obs)
            gens = [torch.Generator("cpu").manual_seed(s) for s in range(args.seeds)]
            try:
                reg(prompt, targets=targets, num_inference_steps=args.steps, guidance_scale=7.5,
                    height=64, width=64, num_images_per_prompt=args.seeds, generator=gens, output_type="pil")
            finally:
                reg.state.observers.remove(obs)
            for r in obs.rows:
                out.append({"config": cfg_name, "prompt": prompt, "tokens": idx, **r})
            print(cfg_name, prompt, "done", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    # summary: mean over prompts, by config, layer, step
    import collections

    agg = collections.defaultdict(list)
    for r in out:
        agg[(r["config"], r["layer"], r["step"])].append(r)
    keys = ["sos", "targets_each_mean", "targets_each_peak", "targets_each_q90", "other_words_total", "eos", "padding_total"]
    print("| config | layer | step | " + " | ".join(keys) + " |")
    for (c, layer, s), rs in sorted(agg.items()):
        vals = [sum(r[k] for r in rs) / len(rs) for k in keys]
        print(f"| {c} | {layer} | {s} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")


def cmd_bench(args):
    pipe = load_pipeline(path=args.model)
    prompts = shapes_prompts(2, args.prompts, seed=0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            if r["steps"] == args.steps and r["seeds"] == args.seeds and r.get("seed_start", 0) == args.seed_start:
                done.add((r["config"], r["prompt"]))
    img_dir = Path(args.images) if args.images else None
    for cfg_name in args.configs.split(","):
        overrides = CONFIGS[cfg_name]
        reg = None if overrides is None else make_regulator(pipe, overrides)
        for prompt in prompts:
            if (cfg_name, prompt) in done:
                continue
            targets = prompt_targets(prompt)
            gens = [torch.Generator("cpu").manual_seed(s) for s in range(args.seed_start, args.seed_start + args.seeds)]
            kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=64, width=64,
                      num_images_per_prompt=args.seeds, generator=gens)
            t0 = time.perf_counter()
            images = (pipe(prompt, **kw) if reg is None else reg(prompt, targets=targets, **kw)).images
            secs = time.perf_counter() - t0
            scores = [score(prompt, im) for im in images]
            if img_dir is not None:
                d = img_dir / cfg_name
                d.mkdir(parents=True, exist_ok=True)
                for s, im in enumerate(images):
                    im.save(d / f"{prompt.replace(' ', '_')}_s{args.seed_start + s}.png")
            rec = {
                "config": cfg_name, "overrides": overrides, "prompt": prompt, "targets": targets,
                "steps": args.steps, "seeds": args.seeds, "seed_start": args.seed_start, "seconds": secs,
                "success": [bool(x["success"]) for x in scores],
                "shapes_present": [bool(x["shapes_present"]) for x in scores],
                "extra_objects": [int(x["extra_objects"]) for x in scores],
                "n_detected": [int(x["n_detected"]) for x in scores],
            }
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{cfg_name:14s} {sum(rec['success']):2d}/{args.seeds} {secs:6.1f}s  {prompt}", flush=True)
    summarise(out, args.steps, args.seeds)


def summarise(path, steps, seeds):
    import collections

    by = collections.defaultdict(list)
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if r["steps"] == steps and r["seeds"] == seeds:
            by[r["config"]].append(r)
    print(f"\n| config | prompts | success | shapes present | mean detected | s / image | paired vs vanilla: only config / only vanilla |")
    print("|---|---|---|---|---|---|---|")
    van = {r["prompt"]: r["success"] for r in by.get("vanilla", [])}
    for c, rs in by.items():
        n = sum(len(r["success"]) for r in rs)
        ok = sum(sum(r["success"]) for r in rs)
        sp = sum(sum(r["shapes_present"]) for r in rs)
        det = sum(sum(r["n_detected"]) for r in rs) / n
        sec = sum(r["seconds"] for r in rs) / n
        # paired with vanilla on the same (prompt, seed): (config wins, vanilla wins) on success
        win = sum(a and not b for r in rs if r["prompt"] in van for a, b in zip(r["success"], van[r["prompt"]]))
        loss = sum(b and not a for r in rs if r["prompt"] in van for a, b in zip(r["success"], van[r["prompt"]]))
        print(f"| {c} | {len(rs)} | {ok}/{n} ({100 * ok / n:.1f} %) | {sp}/{n} ({100 * sp / n:.1f} %) | {det:.2f} | {sec:.2f} | {win} / {loss} |")


@torch.no_grad()
def cmd_values(args):
    """Norm of each token's value vector (to_v of the text encoding) in every cross-attention layer."""
    from attnreg.tokens import eos_index, resolve_targets

    pipe = load_pipeline(path=args.model)
    for prompt in shapes_prompts(2, args.prompts, seed=0):
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        enc = pipe.text_encoder(ids)[0]  # (1, 77, 64)
        t = resolve_targets(pipe.tokenizer, prompt, prompt_targets(prompt))
        e = eos_index(pipe.tokenizer, prompt)
        words = [j for j in range(1, e) if j not in t]
        print(prompt, "targets", t, "eos", e)
        for name, mod in pipe.unet.named_modules():
            if name.endswith("attn2"):
                v = mod.to_v(enc)[0]
                n = v.norm(dim=-1)
                print(f"  {name:55s} |v| sos {n[0]:.2f} targets {n[t].mean():.2f} other words {n[words].mean():.2f} "
                      f"eos {n[e]:.2f} padding {n[e + 1:].mean():.2f}; cos(target, sos) "
                      f"{torch.nn.functional.cosine_similarity(v[t], v[0:1]).mean():.2f}")


def cmd_rescore(args):
    """Partial credit from the saved images: per named object, is an object of that (colour, shape) /
    that shape / that colour detected (each detection used once)?"""
    from attnreg.toy import detect
    from attnreg.toy.detect import parse_prompt
    from PIL import Image

    print("| config | images | success | objects matched (colour+shape) | shapes matched | colours matched | mean detected |")
    print("|---|---|---|---|---|---|---|")
    for cfg_dir in sorted(Path(args.images).iterdir()):
        n_img = ok = both = shp = col = named = det = 0
        for f in sorted(cfg_dir.glob("*.png")):
            prompt = f.name.rsplit("_s", 1)[0].replace("_", " ")
            want = parse_prompt(prompt)
            found = detect(Image.open(f).convert("RGB"))
            det += len(found)
            n_img += 1
            named += len(want)
            r = score(prompt, Image.open(f).convert("RGB"))
            ok += bool(r["success"])
            for key, slot in ((lambda c, s: (c, s), "both"), (lambda c, s: s, "shape"), (lambda c, s: c, "colour")):
                pool = [key(c, s) for s, c, _ in found]
                m = 0
                for c, s in want:
                    k = key(c, s)
                    if k in pool:
                        pool.remove(k)
                        m += 1
                if slot == "both":
                    both += m
                elif slot == "shape":
                    shp += m
                else:
                    col += m
        if n_img:
            print(f"| {cfg_dir.name} | {n_img} | {ok} ({100 * ok / n_img:.1f} %) | {both}/{named} ({100 * both / named:.1f} %) | "
                  f"{shp}/{named} ({100 * shp / named:.1f} %) | {col}/{named} ({100 * col / named:.1f} %) | {det / n_img:.2f} |")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mass")
    m.add_argument("--model", default="/tmp/toy_snapshot")
    m.add_argument("--prompts", type=int, default=3)
    m.add_argument("--seeds", type=int, default=4)
    m.add_argument("--steps", type=int, default=50)
    m.add_argument("--obs-steps", type=lambda s: [int(x) for x in s.split(",")], default=[0, 5, 10, 24, 40])
    m.add_argument("--configs", default="vanilla,paper")
    m.add_argument("--out", default="runs/toy_sweep/mass.json")
    b = sub.add_parser("bench")
    b.add_argument("--model", default="/tmp/toy_snapshot")
    b.add_argument("--prompts", type=int, default=12)
    b.add_argument("--seeds", type=int, default=16)
    b.add_argument("--seed-start", type=int, default=0, help="noise seeds seed_start .. seed_start + seeds - 1")
    b.add_argument("--steps", type=int, default=50)
    b.add_argument("--configs", default="vanilla,paper")
    b.add_argument("--out", default="runs/toy_sweep/bench.jsonl")
    b.add_argument("--images", default=None, help="folder to save the images in (optional)")
    v = sub.add_parser("values")
    v.add_argument("--model", default="/tmp/toy_snapshot")
    v.add_argument("--prompts", type=int, default=2)
    r = sub.add_parser("rescore")
    r.add_argument("images")
    s = sub.add_parser("summary")
    s.add_argument("path")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--seeds", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    {"mass": cmd_mass, "values": cmd_values, "rescore": lambda a: cmd_rescore(a), "bench": cmd_bench, "summary": lambda a: summarise(a.path, a.steps, a.seeds)}[args.cmd](args)


if __name__ == "__main__":
    main()
