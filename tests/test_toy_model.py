"""The shipped toy pipeline (offline) and the training code on a tiny config."""

import json

import numpy as np
import pytest
import torch

from attnreg.toy import load_pipeline, model_info, model_path, score


def test_shipped_model_files():
    p = model_path()
    total = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, total
    for sub in ("unet", "vae", "text_encoder"):
        assert list((p / sub).glob("*.safetensors"))
    info = model_info()
    assert info["image_size"] == 64 and info["paper_layers"]
    assert (p / "train_config.json").exists() and (p / "loss.png").exists() and (p / "loss.csv").exists()


def test_load_offline_and_generate():
    pipe = load_pipeline()
    info = model_info()
    keys = [k for k in pipe.unet.attn_processors if k.endswith("attn2.processor")]
    for prefix in info["paper_layers"]:
        assert any(k.startswith(prefix + ".") for k in keys), prefix
    # cross-attention at two or more resolutions
    assert len(info["cross_attention_layers_by_resolution"]) >= 2
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert pipe.tokenizer.model_max_length == 77 and pipe.text_encoder.config.max_position_embeddings == 77
    out = pipe("a red circle", num_inference_steps=8, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
               height=64, width=64, output_type="np")
    img = (out.images[0] * 255).round().astype(np.uint8)
    assert img.shape == (64, 64, 3)
    s = score("a red circle", img)
    assert set(s) >= {"success", "shapes_present", "extra_objects"}


@pytest.mark.slow
def test_training_runs_tiny(tmp_path):
    from attnreg.toy.train import main

    out, export = tmp_path / "run", tmp_path / "model"
    assert main(["--config", "tiny", "--out", str(out), "--export", str(export)]) == 0
    ck = torch.load(out / "unet.pt", weights_only=False)
    assert ck["step"] == 3
    # resuming a finished run does nothing more; raising the step count goes on from the checkpoint
    assert main(["--config", "tiny", "--out", str(out), "--set", "unet_steps=4", "vae_steps=3"]) == 0
    assert torch.load(out / "unet.pt", weights_only=False)["step"] == 4
    rows = (out / "loss.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows if r.startswith("unet")] == ["1", "2", "3", "4"]
    info = json.loads((export / "attnreg.json").read_text())
    assert info["image_size"] == 64
    pipe = load_pipeline(path=export)
    img = pipe("a red circle", num_inference_steps=2, output_type="np", height=64, width=64).images[0]
    assert img.shape == (64, 64, 3)


@pytest.mark.slow
def test_training_stop_file_checkpoints_then_resumes(tmp_path):
    """OUT/STOP stops any phase (the VAE's too) after its current step with a checkpoint; it is consumed,
    so the same command then resumes and finishes."""
    from attnreg.toy.train import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "STOP").touch()
    assert main(["--config", "tiny", "--out", str(out), "--phases", "vae"]) == 0
    assert torch.load(out / "vae.pt", weights_only=False)["step"] == 1 and not (out / "STOP").exists()
    assert main(["--config", "tiny", "--out", str(out), "--phases", "vae"]) == 0
    assert torch.load(out / "vae.pt", weights_only=False)["step"] == 3
    rows = (out / "loss.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows if r.startswith("vae")][-1] == "3"
