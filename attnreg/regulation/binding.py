"""Attribute binding, the default's term for prompts with modifiers ("a red circle"): each modifier's map
drawn into its noun's region and out of the other nouns' (in the spirit of SynGen, Rassin et al. 2023), each
noun's map gathered into one place (concentration), on top of the relative loss; and its solver."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .maps import SolverResult, target_probs
from .relative import RelativeLoss, _keep_best, _levels_short, _row_constants, _short_grad


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
    value, g_logits = problem(w)
    return value, torch.baddbmm(w, problem.basis, g_logits, beta=2 * problem.reg)


class _BoundProblem:
    """One call's binding loss in closed form, with everything that does not change between iterations made
    once (the softmax shifted by the unedited log-sum-exp, the bases as batched views, the coefficients).
    `problem(w)` -> (loss per row (B,), dL/d(target logits) (B, P, n) without L_reg's part, or None)."""

    def __init__(self, target_logits, rest_lse, bases, terms: BoundTerms):
        (self.shifted, self.rest, self.basis_t, self.basis, self.log_ref, self.value_coef, self.grad_coef, self.reg,
         self.top, self.frac, self.split) = _row_constants(target_logits, rest_lse, bases, terms.ref_high,
                                                           terms.ref_mean, terms.loss, measured=terms.n_nouns)
        n = target_logits.shape[-1]
        self.n_nouns = terms.n_nouns
        self.overlap = (_OverlapTerms(terms.pairs, terms.n_nouns, n, terms.binding, self.shifted)
                        if terms.binding and terms.pairs else None)
        self.gather = (_Concentration(terms.reference, terms.hw, terms.concentration, self.shifted)
                       if terms.concentration > 0 else None)

    def __call__(self, w: torch.Tensor, grad: bool = True):
        m = self.n_nouns
        e = torch.baddbmm(self.shifted, self.basis_t, w).exp_()  # exp(log P + offsets), unnormalised
        probs = e.div_(e.sum(dim=-1, keepdim=True).add_(self.rest))  # (B, P, n)
        levels, short, where = _levels_short(probs[..., :m], self.top, self.frac, self.split, self.log_ref)
        value = (short * short * self.value_coef).sum(dim=(1, 2)) + self.reg * (w * w).sum(dim=(1, 2))
        total = probs.sum(dim=1, keepdim=True)  # (B, 1, n)
        maps = probs / total  # each map normalised to sum 1
        g_maps = torch.zeros_like(maps)
        if self.overlap is not None:
            value = value + self.overlap.add_grad(maps, g_maps)
        if self.gather is not None:
            value = value + self.gather.add_grad(maps, g_maps)
        if not grad:
            return value, None
        # through M_c = P_c / S_c: dL/dP_c = (dL/dM_c - sum_p dL/dM_c(p) M_c(p)) / S_c
        g_probs = g_maps.sub_((g_maps * maps).sum(dim=1, keepdim=True)).div_(total)
        g_probs[..., :m] += _short_grad(short, levels, where, self.grad_coef, self.split, self.shifted.shape[1])
        # through the softmax over all tokens: dL/da_s = P_s (g_s - sum_t g_t P_t); only targets move
        t = g_probs.mul_(probs)
        return value, torch.addcmul(t, probs, t.sum(dim=-1, keepdim=True), value=-1)


class _OverlapTerms:
    """binding x `binding_loss` as sum_ab c_ab BC(a, b) of overlaps with per-row coefficients: each (modifier m,
    noun t) pair puts -1 on (m, t) and +1 on the other noun m overlaps most, the max's gradient (split evenly
    between tied nouns, as autograd's amax does), over the number of pairs."""

    def __init__(self, pairs, n_nouns: int, n: int, binding: float, like: torch.Tensor):
        modifiers, own = zip(*pairs)
        self.modifiers = torch.tensor(modifiers, device=like.device)
        self.is_own = torch.zeros(len(pairs), n_nouns, dtype=torch.bool, device=like.device)
        self.is_own[range(len(pairs)), own] = True
        self.is_other = ~self.is_own
        self.own_coef = self.is_own.to(like.dtype)
        # each pair's coefficients land in its modifier's row; a modifier may bind two nouns, and its rows add
        self.into_rows = torch.zeros(n, len(pairs), device=like.device, dtype=like.dtype)
        self.into_rows[list(modifiers), range(len(pairs))] = binding / len(pairs)
        self.n_nouns, self.pad = n_nouns, n - n_nouns

    def add_grad(self, maps, g_maps) -> torch.Tensor:
        """The term per row (B,) at the normalised maps M (B, P, n); adds its gradient by M into `g_maps`."""
        root = (maps[..., :, None] * maps[..., None, :]).add_(1e-20).sqrt_()  # as in `bhattacharyya`
        overlap = root.sum(dim=1)  # (B, n, n)
        leaks = overlap[:, self.modifiers, : self.n_nouns].masked_fill(self.is_own, -math.inf)  # the other nouns
        # & is_other: with one noun every entry is -inf and there is no max to take
        tied = ((leaks == leaks.amax(dim=-1, keepdim=True)) & self.is_other).to(maps.dtype)
        share = tied.div_(tied.sum(dim=-1, keepdim=True).clamp_min(1)).sub_(self.own_coef)
        coef = F.pad(self.into_rows @ share, (0, self.pad))  # (B, n, n)
        # d sqrt(M_a M_b + e) / dM_a = M_b / (2 sqrt(M_a M_b + e)); the summands are symmetric in a and b, so
        # c_ab and c_ba both reach column a
        half = (coef + coef.transpose(1, 2)).mul_(0.5)
        g_maps += (maps[..., None, :] / root).mul_(half[:, None]).sum(dim=-1)
        return (coef * overlap).sum(dim=(1, 2))


class _Concentration:
    """concentration x the mean over nouns of spread / `reference` (B, m). With the pixel features
    f = (y, x, y^2 + x^2), a spread is sum_p M f_3 - mu_y^2 - mu_x^2 (mu = sum_p M (y, x)) and
    d spread / dM(p) = f_3 - 2 mu . (y, x): one matmul each way."""

    def __init__(self, reference, hw, concentration: float, like: torch.Tensor):
        y, x = pixel_coordinates(hw, like)
        self.features = torch.stack([y, x, y**2 + x**2], dim=-1)  # (P, 3)
        self.n_nouns = reference.shape[-1]
        self.scale = concentration / (self.n_nouns * reference)  # (B, m)

    def add_grad(self, maps, g_maps) -> torch.Tensor:
        """The term per row (B,) at the normalised maps M (B, P, n); adds its gradient by M into `g_maps`."""
        moments = maps[..., : self.n_nouns].transpose(1, 2) @ self.features  # (B, m, 3)
        mu, second = moments[..., :2], moments[..., 2]
        value = (self.scale * (second - (mu * mu).sum(dim=-1))).sum(dim=-1)
        slope = torch.cat([-2 * mu, torch.ones_like(second)[..., None]], dim=-1) * self.scale[..., None]
        g_maps[..., : self.n_nouns] += self.features @ slope.transpose(1, 2)
        return value


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
    its best iterate. fp32, no host sync, a fixed number of operations, the step fused into one `baddbmm`."""
    target_logits, rest_lse, bases = target_logits.float(), rest_lse.float(), bases.float()
    reference = None  # the nouns' unedited spread, concentration's yardstick
    if concentration > 0:
        unedited = target_probs(target_logits[..., :n_nouns], rest_lse, torch.zeros_like(target_logits[..., :n_nouns]))
        reference = spread(unedited, hw)
    terms = BoundTerms(ref_high.float(), ref_mean.float(), pairs, n_nouns, binding, loss or RelativeLoss(),
                       concentration, reference, hw)
    problem = _BoundProblem(target_logits, rest_lse, bases, terms)
    w = init_weights.detach().float()
    best_w = best_loss = first_loss = None
    for i in range(iterations + 1):
        value, g_logits = problem(w, grad=i < iterations)
        if best_loss is None:
            first_loss, best_loss, best_w = value, value, w
        else:
            best_loss, best_w = _keep_best(value, w, best_loss, best_w)
        if g_logits is not None:
            # w - lr (basis @ g_logits + 2 reg w), in one operation
            w = torch.baddbmm(w, problem.basis, g_logits, beta=1 - 2 * problem.reg * lr, alpha=-lr)
    return SolverResult(best_w, best_loss, first_loss)
