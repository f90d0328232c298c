"""The fast solver through torch.compile (RegulationConfig.compile, attnreg/compiled.py): the same results as
eager, calls that change shape, a compiler that fails, and "off"/"auto" on CPU never compiling.

Compiling takes 10-75 s per shape on the 2-core CPU here, so the tests that compile are marked slow."""

import warnings

import numpy as np
import pytest
import torch

from attnreg import AttentionRegulator, RegulationConfig, compiled
from attnreg.config import ConfigError
from attnreg.regulation import fast_optimise_rows, fast_step_sizes, gaussian_bases, reference_levels, RelativeLoss
from attnreg.testing import tiny_sd_pipeline

LOSS = RelativeLoss(1.0, 1.0, 0.01, 0.9, 2.0)
LAYERS = ("down_blocks.1", "up_blocks.0")


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    compiled.reset()
    yield
    torch._dynamo.reset()
    compiled.reset()


def problem(side=8, rows=4, n=2, seed=0):
    torch.manual_seed(seed)
    logits = torch.randn(rows, side * side, n) - 2
    logits[..., 0] += 2 + torch.randn(rows, side * side)
    rest = torch.randn(rows, side * side, 1) + 4
    probs = torch.softmax(torch.cat([logits, rest], dim=-1), dim=-1)[..., :n]
    ref_high, ref_mean = reference_levels(probs, LOSS.quantile)
    bases = gaussian_bases(side, side)
    init = torch.zeros(rows, bases.shape[0], n)
    return logits, rest, bases, init, ref_high, ref_mean, fast_step_sizes(20, 1.0), LOSS


def test_compile_choice_is_validated_and_kept_out_of_old_hashes():
    with pytest.raises(ConfigError, match="compile='fast' is not one of auto, on, off"):
        RegulationConfig.from_preset("auto", compile="fast")
    assert "compile" not in RegulationConfig.from_preset("auto").to_dict()
    assert RegulationConfig.from_preset("auto", compile="off").to_dict()["compile"] == "off"
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
    # One compiled solver, problems of other map sizes, row counts and target counts in turn: each equals
    # the eager solver on the same problem (recompiled or reused, never stale).
    for side, rows, n in [(8, 4, 2), (8, 8, 2), (16, 4, 3), (8, 4, 3), (8, 4, 2)]:
        args = problem(side, rows, n)
        eager = fast_optimise_rows(*args)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback warning: it really compiled
            fast = compiled.fast_solve("on", *args)
        torch.testing.assert_close(fast.weights, eager.weights, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.loss, eager.loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast.initial_loss, eager.initial_loss)
    assert "default" in compiled._compiled and not compiled._failed


@pytest.mark.slow
def test_a_compiler_that_fails_falls_back_to_eager_with_one_warning():
    # A C++ compiler that does not exist: inductor cannot build its kernels. The caches are off so that a
    # kernel built by another test cannot hide the failure.
    import torch._inductor.config as inductor

    args = problem()
    eager = fast_optimise_rows(*args)
    with inductor.patch({"cpp.cxx": ("/nonexistent/attnreg-cc",), "force_disable_caches": True}):
        with pytest.warns(RuntimeWarning, match="torch.compile of the solver failed.*eager solver") as caught:
            first = compiled.fast_solve("on", *args)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # only the first failure warns
            second = compiled.fast_solve("on", *problem(8, 8, 3))
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert compiled._failed
    torch.testing.assert_close(first.weights, eager.weights)
    torch.testing.assert_close(second.weights, fast_optimise_rows(*problem(8, 8, 3)).weights)


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
