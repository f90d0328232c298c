"""The plug-in on tiny SD and SDXL pipelines built from configs, with the real tokenizer."""

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
from attnreg.processor import RegulatedAttnProcessor
from attnreg.testing import TargetMass, tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPT = "a cat and a dog"
STEPS = 6


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def images(fn, prompt=PROMPT, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return fn(prompt, generator=gen(), output_type="np", **kw).images


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def vanilla(sd):
    return images(sd)


def test_regulated_differs_then_remove_gives_vanilla_bit_for_bit(sd, vanilla):
    originals = sd.unet.attn_processors
    reg = AttentionRegulator(sd, RegulationConfig.paper())
    out = images(reg, targets=["cat", "dog"])
    assert np.abs(out - vanilla).max() > 1e-3
    reg.remove()
    after = sd.unet.attn_processors
    assert all(after[k] is originals[k] for k in originals)
    np.testing.assert_array_equal(images(sd), vanilla)
    with pytest.raises(RuntimeError, match="removed"):
        reg(PROMPT, targets=["cat"])


def test_same_seed_same_image(sd, vanilla):
    reg = AttentionRegulator(sd, RegulationConfig.from_preset("paper"))  # edits every call: not a no-op
    first = images(reg, targets=["cat", "dog"])
    assert np.abs(first - vanilla).max() > 1e-3
    np.testing.assert_array_equal(first, images(reg, targets=["cat", "dog"]))


def test_target_attention_rises_in_edited_layers(sd):
    reg = AttentionRegulator(sd, RegulationConfig.from_preset("paper"))
    vanilla_mass, regulated_mass = TargetMass([2, 5], steps=3), TargetMass([2, 5], steps=3)
    with reg.observing(vanilla_mass):  # run() with no plan edits nothing
        reg.run(PROMPT, None, num_inference_steps=STEPS, generator=gen(), output_type="np")
    with reg.observing(regulated_mass):
        reg(PROMPT, targets=["cat", "dog"], num_inference_steps=STEPS, generator=gen(), output_type="np")
    assert reg.state.observers == []
    assert len(regulated_mass.values) == 3 * len(reg.layers)
    assert len(vanilla_mass.values) == len(regulated_mass.values)
    assert np.mean(regulated_mass.values) > 2 * np.mean(vanilla_mass.values)
    # and the solver lowered the loss at every edited layer call
    assert len(reg.state.stats) == 3 * len(reg.layers)
    for initial, best in reg.state.stats.values():
        assert best.item() < initial.item()


def test_solver_stats_and_edit_steps(sd):
    reg = AttentionRegulator(sd, RegulationConfig.paper(edit_steps=2))
    calls = []
    def on_step(pipe, step, timestep, kw):
        calls.append(step)
        assert kw["latents"].shape[-1] == 32
        return {}
    images(reg, targets=["dog"], callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])
    assert calls == list(range(STEPS))  # the user's callback still runs every step
    # the solver ran in every regulated layer at steps 0 and 1 only
    assert sorted({(layer, step) for layer, step, _ in reg.state.stats}) == [(n, s) for n in sorted(reg.layers) for s in (0, 1)]
    assert not any(isinstance(p, RegulatedAttnProcessor) for p in sd.unet.attn_processors.values())


def test_batches_with_per_prompt_targets(sd):
    reg = AttentionRegulator(sd)
    out = reg(["a cat and a dog", "a red apple on a chair"], targets=[["cat", "dog"], ["apple", "chair"]],
              num_images_per_prompt=2, num_inference_steps=3, generator=gen(), output_type="np")
    assert out.images.shape[0] == 4
    assert [r["indices"] for r in reg.last_targets] == [[2, 5], [3, 6]]


def test_an_image_does_not_depend_on_the_images_after_it_in_its_batch(sd):
    # The paper preset starts from random weights: each image draws them from its own stream, keyed by
    # its generator, so image i of a batch is the single image of its generator (up to the pipeline's own
    # batch numerics, ~1e-6), with one generator for the batch or one per image.
    reg = AttentionRegulator(sd, RegulationConfig.from_preset("paper"))
    call = dict(targets=["cat", "dog"], num_inference_steps=STEPS, output_type="np")
    single = reg(PROMPT, generator=gen(), **call).images
    pair = reg(PROMPT, generator=gen(), num_images_per_prompt=2, **call).images
    plain = np.abs(images(sd, num_images_per_prompt=2)[0] - images(sd)[0]).max()
    assert np.abs(pair[0] - single[0]).max() <= max(1e-4, 10 * plain)
    assert np.abs(pair[1] - pair[0]).max() > 1e-2  # the second image is another one
    listed = reg(PROMPT, generator=[gen(5), gen(7)], num_images_per_prompt=2, **call).images
    alone = reg(PROMPT, generator=[gen(7)], **call).images
    assert np.abs(listed[1] - alone[0]).max() <= max(1e-4, 10 * plain)


def test_auto_targets_reported(sd, caplog):
    reg = AttentionRegulator(sd)
    with caplog.at_level("INFO", logger="attnreg"):  # logged, never printed by the library
        images(reg, prompt="a red apple on a chair", num_inference_steps=2)
    assert reg.last_targets[0]["tokens"] == ["apple", "chair"]
    assert "apple -> 3, chair -> 6" in caplog.text


def test_v_prediction_and_bfloat16_have_no_nan():
    pipe = tiny_sd_pipeline(prediction_type="v_prediction").to(dtype=torch.bfloat16)
    reg = AttentionRegulator(pipe, RegulationConfig.from_preset("paper"))  # edits every call
    out = images(reg, targets=["cat", "dog"], num_inference_steps=3)
    assert np.isfinite(out).all()
    assert np.abs(out - images(pipe, num_inference_steps=3)).max() > 1e-3  # regulation acted


def test_sdxl_regulates_and_restores(sdxl):
    before = images(sdxl, num_inference_steps=4)
    reg = AttentionRegulator(sdxl, RegulationConfig.from_preset("paper"))
    assert sorted({n.split(".attentions")[0] for n in reg.layers}) == ["down_blocks.1", "up_blocks.0"]
    out = images(reg, targets=["cat", "dog"], num_inference_steps=4)
    assert np.isfinite(out).all() and np.abs(out - before).max() > 1e-3
    np.testing.assert_array_equal(images(sdxl, num_inference_steps=4), before)


# -- bad input: a clear error, and the pipeline is left as it was ----------------------------------
def assert_untouched(pipe, originals):
    now = pipe.unet.attn_processors
    assert all(now[k] is originals[k] for k in originals)


def test_bad_targets_leave_pipeline_untouched(sd, vanilla):
    originals = sd.unet.attn_processors
    reg = AttentionRegulator(sd)
    with pytest.raises(TargetError, match=r"'bird'.*1:a 2:cat"):
        images(reg, targets=["bird"])
    with pytest.raises(TargetError, match="truncation"):
        reg("a " + "very " * 80 + "big dog", targets=["dog"], num_inference_steps=2)
    with pytest.raises(ValueError, match="one per prompt"):
        reg(["a cat", "a dog"], targets=[["cat"]], num_inference_steps=2)
    assert_untouched(sd, originals)
    with pytest.warns(UserWarning, match="without regulation"):
        out = images(reg, targets=[])
    np.testing.assert_array_equal(out, vanilla)


def test_bad_steps_and_guidance(sd):
    originals = sd.unet.attn_processors
    with pytest.raises(GuidanceError, match="edit_steps=30 is larger than num_inference_steps=6"):
        images(AttentionRegulator(sd, RegulationConfig.paper(edit_steps=30)), targets=["cat"])
    with pytest.raises(GuidanceError, match="guidance_scale > 1"):
        images(AttentionRegulator(sd), targets=["cat"], guidance_scale=1.0)
    assert_untouched(sd, originals)


def test_guidance_distilled_unet_is_named():
    from diffusers import UNet2DConditionModel

    pipe = tiny_sd_pipeline()
    pipe.register_modules(unet=UNet2DConditionModel.from_config(pipe.unet.config, time_cond_proj_dim=8))
    with pytest.raises(GuidanceError, match="guidance-distilled.*time_cond_proj_dim"):
        AttentionRegulator(pipe)("a cat", targets=["cat"], num_inference_steps=2, guidance_scale=7.5)


def test_unknown_layer_lists_valid_ones(sd):
    originals = sd.unet.attn_processors
    with pytest.raises(LayerError, match=r"'down_blocks.7'.*valid blocks: down_blocks.1, mid_block, up_blocks.0"):
        AttentionRegulator(sd, RegulationConfig.paper(layers=("down_blocks.7",)))
    assert_untouched(sd, originals)
    reg = AttentionRegulator(sd, RegulationConfig.paper(layers=("up_blocks.0.attentions.1.transformer_blocks.0.attn2",)))
    assert len(reg.layers) == 1


def test_unsupported_pipelines():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(block_out_channels=(32, 32), sample_size=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(UnsupportedPipelineError, match="StableDiffusionPipeline and StableDiffusionXLPipeline"):
        AttentionRegulator(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))
    with pytest.raises(UnsupportedPipelineError, match="got str"):
        AttentionRegulator("not a pipeline")


def test_impossible_configs():
    with pytest.raises(ConfigError, match="iterations=0"):
        RegulationConfig.paper(iterations=0)
    with pytest.raises(ConfigError, match=r"quantile=1\.5.*decay=0"):
        RegulationConfig.paper(quantile=1.5, decay=0)
    with pytest.raises(ConfigError, match="layers is empty"):
        RegulationConfig.paper(layers=())
    with pytest.raises(ConfigError, match="valid presets: auto, paper"):
        RegulationConfig.from_preset("fast-ish")


def test_model_folder_names_its_layers(tmp_path):
    import json

    from diffusers import StableDiffusionPipeline

    tiny_sd_pipeline().save_pretrained(tmp_path)
    (tmp_path / "attnreg.json").write_text(json.dumps({"paper_layers": ["mid_block"]}))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    paper = RegulationConfig.from_preset("paper")
    assert AttentionRegulator(pipe, paper).layers == {"mid_block.attentions.0.transformer_blocks.0.attn2"}


def test_explicit_path_mirrors_the_diffusers_processor(sd):
    """The processor's explicit attention (taken whenever a layer is edited or recorded) is diffusers'
    AttnProcessor2_0 with the softmax written out: the same output when nothing is changed."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from attnreg.geometry import cross_attention_layers
    from attnreg.processor import RegulationState

    name = cross_attention_layers(sd.unet)[0]
    attn = sd.unet.get_submodule(name)
    torch.manual_seed(0)
    hidden, context = torch.randn(2, 64, attn.to_q.in_features), torch.randn(2, 77, attn.to_k.in_features)

    class Keep:
        def record(self, layer, step, probs, state):
            self.probs = probs

    keep = Keep()
    processor = RegulatedAttnProcessor(name, AttnProcessor2_0(), RegulationState(RegulationConfig.paper(), frozenset()))
    got = processor._explicit(attn, hidden, context, None, None, False, [keep])
    want = AttnProcessor2_0()(attn, hidden, context)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keep.probs.sum(-1), torch.ones(keep.probs.shape[:-1]))


def test_prompt_embeds_run_the_pipeline_and_the_text_finds_the_targets(sd, vanilla):
    # compel's users: their embeddings go to the pipeline, the text they were made from locates the targets
    reg = AttentionRegulator(sd, RegulationConfig.paper())
    embeds, negative = sd.encode_prompt(PROMPT, "cpu", 1, True)
    regulated = images(reg, targets=["cat", "dog"])
    assert np.abs(regulated - vanilla).max() > 1e-3
    np.testing.assert_array_equal(images(reg, targets=["cat", "dog"], prompt_embeds=embeds,
                                         negative_prompt_embeds=negative), regulated)
    with pytest.raises(ValueError, match="pass the text they were made from as `prompt`"):
        reg(None, targets=[2, 5], prompt_embeds=embeds, negative_prompt_embeds=negative)
