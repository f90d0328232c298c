"""What both embedded denoisers' training runs share: the configuration, the stop signals (SIGTERM, Ctrl-C, a
STOP file, --max-minutes), the latent pool, the captions, the loop with its checkpoints, EMA and schedule, the
loss log and the export. The UNet's phases are in train.py, the MMDiT's in mmdit.py.

All randomness of step ``s`` comes from a generator seeded by (seed, phase, s), so a resumed run draws the
same batches as an uninterrupted one."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write
from ..tokenizer import CLIP_TEXT_IDS
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


def build_text_encoder(cfg: Config, hidden: int | None = None, layers: int | None = None, heads: int | None = None,
                       intermediate: int | None = None, projection: bool = False):
    """A CLIP text encoder from scratch over the real CLIP vocabulary (the config's sizes unless given);
    `projection`: a CLIPTextModelWithProjection (SD3's kind) with a projection as wide as the hidden size."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden = hidden or cfg.text_hidden
    tc = CLIPTextConfig(hidden_size=hidden, intermediate_size=intermediate or cfg.text_intermediate,
                        num_hidden_layers=layers or cfg.text_layers, num_attention_heads=heads or cfg.text_heads,
                        **{**CLIP_TEXT_IDS, "max_position_embeddings": cfg.max_length},
                        **({"projection_dim": hidden} if projection else {}))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(tc)


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


SHAPE_IDX = {s: i for i, s in enumerate(SHAPES)}


COLOUR_IDX = {c: i for i, c in enumerate(COLOUR_NAMES)}


def encode_pool(cfg: Config, out: Path, stop_at: float | None, vae) -> bool:
    """Render and encode the latent pool chunk by chunk with `vae`; True when stopped early (finished chunks
    kept)."""
    d = out / "latents"
    d.mkdir(parents=True, exist_ok=True)
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


def load_pool_stats(out: Path):
    s = json.loads((out / "latents" / "stats.json").read_text())
    return None, None, s["scaling_factor"]


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
