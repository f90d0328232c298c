"""Joint attention in diffusers' SD3 and FLUX blocks: which layers there are, the image and text streams of a
layer call, and `JointRegulatedProcessor`, which edits the image rows at the target text columns."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..processor import UNCHANGED, RegulationState, regulate_groups
from ..regulator import LayerError, layers_named

def joint_attention_layers(transformer) -> list[str]:
    """The attention modules whose keys include a text stream ("transformer_blocks.3.attn"), in order."""
    return [name for name, module in transformer.named_modules()
            if name.startswith("transformer_blocks.") and name.endswith(".attn")
            and getattr(module, "add_k_proj", None) is not None]


def single_stream_layers(transformer) -> list[str]:
    """FLUX's single-stream attention modules ("single_transformer_blocks.2.attn"), in order: one sequence,
    text tokens first, then image tokens."""
    return [name for name, _ in transformer.named_modules()
            if name.startswith("single_transformer_blocks.") and name.endswith(".attn")]


def editable_layers(transformer) -> list[str]:
    """Every attention module whose image queries see the text: the joint blocks, then the single-stream ones."""
    return joint_attention_layers(transformer) + single_stream_layers(transformer)


def default_joint_layers(transformer) -> tuple[str, ...]:
    """The middle third of the joint blocks (at least one): SD3 medium's 24 -> blocks 8..15."""
    names = joint_attention_layers(transformer)
    n = len(names)
    start, stop = n // 3, max(n // 3 + 1, (2 * n) // 3)
    return tuple(names[start:stop])


def select_joint_layers(transformer, layers: tuple[str, ...] | None) -> frozenset[str]:
    """The attention modules named by `layers`: "transformer_blocks.3", its ".attn", or "3"; on FLUX also
    "single_transformer_blocks.2" (or its ".attn")."""
    names = editable_layers(transformer)
    if layers is None:
        return frozenset(default_joint_layers(transformer))
    chosen = set()
    for entry in layers:
        entry = str(entry).removesuffix(".processor")
        if entry.isdigit():
            entry = f"transformer_blocks.{entry}"
        hits = layers_named(names, entry)
        if not hits:
            n_joint, n_single = len(joint_attention_layers(transformer)), len(single_stream_layers(transformer))
            singles = f", single_transformer_blocks.0 .. single_transformer_blocks.{n_single - 1}" if n_single else ""
            raise LayerError(
                f"{entry!r} is not a joint-attention block of this transformer; valid blocks: "
                f"transformer_blocks.0 .. transformer_blocks.{n_joint - 1}{singles} (or a joint block's index, or a "
                f"full name such as {names[0]!r})")
        chosen.update(hits)
    return frozenset(chosen)


def sd3_streams(attn, hidden_states, context):
    """SD3's JointAttnProcessor2_0 up to the attention: (image q, k, v), (text q, k, v), each (B, H, S, D)."""
    batch = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads

    def split(x):
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    query, key, value = split(query), split(key), split(value)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    c_query, c_key, c_value = split(attn.add_q_proj(context)), split(attn.add_k_proj(context)), split(attn.add_v_proj(context))
    if attn.norm_added_q is not None:
        c_query = attn.norm_added_q(c_query)
    if attn.norm_added_k is not None:
        c_key = attn.norm_added_k(c_key)
    return (query, key, value), (c_query, c_key, c_value)


def flux_streams(attn, hidden_states, context, image_rotary_emb):
    """FluxAttnProcessor up to the attention: the joint (q, k, v) in its order (text, image), (B, S, H, D),
    RoPE applied, and the number of text tokens."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden_states, context)
    query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
    query, key = attn.norm_q(query), attn.norm_k(key)
    e_query, e_key, e_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (e_query, e_key, e_value))
    e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
    query, key, value = (torch.cat([a, b], dim=1) for a, b in ((e_query, query), (e_key, key), (e_value, value)))
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value, context.shape[1]


def flux_single_streams(attn, hidden_states, image_rotary_emb):
    """FluxAttnProcessor without encoder_hidden_states (a single-stream block; its one sequence is text
    then image, as FluxSingleTransformerBlock concatenates them): (q, k, v), (B, S, H, D), RoPE applied."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    query, key, value = _get_qkv_projections(attn, hidden_states, None)[:3]
    query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


class JointRegulatedProcessor:
    """Wraps one joint-attention layer's own processor (JointAttnProcessor2_0 for SD3, FluxAttnProcessor
    for FLUX); regulates or records the image-to-text block of its attention when asked.

    Not edited and not recorded: the layer's own processor runs, untouched. Edited: the image rows'
    probabilities of the regulated images are computed explicitly in fp32 (text columns first), handed
    to `regulate_step`, and their attention output is replaced; every other row (the text queries, the
    unconditional half, images not regulated) comes from the same attention call the original makes.
    When regulation changes nothing, the layer's own processor gives the output, so such a call is the
    plain pipeline's bit for bit. Observers get the image rows x text columns probabilities
    (batch, heads, image tokens, text tokens), softmax taken over the whole joint sequence.

    A FLUX single-stream layer (`single`) gets one sequence, text then image, and no encoder_hidden_states;
    its text length is the call's (`state.text_tokens`, from the transformer's forward).
    """

    def __init__(self, name: str, original, state: RegulationState, family: str, restore_sos: bool,
                 first_word: int | None = None):
        self.name, self.original, self.state, self.family = name, original, state, family
        self.first_word = first_word  # the joint text column of the prompt's first word (the loss's text units)
        self.single = name.startswith("single_transformer_blocks.")
        # FLUX: T5 has no SOS and column 0 is a word, which `restore_special` would put back unedited; so
        # regulate_step runs without it and only the EOS column is restored here.
        self.restore_eos_only = not restore_sos and state.config.restore_special
        self.config = state.config.replace(restore_special=False) if self.restore_eos_only else state.config

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        state = self.state
        joint = encoder_hidden_states is not None or (self.single and state.text_tokens is not None)
        edit = joint and state.edits(self.name)
        observers = state.observed(self.name) if joint else []
        if not edit and not observers:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise NotImplementedError("attnreg does not regulate a joint attention with an attention_mask")
        rotary = kwargs.get("image_rotary_emb", args[0] if args else None)
        output = self._explicit(attn, hidden_states, encoder_hidden_states, rotary, edit, observers)
        if output is UNCHANGED:
            output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        return output

    def _explicit(self, attn, hidden_states, context, rotary, edit, observers):
        if self.family == "sd3":
            (q, k, v), (cq, ck, cv) = sd3_streams(attn, hidden_states, context)
            n_text = cq.shape[2]
            image_q, keys, values = q, torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # text first
        elif self.single:
            query, key, value = flux_single_streams(attn, hidden_states, rotary)
            n_text = self.state.text_tokens
            image_q = query[:, n_text:].transpose(1, 2)
            keys, values = key.transpose(1, 2), value.transpose(1, 2)  # one sequence, text first
        else:
            query, key, value, n_text = flux_streams(attn, hidden_states, context, rotary)
            image_q = query[:, n_text:].transpose(1, 2)
            keys, values = key.transpose(1, 2), value.transpose(1, 2)  # (B, H, S, D), already text first
        batch, heads, n_image, head_dim = image_q.shape
        edited_rows = self._cond_rows(batch) if edit else []  # checks the batch is the plan's
        rows = list(range(batch)) if observers else edited_rows
        # Logits in fp32 whatever the pipeline's dtype; the scale is SDPA's default, as both processors use.
        scores = torch.matmul(image_q[rows].float(), keys[rows].float().transpose(-1, -2)) / math.sqrt(head_dim)
        probs = scores.softmax(dim=-1)  # (rows, H, image tokens, text + image tokens)
        changed: list[int] = []
        if edit:
            probs, changed = self._regulate(scores, probs, rows, n_image)
        for observer in observers:
            observer.record(self.name, self.state.step, probs[..., :n_text], self.state)
        if not changed:
            return UNCHANGED
        edited = torch.matmul(probs[[rows.index(r) for r in changed]].to(values.dtype), values[changed])  # (r, H, N, D)
        if self.family == "sd3":
            return self.sd3_output(attn, hidden_states, (q, k, v), (cq, ck, cv), changed, edited)
        return self.flux_output(attn, query, key, value, n_text, changed, edited, self.single)

    def _cond_rows(self, batch: int) -> list[int]:
        n = self.state.plan.n_images
        guided = self.state.guided
        if batch != (2 * n if guided else n):
            what = f"a guidance batch of {2 * n} (unconditional + conditional)" if guided else f"a batch of {n}"
            raise RuntimeError(f"attnreg expected {what}, got {batch}")
        return list(range(n, 2 * n)) if guided else list(range(n))

    def _regulate(self, scores, probs, rows: list[int], n_image: int):
        """regulation.regulate_step per group of images sharing their targets; (probs, batch rows changed)."""
        first = self.state.plan.n_images if self.state.guided else 0  # where the edited images start
        probs, images = regulate_groups(self.state, self.name, scores, probs, lambda image: rows.index(first + image),
                                        n_image, self.config, self.restore_eos_only, self.first_word)
        return probs, sorted(first + i for i in images)

    @staticmethod
    def sd3_output(attn, hidden_states, image, text, changed, edited, attn_mask=None):
        # JointAttnProcessor2_0 from the attention on, with the regulated image rows replaced (none when
        # `changed` is empty); `attn_mask`: an additive bias on the logits, keys laid out image then text.
        (q, k, v), (cq, ck, cv) = image, text
        n_image = q.shape[2]
        query, key, value = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
        if changed:
            out[changed, :, :n_image] = edited.to(out.dtype)
        return JointRegulatedProcessor.sd3_project(attn, out.to(query.dtype), n_image)

    @staticmethod
    def sd3_project(attn, out, n_image: int):
        # JointAttnProcessor2_0 after the attention: `out` (B, H, image + text tokens, D) to its two outputs.
        batch, heads, _, head_dim = out.shape
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        out, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, context

    @staticmethod
    def flux_output(attn, query, key, value, n_text, changed, edited, single=False):
        # FluxAttnProcessor from the attention on, with the regulated image rows replaced.
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        out = dispatch_attention_fn(query, key, value, attn_mask=None, backend=FluxAttnProcessor._attention_backend,
                                    parallel_config=FluxAttnProcessor._parallel_config)  # (B, S, H, D)
        out[changed, n_text:] = edited.transpose(1, 2).to(out.dtype)
        return JointRegulatedProcessor.flux_project(attn, out.to(query.dtype), n_text, single)

    @staticmethod
    def flux_project(attn, out, n_text: int, single: bool = False):
        # FluxAttnProcessor after the attention: `out` (B, S, H, D), text first, to its output(s).
        out = out.flatten(2, 3)
        if single:  # no encoder_hidden_states: the processor returns the one sequence as it is
            return out
        context, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context.contiguous())
