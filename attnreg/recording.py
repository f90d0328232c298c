"""AttentionRecorder: per-token cross-attention maps and statistics, recorded during a pipeline call.

An observer of `RegulationState` (see processor.py): the processor asks `wants(layer, step)` and
computes the attention probabilities explicitly only where some observer (or the regulation) needs
them, so a recorder costs nothing on the layers and steps it does not record.

    recorder = AttentionRecorder(steps=[0, 24], tokens=[5, 7], stats_steps="all", values_steps=[0, 24])
    with recorder.attached(reg):                    # reg: an AttentionRegulator
        reg.run(prompt, None, generator=g)          # vanilla; reg(prompt, targets=...) for regulated
    recorder.maps[24]      # (n_images, n_tokens, R, R) float32 on the CPU
    recorder.stats[24]     # {"mean", "max", "p90"}: (n_images, n_tokens) each
    recorder.values[24]    # (n_images, n_tokens, R * R): the raw per-pixel values (violin plots)

What a map is: the conditional half's attention probabilities (after regulation where the layer is
edited), averaged over heads, resized bilinearly to R x R and averaged over the recorded layers:
the aggregate Figures 2 and 3 of the paper show. The statistics are taken over the R x R pixels of
that same aggregate (at R = 16 on SD's 16 x 16 layers: the layers' own pixels).

On SD3 and FLUX (joint attention, attnreg.joint) the same recorder records what the joint processor hands
its observers: the image-query rows at the text columns of the joint text sequence (SD3: 77 CLIP
columns, then T5; FLUX: T5), with the softmax taken over every key column, text and image, as the
regulator edits it; so a token index is a column of the joint text sequence (`resolve()["indices"]`)
and a map's values do not sum to 1 over the text columns (the image columns hold the rest). FLUX's
batch has no unconditional half: every image is recorded. `per_layer=True` also keeps each layer's
own map at `steps` (`layer_maps`), before the layers are averaged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
import torch.nn.functional as F

STATISTICS = ("mean", "max", "p90")


class AttentionRecorder:
    """Records per-token cross-attention maps, per-step statistics and raw values for chosen steps.

    layers: block prefixes ("down_blocks.2", "mid_block") or full attn2 module names; None records
        every cross-attention layer. Maps of different sizes are resized to `resolution` before the
        layers are averaged.
    steps: the denoising steps (0-based) whose maps are kept.
    tokens: token indices (the columns the layer's observers are handed: 0..76 on a UNet, the joint text
        columns on SD3/FLUX) to keep; None keeps every column.
    resolution: R, or (H, W), of the stored maps.
    stats_steps: steps whose per-token mean, max and 90th percentile over pixels are kept; None:
        the same as `steps`; "all": every step.
    values_steps: steps whose raw per-pixel values are kept (for violin plots); default none.
    per_layer: also keep each recorded layer's own (resized) map at `steps`, in `layer_maps`.
    guidance: the call uses classifier-free guidance, so the conditional half is the second half of
        the batch. Only consulted when the regulator has no plan (a vanilla run) and the model does not
        say (FLUX's batch is never a guidance batch): with a plan, its n_images says where the
        conditional half starts.

    Memory: maps 4 * len(steps) * n_tokens * R^2 * n_images bytes, values the same with
    len(values_steps), stats 4 * 3 * len(stats_steps) * n_tokens * n_images, plus one step's
    running sum while a step is being recorded. `nbytes()` reports what is stored.
    """

    def __init__(
        self,
        layers: Iterable[str] | None = None,
        steps: Iterable[int] = (),
        tokens: Iterable[int] | None = None,
        resolution: int | tuple[int, int] = 16,
        stats_steps: Iterable[int] | str | None = None,
        values_steps: Iterable[int] = (),
        guidance: bool = True,
        per_layer: bool = False,
    ):
        self.layers = None if layers is None else tuple(str(x).removesuffix(".processor") for x in layers)
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty; pass None to record every cross-attention layer")
        self.steps = frozenset(_steps(steps, "steps"))
        self.tokens = None if tokens is None else [int(t) for t in tokens]
        if self.tokens is not None:
            bad = [t for t in self.tokens if t < 0]
            if bad or not self.tokens:
                raise ValueError(f"tokens must be a non-empty list of token indices >= 0, got {list(tokens)}")
        self.resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if len(self.resolution) != 2 or min(self.resolution) < 1:
            raise ValueError(f"resolution must be a positive int or (height, width), got {resolution!r}")
        if stats_steps is None:
            self.stats_steps: frozenset[int] | None = self.steps
        elif stats_steps == "all":
            self.stats_steps = None  # every step
        elif isinstance(stats_steps, str):
            raise ValueError(f"stats_steps must be a list of steps, None or 'all', got {stats_steps!r}")
        else:
            self.stats_steps = frozenset(_steps(stats_steps, "stats_steps"))
        self.values_steps = frozenset(_steps(values_steps, "values_steps"))
        self.guidance = guidance
        self.per_layer = per_layer
        self.reset()

    # -- results --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything recorded (the recorder can then observe another call)."""
        self._maps: dict[int, torch.Tensor] = {}
        self._stats: dict[int, dict[str, torch.Tensor]] = {}
        self._values: dict[int, torch.Tensor] = {}
        self.recorded_layers: dict[int, list[str]] = {}  # step -> layers averaged into it
        self.layer_maps: dict[int, dict[str, torch.Tensor]] = {}  # per_layer: step -> layer -> (n_images, n_tokens, H, W)
        self._sum: torch.Tensor | None = None
        self._sum_step: int | None = None
        self._count = 0

    def finish(self) -> "AttentionRecorder":
        """Close the step being recorded (done by every reader below; harmless to call twice)."""
        if self._sum is not None:
            step, mean = self._sum_step, (self._sum / self._count).cpu()
            if step in self.steps:
                self._maps[step] = mean.clone()
            if self._wants_stats(step):
                flat = mean.flatten(2)
                self._stats[step] = {
                    "mean": flat.mean(-1),
                    "max": flat.amax(-1),
                    "p90": torch.quantile(flat, 0.9, dim=-1),
                }
            if step in self.values_steps:
                self._values[step] = mean.flatten(2).clone()
            self._sum, self._sum_step, self._count = None, None, 0
        return self

    @property
    def maps(self) -> dict[int, torch.Tensor]:
        """step -> (n_images, n_tokens, H, W)."""
        return self.finish()._maps

    @property
    def stats(self) -> dict[int, dict[str, torch.Tensor]]:
        """step -> {"mean", "max", "p90"} -> (n_images, n_tokens), over the pixels of the map."""
        return self.finish()._stats

    @property
    def values(self) -> dict[int, torch.Tensor]:
        """step -> (n_images, n_tokens, H * W), for the `values_steps`."""
        return self.finish()._values

    def map(self, step: int) -> torch.Tensor:
        """(n_images, n_tokens, H, W) at `step`."""
        self.finish()
        if step not in self.maps:
            raise KeyError(f"no map recorded at step {step}; recorded: {sorted(self.maps)}")
        return self.maps[step]

    def statistic(self, name: str) -> tuple[list[int], torch.Tensor]:
        """(steps, tensor (n_steps, n_images, n_tokens)) of one statistic ("mean", "max", "p90")."""
        if name not in STATISTICS:
            raise ValueError(f"unknown statistic {name!r}; valid: {', '.join(STATISTICS)}")
        self.finish()
        steps = sorted(self.stats)
        if not steps:
            return [], torch.empty(0)
        return steps, torch.stack([self.stats[s][name] for s in steps])

    def target_map(self, step: int, token: int, view: str = "whole"):
        """The first image's map of token index `token` at `step`: its share of the whole attention row
        ("whole"), or per pixel its share of the recorded tokens ("text": of the prompt's words when those are
        what the recorder keeps)."""
        maps = self.maps[step][0]
        m = maps[self.token_index(token)]
        return m / maps.sum(dim=0).clamp_min(1e-12) if view == "text" else m

    def token_index(self, token: int) -> int:
        """Where token index `token` sits along the recorder's token axis."""
        if self.tokens is None:
            return int(token)
        try:
            return self.tokens.index(int(token))
        except ValueError:
            raise KeyError(f"token {token} was not recorded; recorded tokens: {self.tokens}") from None

    def layer_nbytes(self) -> int:
        """Bytes held by the per-layer maps (`per_layer`), which `nbytes` does not count."""
        return sum(t.numel() * t.element_size() for per in self.layer_maps.values() for t in per.values())

    def nbytes(self) -> int:
        """Bytes held by the stored maps, statistics and values (the running sum and the per-layer maps
        excluded: see `layer_nbytes`)."""
        self.finish()
        total = sum(t.numel() * t.element_size() for t in self.maps.values())
        total += sum(t.numel() * t.element_size() for t in self.values.values())
        total += sum(t.numel() * t.element_size() for d in self.stats.values() for t in d.values())
        return total

    def bound(self, n_images: int, n_steps_total: int | None = None, n_columns: int = 77) -> int:
        """The most bytes this recorder can store for `n_images` images (and, for stats_steps="all",
        a call of `n_steps_total` steps): what was asked for, nothing more (per_layer maps not counted).
        n_columns: the text columns the layers hand over, when every token is recorded (77 on a UNet)."""
        n_tokens = n_columns if self.tokens is None else len(self.tokens)
        pixels = self.resolution[0] * self.resolution[1]
        if self.stats_steps is None:
            if n_steps_total is None:
                raise ValueError("stats_steps='all': give n_steps_total")
            n_stats = n_steps_total
        else:
            n_stats = len(self.stats_steps)
        per_image_token = 4 * (len(self.steps) * pixels + len(self.values_steps) * pixels + len(STATISTICS) * n_stats)
        return per_image_token * n_tokens * n_images

    @contextmanager
    def attached(self, regulator):
        """Observe the calls of `regulator` (an AttentionRegulator) inside the `with` block:

            with recorder.attached(reg):
                reg.run(prompt, None, generator=g)   # or reg(prompt, targets=...)
        """
        try:
            with regulator.observing(self):
                yield self
        finally:
            self.finish()

    # -- the observer protocol ------------------------------------------------------------------
    def wants_step(self, step: int) -> bool:
        return step in self.steps or step in self.values_steps or self._wants_stats(step)

    def wants_layer(self, layer: str) -> bool:
        return self.layers is None or any(layer == x or layer.startswith(x + ".") for x in self.layers)

    def wants(self, layer: str, step: int) -> bool:
        return self.wants_step(step) and self.wants_layer(layer)

    @torch.no_grad()
    def record(self, layer: str, step: int, probs: torch.Tensor, state) -> None:
        if self._sum_step is not None and step != self._sum_step:
            self.finish()
        batch, _heads, n_pixels, n_columns = probs.shape
        cond = probs[state.conditional(batch, self.guidance)]
        if self.tokens is not None:
            if max(self.tokens) >= n_columns:
                raise ValueError(f"token {max(self.tokens)} is not a column of layer {layer}'s attention "
                                 f"({n_columns} text columns)")
            cond = cond[..., self.tokens]
        cond = cond.mean(dim=1)  # heads
        h, w = state.map_shape(n_pixels)
        maps = cond.transpose(1, 2).reshape(cond.shape[0], cond.shape[2], h, w).float()
        if (h, w) != self.resolution:
            maps = F.interpolate(maps, size=self.resolution, mode="bilinear", align_corners=False)
        if self.per_layer and step in self.steps:
            self.layer_maps.setdefault(step, {})[layer] = maps.cpu().clone()
        # The running sum stays on the pipeline's device (one transfer per step, in finish()).
        if self._sum is None:
            self._sum, self._sum_step, self._count = maps, step, 0
        else:
            if self._sum.shape != maps.shape:
                raise RuntimeError(f"layer {layer} gave maps of shape {tuple(maps.shape)}, expected {tuple(self._sum.shape)}")
            self._sum = self._sum + maps
        self._count += 1
        self.recorded_layers.setdefault(step, []).append(layer)

    def _wants_stats(self, step: int) -> bool:
        return self.stats_steps is None or step in self.stats_steps


def _steps(steps: Iterable[int], name: str) -> list[int]:
    if isinstance(steps, (str, bytes)):
        raise ValueError(f"{name} must be a list of step numbers, got {steps!r}")
    out = [int(s) for s in steps]
    bad = [s for s in out if s < 0]
    if bad:
        raise ValueError(f"{name} must be step numbers >= 0, got {bad}")
    return out
