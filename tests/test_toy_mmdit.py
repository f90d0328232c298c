"""The embedded MMDiT shapes model's code (attnreg.toy.mmdit) on its tiny config: training, resuming, the
export as a real StableDiffusion3Pipeline, regulation on it, and the `--model` short names."""

import json

import numpy as np
import pytest
from PIL import Image
import torch

from attnreg import AttentionRegulator, RegulationConfig
from attnreg.cli import main as cli
from attnreg.joint import CLIP_LENGTH, JointAttentionRegulator
from attnreg.toy import MODELS, ModelNotTrainedError, load_pipeline, model_path
from attnreg.toy.mmdit import (MMDiTConfig, build_pipeline, build_transformer, prompt_embeds,
                               use_zero_columns)
from attnreg.toy.train import main as train

PROMPT = "a red circle and a blue square"
CALL = dict(num_inference_steps=4, guidance_scale=5.0, height=64, width=64, output_type="np")


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run of 3 steps, then resumed to 4 steps from its checkpoint and exported."""
    root = tmp_path_factory.mktemp("mmdit")
    out, export = root / "run", root / "model"
    args = ["--arch", "mmdit", "--config", "tiny", "--out", str(out)]
    assert train(args) == 0
    first = torch.load(out / "mmdit.pt", weights_only=False)
    assert train(args + ["--set", "mmdit_steps=4", "--export", str(export)]) == 0
    return out, export, first


def test_training_resumes_from_its_checkpoint(run):
    out, export, first = run
    assert first["step"] == 3 and set(first) >= {"transformer", "text_encoder", "text_encoder_2", "opt", "ema"}
    resumed = torch.load(out / "mmdit.pt", weights_only=False)
    assert resumed["step"] == 4
    rows = [r.split(",") for r in (out / "loss.csv").read_text().splitlines()[1:]]
    assert [r[1] for r in rows if r[0] == "mmdit"] == ["1", "2", "3", "4"]
    # the resumed run went on from the checkpoint's weights (step 4 moved them; nothing restarted from scratch)
    key = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(first["transformer"][key], resumed["transformer"][key])
    info = json.loads((export / "attnreg.json").read_text())
    assert info["arch"] == "mmdit" and info["train_step"] == 4 and info["token_grid"] == 16 // MMDiTConfig.tiny().patch_size
    assert info["joint_layers"] == ["transformer_blocks.1.attn"]  # the middle third of 3 blocks
    assert (export / "loss.png").exists() and (export / "train_config.json").exists()


def test_export_only_writes_the_last_checkpoint(run, tmp_path):
    out, _, _ = run
    assert train(["--arch", "mmdit", "--out", str(out), "--export-only", "--export", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "attnreg.json").read_text())["train_step"] == 4
    assert (tmp_path / "again" / "transformer" / "diffusion_pytorch_model.safetensors").exists()


def test_export_is_a_stable_diffusion_3_pipeline_that_attnreg_regulates(run):
    from diffusers import StableDiffusion3Pipeline

    _, export, _ = run
    pipe = load_pipeline(path=export)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    assert pipe.vae.config.scaling_factor == load_pipeline().vae.config.scaling_factor  # the shipped VAE
    assert pipe.vae.config.shift_factor == 0.0
    plain = pipe(PROMPT, generator=gen(), **CALL).images
    assert plain.shape == (1, 64, 64, 3)
    originals = dict(pipe.transformer.attn_processors)
    reg = AttentionRegulator(pipe, RegulationConfig.from_preset("paper", edit_steps=2))
    assert isinstance(reg, JointAttentionRegulator) and reg.stream.name == "clip"
    out = reg(PROMPT, targets=["circle", "square"], generator=gen(), **CALL).images
    assert np.isfinite(out).all() and np.abs(out - plain).max() > 1e-3
    reg.remove()
    assert all(pipe.transformer.attn_processors[k] is v for k, v in originals.items())
    np.testing.assert_array_equal(pipe(PROMPT, generator=gen(), **CALL).images, plain)


def test_text_columns_line_up_with_the_clip_tokenizer(run):
    """Without T5 the joint text stream is 77 CLIP columns (both CLIPs on one token grid) then the zero
    columns; attnreg's target columns are the CLIP tokenizer's positions, and training encodes prompts
    exactly as the pipeline does."""
    _, export, _ = run
    pipe = load_pipeline(path=export)
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, pipe.tokenizer_2(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids)
    info = AttentionRegulator(pipe).resolve(PROMPT, ["circle", "square"])
    circle, square = (pipe.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("circle", "square"))
    assert info["indices"] == [ids[0].tolist().index(circle), ids[0].tolist().index(square)] == [3, 7]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
        ours, ours_pooled = prompt_embeds(pipe.text_encoder, pipe.text_encoder_2, ids, 256)
    assert embeds.shape[1] == CLIP_LENGTH + 256
    torch.testing.assert_close(ours, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours_pooled, pooled, rtol=0, atol=0)


def test_one_weighted_zero_column_is_the_pipelines_256():
    """Training's ZeroColumnsAttnProcessor with one zero column computes what diffusers' own joint attention
    computes with the pipeline's 256 zero columns."""
    cfg = MMDiTConfig.tiny()
    torch.manual_seed(0)
    model = build_transformer(cfg, 16).eval()
    stock_processors = model.attn_processors
    x, clip = torch.randn(2, 4, 16, 16), torch.randn(2, 77, cfg.text_hidden + cfg.text2_hidden)
    pooled, t = torch.randn(2, cfg.text_hidden + cfg.text2_hidden), torch.tensor([500.0, 20.0])

    def call(n_zero):
        text = torch.cat([clip, clip.new_zeros(2, n_zero, clip.shape[-1])], dim=1)
        with torch.no_grad():
            return model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample

    stock, one_unweighted = call(256), call(1)
    assert (one_unweighted - stock).abs().max() > 1e-4  # the count of zero columns matters ...
    processor = use_zero_columns(model, 256)
    assert all(p is processor for p in model.attn_processors.values())
    torch.testing.assert_close(call(1), stock, rtol=1e-4, atol=1e-5)  # ... and log(256) on one column is it
    processor.counts = torch.tensor([8.0, 256.0])  # one count per caption, as training draws them
    mixed = call(1)
    model.set_attn_processor(stock_processors)
    torch.testing.assert_close(mixed[1], stock[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[0], call(8)[0], rtol=1e-4, atol=1e-5)


def test_tiny_pipeline_without_training_generates():
    pipe = build_pipeline(MMDiTConfig.tiny())
    pipe.set_progress_bar_config(disable=True)
    assert pipe(PROMPT, generator=gen(), **CALL).images.shape == (1, 64, 64, 3)


# -- short names ---------------------------------------------------------------------------------------


def test_short_names(capsys):
    assert set(MODELS) == {"toy-unet", "toy-mmdit"}
    assert model_path("toy-unet") == model_path()
    with pytest.raises(ValueError, match="unknown embedded model 'toy-dit'; valid: toy-unet, toy-mmdit"):
        model_path("toy-dit")
    if not (model_path("toy-mmdit", check=False) / "model_index.json").exists():
        with pytest.raises(ModelNotTrainedError, match=r"not trained yet .* attnreg toy train --arch mmdit"):
            load_pipeline(name="toy-mmdit")
        assert cli(["generate", PROMPT, "--model", "toy-mmdit"]) == 2
        err = capsys.readouterr().err
        assert "argument --model: the embedded model 'toy-mmdit' is not trained yet" in err
        assert "attnreg toy train --arch mmdit --export attnreg/toy/model-mmdit" in err
    else:  # the shipped weights: an SD3 pipeline that draws, and calibrated on the UNet model's prompts
        shipped = load_pipeline(name="toy-mmdit")
        assert type(shipped).__name__ == "StableDiffusion3Pipeline"
        assert shipped(PROMPT, generator=gen(), num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)
        spec = json.loads((model_path("toy-mmdit") / "attnreg.json").read_text())
        assert spec["calibration"]["layers"] and spec["calibration_prompts"]
    from attnreg.commands.common import model_name

    assert model_name("toy-unet") is None  # the default: records name it "embedded", as without --model
    assert model_name("some/folder") == "some/folder"


def test_bench_runs_on_the_mmdit_export(run, tmp_path):
    # `attnreg bench` is model-family neutral: the exported SD3 folder gives sd and attnreg images of the
    # folder's own size, scored by the shapes detector.
    from attnreg.eval.runner import run_benchmark

    _, export, _ = run
    summary = run_benchmark("shapes", "sd,attnreg,taca", seeds="0", model=str(export), out=tmp_path / "bench", steps=2,
                            limit=1, subsets=["2obj"], metrics="detect", progress=False, max_sequence_length=8)
    assert summary["generated"] == 3
    images = sorted((tmp_path / "bench" / "images").rglob("*.png"))
    assert len(images) == 3 and all(Image.open(p).size == (64, 64) for p in images)
    sd, taca = (np.asarray(Image.open(next((tmp_path / "bench" / "images").rglob(f"{m}*/**/*.png")))) for m in ("sd", "taca"))
    assert np.abs(sd.astype(int) - taca).max() > 0  # TACA's first steps change the picture
    records = [json.loads(p.read_text()) for p in (tmp_path / "bench" / "records").rglob("*.json")]
    assert len(records) == 3 and all(r["run"]["max_sequence_length"] == 8 for r in records)
    with pytest.raises(ValueError, match="max_sequence_length"):  # a folder's records share their call
        run_benchmark("shapes", "sd", seeds="0", model=str(export), out=tmp_path / "bench", steps=2, limit=1,
                      subsets=["2obj"], metrics="none", progress=False)
    assert (tmp_path / "bench" / "report.md").exists()


def test_explain_command_on_the_mmdit_export(run, tmp_path, capsys):
    # `attnreg explain --model FOLDER` on an SD3 folder: maps of the joint attention's image-to-text part
    _, export, _ = run
    out = tmp_path / "explain"
    assert cli(["explain", PROMPT, "--model", str(export), "--steps", "2", "--threads", "1", "--out", str(out)]) == 0
    assert {"maps.png", "stats.png", "compare.png", "explain.json"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "explain.json").read_text())
    assert "joint attention" in info["maps"] and info["recorded_layers"]
    assert "circle" in capsys.readouterr().out  # the diagnosis names the targets


def test_a_device_without_cuda_is_refused_before_any_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    with pytest.raises(SystemExit) as stop:
        train(["--arch", "mmdit", "--config", "tiny", "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert stop.value.code == 2 and "sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run" / "latents").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", [["-m", "attnreg.toy.train"], ["-m", "attnreg.cli", "toy", "train"]])
def test_sigterm_checkpoints_and_exits(command, tmp_path):
    """Both ways of starting the training stop on SIGTERM at the end of a step, with a checkpoint to resume."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *command, "--arch", "mmdit", "--config", "tiny", "--set", "mmdit_steps=100000",
                             "--out", str(out), "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait until the denoiser phase is stepping
        lines.append(line)
        if "mmdit step 5/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    start = time.time()
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and time.time() - start < 60
    assert "stop requested, checkpoint written" in rest, "".join(lines) + rest
    assert torch.load(out / "mmdit.pt", weights_only=False)["step"] >= 5


def test_pooled_off_exports_zero_projections_and_init_starts_from_an_export(run, tmp_path):
    from safetensors.torch import load_file

    _, export, _ = run
    out, again = tmp_path / "run", tmp_path / "model"
    assert train(["--arch", "mmdit", "--config", "tiny", "--out", str(out), "--export", str(again),
                  "--set", "pooled=false", f"init={export}"]) == 0
    for encoder in ("text_encoder", "text_encoder_2"):  # SD3's pooled vector is made from these: all zero
        weights = load_file(again / encoder / "model.safetensors")
        assert torch.count_nonzero(weights["text_projection.weight"]) == 0
        assert torch.count_nonzero(load_file(export / encoder / "model.safetensors")["text_projection.weight"]) > 0
    # 3 steps from the export's weights stay near them (a fresh start would be far) and did move them
    before = load_file(export / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(again / "transformer" / "diffusion_pytorch_model.safetensors")
    gap = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert 0 < gap < 0.02
