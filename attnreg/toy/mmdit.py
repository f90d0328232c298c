"""The embedded MMDiT shapes model: a small SD3 (`StableDiffusion3Pipeline`) trained here with flow matching on
the same coloured-shape world and the same frozen VAE latents as the UNet model.

    attnreg toy train --arch mmdit [--export attnreg/toy/model-mmdit]      (python -m attnreg.toy.train ...)

Two phases, resumable like the UNet's (same checkpoints, EMA, STOP file, loss log; `loop.fit` runs both):

1. ``latents``: the pool of `loop.encode_pool`, encoded with the shipped model's frozen VAE
   (attnreg/toy/model/vae); the same scene seeds and pool size as the UNet model's run, so the same latents.
   The scaling factor is the VAE's own (the UNet model's 1 / std of its pool); the shift factor is 0.
2. ``mmdit``: an `SD3Transformer2DModel` (patch 1 on the 16 x 16 x 4 latents: a 16 x 16 token grid, the
   maps the paper's Gaussian bumps are defined on) with two CLIP text encoders from scratch
   (`CLIPTextModelWithProjection`, SD3's CLIP-L and CLIP-G slots, the real CLIP tokenizer in both), trained
   jointly with diffusers' SD3 recipe: logit-normal timesteps on a `FlowMatchEulerDiscreteScheduler`, noisy
   = (1 - sigma) x0 + sigma noise, target = noise - x0, plain MSE; 10 % empty captions for guidance.

Text. SD3 needs text_encoder and text_encoder_2; the T5 encoder is optional and absent here
(text_encoder_3=None): a T5 tokenizer and encoder would add a second vocabulary for no gain in a world of
12 words, and without T5 the targets are looked up in CLIP (attnreg.joint). The joint text stream is then
exactly what the pipeline builds: 77 columns of [CLIP-1 penultimate layer | CLIP-2 penultimate layer] (one
column per CLIP token: SOS, words, EOS, padding), then `max_sequence_length` zero columns where T5 would
be. Each training caption gets one of `zero_column_counts` at random (the shipped model: 256 only, the
pipeline's default call; (8, 256) makes a model that is also right for a short, faster call).

The zero columns cost nothing here. They are identical tokens, and stay identical through every block
(same input, same queries, same keys), so L of them act in every softmax exactly as one with log(L) added to
its logit. Training therefore feeds one zero column and `ZeroColumnsAttnProcessor` adds log(L) to that key
(each caption its own L):
the same function (to float rounding; tests/test_toy_mmdit.py checks it against the stock processor with
the real 256 zero columns) at about half the cost. The exported pipeline runs diffusers' own processors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import TRAIN_COMMANDS, model_path
from .loop import (Captioner, Config, LossLog, build_text_encoder, draw_batch, encode_pool, fit, load_ema, load_pool, log, publish,
                    step_rng, to_device)
from .world import COLOUR_NAMES, SHAPES

EXPORT = model_path("toy-mmdit", check=False)
TRAIN_COMMAND = TRAIN_COMMANDS["toy-mmdit"]


@dataclass
class MMDiTConfig(Config):
    vae: str = ""  # the frozen VAE's folder; "": the shipped UNet model's (attnreg/toy/model/vae)
    pool_size: int = 24000  # the UNet model's pool: the same scenes (seeds) and the same VAE
    text_layers: int = 4  # SD3 reads the penultimate layer: 3 layers feed the tokens, as in the UNet model
    text2_hidden: int = 32
    text2_layers: int = 3
    text2_heads: int = 2
    text2_intermediate: int = 128
    patch_size: int = 1  # a 16 x 16 token grid (2: SD3's own, an 8 x 8 grid; see README.md for how it did)
    mmdit_heads: int = 2
    mmdit_head_dim: int = 48
    mmdit_layers: int = 4
    pos_embed_max_size: int = 32  # the sin-cos table's grid: images up to 128 px at patch 1
    zero_column_counts: tuple = (256,)  # the zero (T5) columns a caption is trained with, one drawn per caption
    max_sequence_length: int = 256  # the call the model is made for (attnreg.json); the pipeline's default
    flow_shift: float = 1.0  # FlowMatchEulerDiscreteScheduler shift, training and sampling
    pooled: bool = True  # False: both text projections zero and frozen, so the pooled vector is 0 and the prompt
    #                      reaches the image only through the joint attention's text columns
    init: str = ""  # an exported toy MMDiT pipeline folder whose transformer and text encoders the run starts from
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mmdit_steps: int = 3600  # the shipped run's first schedule; README.md says how it was continued to 10,000
    threads: int = 1

    @classmethod
    def tiny(cls) -> "MMDiTConfig":
        return cls(pool_size=16, pool_chunk=8, encode_batch=8, text_hidden=16, text_layers=2, text_heads=1,
                   text_intermediate=32, text2_hidden=8, text2_layers=2, text2_heads=1, text2_intermediate=16,
                   mmdit_heads=1, mmdit_head_dim=16, mmdit_layers=3, mmdit_steps=3, batch=4, warmup=1, log_every=1)


# ----------------------------------------------------------------------------------------------
# model construction


def frozen_vae(cfg: MMDiTConfig):
    """The shipped UNet model's VAE (or `cfg.vae`), with SD3's shift_factor (0: the latents are not shifted)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(cfg.vae or str(model_path("toy-unet") / "vae")).eval()
    vae.requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    return vae


def latent_size(cfg: MMDiTConfig, vae) -> int:
    return cfg.image_size // 2 ** (len(vae.config.block_out_channels) - 1)


def build_transformer(cfg: MMDiTConfig, latent: int):
    from diffusers import SD3Transformer2DModel

    joint = cfg.text_hidden + cfg.text2_hidden  # the two CLIPs side by side on the feature axis
    return SD3Transformer2DModel(
        sample_size=latent, patch_size=cfg.patch_size, in_channels=4, out_channels=4, num_layers=cfg.mmdit_layers,
        attention_head_dim=cfg.mmdit_head_dim, num_attention_heads=cfg.mmdit_heads, joint_attention_dim=joint,
        caption_projection_dim=cfg.mmdit_heads * cfg.mmdit_head_dim, pooled_projection_dim=joint,
        pos_embed_max_size=cfg.pos_embed_max_size,
    )


def build_text_encoders(cfg: MMDiTConfig):
    """SD3's two CLIP slots: (text_encoder, text_encoder_2), both CLIPTextModelWithProjection."""
    return (build_text_encoder(cfg, projection=True),
            build_text_encoder(cfg, cfg.text2_hidden, cfg.text2_layers, cfg.text2_heads, cfg.text2_intermediate,
                               projection=True))


def prepare_modules(cfg: MMDiTConfig, transformer, te1, te2) -> None:
    """Apply `cfg.init` (start from an exported pipeline's weights) and `cfg.pooled` to freshly built modules."""
    if cfg.init:
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection

        root = Path(cfg.init)
        transformer.load_state_dict(SD3Transformer2DModel.from_pretrained(root / "transformer").state_dict())
        for module, sub in ((te1, "text_encoder"), (te2, "text_encoder_2")):
            saved = CLIPTextModelWithProjection.from_pretrained(root / sub, torch_dtype=torch.float32)
            module.load_state_dict({k: v.float() for k, v in saved.state_dict().items()})
    if not cfg.pooled:
        for module in (te1, te2):
            module.text_projection.weight.data.zero_()
            module.text_projection.requires_grad_(False)


def flow_scheduler(cfg: MMDiTConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.flow_shift)


def prompt_embeds(te1, te2, ids: torch.Tensor, zero_columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder_hidden_states, pooled_projections) as StableDiffusion3Pipeline.encode_prompt builds them without
    T5 (with the default clip_skip): both CLIPs' penultimate hidden states side by side, then `zero_columns`
    zero columns; the two pooled (projected) outputs side by side."""
    o1, o2 = te1(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
    clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    zeros = clip.new_zeros(clip.shape[0], zero_columns, clip.shape[-1])
    return torch.cat([clip, zeros], dim=1), torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)


class ZeroColumnsAttnProcessor:
    """Training only: SD3's joint attention (JointAttnProcessor2_0) with the text stream's last column standing
    for `n` identical zero columns, i.e. log(n) added to its key's logit in every row (see the module docstring);
    `n` is one count for the whole batch, or one per sample (`counts`)."""

    def __init__(self, n: int):
        self.counts = torch.tensor([float(n)])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        from ..joint import JointRegulatedProcessor, sd3_streams

        image, text = sd3_streams(attn, hidden_states, encoder_hidden_states)
        bias = hidden_states.new_zeros(hidden_states.shape[0], 1, 1, image[1].shape[2] + text[1].shape[2])  # image, text
        bias[..., -1] = self.counts.to(bias).log().view(-1, 1, 1)
        return JointRegulatedProcessor.sd3_output(attn, hidden_states, image, text, [], None, attn_mask=bias)


def use_zero_columns(transformer, n: int) -> ZeroColumnsAttnProcessor:
    """Install one `ZeroColumnsAttnProcessor(n)` on every joint attention and return it (set its `counts` per
    batch); the text stream is then fed one zero column."""
    if n < 1:
        raise ValueError(f"zero columns stand in for at least one, got {n}")
    processor = ZeroColumnsAttnProcessor(n)
    transformer.set_attn_processor(processor)
    return processor


# ----------------------------------------------------------------------------------------------
# phases


def encode_pool_mmdit(cfg: MMDiTConfig, out: Path, stop_at: float | None) -> bool:
    """The latent pool of `loop.encode_pool` with the frozen VAE; its scaling factor is the VAE's own."""
    vae = frozen_vae(cfg)
    stopped = encode_pool(cfg, out, stop_at, vae=vae)
    stats = out / "latents" / "stats.json"
    if not stats.exists():
        stats.write_text(json.dumps({"scaling_factor": vae.config.scaling_factor, "source": "the frozen VAE's config"}))
    return stopped


def flow_loss(cfg: MMDiTConfig, transformer, te1, te2, capt, sched, lat, objs, scale: float,
              zero_columns: ZeroColumnsAttnProcessor, step: int) -> torch.Tensor:
    """diffusers' SD3 recipe on step `step`'s batch: logit-normal timesteps, target = noise - x0, plain MSE."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    rng, g = step_rng(cfg, "mmdit", step)
    x0, ids = draw_batch(cfg, capt, lat, objs, scale, rng, g)
    noise = torch.randn(x0.shape, generator=g)
    u = compute_density_for_timestep_sampling("logit_normal", cfg.batch, cfg.logit_mean, cfg.logit_std, generator=g)
    i = (u * sched.config.num_train_timesteps).long().clamp(max=sched.config.num_train_timesteps - 1)
    sigma = sched.sigmas[i].view(-1, 1, 1, 1)
    counts = torch.tensor(cfg.zero_column_counts, dtype=torch.float32)
    zero_columns.counts = counts[torch.randint(0, len(counts), (cfg.batch,), generator=g)]
    noisy, target, timestep, ids = to_device(transformer, (1 - sigma) * x0 + sigma * noise, noise - x0,
                                             sched.timesteps[i], ids)
    embeds, pooled = prompt_embeds(te1, te2, ids, 1)
    pred = transformer(noisy, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=timestep).sample
    return F.mse_loss(pred, target)


def train_mmdit(cfg: MMDiTConfig, out: Path, losses: LossLog, ckpt_seconds: float, stop_at: float | None,
                export: Path | None, device: str = "cpu") -> bool:
    lat, objs, scale = load_pool(cfg, out)
    log(f"mmdit: pool of {len(lat)} latents, scaling factor {scale:.4f}")
    transformer = build_transformer(cfg, lat.shape[-1])
    te1, te2 = build_text_encoders(cfg)
    prepare_modules(cfg, transformer, te1, te2)
    zero_columns = use_zero_columns(transformer, max(cfg.zero_column_counts))
    sched, capt = flow_scheduler(cfg), Captioner(cfg)
    export_fn = None
    if export is not None:
        def export_fn(ema, step):
            export_mmdit(cfg, out, export, ema_weights=ema, losses=losses, step=step)
    return fit(cfg, out, losses, "mmdit", {"transformer": transformer, "text_encoder": te1, "text_encoder_2": te2},
               lambda step: flow_loss(cfg, transformer, te1, te2, capt, sched, lat, objs, scale, zero_columns, step),
               cfg.mmdit_steps, ckpt_seconds, stop_at, export_fn, device)


# ----------------------------------------------------------------------------------------------
# export


def build_pipeline(cfg: MMDiTConfig, ema_weights=None):
    """The StableDiffusion3Pipeline of `cfg` (EMA weights when given), with diffusers' own processors."""
    from diffusers import StableDiffusion3Pipeline

    from ..tokenizer import load_clip_tokenizer

    vae = frozen_vae(cfg)
    transformer = build_transformer(cfg, latent_size(cfg, vae))
    te1, te2 = build_text_encoders(cfg)
    load_ema([transformer, te1, te2], ema_weights)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(cfg), vae=vae,
        text_encoder=te1.eval(), tokenizer=load_clip_tokenizer(model_max_length=cfg.max_length),
        text_encoder_2=te2.eval(), tokenizer_2=load_clip_tokenizer(model_max_length=cfg.max_length),
        text_encoder_3=None, tokenizer_3=None,
    )


def calibration_prompts() -> dict:
    """The UNet model's calibration prompts and their note (its attnreg.json, the one place they are kept):
    the same world, so both models are calibrated on the same prompts, none of them the table's."""
    spec = json.loads((model_path("toy-unet") / "attnreg.json").read_text())
    return {k: spec[k] for k in ("calibration_prompts", "calibration_prompts_note") if k in spec}


def export_mmdit(cfg: MMDiTConfig, out: Path, dest: Path, ema_weights=None, losses: LossLog | None = None,
                 step: int = 0) -> Path:
    """Write the StableDiffusion3Pipeline (EMA weights) to `dest` with save_pretrained, plus attnreg.json."""
    from ..joint import default_joint_layers, joint_attention_layers

    pipe = build_pipeline(cfg, ema_weights)
    stats = json.loads((out / "latents" / "stats.json").read_text())
    if abs(stats["scaling_factor"] - pipe.vae.config.scaling_factor) > 1e-6:
        raise ValueError(f"the latent pool of {out} was scaled by {stats['scaling_factor']}, the VAE says "
                         f"{pipe.vae.config.scaling_factor}: not the same latents")
    latent = latent_size(cfg, pipe.vae)
    meta = {
        "arch": "mmdit",
        "joint_layers": list(default_joint_layers(pipe.transformer)),
        "layer_rule": "the middle third of the joint blocks (attnreg.joint.default_joint_layers), the structural "
                      "rule JointAttentionRegulator uses until `attnreg calibrate` writes a calibration here",
        "joint_attention_layers": joint_attention_layers(pipe.transformer),
        "text_stream": "clip: text_encoder_3 is None, so joint text columns 0..76 are the CLIP tokens (SOS, words, "
                       "EOS, padding) and the max_sequence_length columns after them are zeros",
        "max_sequence_length": cfg.max_sequence_length,
        "image_size": cfg.image_size,
        "latent_size": latent,
        "token_grid": latent // cfg.patch_size,
        "num_inference_steps": 28,
        "guidance_scale": 3.0,  # the sampler the shipped model is measured with (docs/decisions.md)
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "shapes": list(SHAPES),
        "colours": list(COLOUR_NAMES),
        "train_step": step,
        **calibration_prompts(),
        "note": f"Toy SD3 (MMDiT) trained on coloured-shape scenes by `{TRAIN_COMMAND}`; see attnreg/toy/README.md.",
    }
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        # The CLIP vocabulary's 49,408 token rows are two thirds of the export, and the world uses about 20 of
        # them: stored in fp16 they keep the folder under the 30 MB budget. load_pipeline casts them back to
        # the pipeline's dtype (a relative rounding of 5e-4 on the rows the prompts use).
        encoder.text_model.embeddings.token_embedding.to(torch.float16)
    return publish(pipe, dest, meta, cfg, losses, tokenizers=("tokenizer", "tokenizer_2"))

