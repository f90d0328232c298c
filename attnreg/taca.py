"""TACA, training-free (Lv et al., "Rethinking Cross-Modal Interaction in Multimodal Diffusion Transformers",
ICCV 2025): a baseline for MMDiT pipelines (SD3, FLUX).

In an MMDiT's joint softmax the many image tokens outvote the few text tokens. TACA multiplies every
image-query x text-key logit by `gamma` (1.2 as published) in the first `steps` denoising steps (3 of 28 as
published), in every dual-stream joint block; the text queries' rows and the image x image logits are
unchanged. Scaling the text keys by gamma for the image queries only gives exactly those logits (q . gamma k =
gamma q . k, after RoPE on FLUX), so each edited layer runs two attention calls: the image queries against
(image keys, gamma x text keys) and the text queries against the unchanged keys.

Like the regulator, the pipeline's own processors are replaced only while a call runs and put back (the
same objects) however it ends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .joint import JointRegulatedProcessor, flux_streams, sd3_streams, joint_attention_layers, joint_family
from .regulator import UnsupportedPipelineError

GAMMA = 1.2  # the published training-free scale
STEPS = 3  # of 28: the published schedule (the high-noise steps)


class TextScaledProcessor:
    """One dual-stream joint block's attention with its image x text logits multiplied by `gamma` while
    `schedule.active` is true; otherwise the block's own processor, untouched."""

    def __init__(self, original, family: str, schedule: "TacaSchedule"):
        self.original, self.family, self.schedule = original, family, schedule

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if not self.schedule.active or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise NotImplementedError("TACA is not applied to a joint attention with an attention_mask")
        gamma = self.schedule.gamma
        if self.family == "sd3":  # (B, H, S, D); the image stream first
            (q, k, v), (cq, ck, cv) = sd3_streams(attn, hidden_states, encoder_hidden_states)
            values = torch.cat([v, cv], dim=2)
            image = F.scaled_dot_product_attention(q, torch.cat([k, gamma * ck], dim=2), values)
            text = F.scaled_dot_product_attention(cq, torch.cat([k, ck], dim=2), values)
            return JointRegulatedProcessor.sd3_project(attn, torch.cat([image, text], dim=2).to(q.dtype), q.shape[2])
        rotary = kwargs.get("image_rotary_emb", args[0] if args else None)
        query, key, value, n_text = flux_streams(attn, hidden_states, encoder_hidden_states, rotary)  # text first
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, S, D)
        scaled = torch.cat([gamma * k[:, :, :n_text], k[:, :, n_text:]], dim=2)
        image = F.scaled_dot_product_attention(q[:, :, n_text:], scaled, v)
        text = F.scaled_dot_product_attention(q[:, :, :n_text], k, v)
        out = torch.cat([text, image], dim=2).transpose(1, 2).to(query.dtype)
        return JointRegulatedProcessor.flux_project(attn, out, n_text)


class TacaSchedule:
    """Which denoising step the call is at: a step is a new timestep seen by the transformer (so FLUX's
    true-CFG second call and SD3's guidance batch count once)."""

    def __init__(self, gamma: float, steps: int):
        self.gamma, self.steps = gamma, steps
        self.step, self._timestep = -1, None

    def reset(self) -> None:
        self.step, self._timestep = -1, None

    @property
    def active(self) -> bool:
        return 0 <= self.step < self.steps

    def hook(self, module, args, kwargs) -> None:
        timestep = kwargs.get("timestep")
        value = None if timestep is None else float(timestep.flatten()[0])
        if value is None or value != self._timestep:
            self.step += 1
            self._timestep = value


class TextAttentionScaling:
    """Call it like the pipeline: `TextAttentionScaling(pipe)(prompt, ...)` gives TACA's image.

    gamma: the factor on the image-query x text-key logits (> 0; 1 is the plain pipeline); steps: how many
    of the first denoising steps are scaled (>= 0)."""

    def __init__(self, pipe, gamma: float = GAMMA, steps: int = STEPS):
        self.family = joint_family(pipe)
        if self.family is None:
            raise UnsupportedPipelineError(
                f"TACA scales joint attention; {type(pipe).__name__} has none (supported: StableDiffusion3Pipeline, "
                "FluxPipeline)")
        if not (isinstance(gamma, (int, float)) and gamma > 0 and gamma == gamma and gamma != float("inf")):
            raise ValueError(f"TACA's gamma must be a finite number > 0, got {gamma!r}")
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"TACA's steps must be an integer >= 0, got {steps!r}")
        self.pipe = pipe
        self.schedule = TacaSchedule(float(gamma), steps)
        self.layers = tuple(joint_attention_layers(pipe.transformer))

    def __call__(self, *args, **kwargs):
        transformer = self.pipe.transformer
        originals = transformer.attn_processors
        wrapped = {
            key: TextScaledProcessor(proc, self.family, self.schedule) if key.removesuffix(".processor") in self.layers
            else proc
            for key, proc in originals.items()
        }
        self.schedule.reset()
        handle = transformer.register_forward_pre_hook(self.schedule.hook, with_kwargs=True)
        transformer.set_attn_processor(wrapped)
        try:
            return self.pipe(*args, **kwargs)
        finally:
            handle.remove()
            transformer.set_attn_processor(originals)
