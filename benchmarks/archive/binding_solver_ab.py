"""The default's time with the binding solver of commit 3f842b3 (fused, before it had fewer operators) and with
the current one, beside sd, interleaved in one process: each repeat times sd, before and now in alternating
order, and each method's ratio is the median of its per-repeat ratios to that repeat's sd, so that a host whose
speed drifts between runs (this one's sd moved by 30 % within an hour) hits all three alike.

    OMP_NUM_THREADS=1 python benchmarks/archive/binding_solver_ab.py --model toy-unet --repeats 9
    OMP_NUM_THREADS=1 python benchmarks/archive/binding_solver_ab.py --model toy-mmdit --repeats 9
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BEFORE = "3f842b3"
ROOT = Path(__file__).resolve().parents[2]


def solver_at(commit: str):
    """`optimise_rows_bound` as `attnreg/regulation/binding.py` had it at `commit` (its relative imports made
    absolute; the helpers it imports from the rest of the package must still exist)."""
    source = subprocess.run(["git", "show", f"{commit}:attnreg/regulation/binding.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    source = source.replace("from .maps", "from attnreg.regulation.maps").replace(
        "from .relative", "from attnreg.regulation.relative")
    path = Path(tempfile.mkdtemp()) / f"binding_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.optimise_rows_bound


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy-unet", choices=["toy-unet", "toy-mmdit"])
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import overhead

    import attnreg.regulation.step as step
    from attnreg import AttentionRegulator, RegulationConfig
    from attnreg.regulation import optimise_rows_bound

    pipe = overhead.embedded_pipeline("cpu", torch.float32, args.model)
    work = overhead.embedded_prompts()
    reg = AttentionRegulator(pipe, RegulationConfig())
    steps, guidance = (28, 3.0) if args.model == "toy-mmdit" else (50, 7.5)
    call = dict(num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, output_type="latent")

    def regulated(solver):
        def run():
            step.optimise_rows_bound = solver  # the name `solve_weights` calls
            return [reg(p, targets=t, generator=torch.Generator("cpu").manual_seed(0), **call) for p, t in work]
        return run

    methods = {"sd": lambda: [pipe(p, generator=torch.Generator("cpu").manual_seed(0), **call) for p, _ in work],
               f"before ({BEFORE})": regulated(solver_at(BEFORE)), "now": regulated(optimise_rows_bound)}
    for run in methods.values():
        run()  # warm-up
    times = {name: [] for name in methods}
    for r in range(args.repeats):
        for name in (list(methods) if r % 2 == 0 else list(reversed(methods))):
            start = time.perf_counter()
            methods[name]()
            times[name].append((time.perf_counter() - start) / len(work))
    print(f"# {args.model}, {len(work)} colour prompts per repeat (2 and 3 objects), {steps} steps, {args.repeats} "
          f"repeats interleaved, torch {torch.__version__}, 1 thread")
    print("| solver | s / image (median) | **ratio vs sd** (median of per-repeat ratios) | min | max |")
    print("|---|---|---|---|---|")
    for name in methods:
        ratios = [a / b for a, b in zip(times[name], times["sd"])]
        print(f"| {name} | {statistics.median(times[name]):.3f} | {statistics.median(ratios):.3f} | "
              f"{min(ratios):.3f} | {max(ratios):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
