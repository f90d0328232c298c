"""What does the binding solver's hand-written gradient save? `optimise_rows_bound` by autograd and with
`closed_form=True` (`bound_loss_and_grad`) on the same random calls shaped like the embedded model's (8 rows, an
8 x 8 map, 2 nouns + 2 modifiers and 3 nouns + 2 modifiers among 77 tokens, logits of scale 2; the auto preset's
loss, binding 2, concentration 2, 20 unit steps), one thread, both timed in the same run, the two interleaved so
that a busy machine slows both alike. Prints per kind the median milliseconds per call, their ratio, and how far
the weights are apart (largest per-row L2 difference relative to the row's norm).

    OMP_NUM_THREADS=1 python benchmarks/archive/binding_grad_check.py [--calls 6] [--repeats 5] [--separation 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnreg.config import RegulationConfig
from attnreg.regulation import gaussian_bases, optimise_rows_bound, reference_levels, target_probs

KINDS = {"2 nouns + 2 modifiers": (2, ((2, 0), (3, 1))), "3 nouns + 2 modifiers": (3, ((3, 0), (4, 1)))}


def random_call(n_nouns: int, pairs, seed: int, rows: int = 8, side: int = 8, tokens: int = 77):
    """The positional arguments of one binding solver call, from random scores over `tokens` tokens."""
    n = n_nouns + len(pairs)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, side * side, tokens, generator=g) * 2
    logits = scores[..., 1:n + 1]
    rest = torch.cat([scores[..., :1], scores[..., n + 1:]], dim=-1).logsumexp(dim=-1, keepdim=True)
    ref_high, ref_mean = reference_levels(target_probs(logits, rest, torch.zeros_like(logits))[..., :n_nouns])
    bases = gaussian_bases(side)
    return logits, rest, bases, torch.zeros(rows, bases.shape[0], n), ref_high, ref_mean, pairs, n_nouns


def timed(solve) -> tuple[float, object]:
    start = time.perf_counter()
    result = solve()
    return (time.perf_counter() - start) * 1e3, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=6, help="random calls per kind")
    p.add_argument("--repeats", type=int, default=5, help="timings of each call, each way (the median is kept)")
    p.add_argument("--separation", type=float, default=0.0, help="the separation term too (off in the preset)")
    a = p.parse_args()
    torch.set_num_threads(1)
    config = RegulationConfig.from_preset("auto")
    options = dict(iterations=config.iterations, lr=config.lr, loss=config.loss_weights, separation=a.separation,
                   concentration=config.concentration, hw=(8, 8))
    print(f"optimise_rows_bound, {a.calls} random calls per kind x {a.repeats} repeats, binding {config.binding}, "
          f"concentration {config.concentration}, separation {a.separation}, {config.iterations} steps, 1 thread")
    print("| call | autograd ms (median) | closed form ms (median) | closed / autograd "
          "| weights apart (max relative L2) |")
    print("|---|---|---|---|---|")
    for name, (n_nouns, pairs) in KINDS.items():
        t_auto, t_closed, apart = [], [], []
        for seed in range(a.calls):
            args = random_call(n_nouns, pairs, seed)
            per_call_auto, per_call_closed = [], []
            for _ in range(a.repeats):
                ms, autograd = timed(lambda: optimise_rows_bound(*args, config.binding, **options))
                per_call_auto.append(ms)
                ms, closed = timed(lambda: optimise_rows_bound(*args, config.binding, **options, closed_form=True))
                per_call_closed.append(ms)
            t_auto.append(statistics.median(per_call_auto))
            t_closed.append(statistics.median(per_call_closed))
            diff = (closed.weights - autograd.weights).flatten(1).norm(dim=1)
            apart.append(float((diff / autograd.weights.flatten(1).norm(dim=1).clamp_min(1e-6)).max()))
        auto_ms, closed_ms = statistics.median(t_auto), statistics.median(t_closed)
        print(f"| {name} | {auto_ms:.1f} | {closed_ms:.1f} | {closed_ms / auto_ms:.2f} | {max(apart):.1e} |")


if __name__ == "__main__":
    main()
