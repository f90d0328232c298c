"""Attribute binding, the default's term for prompts with modifiers ("a red circle"): each modifier's map
drawn into its noun's region and out of the other nouns' (in the spirit of SynGen, Rassin et al. 2023), each
noun's map gathered into one place (concentration), on top of the relative loss; and its solver."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .maps import SolverResult, without_autograd
from .relative import RelativeLoss, _at_least_fp32


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
    roots = (probs / probs.sum(dim=1, keepdim=True) + 1e-20).sqrt()  # the epsilon keeps the gradient finite at 0
    return lambda a, b: (roots[..., a] * roots[..., b]).sum(dim=1)


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


@dataclass(frozen=True)
class BoundTerms:
    """What the binding solver's loss asks of one call, besides the logits and the weights: the relative loss
    on the first `n_nouns` columns (the nouns) against the dominant target's levels `ref_high`, `ref_mean`
    (B, 1), L_reg over every column, `binding` x `binding_loss` over the (modifier, noun) column `pairs`,
    and `concentration` x the nouns' `spread` relative to their unedited spread `reference` (B, n_nouns) on the
    (H, W) map `hw` (1 when unchanged, lower when a noun's attention gathers into one place)."""

    ref_high: torch.Tensor
    ref_mean: torch.Tensor
    pairs: tuple[tuple[int, int], ...]
    n_nouns: int
    binding: float
    loss: RelativeLoss
    concentration: float = 0.0
    reference: torch.Tensor | None = None
    hw: tuple[int, int] | None = None


def bound_loss_and_grad(target_logits: torch.Tensor, rest_lse: torch.Tensor, bases: torch.Tensor, w: torch.Tensor,
                        terms: BoundTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """The binding solver's loss per row (B,) at weights w (B, K, n) (`BoundTerms` says which terms) and the
    gradient of each row's loss by its own weights, as the solver computes them (tested equal to autograd on
    the readable definition)."""
    problem = _BoundProblem(target_logits, rest_lse, bases, terms)
    flat = problem.flat(w)
    value, g_logits = problem(flat)
    return value, problem.unflat(torch.addmm(flat, problem.bases, g_logits.flatten(1), beta=2 * problem.reg))


def _log_sum_exp(logits: torch.Tensor, rest_lse: torch.Tensor) -> torch.Tensor:
    """(B, P, 1): log(sum_t exp(logits_t) + exp(rest_lse)) for finite `logits` (B, P, n), in a few plain
    operations (torch.logsumexp and logaddexp handle infinities at several times the cost on small tensors)."""
    top = torch.maximum(logits.amax(dim=-1, keepdim=True), rest_lse)
    return (logits - top).exp_().sum(dim=-1, keepdim=True).add_((rest_lse - top).exp_()).log_().add_(top)


class _BoundProblem:
    """One call's binding loss in closed form, with everything that does not change between iterations made
    once. Pixel-major: the weights as (K, B x n) and the maps as (P, B, n), so that the offsets and the step are
    each one plain matrix product with the bases (K, P). `problem(w)` -> (loss per row (B,), dL/d(target logits)
    (P, B, n) without L_reg's part, or None)."""

    def __init__(self, target_logits, rest_lse, bases, terms: BoundTerms):
        loss = terms.loss
        tl, rl = _at_least_fp32(target_logits), _at_least_fp32(rest_lse)
        b, pixels, n = tl.shape
        m = self.n_nouns = terms.n_nouns
        self.k = bases.shape[0]
        like = dict(dtype=tl.dtype, device=tl.device)
        lse = _log_sum_exp(tl, rl)  # (B, P, 1) of the unedited logits
        # log P of the unedited targets (<= 0, so exp below cannot overflow while offsets are sane); the other
        # J - n columns' share, fixed
        self.shifted = (tl - lse).transpose(0, 1).contiguous()  # (P, B, n)
        self.rest = (rl - lse).exp_().transpose(0, 1).contiguous()  # (P, B, 1)
        self.bases = bases.to(**like)  # (K, P): the gradient by w is bases @ dL/dlogits
        self.bases_t = self.bases.t().contiguous()  # (P, K): offsets = bases_t @ w
        # the levels (quantile, mean) as (quantile, the map's sum): log(P ref) - log(sum) = log(ref) - log(mean)
        self.log_ref = torch.log(loss.lift * torch.stack([terms.ref_high, terms.ref_mean * pixels]).to(**like))
        self.value_coef = torch.tensor([loss.gamma / m, loss.delta / m], **like)[:, None, None]
        self.grad_coef = -2 * self.value_coef
        self.reg = loss.epsilon / (self.k * n)  # L_reg = epsilon mean(w^2)
        q_pos = loss.quantile * (pixels - 1)
        self.frac = q_pos - math.floor(q_pos)
        self.top = pixels - math.floor(q_pos)  # the quantile's two order statistics are the last two of the top
        # how the quantile's gradient splits between its order statistics: (1 - frac) to the lower one
        self.split = torch.tensor([self.frac, 1 - self.frac] if self.frac > 0 else [1.0], **like)[:, None, None]
        self.levels = torch.empty(2, b, m, **like)  # filled at each evaluation
        self.mean_grad = torch.zeros(1, b, n, **like)  # the mean's gradient per column; the modifiers' stay 0
        self.overlap = _OverlapTerms(terms.pairs, m, n, terms.binding, tl) if terms.binding and terms.pairs else None
        self.gather = (_Concentration(terms.reference, terms.hw, terms.concentration, n, tl)
                       if terms.concentration > 0 else None)

    def flat(self, w: torch.Tensor) -> torch.Tensor:
        """(B, K, n) weights -> (K, B x n)."""
        return w.transpose(0, 1).reshape(self.k, -1).contiguous()

    def unflat(self, w: torch.Tensor) -> torch.Tensor:
        """(K, B x n) weights -> (B, K, n)."""
        return w.view(self.k, -1, self.shifted.shape[-1]).transpose(0, 1).contiguous()

    def __call__(self, w: torch.Tensor, grad: bool = True):
        m, (pixels, b, n) = self.n_nouns, self.shifted.shape
        e = torch.addmm(self.shifted.view(pixels, -1), self.bases_t, w).exp_().view(pixels, b, n)  # unnormalised
        probs = e.div_(e.sum(dim=-1, keepdim=True).add_(self.rest))  # (P, B, n)
        total = probs.sum(dim=0, keepdim=True)  # (1, B, n)
        values, where = probs[..., :m].topk(self.top, dim=0)
        levels = self.levels
        torch.lerp(values[-1:], values[-2:-1], self.frac, out=levels[:1])
        levels[1:].copy_(total[..., :m])
        short = (self.log_ref - levels.log()).relu_()
        value = (short * short).mul_(self.value_coef).sum(dim=(0, 2))
        value = value.add_((w * w).view(self.k, b, n).sum(dim=(0, 2)), alpha=self.reg)
        maps = probs / total  # each map normalised to sum 1
        g_maps = None
        if self.overlap is not None:
            g_maps = self.overlap.add_grad(maps, value)
        if self.gather is not None:
            g_maps = self.gather.add_grad(maps, value, g_maps, grad)
        if not grad:
            return value, None
        if g_maps is None:
            g_maps = torch.zeros_like(maps)
        g = short.div_(levels).mul_(self.grad_coef)  # dL/d(quantile), dL/d(sum) per (row, noun)
        self.mean_grad[..., :m].copy_(g[1:])
        # through M_c = P_c / S_c: dL/dP_c = (dL/dM_c - sum_p dL/dM_c(p) M_c(p)) / S_c, plus the sum's dL/dS_c
        # at every pixel (folded into the subtracted constant); the quantile's at its order statistics
        per_map = torch.addcmul((g_maps * maps).sum(dim=0, keepdim=True), self.mean_grad, total, value=-1)
        g_probs = g_maps.sub_(per_map).div_(total)
        g_probs.scatter_add_(0, where[-self.split.shape[0]:], g[:1] * self.split)
        # through the softmax over all tokens: dL/da_s = P_s (g_s - sum_t g_t P_t); only targets move
        t = g_probs.mul_(probs)
        return value, torch.addcmul(t, probs, t.sum(dim=-1, keepdim=True), value=-1)


class _OverlapTerms:
    """binding x `binding_loss` as sum_ab c_ab BC(a, b) of overlaps with per-row coefficients: each (modifier m,
    noun t) pair puts -1 on (m, t) and +1 on the other noun m overlaps most, the max's gradient (split evenly
    between tied nouns, as autograd's amax does), over the number of pairs. With R = sqrt(M) (each map's root),
    BC = R^T R and, the summands being symmetric, the term is sum_p R . (R H) with H = (C + C^T) / 2 and its
    gradient by M is (R H) / R. With at most two nouns each modifier has at most one other noun, so C is fixed."""

    def __init__(self, pairs, n_nouns: int, n: int, binding: float, like: torch.Tensor):
        modifiers, own = zip(*pairs)
        self.modifiers = torch.tensor(modifiers, device=like.device)
        self.is_own = torch.zeros(len(pairs), n_nouns, dtype=torch.bool, device=like.device)
        self.is_own[range(len(pairs)), own] = True
        self.own_coef = self.is_own.to(like.dtype)
        # each pair's coefficients land in its modifier's row; a modifier may bind two nouns, and its rows add
        self.into_rows = torch.zeros(n, len(pairs), device=like.device, dtype=like.dtype)
        self.into_rows[list(modifiers), range(len(pairs))] = binding / len(pairs)
        self.n_nouns, self.pad = n_nouns, n - n_nouns
        # one other noun (or none): the max has one candidate and the coefficients do not depend on the maps
        self.fixed = self._symmetric((~self.is_own).to(like.dtype)) if n_nouns <= 2 else None

    def _symmetric(self, leak_share: torch.Tensor) -> torch.Tensor:
        """H = (C + C^T) / 2 from each pair's share of its leak over the nouns (pairs x nouns, or batched)."""
        coef = F.pad(self.into_rows @ (leak_share - self.own_coef), (0, self.pad))  # (..., n, n)
        return (coef + coef.transpose(-1, -2)).mul_(0.5)

    def add_grad(self, maps, value) -> torch.Tensor:
        """Adds the term per row at the normalised maps M (P, B, n) into `value` (B,); returns its gradient by M."""
        roots = maps.add(1e-20).sqrt_()  # as in `bhattacharyya`
        if self.fixed is not None:
            mixed = roots @ self.fixed  # (P, B, n)
        else:
            overlap = roots.permute(1, 2, 0) @ roots.permute(1, 0, 2)  # (B, n, n)
            leaks = overlap[:, self.modifiers, : self.n_nouns].masked_fill(self.is_own, -math.inf)  # the other nouns
            tied = (leaks == leaks.amax(dim=-1, keepdim=True)).to(maps.dtype)  # >= 2 other nouns: never all -inf
            half = self._symmetric(tied.div_(tied.sum(dim=-1, keepdim=True)))
            mixed = torch.bmm(roots.transpose(0, 1), half).transpose(0, 1)
        value.add_((roots * mixed).sum(dim=(0, 2)))
        return mixed.div_(roots)


class _Concentration:
    """concentration x the mean over nouns of spread / `reference` (B, m). With the pixel features
    f = (y, x, y^2 + x^2) and each column's moments u = sum_p M f, a spread is u_3 - u_1^2 - u_2^2 and
    d spread / dM(p) = f . (-2 u_1, -2 u_2, 1): one matmul each way, the modifiers' columns at weight 0."""

    def __init__(self, reference, hw, concentration: float, n: int, like: torch.Tensor):
        y, x = pixel_coordinates(hw, like)
        m = reference.shape[-1]
        self.features = torch.stack([y, x, y**2 + x**2], dim=-1)  # (P, 3)
        self.features_t = self.features.t().contiguous()  # (3, P)
        scale = F.pad(concentration / (m * reference), (0, n - m)).reshape(1, -1)  # (1, B x n)
        unit = torch.tensor([[-2.0], [-2.0], [0.0]], dtype=like.dtype, device=like.device)
        self.slope_of_moments = unit * scale  # (3, B x n): the slope is slope_of_moments * u + fixed
        self.fixed = torch.tensor([[0.0], [0.0], [1.0]], dtype=like.dtype, device=like.device) * scale

    def add_grad(self, maps, value, g_maps=None, grad: bool = True):
        """Adds the term per row at the normalised maps M (P, B, n) into `value` (B,); returns `g_maps` plus its
        gradient by M (a new tensor when `g_maps` is None), or None without `grad`."""
        pixels, b, n = maps.shape
        moments = self.features_t @ maps.view(pixels, -1)  # (3, B x n)
        # sum (fixed + slope_of_moments u / 2) u = scale (u_3 - u_1^2 - u_2^2)
        half_slope = torch.addcmul(self.fixed, moments, self.slope_of_moments, value=0.5)
        value.add_((moments * half_slope).view(3, b, n).sum(dim=(0, 2)))
        if not grad:
            return None
        slope = torch.addcmul(self.fixed, moments, self.slope_of_moments)
        if g_maps is None:
            return (self.features @ slope).view(pixels, b, n)
        return torch.addmm(g_maps.reshape(pixels, -1), self.features, slope).view(pixels, b, n)


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
    loss: RelativeLoss | None = None,
    concentration: float = 0.0,
    hw: tuple[int, int] | None = None,
) -> SolverResult:
    """The binding solver: `iterations` unit steps of size `lr` per (image, head) row on `bound_loss_and_grad`,
    the relative loss on the first `n_nouns` columns (the nouns), `binding` x `binding_loss` over the (modifier,
    noun) column `pairs` and `concentration` x the nouns' relative spread on the (H, W) map `hw`; each row keeps
    its best iterate (the first of equals). fp32, no host sync, a fixed number of operations, the step one `addmm`.
    Runs in inference mode (no autograd bookkeeping on its many small operations); returns ordinary tensors."""
    return without_autograd(_descend_bound, target_logits, rest_lse, bases, init_weights, ref_high, ref_mean, pairs,
                            n_nouns, binding, iterations, lr, loss, concentration, hw)


def _descend_bound(target_logits, rest_lse, bases, init_weights, ref_high, ref_mean, pairs, n_nouns, binding,
                   iterations, lr, loss, concentration, hw) -> SolverResult:
    target_logits, rest_lse, bases = target_logits.float(), rest_lse.float(), bases.float()
    reference = None  # the nouns' unedited spread, concentration's yardstick
    if concentration > 0:  # the nouns' maps in the softmax of the nouns and the other tokens (as `target_probs`)
        nouns = target_logits[..., :n_nouns]
        reference = spread((nouns - _log_sum_exp(nouns, rest_lse)).exp_(), hw)
    terms = BoundTerms(ref_high.float(), ref_mean.float(), pairs, n_nouns, binding, loss or RelativeLoss(),
                       concentration, reference, hw)
    problem = _BoundProblem(target_logits, rest_lse, bases, terms)
    w = problem.flat(init_weights.detach().float())
    iterates, values = [], []
    for i in range(iterations + 1):
        value, g_logits = problem(w, grad=i < iterations)
        iterates.append(w)
        values.append(value)
        if g_logits is not None:
            # w - lr (bases @ g_logits + 2 reg w), in one operation
            w = torch.addmm(w, problem.bases, g_logits.view(g_logits.shape[0], -1), beta=1 - 2 * problem.reg * lr,
                            alpha=-lr)
    # each row's best iterate, the first of equals; a NaN loss is never best
    values = torch.stack(values, dim=1)  # (B, iterations + 1)
    best = values.nan_to_num(nan=math.inf).argmin(dim=1)
    rows = torch.arange(values.shape[0], device=values.device)
    weights = torch.stack(iterates).view(len(iterates), problem.k, values.shape[0], -1)[best, :, rows]  # (B, K, n)
    return SolverResult(weights, values[rows, best], values[:, 0])
