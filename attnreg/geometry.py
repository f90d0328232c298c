"""UNet geometry: which blocks hold cross-attention, and at which resolution each one runs.

The one place for "down_blocks.i runs at the latent size halved once per downsampler before it,
up_blocks.j like down_blocks.(n - 1 - j), the mid block at the deepest level"; the regulator's default
layers, the Attend-and-Excite method's map size and the toy model's metadata all read it here.
"""

from __future__ import annotations

import math

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}  # the forward order


def cross_attention_layers(unet) -> list[str]:
    """Names of the UNet's cross-attention modules ("...attn2"), in registration order."""
    return [k.removesuffix(".processor") for k in unet.attn_processors if k.endswith("attn2.processor")]


def block_of(layer: str) -> str:
    """"down_blocks.2.attentions.0.transformer_blocks.0.attn2" -> "down_blocks.2"; "mid_block..." -> "mid_block"."""
    parts = layer.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


def layer_blocks(unet) -> list[str]:
    """The blocks that hold cross-attention ("down_blocks.2", "mid_block", ...), in forward order."""
    blocks = list(dict.fromkeys(block_of(name) for name in cross_attention_layers(unet)))
    return sorted(blocks, key=lambda b: (_BLOCK_ORDER[b.split(".")[0]], int(b.split(".")[1]) if "." in b else 0))


def block_level(unet, block: str) -> int:
    """How many times the latent is halved where `block` runs."""
    n_down = len(unet.down_blocks)
    before = [sum(1 for k in range(i) if getattr(unet.down_blocks[k], "downsamplers", None)) for i in range(n_down)]
    kind, _, index = block.partition(".")
    if kind == "down_blocks":
        return before[int(index)]
    if kind == "up_blocks":
        return before[n_down - 1 - int(index)]
    return before[-1]  # the mid block


def map_side(unet, block: str, latent: int) -> int:
    """Side of `block`'s attention maps for a square latent of side `latent`."""
    return math.ceil(latent / 2 ** block_level(unet, block))


def blocks_by_resolution(unet, latent: int) -> dict[str, list[str]]:
    """{"16": ["down_blocks.0", "up_blocks.2"], "8": [...]}: the cross-attention blocks per map side,
    largest first."""
    found: dict[int, list[str]] = {}
    for block in layer_blocks(unet):
        found.setdefault(map_side(unet, block, latent), []).append(block)
    return {str(side): found[side] for side in sorted(found, reverse=True)}


def map_shape(n_pixels: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) of an attention map with `n_pixels` pixels, given the latent's (H, W) when known: the
    latent halved (rounding up) until the pixel counts match; else a square."""
    if latent_hw is not None:
        h, w = latent_hw
        for level in range(8):
            hh, ww = math.ceil(h / 2**level), math.ceil(w / 2**level)
            if hh * ww == n_pixels:
                return hh, ww
    side = math.isqrt(n_pixels)
    if side * side != n_pixels:
        raise ValueError(f"cannot tell the shape of a {n_pixels}-pixel attention map")
    return side, side
