"""Oracles: the readable definitions of the losses (differentiated by autograd) and the plain solvers that
attnreg's closed-form, scheduled solvers are checked against. Test code only."""

from __future__ import annotations

import dataclasses

import torch

from attnreg.regulation import (BoundTerms, LossWeights, RelativeLoss, SolverResult, binding_loss,
                                offsets_from_weights, spread, target_probs, target_share)
from attnreg.regulation.maps import _through_softmax
from attnreg.regulation.relative import _shortfall_and_grad


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


def exact_optimise_rows(
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
    """The relative loss's solver in its plain form: `iterations` unit steps of size `lr` on
    `relative_loss_and_grad`, each row keeping its best iterate."""
    target_logits, rest_lse, bases = target_logits.float(), rest_lse.float(), bases.float()
    ref_high, ref_mean = ref_high.float(), ref_mean.float()
    return descend_rows(
        lambda w: relative_loss_and_grad(target_logits, rest_lse, bases, w, ref_high, ref_mean, loss),
        init_weights, iterations, lr,
    )


def concentration_loss(probs: torch.Tensor, reference: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Per row (B,): the mean over the columns of `probs` (B, P, n) of their spread relative to the unedited
    one (`reference`, (B, n)): 1 when unchanged, lower when a noun's attention gathers into one place.
    Against the duplicated shape (three-object failures: one shape drawn twice, another missing)."""
    return (spread(probs, hw) / reference).mean(dim=-1)


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
    return value


def autograd_rows_bound(
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
    concentration: float = 0.0,
    hw: tuple[int, int] | None = None,
    steps: tuple[float, ...] | None = None,
) -> SolverResult:
    """The binding solver by autograd through `bound_loss` (the readable definition): the same steps as
    `attnreg.regulation.optimise_rows_bound`, or the step sizes `steps`."""
    target_logits, rest_lse, bases = target_logits.float(), rest_lse.float(), bases.float()
    ref_high, ref_mean = ref_high.float(), ref_mean.float()
    reference = None  # the nouns' unedited spread, concentration's yardstick
    if concentration > 0:
        unedited = target_probs(target_logits[..., :n_nouns], rest_lse, torch.zeros_like(target_logits[..., :n_nouns]))
        reference = spread(unedited, hw)
    terms = BoundTerms(ref_high, ref_mean, pairs, n_nouns, binding, loss, concentration, reference, hw)
    def loss_and_grad(w: torch.Tensor):
        w = w.clone().requires_grad_(True)
        with torch.enable_grad():
            value = bound_loss(target_logits, rest_lse, bases, w, terms)
            (grad,) = torch.autograd.grad(value.sum(), w)
        return value.detach(), grad

    return descend_rows(loss_and_grad, init_weights, iterations, lr, steps)

