"""An edited layer call's work after the neglect test (`regulation.edit_group`: the fast solver, the blend,
the offsets and the softmax) through `torch.compile`, chosen per device, with an eager fallback.

`edit_group` on the fast path is a fixed number of small tensor operations with no host sync, so a compiler
can fuse them: on CPU, inductor's C++ backend turns its ~380 ATen calls into a few dozen fused loops and
the matrix products and top-k it keeps (benchmarks/archive/compiled_edit.py); on CUDA, mode "reduce-overhead"
also captures it as a CUDA graph, one launch per edited call. The first call pays
for compiling: tens of seconds on a small CPU (less when inductor's on-disk graph cache has the shape),
so `compile="auto"` compiles on CUDA only; on CPU it pays off only over hundreds of images in one process
(`compile="on"`, e.g. a benchmark). Each new shape (map size, rows, targets) may compile again; past
dynamo's recompile limit it runs eager, still correct.

Any failure to compile (no C++ compiler, an unsupported backend, a platform without inductor) gives one
warning and the eager solver from then on, never an error: the compiled and eager solvers compute the same
thing (tests/test_compiled.py checks them equal on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch

from .regulation import edit_group

_compiled: dict[str, object] = {}  # torch.compile wrapper per mode, made once per process
_failed: list[str] = []  # the first failure's message; once set, every later call is eager


def wanted(choice: str, device: torch.device) -> bool:
    """Whether `choice` ("auto", "on", "off") compiles on `device`."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def editor(config):
    """What `regulate_step` should call for its `edit`: None (the eager `edit_group`) unless `config` takes
    the relative loss's solver and may compile; then `compiled_edit` with the config's choice. The binding
    solver is never compiled: `regulate_step` sends groups with modifiers to the eager path."""
    if config.compile == "off" or config.loss != "relative":
        return None
    return functools.partial(compiled_edit, config.compile)


def _compiled_edit_group(device: torch.device):
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _compiled:
        _compiled[mode] = torch.compile(edit_group, mode=mode, fullgraph=True)
    return _compiled[mode]


def compiled_edit(choice: str, scores, *args):
    """`edit_group(scores, *args)` compiled, when `choice` asks for it on this device and compiling has not
    failed in this process; else eager."""
    if _failed or not wanted(choice, scores.device):
        return edit_group(scores, *args)
    try:
        result = _compiled_edit_group(scores.device)(scores, *args)
    except Exception as err:  # noqa: BLE001 - any compiler failure means "run eager", see the module doc
        _failed.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        warnings.warn(
            f"attnreg: torch.compile of the solver failed ({_failed[0]}); using the eager solver "
            "(the same results; set compile='off' / --compile off to skip the attempt)",
            RuntimeWarning, stacklevel=2,
        )
        return edit_group(scores, *args)
    if scores.device.type == "cuda":
        # CUDA-graph outputs live in buffers the next replay overwrites; the weights are kept across steps
        result = dataclasses.replace(result, **{f.name: getattr(result, f.name).clone()
                                                for f in dataclasses.fields(result)})
    return result


def reset() -> None:
    """Forget compiled solvers and any failure (tests; a changed compiler setting)."""
    _compiled.clear()
    _failed.clear()
