"""Train the embedded toy Stable Diffusion on coloured-shape scenes.

    python -m attnreg.toy.train --out runs/toy [--config default|tiny] [--export attnreg/toy/model]

Three phases, each resumable (re-run the same command and it goes on where it stopped):

1. ``vae``: an AutoencoderKL (64x64x3 -> 16x16x4) trained on freshly rendered scenes
   (MSE + L1 + a small KL term).
2. ``latents``: a pool of scenes is rendered and encoded once (posterior means, scaled to unit std),
   stored in chunks under ``OUT/latents``.
3. ``unet``: UNet2DConditionModel + a CLIPTextModel trained from scratch jointly on the cached
   latents (epsilon prediction, min-SNR-5 weighting, 10 % caption dropout for classifier-free
   guidance), with EMA weights. The caption order is reshuffled every time a scene is drawn.

``--arch mmdit`` trains the StableDiffusion3Pipeline of `attnreg.toy.mmdit` instead (phases ``latents``
with the shipped frozen VAE, then ``mmdit``), through the same loop (`fit`), checkpoints and export.

All randomness of step ``s`` comes from a generator seeded by (seed, phase, s), so a resumed run
draws the same batches as an uninterrupted one. Every ``--ckpt-minutes`` a checkpoint (model,
EMA, optimiser, step) is written and the EMA pipeline is exported with ``save_pretrained`` to
``--export`` together with ``attnreg.json``, ``train_config.json``, ``loss.csv`` and ``loss.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import blocks_by_resolution
from ..options import parse_bool
from .loop import (_STOP, Captioner, Config, LossLog, atomic_save, build_text_encoder, draw_batch, encode_pool, fit,
                   load_ema, load_pool, load_pool_stats, log, publish, step_rng, stop_on_signals, stop_requested, to_device, to_tensor)
from .world import COLOUR_NAMES, SHAPES, random_scene, render

def build_vae(cfg: Config):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(cfg.vae_channels), layers_per_block=cfg.vae_layers_per_block, latent_channels=4,
        norm_num_groups=min(16, cfg.vae_channels[0]), sample_size=cfg.image_size, mid_block_add_attention=False,
    )


def build_unet(cfg: Config):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (len(cfg.vae_channels) - 1), in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=tuple(cfg.unet_channels), layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        # diffusers' historical naming: `attention_head_dim` is the number of heads per block here.
        attention_head_dim=tuple(cfg.unet_heads), norm_num_groups=min(16, cfg.unet_channels[0]),
    )


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False)


def sampling_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1)


def train_vae(cfg: Config, out: Path, losses: LossLog, ckpt_seconds: float, stop_at: float | None) -> bool:
    """Train (or resume) the VAE; True when stopped early (checkpoint written)."""
    path = out / "vae.pt"
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step = 0
    if path.exists():
        ck = torch.load(path, weights_only=False)
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        losses.truncate("vae", step)
        log(f"vae: resumed at step {step}")
    if step >= cfg.vae_steps:
        return False
    vae.train()
    last_ck, t0, run = time.time(), time.time(), []
    while step < cfg.vae_steps:
        rng, g = step_rng(cfg, "vae", step)
        x = to_tensor([render(random_scene(rng)) for _ in range(cfg.vae_batch)])
        lr = cfg.vae_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        run.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.vae_steps:
            m = float(np.mean(run))
            run = []
            losses.add("vae", step, m, time.time() - t0)
            log(f"vae step {step}/{cfg.vae_steps} loss {m:.5f} ({(time.time() - t0) / step:.2f} s/step this run)")
        stop = stop_requested(out, stop_at)
        if time.time() - last_ck > ckpt_seconds or step == cfg.vae_steps or stop:
            atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "config": asdict(cfg)}, path)
            last_ck = time.time()
            if stop:
                log("vae: stop requested, checkpoint written, exiting")
                return True
    return False


def load_vae(cfg: Config, out: Path):
    vae = build_vae(cfg)
    vae.load_state_dict(torch.load(out / "vae.pt", weights_only=False)["model"])
    return vae.eval()


def unet_loss(cfg: Config, unet, te, capt, sched, snr, lat, objs, scale: float, step: int) -> torch.Tensor:
    """The noise-prediction loss of step `step`'s batch (drawn from the step's own generators)."""
    rng, g = step_rng(cfg, "unet", step)
    x0, ids = draw_batch(cfg, capt, lat, objs, scale, rng, g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch,), generator=g)
    w = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]  # min-SNR weighting for epsilon prediction
    noisy, t, ids, noise, w = to_device(unet, sched.add_noise(x0, noise, t), t, ids, noise, w)
    pred = unet(noisy, t, te(ids)[0]).sample
    return (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()


def train_unet(cfg: Config, out: Path, losses: LossLog, ckpt_seconds: float, stop_at: float | None, export: Path | None,
               device: str = "cpu") -> bool:
    lat, objs, scale = load_pool(cfg, out)
    log(f"unet: pool of {len(lat)} latents, scaling factor {scale:.4f}")
    unet, te = build_unet(cfg), build_text_encoder(cfg)
    sched = noise_scheduler()
    acp = sched.alphas_cumprod
    snr = acp / (1 - acp)
    capt = Captioner(cfg)
    export_fn = None
    if export is not None:
        def export_fn(ema, step):
            export_pipeline(cfg, out, export, ema_weights=ema, losses=losses, step=step)
    return fit(cfg, out, losses, "unet", {"unet": unet, "text_encoder": te},
               lambda step: unet_loss(cfg, unet, te, capt, sched, snr, lat, objs, scale, step),
               cfg.unet_steps, ckpt_seconds, stop_at, export_fn, device)


def export_pipeline(cfg: Config, out: Path, dest: Path, ema_weights=None, losses: LossLog | None = None, step: int = 0) -> Path:
    """Write a StableDiffusionPipeline (EMA weights) to `dest` with save_pretrained."""
    from diffusers import StableDiffusionPipeline
    from attnreg.tokenizer import load_clip_tokenizer

    vae = load_vae(cfg, out)
    _, _, scale = load_pool_stats(out)
    vae.register_to_config(scaling_factor=scale)
    unet, te = build_unet(cfg), build_text_encoder(cfg)
    load_ema([unet, te], ema_weights)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=load_clip_tokenizer(model_max_length=cfg.max_length),
                                   unet=unet, scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    latent = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    layers = blocks_by_resolution(unet, latent)
    meta = {
        "paper_layers": [b for b in layers[str(latent)] if b != "mid_block"],
        "image_size": cfg.image_size,
        "latent_size": latent,
        "cross_attention_layers_by_resolution": layers,
        "num_inference_steps": 50,
        "guidance_scale": 7.5,
        "scheduler": "DPMSolverMultistepScheduler",
        "shapes": list(SHAPES),
        "colours": list(COLOUR_NAMES),
        "train_step": step,
        "note": "Toy SD trained on coloured-shape scenes by attnreg.toy.train; see attnreg/toy/README.md.",
    }
    return publish(pipe, dest, meta, cfg, losses)


ARCHS = ("unet", "mmdit")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="attnreg toy train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="unet", choices=ARCHS,
                    help="unet: the StableDiffusionPipeline (VAE, latents, UNet); mmdit: a StableDiffusion3Pipeline on "
                    "the shipped model's frozen VAE (latents, mmdit; see attnreg/toy/mmdit.py)")
    ap.add_argument("--out", default=None, help="checkpoints, latent cache and logs (default: runs/toy, runs/toy-mmdit)")
    ap.add_argument("--config", default="default", help="'default', 'tiny' (tests) or a JSON file")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="override config fields; repeat --set or give several pairs to one")
    ap.add_argument("--export", default=None, help="folder to export the EMA pipeline to at each checkpoint")
    ap.add_argument("--phases", default=None, help="default: vae,latents,unet (unet) or latents,mmdit (mmdit)")
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    ap.add_argument("--export-only", action="store_true", help="export from the latest checkpoint and exit")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    ap.add_argument("--device", default="cpu", help="where the denoiser and text encoders train: cpu (default), cuda, "
                    "cuda:1, ...; the batches are drawn on the CPU, so every device sees the same ones")
    a = ap.parse_args(argv)
    try:
        device = torch.device(a.device)
    except RuntimeError as err:
        ap.error(f"--device {a.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: this torch ({torch.__version__}) sees no CUDA device")

    mmdit = a.arch == "mmdit"
    if mmdit:
        from . import mmdit as arch
    cls = arch.MMDiTConfig if mmdit else Config
    out = Path(a.out or ("runs/toy-mmdit" if mmdit else "runs/toy"))
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    if a.config == "tiny":
        cfg = cls.tiny()
    elif a.config == "default":
        cfg = cls(**_tuplify(json.loads(saved.read_text()))) if saved.exists() else cls()
    else:
        cfg = cls(**_tuplify(json.loads(Path(a.config).read_text())))
    for kv in a.set:
        k, v = kv.split("=", 1)
        cur = getattr(cfg, k)
        if isinstance(cur, bool):  # bool("false") is True
            try:
                value = parse_bool(v)
            except ValueError as err:
                ap.error(f"--set {k}: {err}")
        else:
            value = tuple(int(x) for x in v.split(",")) if isinstance(cur, tuple) else type(cur)(v)
        setattr(cfg, k, value)
    saved.write_text(json.dumps(asdict(cfg), indent=2))
    torch.set_num_threads(a.threads or cfg.threads)
    _STOP["flag"] = False  # a stop belongs to one run (cleared before the handlers can set it)
    with stop_on_signals():  # a SIGTERM / Ctrl-C checkpoints before exiting
        return _train(a, cfg, out, arch if mmdit else None)


def _train(a, cfg: Config, out: Path, arch) -> int:
    """The phases `a` asks for, on `cfg` in `out`; `arch`: the mmdit module, or None for the UNet."""
    mmdit = arch is not None
    torch.manual_seed(cfg.seed)
    losses = LossLog(out / "loss.csv")
    stop_at = time.time() + 60 * a.max_minutes if a.max_minutes else None
    export = Path(a.export) if a.export else None
    ckpt_s = 60 * a.ckpt_minutes
    log(f"config: {json.dumps(asdict(cfg))}")
    if a.export_only:
        ck = torch.load(out / f"{a.arch}.pt", weights_only=False)
        if mmdit:
            arch.export_mmdit(cfg, out, export or arch.EXPORT, ema_weights=ck["ema"], losses=losses, step=ck["step"])
        else:
            export_pipeline(cfg, out, export or Path("attnreg/toy/model"), ema_weights=ck["ema"], losses=losses, step=ck["step"])
        return 0
    if mmdit:
        steps = (("latents", lambda: arch.encode_pool_mmdit(cfg, out, stop_at)),
                 ("mmdit", lambda: arch.train_mmdit(cfg, out, losses, ckpt_s, stop_at, export, a.device)))
    else:
        steps = (("vae", lambda: train_vae(cfg, out, losses, ckpt_s, stop_at)),
                 ("latents", lambda: encode_pool(cfg, out, stop_at, load_vae(cfg, out))),
                 ("unet", lambda: train_unet(cfg, out, losses, ckpt_s, stop_at, export, a.device)))
    phases = (a.phases or ",".join(name for name, _ in steps)).split(",")
    for phase, run in steps:
        if phase in phases and run():
            log("stopped; run the same command to resume")
            return 0
    log("done")
    return 0


def _tuplify(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


if __name__ == "__main__":
    # the package's copy of this module, not __main__'s: the phases read the stop flag of attnreg.toy.loop
    from attnreg.toy.train import main as package_main

    sys.exit(package_main())
