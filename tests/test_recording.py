"""AttentionRecorder on the tiny SD pipeline: shapes, the memory bound, no effect on the image, and
the explicit attention path only where something is recorded."""

import numpy as np
import pytest
import torch

from attnreg import AttentionRegulator, RegulationConfig
from attnreg.processor import RegulatedAttnProcessor
from attnreg.recording import AttentionRecorder
from attnreg.geometry import cross_attention_layers
from attnreg.testing import tiny_sd_pipeline

PROMPT = "a cat and a dog"  # tokens: 0 SOS, 1 a, 2 cat, 3 and, 4 a, 5 dog, 6 EOS
STEPS = 4
CALL = dict(num_inference_steps=STEPS, guidance_scale=7.5, output_type="np")


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def gen():
    return torch.Generator("cpu").manual_seed(0)


def recorded(reg, recorder, targets=None, vanilla=False, **extra):
    with recorder.attached(reg):
        if vanilla:
            return reg.run(PROMPT, None, generator=gen(), **CALL, **extra).images
        return reg(PROMPT, targets=targets, generator=gen(), **CALL, **extra).images


def test_shapes_statistics_and_memory_bound(pipe):
    reg = AttentionRegulator(pipe)
    rec = AttentionRecorder(steps=[0, 3], tokens=[2, 5], resolution=8, stats_steps="all", values_steps=[1])
    recorded(reg, rec, vanilla=True, num_images_per_prompt=2)
    assert sorted(rec.maps) == [0, 3]
    assert rec.map(0).shape == (2, 2, 8, 8) and rec.map(0).dtype == torch.float32
    assert rec.map(0).device.type == "cpu"
    assert sorted(rec.stats) == [0, 1, 2, 3] and sorted(rec.values) == [1]
    assert rec.values[1].shape == (2, 2, 64)
    steps, peak = rec.statistic("max")
    assert steps == [0, 1, 2, 3] and peak.shape == (4, 2, 2)
    # the statistics are those of the stored maps
    m = rec.map(3).flatten(2)
    torch.testing.assert_close(rec.stats[3]["mean"], m.mean(-1))
    torch.testing.assert_close(rec.stats[3]["max"], m.amax(-1))
    torch.testing.assert_close(rec.stats[3]["p90"], torch.quantile(m, 0.9, dim=-1))
    assert (rec.stats[3]["p90"] <= rec.stats[3]["max"]).all()
    # probabilities: between 0 and 1
    assert 0 <= float(m.min()) and float(m.max()) <= 1
    # memory: exactly what was asked for, steps x tokens x R^2 x images (+ stats and values)
    expected = 4 * 2 * 2 * (2 * 64 + 1 * 64 + 3 * STEPS)
    assert rec.nbytes() == expected == rec.bound(n_images=2, n_steps_total=STEPS)
    # every cross-attention layer was averaged into each step
    assert sorted(rec.recorded_layers[0]) == sorted(cross_attention_layers(pipe.unet))


def test_all_tokens_and_layer_average(pipe):
    """Maps sum to (at most) one over tokens, and averaging one layer at a time gives the same mean."""
    reg = AttentionRegulator(pipe)
    layers = cross_attention_layers(pipe.unet)
    rec = AttentionRecorder(steps=[1], resolution=16)
    recorded(reg, rec, vanilla=True)
    total = rec.map(1).sum(1)  # over all 77 tokens
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-4, rtol=0)
    pair = AttentionRecorder(layers=layers[:2], steps=[1], resolution=16)
    singles = [AttentionRecorder(layers=[layer], steps=[1], resolution=16) for layer in layers[:2]]
    with reg.observing(*singles):  # several observers at once
        recorded(reg, pair, vanilla=True)
    torch.testing.assert_close(pair.map(1), torch.stack([one.map(1) for one in singles]).mean(0))


def test_vanilla_recording_does_not_change_the_image(pipe):
    plain = pipe(PROMPT, generator=gen(), **CALL).images
    reg = AttentionRegulator(pipe)
    rec = AttentionRecorder(steps=range(STEPS), stats_steps="all", values_steps=[0])
    images = recorded(reg, rec, vanilla=True)
    assert np.array_equal(plain, images)
    assert len(rec.maps) == STEPS


def test_regulated_recording_does_not_change_the_image(pipe):
    reg = AttentionRegulator(pipe, RegulationConfig.paper(iterations=3))
    unrecorded = reg(PROMPT, targets=["cat", "dog"], generator=gen(), **CALL).images
    # record every layer (edited and not) at every step, also past the edited steps
    rec = AttentionRecorder(steps=range(STEPS), tokens=[2, 5], stats_steps="all")
    images = recorded(reg, rec, targets=["cat", "dog"])
    assert np.array_equal(unrecorded, images)
    # the regulated run's recorded maps differ from the vanilla ones at an edited step
    van = AttentionRecorder(steps=[0], tokens=[2, 5])
    recorded(reg, van, vanilla=True)
    assert not torch.allclose(van.map(0), rec.map(0))


def test_explicit_path_only_for_recorded_layers_and_steps(pipe, monkeypatch):
    calls = []
    explicit = RegulatedAttnProcessor._explicit

    def counting(self, *args, **kwargs):
        calls.append((self.name, self.state.step))
        return explicit(self, *args, **kwargs)

    monkeypatch.setattr(RegulatedAttnProcessor, "_explicit", counting)
    reg = AttentionRegulator(pipe)
    layers = cross_attention_layers(pipe.unet)
    wanted_layer = layers[1]
    rec = AttentionRecorder(layers=[wanted_layer], steps=[2])
    recorded(reg, rec, vanilla=True)
    assert calls == [(wanted_layer, 2)]  # one layer, one step, one call

    # a block prefix records every layer of that block; stats steps count as recorded steps
    calls.clear()
    block = ".".join(layers[0].split(".")[:2])
    rec = AttentionRecorder(layers=[block], steps=[], stats_steps=[0, 3])
    recorded(reg, rec, vanilla=True)
    in_block = [x for x in layers if x.startswith(block + ".")]
    assert sorted(calls) == sorted((x, s) for x in in_block for s in (0, 3))

    # a regulated run: the edited layers at the edited steps, plus only what is recorded
    calls.clear()
    reg = AttentionRegulator(pipe, RegulationConfig.paper(iterations=2, edit_steps=1, layers=(layers[0],)))
    rec = AttentionRecorder(layers=[layers[-1]], steps=[3])
    recorded(reg, rec, targets=["cat"])
    assert sorted(calls) == sorted([(layers[0], 0), (layers[-1], 3)])


def test_attached_detaches_on_error(pipe):
    reg = AttentionRegulator(pipe)
    rec = AttentionRecorder(steps=[0])
    with pytest.raises(ValueError):
        with rec.attached(reg):
            reg("a cat", targets=["zebra"], **CALL)
    assert reg.state.observers == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="tokens"):
        AttentionRecorder(tokens=[-1])
    with pytest.raises(ValueError, match="resolution"):
        AttentionRecorder(resolution=0)
    with pytest.raises(ValueError, match="stats_steps"):
        AttentionRecorder(stats_steps="some")
    with pytest.raises(ValueError, match="steps"):
        AttentionRecorder(steps=[-1])
    with pytest.raises(ValueError, match="layers"):
        AttentionRecorder(layers=[])
    with pytest.raises(KeyError, match="no map"):
        AttentionRecorder(steps=[0]).map(0)
