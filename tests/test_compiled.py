"""The relative loss's solver through torch.compile (RegulationConfig.compile, attnreg/compiled.py): the same results as
eager, calls that change shape, a compiler that fails, and "off"/"auto" on CPU never compiling.

Compiling takes 10-75 s per shape on the 2-core CPU here, so the tests that compile are marked slow."""

import warnings

import numpy as np
import pytest
import torch

from attnreg import AttentionRegulator, RegulationConfig, compiled
from attnreg.config import ConfigError
from attnreg.regulation import edit_group, gaussian_bases
from attnreg.testing import tiny_sd_pipeline

LOSS = RegulationConfig().loss_weights  # the default's
LAYERS = ("down_blocks.1", "up_blocks.0")


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    compiled.reset()
    yield
    torch._dynamo.reset()
    compiled.reset()


def problem(side=8, images=2, n=2, heads=2, every=True, seed=0):
    """`edit_group`'s arguments for a group where target 0 dominates (the auto preset's case): scores and
    probs (images x heads, P, 12 columns), targets at columns 2, 5(, 7), the first step (previous = init);
    `every`: all images edited, else the first one only."""
    torch.manual_seed(seed)
    rows, columns = images * heads, 12
    t = torch.tensor([2, 5, 7][:n])
    scores = torch.randn(rows, side * side, columns)
    scores[..., t] -= 2
    scores[..., t[0]] += 4 + torch.randn(rows, side * side)
    probs = scores.softmax(dim=-1)
    bases = gaussian_bases(side, side)
    init = torch.zeros(rows, bases.shape[0], n)
    edit_rows = None if every else (torch.arange(images) == 0).repeat_interleave(heads)
    eos = torch.full((rows,), columns - 1)
    return (scores, probs, probs[..., t], t, bases, init, init, torch.tensor(0.99**3), edit_rows, eos,
            RegulationConfig.from_preset("auto", compile="on"), heads, n, ())


def test_compile_choice_is_validated_and_leaves_the_method_as_it_is():
    with pytest.raises(ConfigError, match="compile='fast' is not one of auto, on, off"):
        RegulationConfig.from_preset("auto", compile="fast")
    assert RegulationConfig(compile="off").preset == "auto"  # a runtime choice: the same method
    assert compiled.wanted("auto", torch.device("cuda")) and not compiled.wanted("auto", torch.device("cpu"))
    assert compiled.wanted("on", torch.device("cpu")) and not compiled.wanted("off", torch.device("cuda"))


@pytest.mark.parametrize("choice", ["off", "auto"])
def test_off_and_auto_on_cpu_run_eager(choice):
    # Nothing is compiled: a regulated call on CPU with "off" or "auto" makes no compiled solver at all.
    pipe = tiny_sd_pipeline()
    reg = AttentionRegulator(pipe, RegulationConfig.from_preset("auto", layers=LAYERS, neglect_ratio=1.0,
                                                                compile=choice))
    reg("a cat and a dog", targets=["cat", "dog"], num_inference_steps=2, output_type="np")
    assert reg.state.stats and compiled._compiled == {}  # the solver ran, eager


@pytest.mark.slow
def test_compiled_solver_equals_eager_across_shapes():
    # One compiled edit, groups of other map sizes, image counts, target counts and a partly edited group
    # in turn: each equals the eager edit on the same group (recompiled or reused, never stale).
    for side, images, n, every in [(8, 2, 2, True), (8, 4, 2, True), (16, 2, 3, True), (8, 2, 3, False),
                                   (8, 2, 2, True)]:
        args = problem(side, images, n, every=every)
        eager = edit_group(*args)
        assert eager.loss.max() < 0.5 * eager.initial_loss.min()  # the solver had work to do
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback warning: it really compiled
            fast = compiled.compiled_edit("on", *args)
        torch.testing.assert_close(fast.weights, eager.weights, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.probs, eager.probs, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast.loss, eager.loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast.initial_loss, eager.initial_loss)
        if not every:  # the image the neglect test left alone keeps its probabilities exactly
            assert torch.equal(fast.probs[args[8].logical_not()], args[1][args[8].logical_not()])
    assert "default" in compiled._compiled and not compiled._failed


@pytest.mark.slow
def test_a_compiler_that_fails_falls_back_to_eager_with_one_warning():
    # A C++ compiler that does not exist: inductor cannot build its kernels. The caches are off so that a
    # kernel built by another test cannot hide the failure.
    import torch._inductor.config as inductor

    args = problem()
    eager = edit_group(*args)
    with inductor.patch({"cpp.cxx": ("/nonexistent/attnreg-cc",), "force_disable_caches": True}):
        with pytest.warns(RuntimeWarning, match="torch.compile of the solver failed.*eager solver") as caught:
            first = compiled.compiled_edit("on", *args)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # only the first failure warns
            second = compiled.compiled_edit("on", *problem(8, 4, 3))
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert compiled._failed
    torch.testing.assert_close(first.probs, eager.probs)
    torch.testing.assert_close(second.weights, edit_group(*problem(8, 4, 3)).weights)


@pytest.mark.slow
def test_a_compiled_regulated_pipeline_gives_the_eager_images():
    pipe = tiny_sd_pipeline()

    def images(choice):
        reg = AttentionRegulator(pipe, RegulationConfig.from_preset("auto", layers=LAYERS, neglect_ratio=1.0,
                                                                    lift=4.0, compile=choice))
        gen = torch.Generator("cpu").manual_seed(0)
        return reg("a cat and a dog", targets=["cat", "dog"], num_inference_steps=4, output_type="np",
                   generator=gen).images

    eager, on = images("off"), images("on")
    assert compiled._compiled and not compiled._failed
    assert np.abs(on - eager).max() < 1e-4
