"""The web app's callbacks as plain functions: no Gradio here, so they can be tested (and reused) alone.

An `Engine` holds one pipeline and a lock (one generation at a time, whatever the web server does) and
answers the page's questions: which targets to suggest for a prompt, what tokens the prompt is made of
and which of them a target becomes, and the generation itself, checked first so that a mistake comes
back as one readable sentence (`InputError` and the library's own `ValueError`s), never a traceback.

The generation is `attnreg.explain.explain` for the first pair (original and regulated from the same
seed, the attention maps over the steps, the numbers of explain.json); with more than one image, pair k
uses seed + k (plain pipeline and `AttentionRegulator`, each with its own generator) and has no maps.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from attnreg import AttentionRegulator, RegulationConfig
from attnreg.config import PRESETS
from attnreg.options import DEFAULT_GUIDANCE, DEFAULT_STEPS
from attnreg.tokens import TargetError, auto_targets, format_tokens, resolve_targets, token_table

PRESET_CHOICES = tuple(PRESETS)  # the default first
MAX_IMAGES = 4
MAX_STEPS = 200
MAX_SEED = 2**32 - 1

# The page's examples: (prompt, targets, seed), run with the page's other settings (50 steps, guidance 7.5,
# the auto preset by default). On the embedded model (checked with the detector, tests/test_app.py):
EMBEDDED_EXAMPLES = [
    ["a red circle and a blue square", "circle, square", 42],  # plain: a red square; regulated: the circle
    ["a blue triangle and a red circle", "triangle, circle", 1],  # plain: an extra red triangle, no circle; regulated: right
    ["a purple circle and a green square", "circle, square", 3],  # both right: regulation keeps a good image
    ["a green triangle and a yellow circle", "triangle, circle", 2],  # both wrong: regulation does not always help
]
GENERIC_EXAMPLES = [
    ["a cat and a dog", "cat, dog", 42],
    ["a painting of an elephant with glasses", "elephant, glasses", 42],
    ["a red book and a yellow vase", "book, vase", 42],
]


class InputError(ValueError):
    """A value from the page that cannot be run; the message says what to change."""


class Stopped(RuntimeError):
    """The user pressed Stop; raised inside the pipeline's UNet call at the next step."""

    def __init__(self, done: int, total: int):
        super().__init__(f"stopped after {done} of {total} denoising steps; nothing was kept")
        self.done, self.total = done, total


def parse_targets(text: str | None) -> list[str] | None:
    """"circle, square" -> ["circle", "square"]; empty -> None (the prompt's nouns)."""
    words = [t.strip() for t in (text or "").split(",") if t.strip()]
    return words or None


@dataclass
class Verdict:
    """The shapes detector's reading of one image of the embedded model, against the prompt."""

    found: list[str]  # "red circle", ... as detected, top to bottom
    missing: list[str]  # named objects without a detected match
    success: bool | None  # None: the prompt names no shape the detector knows
    extra: int

    @property
    def text(self) -> str:
        found = ", ".join(self.found) or "nothing"
        tail = f"; {self.extra} extra object(s)" if self.extra else ""
        if self.success is None:
            return f"detector found: {found} (the prompt names no circle, square or triangle to check)"
        if self.success:
            return f"right: detector found {found}{tail}"
        return f"wrong: detector found {found}; missing {', '.join(self.missing)}{tail}"

    @property
    def markdown(self) -> str:
        head, _, rest = self.text.partition(": ")
        return f"**{head.upper()}**: {rest}" if self.success is not None else self.text


def verdict(prompt: str, image) -> Verdict:
    """What `attnreg.toy.detect.score` makes of `image` for `prompt`, with the missing objects named."""
    from attnreg.toy.detect import parse_prompt, score

    result = score(prompt, image)
    named = parse_prompt(prompt)
    pool = [(s, c) for s, c, _ in result["detections"]]
    missing = []
    for colour, shape in sorted(named, key=lambda p: p[0] is None):  # as detect.match: coloured ones first
        hit = next((k for k, (s, c) in enumerate(pool) if s == shape and (colour is None or c == colour)), None)
        if hit is None:
            missing.append(f"{colour} {shape}" if colour else f"a {shape}")
        else:
            del pool[hit]
    return Verdict(
        found=[f"{c} {s}" for s, c, _ in result["detections"]],
        missing=missing,
        success=bool(result["success"]) if named else None,
        extra=int(result["extra_objects"]),
    )


@dataclass
class Pair:
    seed: int
    original: object  # PIL image
    regulated: object
    verdicts: dict | None = None  # "original"/"regulated" -> Verdict (embedded model only)


@dataclass
class Result:
    prompt: str
    targets: dict  # AttentionRegulator.resolve()
    pairs: list[Pair]
    maps: object  # PIL image of explain's maps figure (the first pair)
    stats: object  # PIL image of explain's stats figure
    numbers: dict  # explain.json
    table: list[list]  # a summary of `numbers`, see `numbers_table`
    table_headers: list[str]
    diagnosis: list[str]
    seconds: float
    settings: dict = field(default_factory=dict)


def figure_image(fig, dpi: int = 80):
    """A matplotlib Figure as a PIL image."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def numbers_table(numbers: dict) -> tuple[list[str], list[list]]:
    """explain.json, small: per run and word token, its peak attention (the largest pixel of its
    head- and layer-averaged map) at the first step, the last edited step and the last step, and its
    mean attention over the pixels and all steps."""
    a, b = numbers["violin_steps"]
    headers = ["run", "index", "token", "target", f"peak @ step {a}", f"peak @ step {b}", "peak @ last step",
               "mean (all steps)"]
    rows = []
    for run, data in numbers["runs"].items():
        steps = data["steps"]
        for tok in data["tokens"]:
            peak = dict(zip(steps, tok["max"]))
            rows.append([
                "original" if run == "vanilla" else "regulated", tok["index"], tok["token"],
                "yes" if tok["target"] else "", round(peak.get(a, float("nan")), 3), round(peak.get(b, float("nan")), 3),
                round(tok["max"][-1], 3), round(sum(tok["mean"]) / len(tok["mean"]), 4),
            ])
    return headers, rows


class Engine:
    """One pipeline, one generation at a time, and the page's callbacks."""

    def __init__(self, pipe, embedded: bool = False, default_steps: int = DEFAULT_STEPS,
                 default_guidance: float = DEFAULT_GUIDANCE):
        self.pipe = pipe
        self.embedded = embedded
        self.default_steps, self.default_guidance = default_steps, default_guidance
        self.lock = threading.Lock()

    @classmethod
    def load(cls, model: str | None = None, device: str = "cpu", dtype: str = "float32",
             default_steps: int = DEFAULT_STEPS, default_guidance: float = DEFAULT_GUIDANCE):
        from attnreg.pipelines import load_pipeline
        from attnreg.toy import model_path

        from attnreg.toy import MODELS

        pipe = load_pipeline(model or model_path(), device=device, dtype=dtype)
        shipped = {model_path(name, check=False).resolve() for name in MODELS}
        embedded = model is None or Path(model).resolve() in shipped  # the shapes world: verdicts make sense
        return cls(pipe, embedded=embedded, default_steps=default_steps, default_guidance=default_guidance)

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    # -- as the user types ------------------------------------------------------------------------
    def suggest_targets(self, prompt: str) -> list[str]:
        """The prompt's nouns (spaCy when installed, else the library's lexical rule), keeping only those
        the text encoder sees (a noun past the 77-token truncation is dropped, as the library does)."""
        if not (prompt or "").strip():
            return []
        nouns, _source = auto_targets(prompt)
        kept = []
        for noun in nouns:
            try:
                resolve_targets(self.tokenizer, prompt, [noun])
            except TargetError:
                continue
            kept.append(noun)
        return kept

    def token_rows(self, prompt: str, targets_text: str | None) -> tuple[list[list], str]:
        """The token table (index, token, which target it belongs to) and a one-line note: what the
        targets become, or why one of them cannot be found."""
        prompt = prompt or ""
        table = token_table(self.tokenizer, prompt)
        targets = parse_targets(targets_text)
        auto = targets is None
        if auto:
            targets = self.suggest_targets(prompt)
        owner: dict[int, str] = {}
        problems = []
        for target in targets:
            try:
                for i in resolve_targets(self.tokenizer, prompt, [target]):
                    owner.setdefault(i, target)
            except TargetError as err:
                problems.append(str(err))
        rows = [[t.index, t.text, owner.get(t.index, "")] for t in table]
        if problems:
            note = "Problem: " + " | ".join(problems)
        elif not prompt.strip():
            note = "Type a prompt: its tokens and the suggested targets appear here."
        elif not owner:
            note = "Problem: no target: name words of the prompt (comma-separated) in Targets."
        else:
            how = "the prompt's nouns (targets box empty)" if auto else "targets"
            note = f"{how}: " + ", ".join(f"{w} → {', '.join(f'{i}:{table[i].text}' for i, o in sorted(owner.items()) if o == w)}"
                                        for w in dict.fromkeys(owner.values()))
        return rows, note

    # -- checks -----------------------------------------------------------------------------------
    def check(self, prompt, targets_text, seed, steps, guidance, preset, n_images) -> dict:
        """The page's values as a run's settings, or an InputError saying what to change."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise InputError("The prompt is empty: type what to draw, e.g. \"a red circle and a blue square\".")
        seed = _integer("Seed", seed, 0, MAX_SEED)
        steps = _integer("Steps", steps, 1, MAX_STEPS)
        n_images = _integer("Number of images", n_images, 1, MAX_IMAGES)
        try:
            guidance = float(guidance)
        except (TypeError, ValueError):
            raise InputError(f"Guidance must be a number > 1, got {guidance!r}.") from None
        if not guidance > 1:
            raise InputError(f"Guidance must be > 1 (got {guidance:g}): attention regulation edits the conditional "
                             "half of classifier-free guidance, which a scale <= 1 does not run.")
        if preset not in PRESET_CHOICES:
            raise InputError(f"Preset must be one of {', '.join(PRESET_CHOICES)}, got {preset!r}.")
        config = RegulationConfig.from_preset(preset)
        edit_steps = steps // 2 if config.edit_steps is None else config.edit_steps
        if edit_steps > steps:
            raise InputError(f"The {preset} preset edits {edit_steps} steps; use at least that many steps.")
        targets = parse_targets(targets_text)
        if len(prompt) > 2000:
            raise InputError("The prompt is longer than 2000 characters; the text encoder sees 77 tokens.")
        return dict(prompt=prompt, targets=targets, seed=seed, steps=steps, guidance=guidance, preset=preset,
                    n_images=n_images, config=config)

    # -- the run ----------------------------------------------------------------------------------
    def generate(self, prompt, targets_text, seed, steps, guidance, preset, n_images=1, *,
                 progress=None, stop: threading.Event | None = None) -> Result:
        """Original and regulated images from the same noise, the attention maps over the steps and the
        numbers. `progress(done, total, what)` is called before every UNet step; setting `stop` ends the
        run at the next step with `Stopped`. Errors in the input raise ValueError (InputError,
        TargetError, GuidanceError, ...) with a message meant for the user."""
        from attnreg.explain import explain

        s = self.check(prompt, targets_text, seed, steps, guidance, preset, n_images)
        prompt, targets, config = s["prompt"], s["targets"], s["config"]
        with self.lock:
            start = time.perf_counter()
            reg = AttentionRegulator(self.pipe, config)
            info = reg.resolve(prompt, targets)  # TargetError for an unknown target, listing the tokens
            if not info["indices"]:
                raise InputError(
                    f"No target found in {prompt!r}: name the words to regulate in Targets, from its tokens: "
                    f"{format_tokens(token_table(self.tokenizer, prompt))}")
            total = 2 * s["steps"] * s["n_images"]
            denoiser = getattr(self.pipe, "unet", None) or self.pipe.transformer  # a UNet, or an MMDiT's transformer
            watch = _Watch(denoiser, total, progress, stop)
            call = dict(num_inference_steps=s["steps"], guidance_scale=s["guidance"])
            with watch:
                watch.what = f"pair 1 of {s['n_images']} (seed {s['seed']}), with attention maps"
                ex = explain(self.pipe, prompt, info["targets"], seed=s["seed"], config=config, **call)
                pairs = [Pair(s["seed"], ex.images["vanilla"], ex.images["regulated"])]
                for k in range(1, s["n_images"]):
                    pair_seed = s["seed"] + k
                    watch.what = f"pair {k + 1} of {s['n_images']} (seed {pair_seed})"
                    original = self.pipe(prompt, generator=_generator(pair_seed), **call).images[0]
                    regulated = reg(prompt, targets=info["targets"], generator=_generator(pair_seed), **call).images[0]
                    pairs.append(Pair(pair_seed, original, regulated))
            maps, stats = figure_image(ex.maps_figure), figure_image(ex.stats_figure)
        if self.embedded:
            for pair in pairs:
                pair.verdicts = {"original": verdict(prompt, pair.original), "regulated": verdict(prompt, pair.regulated)}
        headers, rows = numbers_table(ex.numbers)
        settings = {k: v for k, v in s.items() if k != "config"}
        return Result(prompt=prompt, targets=info, pairs=pairs, maps=maps, stats=stats, numbers=ex.numbers,
                      table=rows, table_headers=headers, diagnosis=list(ex.diagnosis),
                      seconds=time.perf_counter() - start, settings=settings)


def _generator(seed: int):
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def _integer(name: str, value, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number from {low} to {high}, got {value!r}.") from None
    if number != int(number) or not low <= number <= high:
        raise InputError(f"{name} must be a whole number from {low} to {high}, got {value!r}.")
    return int(number)


class _Watch:
    """A forward pre-hook on the UNet for the run: reports each step and raises `Stopped` once `stop` is
    set. One UNet call is one denoising step of one run (classifier-free guidance batches both halves)."""

    def __init__(self, unet, total: int, progress, stop):
        self.unet, self.total, self.progress, self.stop = unet, total, progress, stop
        self.done, self.what, self.handle = 0, "", None

    def _hook(self, module, args, kwargs):
        if self.stop is not None and self.stop.is_set():
            raise Stopped(self.done, self.total)
        if self.progress is not None:
            self.progress(self.done, self.total, self.what)
        self.done += 1

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False
