"""Attention analysis of the embedded toy model that `attnreg bench` lacks (findings in
toy_regulation_findings.md). Detector rates, resuming and paired comparisons are bench's job.

  # where the cross-attention mass goes (SOS / targets / other words / first EOS / padding)
  OMP_NUM_THREADS=1 python benchmarks/archive/toy_sweep.py mass --prompts 3 --seeds 4 --out runs/toy_sweep/mass.json
  # the norm of each token's value vector in every cross-attention layer
  OMP_NUM_THREADS=1 python benchmarks/archive/toy_sweep.py values --prompts 2
  # partial credit per named object (colour and shape / shape / colour) of a bench folder's images
  python benchmarks/archive/toy_sweep.py rescore runs/shapes

--model defaults to the shipped model (attnreg/toy/model). The configs of `mass` are overrides of
RegulationConfig.from_preset("paper") (CONFIGS below); bench runs the same ones as
`--methods attnreg-paper --set attnreg-paper.OPTION=VALUE`.
"""

from __future__ import annotations

import argparse
import json
import os
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
    """Partial credit from a bench folder's images: per named object, is an object of that (colour, shape) /
    that shape / that colour detected (each detection used once)? One row per method and configuration."""
    from PIL import Image

    from attnreg.eval.io import iter_records
    from attnreg.toy import detect
    from attnreg.toy.detect import parse_prompt

    groups: dict[str, list[dict]] = {}
    for r in iter_records(Path(args.dir)):
        if r.get("dataset") == "shapes":
            groups.setdefault(f"{r['method']} {r['config_hash']}", []).append(r)
    print("| method config | images | success | objects matched (colour+shape) | shapes matched | colours matched | mean detected |")
    print("|---|---|---|---|---|---|---|")
    for name, records in sorted(groups.items()):
        ok = named = det = 0
        matched = {"both": 0, "shape": 0, "colour": 0}
        for r in records:
            with Image.open(Path(args.dir) / r["image"]) as im:
                image = im.convert("RGB")
            want, found = parse_prompt(r["prompt"]), detect(image)
            det, named, ok = det + len(found), named + len(want), ok + bool(score(r["prompt"], image)["success"])
            for slot, key in (("both", lambda c, s: (c, s)), ("shape", lambda c, s: s), ("colour", lambda c, s: c)):
                pool = [key(c, s) for s, c, _ in found]
                for c, s in want:
                    if key(c, s) in pool:
                        pool.remove(key(c, s))
                        matched[slot] += 1
        n = len(records)
        cells = " | ".join(f"{matched[k]}/{named} ({100 * matched[k] / named:.1f} %)" for k in ("both", "shape", "colour"))
        print(f"| {name} | {n} | {ok} ({100 * ok / n:.1f} %) | {cells} | {det / n:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mass")
    m.add_argument("--model", default=None, help="pipeline folder (default: the shipped toy model)")
    m.add_argument("--prompts", type=int, default=3)
    m.add_argument("--seeds", type=int, default=4)
    m.add_argument("--steps", type=int, default=50)
    m.add_argument("--obs-steps", type=lambda s: [int(x) for x in s.split(",")], default=[0, 5, 10, 24, 40])
    m.add_argument("--configs", default="vanilla,paper")
    m.add_argument("--out", default="runs/toy_sweep/mass.json")
    v = sub.add_parser("values")
    v.add_argument("--model", default=None, help="pipeline folder (default: the shipped toy model)")
    v.add_argument("--prompts", type=int, default=2)
    r = sub.add_parser("rescore")
    r.add_argument("dir", help="an attnreg bench folder on the shapes data set")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    {"mass": cmd_mass, "values": cmd_values, "rescore": cmd_rescore}[args.cmd](args)


if __name__ == "__main__":
    main()
