"""Attention Regulation as plain tensor functions (Zhang et al., ECCV 2024, Sec. 4).

Nothing here knows about diffusers. Shapes use the paper's notation:
  B  = (image, head) pairs of the conditional half of the guidance batch,
  P  = pixels of one cross-attention map (H * W),
  J  = prompt tokens (77 for CLIP), T = target token indices, n = len(T),
  K  = Gaussian bumps (49 = 7 x 7 in the paper).
"""

from __future__ import annotations

import dataclasses
import functools
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


def target_share(n_targets: int, per_target: float = 0.2, cap: float = 1.0) -> float:
    """tau / n: the mean attention each target should get, tau = min(cap, per_target * n)."""
    return min(cap, per_target * n_targets) / n_targets


@dataclass(frozen=True)
class LossWeights:
    """The loss's constants as released: gamma L_high + delta L_prop + epsilon L_reg."""

    gamma: float = 1.0
    delta: float = 80.0
    epsilon: float = 0.09
    quantile: float = 0.9
    high_target: float = 0.9
    per_target_share: float = 0.2


def target_probs(target_logits: torch.Tensor, rest_lse: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Softmax over all J tokens of (S + Delta), read only at the target columns.

    Only target logits move, so the other J - n columns enter through one precomputed log-sum-exp
    per pixel (`rest_lse`, shape (B, P, 1)): exact, and n / J of the work of the full softmax.
    """
    edited = target_logits + offsets  # (B, P, n)
    return torch.exp(edited - torch.logaddexp(rest_lse, torch.logsumexp(edited, dim=-1, keepdim=True)))


def regulation_loss(probs: torch.Tensor, weights: torch.Tensor, loss: LossWeights = LossWeights()) -> torch.Tensor:
    """L = gamma L_high + delta L_prop + epsilon L_reg for target maps `probs` of shape (B, P, n).

    L_high: the top (1 - quantile) of each target's pixels should carry `high_target` attention.
    L_prop: every target's mean attention should be tau / n (equal absolute shares).
    L_reg:  mean squared bump weight, the only "change as little as possible" term (the paper's beta).
    """
    n = probs.shape[-1]
    high = torch.quantile(probs, loss.quantile, dim=1)  # (B, n)
    l_high = ((high - loss.high_target) ** 2).mean()
    l_prop = ((probs.mean(dim=1) - target_share(n, loss.per_target_share)) ** 2).mean()
    l_reg = (weights**2).mean()
    return loss.gamma * l_high + loss.delta * l_prop + loss.epsilon * l_reg


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


def loss_and_grad(
    target_logits: torch.Tensor, rest_lse: torch.Tensor, bases: torch.Tensor, w: torch.Tensor, loss: LossWeights,
    per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`regulation_loss` at weights w (or, with `per_row`, each row's share of it) and the gradient of the
    batch loss dL/dw, in closed form.

    The same numbers as autograd through `regulation_loss` (tested), in a fixed ~25 tensor operations
    instead of ~125: on a GPU every operation is a kernel launch, and launches were the release's cost.
    """
    b, pixels, n = target_logits.shape
    probs = target_probs(target_logits, rest_lse, offsets_from_weights(w, bases))  # (B, P, n)
    high, i_lo, i_hi, frac = quantile_along_pixels(probs, loss.quantile)  # (B, n)
    mean = probs.mean(dim=1)
    d_high, d_mean = high - loss.high_target, mean - target_share(n, loss.per_target_share)
    if per_row:  # each row's own loss (B,); their mean is the batch loss
        value = loss.gamma * (d_high**2).mean(-1) + loss.delta * (d_mean**2).mean(-1) + loss.epsilon * (w**2).mean((1, 2))
    else:
        value = loss.gamma * (d_high**2).mean() + loss.delta * (d_mean**2).mean() + loss.epsilon * (w**2).mean()
    g_high = (2 * loss.gamma / (b * n)) * d_high
    g_mean = (2 * loss.delta / (b * n)) * d_mean
    grad = _weights_grad(probs, g_high, g_mean, i_lo, i_hi, frac, bases) + (2 * loss.epsilon / w.numel()) * w
    return value, grad


def _weights_grad(probs, g_high, g_mean, i_lo, i_hi, frac, bases) -> torch.Tensor:
    """dL/dw from dL/d(quantile) and dL/d(mean) of every (row, target): the shared back half of the
    closed-form gradients."""
    return _through_softmax(probs, _levels_grad(probs, g_high, g_mean, i_lo, i_hi, frac), bases)


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


def optimise_offsets(
    target_logits: torch.Tensor,
    rest_lse: torch.Tensor,
    bases: torch.Tensor,
    init_weights: torch.Tensor,
    iterations: int = 20,
    lr: float = 100.0,
    loss: LossWeights = LossWeights(),
    images: int = 1,
) -> SolverResult:
    """Plain gradient descent on the bump weights w (B, K, n), keeping the lowest-loss iterate.

    As released: the loss is evaluated before every update, the step is `lr` per (image, head), i.e.
    lr * B times the gradient of the batch mean, and the iterate after the last update is not scored.
    The release keeps the best iterate of the whole batch; with `images` > 1 (B = images x heads) each
    image keeps its own (by the mean loss of its rows), so an image does not depend on its batch; for
    one image the two are the same.
    Runs in fp32; the gradient is in closed form, so nothing flows back into the model.
    """
    target_logits, rest_lse, bases = target_logits.float(), rest_lse.float(), bases.float()
    w = init_weights.detach().float()
    rows_per_image = w.shape[0] // images
    best_w, best_loss, first_loss = w, torch.full((images,) if images > 1 else (), math.inf, device=w.device), None
    step = lr * w.shape[0]
    for _ in range(iterations):
        value, grad = loss_and_grad(target_logits, rest_lse, bases, w, loss, per_row=images > 1)
        if images > 1:
            value = value.view(images, rows_per_image).mean(dim=1)
        first_loss = value if first_loss is None else first_loss
        # Keep the best iterate on the device: no host sync inside the loop.
        better = value < best_loss
        pick = better.repeat_interleave(rows_per_image)[:, None, None] if images > 1 else better
        best_w, best_loss = torch.where(pick, w, best_w), torch.where(better, value, best_loss)
        w = w - step * grad
    return SolverResult(best_w, best_loss.mean(), first_loss.mean())


def offsets_from_weights(weights: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Delta(p, t) = sum_k w[k, t] G_k(p): (B, K, n) x (K, P) -> (B, P, n)."""
    return torch.einsum("bkn,kp->bpn", weights, bases.to(weights.dtype))


def smoothed_weights(previous_best: torch.Tensor, best: torch.Tensor, step: int, mix: float = 0.25, decay: float = 0.99) -> torch.Tensor:
    """The weights actually applied at step s: decay**s * (mix * previous best + (1 - mix) * best).

    A two-tap blend with the previous step's best (at s = 0, the random initial weights), not a true
    moving average; the offsets are linear in w, so blending weights blends maps.
    """
    return decay**step * (mix * previous_best + (1.0 - mix) * best)


# -- the `auto` preset's loss: targets relative to the call's own maps --------------------------------


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


def relative_loss(
    probs: torch.Tensor, weights: torch.Tensor, ref_high: torch.Tensor, ref_mean: torch.Tensor, loss: RelativeLoss = RelativeLoss()
) -> torch.Tensor:
    """The per-row loss (B,) of target maps `probs` (B, P, n) at bump weights (B, K, n); readable reference."""
    high = torch.quantile(probs, loss.quantile, dim=1)  # (B, n)
    short_high = torch.relu(torch.log(loss.lift * ref_high) - torch.log(high))
    short_mean = torch.relu(torch.log(loss.lift * ref_mean) - torch.log(probs.mean(dim=1)))
    return (
        loss.gamma * (short_high**2).mean(dim=-1)
        + loss.delta * (short_mean**2).mean(dim=-1)
        + loss.epsilon * (weights**2).mean(dim=(1, 2))
    )


def relative_loss_and_grad(
    target_logits: torch.Tensor,
    rest_lse: torch.Tensor,
    bases: torch.Tensor,
    w: torch.Tensor,
    ref_high: torch.Tensor,
    ref_mean: torch.Tensor,
    loss: RelativeLoss,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`relative_loss` per row (B,) and the gradient of each row's loss by its own weights, closed form."""
    probs = target_probs(target_logits, rest_lse, offsets_from_weights(w, bases))
    value, g_probs = _shortfall_and_grad(probs, ref_high, ref_mean, loss)
    k, n = w.shape[1:]
    value = value + loss.epsilon * (w**2).mean(dim=(1, 2))
    return value, _through_softmax(probs, g_probs, bases) + (2 * loss.epsilon / (k * n)) * w


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


def optimise_rows(
    target_logits: torch.Tensor,
    rest_lse: torch.Tensor,
    bases: torch.Tensor,
    init_weights: torch.Tensor,
    ref_high: torch.Tensor,
    ref_mean: torch.Tensor,
    iterations: int = 20,
    lr: float = 1.0,
    loss: RelativeLoss = RelativeLoss(),
) -> SolverResult:
    """Gradient descent on each row's own loss, keeping each row's best iterate (not the batch's).

    The released solver keeps the iterate with the lowest loss over the whole batch, so with several
    images per call one image's good iterate can be thrown away for another's; here every (image,
    head) row keeps its own, and a batch gives the same rows as single calls. The loss includes the
    iterate after the last update. Runs in fp32, no host sync.
    """
    target_logits, rest_lse, bases = target_logits.float(), rest_lse.float(), bases.float()
    ref_high, ref_mean = ref_high.float(), ref_mean.float()
    return descend_rows(
        lambda w: relative_loss_and_grad(target_logits, rest_lse, bases, w, ref_high, ref_mean, loss),
        init_weights, iterations, lr,
    )


def descend_rows(loss_and_grad_fn, init_weights: torch.Tensor, iterations: int, lr: float,
                 steps: tuple[float, ...] | None = None) -> SolverResult:
    """`iterations` gradient steps of size `lr` (or the step sizes `steps`) on per-row losses, keeping
    each row's best iterate.

    `loss_and_grad_fn(w)` returns the loss of every row (B,) and the gradient of each row's loss by its
    own weights (B, K, n). The iterate after the last step is scored too."""
    steps = (lr,) * iterations if steps is None else tuple(steps)
    w = init_weights.detach().float()
    best_w, best_loss, first_loss = w, None, None
    for i in range(len(steps) + 1):
        value, grad = loss_and_grad_fn(w)
        if best_loss is None:
            first_loss, best_loss = value, value
        else:
            better = value < best_loss
            best_w = torch.where(better[:, None, None], w, best_w)
            best_loss = torch.where(better, value, best_loss)
        if i < len(steps):
            w = w - steps[i] * grad
    return SolverResult(best_w, best_loss, first_loss)


# -- the `auto` preset's fast solver (RegulationConfig.fast) -------------------------------------------

# The exact solver takes `iterations` unit steps of size lr from zero: the gradient flow up to time
# iterations x lr. Most of the loss goes in the first steps and the flow then slows, so the fast solver
# spends the same time in 10 growing steps, in these proportions (20 x 1 -> 1,1,1,1,1,2,2,3,4,4). Chosen on
# the embedded model's own solver calls (9 images, 2 and 3 targets): weights within 0.7 % of the exact
# ones (median; 4.6 % at worst), offsets within 0.3 logits; 8 steps (1,1,1,1,2,2,4,8) gave 1.7 % / 0.9.
# Warm-starting from the previous step's best was tried and dropped: the loss has many zero-hinge
# solutions, and a warm start keeps the previous one where the exact solver (from zero) finds a smaller one
# as the model corrects itself (weights ~100 % apart by the end).
FAST_STEP_SHARES = (1, 1, 1, 1, 1, 2, 2, 3, 4, 4)


# The binding solver (binding and concentration terms, autograd) is stiffer: on its calls on design prompts
# (benchmarks/fast_binding_check.py, 2026-12-01) the schedule above left weights 3.1 % from the exact ones
# (median; 147 % at worst, offsets up to 23 logits apart), this gentler one 1.2 % (5.6 % at worst, 0.36 logits)
# in 14 steps instead of 20. Used with RegulationConfig.fast_binding (off: its three-object pictures moved
# -1.7 pp [-3.5, +0.2] against the exact solver's on the table, outside issue 12's +-3 pp).
BINDING_STEP_SHARES = (1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2)


def fast_step_sizes(iterations: int, lr: float, shares: tuple[int, ...] = FAST_STEP_SHARES) -> tuple[float, ...]:
    """The fast solver's step sizes for the exact solver's (iterations, lr): the same total time, or the
    exact unit steps themselves when there are no more of them than `shares`."""
    if iterations <= len(shares):
        return (lr,) * iterations
    total = sum(shares)
    return tuple(lr * iterations * s / total for s in shares)


def _fast_constants(target_logits, rest_lse, bases, ref_high, ref_mean, loss: RelativeLoss) -> tuple:
    """What `fast_optimise_rows` computes once per call: the unedited targets' log-probabilities, the other
    columns' share, the bases as batched views, the reference levels and the loss's coefficients."""
    b, pixels, n = target_logits.shape
    k = bases.shape[0]
    tl, rl = target_logits.float(), rest_lse.float()
    lse = torch.logaddexp(rl, tl.logsumexp(dim=-1, keepdim=True))  # (B, P, 1) of the unedited logits
    shifted = tl - lse  # log P of the unedited targets; <= 0, so exp below cannot overflow while offsets are sane
    rest = torch.exp(rl - lse)  # the other J - n columns' share, fixed
    basis_t = bases.float().t().expand(b, pixels, k)  # (B, P, K), a view: offsets = basis_t @ w
    basis = bases.float().expand(b, k, pixels)  # (B, K, P): gradient = basis @ dL/dlogits
    log_ref = torch.log(loss.lift * torch.stack([ref_high.float(), ref_mean.float()], dim=1))  # (B, 2, 1)
    # value = sum(value_coef * short**2) + eps / (K n) |w|**2; the gradient's coefficient per level
    value_coef = torch.tensor([loss.gamma / n, loss.delta / n], device=tl.device)[:, None]
    grad_coef = torch.tensor([-2 * loss.gamma / n, -2 * loss.delta / (n * pixels)], device=tl.device)[:, None]
    reg = loss.epsilon / (k * n)
    q_pos = loss.quantile * (pixels - 1)
    lo = math.floor(q_pos)
    frac = q_pos - lo
    top = pixels - lo  # the quantile's two order statistics are the last two of the top `top`
    # where the quantile's gradient goes: (1 - frac) to the lower order statistic, frac to the upper one
    split = torch.tensor([frac, 1 - frac], device=tl.device)[:, None] if frac > 0 else None
    return shifted, rest, basis_t, basis, log_ref, value_coef, grad_coef, reg, top, frac, split


def fast_optimise_rows(
    target_logits: torch.Tensor,
    rest_lse: torch.Tensor,
    bases: torch.Tensor,
    init_weights: torch.Tensor,
    ref_high: torch.Tensor,
    ref_mean: torch.Tensor,
    steps: tuple[float, ...],
    loss: RelativeLoss = RelativeLoss(),
) -> SolverResult:
    """`optimise_rows` with the step sizes `steps` (see `fast_step_sizes`), in about half the tensor
    operations per step: the same loss and gradient (`relative_loss_and_grad`, tested equal), with the
    softmax shifted once by the unedited log-sum-exp, the quantile's interpolation one `lerp`, the two
    levels handled as one (B, 2, n) tensor and the gradient step fused into one `baddbmm`. Keeps each row's
    best iterate; no host sync."""
    b, pixels, n = target_logits.shape
    shifted, rest, basis_t, basis, log_ref, value_coef, grad_coef, reg, top, frac, split = _fast_constants(
        target_logits, rest_lse, bases, ref_high, ref_mean, loss)
    w = init_weights.detach().float()
    best_w = best_loss = first_loss = None
    for i in range(len(steps) + 1):
        e = torch.baddbmm(shifted, basis_t, w).exp_()  # exp(log P + offsets), unnormalised
        probs = e.div_(e.sum(dim=-1, keepdim=True).add_(rest))  # (B, P, n)
        values, where = probs.topk(top, dim=1)
        high = values[:, -1] if split is None else torch.lerp(values[:, -1], values[:, -2], frac)
        levels = torch.stack([high, probs.mean(dim=1)], dim=1)  # (B, 2, n)
        short = (log_ref - levels.log()).relu_()  # how far each level falls short, in log units
        value = (short * short * value_coef).sum(dim=(1, 2)) + reg * (w * w).sum(dim=(1, 2))
        if best_loss is None:
            first_loss, best_loss, best_w = value, value, w
        else:
            better = value < best_loss
            best_w = torch.where(better[:, None, None], w, best_w)
            best_loss = torch.minimum(value, best_loss)
        if i == len(steps):
            break
        g = short.div_(levels).mul_(grad_coef)  # dL/d(quantile), dL/d(mean / P) per (row, target)
        g_probs = g[:, 1:].expand(b, pixels, n).clone()  # every pixel through the mean
        if split is None:
            g_probs.scatter_add_(1, where[:, -1:], g[:, :1])
        else:
            g_probs.scatter_add_(1, where[:, -2:], g[:, :1] * split)
        # through the softmax over all tokens: dL/da_s = P_s (g_s - sum_t g_t P_t); only targets move
        t = g_probs.mul_(probs)
        g_logits = torch.addcmul(t, probs, t.sum(dim=-1, keepdim=True), value=-1)
        # w - lr (basis @ g_logits + 2 reg w), in one operation
        w = torch.baddbmm(w, basis, g_logits, beta=1 - 2 * reg * steps[i], alpha=-steps[i])
    return SolverResult(best_w, best_loss, first_loss)


# -- attribute binding (an option of the `auto` preset) ------------------------------------------------


def binding_loss(probs: torch.Tensor, pairs: tuple[tuple[int, int], ...], nouns: tuple[int, ...]) -> torch.Tensor:
    """Per row (B,): how far each modifier's map sits from its own noun's and near another noun's.

    In the spirit of SynGen (Rassin et al. 2023): the colour word's attention should lie inside its
    noun's region, not another object's. With A = each column's map normalised to sum 1 and
    BC(a, b) = sum_p sqrt(A_a A_b) (the Bhattacharyya overlap, 1 for equal maps, 0 for disjoint ones),
    each (modifier m, noun t) pair costs max_{o != t} BC(m, o) - BC(m, t); the mean over pairs.
    `pairs` and `nouns` index the columns of `probs` (B, P, n).
    """
    overlap = bhattacharyya(probs)
    total = probs.new_zeros(probs.shape[0])
    for modifier, noun in pairs:
        others = [overlap(modifier, o) for o in nouns if o != noun]
        leak = torch.stack(others).amax(dim=0) if others else probs.new_zeros(probs.shape[0])
        total = total + leak - overlap(modifier, noun)
    return total / max(len(pairs), 1)


def bhattacharyya(probs: torch.Tensor):
    """overlap(a, b) -> (B,): BC of columns a and b of `probs` (B, P, n), each map normalised to sum 1."""
    maps = probs / probs.sum(dim=1, keepdim=True)
    return lambda a, b: torch.sqrt(maps[..., a] * maps[..., b] + 1e-20).sum(dim=1)


def separation_loss(probs: torch.Tensor, nouns: tuple[int, ...]) -> torch.Tensor:
    """Per row (B,): the mean Bhattacharyya overlap BC of every two nouns' maps (see `binding_loss`), 0 for
    disjoint maps; two objects drawn in one place is one of the two-object failures."""
    overlap = bhattacharyya(probs)
    overlaps = [overlap(a, b) for i, a in enumerate(nouns) for b in nouns[i + 1:]]
    return torch.stack(overlaps).mean(dim=0) if overlaps else probs.new_zeros(probs.shape[0])


def spread(probs: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, n): each column's spatial variance, the map normalised to sum 1 on an (H, W) grid, in units of
    the map's side (a uniform square map: 1/6; one small blob: ~0.01; two blobs half the map apart: ~0.06)."""
    y, x = pixel_coordinates(hw, probs)
    maps = probs / probs.sum(dim=1, keepdim=True)
    variance = lambda c: (maps * c[:, None] ** 2).sum(dim=1) - (maps * c[:, None]).sum(dim=1) ** 2  # noqa: E731
    return variance(y) + variance(x)


def pixel_coordinates(hw: tuple[int, int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x), each (P,): every pixel's row and column on the (H, W) grid, row-major like the maps, in units of
    the side (0 to 1), on `like`'s device and in its dtype."""
    height, width = hw
    ys = torch.arange(height, device=like.device, dtype=like.dtype) / max(height - 1, 1)
    xs = torch.arange(width, device=like.device, dtype=like.dtype) / max(width - 1, 1)
    return ys.repeat_interleave(width), xs.repeat(height)


def concentration_loss(probs: torch.Tensor, reference: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Per row (B,): the mean over the columns of `probs` (B, P, n) of their spread relative to the unedited
    one (`reference`, (B, n)): 1 when unchanged, lower when a noun's attention gathers into one place.
    Against the duplicated shape (three-object failures: one shape drawn twice, another missing)."""
    return (spread(probs, hw) / reference).mean(dim=-1)


def needs_autograd(pairs, n_nouns: int, config) -> bool:
    """Whether a group's solve takes `optimise_rows_bound` (binding pairs, or separation of two or more
    nouns); it is never compiled. Concentration is a term of that solver and does not send a group to it:
    it was measured only where binding runs, and groups without modifiers keep the fast, compiled path."""
    return bool(pairs and config.binding > 0) or (getattr(config, "separation", 0.0) > 0 and n_nouns > 1)


@dataclass(frozen=True)
class BoundTerms:
    """What the binding solver's loss asks of one call, besides the logits and the weights: the relative loss
    on the first `n_nouns` columns (the nouns) against the dominant target's levels `ref_high`, `ref_mean`
    (B, 1), L_reg over every column, `binding` x `binding_loss` over the (modifier, noun) column `pairs`,
    `concentration` x `concentration_loss` of the nouns against their unedited spread `reference` (B, n_nouns)
    on the (H, W) map `hw`, and `separation` x `separation_loss` of the nouns."""

    ref_high: torch.Tensor
    ref_mean: torch.Tensor
    pairs: tuple[tuple[int, int], ...]
    n_nouns: int
    binding: float
    loss: RelativeLoss
    separation: float = 0.0
    concentration: float = 0.0
    reference: torch.Tensor | None = None
    hw: tuple[int, int] | None = None


def bound_loss(target_logits: torch.Tensor, rest_lse: torch.Tensor, bases: torch.Tensor, w: torch.Tensor,
               terms: BoundTerms) -> torch.Tensor:
    """The binding solver's loss per row (B,) at weights w (B, K, n) (`BoundTerms` says which terms). The
    readable definition, differentiated by autograd; `bound_loss_and_grad` is its closed form."""
    t = terms
    nouns = tuple(range(t.n_nouns))
    probs = target_probs(target_logits, rest_lse, offsets_from_weights(w, bases))
    unregularised = dataclasses.replace(t.loss, epsilon=0.0)  # L_reg below covers every column, modifiers too
    value = relative_loss(probs[..., :t.n_nouns], w, t.ref_high, t.ref_mean, unregularised)
    value = value + t.loss.epsilon * (w**2).mean(dim=(1, 2)) + t.binding * binding_loss(probs, t.pairs, nouns)
    if t.concentration > 0:
        value = value + t.concentration * concentration_loss(probs[..., :t.n_nouns], t.reference, t.hw)
    return value + t.separation * separation_loss(probs, nouns) if t.separation > 0 else value


def bound_loss_and_grad(target_logits: torch.Tensor, rest_lse: torch.Tensor, bases: torch.Tensor, w: torch.Tensor,
                        terms: BoundTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """`bound_loss` per row (B,) and the gradient of each row's loss by its own weights (B, K, n), in closed
    form (tested equal to autograd): dL/dP of every term, then once through the softmax and the bases.

    The overlap and spread terms are functions of the maps normalised to sum 1 (M = P / sum_p P), so their
    gradients are taken by M first and brought back to P together."""
    t, nouns = terms, slice(0, terms.n_nouns)
    probs = target_probs(target_logits, rest_lse, offsets_from_weights(w, bases))
    total = probs.sum(dim=1, keepdim=True)  # (B, 1, n)
    maps = probs / total
    value, g_maps = _overlap_terms_and_grad(maps, t.pairs, t.n_nouns, t.binding, t.separation)
    if t.concentration > 0:
        spread_value, g_spread = _concentration_and_grad(maps[..., nouns], t.reference, t.hw)
        value = value + t.concentration * spread_value
        g_maps[..., nouns] += t.concentration * g_spread
    # through M_c = P_c / S_c: dL/dP_c = (dL/dM_c - sum_p dL/dM_c(p) M_c(p)) / S_c
    g_probs = (g_maps - (g_maps * maps).sum(dim=1, keepdim=True)) / total
    short_value, g_short = _shortfall_and_grad(probs[..., nouns], t.ref_high, t.ref_mean, t.loss)
    g_probs[..., nouns] += g_short
    k, n = w.shape[1:]
    value = value + short_value + t.loss.epsilon * (w**2).mean(dim=(1, 2))
    return value, _through_softmax(probs, g_probs, bases) + (2 * t.loss.epsilon / (k * n)) * w


def _overlap_terms_and_grad(maps, pairs, n_nouns: int, binding: float, separation: float):
    """binding x `binding_loss` + separation x `separation_loss` per row (B,) and its gradient by the normalised
    maps M (B, P, n). Both terms are sums c_ab BC(a, b) of overlaps with per-row coefficients
    (`_overlap_coefficients`), so one (B, P, n, n) tensor of the overlaps' summands serves every pair."""
    b, _pixels, n = maps.shape
    if not ((binding and pairs) or (separation > 0 and n_nouns > 1)):
        return maps.new_zeros(b), torch.zeros_like(maps)
    root = torch.sqrt(maps[..., :, None] * maps[..., None, :] + 1e-20)  # sqrt(M_a M_b + 1e-20), as in `bhattacharyya`
    overlap = root.sum(dim=1)  # (B, n, n)
    coef = _overlap_coefficients(overlap, pairs, n_nouns, binding, separation)
    # d sqrt(M_a M_b + e) / dM_a = M_b / (2 sqrt(M_a M_b + e)); the summands are symmetric in a and b, so
    # c_ab and c_ba both reach column a (a multiply and a sum: einsum's reshapes cost more at these sizes)
    half = (coef + coef.transpose(1, 2)) / 2
    g_maps = (maps[..., None, :] / root * half[:, None]).sum(dim=-1)
    return (coef * overlap).sum(dim=(1, 2)), g_maps


def _overlap_coefficients(overlap, pairs, n_nouns: int, binding: float, separation: float) -> torch.Tensor:
    """c (B, n, n) such that binding x `binding_loss` + separation x `separation_loss` = sum_ab c_ab BC(a, b)
    at these overlaps (B, n, n): each (modifier m, noun t) pair puts -1 on (m, t) and +1 on the other noun m
    overlaps most, the max's gradient (split evenly between tied nouns, as autograd's amax does), over the
    number of pairs; separation puts 1 / (number of noun pairs) on each two nouns."""
    b, n, _ = overlap.shape
    coef = overlap.new_zeros(b, n, n)
    if binding and pairs:
        modifiers, own = zip(*pairs)
        is_own = torch.zeros(len(pairs), n_nouns, dtype=torch.bool, device=overlap.device)
        is_own[range(len(pairs)), own] = True
        leaks = overlap[:, modifiers, :n_nouns].masked_fill(is_own, -math.inf)  # (B, pairs, nouns): other nouns
        # ~is_own: with one noun every entry is -inf and there is no max to take
        tied = ((leaks == leaks.amax(dim=-1, keepdim=True)) & ~is_own).to(coef.dtype)
        share = tied / tied.sum(dim=-1, keepdim=True).clamp_min(1)
        # index_add_, not assignment: a modifier may bind two nouns
        coef[:, :, :n_nouns].index_add_(1, torch.tensor(modifiers, device=coef.device),
                                        binding / len(pairs) * (share - is_own.to(coef.dtype)))
    if separation > 0 and n_nouns > 1:
        every_two = torch.ones(n_nouns, n_nouns, device=coef.device, dtype=coef.dtype).triu(1)
        coef[:, :n_nouns, :n_nouns] += separation * every_two / every_two.sum()
    return coef


def _concentration_and_grad(maps, reference, hw):
    """`concentration_loss` per row (B,) of normalised maps M (B, P, n) and its gradient by M. With the pixel
    features f = (y, x, y^2 + x^2), the spread is sum_p M f_3 - mu_y^2 - mu_x^2 (mu = sum_p M (y, x)) and
    d spread / dM(p) = f_3 - 2 mu . (y, x): one matmul each way."""
    y, x = pixel_coordinates(hw, maps)
    features = torch.stack([y, x, y**2 + x**2], dim=-1)  # (P, 3)
    moments = maps.transpose(1, 2) @ features  # (B, n, 3)
    mu, second = moments[..., :2], moments[..., 2]
    spreads = second - (mu**2).sum(dim=-1)  # (B, n)
    slope = torch.cat([-2 * mu, torch.ones_like(second)[..., None]], dim=-1)  # (B, n, 3)
    scale = 1 / (maps.shape[-1] * reference)  # the mean over columns of spread / reference
    return (scale * spreads).sum(dim=-1), scale[:, None] * (features @ slope.transpose(1, 2))


def optimise_rows_bound(
    target_logits: torch.Tensor,
    rest_lse: torch.Tensor,
    bases: torch.Tensor,
    init_weights: torch.Tensor,
    ref_high: torch.Tensor,
    ref_mean: torch.Tensor,
    pairs: tuple[tuple[int, int], ...],
    n_nouns: int,
    binding: float,
    iterations: int = 20,
    lr: float = 1.0,
    loss: RelativeLoss = RelativeLoss(),
    separation: float = 0.0,
    concentration: float = 0.0,
    hw: tuple[int, int] | None = None,
    steps: tuple[float, ...] | None = None,
    closed_form: bool = False,
) -> SolverResult:
    """`optimise_rows` on `bound_loss`: the relative loss on the first `n_nouns` columns (the nouns),
    `binding` x `binding_loss` over the (modifier, noun) column `pairs`, `separation` x `separation_loss` of
    the nouns and `concentration` x `concentration_loss` of the nouns on the (H, W) map `hw`. Per row, by
    autograd, or with `closed_form` by `bound_loss_and_grad` (the same steps without autograd's graph);
    `steps`: step sizes instead of `iterations` x `lr` (`fast_step_sizes`)."""
    target_logits, rest_lse, bases = target_logits.float(), rest_lse.float(), bases.float()
    ref_high, ref_mean = ref_high.float(), ref_mean.float()
    reference = None  # the nouns' unedited spread, concentration's yardstick
    if concentration > 0:
        unedited = target_probs(target_logits[..., :n_nouns], rest_lse, torch.zeros_like(target_logits[..., :n_nouns]))
        reference = spread(unedited, hw)
    terms = BoundTerms(ref_high, ref_mean, pairs, n_nouns, binding, loss, separation, concentration, reference, hw)
    if closed_form:
        return descend_rows(lambda w: bound_loss_and_grad(target_logits, rest_lse, bases, w, terms), init_weights,
                            iterations, lr, steps)

    def loss_and_grad(w: torch.Tensor):
        w = w.clone().requires_grad_(True)
        with torch.enable_grad():
            value = bound_loss(target_logits, rest_lse, bases, w, terms)
            (grad,) = torch.autograd.grad(value.sum(), w)
        return value.detach(), grad

    return descend_rows(loss_and_grad, init_weights, iterations, lr, steps)


# -- one edited layer call (Alg. 1): solve, smooth, add the offsets, softmax again ----------------------


def neglected(target_maps: torch.Tensor, quantile: float, ratio: float) -> torch.Tensor:
    """Which images need regulation: (images, heads, P, n) unedited target maps -> (images,) bool.

    On the head-averaged maps, an image is neglecting a target when its weakest target's top-decile
    level is below `ratio` times its strongest one's. One target is never neglected.
    """
    level = quantile_along_pixels(target_maps.mean(dim=1), quantile)[0]  # (images, n)
    return level.amin(dim=-1) < ratio * level.amax(dim=-1)


def leaking(target_maps: torch.Tensor, pairs, n_nouns: int) -> torch.Tensor:
    """Which images have a modifier whose (head-averaged) map overlaps another noun more than its own."""
    return binding_loss(target_maps.mean(dim=1), pairs, tuple(range(n_nouns))) > 0


@dataclass
class RegulatedStep:
    """What one edited layer call did to a group of images that share their targets."""

    probs: torch.Tensor  # (B, P, J) the probabilities to use: edited rows changed, others as they were
    weights: torch.Tensor  # (B, K, n) the best weights found, the next step's "previous best"
    initial_loss: torch.Tensor
    loss: torch.Tensor


def images_to_edit(unedited, heads: int, n_nouns: int, pairs, config):
    """The neglect test of one group: (images,) bool, or None when every image is edited (the `paper`
    loss, or no `neglect_ratio`). `unedited`: the targets' unedited maps (B, P, n)."""
    if config.loss != "relative" or config.neglect_ratio is None:
        return None
    per_image = unedited.reshape(-1, heads, *unedited.shape[1:])
    edit_images = neglected(per_image[..., :n_nouns], config.quantile, config.neglect_ratio)
    if pairs and config.binding > 0:
        edit_images = edit_images | leaking(per_image, pairs, n_nouns)
    return edit_images


def solve_weights(target_logits, rest_lse, bases, init, unedited, heads: int, n_nouns: int, pairs, config, hw=None):
    """The bump weights for one group (a SolverResult). `config` is a RegulationConfig (its loss and
    solver fields)."""
    if config.loss != "relative":
        return optimise_offsets(
            target_logits, rest_lse, bases, init, config.iterations, config.lr, config.loss_weights,
            images=target_logits.shape[0] // heads,
        )
    ref_high, ref_mean = reference_levels(unedited[..., :n_nouns], config.quantile)
    if needs_autograd(pairs, n_nouns, config):
        return optimise_rows_bound(
            target_logits, rest_lse, bases, init, ref_high, ref_mean, pairs, n_nouns, config.binding,
            config.iterations, config.lr, config.loss_weights, getattr(config, "separation", 0.0),
            getattr(config, "concentration", 0.0), hw,
            fast_step_sizes(config.iterations, config.lr, BINDING_STEP_SHARES)
            if getattr(config, "fast_binding", False) else None,
            closed_form=getattr(config, "closed_form", False),
        )
    if getattr(config, "fast", False):
        return fast_optimise_rows(
            target_logits, rest_lse, bases, init, ref_high, ref_mean, fast_step_sizes(config.iterations, config.lr),
            config.loss_weights,
        )
    return optimise_rows(
        target_logits, rest_lse, bases, init, ref_high, ref_mean, config.iterations, config.lr, config.loss_weights,
    )


def regulate_step(
    scores: torch.Tensor,
    probs: torch.Tensor,
    targets: tuple[int, ...],
    bases: torch.Tensor,
    init: torch.Tensor,
    previous: torch.Tensor | None,
    step: int,
    config,
    *,
    heads: int,
    eos: torch.Tensor,
    n_nouns: int | None = None,
    pairs: tuple = (),
    edit=None,
    hw: tuple[int, int] | None = None,
    words: torch.Tensor | None = None,
) -> RegulatedStep | None:
    """Attention Regulation at one edited layer and step, for rows sharing `targets` (Sec. 4, Alg. 1).

    scores, probs: (B, P, J) logits S and softmax(S) of the conditional rows, B = images x heads.
    The neglect test first (`images_to_edit`); then `edit_group` (or `edit`, a compiled copy of it from
    compiled.py) solves, smooths and applies. None: nothing to edit.
    words: (B, J) bool, the columns the loss measures the targets' maps in (`renormalised`); None: the
    whole row. The edit itself always acts in the whole softmax.
    """
    n_nouns = len(targets) if n_nouns is None else n_nouns
    t = torch.tensor(targets, device=scores.device)
    unedited = renormalised(probs, t, words) if config.loss == "relative" else None  # the relative loss's reference
    edit_images = images_to_edit(unedited, heads, n_nouns, pairs, config)
    if edit_images is not None and not edit_images.any():
        return None  # tested before anything else is computed: most calls of a level prompt end here
    if previous is None or previous.shape != init.shape:
        previous = init  # at the first edited step "previous" is the initial weights
    edit_rows = None if edit_images is None else edit_images.repeat_interleave(heads)
    # the step enters as a tensor so that a compiled `edit` is not specialised to each step
    decay = torch.tensor(config.decay**step, device=scores.device)
    if edit is None or needs_autograd(pairs, n_nouns, config) or words is not None:
        edit = functools.partial(edit_group, hw=hw, words=words)  # the autograd solver is never compiled
    return edit(scores, probs, unedited, t, bases, init, previous, decay, edit_rows, eos, config, heads, n_nouns,
                pairs)


def renormalised(probs: torch.Tensor, t: torch.Tensor, words: torch.Tensor | None) -> torch.Tensor:
    """The target columns `t` of `probs` (B, P, J), as shares of the columns `words` (B, J) bool, or as they
    are when `words` is None: (B, P, n)."""
    maps = probs[..., t]
    if words is None:
        return maps
    return maps / (probs * words[:, None, :]).sum(dim=-1, keepdim=True)


def rest_logsumexp(scores: torch.Tensor, t: torch.Tensor, words: torch.Tensor | None) -> torch.Tensor:
    """(B, P, 1) log-sum-exp of the logits the targets `t` compete with in the loss: every other column of
    the row, or with `words` (B, J) bool only the other columns among those (-inf where there is none)."""
    if words is None:
        # the other columns, in order, as an index of static length (targets are distinct): a boolean mask
        # would give the same values but a data-dependent shape, which a compiler cannot fix in advance
        is_target = torch.zeros(scores.shape[-1], dtype=torch.uint8, device=scores.device).index_fill_(0, t, 1)
        others = torch.argsort(is_target, stable=True)[: scores.shape[-1] - t.shape[0]]
        return torch.logsumexp(scores.index_select(-1, others), dim=-1, keepdim=True)
    rest = words.clone()
    rest[:, t] = False
    return torch.logsumexp(scores.masked_fill(~rest[:, None, :], float("-inf")), dim=-1, keepdim=True)


def floor_offset(edited: torch.Tensor, t: torch.Tensor, floor: float, edit_rows=None) -> torch.Tensor:
    """(B, 1, 1) offsets >= 0 for the target columns `t` of the logits `edited` (B, P, J) that lift the targets'
    total share of the whole row, averaged over the pixels, to about `floor` where it is below: log(floor /
    share), exact while the targets hold a small share. One constant per row keeps each map's shape.
    Rows outside `edit_rows` get 0."""
    share = edited.softmax(dim=-1)[..., t].sum(dim=-1).mean(dim=-1)  # (B,)
    lift = torch.clamp(math.log(floor) - torch.log(share), min=0.0)
    if edit_rows is not None:
        lift = lift * edit_rows
    return lift[:, None, None]


def edit_group(scores, probs, unedited, t, bases, init, previous, decay, edit_rows, eos, config, heads: int,
               n_nouns: int, pairs, hw=None, words=None) -> RegulatedStep:
    """Alg. 1 on the rows of one group: the solver finds bump weights w from `init`; the weights applied
    are `smoothed_weights` of the previous step's best (`previous`) and this step's, scaled by `decay`
    (decay**step); the offsets Delta = sum_k w_k G_k are added to the targets' (`t`) logits and the
    softmax is taken again. SOS and the first EOS (`eos`, per row) keep their original probabilities when
    `config.restore_special` (as released). Rows outside `edit_rows` (the images the neglect test leaves
    alone; None = all edited) keep their probabilities exactly. No host sync, fixed shapes: compilable."""
    target_logits, rest_lse = scores[..., t], rest_logsumexp(scores, t, words)
    result = solve_weights(target_logits, rest_lse, bases, init, unedited, heads, n_nouns, pairs, config, hw)
    applied = decay * smoothed_weights(previous, result.weights, 0, config.smoothing)
    if edit_rows is not None:
        applied = applied * edit_rows[:, None, None]
    edited = scores.clone()
    edited[..., t] = edited[..., t] + offsets_from_weights(applied, bases)
    floor = getattr(config, "text_floor", 0.0)
    if floor > 0 and words is not None:
        edited[..., t] = edited[..., t] + floor_offset(edited, t, floor, edit_rows)
    p = edited.softmax(dim=-1)
    if config.restore_special:
        p[..., 0] = probs[..., 0]
        rows = torch.arange(p.shape[0], device=p.device)
        p[rows, :, eos] = probs[rows, :, eos]
    if edit_rows is not None:
        p = torch.where(edit_rows[:, None, None], p, probs)
    return RegulatedStep(p, result.weights, result.initial_loss, result.loss)
