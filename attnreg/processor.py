"""The diffusers side: an attention processor that regulates the selected cross-attention layers.

It speaks diffusers' processor protocol. On a layer and step that is neither edited nor recorded it
hands the call to the layer's own processor untouched (SDPA stays fast). On an edited one it computes
the attention once, explicitly, because the probabilities must be changed. On one that is only
recorded, the layer's own processor still gives the output (so recording never changes the image) and
the probabilities are computed beside it for the observers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .compiled import editor
from .config import RegulationConfig
from .geometry import map_shape
from .regulation import gaussian_bases, regulate_step


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
    image_seeds: list[int] | None = None  # the stream of each image's initial weights (None: `positional_seeds`)

    def groups(self) -> dict[tuple, list[int]]:
        """{(targets, number of nouns, pairs): images}: images sharing their targets are solved together."""
        groups: dict[tuple, list[int]] = {}
        for image, targets in enumerate(self.image_targets):
            if targets:
                n_nouns = self.image_nouns[image] if self.image_nouns else len(targets)
                pairs = self.image_pairs[image] if self.image_pairs else ()
                groups.setdefault((targets, n_nouns, pairs), []).append(image)
        return groups


def positional_seeds(config, n_images: int) -> list[int]:
    """The initial-weight streams of a call's images when no generator keys them: by position."""
    return [config.seed + i for i in range(n_images)]


@dataclass
class RegulationState:
    """Shared by every processor of one regulator: the step, the plan, and what each layer remembers."""

    config: RegulationConfig
    edited_layers: frozenset[str]
    plan: CallPlan | None = None
    step: int = 0
    latent_hw: tuple[int, int] | None = None
    generators: list[torch.Generator] = field(default_factory=list)  # per image of the call
    previous_best: dict = field(default_factory=dict)  # (layer, targets) -> weights of last step
    observers: list = field(default_factory=list)  # e.g. an attention recorder, see recording.py
    stats: dict = field(default_factory=dict)  # (layer, step, targets) -> (initial loss, best loss), 0-d tensors
    # How the model's batch and rows are laid out, for the observers (set by the regulator of the family):
    # guided: the batch is a classifier-free guidance batch (unconditional half first); None: it depends on
    #   the call (the UNet: guidance_scale > 1), False: never (FLUX's guidance-distilled batch).
    guided: bool | None = None
    # image_keys: the rows also attend to the image tokens (joint attention), so a row's softmax spans the
    #   text and the image columns, of which the observers are handed the text ones.
    image_keys: bool = False
    text_tokens: int | None = None  # the call's joint text length, where the model's forward says it (FLUX)
    _bases: dict = field(default_factory=dict)

    def start(self, plan: CallPlan | None) -> None:
        self.plan, self.step, self.latent_hw, self.text_tokens = plan, 0, None, None
        # Each image draws its initial weights from its own stream, so it does not depend on its batch.
        seeds = [] if plan is None else plan.image_seeds or positional_seeds(self.config, plan.n_images)
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        self.previous_best.clear()
        self.stats.clear()

    def stop(self) -> None:
        self.plan, self.generators = None, []
        self.previous_best.clear()

    def edits(self, layer: str) -> bool:
        return self.plan is not None and layer in self.edited_layers and self.step < self.plan.edit_steps

    def observed(self, layer: str) -> list:
        return [o for o in self.observers if o.wants(layer, self.step)]

    def conditional(self, batch: int, guidance: bool = True) -> slice:
        """The batch rows of the images the call makes (the conditional half of a guidance batch): from the
        plan when there is one, else from `guided` (`guidance`, the caller's word, where that is None)."""
        if self.plan is not None:
            return slice(batch - self.plan.n_images, batch)
        guided = guidance if self.guided is None else self.guided
        if not guided:
            return slice(0, batch)
        if batch % 2:
            raise RuntimeError(f"expected a guidance batch (unconditional + conditional), got a batch of {batch}")
        return slice(batch // 2, batch)

    def row_width(self, n_pixels: int, n_text: int) -> int:
        """How many key columns a row's softmax spans, given the observers' `n_text` text columns."""
        return n_text + n_pixels if self.image_keys else n_text

    def map_shape(self, n_pixels: int) -> tuple[int, int]:
        """(H, W) of a layer's map from its pixel count and this call's latent size."""
        return map_shape(n_pixels, self.latent_hw)

    def initial_weights(self, images: list[int], shape: tuple[int, ...]) -> torch.Tensor:
        """Each image's (heads, K, n) initial weights, uniform in [init_low, init_high), stacked to (B, K, n)."""
        low, high = self.config.init_low, self.config.init_high
        draws = [torch.rand(shape, generator=self.generators[i]).mul_(high - low).add_(low) for i in images]
        return torch.cat(draws)

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
        if state.config.loss == "relative" and not observers:  # the release computes the whole batch explicitly
            return self._conditional_only(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        output = self._explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb, edit, observers)
        if output is UNCHANGED:
            output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return output

    def _conditional_only(self, attn, hidden_states, context, attention_mask, temb, **kwargs):
        """An edited call of the fast path: only the conditional half (the second) is computed explicitly;
        the unconditional half, which regulation never changes, goes through the layer's own processor."""
        n = self._check_batch(hidden_states.shape[0], conditional=False)

        def half(x, part):  # a per-image tensor's rows of one half; anything else as it is
            return x[part] if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == 2 * n else x

        cond, uncond = slice(n, None), slice(None, n)
        output = self._explicit(attn, hidden_states[cond], context[cond], half(attention_mask, cond), half(temb, cond),
                                True, [], conditional=True)
        if output is UNCHANGED:  # the whole batch through the layer's own processor: bit for bit the plain call
            return self.original(attn, hidden_states, context, attention_mask, temb, **kwargs)
        rest = self.original(attn, hidden_states[uncond], context[uncond], half(attention_mask, uncond),
                             half(temb, uncond), **kwargs)
        return torch.cat([rest, output])  # the guidance batch's order: unconditional, then conditional

    def _explicit(self, attn, hidden_states, context, attention_mask, temb, edit, observers, probs_only=False,
                  conditional=False):
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
        key = attn.to_k(context)
        heads, head_dim = attn.heads, key.shape[-1] // attn.heads
        query, key = (x.view(batch, -1, heads, head_dim).transpose(1, 2) for x in (query, key))
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
            probs, changed = self._regulate(scores, probs, n_pixels, conditional)
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

        # The values only now: a call the neglect test hands back to the layer's own processor never needs them.
        value = attn.to_v(context).view(batch, -1, heads, head_dim).transpose(1, 2)
        hidden_states = torch.matmul(probs.to(value.dtype), value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _regulate(self, scores: torch.Tensor, probs: torch.Tensor, n_pixels: int,
                  conditional: bool = False) -> tuple[torch.Tensor, bool]:
        """The conditional half's probabilities after regulation (regulation.regulate_step per group of
        images sharing their targets), and whether any image was changed. `conditional`: the tensors hold
        only the conditional half."""
        n = self._check_batch(scores.shape[0], conditional)
        first = 0 if conditional else n  # the conditional half comes second
        probs, changed = regulate_groups(self.state, self.name, scores, probs, lambda image: first + image, n_pixels)
        return probs, bool(changed)

    def _check_batch(self, batch: int, conditional: bool) -> int:
        """The plan's number of images, once `batch` is the guidance batch (or its conditional half) of them."""
        n = self.state.plan.n_images
        if batch != (n if conditional else 2 * n):
            raise RuntimeError(f"attnreg expected a guidance batch of {2 * n} (unconditional + conditional), got {batch}")
        return n


def regulate_groups(state: RegulationState, layer: str, scores: torch.Tensor, probs: torch.Tensor, row_of,
                    n_pixels: int, config: RegulationConfig | None = None, restore_eos_only: bool = False,
                    first_word: int | None = None):
    """`regulation.regulate_step` for every group of the plan's images that share their targets, at one
    edited layer call: (probs with those images' rows replaced, the images changed).

    scores, probs: (batch, heads, P, J); `row_of(image)` is the image's row in them. The state keeps each
    group's best weights for the next step's blend and the solver's losses. `restore_eos_only` puts
    back the EOS column after the step (for a text stream without SOS, where `config` has
    restore_special off). `first_word`: the column of the prompt's first word; with it (and
    `config.text_units`) the loss measures the targets as shares of the prompt's word columns (first_word up
    to each image's EOS), not of the whole row."""
    plan, heads = state.plan, scores.shape[1]
    config = config or state.config
    hw = state.map_shape(n_pixels)
    bases = state.bases(hw, scores.device)
    edit = editor(config)  # None: eager
    probs, changed = probs.clone(), []
    for (targets, n_nouns, pairs), images in plan.groups().items():
        rows = [row_of(i) for i in images]
        init = state.initial_weights(images, (heads, bases.shape[0], len(targets))).to(scores.device)
        key = (layer, targets)
        eos = torch.tensor([plan.image_eos[i] for i in images], device=scores.device).repeat_interleave(heads)
        flat = lambda x: x[rows].reshape(len(rows) * heads, n_pixels, -1)  # noqa: E731 - (B, P, J)
        unedited = flat(probs)
        words = None
        if first_word is not None and config.text_units:
            columns = torch.arange(scores.shape[-1], device=scores.device)
            words = (columns >= first_word) & (columns < eos[:, None])  # (rows x heads, J)
        done = regulate_step(flat(scores), unedited, targets, bases, init, state.previous_best.get(key),
                             state.step, config, heads=heads, eos=eos, n_nouns=n_nouns, pairs=pairs,
                             edit=edit, hw=hw, words=words)
        if done is None:  # no image of this group needs regulation at this step
            state.previous_best[key] = torch.zeros_like(init)
            continue
        new = done.probs
        if restore_eos_only:
            every = torch.arange(new.shape[0], device=new.device)
            new[every, :, eos] = unedited[every, :, eos]
        state.previous_best[key] = done.weights
        state.stats[(layer, state.step, targets)] = (done.initial_loss, done.loss)
        probs[rows] = new.reshape(len(rows), heads, n_pixels, -1)
        changed += images
    return probs, changed
