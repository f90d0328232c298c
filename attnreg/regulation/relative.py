"""The default loss: each target's levels relative to the dominant target's in the same (image, head) row, and
its solver."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .maps import SolverResult, _levels_grad, quantile_along_pixels, without_autograd

@dataclass(frozen=True)
class RelativeLoss:
    """gamma L_high + delta L_prop + epsilon L_reg with the levels taken from the call, not constants.

    Per (image, head) row, the reference is the dominant target's own unedited level: its 90th
    percentile (`ref_high`) and its mean (`ref_mean`). Every target whose level falls short of
    `lift` x the reference is pulled up, in log units, with a one-sided (hinge) square; a target at or
    above it costs nothing. So at lift 1 the dominant target is left alone and a neglected one is
    raised to its level (the paper's Fig. 2 diagnosis), and a row whose targets are already level has a
    zero loss and is not changed.
    """

    gamma: float = 1.0
    delta: float = 1.0
    epsilon: float = 0.01
    quantile: float = 0.9
    lift: float = 1.0


def reference_levels(probs: torch.Tensor, quantile: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """The dominant target's levels per row: (max_t q(P(., t)), max_t mean_p P(p, t)), each (B, 1)."""
    high = quantile_along_pixels(probs, quantile)[0]
    return high.amax(dim=-1, keepdim=True), probs.mean(dim=1).amax(dim=-1, keepdim=True)


def _shortfall_and_grad(probs, ref_high, ref_mean, loss: RelativeLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """`relative_loss` without L_reg per row (B,), and its gradient by the targets' probabilities (B, P, n)."""
    n = probs.shape[-1]
    high, i_lo, i_hi, frac = quantile_along_pixels(probs, loss.quantile)
    mean = probs.mean(dim=1)
    short_high = torch.relu(torch.log(loss.lift * ref_high) - torch.log(high))
    short_mean = torch.relu(torch.log(loss.lift * ref_mean) - torch.log(mean))
    value = loss.gamma * (short_high**2).mean(dim=-1) + loss.delta * (short_mean**2).mean(dim=-1)
    g_high = (-2 * loss.gamma / n) * short_high / high
    g_mean = (-2 * loss.delta / n) * short_mean / mean
    return value, _levels_grad(probs, g_high, g_mean, i_lo, i_hi, frac)


# `iterations` unit steps of size lr from zero follow the gradient flow to time iterations x lr. Most of
# the loss goes in the first steps and the flow then slows, so the solver spends the same time in 10
# growing steps in these proportions (docs/decisions.md: how they were chosen and checked).
FAST_STEP_SHARES = (1, 1, 1, 1, 1, 2, 2, 3, 4, 4)


def step_sizes(iterations: int, lr: float, shares: tuple[int, ...] = FAST_STEP_SHARES) -> tuple[float, ...]:
    """The step sizes that reach the flow time of `iterations` unit steps of size `lr` in the steps `shares`,
    or those unit steps themselves when there are no more of them than `shares`."""
    if iterations <= len(shares):
        return (lr,) * iterations
    total = sum(shares)
    return tuple(lr * iterations * s / total for s in shares)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _row_constants(target_logits, rest_lse, bases, ref_high, ref_mean, loss: RelativeLoss,
                   measured: int | None = None) -> tuple:
    """What `optimise_rows` computes once per call: the unedited targets' log-probabilities, the other
    columns' share, the bases as batched views, the reference levels and the loss's coefficients. The levels
    are measured on the first `measured` columns (all by default); L_reg covers every column."""
    b, pixels, n = target_logits.shape
    m = n if measured is None else measured
    k = bases.shape[0]
    tl, rl = _at_least_fp32(target_logits), _at_least_fp32(rest_lse)
    lse = torch.logaddexp(rl, tl.logsumexp(dim=-1, keepdim=True))  # (B, P, 1) of the unedited logits
    shifted = tl - lse  # log P of the unedited targets; <= 0, so exp below cannot overflow while offsets are sane
    rest = torch.exp(rl - lse)  # the other J - n columns' share, fixed
    basis_t = bases.to(tl.dtype).t().expand(b, pixels, k)  # (B, P, K), a view: offsets = basis_t @ w
    basis = bases.to(tl.dtype).expand(b, k, pixels)  # (B, K, P): gradient = basis @ dL/dlogits
    log_ref = torch.log(loss.lift * torch.stack([ref_high, ref_mean], dim=1).to(tl.dtype))  # (B, 2, 1)
    # value = sum(value_coef * short**2) + eps / (K n) |w|**2; the gradient's coefficient per level
    value_coef = torch.tensor([loss.gamma / m, loss.delta / m], device=tl.device)[:, None]
    grad_coef = torch.tensor([-2 * loss.gamma / m, -2 * loss.delta / (m * pixels)], device=tl.device)[:, None]
    reg = loss.epsilon / (k * n)
    q_pos = loss.quantile * (pixels - 1)
    lo = math.floor(q_pos)
    frac = q_pos - lo
    top = pixels - lo  # the quantile's two order statistics are the last two of the top `top`
    # where the quantile's gradient goes: (1 - frac) to the lower order statistic, frac to the upper one
    split = torch.tensor([frac, 1 - frac], device=tl.device)[:, None] if frac > 0 else None
    return shifted, rest, basis_t, basis, log_ref, value_coef, grad_coef, reg, top, frac, split


def _levels_short(probs, top: int, frac: float, split, log_ref):
    """The fused solvers' levels of `probs` (B, P, n): (levels (B, 2, n): the quantile and the mean; how far each
    falls short of `log_ref`, in log units; where the quantile's top `top` order statistics are)."""
    values, where = probs.topk(top, dim=1)
    high = values[:, -1] if split is None else torch.lerp(values[:, -1], values[:, -2], frac)
    levels = torch.stack([high, probs.mean(dim=1)], dim=1)  # (B, 2, n)
    return levels, (log_ref - levels.log()).relu_(), where


def _short_grad(short, levels, where, grad_coef, split, pixels: int) -> torch.Tensor:
    """dL/dP (B, P, n) of the shortfall terms from `_levels_short`'s outputs (`short` is overwritten)."""
    g = short.div_(levels).mul_(grad_coef)  # dL/d(quantile), dL/d(mean / P) per (row, target)
    b, _, n = levels.shape
    g_probs = g[:, 1:].expand(b, pixels, n).clone()  # every pixel through the mean
    if split is None:
        g_probs.scatter_add_(1, where[:, -1:], g[:, :1])
    else:
        g_probs.scatter_add_(1, where[:, -2:], g[:, :1] * split)
    return g_probs


def _keep_best(value, w, best_loss, best_w):
    """(best loss, best weights) per row after scoring `w` at `value`."""
    better = value < best_loss
    return torch.minimum(value, best_loss), torch.where(better[:, None, None], w, best_w)


def optimise_rows(
    target_logits: torch.Tensor,
    rest_lse: torch.Tensor,
    bases: torch.Tensor,
    init_weights: torch.Tensor,
    ref_high: torch.Tensor,
    ref_mean: torch.Tensor,
    steps: tuple[float, ...],
    loss: RelativeLoss | None = None,
) -> SolverResult:
    """Gradient descent on each (image, head) row's own relative loss with the step sizes `steps` (`step_sizes`),
    keeping each row's best iterate (not the batch's, as the release does: a batch gives the rows of single
    calls); the iterate after the last step is scored too. The loss and its gradient in closed form (tested
    against autograd), with the softmax shifted once by the unedited log-sum-exp, the quantile's interpolation
    one `lerp`, the two levels as one (B, 2, n) tensor and the step fused into one `baddbmm`. fp32, no host
    sync, a fixed number of operations (compilable). Eager, it runs in inference mode (no autograd bookkeeping
    on its many small operations) and returns ordinary tensors."""
    return without_autograd(_descend, target_logits, rest_lse, bases, init_weights, ref_high, ref_mean, steps, loss)


def _descend(target_logits, rest_lse, bases, init_weights, ref_high, ref_mean, steps, loss) -> SolverResult:
    loss = loss or RelativeLoss()
    pixels = target_logits.shape[1]
    shifted, rest, basis_t, basis, log_ref, value_coef, grad_coef, reg, top, frac, split = _row_constants(
        target_logits.float(), rest_lse.float(), bases, ref_high, ref_mean, loss)
    w = init_weights.detach().float()
    best_w = best_loss = first_loss = None
    for i in range(len(steps) + 1):
        e = torch.baddbmm(shifted, basis_t, w).exp_()  # exp(log P + offsets), unnormalised
        probs = e.div_(e.sum(dim=-1, keepdim=True).add_(rest))  # (B, P, n)
        levels, short, where = _levels_short(probs, top, frac, split, log_ref)
        value = (short * short * value_coef).sum(dim=(1, 2)) + reg * (w * w).sum(dim=(1, 2))
        if best_loss is None:
            first_loss, best_loss, best_w = value, value, w
        else:
            best_loss, best_w = _keep_best(value, w, best_loss, best_w)
        if i == len(steps):
            break
        g_probs = _short_grad(short, levels, where, grad_coef, split, pixels)
        # through the softmax over all tokens: dL/da_s = P_s (g_s - sum_t g_t P_t); only targets move
        t = g_probs.mul_(probs)
        g_logits = torch.addcmul(t, probs, t.sum(dim=-1, keepdim=True), value=-1)
        # w - lr (basis @ g_logits + 2 reg w), in one operation
        w = torch.baddbmm(w, basis, g_logits, beta=1 - 2 * reg * steps[i], alpha=-steps[i])
    return SolverResult(best_w, best_loss, first_loss)
