"""Tiny Stable Diffusion and SDXL pipelines built from configs (random weights, no downloads).

Real diffusers classes with the real CLIP tokenizer, small enough for CPU tests: the plug-in, the
benchmark runner and the metrics are exercised on exactly the code paths real models take.
"""

from __future__ import annotations

import torch

from ..tokenizer import CLIP_TEXT_IDS, load_clip_tokenizer


def _text_encoder(hidden: int, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=5, num_attention_heads=4,
        **CLIP_TEXT_IDS, projection_dim=projection or hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """SD 1.x-shaped: 64 x 64 images, 32 x 32 latents, cross-attention maps of 16 x 16."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return _quiet(StableDiffusionPipeline(
        vae=_vae(seed), text_encoder=_text_encoder(32, seed=seed), tokenizer=load_clip_tokenizer(), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    ))


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """SDXL-shaped: two CLIP text encoders (the second pads with "!"), text-time conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    return _quiet(StableDiffusionXLPipeline(
        vae=_vae(seed), text_encoder=_text_encoder(32, seed=seed), text_encoder_2=_text_encoder(32, projection=32, seed=seed + 1),
        tokenizer=load_clip_tokenizer(), tokenizer_2=load_clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
        image_encoder=None, feature_extractor=None,
    ))


class TargetMass:
    """An observer for tests: at each edited layer call of the first `steps` steps, the mean attention of
    the token `columns` over the conditional half of the guidance batch (`guided`) or the whole batch;
    one number, or one per column with `per_column`."""

    def __init__(self, columns, steps: int, guided: bool = True, per_column: bool = False):
        self.columns, self.steps, self.guided, self.per_column = list(columns), steps, guided, per_column
        self.values = []

    def wants(self, layer, step):
        return True

    def record(self, layer, step, probs, state):
        if layer in state.edited_layers and step < self.steps:
            maps = (probs[probs.shape[0] // 2 :] if self.guided else probs)[..., self.columns]
            self.values.append(maps.mean(dim=(0, 1, 2)).tolist() if self.per_column else maps.mean().item())
