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

from ..families import JOINT_PIPELINES, joint_family, unsupported_variant
from .attention import (JointRegulatedProcessor, default_joint_layers, editable_layers, flux_single_streams, flux_streams,
                        joint_attention_layers, sd3_streams, select_joint_layers, single_stream_layers)
from .regulator import JointAttentionRegulator
from .text import (CLIP_LENGTH, TextStream, choose_text_stream, joint_token_tables, resolve_t5_targets, stream_columns,
                   stream_table, t5_table, text_streams, word_tokens)

__all__ = [
    "CLIP_LENGTH", "JOINT_PIPELINES", "JointAttentionRegulator", "JointRegulatedProcessor", "TextStream",
    "choose_text_stream", "default_joint_layers", "editable_layers", "flux_single_streams", "flux_streams",
    "joint_attention_layers", "joint_family", "joint_token_tables", "resolve_t5_targets", "sd3_streams",
    "select_joint_layers", "single_stream_layers", "stream_columns", "stream_table", "t5_table", "text_streams",
    "unsupported_variant", "word_tokens",
]
