"""The math against hand-computed cases: bases, loss, solver, smoothing."""

import math

import numpy as np
import pytest
import torch
from oracles import regulation_loss

from attnreg.regulation import (
    LossWeights,
    gaussian_bases,
    offsets_from_weights,
    optimise_offsets,
    floor_offset,
    renormalised,
    rest_logsumexp,
    smoothed_weights,
    target_probs,
    target_share,
)


@pytest.mark.parametrize("width, sigma, centres", [(16, 1.0, [2, 4, 6, 8, 10, 12, 14]), (64, 4.0, [8, 16, 24, 32, 40, 48, 56]), (8, 1.0, [1, 2, 3, 4, 5, 6, 7])])
def test_bases_match_release_grid(width, sigma, centres):
    g = gaussian_bases(width).reshape(7, 7, width, width)
    assert g.shape == (7, 7, width, width)
    for i, cy in enumerate(centres):
        for j, cx in enumerate(centres):
            assert g[i, j, cy, cx].item() == pytest.approx(1.0)  # unit peak at the centre
    # one pixel away from a centre: exp(-1 / (2 sigma^2))
    assert g[0, 0, centres[0] + 1, centres[0]].item() == pytest.approx(math.exp(-1 / (2 * sigma**2)), rel=1e-5)
    assert g.max().item() == pytest.approx(1.0)


def test_bases_non_square_span_the_map():
    g = gaussian_bases(16, 32).reshape(7, 7, 16, 32)
    assert g[3, 3, 8, 16].item() == pytest.approx(1.0)  # central bump at the map's centre
    assert g[0, 6, 2, 28].item() == pytest.approx(1.0)


def test_target_probs_equal_full_softmax():
    torch.manual_seed(0)
    s = torch.randn(3, 10, 77)
    t = torch.tensor([2, 5])
    keep = torch.ones(77, dtype=torch.bool)
    keep[t] = False
    delta = torch.randn(3, 10, 2)
    full = s.clone()
    full[..., t] += delta
    expected = full.softmax(-1)[..., t]
    got = target_probs(s[..., t], torch.logsumexp(s[..., keep], -1, keepdim=True), delta)
    torch.testing.assert_close(got, expected)


def test_target_probs_in_text_units_are_shares_of_the_word_columns():
    """With a word mask the solver's maps are the targets' shares of the word columns only, edited or not;
    the other columns (SOS, padding, image keys) drop out of the loss."""
    torch.manual_seed(0)
    s = torch.randn(2, 10, 40) * 3
    t = torch.tensor([3, 5])
    words = torch.zeros(2, 40, dtype=torch.bool)
    words[0, 1:7], words[1, 1:9] = True, True  # each row its own prompt length
    delta = torch.randn(2, 10, 2)
    edited = s.clone()
    edited[..., t] += delta
    p = edited.softmax(-1)
    expected = p[..., t] / (p * words[:, None]).sum(-1, keepdim=True)
    got = target_probs(s[..., t], rest_logsumexp(s, t, words), delta)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(renormalised(p, t, words), expected)
    assert not torch.allclose(renormalised(p, t, None), expected)  # the whole row is another unit
    only_targets = torch.zeros(2, 40, dtype=torch.bool)
    only_targets[:, t] = True  # nothing else to compete with: each pixel's shares sum to 1
    torch.testing.assert_close(target_probs(s[..., t], rest_logsumexp(s, t, only_targets), delta).sum(-1),
                               torch.ones(2, 10))


def test_the_floor_lifts_a_small_target_share_to_about_the_floor_and_leaves_a_large_one():
    torch.manual_seed(0)
    s = torch.randn(3, 16, 60)
    t = torch.tensor([4, 9])
    s[0, :, t] -= 6  # the targets hold about 0.1 % of row 0
    s[2, :, t] += 8  # and most of row 2
    lift = floor_offset(s, t, 0.05)
    lifted = s.clone()
    lifted[..., t] += lift
    share = lifted.softmax(-1)[..., t].sum(-1).mean(-1)
    assert lift.shape == (3, 1, 1) and lift[0] > 3 and lift[2] == 0
    assert 0.04 < share[0] <= 0.05 and share[1] >= 0.04  # about the floor: exact only for a vanishing share
    torch.testing.assert_close(floor_offset(s, t, 0.05, torch.tensor([False, True, True]))[0], torch.zeros(1, 1))


def test_loss_on_a_made_up_map():
    # one (image, head), 10 pixels, 2 targets
    p = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], [0.05] * 10]).T[None]
    w = torch.full((1, 49, 2), 0.5)
    q = np.quantile(p[0].numpy(), 0.9, axis=0)  # linear interpolation: 0.81, 0.05
    assert q[0] == pytest.approx(0.81)
    high = ((q - 0.9) ** 2).mean()
    prop = (((p[0].mean(0).numpy()) - 0.2) ** 2).mean()  # tau / n = min(1, 0.4) / 2 = 0.2
    expected = 1.0 * high + 80 * prop + 0.09 * 0.25
    assert regulation_loss(p, w).item() == pytest.approx(expected, rel=1e-5)
    # each term alone, through the weights
    assert regulation_loss(p, w, LossWeights(gamma=0, delta=0, epsilon=1)).item() == pytest.approx(0.25)


def test_target_share():
    assert target_share(1) == pytest.approx(0.2)
    assert target_share(2) == pytest.approx(0.2)
    assert target_share(5) == pytest.approx(0.2)
    assert target_share(8) == pytest.approx(1 / 8)  # tau capped at 1


def test_solver_lowers_loss_and_raises_target_attention():
    torch.manual_seed(0)
    pixels, bases = 16 * 16, gaussian_bases(16)
    s = torch.randn(4, pixels, 77) * 0.5
    s[..., 5] += 3.0  # a dominant non-target token ("elephant")
    t = torch.tensor([2, 7])  # neglected targets
    keep = torch.ones(77, dtype=torch.bool)
    keep[t] = False
    tl, lse = s[..., t], torch.logsumexp(s[..., keep], -1, keepdim=True)
    init = torch.rand(4, 49, 2, generator=torch.Generator().manual_seed(0))
    result = optimise_offsets(tl, lse, bases, init)
    assert result.loss.item() < 0.5 * result.initial_loss.item()
    before = target_probs(tl, lse, torch.zeros_like(tl))
    after = target_probs(tl, lse, offsets_from_weights(result.weights, bases))
    assert after.mean() > 5 * before.mean()
    assert torch.quantile(after, 0.9, dim=1).mean() > torch.quantile(before, 0.9, dim=1).mean()
    # the kept iterate is the best one seen: its loss is reproduced by recomputing it
    recomputed = regulation_loss(after, result.weights)
    assert recomputed.item() == pytest.approx(result.loss.item(), rel=1e-4)


def test_solver_keeps_initial_weights_when_steps_only_hurt():
    # a huge step size diverges; the best iterate is then the first one
    torch.manual_seed(1)
    s = torch.randn(2, 64, 77)
    t = torch.tensor([1])
    keep = torch.ones(77, dtype=torch.bool)
    keep[t] = False
    init = torch.rand(2, 49, 1)
    result = optimise_offsets(s[..., t], torch.logsumexp(s[..., keep], -1, keepdim=True), gaussian_bases(8), init, iterations=5, lr=1e7)
    assert torch.equal(result.weights, init) and result.loss.item() == result.initial_loss.item()


def test_smoothing_is_a_two_tap_blend_with_decay():
    prev, best = torch.ones(1, 49, 1), torch.full((1, 49, 1), 3.0)
    out = smoothed_weights(prev, best, step=2)
    assert out[0, 0, 0].item() == pytest.approx(0.99**2 * (0.25 * 1 + 0.75 * 3))


@pytest.mark.parametrize("width, n", [(16, 2), (8, 1), (64, 3)])
def test_closed_form_gradient_matches_autograd(width, n):
    from attnreg.regulation import loss_and_grad, quantile_along_pixels

    torch.manual_seed(width + n)
    s = torch.randn(3, width * width, 77, dtype=torch.float64)
    t = torch.arange(1, n + 1)
    keep = torch.ones(77, dtype=torch.bool)
    keep[t] = False
    tl, lse = s[..., t], torch.logsumexp(s[..., keep], -1, keepdim=True)
    bases = gaussian_bases(width, dtype=torch.float64)
    w = torch.rand(3, 49, n, dtype=torch.float64, requires_grad=True)
    expected = regulation_loss(target_probs(tl, lse, offsets_from_weights(w, bases)), w)
    (expected_grad,) = torch.autograd.grad(expected, w)
    value, grad = loss_and_grad(tl, lse, bases, w.detach(), LossWeights())
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(grad, expected_grad)
    p = torch.rand(4, width * width, n)
    torch.testing.assert_close(quantile_along_pixels(p, 0.9)[0], torch.quantile(p, 0.9, dim=1))
