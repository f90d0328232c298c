"""The relative loss's solvers against their oracles (the plain unit-step solver, autograd through the readable
losses), the conditional-only layer call against the explicit one, and calls that change shape between them."""

import numpy as np
import pytest
import torch
from oracles import autograd_rows_bound, exact_optimise_rows

from attnreg import AttentionRegulator, RegulationConfig
from attnreg.config import ConfigError
from attnreg.recording import AttentionRecorder
from attnreg.regulation import (
    gaussian_bases, optimise_rows, reference_levels, solve_weights, step_sizes, target_probs,
)
from attnreg.testing import tiny_sd_pipeline

STEPS = 6
LAYERS = ("down_blocks.1", "up_blocks.0")  # the tiny UNet's cross-attention blocks: no calibration run
DEFAULT = RegulationConfig()
LOSS = DEFAULT.loss_weights


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def neglect_problem(h=8, w=8, b=4, n=2, seed=0):
    """Logits where target 0 dominates and the others are weak, with the default's references."""
    torch.manual_seed(seed)
    p = h * w
    logits = torch.randn(b, p, n) - 2
    logits[..., 0] += 2 + torch.randn(b, p)  # the dominant target
    rest = torch.randn(b, p, 1) + 4
    unedited = target_probs(logits, rest, torch.zeros(b, p, n))
    ref_high, ref_mean = reference_levels(unedited, LOSS.quantile)
    return logits, rest, gaussian_bases(h, w), ref_high, ref_mean


@pytest.mark.parametrize("hw,n", [((8, 8), 2), ((16, 16), 3), ((1, 11), 2)], ids=["8x8", "16x16", "frac0"])
def test_solver_with_unit_steps_is_the_plain_descent(hw, n):
    # Same steps, same loss and gradient, fewer operations: equal up to float rounding. (1, 11): the
    # quantile falls exactly on a pixel, the one-order-statistic branch.
    logits, rest, bases, ref_high, ref_mean = neglect_problem(*hw, n=n)
    init = torch.zeros(logits.shape[0], bases.shape[0], n)
    plain = exact_optimise_rows(logits, rest, bases, init, ref_high, ref_mean, 20, 1.0, LOSS)
    ours = optimise_rows(logits, rest, bases, init, ref_high, ref_mean, (1.0,) * 20, LOSS)
    assert plain.loss.max() < 0.5 * plain.initial_loss.min()  # the problem is not trivial
    torch.testing.assert_close(ours.weights, plain.weights, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.loss, plain.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.initial_loss, plain.initial_loss)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_schedule_reaches_the_plain_descents_end_point(seed):
    # 10 growing steps to the flow time of 20 unit steps: the same weights within 5 % and no worse a loss.
    logits, rest, bases, ref_high, ref_mean = neglect_problem(seed=seed)
    init = torch.zeros(logits.shape[0], bases.shape[0], 2)
    plain = exact_optimise_rows(logits, rest, bases, init, ref_high, ref_mean, 20, 1.0, LOSS)
    ours = optimise_rows(logits, rest, bases, init, ref_high, ref_mean, step_sizes(20, 1.0), LOSS)
    assert ((ours.weights - plain.weights).norm() / plain.weights.norm()) < 0.05
    assert (ours.loss <= plain.loss * 1.1 + 1e-4).all()


def test_step_sizes_keep_the_flow_time():
    steps = step_sizes(20, 1.0)
    assert len(steps) == 10 and sum(steps) == pytest.approx(20.0) and list(steps) == sorted(steps)
    assert sum(step_sizes(40, 0.5)) == pytest.approx(20.0)
    assert step_sizes(5, 2.0) == (2.0,) * 5  # no more steps than the schedule's: the unit ones


@pytest.mark.parametrize("seed", [0, 1])
def test_binding_groups_take_the_binding_solver_equal_to_autograd(seed):
    logits, rest, bases, ref_high, ref_mean = neglect_problem(seed=seed, n=3)  # columns: noun, noun, modifier
    init = torch.zeros(logits.shape[0], bases.shape[0], 3)
    oracle = autograd_rows_bound(logits, rest, bases, init, ref_high[..., :2], ref_mean[..., :2], ((2, 1),), 2,
                                 DEFAULT.binding, 20, 1.0, LOSS, concentration=DEFAULT.concentration, hw=(8, 8))
    assert oracle.loss.max() < 0.7 * oracle.initial_loss.min()  # the problem is not trivial
    unedited = target_probs(logits, rest, torch.zeros_like(logits))
    ours = solve_weights(logits, rest, bases, init, unedited, 1, 2, ((2, 1),), DEFAULT, hw=(8, 8))
    torch.testing.assert_close(ours.weights, oracle.weights, rtol=1e-4, atol=1e-4)
    # without pairs the same group takes the scheduled solver, which lands elsewhere
    plain = solve_weights(logits, rest, bases, init, unedited, 1, 2, (), DEFAULT, hw=(8, 8))
    assert not torch.allclose(plain.weights, ours.weights, atol=1e-3)


@pytest.mark.parametrize("option", ["fast", "closed_form", "fast_binding", "separation"])
def test_removed_solver_options_say_what_replaces_them(option):
    with pytest.raises(ConfigError, match=f"option {option} was removed: "):
        RegulationConfig.from_preset("auto", **{option: False})


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


def run(reg, prompt="a cat and a dog", targets=("cat", "dog"), **kw):
    kw = {"num_inference_steps": STEPS, "output_type": "np", "generator": gen(), **kw}
    return reg(prompt, targets=list(targets), **kw).images


def regulator(pipe, **overrides):
    # neglect_ratio 1 and lift 4: every call is edited, hard enough that the image must move (see test_auto)
    return AttentionRegulator(pipe, RegulationConfig(layers=LAYERS, neglect_ratio=1.0, lift=4.0, **overrides))


def test_conditional_only_layer_call_equals_the_explicit_one(sd):
    # With an observer the processor computes the whole guidance batch explicitly (the recorder needs both
    # halves); without, the relative loss's path sends the unconditional half through the layer's own SDPA. Same
    # solver on both sides, so only the layer call's numerics differ.
    reg = regulator(sd)
    recorder = AttentionRecorder(layers=None, steps=range(STEPS))  # every layer call has an observer
    with reg.observing(recorder):
        explicit = run(reg)
    assert recorder.maps  # the explicit path really ran
    assert np.abs(run(reg) - explicit).max() < 1e-4


@pytest.mark.parametrize("binding", [2.0, 0.0], ids=["default", "no-binding"])
def test_calls_of_other_sizes_batches_and_targets_do_not_leak_into_each_other(sd, binding):
    # One regulator, calls of other image sizes, batch sizes and target counts in a row: each gives what a
    # fresh regulator gives for it alone (nothing of one call's solver state reaches the next).
    calls = [
        dict(),
        dict(height=96, width=96),
        dict(prompt="a cat, a dog and a bird", targets=("cat", "dog", "bird")),
        dict(num_images_per_prompt=2, seeds=(0, 1)),
        dict(prompt="a red cat and a dog", targets=("cat", "dog")),
        dict(targets=("dog",)),
        dict(),
    ]
    shared = regulator(sd, binding=binding)
    for kw in calls:
        seeds = kw.pop("seeds", (0,))
        again = run(shared, **kw, generator=[gen(s) for s in seeds])
        alone = run(regulator(sd, binding=binding), **kw, generator=[gen(s) for s in seeds])
        assert again.shape == alone.shape and np.array_equal(again, alone)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_has_no_nan(dtype):
    pipe = tiny_sd_pipeline().to(dtype=dtype)
    out = run(regulator(pipe), num_inference_steps=3)
    assert np.isfinite(out).all()
    plain = pipe("a cat and a dog", num_inference_steps=3, output_type="np", generator=gen()).images
    assert np.abs(out - plain).max() > 1e-3  # regulation acted: a no-op would pass the NaN check too
