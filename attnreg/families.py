"""Which pipelines attnreg regulates, and how to tell their families apart (no regulator code here, so that
the UNet and MMDiT regulators both import it)."""

from __future__ import annotations

import re

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")


class UnsupportedPipelineError(TypeError):
    """A pipeline attnreg cannot regulate (yet)."""


JOINT_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


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


def check_pipeline(pipe) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)) and joint_family(pipe) is None:
        why = unsupported_variant(pipe)
        raise UnsupportedPipelineError(
            "attnreg supports StableDiffusionPipeline and StableDiffusionXLPipeline (SD 1.x, 2.x, SDXL), "
            "StableDiffusion3Pipeline and FluxPipeline (SD3, FLUX text-to-image) and their subclasses; "
            f"got {type(pipe).__name__}" + (f": {why}." if why else ".")
        )
