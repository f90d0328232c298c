"""TACA (image x text logits scaled in the first steps) on the tiny SD3 and FLUX pipelines."""

import math

import numpy as np
import pytest
import torch

from attnreg.regulator import UnsupportedPipelineError
from attnreg.taca import TacaSchedule, TextAttentionScaling, TextScaledProcessor
from attnreg.testing.mmdit import tiny_flux_pipeline, tiny_sd3_pipeline

CALL = dict(num_inference_steps=3, height=64, width=64, max_sequence_length=32, output_type="np")


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request):
    return tiny_sd3_pipeline() if request.param == "sd3" else tiny_flux_pipeline()


def run(fn, prompt="a red circle and a blue square", **kw):
    return fn(prompt, generator=torch.Generator("cpu").manual_seed(0), **{**CALL, **kw}).images


def reference(q, k, v, n_image_first: bool, n_text: int, gamma: float):
    """Softmax attention over (B, H, S, D) with the image-query x text-key logits multiplied by gamma."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = q.shape[2]
    text = torch.zeros(s, dtype=torch.bool)
    if n_image_first:
        text[s - n_text:] = True
    else:
        text[:n_text] = True
    scale = torch.ones(s, s)
    scale[~text[:, None] & text[None, :]] = gamma  # image rows, text columns
    return (logits * scale).softmax(-1) @ v


def test_the_processor_scales_exactly_the_image_query_text_key_logits(pipe):
    from attnreg.joint import JointRegulatedProcessor, flux_streams, sd3_streams, joint_attention_layers, joint_family

    family = joint_family(pipe)
    name = joint_attention_layers(pipe.transformer)[0]
    attn = pipe.transformer.get_submodule(name)
    torch.manual_seed(0)
    dim = attn.to_q.in_features
    hidden, context = torch.randn(2, 16, dim), torch.randn(2, 7, attn.add_k_proj.in_features)
    schedule = TacaSchedule(1.5, 1)
    schedule.step = 0
    rotary = None
    if family == "flux":
        ids = torch.cat([torch.zeros(7, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0),
                                                                        torch.arange(4.0), indexing="ij"), -1).reshape(-1, 3)])
        rotary = pipe.transformer.pos_embed(ids)
    got = TextScaledProcessor(attn.processor, family, schedule)(attn, hidden, context, None, image_rotary_emb=rotary)
    if family == "sd3":
        (q, k, v), (cq, ck, cv) = sd3_streams(attn, hidden, context)
        out = reference(torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2), True, 7, 1.5)
        want = JointRegulatedProcessor.sd3_project(attn, out, 16)
    else:
        query, key, value, n_text = flux_streams(attn, hidden, context, rotary)
        out = reference(*(x.transpose(1, 2) for x in (query, key, value)), False, n_text, 1.5)
        want = JointRegulatedProcessor.flux_project(attn, out.transpose(1, 2), n_text)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    plain = attn.processor(attn, hidden, context, None, image_rotary_emb=rotary) if family == "flux" else attn.processor(attn, hidden, context)
    assert (got[0] - plain[0]).abs().max() > 1e-4  # gamma 1.5 is not the plain layer


def test_gamma_one_is_the_plain_pipeline_and_gamma_changes_the_image(pipe):
    plain = run(pipe)
    np.testing.assert_allclose(run(TextAttentionScaling(pipe, gamma=1.0)), plain, atol=1e-4)
    np.testing.assert_array_equal(run(TextAttentionScaling(pipe, steps=0)), plain)  # no step scaled: untouched
    taca = run(TextAttentionScaling(pipe))
    assert np.abs(taca - plain).max() > 1e-3


def test_only_the_first_steps_are_scaled_and_processors_are_put_back(pipe):
    originals = pipe.transformer.attn_processors
    one, two = run(TextAttentionScaling(pipe, steps=1)), run(TextAttentionScaling(pipe, steps=2))
    assert np.abs(one - two).max() > 1e-4
    np.testing.assert_array_equal(run(TextAttentionScaling(pipe, steps=3)), run(TextAttentionScaling(pipe, steps=28)))
    now = pipe.transformer.attn_processors
    assert now.keys() == originals.keys() and all(now[k] is originals[k] for k in originals)


def test_bad_settings_and_pipelines_are_named():
    pipe = tiny_sd3_pipeline(num_layers=2)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        TextAttentionScaling(pipe, gamma=0)
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        TextAttentionScaling(pipe, steps=-1)
    from attnreg.testing import tiny_sd_pipeline

    with pytest.raises(UnsupportedPipelineError, match="supported: StableDiffusion3Pipeline, FluxPipeline"):
        TextAttentionScaling(tiny_sd_pipeline())
