"""Does the fast solver's step schedule carry over to the binding solver? On the embedded model's own binding
solver calls (the default preset on design prompts, never the table's), each call is solved again with the
exact unit steps and with `fast_step_sizes(..., BINDING_STEP_SHARES)` (14 growing steps to the same flow time;
`--shares` tries others, e.g. FAST_STEP_SHARES' 1,1,1,1,1,2,2,3,4,4), and the weights, offsets and losses
compared, with the seconds per call of each.

    OMP_NUM_THREADS=1 python benchmarks/archive/fast_binding_check.py [--prompts 3] [--seed 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    from design_auto import design_prompts

    from attnreg import AttentionRegulator, RegulationConfig
    from attnreg import regulation
    from attnreg.toy import load_pipeline, prompt_targets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=3, help="design prompts per kind (2 and 3 objects)")
    p.add_argument("--seed", type=int, default=2000)
    p.add_argument("--shares", default=None,
                   help="comma-separated step shares to try instead of BINDING_STEP_SHARES (scaled to the same flow time)")
    a = p.parse_args()
    torch.set_num_threads(1)
    calls = []
    exact_solver = regulation.optimise_rows_bound

    def capture(*args, **kwargs):
        calls.append((args, kwargs))
        return exact_solver(*args, **kwargs)

    regulation.optimise_rows_bound = capture
    pipe = load_pipeline()
    config = RegulationConfig.from_preset("auto")
    reg = AttentionRegulator(pipe, config)
    for kind in (2, 3):
        for prompt in design_prompts(kind, a.prompts):
            reg(prompt, targets=prompt_targets(prompt), generator=torch.Generator("cpu").manual_seed(a.seed),
                num_inference_steps=50, guidance_scale=7.5, output_type="latent")
    regulation.optimise_rows_bound = exact_solver
    steps = regulation.fast_step_sizes(config.iterations, config.lr, regulation.BINDING_STEP_SHARES)
    if a.shares:
        shares = [float(x) for x in a.shares.split(",")]
        steps = tuple(config.lr * config.iterations * x / sum(shares) for x in shares)
    rel, off, loss_ratio, t_exact, t_fast = [], [], [], [], []
    for args, kwargs in calls:
        kwargs = {k: v for k, v in kwargs.items() if k != "steps"}
        t0 = time.perf_counter()
        exact = exact_solver(*args, **kwargs)
        t1 = time.perf_counter()
        fast = exact_solver(*args, **kwargs, steps=steps)
        t2 = time.perf_counter()
        t_exact.append(t1 - t0)
        t_fast.append(t2 - t1)
        bases = args[2].float()
        norm = exact.weights.flatten(1).norm(dim=1).clamp_min(1e-6)
        rel += ((fast.weights - exact.weights).flatten(1).norm(dim=1) / norm).tolist()
        delta = regulation.offsets_from_weights(fast.weights, bases) - regulation.offsets_from_weights(exact.weights, bases)
        off += delta.abs().flatten(1).amax(dim=1).tolist()
        loss_ratio += ((fast.loss + 1e-6) / (exact.loss + 1e-6)).tolist()
    q = lambda xs, f: statistics.quantiles(xs, n=100)[f - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    print(f"{len(calls)} binding solver calls ({sum(len(c[0][0]) for c in calls)} rows), design prompts x seed {a.seed}; "
          f"fast steps {tuple(round(s, 2) for s in steps)}")
    print("| measure | median | 90th percentile | max |")
    print("|---|---|---|---|")
    print(f"| weights, fast vs exact (relative L2) | {statistics.median(rel):.3f} | {q(rel, 90):.3f} | {max(rel):.3f} |")
    print(f"| offsets, largest difference (logits) | {statistics.median(off):.3f} | {q(off, 90):.3f} | {max(off):.3f} |")
    print(f"| best loss, fast / exact | {statistics.median(loss_ratio):.3f} | {q(loss_ratio, 90):.3f} | {max(loss_ratio):.3f} |")
    print(f"seconds per call: exact {statistics.median(t_exact):.4f}, fast {statistics.median(t_fast):.4f} "
          f"(ratio {statistics.median(t_fast) / statistics.median(t_exact):.2f}; medians, not a quiet machine "
          "unless nothing else ran)")


if __name__ == "__main__":
    main()
