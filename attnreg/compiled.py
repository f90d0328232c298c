"""The fast solver through `torch.compile`, chosen per device, with an eager fallback.

`fast_optimise_rows` is a fixed number of small tensor operations with no host sync, so a compiler can fuse
them: on CPU, inductor's C++ backend turns the ~430 ATen calls of one solve into ~140 fused loops plus the
matrix products and top-k (measured at 8 x 8 maps, 8 rows, 2 targets: 7.4 -> 1.2 ms per solve); on CUDA,
mode "reduce-overhead" also captures the solve as a CUDA graph, one launch per solve. The first call pays
for compiling: 10-75 s on the 2-core CPU here (less when inductor's on-disk graph cache has the shape),
so `compile="auto"` compiles on CUDA only; on CPU it pays off only over hundreds of images in one process
(`compile="on"`, e.g. a benchmark). Each new shape (map size, rows, targets) may compile again; past
dynamo's recompile limit it runs eager, still correct.

Any failure to compile (no C++ compiler, an unsupported backend, a platform without inductor) gives one
warning and the eager solver from then on, never an error: the compiled and eager solvers compute the same
thing (tests/test_compiled.py checks them equal on CPU).
"""

from __future__ import annotations

import warnings

import torch

from .regulation import fast_optimise_rows

_compiled: dict[str, object] = {}  # torch.compile wrapper per mode, made once per process
_failed: list[str] = []  # the first failure's message; once set, every later solve is eager


def wanted(choice: str, device: torch.device) -> bool:
    """Whether `choice` ("auto", "on", "off") compiles on `device`."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def _solver(device: torch.device):
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _compiled:
        _compiled[mode] = torch.compile(fast_optimise_rows, mode=mode, fullgraph=True)
    return _compiled[mode]


def fast_solve(choice: str, target_logits, *args, **kwargs):
    """`fast_optimise_rows(target_logits, *args, **kwargs)`, compiled when `choice` asks for it on this
    device and compiling has not failed in this process."""
    if _failed or not wanted(choice, target_logits.device):
        return fast_optimise_rows(target_logits, *args, **kwargs)
    try:
        result = _solver(target_logits.device)(target_logits, *args, **kwargs)
    except Exception as err:  # noqa: BLE001 - any compiler failure means "run eager", see the module doc
        _failed.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        warnings.warn(
            f"attnreg: torch.compile of the solver failed ({_failed[0]}); using the eager solver "
            "(the same results; set compile='off' / --compile off to skip the attempt)",
            RuntimeWarning, stacklevel=2,
        )
        return fast_optimise_rows(target_logits, *args, **kwargs)
    if target_logits.device.type == "cuda":
        # CUDA-graph outputs live in buffers the next replay overwrites; the weights are kept across steps
        result = type(result)(*(t.clone() for t in (result.weights, result.loss, result.initial_loss)))
    return result


def reset() -> None:
    """Forget compiled solvers and any failure (tests; a changed compiler setting)."""
    _compiled.clear()
    _failed.clear()
