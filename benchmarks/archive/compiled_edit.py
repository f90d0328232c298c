"""An edited layer call's work eager against torch.compile (attnreg/compiled.py: `regulation.edit_group`, the
fast solver, the blend, the offsets and the softmax), one call at a time, in the same run.

Per problem shape (map side, rows = images x heads, targets): milliseconds per call (median), the first
call's compile time with an empty inductor cache and again in the same process after `torch._dynamo.reset()`
(dynamo traces again, inductor finds its kernels cached; a new process also pays for loading them), and the launches per call: eager = ATen compute operators (a TorchDispatchMode, views
apart), and for both the profiler's count of overhead.py (`count_launches`: leaf ATen operators, views and
allocations apart, plus inductor's generated kernels, with its kernel profiling on). Each is one
kernel launch on a GPU. The shapes: SD 1.5's edited 16 x 16 layers (8 heads, 1 image, 2 targets) and
the embedded model's calibrated 8 x 8 layer (2 heads, 1 image; 2 and 3 targets), 77 text columns.
What the layer call does besides (the neglect test, the explicit attention) is not in these counts.

    OMP_NUM_THREADS=1 python benchmarks/archive/compiled_edit.py --repeats 50
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from attnreg import RegulationConfig
from attnreg.regulation import edit_group, gaussian_bases
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # benchmarks/, for overhead.py
from overhead import OpCounter, count_launches  # benchmarks/overhead.py: one way of counting for both

SHAPES = {"sd15 16x16, 8 rows, 2 targets": (16, 8, 2), "embedded 8x8, 2 rows, 2 targets": (8, 2, 2),
          "embedded 8x8, 2 rows, 3 targets": (8, 2, 3)}


def problem(side: int, heads: int, n: int, seed: int = 0):
    """`edit_group`'s arguments for one image whose first target dominates (the others are lifted), as the
    auto preset sees a neglect: 77 columns, targets at 2, 5, 7, the first edited step."""
    torch.manual_seed(seed)
    t = torch.tensor([2, 5, 7][:n])
    scores = torch.randn(heads, side * side, 77)
    scores[..., t] -= 2
    scores[..., t[0]] += 4 + torch.randn(heads, side * side)
    probs = scores.softmax(dim=-1)
    bases = gaussian_bases(side, side)
    init = torch.zeros(heads, bases.shape[0], n)
    return (scores, probs, probs[..., t], t, bases, init, init, torch.tensor(1.0), None, torch.full((heads,), 9),
            RegulationConfig.from_preset("auto"), heads, n, ())


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)

    import torch._inductor.config as inductor

    inductor.cpp.enable_kernel_profile = True
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnreg-inductor-")  # a cold cache
    print(f"# an edited call's edit_group (fast solver), eager vs torch.compile (inductor), {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| problem | eager ms / call | compiled ms | ratio | first compile s (cold cache) | again s (after dynamo reset) "
          "| eager ATen ops / call (dispatch) | eager launches (profiler) | compiled launches (profiler) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, shape in SHAPES.items():
        args_ = problem(*shape)
        eager_ms = median_ms(lambda: edit_group(*args_), args.repeats)
        with OpCounter() as counter:
            edit_group(*args_)
        eager_ops = sum(counter.counts.values())
        eager_launches = count_launches(lambda: edit_group(*args_))
        compile_s = []
        for _ in range(2):  # cold, then a reset dynamo with the caches the first one filled
            torch._dynamo.reset()
            solver = torch.compile(edit_group, fullgraph=True)
            start = time.perf_counter()
            out = solver(*args_)
            compile_s.append(time.perf_counter() - start)
        torch.testing.assert_close(out.probs, edit_group(*args_).probs, rtol=1e-4, atol=1e-6)
        compiled_ms = median_ms(lambda: solver(*args_), args.repeats)
        launches = count_launches(lambda: solver(*args_))
        print(f"| {label} | {eager_ms:.2f} | {compiled_ms:.2f} | {compiled_ms / eager_ms:.2f}x | {compile_s[0]:.1f} "
              f"| {compile_s[1]:.1f} | {eager_ops} | {eager_launches} | {launches} | {launches / eager_launches:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
