"""The maps' building blocks: Gaussian bumps, offsets, the targets' softmax, quantiles and the descent loop
every solver shares."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

def bump_sigma(size: int, divisor: float = 16.0) -> float:
    """Width of the Gaussian bumps along one axis: W / 16 as released, but at least 1.

    The release uses floor(W / 16), which is 0 (and crashes) for 8 x 8 maps; for W a multiple of 16
    both agree.
    """
    return max(1.0, size / divisor)


def gaussian_bases(
    height: int,
    width: int | None = None,
    per_side: int = 7,
    sigma_divisor: float = 16.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The K = per_side**2 fixed unit-peak Gaussian bumps G_k(p), shape (K, H * W).

    Centres lie on the grid (i + 1) * W / (per_side + 1), i = 0..per_side-1, along each axis: for W a
    multiple of 16 and per_side = 7 this is the release's {2 sigma, 4 sigma, ..., 14 sigma}. Unlike the
    release, the grid always spans the map (for W = 8 or 24 its centres would leave the map or
    cover only part of it), and non-square maps get one sigma per axis.
    """
    width = height if width is None else width
    sy, sx = bump_sigma(height, sigma_divisor), bump_sigma(width, sigma_divisor)
    steps = torch.arange(1, per_side + 1, device=device, dtype=torch.float64) / (per_side + 1)
    cy, cx = steps * height, steps * width
    ys = torch.arange(height, device=device, dtype=torch.float64)
    xs = torch.arange(width, device=device, dtype=torch.float64)
    gy = torch.exp(-((ys[None, :] - cy[:, None]) ** 2) / (2 * sy**2))  # (per_side, H)
    gx = torch.exp(-((xs[None, :] - cx[:, None]) ** 2) / (2 * sx**2))  # (per_side, W)
    bumps = gy[:, None, :, None] * gx[None, :, None, :]  # (per_side, per_side, H, W), separable
    return bumps.reshape(per_side * per_side, height * width).to(dtype)


def target_probs(target_logits: torch.Tensor, rest_lse: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Softmax over all J tokens of (S + Delta), read only at the target columns.

    Only target logits move, so the other J - n columns enter through one precomputed log-sum-exp
    per pixel (`rest_lse`, shape (B, P, 1)): exact, and n / J of the work of the full softmax.
    """
    edited = target_logits + offsets  # (B, P, n)
    return torch.exp(edited - torch.logaddexp(rest_lse, torch.logsumexp(edited, dim=-1, keepdim=True)))


def quantile_along_pixels(probs: torch.Tensor, q: float):
    """torch.quantile(probs, q, dim=1) (linear interpolation), with where its two order statistics are.

    Uses a partial top-k instead of a full sort. Returns (value, lower index, upper index, fraction).
    """
    n = probs.shape[1]
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1) if pos > lo else lo
    values, where = probs.topk(n - lo, dim=1)  # descending: ascending rank i sits at n - 1 - i
    v_lo, v_hi = values[:, n - 1 - lo], values[:, n - 1 - hi]
    frac = pos - lo
    return v_lo + frac * (v_hi - v_lo), where[:, n - 1 - lo], where[:, n - 1 - hi], frac


def _levels_grad(probs, g_high, g_mean, i_lo, i_hi, frac) -> torch.Tensor:
    """dL/dP (B, P, n) from dL/d(quantile) and dL/d(mean): every pixel through the mean, the quantile's two
    order statistics (`quantile_along_pixels`) through the quantile."""
    b, pixels, n = probs.shape
    g_probs = (g_mean / pixels).unsqueeze(1).expand(b, pixels, n).clone()
    g_probs.scatter_add_(1, i_lo.unsqueeze(1), ((1 - frac) * g_high).unsqueeze(1))
    g_probs.scatter_add_(1, i_hi.unsqueeze(1), (frac * g_high).unsqueeze(1))
    return g_probs


def _through_softmax(probs, g_probs, bases) -> torch.Tensor:
    """dL/dw (B, K, n) from dL/dP (B, P, n) of the targets' probabilities `probs` (`target_probs`)."""
    # dL/da_s = P_s (g_s - sum_t g_t P_t): only the targets' logits move, the other tokens enter the
    # normaliser but carry no gradient of their own
    g_logits = probs * (g_probs - (g_probs * probs).sum(dim=-1, keepdim=True))
    return torch.einsum("bpn,kp->bkn", g_logits, bases)


@dataclass
class SolverResult:
    weights: torch.Tensor  # best bump weights found, (B, K, n)
    loss: torch.Tensor  # loss of `weights` (0-d, on the weights' device)
    initial_loss: torch.Tensor  # loss of the initial weights


def without_autograd(descend, *args) -> SolverResult:
    """`descend(*args)` (a solver's descent loop) in inference mode when eager, so that autograd keeps no books on
    its many small operations, with the result as ordinary tensors (callers may update them in place); as it is
    while torch.compile traces it."""
    if torch.compiler.is_compiling():
        return descend(*args)
    with torch.inference_mode():
        result = descend(*args)
    return SolverResult(result.weights.clone(), result.loss.clone(), result.initial_loss.clone())


def offsets_from_weights(weights: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Delta(p, t) = sum_k w[k, t] G_k(p): (B, K, n) x (K, P) -> (B, P, n)."""
    return torch.einsum("bkn,kp->bpn", weights, bases.to(weights.dtype))


def smoothed_weights(previous_best: torch.Tensor, best: torch.Tensor, step: int, mix: float = 0.25, decay: float = 0.99) -> torch.Tensor:
    """The weights actually applied at step s: decay**s * (mix * previous best + (1 - mix) * best).

    A two-tap blend with the previous step's best (at s = 0, the random initial weights), not a true
    moving average; the offsets are linear in w, so blending weights blends maps.
    """
    return decay**step * (mix * previous_best + (1.0 - mix) * best)
