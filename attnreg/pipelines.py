"""Loading a text-to-image pipeline from a hub id or a local folder, on a device and dtype."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}") from None


def check_device(name: str) -> torch.device:
    """`name` as a torch device that exists here, or a ValueError naming what is available."""
    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        available.append("mps")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; available here: {', '.join(available)}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {name!r} is not available (this torch {torch.__version__} sees "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s)); "
                         f"available here: {', '.join(available)}")
    if device.type == "mps" and "mps" not in available:
        raise ValueError(f"device 'mps' is not available; available here: {', '.join(available)}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported; available here: {', '.join(available)}")
    return device


def looks_local(model: str | Path) -> bool:
    """A path the user meant as a folder (absolute, relative with a dot, or existing), not a hub id."""
    text = str(model)
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def check_pipeline_folder(path: str | Path) -> None:
    """A complete `save_pretrained` folder, or a ValueError naming the missing part."""
    folder = Path(path)
    if not folder.exists():
        raise ValueError(f"no such model folder: {path}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a pipeline folder")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json "
                         "(save one with pipe.save_pretrained(folder))")
    try:
        parts = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{index} is not valid JSON: {err}") from None
    missing = [name for name, value in parts.items()
               if not name.startswith("_") and isinstance(value, list) and value[0] is not None
               and not (folder / name).is_dir()]
    if missing:
        raise ValueError(f"the pipeline folder {folder} lacks {', '.join(missing)} (listed in model_index.json)")


def damaged_file(folder: Path) -> tuple[Path, str] | None:
    """The first file of a pipeline folder that cannot be read (a config that is not JSON, a weights file
    that is empty or whose safetensors header or length is wrong), with what is wrong; None if all read."""
    from safetensors import safe_open

    for path in sorted(folder.rglob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return path, f"not valid JSON ({err})"
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".safetensors", ".bin", ".pt", ".ckpt") and path.is_file() and path.stat().st_size == 0:
            return path, "an empty file"
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), "pt"):
                    pass
            except Exception as err:  # noqa: BLE001 - SafetensorError has no public base class
                return path, f"not a complete safetensors file ({err})"
    return None


def damaged_folder_message(folder: Path, err: Exception) -> str:
    """Why a local pipeline folder did not load: the file that failed and what is wrong with it (the hub is
    not involved, so no advice about it)."""
    found = damaged_file(folder)
    if found is None:
        return f"could not load the pipeline folder {folder}: {err}"
    path, problem = found
    return (f"could not load the pipeline folder {folder}: {path} is {problem}; copy or save that file again "
            "(pipe.save_pretrained(folder) writes every file)")


def check_hub(model_id: str, timeout: float = 5.0) -> None:
    """Fail fast, once, for a hub id that is neither in the local cache nor reachable (the hub clients
    would otherwise retry for minutes). Offline mode (HF_HUB_OFFLINE=1) leaves it to the cache."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    try:
        snapshot_download(model_id, local_files_only=True)
        return  # in the cache
    except Exception:  # noqa: BLE001 - not cached (or partly): ask the hub
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ValueError(f"{model_id!r} is not in the local cache and HF_HUB_OFFLINE is set; pass a local folder "
                         "saved with save_pretrained")
    try:
        HfApi().model_info(model_id, timeout=timeout)
    except HfHubHTTPError as err:
        raise ValueError(f"the model hub does not know {model_id!r} ({err.__class__.__name__}); pass a local folder "
                         "saved with save_pretrained, or a valid hub id") from None
    except Exception as err:  # noqa: BLE001 - connection errors come in many classes
        raise ValueError(f"cannot reach the model hub for {model_id!r} ({err.__class__.__name__}); without "
                         "network access, pass a local folder saved with save_pretrained") from None


def load_tokenizer(model: str | Path):
    """The CLIP tokenizer of a pipeline folder (its `tokenizer/`), or a ValueError naming what is missing."""
    from transformers import CLIPTokenizer

    folder = Path(model)
    if looks_local(model):
        sub = folder / "tokenizer"
        files = {p.name for p in sub.iterdir()} if sub.is_dir() else set()
        if not ({"vocab.json", "merges.txt"} <= files or "tokenizer.json" in files):
            raise ValueError(f"{folder} has no tokenizer (expected {sub} with vocab.json and merges.txt, as "
                             "save_pretrained writes)")
    else:
        check_hub(str(model))
    try:
        return CLIPTokenizer.from_pretrained(str(model), subfolder="tokenizer")
    except OSError as err:
        raise OSError(f"could not load the tokenizer of {str(model)!r}: {err}") from err


@contextmanager
def quiet_loading():
    """No progress bars and no library notices while a pipeline loads (the "requires torchvision" lines
    of transformers' image processors concern parts attnreg does not use); Python warnings and errors still show."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(before[0])
        diffusers_logging.set_verbosity(before[1])
        transformers_logging.enable_progress_bar()
        diffusers_logging.enable_progress_bar()


def load_pipeline(model: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """A diffusers pipeline from `model` (a local `save_pretrained` folder or a hub id), with its progress
    bar off and no safety checker; the embedded shapes model is `attnreg.toy.load_pipeline()`."""
    from diffusers import DiffusionPipeline

    if model is None:
        raise ValueError("load_pipeline needs a model (a local folder or a hub id); the embedded shapes model "
                         "is attnreg.toy.load_pipeline() or attnreg.toy.model_path()")
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if looks_local(model):
        model = os.path.expanduser(str(model))
        check_pipeline_folder(model)
    else:
        check_hub(str(model))
    extra = {}
    index = Path(model) / "model_index.json"
    if index.is_file():
        parts = json.loads(index.read_text())
        if "safety_checker" in parts:
            extra = {"safety_checker": None, "requires_safety_checker": False}
        # A part saved as None ([null, null], e.g. SD3's text_encoder_3 / tokenizer_3) is not reloaded as None
        # by from_pretrained unless it is passed again: pass it.
        extra.update({name: None for name, value in parts.items()
                      if not name.startswith("_") and isinstance(value, list) and value[0] is None})
    try:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(str(model), dtype=dtype, **extra)
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many classes (OSError, SafetensorError, ...)
        if looks_local(model):
            raise ValueError(damaged_folder_message(Path(model), err)) from err
        if not isinstance(err, OSError):
            raise
        raise OSError(
            f"could not load the pipeline {str(model)!r}: {err}. Without access to the model hub, pass a local "
            "folder saved with save_pretrained."
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_text_side(model: str | Path):
    """For a local SD3 or FLUX folder: (family, its tokenizers, the pipeline's default T5 length), loading
    the tokenizers only (no text encoder, no transformer); None for any other model. The tokenizers come
    as an object with the pipeline's attribute names (tokenizer, tokenizer_2, tokenizer_3), and
    `text_encoder_3` says whether SD3's T5 encoder is there (its columns are zeros without it)."""
    import inspect
    from types import SimpleNamespace

    index = Path(os.path.expanduser(str(model))) / "model_index.json"
    if not (looks_local(model) and index.is_file()):
        return None
    spec = json.loads(index.read_text())
    name = str(spec.get("_class_name", ""))
    family = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}.get(name)
    if family is None:
        return None
    import diffusers
    from transformers import AutoTokenizer

    def present(part):
        entry = spec.get(part)
        return isinstance(entry, list) and entry[0] is not None

    parts = ("tokenizer", "tokenizer_3") if family == "sd3" else ("tokenizer_2",)
    with quiet_loading():
        loaded = {p: AutoTokenizer.from_pretrained(str(index.parent), subfolder=p) if present(p) else None for p in parts}
    loaded["text_encoder_3"] = True if present("text_encoder_3") else None
    length = inspect.signature(getattr(diffusers, name).__call__).parameters["max_sequence_length"].default
    return family, SimpleNamespace(**loaded), int(length)


def default_image_size(pipe) -> int:
    """The side in pixels a pipeline makes by default: its denoiser's sample size (UNet or SD3
    transformer; FLUX's pipeline default) times the VAE's scale factor."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = getattr(getattr(denoiser, "config", None), "sample_size", None) or getattr(pipe, "default_sample_size", None)
    if sample is None:
        raise ValueError(f"{type(pipe).__name__} says no default size; pass one (--size)")
    return int(sample) * pipe.vae_scale_factor
