"""The diffusers side: an attention processor that regulates the selected cross-attention layers.

It speaks diffusers' processor protocol. On a layer and step that is neither edited nor recorded it
hands the call to the layer's own processor untouched (SDPA stays fast). On an edited one it computes
the attention once, explicitly, because the probabilities must be changed. On one that is only
recorded, the layer's own processor still gives the output (so recording never changes the image) and
the probabilities are computed beside it for the observers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import RegulationConfig
from .regulation import (
    binding_loss, gaussian_bases, offsets_from_weights, optimise_offsets, optimise_rows, optimise_rows_bound,
    quantile_along_pixels, reference_levels, smoothed_weights,
)


@dataclass
class CallPlan:
    """What one pipeline call asks for, fixed before the first step."""

    n_images: int  # images in the conditional half of the guidance batch
    image_targets: list[tuple[int, ...]]  # target token indices, per image
    image_eos: list[int]  # index of the first EOS, per image
    edit_steps: int
    # With attribute binding, image_targets holds the nouns' tokens then their modifiers' tokens:
    image_nouns: list[int] | None = None  # how many of image_targets are nouns, per image (None: all)
    image_pairs: list[tuple[tuple[int, int], ...]] | None = None  # (modifier column, noun column), per image


@dataclass
class RegulationState:
    """Shared by every processor of one regulator: the step, the plan, and what each layer remembers."""

    config: RegulationConfig
    edited_layers: frozenset[str]
    plan: CallPlan | None = None
    step: int = 0
    latent_hw: tuple[int, int] | None = None
    generator: torch.Generator | None = None
    previous_best: dict = field(default_factory=dict)  # (layer, targets) -> weights of last step
    observers: list = field(default_factory=list)  # e.g. an attention recorder, see recording.py
    stats: dict = field(default_factory=dict)  # (layer, step, targets) -> (initial loss, best loss), 0-d tensors
    _bases: dict = field(default_factory=dict)

    def start(self, plan: CallPlan | None) -> None:
        self.plan, self.step, self.latent_hw = plan, 0, None
        self.generator = torch.Generator("cpu").manual_seed(self.config.seed)
        self.previous_best.clear()
        self.stats.clear()

    def stop(self) -> None:
        self.plan, self.generator = None, None
        self.previous_best.clear()

    def edits(self, layer: str) -> bool:
        return self.plan is not None and layer in self.edited_layers and self.step < self.plan.edit_steps

    def observed(self, layer: str) -> list:
        return [o for o in self.observers if o.wants(layer, self.step)]

    def map_shape(self, n_pixels: int) -> tuple[int, int]:
        """(H, W) of a layer's map from its pixel count and the latent's size."""
        if self.latent_hw is not None:
            h, w = self.latent_hw
            for level in range(8):
                hh, ww = math.ceil(h / 2**level), math.ceil(w / 2**level)
                if hh * ww == n_pixels:
                    return hh, ww
        side = math.isqrt(n_pixels)
        if side * side != n_pixels:
            raise ValueError(f"cannot tell the shape of a {n_pixels}-pixel attention map")
        return side, side

    def bases(self, hw: tuple[int, int], device) -> torch.Tensor:
        key = (hw, str(device))
        if key not in self._bases:
            c = self.config
            self._bases[key] = gaussian_bases(*hw, per_side=c.bumps_per_side, sigma_divisor=c.sigma_divisor, device=device)
        return self._bases[key]


UNCHANGED = object()  # _explicit's answer when regulation changed nothing: use the layer's own output


class RegulatedAttnProcessor:
    """Wraps one layer's own processor; regulates or records its cross-attention when asked."""

    def __init__(self, name: str, original: Callable, state: RegulationState):
        self.name, self.original, self.state = name, original, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state = self.state
        edit = encoder_hidden_states is not None and state.edits(self.name)
        observers = state.observed(self.name) if encoder_hidden_states is not None else []
        if not edit:
            output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
            if observers:
                # Recording must not change the image: the layer's own processor gives the output (SDPA
                # and an explicit softmax differ in the last bits); the probabilities are made on the side.
                self._explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb, False, observers, True)
            return output
        output = self._explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb, edit, observers)
        if output is UNCHANGED:
            output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return output

    def _explicit(self, attn, hidden_states, context, attention_mask, temb, edit, observers, probs_only=False):
        # Mirrors diffusers' AttnProcessor2_0, with the softmax done by hand.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, n_pixels, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        heads, head_dim = attn.heads, key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Logits in fp32 whatever the pipeline's dtype: the optimisation and the softmax need it.
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale  # (batch, heads, P, J)
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            scores = scores + mask.view(batch, heads, -1, mask.shape[-1]).float()
        probs = scores.softmax(dim=-1)
        if edit:
            probs, changed = self._regulate(scores, probs, n_pixels)
            if not changed and not probs_only:
                # Nothing needed regulation in this call: the layer's own processor gives the output, so a
                # call in which no image is ever neglected is bit for bit the plain pipeline's.
                for observer in observers:
                    observer.record(self.name, self.state.step, probs, self.state)
                return UNCHANGED
        for observer in observers:
            observer.record(self.name, self.state.step, probs, self.state)
        if probs_only:
            return None

        hidden_states = torch.matmul(probs.to(value.dtype), value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _regulate(self, scores: torch.Tensor, probs: torch.Tensor, n_pixels: int) -> tuple[torch.Tensor, bool]:
        """Replace the conditional half's probabilities by softmax(S + Delta) (Sec. 4, Alg. 1).

        Returns the probabilities and whether any image was changed (with a `neglect_ratio`, images whose
        targets already hold similar attention are left as they are)."""
        state, config, plan = self.state, self.state.config, self.state.plan
        batch, heads = scores.shape[:2]
        n = plan.n_images
        if batch != 2 * n:
            raise RuntimeError(
                f"attnreg expected a guidance batch of {2 * n} (unconditional + conditional), got {batch}"
            )
        bases = state.bases(state.map_shape(n_pixels), scores.device)
        probs, changed = probs.clone(), False
        groups: dict[tuple, list[int]] = {}
        for image, targets in enumerate(plan.image_targets):
            if targets:
                n_nouns = plan.image_nouns[image] if plan.image_nouns else len(targets)
                pairs = plan.image_pairs[image] if plan.image_pairs else ()
                groups.setdefault((targets, n_nouns, pairs), []).append(image)
        for (targets, n_nouns, pairs), images in groups.items():
            rows = [n + i for i in images]  # the conditional half comes second
            s = scores[rows].reshape(len(rows) * heads, n_pixels, -1)  # (B, P, J)
            t = torch.tensor(targets, device=s.device)
            keep = torch.ones(s.shape[-1], dtype=torch.bool, device=s.device)
            keep[t] = False
            target_logits, rest_lse = s[..., t], torch.logsumexp(s[..., keep], dim=-1, keepdim=True)

            shape = (s.shape[0], bases.shape[0], len(targets))
            init = torch.rand(shape, generator=state.generator).mul_(config.init_high - config.init_low).add_(config.init_low)
            init = init.to(s.device)
            key = (self.name, targets)
            unedited = None  # the target maps before editing: the relative loss's reference
            if config.loss == "relative":
                unedited = probs[rows][..., t].reshape(len(rows) * heads, n_pixels, len(targets))
            result, edit_images = self._solve(target_logits, rest_lse, bases, init, unedited, heads, n_nouns, pairs)
            if result is None:  # nothing to regulate in this group at this step
                state.previous_best[key] = torch.zeros_like(init)
                continue
            previous = state.previous_best.get(key)
            if previous is None or previous.shape != init.shape:
                previous = init  # at the first edited step "previous" is the random start
            applied = smoothed_weights(previous, result.weights, state.step, config.smoothing, config.decay)
            if edit_images is not None:
                applied = applied * edit_images.repeat_interleave(heads)[:, None, None]
            state.previous_best[key] = result.weights
            state.stats[(self.name, state.step, targets)] = (result.initial_loss, result.loss)

            edited = s.clone()
            edited[..., t] = edited[..., t] + offsets_from_weights(applied, bases)
            p = edited.softmax(dim=-1)
            if config.restore_special:
                eos = torch.tensor([plan.image_eos[i] for i in images], device=s.device).repeat_interleave(heads)
                original = probs[rows].reshape_as(p)
                p[..., 0] = original[..., 0]
                b = torch.arange(p.shape[0], device=s.device)
                p[b, :, eos] = original[b, :, eos]
            if edit_images is not None:  # images left alone keep their probabilities exactly
                keep_rows = ~edit_images.repeat_interleave(heads)
                p[keep_rows] = probs[rows].reshape_as(p)[keep_rows]
            probs[rows] = p.reshape(len(rows), heads, n_pixels, -1)
            changed = True
        return probs, changed

    def _solve(self, target_logits, rest_lse, bases, init, unedited, heads, n_nouns, pairs):
        """The offsets' bump weights for one group of images: (SolverResult, which images to edit), with
        `edit_images` None when every image is edited, and (None, None) when none needs it this step."""
        config = self.state.config
        if config.loss != "relative":
            return optimise_offsets(
                target_logits, rest_lse, bases, init, config.iterations, config.lr, config.loss_weights
            ), None
        edit_images = None
        if config.neglect_ratio is not None:
            per_image = unedited.reshape(-1, heads, *unedited.shape[1:])
            edit_images = neglected(per_image[..., :n_nouns], config.quantile, config.neglect_ratio)
            if pairs and config.binding > 0:
                edit_images = edit_images | leaking(per_image, pairs, n_nouns)
            if not edit_images.any():
                return None, None
        ref_high, ref_mean = reference_levels(unedited[..., :n_nouns], config.quantile)
        if pairs and config.binding > 0:
            result = optimise_rows_bound(
                target_logits, rest_lse, bases, init, ref_high, ref_mean, pairs, n_nouns, config.binding,
                config.iterations, config.lr, config.loss_weights,
            )
        else:
            result = optimise_rows(
                target_logits, rest_lse, bases, init, ref_high, ref_mean, config.iterations, config.lr,
                config.loss_weights,
            )
        return result, edit_images


def leaking(target_maps: torch.Tensor, pairs, n_nouns: int) -> torch.Tensor:
    """Which images have a modifier whose (head-averaged) map overlaps another noun more than its own."""
    return binding_loss(target_maps.mean(dim=1), pairs, tuple(range(n_nouns))) > 0


def neglected(target_maps: torch.Tensor, quantile: float, ratio: float) -> torch.Tensor:
    """Which images need regulation: (images, heads, P, n) unedited target maps -> (images,) bool.

    On the head-averaged maps, an image is neglecting a target when its weakest target's top-decile
    level is below `ratio` times its strongest one's. One target is never neglected.
    """
    level = quantile_along_pixels(target_maps.mean(dim=1), quantile)[0]  # (images, n)
    return level.amin(dim=-1) < ratio * level.amax(dim=-1)
