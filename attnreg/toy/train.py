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
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_write
from ..geometry import blocks_by_resolution
from ..options import parse_bool
from .world import COLOUR_NAMES, SHAPES, caption, random_scene, render

PHASES = ("vae", "latents", "unet", "mmdit")  # step_rng seeds by the index: append only
_STOP = {"flag": False}


def _request_stop(signum, frame):  # SIGTERM / SIGINT: checkpoint at the end of the current step, then exit
    _STOP["flag"] = True


def stop_requested(out: Path, stop_at: float | None) -> bool:
    """Every phase's stop check: --max-minutes passed, SIGTERM / Ctrl-C, or the file OUT/STOP. The file is
    consumed when seen, so the same command resumes afterwards."""
    if (out / "STOP").exists():
        (out / "STOP").unlink(missing_ok=True)
        log("STOP file found (and removed)")
        _STOP["flag"] = True
    return bool(stop_at and time.time() > stop_at) or _STOP["flag"]


@dataclass
class Config:
    seed: int = 0
    image_size: int = 64
    # VAE
    vae_channels: tuple = (16, 32, 64)
    vae_layers_per_block: int = 1
    vae_steps: int = 900
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    # latent pool
    pool_size: int = 60000
    pool_chunk: int = 2000
    encode_batch: int = 250
    # UNet
    unet_channels: tuple = (64, 96)
    unet_heads: tuple = (1, 2)
    unet_layers_per_block: int = 1
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 2
    text_intermediate: int = 256
    max_length: int = 77
    unet_steps: int = 12000
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    plain_prob: float = 0.1  # one-object scenes captioned "a circle" with this probability
    min_snr_gamma: float = 5.0
    log_every: int = 25
    threads: int = 2

    @classmethod
    def tiny(cls) -> "Config":
        return cls(vae_channels=(8, 16, 16), vae_steps=3, vae_batch=4, pool_size=16, pool_chunk=8, encode_batch=8,
                   unet_channels=(16, 32), unet_heads=(1, 1), text_hidden=16, text_layers=1, text_heads=1,
                   text_intermediate=32, unet_steps=3, batch=4, warmup=1, log_every=1)


# ----------------------------------------------------------------------------------------------
# model construction


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


def build_text_encoder(cfg: Config, hidden: int | None = None, layers: int | None = None, heads: int | None = None,
                       intermediate: int | None = None, projection: bool = False):
    """A CLIP text encoder from scratch over the real CLIP vocabulary (the config's sizes unless given);
    `projection`: a CLIPTextModelWithProjection (SD3's kind) with a projection as wide as the hidden size."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden = hidden or cfg.text_hidden
    tc = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate or cfg.text_intermediate,
                        num_hidden_layers=layers or cfg.text_layers, num_attention_heads=heads or cfg.text_heads,
                        max_position_embeddings=cfg.max_length, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                        **({"projection_dim": hidden} if projection else {}))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(tc)


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False)


def sampling_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1)


# ----------------------------------------------------------------------------------------------
# helpers


def step_rng(cfg: Config, phase: str, step: int) -> tuple[random.Random, torch.Generator]:
    s = (cfg.seed * 1_000_003 + PHASES.index(phase) * 100_000_007 + step) % (2**63)
    return random.Random(s), torch.Generator().manual_seed(s)


def to_tensor(images) -> torch.Tensor:
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


class LossLog:
    def __init__(self, path: Path):
        self.path = path
        if not path.exists():
            path.write_text("phase,step,loss,seconds\n")

    def add(self, phase: str, step: int, loss: float, seconds: float) -> None:
        with self.path.open("a") as f:
            f.write(f"{phase},{step},{loss:.6f},{seconds:.1f}\n")

    def truncate(self, phase: str, step: int) -> None:
        """Drop rows past `step` of `phase` (written after the checkpoint we resume from)."""
        rows = self.path.read_text().splitlines()
        keep = [rows[0]] + [r for r in rows[1:] if not (r.split(",")[0] == phase and int(r.split(",")[1]) > step)]
        self.path.write_text("\n".join(keep) + "\n")

    def plot(self, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r.split(",") for r in self.path.read_text().splitlines()[1:] if r]
        phases = [p for p in PHASES if any(r[0] == p for r in rows)] or ["vae", "unet"]
        fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), squeeze=False)
        for ax, phase in zip(axes[0], phases):
            pts = [(int(r[1]), float(r[2])) for r in rows if r[0] == phase]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, lw=0.6, alpha=0.5)
                k = max(1, len(y) // 30)
                if len(y) > k:
                    sm = np.convolve(y, np.ones(k) / k, mode="valid")
                    ax.plot(x[k - 1:], sm, lw=1.5)
                ax.set_yscale("log")
            ax.set_title(f"{phase} loss")
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out, dpi=80)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# phase 1: VAE


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


# ----------------------------------------------------------------------------------------------
# phase 2: latent pool

SHAPE_IDX = {s: i for i, s in enumerate(SHAPES)}
COLOUR_IDX = {c: i for i, c in enumerate(COLOUR_NAMES)}


def encode_pool(cfg: Config, out: Path, stop_at: float | None, vae=None) -> bool:
    """Render and encode the latent pool chunk by chunk (with `vae`, else the one trained in `out`); True
    when stopped early (finished chunks kept)."""
    d = out / "latents"
    d.mkdir(parents=True, exist_ok=True)
    vae = vae if vae is not None else load_vae(cfg, out)
    n_chunks = math.ceil(cfg.pool_size / cfg.pool_chunk)
    t0 = time.time()
    for c in range(n_chunks):
        p = d / f"chunk{c:04d}.pt"
        if p.exists():
            continue
        lo, hi = c * cfg.pool_chunk, min(cfg.pool_size, (c + 1) * cfg.pool_chunk)
        scenes, lat = [], []
        for i in range(lo, hi):
            scenes.append(random_scene(random.Random(cfg.seed * 7_919 + 10_000_019 + i)))
        with torch.no_grad():
            for b in range(0, len(scenes), cfg.encode_batch):
                x = to_tensor([render(s) for s in scenes[b:b + cfg.encode_batch]])
                lat.append(vae.encode(x).latent_dist.mean)
        objs = torch.full((len(scenes), 3, 2), -1, dtype=torch.int8)
        for i, s in enumerate(scenes):
            for j, o in enumerate(s):
                objs[i, j, 0], objs[i, j, 1] = SHAPE_IDX[o.shape], COLOUR_IDX[o.colour]
        atomic_save({"latents": torch.cat(lat).to(torch.float16), "objects": objs}, p)
        log(f"latents: chunk {c + 1}/{n_chunks} ({(time.time() - t0):.0f} s)")
        if stop_requested(out, stop_at):
            log("latents: stop requested, stopping")
            return True
    return False


def load_pool(cfg: Config, out: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    d = out / "latents"
    chunks = [torch.load(p, weights_only=False) for p in sorted(d.glob("chunk*.pt"))]
    lat = torch.cat([c["latents"] for c in chunks]).float()
    objs = torch.cat([c["objects"] for c in chunks])
    stats = d / "stats.json"
    if stats.exists():
        scale = json.loads(stats.read_text())["scaling_factor"]
    else:
        scale = float(1.0 / lat.std())
        stats.write_text(json.dumps({"scaling_factor": scale, "n": len(lat)}))
    return lat, objs, scale


# ----------------------------------------------------------------------------------------------
# phase 3: UNet + text encoder


class Captioner:
    def __init__(self, cfg: Config):
        from attnreg.tokenizer import load_clip_tokenizer

        self.tok = load_clip_tokenizer(model_max_length=cfg.max_length)
        self.cache: dict[str, torch.Tensor] = {}
        self.cfg = cfg

    def ids(self, captions: list[str]) -> torch.Tensor:
        out = []
        for c in captions:
            if c not in self.cache:
                self.cache[c] = torch.tensor(self.tok(c, padding="max_length", max_length=self.cfg.max_length,
                                                      truncation=True).input_ids)
            out.append(self.cache[c])
        return torch.stack(out)

    def caption(self, objs_row: torch.Tensor, rng: random.Random) -> str:
        pairs = [(COLOUR_NAMES[int(c)], SHAPES[int(s)]) for s, c in objs_row.tolist() if s >= 0]
        if len(pairs) == 1 and rng.random() < self.cfg.plain_prob:
            pairs = [(None, pairs[0][1])]
        return caption(pairs, rng)


def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, params, alpha=1 - decay)


def resume(path: Path, phase: str, modules: dict, opt, ema: list[torch.Tensor], losses: LossLog) -> int:
    """Load the checkpoint of `phase` at `path` into the modules (by name), optimiser and EMA; the step to
    go on from (0 without a checkpoint)."""
    if not path.exists():
        return 0
    ck = torch.load(path, weights_only=False, map_location="cpu")  # any device's checkpoint resumes on any other
    for name, module in modules.items():
        module.load_state_dict(ck[name])
    opt.load_state_dict(ck["opt"])
    for e, s in zip(ema, ck["ema"]):
        e.copy_(s)
    losses.truncate(phase, ck["step"])
    log(f"{phase}: resumed at step {ck['step']}")
    return ck["step"]


def warmup_cosine_lr(cfg: Config, step: int, total: int) -> float:
    """Linear warm-up, then a cosine down to a fifth of the peak at `total` steps."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    return lr * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))


def draw_batch(cfg: Config, capt: "Captioner", lat, objs, scale: float, rng: random.Random, g: torch.Generator):
    """A step's scenes: (scaled latents, caption token ids), captions reshuffled and `cond_dropout` of them empty."""
    idx = torch.randint(0, len(lat), (cfg.batch,), generator=g)
    caps = [capt.caption(objs[i], rng) for i in idx.tolist()]
    caps = ["" if rng.random() < cfg.cond_dropout else c for c in caps]
    return lat[idx] * scale, capt.ids(caps)


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


def to_device(module, *tensors):
    """`tensors` on `module`'s device: every draw is made on the CPU, so any device trains on the same batches."""
    device = next(module.parameters()).device
    return tuple(x.to(device) for x in tensors)


def fit(cfg: Config, out: Path, losses: LossLog, phase: str, modules: dict, loss_fn, total: int, ckpt_seconds: float,
        stop_at: float | None, export_fn=None, device: str = "cpu") -> bool:
    """The denoiser phase's loop, shared by the UNet and the MMDiT: AdamW with warm-up and cosine, gradient clip
    1, EMA of every module, `loss_fn(step)` for the step's loss. Checkpoints (`OUT/<phase>.pt`: each module's
    state by name, optimiser, EMA, step) every `ckpt_seconds`, at the end and on a stop request, each followed
    by `export_fn(ema, step)`. True when stopped early. `device`: where the modules train (the batches are
    drawn on the CPU either way)."""
    for m in modules.values():
        m.to(device)
    params = [p for m in modules.values() for p in m.parameters()]
    for name, m in modules.items():
        log(f"{phase}: {name} {sum(p.numel() for p in m.parameters()):,} parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = [p.detach().clone() for p in params]
    path = out / f"{phase}.pt"
    step = resume(path, phase, modules, opt, ema, losses)
    for m in modules.values():
        m.train()

    def checkpoint():
        atomic_save({**{name: m.state_dict() for name, m in modules.items()}, "opt": opt.state_dict(), "ema": ema,
                     "step": step, "config": asdict(cfg)}, path)
        if export_fn is not None:
            export_fn(ema, step)
        log(f"{phase}: checkpoint at step {step}" + (", exported" if export_fn else ""))

    last_ck, t0, run, start = time.time(), time.time(), [], step
    while step < total:
        lr = warmup_cosine_lr(cfg, step, total)
        for pg in opt.param_groups:
            pg["lr"] = lr
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema_update(ema, [p.detach() for p in params], min(cfg.ema_decay, (1 + step) / (10 + step)))
        run.append(loss.item())
        if step % cfg.log_every == 0 or step == total:
            m = float(np.mean(run))
            run = []
            losses.add(phase, step, m, time.time() - t0)
            log(f"{phase} step {step}/{total} loss {m:.5f} lr {lr:.2e} ({(time.time() - t0) / (step - start):.2f} s/step this run)")
        stop = stop_requested(out, stop_at)
        if time.time() - last_ck > ckpt_seconds or step == total or stop:
            checkpoint()
            last_ck = time.time()
            if stop:
                log(f"{phase}: stop requested, checkpoint written, exiting")
                return True
    return False


def load_ema(modules: list, ema_weights) -> None:
    """Copy EMA weights (in the order of the modules' parameters, as `fit` keeps them) into `modules`."""
    if ema_weights is None:
        return
    with torch.no_grad():
        for p, e in zip([p for m in modules for p in m.parameters()], ema_weights):
            p.copy_(e)


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


# ----------------------------------------------------------------------------------------------
# export


def slim_tokenizer(tokdir: Path, cfg: Config) -> None:
    """The slow tokenizer's two files (1.4 MB) instead of the 3.5 MB tokenizer.json."""
    from attnreg.tokenizer import save_clip_tokenizer_files

    for f in tokdir.iterdir():
        if f.name not in ("tokenizer_config.json", "special_tokens_map.json"):
            f.unlink()
    save_clip_tokenizer_files(tokdir)
    tc = json.loads((tokdir / "tokenizer_config.json").read_text())
    tc.update({"model_max_length": cfg.max_length, "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"})
    (tokdir / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))


def publish(pipe, dest: Path, meta: dict, cfg: Config, losses: LossLog | None, tokenizers=("tokenizer",)) -> Path:
    """`pipe.save_pretrained` into `dest` with `attnreg.json` (= `meta`), `train_config.json`, `loss.csv` and
    `loss.png`, written beside it first and then swapped in, so `dest` is never half-written."""
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in tokenizers:
        slim_tokenizer(tmp / name, cfg)
    (tmp / "attnreg.json").write_text(json.dumps(meta, indent=2))
    (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if losses is not None:
        shutil.copy(losses.path, tmp / "loss.csv")
        try:
            losses.plot(tmp / "loss.png")
        except Exception as e:  # plotting must never kill a training run
            log(f"plot failed: {e}")
    if dest.exists():
        old = dest.with_name(dest.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)
    return dest


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


def load_pool_stats(out: Path):
    s = json.loads((out / "latents" / "stats.json").read_text())
    return None, None, s["scaling_factor"]


# ----------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT ask the running phase to stop at the end of its step (checkpoint, then exit) while
    the block runs; the previous handlers come back after it. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
                 ("latents", lambda: encode_pool(cfg, out, stop_at)),
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
    # the package's copy of this module, not __main__'s: the phases (mmdit.py imports `fit` from it) read its stop flag
    from attnreg.toy.train import main as package_main

    sys.exit(package_main())
