"""Attribute binding, the default's term for prompts with modifiers ("a red circle"): each modifier's map
drawn into its noun's region and out of the other nouns' (in the spirit of SynGen, Rassin et al. 2023), each
noun's map gathered into one place (concentration), on top of the relative loss; and its solver."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .maps import SolverResult, _through_softmax, descend_rows, offsets_from_weights, target_probs
from .relative import RelativeLoss, _shortfall_and_grad


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
    gradient of each row's loss by its own weights, in closed form (tested equal to autograd on the readable
    definition): dL/dP of every term, then once through the softmax and the bases.

    The overlap and spread terms are functions of the maps normalised to sum 1 (M = P / sum_p P), so their
    gradients are taken by M first and brought back to P together."""
    t, nouns = terms, slice(0, terms.n_nouns)
    probs = target_probs(target_logits, rest_lse, offsets_from_weights(w, bases))
    total = probs.sum(dim=1, keepdim=True)  # (B, 1, n)
    maps = probs / total
    value, g_maps = _overlap_terms_and_grad(maps, t.pairs, t.n_nouns, t.binding)
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


def _overlap_terms_and_grad(maps, pairs, n_nouns: int, binding: float):
    """binding x `binding_loss` per row (B,) and its gradient by the normalised maps M (B, P, n). The term is a
    sum c_ab BC(a, b) of overlaps with per-row coefficients (`_overlap_coefficients`), so one (B, P, n, n)
    tensor of the overlaps' summands serves every pair."""
    b, _pixels, n = maps.shape
    if not (binding and pairs):
        return maps.new_zeros(b), torch.zeros_like(maps)
    root = torch.sqrt(maps[..., :, None] * maps[..., None, :] + 1e-20)  # sqrt(M_a M_b + 1e-20), as in `bhattacharyya`
    overlap = root.sum(dim=1)  # (B, n, n)
    coef = _overlap_coefficients(overlap, pairs, n_nouns, binding)
    # d sqrt(M_a M_b + e) / dM_a = M_b / (2 sqrt(M_a M_b + e)); the summands are symmetric in a and b, so
    # c_ab and c_ba both reach column a (a multiply and a sum: einsum's reshapes cost more at these sizes)
    half = (coef + coef.transpose(1, 2)) / 2
    g_maps = (maps[..., None, :] / root * half[:, None]).sum(dim=-1)
    return (coef * overlap).sum(dim=(1, 2)), g_maps


def _overlap_coefficients(overlap, pairs, n_nouns: int, binding: float) -> torch.Tensor:
    """c (B, n, n) such that binding x `binding_loss` = sum_ab c_ab BC(a, b)
    at these overlaps (B, n, n): each (modifier m, noun t) pair puts -1 on (m, t) and +1 on the other noun m
    overlaps most, the max's gradient (split evenly between tied nouns, as autograd's amax does), over the
    number of pairs."""
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
    loss: RelativeLoss | None = None,
    concentration: float = 0.0,
    hw: tuple[int, int] | None = None,
) -> SolverResult:
    """The binding solver: `iterations` unit steps of size `lr` per (image, head) row on `bound_loss_and_grad`,
    the relative loss on the first `n_nouns` columns (the nouns), `binding` x `binding_loss` over the (modifier,
    noun) column `pairs` and `concentration` x the nouns' relative spread on the (H, W) map `hw`; each row keeps
    its best iterate."""
    target_logits, rest_lse, bases = target_logits.float(), rest_lse.float(), bases.float()
    ref_high, ref_mean = ref_high.float(), ref_mean.float()
    reference = None  # the nouns' unedited spread, concentration's yardstick
    if concentration > 0:
        unedited = target_probs(target_logits[..., :n_nouns], rest_lse, torch.zeros_like(target_logits[..., :n_nouns]))
        reference = spread(unedited, hw)
    terms = BoundTerms(ref_high, ref_mean, pairs, n_nouns, binding, loss or RelativeLoss(), concentration, reference, hw)
    return descend_rows(lambda w: bound_loss_and_grad(target_logits, rest_lse, bases, w, terms), init_weights,
                        iterations, lr)
