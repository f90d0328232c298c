"""The plug-in on tiny SD3 (and FLUX) pipelines built from configs: real diffusers MMDiT classes and
processors, the real CLIP tokenizer and a real T5 tokenizer built offline (attnreg.testing.mmdit)."""

import numpy as np
import pytest
import torch

from attnreg import (
    AttentionRegulator,
    GuidanceError,
    LayerError,
    RegulationConfig,
    TargetError,
    UnsupportedPipelineError,
)
from attnreg.joint import CLIP_LENGTH, JointAttentionRegulator, JointRegulatedProcessor, joint_attention_layers
from attnreg.testing import TargetMass
from attnreg.testing.mmdit import tiny_sd3_pipeline

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


def test_binding_pairs_modifiers_in_the_target_stream(sd3, sd3_clip_only):
    """The default's binding term on SD3: modifiers are found among the target stream's word tokens (T5
    columns after the 77 CLIP ones, or CLIP's own), and an image with modifiers is regulated."""
    t5 = AttentionRegulator(sd3, RegulationConfig.from_preset("auto", neglect_ratio=1.0))
    assert t5.config.binding > 0  # on in the default
    plan = t5.plan(PROMPT, ["circle", "square"], **CALL)
    info = t5.last_targets[0]
    assert info["modifiers"] == ["red -> circle", "blue -> square"]
    table = {t.text: t.index for t in t5.token_table(PROMPT)}
    assert plan.image_targets[0] == (table["circle"], table["square"], table["red"], table["blue"])
    assert plan.image_pairs[0] == ((2, 0), (3, 1)) and plan.image_nouns[0] == 2
    assert not np.allclose(images(t5, targets=["circle", "square"]), images(sd3))
    clip = AttentionRegulator(sd3_clip_only)
    clip.plan(PROMPT, ["circle", "square"], **CALL)
    assert clip.last_targets[0]["modifiers"] == ["red -> circle", "blue -> square"]
    assert clip.plan("a circle and a square", ["circle", "square"], **CALL).image_pairs[0] == ()


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
    np.testing.assert_array_equal(images(AttentionRegulator(sd3, RegulationConfig.paper(edit_steps=0)), targets=["circle"]), vanilla)


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

    from attnreg.joint import sd3_streams

    torch.manual_seed(0)
    for name in joint_attention_layers(sd3.transformer):
        attn = sd3.transformer.get_submodule(name)
        assert isinstance(attn.processor, JointAttnProcessor2_0)
        hidden, context = torch.randn(2, 256, 32), torch.randn(2, 7, 32)
        want = attn.processor(attn, hidden, context)
        (q, k, v), (cq, ck, cv) = sd3_streams(attn, hidden, context)
        probs = (q @ torch.cat([ck, k], 2).transpose(-1, -2) / 8**0.5).softmax(-1)
        edited = probs @ torch.cat([cv, v], 2)
        got = JointRegulatedProcessor.sd3_output(attn, hidden, (q, k, v), (cq, ck, cv), [0, 1], edited)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_regulates_without_nan(dtype):
    pipe = tiny_sd3_pipeline(num_layers=2).to(dtype=dtype)
    plain = images(pipe, num_inference_steps=2)
    out = images(AttentionRegulator(pipe), targets=["circle", "square"], num_inference_steps=2)
    assert np.isfinite(out).all()
    assert np.abs(out - plain).max() > 1e-3  # regulation acted: a no-op would pass the NaN check too


# -- layers ------------------------------------------------------------------------------------------


def test_layers_default_middle_third_and_by_name_or_index(sd3):
    assert AttentionRegulator(sd3).layers == {"transformer_blocks.1.attn"}
    assert AttentionRegulator(tiny_sd3_pipeline(num_layers=6)).layers == {"transformer_blocks.2.attn", "transformer_blocks.3.attn"}
    assert AttentionRegulator(sd3, RegulationConfig.paper(layers=("transformer_blocks.0", "2"))).layers == {
        "transformer_blocks.0.attn", "transformer_blocks.2.attn"}
    with pytest.raises(LayerError, match=r"'transformer_blocks.7'.*transformer_blocks.0 .. transformer_blocks.2"):
        AttentionRegulator(sd3, RegulationConfig.paper(layers=("7",)))
    with pytest.raises(LayerError, match="down_blocks.1"):
        AttentionRegulator(sd3, RegulationConfig.paper(layers=("down_blocks.1",)))


# -- bad input ---------------------------------------------------------------------------------------


def test_guidance_and_options_that_cannot_be_regulated(sd3):
    originals = processors(sd3)
    reg = AttentionRegulator(sd3)
    with pytest.raises(GuidanceError, match="conditional half of SD3.*guidance_scale=1.0"):
        images(reg, targets=["circle"], guidance_scale=1.0)
    with pytest.raises(ValueError, match="prompt_3 is not supported"):
        images(reg, targets=["circle"], prompt_3="a cat")
    assert_untouched(sd3, originals)


def test_unsupported_mmdit_variants_are_named(sd3):
    from diffusers import StableDiffusion3Img2ImgPipeline

    img2img = StableDiffusion3Img2ImgPipeline(**sd3.components)
    with pytest.raises(UnsupportedPipelineError, match=r"StableDiffusion3Pipeline and FluxPipeline.*got "
                       r"StableDiffusion3Img2ImgPipeline: .*image-conditioned variant"):
        AttentionRegulator(img2img)


def test_a_transformer_without_a_text_stream_is_named():
    from diffusers import DiTPipeline, DiTTransformer2DModel, DDIMScheduler

    from attnreg.testing.mmdit import _vae

    transformer = DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=10)
    pipe = DiTPipeline(transformer=transformer, vae=_vae(0), scheduler=DDIMScheduler())
    with pytest.raises(UnsupportedPipelineError, match="got DiTPipeline: .*no text stream"):
        AttentionRegulator(pipe)


# -- FLUX: guidance-distilled, T5 only, text first, RoPE ---------------------------------------------

FLUX_PROMPT = "circle next to a blue square"  # a target at T5 token 0: column 0 is a word in FLUX


@pytest.fixture(scope="module")
def flux():
    from attnreg.testing.mmdit import tiny_flux_pipeline

    return tiny_flux_pipeline()


def test_flux_edits_its_single_batch_and_every_target_column_rises(flux):
    originals = processors(flux)
    plain = images(flux, FLUX_PROMPT)
    # The paper loss in whole-row units: its absolute goals then lift every target column, which this
    # test reads in the whole softmax (in the word columns' units these random weights already meet them).
    reg = AttentionRegulator(flux, RegulationConfig.from_preset("paper", edit_steps=2, text_units=False))
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

    from attnreg.joint import flux_streams

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
        query, key, value, n = flux_streams(attn, hidden, context, rotary)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        edited = (q[:, :, n:] @ k.transpose(-1, -2) / 16**0.5).softmax(-1) @ v
        got = JointRegulatedProcessor.flux_output(attn, query, key, value, n, [0, 1], edited)
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


# -- FLUX's single-stream blocks ---------------------------------------------------------------------


def test_flux_single_stream_block_is_edited_and_remove_restores_it(flux):
    from attnreg.joint import editable_layers

    assert editable_layers(flux.transformer)[-1] == "single_transformer_blocks.0.attn"
    assert AttentionRegulator(flux).layers == {"transformer_blocks.1.attn"}  # the default is unchanged
    originals = processors(flux)
    plain = images(flux, FLUX_PROMPT)
    reg = AttentionRegulator(flux, RegulationConfig.from_preset("paper", edit_steps=2,
                                                                layers=("single_transformer_blocks.0",)))
    assert reg.layers == {"single_transformer_blocks.0.attn"}
    columns = reg.resolve(FLUX_PROMPT, ["circle", "square"])["indices"]
    mass = TargetMass(columns, steps=2, guided=False, per_column=True)
    with reg.observing(mass):
        out = reg(FLUX_PROMPT, targets=["circle", "square"], generator=gen(), output_type="np", **CALL).images
    assert np.abs(out - plain).max() > 1e-3
    assert sorted({(layer, step) for layer, step, _ in reg.state.stats}) == [("single_transformer_blocks.0.attn", s) for s in (0, 1)]
    assert len(mass.values) == 2 and np.isfinite(mass.values).all()
    assert_untouched(flux, originals)
    reg.remove()
    np.testing.assert_array_equal(images(flux, FLUX_PROMPT), plain)  # bit for bit
    with pytest.raises(LayerError, match=r"single_transformer_blocks.0 .. single_transformer_blocks.0"):
        AttentionRegulator(flux, RegulationConfig.paper(layers=("single_transformer_blocks.4",)))


def test_flux_single_stream_explicit_path_mirrors_the_diffusers_processor(flux):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from attnreg.joint import flux_single_streams

    torch.manual_seed(0)
    n_text, side = 7, 4
    rows, cols = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
    grid = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    rotary = flux.transformer.pos_embed(torch.cat([torch.zeros(n_text, 3), grid]))
    attn = flux.transformer.get_submodule("single_transformer_blocks.0.attn")
    assert isinstance(attn.processor, FluxAttnProcessor)
    hidden = torch.randn(2, n_text + side * side, 32)  # text then image, as FluxSingleTransformerBlock concatenates
    want = attn.processor(attn, hidden, None, None, rotary)
    query, key, value = flux_single_streams(attn, hidden, rotary)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    edited = (q[:, :, n_text:] @ k.transpose(-1, -2) / 16**0.5).softmax(-1) @ v
    got = JointRegulatedProcessor.flux_output(attn, query, key, value, n_text, [0, 1], edited, single=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- the loss in the text's units ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["sd3-t5", "sd3-clip", "flux", "flux-single"])
def test_the_loss_measures_targets_as_shares_of_the_prompts_word_columns(case, sd3, sd3_clip_only, flux, monkeypatch):
    """The solver's word columns are exactly the prompt's word tokens of the target stream (no SOS, EOS,
    padding, zero columns or image keys), and the maps it starts from are shares of those columns."""
    import attnreg.processor
    from attnreg.regulation import renormalised

    pipe, prompt = {"sd3-t5": (sd3, PROMPT), "sd3-clip": (sd3_clip_only, PROMPT), "flux": (flux, FLUX_PROMPT),
                    "flux-single": (flux, FLUX_PROMPT)}[case]
    layers = ("single_transformer_blocks.0",) if case == "flux-single" else None
    seen = []
    real = attnreg.processor.regulate_step

    def spy(scores, probs, targets, *args, **kwargs):
        seen.append((probs.clone(), targets, kwargs["words"]))
        return real(scores, probs, targets, *args, **kwargs)

    monkeypatch.setattr(attnreg.processor, "regulate_step", spy)
    reg = AttentionRegulator(pipe, RegulationConfig.from_preset("auto", edit_steps=1, layers=layers, neglect_ratio=None))
    reg(prompt, targets=["circle", "square"], generator=gen(), output_type="np", **CALL)
    (probs, targets, words), = seen
    want = {t.index for t in reg.word_tokens(prompt)}
    assert {i for i in range(words.shape[1]) if words[0, i]} == want and (words == words[0]).all()
    assert set(targets) < want
    if case == "sd3-t5":
        assert min(want) == CLIP_LENGTH  # the T5 words, after the 77 CLIP columns
    shares = renormalised(probs, torch.tensor(targets), words)
    assert (shares.sum(-1) <= 1 + 1e-5).all() and shares.sum(-1).mean() > 20 * probs[..., list(targets)].sum(-1).mean()


def test_the_text_floor_lifts_the_targets_whole_row_share(sd3):
    config = RegulationConfig.from_preset("auto", edit_steps=1, neglect_ratio=None)
    reg, floored = AttentionRegulator(sd3, config), AttentionRegulator(sd3, config.replace(text_floor=0.3))
    columns = reg.resolve(PROMPT, ["circle", "square"])["indices"]
    masses = []
    for r in (reg, floored):
        mass = TargetMass(columns, steps=1)
        with r.observing(mass):
            r(PROMPT, targets=["circle", "square"], generator=gen(), output_type="np", **CALL)
        masses.append(np.mean(mass.values))
    assert masses[1] > 3 * masses[0]


def test_text_units_change_what_the_solver_does(sd3):
    """Renormalising is not a no-op: measured in the whole row instead, the same call gives another image."""
    config = RegulationConfig.from_preset("auto", edit_steps=2, neglect_ratio=None)
    words = images(AttentionRegulator(sd3, config), targets=["circle", "square"])
    whole = images(AttentionRegulator(sd3, config.replace(text_units=False)), targets=["circle", "square"])
    assert np.abs(words - whole).max() > 1e-4


# -- recording and explain ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_recorder_maps_are_the_probabilities_regulate_step_sees(family, sd3, flux, monkeypatch):
    """The recorder's per-layer map at an edited layer and step is the head mean of the probabilities
    regulate_step hands back (rows over every key column, text + image), at the target columns; over all
    text columns it sums to the text share of those rows, less than 1 (the image keys hold the rest)."""
    import attnreg.processor
    from attnreg.recording import AttentionRecorder

    pipe, prompt = (sd3, PROMPT) if family == "sd3" else (flux, FLUX_PROMPT)
    seen = []
    real = attnreg.processor.regulate_step

    def spy(scores, probs, *args, **kwargs):
        done = real(scores, probs, *args, **kwargs)
        seen.append((probs.clone(), None if done is None else done.probs.clone()))
        return done

    monkeypatch.setattr(attnreg.processor, "regulate_step", spy)
    reg = AttentionRegulator(pipe, RegulationConfig.from_preset("paper", edit_steps=1))
    (layer,) = reg.layers
    columns = reg.resolve(prompt, ["circle", "square"])["indices"]
    targets = AttentionRecorder(layers=[layer], steps=[0], tokens=columns, resolution=16, per_layer=True)
    every = AttentionRecorder(layers=[layer], steps=[0], resolution=16)
    with targets.attached(reg), every.attached(reg):
        reg(prompt, targets=["circle", "square"], generator=gen(), output_type="np", **CALL)
    (before, after), = seen  # one edited layer call: step 0
    if family == "flux":  # T5 has no SOS: regulate_step runs without restore_special and only EOS is put back after it
        eos = reg._eos(reg.last_targets[0])
        after[..., eos] = before[..., eos]
    heads = pipe.transformer.get_submodule(layer).heads
    assert before.shape[0] == heads and before.shape[1] == 256  # (images x heads, image tokens, text + image keys)
    n_text = every.map(0).shape[1]
    assert before.shape[2] > n_text  # the image keys are in the softmax ...
    torch.testing.assert_close(before.sum(-1), torch.ones(heads, 256))  # ... which sums to 1 over all of them
    want = after.mean(0)[:, columns].T.reshape(len(columns), 16, 16)
    torch.testing.assert_close(targets.layer_maps[0][layer][0], want)
    torch.testing.assert_close(targets.map(0)[0], want)  # one layer: the average is that layer's map
    text_share = every.map(0)[0].sum(0)
    torch.testing.assert_close(text_share, after.mean(0)[:, :n_text].sum(-1).reshape(16, 16))
    assert (text_share < 1).all()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_explain_on_mmdit_writes_its_figures_and_numbers(family, sd3, flux, tmp_path):
    import json

    from attnreg.explain import FILES, explain
    from attnreg.explain.run import TEXT_VIEW_FILE

    pipe, prompt = (sd3, PROMPT) if family == "sd3" else (flux, FLUX_PROMPT)
    ex = explain(pipe, prompt, targets=["circle", "square"], seed=1, config=RegulationConfig.from_preset("paper", iterations=4),
                 out=tmp_path, **CALL)
    files = [*FILES, TEXT_VIEW_FILE]  # both views of the maps: of the whole joint row, and of the prompt's words
    assert [p.name for p in ex.files] == files and all((tmp_path / f).stat().st_size > 0 for f in files)
    numbers = json.loads((tmp_path / "explain.json").read_text())
    for run, shares in numbers["target_shares"].items():
        for share in shares.values():  # the words hold a small part of the whole row: the two views differ
            assert all(t > 5 * w for t, w in zip(share["text"], share["whole"]))
    sums = [sum(v["text"][0] for v in numbers["target_shares"][run].values()) for run in ("vanilla", "regulated")]
    assert all(0 < x < 1 for x in sums)
    columns = [79, 83] if family == "sd3" else [0, 5]  # T5 columns of the joint text sequence
    assert numbers["targets"]["indices"] == columns and "joint attention" in numbers["maps"]
    words = ["a", "red", "circle", "and", "a", "blue", "square"] if family == "sd3" else ["circle", "next", "to", "a", "blue", "square"]
    for run in ("vanilla", "regulated"):
        tokens = numbers["runs"][run]["tokens"]
        assert [t["token"] for t in tokens] == words
        assert all(0 <= v <= 1 and len(t["max"]) == STEPS for t in tokens for v in t["mean"] + t["max"])
        per_layer = numbers["runs"][run]["per_layer"]
        assert list(per_layer) == ["transformer_blocks.1.attn"]
        assert sorted(per_layer["transformer_blocks.1.attn"]) == sorted(str(c) for c in columns)
    van = {t["token"]: t for t in numbers["runs"]["vanilla"]["tokens"]}
    reg = {t["token"]: t for t in numbers["runs"]["regulated"]["tokens"]}
    # the paper preset raises it at the edited step (its goals are met in the word columns' units, so by less
    # in the whole softmax than the doubling a whole-row loss gives)
    assert reg["circle"]["mean"][0] > 1.5 * van["circle"]["mean"][0]
    assert len(ex.diagnosis) == 2 and all(ex.previews["vanilla"])
    plain = pipe(prompt, generator=gen(1), **CALL).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(ex.images["vanilla"]))


# -- tokens and calibration through the command line (a tiny SD3 saved as a folder) ------------------


@pytest.fixture(scope="module")
def sd3_folder(sd3, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd3")
    sd3.save_pretrained(folder)
    return folder


def test_tokens_shows_both_sd3_streams_and_the_flux_one(sd3_folder, flux, capsys):
    from attnreg.cli import main

    assert main(["tokens", PROMPT, "--model", str(sd3_folder), "--targets", "circle,square",
                 "--max-sequence-length", "32"]) == 0
    out = capsys.readouterr().out
    assert "targets are looked up in T5" in out
    assert "CLIP (columns 0..76, not searched for targets)" in out and "T5 (columns 77..108, the target stream)" in out
    assert "    0  <|startoftext|>" in out and "    3  circle" in out and "   79  circle" in out and "   84  </s>" in out
    assert out.strip().endswith("targets (T5 columns): [79, 83]")
    assert main(["tokens", PROMPT, "--model", str(sd3_folder), "--targets", "circle", "--text-stream", "clip"]) == 0
    assert capsys.readouterr().out.strip().endswith("targets (CLIP columns): [3]")
    # FLUX: the regulator's own hook, T5 alone from column 0
    (stream, table), = AttentionRegulator(flux).token_tables(FLUX_PROMPT)
    assert stream.name == "t5" and [t.index for t in table][:2] == [0, 1] and table[0].text == "circle"


def test_calibration_writes_and_the_regulator_reads_attnreg_json(sd3_folder, tmp_path, capsys):
    import json

    from attnreg.calibrate import calibrate
    from attnreg.cli import main
    from attnreg.joint import editable_layers
    from attnreg.pipelines import load_pipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    assert main(["calibrate", "--model", str(sd3_folder), "--prompts", str(prompts), "--seeds", "0",
                 "--steps", "2", "--keep", "0.9"]) == 0
    out = capsys.readouterr().out
    spec = json.loads((sd3_folder / "attnreg.json").read_text())["calibration"]
    pipe = load_pipeline(sd3_folder)
    assert list(spec["layer_stats"]) == editable_layers(pipe.transformer) and "transformer_blocks.0.attn" in out
    assert spec["layers"] and all(s["contrast"] > 0 and s["map"] == "16x16" for s in spec["layer_stats"].values())
    best = max(s["contrast"] for s in spec["layer_stats"].values())
    assert spec["layers"] == [n for n, s in spec["layer_stats"].items() if s["contrast"] >= 0.9 * best]
    # the auto preset edits the calibrated blocks; the paper preset keeps the structural rule
    assert AttentionRegulator(pipe).layers == set(spec["layers"])
    assert AttentionRegulator(pipe, RegulationConfig.from_preset("paper")).layers == {"transformer_blocks.1.attn"}
    # the same statistics in-process, on the T5 columns the regulator edits
    again = calibrate(pipe, prompts=[PROMPT], seeds=[0], steps=2, keep=0.9)
    assert again["layers"] == spec["layers"]
