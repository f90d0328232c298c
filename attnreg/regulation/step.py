"""One edited layer call (Alg. 1) on the rows of one group of images that share their targets: the neglect
test, the solve, the smoothing over steps, the offsets added to the target logits and the softmax again."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .binding import binding_loss, optimise_rows_bound
from .maps import offsets_from_weights, quantile_along_pixels, smoothed_weights
from .paper import optimise_offsets
from .relative import optimise_rows, reference_levels, step_sizes


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


def takes_binding_solver(pairs, config) -> bool:
    """Whether a group's solve takes `optimise_rows_bound` (modifier pairs with binding on); that solver is
    never compiled. Concentration is one of its terms and does not send a group to it: groups without
    modifiers keep `optimise_rows`."""
    return bool(pairs and config.binding > 0)


def solve_weights(target_logits, rest_lse, bases, init, unedited, heads: int, n_nouns: int, pairs, config, hw=None):
    """The bump weights for one group (a SolverResult): the release's solver for the `paper` loss; for the
    relative loss the binding solver on groups with modifiers, else `optimise_rows`. `config` is a
    RegulationConfig."""
    if config.loss != "relative":
        return optimise_offsets(
            target_logits, rest_lse, bases, init, config.iterations, config.lr, config.loss_weights,
            images=target_logits.shape[0] // heads,
        )
    ref_high, ref_mean = reference_levels(unedited[..., :n_nouns], config.quantile)
    if takes_binding_solver(pairs, config):
        return optimise_rows_bound(
            target_logits, rest_lse, bases, init, ref_high, ref_mean, pairs, n_nouns, config.binding,
            config.iterations, config.lr, config.loss_weights, config.concentration, hw,
        )
    return optimise_rows(
        target_logits, rest_lse, bases, init, ref_high, ref_mean, step_sizes(config.iterations, config.lr),
        config.loss_weights,
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
    if edit is None or takes_binding_solver(pairs, config) or words is not None:
        edit = functools.partial(edit_group, hw=hw, words=words)  # only the plain relative solver is compiled
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
    floor = config.text_floor
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
