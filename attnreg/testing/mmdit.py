"""Tiny SD3 and FLUX pipelines built from configs (random weights, no downloads), and a real T5 tokenizer.

The MMDiT counterpart of `testing.py`: real diffusers pipeline, transformer and processor classes with
real tokenizers, small enough for CPU tests. No T5 tokenizer can be downloaded here, so `tiny_t5_tokenizer`
builds one: a SentencePiece-style Unigram model (the T5 kind: Metaspace pre-tokenizer, "</s>" appended,
<pad> = 0, </s> = 1, <unk> = 2) in the `tokenizers` library, loaded into transformers' own
`T5TokenizerFast`, its pieces estimated from a small fixed corpus. Words of the corpus are single pieces;
others split into several pieces, as rare words do in the real T5 vocabulary.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..tokenizer import CLIP_TEXT_IDS, load_clip_tokenizer

# The shapes world's words, the calibration prompts' objects and the tests' words, in short captions.
_WORDS = (
    "circle square triangle red green blue yellow purple orange white black cat dog apple bowl horse car "
    "bird bench teddy bear clock bicycle umbrella elephant hat book cup banana table photo painting of a an "
    "the and with on next to in near small large big picture"
).split()
T5_CORPUS = tuple(
    [" ".join(_WORDS[i : i + 6]) for i in range(0, len(_WORDS), 3)]
    + ["a red circle and a blue square", "a green triangle next to a yellow circle", "a cat and a dog",
       "a photo of a cat with a hat", "a horse next to a car on a bench", "a red apple and a green bowl"] * 20
)


@lru_cache(maxsize=1)
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    """The Unigram model's pieces and log-probabilities, estimated from the corpus's counts: every corpus
    word as one "▁word" piece, and "▁" plus single characters (rarely used, low scores) so that any other
    word splits into pieces. The `tokenizers` UnigramTrainer prunes a corpus this small down to
    fragments ("red" -> "re" "d"), so the one-step estimate is used instead of its EM."""
    import math
    import string
    from collections import Counter

    words = Counter(w for line in T5_CORPUS for w in line.split())
    chars = Counter(c for line in T5_CORPUS for c in line.replace(" ", ""))
    total = sum(words.values()) + sum(chars.values())
    pieces = [(f"▁{w}", math.log(n / total)) for w, n in sorted(words.items())]
    floor = math.log(1 / total) - 5.0  # below any word: a corpus word never splits
    pieces.append(("▁", floor))
    pieces += [(c, floor - 1.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return (("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A real `T5TokenizerFast` with a vocabulary trained here (see the module docstring)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=model_max_length)


def _clip(hidden: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        **CLIP_TEXT_IDS, projection_dim=hidden, hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(cfg).eval()


def _t5(d_model: int, vocab: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _vae(seed: int, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # shift_factor and scaling_factor as SD3's own VAE config has them (the pipelines read both).
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=latent_channels,
        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0, t5: bool = True, num_layers: int = 3):
    """SD3-shaped: CLIP-L and CLIP-G (77 tokens each, side by side), T5 (or none), a `num_layers`-block
    MMDiT with patch 2. At 64 x 64 px the latent is 32 x 32 and the image stream 16 x 16 = 256 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=4, pos_embed_max_size=32,
    ).eval()
    t5_tok = tiny_t5_tokenizer() if t5 else None
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed),
        text_encoder=_clip(32, seed), tokenizer=load_clip_tokenizer(),
        text_encoder_2=_clip(32, seed + 1), tokenizer_2=load_clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5(32, len(t5_tok), seed + 2) if t5 else None, tokenizer_3=t5_tok,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, num_layers: int = 3, guidance_embeds: bool = True):
    """FLUX-shaped: CLIP (pooled only) and T5 (the joint text stream), `num_layers` double-stream blocks and
    one single-stream block, RoPE; guidance-distilled like FLUX dev (`guidance_embeds`; False: schnell-like).
    At 64 x 64 px the latent is 32 x 32, packed 2 x 2 into a 16 x 16 = 256-token image stream."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    ).eval()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **CLIP_TEXT_IDS,
        hidden_act="gelu",
    )).eval()
    t5_tok = tiny_t5_tokenizer()
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed),
        text_encoder=clip, tokenizer=load_clip_tokenizer(), text_encoder_2=_t5(32, len(t5_tok), seed + 2),
        tokenizer_2=t5_tok,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
