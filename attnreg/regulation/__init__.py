"""Attention Regulation as plain tensor functions (Zhang et al., ECCV 2024, Sec. 4); nothing here knows about
diffusers.

  maps      the Gaussian bumps, offsets, the targets' softmax, quantiles, the shared descent loop
  paper     the release's loss and solver (the `paper` preset)
  relative  the default loss (levels relative to the dominant target) and its solver
  binding   the default's terms for modifiers (binding, concentration) and their solver
  step      one edited layer call: neglect test, solve, smoothing, offsets, softmax

Shapes use the paper's notation:
  B  = (image, head) pairs of the conditional half of the guidance batch,
  P  = pixels of one cross-attention map (H * W),
  J  = prompt tokens (77 for CLIP), T = target token indices, n = len(T),
  K  = Gaussian bumps (49 = 7 x 7 in the paper).
"""

from .binding import BoundTerms, binding_loss, bound_loss_and_grad, optimise_rows_bound, spread
from .maps import (SolverResult, bump_sigma, gaussian_bases, offsets_from_weights, quantile_along_pixels,
                   smoothed_weights, target_probs)
from .paper import LossWeights, loss_and_grad, optimise_offsets, target_share
from .relative import FAST_STEP_SHARES, RelativeLoss, optimise_rows, reference_levels, step_sizes
from .step import (RegulatedStep, edit_group, floor_offset, images_to_edit, leaking, neglected, regulate_step,
                   renormalised, rest_logsumexp, solve_weights, takes_binding_solver)

__all__ = [
    "BoundTerms", "FAST_STEP_SHARES", "LossWeights", "RegulatedStep", "RelativeLoss", "SolverResult", "binding_loss",
    "bound_loss_and_grad", "bump_sigma", "edit_group", "floor_offset", "gaussian_bases",
    "images_to_edit", "leaking", "loss_and_grad", "neglected", "offsets_from_weights", "optimise_offsets",
    "optimise_rows", "optimise_rows_bound", "quantile_along_pixels", "reference_levels", "regulate_step",
    "renormalised", "rest_logsumexp", "smoothed_weights", "solve_weights", "spread", "step_sizes",
    "takes_binding_solver", "target_probs", "target_share",
]
