"""Attention Regulation on MMDiT pipelines (joint attention): SD3 and FLUX.

In an MMDiT block the image tokens' queries attend to the text tokens and the image tokens in one
softmax. The "cross-attention map" of a target word is the image queries' probabilities at that word's
text column, so the edit is the paper's: Gaussian-bump offsets on the logits of the image rows at the
target text columns, every other column (the other text tokens and all image tokens) folded into the
log-sum-exp. `regulation.regulate_step` does exactly that when given the image rows with all key
columns; this module only moves tensors in and out of diffusers' joint-attention processors.

The text-first view. Whatever order the model concatenates the streams in (SD3: image then text; FLUX:
text then image), the regulated scores are laid out text columns first, then image columns. A target's
column is then its position in the joint text sequence (softmax does not care about column order), and
column 0 is the text stream's first token, which `restore_special` keeps as the release keeps SOS.

The joint text sequence (what `resolve()["indices"]` counts in):
  SD3:  columns 0..76 are the CLIP tokens (CLIP-L and CLIP-G side by side on the feature axis, one
        column per token: SOS, words, EOS, padding), columns 77..77+L-1 the T5 tokens (words, EOS,
        padding; L = the call's max_sequence_length, 256 by default). Without T5 (text_encoder_3=None)
        those L columns are the pipeline's zero embeddings. Targets are looked up in T5 when the
        pipeline has it, else in CLIP (`text_stream` overrides): one column per sub-token, in one stream.
  FLUX: the T5 tokens only (L = max_sequence_length, 512 by default); T5 has no SOS, so column 0 is the
        first word and `restore_special` is applied to the T5 EOS only (see `JointRegulatedProcessor`).

Guidance. SD3 runs classifier-free guidance as one batch (unconditional half first): the conditional
half is edited, as on the UNet. FLUX dev and schnell are guidance-distilled (the guidance scale is an
input of the transformer): the batch has no unconditional half and every image of it is edited.
FLUX's "true CFG" (true_cfg_scale > 1 with a negative prompt) runs the negative prompt as a second
transformer call, which is refused.

Layers. Every joint block runs at the image-token resolution, so only "which blocks" is a choice. The
default is a structural rule, the middle third of the dual-stream joint blocks (SD3 medium's 24: blocks
8..15; at least one block). With the `auto` preset (layer_choice="calibrated") a calibration the model
already has (its attnreg.json, or the user cache; `attnreg calibrate` writes one) replaces the rule;
none is run on first use, as it is for a UNet, because a calibration run on a real MMDiT (every block's
explicit image x (text + image) attention, 16 generations) costs far more than the call it would serve.
FLUX's single-stream blocks (`single_transformer_blocks.N`: one sequence, the text tokens first, then
the image tokens, and the block's attention call gets no encoder_hidden_states) can be named in
`layers` and are edited the same way: their image-query rows are the rows after the text tokens, and
the text length is taken from the transformer's own encoder_hidden_states. They are not in the default,
which is unchanged: nothing has measured that editing them helps (the default is the rule above until a
calibration says otherwise; calibration ranks them with the dual-stream blocks).

Observers (recorders, calibration) are handed, on every joint layer, the image rows at the text columns
of the same softmax the regulator edits (text + image keys), whether or not the layer is edited.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import RegulationConfig
from .processor import UNCHANGED, RegulationState, regulate_groups
from .regulator import AttentionRegulator, GuidanceError, LayerError, UnsupportedPipelineError, check_pipeline, pipeline_default
from .tokens import TargetError, Token, eos_index, format_tokens, resolve_targets, token_table

JOINT_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
CLIP_LENGTH = 77  # SD3's CLIP stream: tokenizer_max_length


def joint_family(pipe) -> str | None:
    """"sd3", "flux", or None for a pipeline that is not a supported MMDiT text-to-image pipeline."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if isinstance(pipe, StableDiffusion3Pipeline):
        return "sd3"
    if isinstance(pipe, FluxPipeline):
        return "flux"
    return None


def unsupported_variant(pipe) -> str | None:
    """Why an MMDiT-like pipeline that is not SD3/FLUX text-to-image cannot be regulated, or None."""
    name = type(pipe).__name__
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return None
    if re.search(r"Kontext|Fill|Img2Img|Inpaint|Control|Redux|PriorRedux", name):
        return (f"{name} is an image-conditioned variant (its image tokens also carry a reference or masked "
                "image), not supported")
    if name.startswith(("Flux", "StableDiffusion3")):
        return f"{name} is not one of the supported MMDiT pipelines"
    has_text_stream = any(getattr(m, "add_k_proj", None) is not None for m in transformer.modules())
    if not has_text_stream:
        return f"{name}'s transformer has no text stream in its attention (no joint text keys to regulate)"
    return f"{name} is not one of the supported MMDiT pipelines"


# -- text columns ------------------------------------------------------------------------------------


def t5_table(tokenizer, prompt: str, length: int) -> list[Token]:
    """Every T5 token the text encoder sees at `length` (words .. EOS), as the pipeline truncates them."""
    ids = tokenizer(prompt, truncation=True, max_length=length, add_special_tokens=True).input_ids
    return [Token(i, tokenizer.convert_ids_to_tokens(t).replace("\u2581", "") or "\u2581") for i, t in enumerate(ids)]


def resolve_t5_targets(tokenizer, prompt: str, targets: list[str | int], length: int) -> list[int]:
    """T5 token indices (0 = the first word; T5 has no SOS) of every sub-token of every target, as
    `tokens.resolve_targets` does for CLIP: phrases, "cat#2", ints as token indices. A target past the
    `length`-token truncation is a TargetError naming it and what the encoder sees."""
    full = tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids
    table = t5_table(tokenizer, prompt, length)
    found: list[int] = []
    past: list[str] = []
    for target in targets:
        if isinstance(target, int):
            if not 0 <= target < len(table) - 1:
                raise TargetError(f"target index {target} is not a word token of {prompt!r} in T5; valid indices are "
                                  f"0..{len(table) - 2}: {format_tokens(table)}")
            indices = [target]
        else:
            text, occurrence = str(target).strip(), 1
            match = re.match(r"^(.*?)#(\d+)$", text)
            if match:
                text, occurrence = match.group(1).strip(), int(match.group(2))
            sub = tokenizer(text, add_special_tokens=False).input_ids if text else []
            if not sub:
                raise TargetError(f"empty target {target!r}; the prompt's T5 tokens are: {format_tokens(table)}")
            starts = [i for i in range(len(full) - len(sub) + 1) if full[i : i + len(sub)] == sub]
            if len(starts) < occurrence:
                where = "" if not starts else f" (it occurs {len(starts)} time(s))"
                raise TargetError(f"target {target!r} is not in the prompt {prompt!r}{where}; its T5 tokens are: "
                                  f"{format_tokens(table)}")
            start = starts[occurrence - 1]
            indices = list(range(start, start + len(sub)))
            if indices[-1] >= length - 1:  # the last slot holds EOS after truncation
                past.append(f"{target!r} (T5 token {start})")
                continue
        found += [i for i in indices if i not in found]
    if past:
        raise TargetError(
            f"target{'s' if len(past) > 1 else ''} {', '.join(past)} of {prompt!r} {'are' if len(past) > 1 else 'is'} past "
            f"the {length}-token truncation (max_sequence_length); the text encoder only sees: {format_tokens(table)}")
    return found


@dataclass(frozen=True)
class TextStream:
    """Where a pipeline's target tokens are found and where they sit in the joint text sequence."""

    name: str  # "t5" or "clip"
    tokenizer: object
    offset: int  # column of the stream's token 0 in the joint text sequence

    def resolve(self, prompt: str, targets: list, length: int) -> list[int]:
        if self.name == "clip":
            return resolve_targets(self.tokenizer, prompt, targets)
        return resolve_t5_targets(self.tokenizer, prompt, targets, length)

    def table(self, prompt: str, length: int) -> list[Token]:
        return token_table(self.tokenizer, prompt) if self.name == "clip" else t5_table(self.tokenizer, prompt, length)

    def width(self, length: int) -> int:
        """How many columns of the joint text sequence the stream holds (`length`: the T5 length)."""
        return CLIP_LENGTH if self.name == "clip" else length

    def eos(self, prompt: str, length: int) -> int:
        if self.name == "clip":
            return eos_index(self.tokenizer, prompt)
        return len(t5_table(self.tokenizer, prompt, length)) - 1


def text_streams(pipe, family: str) -> tuple[TextStream, ...]:
    """Every stream of the joint text sequence that has a tokenizer, in column order: SD3's CLIP (0..76)
    and, where the pipeline has a T5 tokenizer, its T5 (77 on); FLUX's T5 (0 on). `pipe` is anything with
    the pipeline's tokenizer attributes."""
    if family == "flux":
        return (TextStream("t5", pipe.tokenizer_2, 0),)
    clip = TextStream("clip", pipe.tokenizer, 0)
    t5 = getattr(pipe, "tokenizer_3", None)
    if t5 is None or getattr(pipe, "text_encoder_3", None) is None:  # without T5 its columns are zeros
        return (clip,)
    return (clip, TextStream("t5", t5, CLIP_LENGTH))


def word_tokens(stream: TextStream, table: list[Token]) -> list[Token]:
    """The word tokens of a stream's table: without SOS (CLIP's column 0) and the first EOS."""
    return table[1:-1] if stream.name == "clip" else table[:-1]


def choose_text_stream(pipe, family: str, choice: str | None = None) -> TextStream:
    """The stream targets are looked up in: T5 where the pipeline has it (SD3's tokenizer_3, FLUX's
    tokenizer_2), else SD3's CLIP; `choice` ("t5" or "clip") overrides for SD3."""
    if family == "flux":
        if choice not in (None, "t5"):
            raise ValueError(f"FLUX's joint attention sees T5 tokens only; text_stream={choice!r} is not possible")
        return TextStream("t5", pipe.tokenizer_2, 0)
    if choice not in (None, "t5", "clip"):
        raise ValueError(f"text_stream must be 't5' or 'clip', got {choice!r}")
    streams = {s.name: s for s in text_streams(pipe, family)}
    has_t5 = "t5" in streams
    if choice == "t5" and not has_t5:
        raise ValueError("text_stream='t5' needs the pipeline's T5 encoder; this SD3 pipeline has text_encoder_3=None "
                         "(its T5 columns are zeros), use 'clip'")
    return streams["clip"] if choice == "clip" or not has_t5 else streams["t5"]


# -- layers --------------------------------------------------------------------------------------------


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
        hits = [n for n in names if n == entry or n.startswith(entry + ".")]
        if not hits:
            n_joint, n_single = len(joint_attention_layers(transformer)), len(single_stream_layers(transformer))
            singles = f", single_transformer_blocks.0 .. single_transformer_blocks.{n_single - 1}" if n_single else ""
            raise LayerError(
                f"{entry!r} is not a joint-attention block of this transformer; valid blocks: "
                f"transformer_blocks.0 .. transformer_blocks.{n_joint - 1}{singles} (or a joint block's index, or a "
                f"full name such as {names[0]!r})")
        chosen.update(hits)
    return frozenset(chosen)


# -- the processor -------------------------------------------------------------------------------------


def _sd3_streams(attn, hidden_states, context):
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


def _flux_streams(attn, hidden_states, context, image_rotary_emb):
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


def _flux_single_streams(attn, hidden_states, image_rotary_emb):
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
            (q, k, v), (cq, ck, cv) = _sd3_streams(attn, hidden_states, context)
            n_text = cq.shape[2]
            image_q, keys, values = q, torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # text first
        elif self.single:
            query, key, value = _flux_single_streams(attn, hidden_states, rotary)
            n_text = self.state.text_tokens
            image_q = query[:, n_text:].transpose(1, 2)
            keys, values = key.transpose(1, 2), value.transpose(1, 2)  # one sequence, text first
        else:
            query, key, value, n_text = _flux_streams(attn, hidden_states, context, rotary)
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
            return self._sd3_output(attn, hidden_states, (q, k, v), (cq, ck, cv), changed, edited)
        return self._flux_output(attn, query, key, value, n_text, changed, edited, self.single)

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
    def _sd3_output(attn, hidden_states, image, text, changed, edited, attn_mask=None):
        # JointAttnProcessor2_0 from the attention on, with the regulated image rows replaced (none when
        # `changed` is empty); `attn_mask`: an additive bias on the logits, keys laid out image then text.
        (q, k, v), (cq, ck, cv) = image, text
        n_image = q.shape[2]
        query, key, value = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
        if changed:
            out[changed, :, :n_image] = edited.to(out.dtype)
        return JointRegulatedProcessor._sd3_project(attn, out.to(query.dtype), n_image)

    @staticmethod
    def _sd3_project(attn, out, n_image: int):
        # JointAttnProcessor2_0 after the attention: `out` (B, H, image + text tokens, D) to its two outputs.
        batch, heads, _, head_dim = out.shape
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        out, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, context

    @staticmethod
    def _flux_output(attn, query, key, value, n_text, changed, edited, single=False):
        # FluxAttnProcessor from the attention on, with the regulated image rows replaced.
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        out = dispatch_attention_fn(query, key, value, attn_mask=None, backend=FluxAttnProcessor._attention_backend,
                                    parallel_config=FluxAttnProcessor._parallel_config)  # (B, S, H, D)
        out[changed, n_text:] = edited.transpose(1, 2).to(out.dtype)
        return JointRegulatedProcessor._flux_project(attn, out.to(query.dtype), n_text, single)

    @staticmethod
    def _flux_project(attn, out, n_text: int, single: bool = False):
        # FluxAttnProcessor after the attention: `out` (B, S, H, D), text first, to its output(s).
        out = out.flatten(2, 3)
        if single:  # no encoder_hidden_states: the processor returns the one sequence as it is
            return out
        context, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context.contiguous())


# -- the regulator -------------------------------------------------------------------------------------


def stream_table(stream: TextStream, prompt: str, length: int) -> list[Token]:
    """A stream's tokens (SOS/words/EOS as its encoder sees them), indexed by joint text column."""
    return [Token(t.index + stream.offset, t.text) for t in stream.table(prompt, length)]


def joint_token_tables(pipe, family: str, prompt: str, length: int) -> list[tuple[TextStream, list[Token]]]:
    """Every stream of the joint text sequence with its tokens, indexed by joint text column. `pipe`: the
    pipeline, or anything with its tokenizer attributes (`attnreg tokens` loads only those)."""
    return [(s, stream_table(s, prompt, length)) for s in text_streams(pipe, family)]


def stream_columns(stream: TextStream, prompt: str, targets: list, length: int) -> list[int]:
    """The joint text columns of `targets`, looked up in `stream` (a TargetError naming its tokens)."""
    return [stream.offset + i for i in stream.resolve(prompt, targets, length)]


class JointAttentionRegulator(AttentionRegulator):
    """`AttentionRegulator` for SD3 and FLUX (see the module docstring for what is edited where).

    text_stream: SD3 only, "t5" (default when the pipeline has T5) or "clip" (default without it).
    """

    def __init__(self, pipe, config: RegulationConfig | None = None, text_stream: str | None = None):
        self.family = joint_family(pipe)
        if self.family is None:
            check_pipeline(pipe)  # the error naming what is supported
            raise UnsupportedPipelineError(f"{type(pipe).__name__} has no joint attention; use AttentionRegulator")
        self.pipe = pipe
        self.config = config or RegulationConfig()
        self.stream = choose_text_stream(pipe, self.family, text_stream)
        layers = self.config.layers
        if layers is None and self.config.layer_choice == "calibrated":
            from .calibrate import calibrated_layers

            # A calibration the model has; none is run here (see the module docstring): else the rule.
            layers = calibrated_layers(pipe, allow_run=False)
        self.layers = self.select_layers(layers)
        self.state = RegulationState(self.config, self.layers, guided=self.family == "sd3", image_keys=True)
        self.last_targets: list[dict] = []
        self._removed = False
        self._length = self._max_length({})

    def _max_length(self, kwargs) -> int:
        if self.stream.name == "clip":
            return self.stream.tokenizer.model_max_length
        return int(kwargs.get("max_sequence_length") or pipeline_default(self.pipe, "max_sequence_length"))

    # -- targets ------------------------------------------------------------------------------
    def resolve(self, prompt: str, targets) -> dict:
        """{"prompt", "targets", "indices" (columns of the joint text sequence), "tokens", "source",
        "stream" ("t5" or "clip"), "stream_indices" (the stream's own token indices)}."""
        info = super().resolve(prompt, targets)
        info.update(stream=self.stream.name, stream_indices=[i - self.stream.offset for i in info["indices"]])
        return info

    def _columns(self, prompt: str, targets: list) -> list[int]:
        return stream_columns(self.stream, prompt, targets, self._length)

    def token_table(self, prompt: str, max_sequence_length: int | None = None) -> list[Token]:
        """The target stream's tokens as the joint attention sees them, indexed by joint text column."""
        return stream_table(self.stream, prompt, self._length if max_sequence_length is None else max_sequence_length)

    def token_tables(self, prompt: str, max_sequence_length: int | None = None) -> list[tuple[TextStream, list[Token]]]:
        """Every stream of the joint text sequence with its tokens, indexed by joint text column (SD3: CLIP
        at 0..76, then T5 from 77; FLUX: T5). `self.stream` is the one targets are looked up in."""
        length = self._length if max_sequence_length is None else max_sequence_length
        return joint_token_tables(self.pipe, self.family, prompt, length)

    def word_tokens(self, prompt: str) -> list[Token]:
        return word_tokens(self.stream, self.token_table(prompt))

    def select_layers(self, layers) -> frozenset[str]:
        return select_joint_layers(self.pipe.transformer, None if layers is None else tuple(layers))

    def observable_layers(self) -> list[str]:
        return editable_layers(self.pipe.transformer)

    @property
    def maps_are(self) -> str:
        rows = "the conditional half" if self.family == "sd3" else "the whole (guidance-distilled) batch"
        return (f"the image-query rows at the {self.stream.name.upper()} text columns of the joint attention (softmax "
                f"over text + image keys, as regulated), of {rows}")

    def _eos(self, resolved: dict) -> int:
        return self.stream.offset + self.stream.eos(resolved["prompt"], self._length)

    # -- the call -----------------------------------------------------------------------------
    def plan(self, prompt, targets=None, **kwargs):
        for other in ("prompt_2", "prompt_3"):
            if kwargs.get(other) is not None:
                raise ValueError(f"attnreg finds the targets in `prompt`; {other} is not supported")
        self._length = self._max_length(kwargs)
        return super().plan(prompt, targets, **kwargs)

    def _check_guidance(self, kwargs: dict) -> None:
        if self.family == "flux":
            true_cfg = kwargs.get("true_cfg_scale", pipeline_default(self.pipe, "true_cfg_scale")) or 1.0
            if true_cfg > 1 and (kwargs.get("negative_prompt") is not None or kwargs.get("negative_prompt_embeds") is not None):
                raise GuidanceError("attnreg edits FLUX's single guidance-distilled batch; true CFG (true_cfg_scale > 1 "
                                    "with a negative prompt) runs a second transformer call and is not supported")
            return  # guidance-distilled: the guidance scale is an input, every image is edited
        guidance = kwargs.get("guidance_scale", pipeline_default(self.pipe, "guidance_scale"))
        if guidance <= 1:
            raise GuidanceError(f"attnreg edits the conditional half of SD3's classifier-free guidance; "
                                f"guidance_scale={guidance} gives no unconditional half. Use guidance_scale > 1.")
        if kwargs.get("skip_guidance_layers"):
            raise GuidanceError("SD3 skip-layer guidance runs extra transformer calls; not supported with attnreg")

    def run(self, prompt, plan, **kwargs):
        """Call the pipeline with the joint processors installed for `plan` (None: plain, observed)."""
        transformer, state = self.pipe.transformer, self.state
        patch = transformer.config.patch_size

        def remember_grid(module, args, kw):
            # The image tokens' grid: SD3 patchifies a (B, C, H, W) latent; FLUX's packed tokens carry
            # their (row, column) in img_ids.
            if self.family == "sd3":
                sample = args[0] if args else kw["hidden_states"]
                state.latent_hw = (sample.shape[-2] // patch, sample.shape[-1] // patch)
            else:
                ids = kw["img_ids"]
                state.latent_hw = (int(ids[..., 1].max()) + 1, int(ids[..., 2].max()) + 1)
                state.text_tokens = kw["encoder_hidden_states"].shape[1]  # the single-stream blocks' text rows

        joint = set(editable_layers(transformer))
        restore_sos = self.family == "sd3"
        first_word = self.stream.offset + (1 if self.stream.name == "clip" else 0)  # after CLIP's SOS
        wrapped = {
            key: JointRegulatedProcessor(name, proc, state, self.family, restore_sos, first_word)
            if (name := key.removesuffix(".processor")) in self.layers or (state.observers and name in joint)
            else proc
            for key, proc in transformer.attn_processors.items()
        }
        return self._call_with(transformer, wrapped, remember_grid, prompt, plan, kwargs)
