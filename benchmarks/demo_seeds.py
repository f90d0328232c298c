"""How the README's demo fares over many seeds: `attnreg generate PROMPT --compare` on seeds 0..N-1 with the
command's own noise (a CPU generator seeded with the seed) and defaults (50 steps, guidance 7.5), the plain
and the regulated picture scored by the embedded model's detector. Prints right / fixed / broken counts.

    OMP_NUM_THREADS=1 python benchmarks/demo_seeds.py ["a red circle and a blue square"] [--seeds 50] \
        [--set binding=1]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from attnreg import AttentionRegulator, RegulationConfig
    from attnreg.eval.runner import parse_sets
    from attnreg.toy import load_pipeline, prompt_targets, score

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default="a red circle and a blue square")
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--set", action="append", default=[], help="a RegulationConfig override of the default preset")
    a = p.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline()
    reg = AttentionRegulator(pipe, RegulationConfig.from_preset("auto", **parse_sets([f"auto.{x}" for x in a.set]).get("auto", {})))
    targets = prompt_targets(a.prompt)
    call = dict(num_inference_steps=50, guidance_scale=7.5)
    plain_right = reg_right = fixed = broken = 0
    for seed in range(a.seeds):
        plain = score(a.prompt, pipe(a.prompt, generator=torch.Generator("cpu").manual_seed(seed), **call).images[0])
        ours = score(a.prompt, reg(a.prompt, targets=targets, generator=torch.Generator("cpu").manual_seed(seed),
                                   **call).images[0])
        plain_right += plain["success"]
        reg_right += ours["success"]
        fixed += ours["success"] and not plain["success"]
        broken += plain["success"] and not ours["success"]
        print(f"seed {seed}: plain {bool(plain['success'])}, regulated {bool(ours['success'])}", flush=True)
    print(f"{a.prompt!r}, seeds 0-{a.seeds - 1}: plain right {plain_right}, regulated right {reg_right} "
          f"({fixed} fixed, {broken} broken); config {reg.config.to_dict()}")


if __name__ == "__main__":
    main()
