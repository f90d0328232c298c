"""The plug-in on tiny SD3 (and FLUX) pipelines built from configs: real diffusers MMDiT classes and
processors, the real CLIP tokenizer and a real T5 tokenizer built offline (attnreg.testing_mmdit)."""

import numpy as np
import pytest
import torch

from attnreg import (
    AttentionRegulator,
    ConfigError,
    GuidanceError,
    LayerError,
    RegulationConfig,
    TargetError,
    UnsupportedPipelineError,
)
from attnreg.joint import CLIP_LENGTH, JointAttentionRegulator, JointRegulatedProcessor, joint_attention_layers
from attnreg.testing import TargetMass
from attnreg.testing_mmdit import tiny_sd3_pipeline

PROMPT = "a red circle and a blue square"
STEPS = 4
CALL = dict(num_inference_steps=STEPS, height=64, width=64, max_sequence_length=32)


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def images(fn, prompt=PROMPT, **kw):
    kw = {**CALL, **kw}
    return fn(prompt, generator=kw.pop("generator", gen()), output_type="np", **kw).images


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def sd3_clip_only():
    return tiny_sd3_pipeline(t5=False)


@pytest.fixture(scope="module")
def vanilla(sd3):
    return images(sd3)


def processors(pipe):
    return pipe.transformer.attn_processors


def assert_untouched(pipe, originals):
    now = processors(pipe)
    assert now.keys() == originals.keys() and all(now[k] is originals[k] for k in originals)


# -- the text layout ---------------------------------------------------------------------------------


def test_sd3_targets_are_t5_columns_after_the_77_clip_columns(sd3):
    reg = AttentionRegulator(sd3)
    assert isinstance(reg, JointAttentionRegulator) and reg.stream.name == "t5"
    info = reg.resolve(PROMPT, ["circle", "blue square"])
    t5 = sd3.tokenizer_3(PROMPT).input_ids
    circle, blue, square = (sd3.tokenizer_3(w, add_special_tokens=False).input_ids[0] for w in ("circle", "blue", "square"))
    assert info["stream_indices"] == [t5.index(circle), t5.index(blue), t5.index(square)] == [2, 5, 6]
    assert info["indices"] == [CLIP_LENGTH + i for i in info["stream_indices"]]
    assert info["tokens"] == ["circle", "blue", "square"]
    table = reg.token_table(PROMPT)
    assert [t.index for t in table][:2] == [77, 78] and table[-1].text == "</s>"
    # A word not in the tiny vocabulary splits into several T5 pieces; all of them are targets.
    assert len(reg.resolve("a red hexagon", ["hexagon"])["indices"]) > 1
    # CLIP on request: the same words at their CLIP positions (SOS at 0).
    clip = AttentionRegulator(sd3, text_stream="clip").resolve(PROMPT, ["circle", "square"])
    assert clip["indices"] == [3, 7] and clip["stream"] == "clip"


def test_sd3_without_t5_uses_the_clip_columns(sd3_clip_only):
    reg = AttentionRegulator(sd3_clip_only, RegulationConfig.from_preset("paper"))
    assert reg.stream.name == "clip"
    assert reg.resolve(PROMPT, ["circle", "square"])["indices"] == [3, 7]
    with pytest.raises(ValueError, match="text_encoder_3=None"):
        AttentionRegulator(sd3_clip_only, text_stream="t5")
    plain = images(sd3_clip_only)
    out = images(reg, targets=["circle", "square"])
    assert np.isfinite(out).all() and np.abs(out - plain).max() > 1e-3


def test_targets_past_the_t5_cut_are_named(sd3):
    reg = AttentionRegulator(sd3)
    long = "a " + "red " * 27 + "circle and a blue square"  # circle at T5 token 28, blue 31, square 32
    with pytest.raises(TargetError, match=r"targets 'blue' \(T5 token 31\), 'square' \(T5 token 32\) .* are past the "
                       r"32-token truncation .*only sees: 0:a 1:red .* 31:</s>$"):
        reg(long, targets=["circle", "blue", "square"], **CALL)
    assert reg.resolve(long, ["circle"])["stream_indices"] == [28]
    with pytest.warns(UserWarning, match="automatic target dropped.*square"):
        info = reg.resolve(long, None)
    assert "square" not in info["targets"]
    with pytest.raises(TargetError, match=r"'triangle' is not in the prompt.*T5 tokens are: 0:a 1:red"):
        reg(PROMPT, targets=["triangle"], **CALL)


# -- the call ----------------------------------------------------------------------------------------


def test_regulation_changes_the_image_and_raises_the_targets_mass(sd3, vanilla):
    originals = processors(sd3)
    reg = AttentionRegulator(sd3, RegulationConfig.from_preset("paper", edit_steps=2))
    columns = reg.resolve(PROMPT, ["circle", "square"])["indices"]
    plain_mass, regulated_mass = TargetMass(columns, steps=2), TargetMass(columns, steps=2)
    with reg.observing(plain_mass):  # run() with no plan edits nothing
        observed = reg.run(PROMPT, None, generator=gen(), output_type="np", **CALL).images
    np.testing.assert_array_equal(observed, vanilla)  # observing never changes the image
    with reg.observing(regulated_mass):
        out = reg(PROMPT, targets=["circle", "square"], generator=gen(), output_type="np", **CALL).images
    assert np.abs(out - vanilla).max() > 1e-3
    assert len(regulated_mass.values) == len(plain_mass.values) == 2 * len(reg.layers)
    assert np.mean(regulated_mass.values) > 2 * np.mean(plain_mass.values)
    assert sorted({(layer, step) for layer, step, _ in reg.state.stats}) == [(n, s) for n in sorted(reg.layers) for s in (0, 1)]
    for initial, best in reg.state.stats.values():
        assert best.item() < initial.item()
    assert_untouched(sd3, originals)
    np.testing.assert_array_equal(images(sd3), vanilla)


def test_nothing_edited_is_the_plain_pipeline_bit_for_bit(sd3, vanilla):
    # The auto preset never regulates a single target (nothing is neglected), and edit_steps=0 edits no step.
    np.testing.assert_array_equal(images(AttentionRegulator(sd3), targets=["circle"]), vanilla)
    np.testing.assert_array_equal(images(AttentionRegulator(sd3, RegulationConfig(edit_steps=0)), targets=["circle"]), vanilla)


def test_processors_restored_after_an_exception(sd3, vanilla):
    originals = processors(sd3)
    reg = AttentionRegulator(sd3, RegulationConfig.from_preset("paper"))
    seen = []

    def boom(pipe, step, timestep, kw):
        seen.extend(type(p).__name__ for p in processors(pipe).values())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        images(reg, targets=["circle", "square"], callback_on_step_end=boom)
    assert "JointRegulatedProcessor" in seen  # installed during the call ...
    assert_untouched(sd3, originals)  # ... and the same objects back after it
    reg.remove()
    np.testing.assert_array_equal(images(sd3), vanilla)
    with pytest.raises(RuntimeError, match="removed"):
        reg(PROMPT, targets=["circle"])


def test_batch_of_two_prompts_with_their_own_targets(sd3):
    reg = AttentionRegulator(sd3, RegulationConfig.from_preset("paper", edit_steps=2))
    prompts = [PROMPT, "a green triangle next to a yellow circle"]
    out = images(reg, prompts, targets=[["circle", "square"], ["triangle", "circle"]], generator=[gen(0), gen(1)])
    assert out.shape[0] == 2 and np.isfinite(out).all()
    assert [r["indices"] for r in reg.last_targets] == [[79, 83], [79, 84]]
    assert {targets for _, _, targets in reg.state.stats} == {(79, 83), (79, 84)}
    # Image 0 of the batch is the single call's image, up to the pipeline's own batch numerics.
    single = images(reg, PROMPT, targets=["circle", "square"], generator=gen(0))
    plain = np.abs(images(sd3, prompts, generator=[gen(0), gen(1)])[0] - images(sd3, generator=gen(0))[0]).max()
    assert np.abs(out[0] - single[0]).max() <= max(1e-4, 10 * plain)


def test_explicit_path_mirrors_the_diffusers_processor(sd3):
    """The edited path recomputes the layer's attention by hand; with the explicit probabilities put back
    unchanged it must give the original processor's output, on every block (the last one is
    context_pre_only)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from attnreg.joint import _sd3_streams

    torch.manual_seed(0)
    for name in joint_attention_layers(sd3.transformer):
        attn = sd3.transformer.get_submodule(name)
        assert isinstance(attn.processor, JointAttnProcessor2_0)
        hidden, context = torch.randn(2, 256, 32), torch.randn(2, 7, 32)
        want = attn.processor(attn, hidden, context)
        (q, k, v), (cq, ck, cv) = _sd3_streams(attn, hidden, context)
        probs = (q @ torch.cat([ck, k], 2).transpose(-1, -2) / 8**0.5).softmax(-1)
        edited = probs @ torch.cat([cv, v], 2)
        got = JointRegulatedProcessor._sd3_output(attn, hidden, (q, k, v), (cq, ck, cv), [0, 1], edited)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_has_no_nan():
    pipe = tiny_sd3_pipeline(num_layers=2).to(dtype=torch.bfloat16)
    out = images(AttentionRegulator(pipe, RegulationConfig.from_preset("paper")), targets=["circle", "square"], num_inference_steps=2)
    assert np.isfinite(out).all()


# -- layers ------------------------------------------------------------------------------------------


def test_layers_default_middle_third_and_by_name_or_index(sd3):
    assert AttentionRegulator(sd3).layers == {"transformer_blocks.1.attn"}
    assert AttentionRegulator(tiny_sd3_pipeline(num_layers=6)).layers == {"transformer_blocks.2.attn", "transformer_blocks.3.attn"}
    assert AttentionRegulator(sd3, RegulationConfig(layers=("transformer_blocks.0", "2"))).layers == {
        "transformer_blocks.0.attn", "transformer_blocks.2.attn"}
    with pytest.raises(LayerError, match=r"'transformer_blocks.7'.*transformer_blocks.0 .. transformer_blocks.2"):
        AttentionRegulator(sd3, RegulationConfig(layers=("7",)))
    with pytest.raises(LayerError, match="down_blocks.1"):
        AttentionRegulator(sd3, RegulationConfig(layers=("down_blocks.1",)))


# -- bad input ---------------------------------------------------------------------------------------


def test_guidance_and_options_that_cannot_be_regulated(sd3):
    originals = processors(sd3)
    reg = AttentionRegulator(sd3)
    with pytest.raises(GuidanceError, match="conditional half of SD3.*guidance_scale=1.0"):
        images(reg, targets=["circle"], guidance_scale=1.0)
    with pytest.raises(ValueError, match="prompt_3 is not supported"):
        images(reg, targets=["circle"], prompt_3="a cat")
    with pytest.raises(ConfigError, match="binding"):
        AttentionRegulator(sd3, RegulationConfig.from_preset("auto", binding=1.0))
    assert_untouched(sd3, originals)


def test_unsupported_mmdit_variants_are_named(sd3):
    from diffusers import StableDiffusion3Img2ImgPipeline

    img2img = StableDiffusion3Img2ImgPipeline(**sd3.components)
    with pytest.raises(UnsupportedPipelineError, match=r"StableDiffusion3Pipeline and FluxPipeline.*got "
                       r"StableDiffusion3Img2ImgPipeline: .*image-conditioned variant"):
        AttentionRegulator(img2img)


def test_a_transformer_without_a_text_stream_is_named():
    from diffusers import DiTPipeline, DiTTransformer2DModel, DDIMScheduler

    from attnreg.testing_mmdit import _vae

    transformer = DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=10)
    pipe = DiTPipeline(transformer=transformer, vae=_vae(0), scheduler=DDIMScheduler())
    with pytest.raises(UnsupportedPipelineError, match="got DiTPipeline: .*no text stream"):
        AttentionRegulator(pipe)


# -- FLUX: guidance-distilled, T5 only, text first, RoPE ---------------------------------------------

FLUX_PROMPT = "circle next to a blue square"  # a target at T5 token 0: column 0 is a word in FLUX


@pytest.fixture(scope="module")
def flux():
    from attnreg.testing_mmdit import tiny_flux_pipeline

    return tiny_flux_pipeline()


def test_flux_edits_its_single_batch_and_every_target_column_rises(flux):
    originals = processors(flux)
    plain = images(flux, FLUX_PROMPT)
    reg = AttentionRegulator(flux, RegulationConfig.from_preset("paper", edit_steps=2))
    info = reg.resolve(FLUX_PROMPT, ["circle", "square"])
    assert info["indices"] == info["stream_indices"] == [0, 5]  # FLUX's text stream is T5 alone, offset 0
    before, after = (TargetMass(info["indices"], steps=2, guided=False, per_column=True) for _ in range(2))
    with reg.observing(before):
        np.testing.assert_array_equal(reg.run(FLUX_PROMPT, None, generator=gen(), output_type="np", **CALL).images, plain)
    with reg.observing(after):
        out = reg(FLUX_PROMPT, targets=["circle", "square"], generator=gen(), output_type="np", **CALL).images
    assert np.abs(out - plain).max() > 1e-3
    # Both targets, the one in column 0 too (restore_special must not put a T5 word back as if it were SOS).
    assert len(after.values) == len(before.values) == 2 * len(reg.layers)
    assert (np.mean(after.values, axis=0) > 2 * np.mean(before.values, axis=0)).all()
    assert_untouched(flux, originals)
    # No guidance batch to split: a guidance scale of 1 is a normal FLUX call, and one target edits nothing.
    np.testing.assert_array_equal(images(AttentionRegulator(flux), FLUX_PROMPT, targets=["circle"], guidance_scale=1.0),
                                  images(flux, FLUX_PROMPT, guidance_scale=1.0))


def test_flux_explicit_path_mirrors_the_diffusers_processor(flux):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from attnreg.joint import _flux_streams

    torch.manual_seed(0)
    n_text, side = 7, 4
    rows, cols = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
    grid = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)  # FLUX's img_ids: (0, row, column)
    ids = torch.cat([torch.zeros(n_text, 3), grid])
    rotary = flux.transformer.pos_embed(ids)
    for name in joint_attention_layers(flux.transformer):
        attn = flux.transformer.get_submodule(name)
        assert isinstance(attn.processor, FluxAttnProcessor)
        hidden, context = torch.randn(2, side * side, 32), torch.randn(2, n_text, 32)
        want = attn.processor(attn, hidden, context, None, rotary)
        query, key, value, n = _flux_streams(attn, hidden, context, rotary)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        edited = (q[:, :, n:] @ k.transpose(-1, -2) / 16**0.5).softmax(-1) @ v
        got = JointRegulatedProcessor._flux_output(attn, query, key, value, n, [0, 1], edited)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_flux_true_cfg_and_image_variants_are_refused(flux):
    from diffusers import FluxFillPipeline, FluxKontextPipeline

    reg = AttentionRegulator(flux)
    with pytest.raises(GuidanceError, match="true CFG"):
        images(reg, FLUX_PROMPT, targets=["circle"], true_cfg_scale=4.0, negative_prompt="a triangle")
    with pytest.raises(ValueError, match="T5 tokens only"):
        AttentionRegulator(flux, text_stream="clip")
    for variant in (FluxKontextPipeline, FluxFillPipeline):
        with pytest.raises(UnsupportedPipelineError, match=rf"FluxPipeline.*got {variant.__name__}: .*image-conditioned"):
            AttentionRegulator(variant(**{k: v for k, v in flux.components.items() if v is not None}))


def test_calibration_names_the_mmdit_rule(sd3):
    from attnreg.calibrate import CalibrationError, calibrate

    with pytest.raises(CalibrationError, match="StableDiffusion3Pipeline has none.*middle third"):
        calibrate(sd3)
