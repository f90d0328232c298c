"""AttentionRegulator: the plug-in a user puts around a diffusers pipeline."""

from __future__ import annotations

import inspect
import logging
import warnings
from contextlib import contextmanager

from .config import RegulationConfig
from .families import SUPPORTED_PIPELINES, UnsupportedPipelineError, check_pipeline, joint_family
from .geometry import block_level, cross_attention_layers, layer_blocks
from .modelspec import find_calibration, model_spec
from .options import split_list
from .processor import CallPlan, RegulatedAttnProcessor, RegulationState, positional_seeds
from .tokens import TargetError, auto_targets, eos_index, modifier_columns, resolve_targets, token_table

log = logging.getLogger(__name__)

__all__ = ["AttentionRegulator", "GuidanceError", "LayerError", "SUPPORTED_PIPELINES", "UnsupportedPipelineError",
           "check_pipeline"]


class LayerError(ValueError):
    """A layer name that is not a cross-attention layer of the UNet."""


class GuidanceError(ValueError):
    """The call has no unconditional half (guidance scale <= 1), or too few steps to edit."""


def default_layers(unet) -> tuple[str, ...]:
    """The model's own choice (`attnreg.json` beside its weights), else every block at the lowest
    cross-attention resolution except the mid block: SD's 16 x 16 layers at 512 px."""

    layers = model_spec(unet).get("paper_layers")
    if layers:
        return tuple(layers)
    blocks = layer_blocks(unet)
    downs = [b for b in blocks if b.startswith("down_blocks.")]
    ups = [b for b in blocks if b.startswith("up_blocks.")]
    if not downs or not ups:
        return tuple(b for b in blocks if b != "mid_block") or tuple(blocks)
    deepest = max(downs, key=lambda b: int(b.split(".")[1]))
    level = block_level(unet, deepest)
    return (deepest, *(b for b in ups if block_level(unet, b) == level))


def layers_named(names: list[str], entry: str) -> list[str]:
    """The attention modules among `names` that `entry` names: itself, or every module under a block prefix
    (a trailing ".processor", as diffusers' processor dicts write it, is ignored)."""
    entry = entry.removesuffix(".processor")
    return [n for n in names if n == entry or n.startswith(entry + ".")]


def select_layers(unet, layers: tuple[str, ...] | None) -> frozenset[str]:
    """The cross-attention modules named by `layers` (block prefixes or full module names)."""
    layers = default_layers(unet) if layers is None else layers
    names = cross_attention_layers(unet)
    chosen = set()
    for entry in layers:
        hits = layers_named(names, entry)
        entry = entry.removesuffix(".processor")
        if not hits:
            raise LayerError(
                f"{entry!r} holds no cross-attention layer of this UNet; valid blocks: {', '.join(layer_blocks(unet))} "
                f"(or a full name such as {names[0]!r})"
            )
        chosen.update(hits)
    return frozenset(chosen)


NO_LAYERS = ("attnreg: no layer to edit (the model's calibration chose none; run attnreg calibrate again or name "
             "layers): the images are the plain pipeline's")


def pipeline_prompt(prompt, kwargs: dict):
    """What the pipeline gets as `prompt`: None when the call brings its own `prompt_embeds` (diffusers takes
    one or the other); the text is then only the regulator's, to find the targets."""
    return None if kwargs.get("prompt_embeds") is not None else prompt


def pipeline_default(pipe, name: str):
    """The default of one of the pipeline's call arguments (num_inference_steps, guidance_scale, ...)."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


class AttentionRegulator:
    """Attention Regulation around a StableDiffusionPipeline or StableDiffusionXLPipeline; on a
    StableDiffusion3Pipeline or FluxPipeline it returns an `attnreg.joint.JointAttentionRegulator` (same API).

        reg = AttentionRegulator(pipe)  # RegulationConfig(): the default; RegulationConfig.paper(): the release
        image = reg("a cat and a dog", targets=["cat", "dog"], generator=g).images[0]
        reg.remove()

    The pipeline is only changed while a call runs: its processors on the edited layers are wrapped,
    and restored (the same objects) when the call ends, however it ends. Every keyword other than
    `targets` goes to the pipeline unchanged, `callback_on_step_end` included.
    """

    _families: dict[str, type] = {}  # joint_family -> its regulator class (`register_family`)

    def __new__(cls, pipe, *args, **kwargs):
        # SD3 and FLUX (joint attention) get the regulator attnreg.joint registers (same API); an unsupported
        # pipeline is refused by __init__
        if cls is AttentionRegulator:
            cls = AttentionRegulator._families.get(joint_family(pipe), cls)
        return super().__new__(cls)

    @staticmethod
    def register_family(family: str, regulator: type) -> None:
        """`AttentionRegulator(pipe)` returns a `regulator` for pipelines of `family` (`families.joint_family`)."""
        AttentionRegulator._families[family] = regulator

    # With layer_choice "calibrated" and no calibration stored for the model, calibrate it now (one line says
    # so; cached in the user cache): on a UNet a few short vanilla runs. The MMDiT regulator does not, since
    # there a calibration costs far more than the call; it uses the structural rule until `attnreg calibrate`.
    calibrates_on_first_use = True
    # what runs that calibration: pipe -> layers or None (`calibrate.calibrated_layers`, installed by the
    # package's __init__: calibrate.py observes the model through a regulator, so it imports this module)
    first_use_calibration = None

    def __init__(self, pipe, config: RegulationConfig | None = None):
        check_pipeline(pipe)
        self.pipe = pipe
        self.config = config or RegulationConfig()
        layers = self.config.layers
        if layers is None and self.config.layer_choice == "calibrated":
            found = find_calibration(pipe)
            if found:
                layers = tuple(found["layers"])
            elif self.calibrates_on_first_use and self.first_use_calibration is not None:
                layers = self.first_use_calibration(pipe)  # None when it cannot be had: the structural rule
        self.layers = self.select_layers(layers)
        self.state = self._new_state()
        self.last_targets: list[dict] = []
        self._removed = False

    def _new_state(self) -> RegulationState:
        return RegulationState(self.config, self.layers)

    # -- targets --------------------------------------------------------------------------------
    def resolve(self, prompt: str, targets: list[str | int] | None) -> dict:
        """{"prompt", "targets", "indices", "tokens", "source"} for one prompt."""
        source = "given"
        if targets is None:
            targets, source = auto_targets(prompt)
            targets = self._within_reach(prompt, targets)
        indices = self._columns(prompt, list(targets))
        text = {t.index: t.text for t in self.token_table(prompt)}
        return {
            "prompt": prompt,
            "targets": list(targets),
            "indices": indices,
            "tokens": [text[i] for i in indices],
            "source": source,
        }

    def _columns(self, prompt: str, targets: list) -> list[int]:
        """The attention columns of `targets` in `prompt` (a TargetError naming the prompt's tokens)."""
        return resolve_targets(self.pipe.tokenizer, prompt, targets)

    def token_table(self, prompt: str) -> list:
        """The prompt's tokens as the cross-attention sees them, indexed by column."""
        return token_table(self.pipe.tokenizer, prompt)

    def word_tokens(self, prompt: str) -> list:
        """The prompt's word tokens (the token table without its special tokens), indexed by column."""
        return self.token_table(prompt)[1:-1]

    def select_layers(self, layers) -> frozenset[str]:
        """The attention modules named by `layers` (None: the model's default); a LayerError otherwise."""
        return select_layers(self.pipe.unet, None if layers is None else tuple(layers))

    def observable_layers(self) -> list[str]:
        """Every layer an observer can be shown (in forward order)."""
        return cross_attention_layers(self.pipe.unet)

    @property
    def maps_are(self) -> str:
        """What an observer's probabilities are, in words (explain.json says it)."""
        return "the cross-attention of the conditional half"

    def _within_reach(self, prompt: str, nouns: list[str]) -> list[str]:
        """Automatic targets the text encoder sees: a noun past the tokenizer's truncation is dropped with a
        warning (the user never chose it), where a given target there is an error."""
        kept = []
        for noun in nouns:
            try:
                self._columns(prompt, [noun])
            except TargetError as err:
                warnings.warn(f"attnreg: automatic target dropped: {err}", stacklevel=3)
                continue
            kept.append(noun)
        return kept

    def _per_prompt_targets(self, prompts: list[str], targets) -> list:
        if targets is None or isinstance(targets, str):
            targets = split_list(targets)
            return [targets] * len(prompts)
        targets = list(targets)
        if targets and all(isinstance(t, (list, tuple)) or t is None for t in targets):
            if len(targets) != len(prompts):
                raise ValueError(f"got {len(targets)} target lists for {len(prompts)} prompts; give one per prompt")
            return [None if t is None else list(t) for t in targets]
        return [targets] * len(prompts)  # one flat list: the same targets for every prompt

    # -- the call -------------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str], targets=None, **kwargs):
        """The pipeline's output for `prompt`, regulated on `targets` (None: the prompt's nouns).

        With `prompt_embeds` (and the pipeline's other embeddings, e.g. from compel) the pipeline runs on
        those, and `prompt` is only read to find the targets: it must be the text the embeddings were made
        from, so that its tokens sit in the same columns."""
        plan = self.plan(prompt, targets, **kwargs)
        if plan is None:
            warnings.warn("attnreg: no targets given or found; running the pipeline without regulation", stacklevel=2)
            return self.pipe(prompt=pipeline_prompt(prompt, kwargs), **kwargs)
        return self.run(prompt, plan, **kwargs)

    def plan(self, prompt: str | list[str], targets=None, **kwargs) -> CallPlan | None:
        """What a call with these arguments edits: targets resolved (kept in `last_targets`), the call
        checked, the edited steps fixed. None when no prompt has a target."""
        if self._removed:
            raise RuntimeError("this AttentionRegulator was removed; make a new one")
        if not self.layers:
            warnings.warn(NO_LAYERS, stacklevel=2)
        if prompt is None:
            raise ValueError("attnreg needs the prompt text to find the target tokens; with prompt_embeds (compel's "
                             "weighted prompts, for example) pass the text they were made from as `prompt` too")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        resolved = [self.resolve(p, t) for p, t in zip(prompts, self._per_prompt_targets(prompts, targets))]
        for r in resolved:
            if r["source"] != "given":
                chosen = ", ".join(f"{w} -> {i}" for w, i in zip(r["tokens"], r["indices"])) or "none found"
                log.info("targets for %r (%s): %s", r["prompt"], r["source"], chosen)
        self.last_targets = resolved
        _, edit_steps = self.call_steps(kwargs)
        if not any(r["indices"] for r in resolved):
            return None
        per_image = kwargs.get("num_images_per_prompt", 1) or 1
        eos = [self._eos(r) for r in resolved]  # once per prompt, not per image
        columns, nouns, pairs = [tuple(r["indices"]) for r in resolved], None, None
        if self.config.binding > 0:
            bound = [self._bind(r) for r in resolved]
            columns = [c for c, _, _ in bound]
            nouns = [n for _, n, _ in bound for _ in range(per_image)]
            pairs = [p for _, _, p in bound for _ in range(per_image)]
        return CallPlan(
            n_images=len(prompts) * per_image,
            image_targets=[c for c in columns for _ in range(per_image)],
            image_eos=[e for e in eos for _ in range(per_image)],
            edit_steps=edit_steps,
            image_nouns=nouns,
            image_pairs=pairs,
            image_seeds=self._image_seeds(kwargs.get("generator"), len(prompts) * per_image),
        )

    def _eos(self, resolved: dict) -> int:
        return eos_index(self.pipe.tokenizer, resolved["prompt"])

    def _image_seeds(self, generator, n_images: int) -> list[int]:
        """The stream of each image's initial weights, keyed by its generator's seed and its place among
        the images that generator makes (by position when no generator is given): image i of a batch
        starts as the single-image call with the same generator does."""
        if generator is None:
            return positional_seeds(self.config, n_images)
        per_generator = [generator] * n_images if not isinstance(generator, list) else list(generator)
        count: dict[int, int] = {}
        seeds = []
        for g in per_generator[:n_images]:
            place = count.get(id(g), 0)
            count[id(g)] = place + 1
            seeds.append((g.initial_seed() * 6364136223846793005 + place * 1442695040888963407 + self.config.seed) % 2**63)
        return seeds

    def call_steps(self, kwargs: dict) -> tuple[int, int]:
        """(denoising steps, edited steps) of a call with these pipeline keywords, or a GuidanceError when
        the call cannot be regulated (no unconditional half, more edited steps than steps)."""
        steps = kwargs.get("num_inference_steps") or pipeline_default(self.pipe, "num_inference_steps")
        edit_steps = steps // 2 if self.config.edit_steps is None else self.config.edit_steps
        if edit_steps > steps:
            raise GuidanceError(f"edit_steps={edit_steps} is larger than num_inference_steps={steps}")
        self._check_guidance(kwargs)
        return int(steps), int(edit_steps)

    def _check_guidance(self, kwargs: dict) -> None:
        """A GuidanceError when the call has no conditional half to edit."""
        guidance = kwargs.get("guidance_scale", pipeline_default(self.pipe, "guidance_scale"))
        if getattr(self.pipe.unet.config, "time_cond_proj_dim", None) is not None:
            raise GuidanceError(
                "attnreg edits the conditional half of classifier-free guidance, and this UNet is guidance-"
                "distilled (unet.config.time_cond_proj_dim is set, as in LCM): its pipeline runs no unconditional "
                "half at any guidance_scale. Use a UNet without guidance embedding."
            )
        if guidance <= 1:
            raise GuidanceError(
                f"attnreg edits the conditional half of classifier-free guidance; guidance_scale={guidance} "
                "gives no unconditional half. Use guidance_scale > 1."
            )

    @contextmanager
    def observing(self, *observers):
        """Let `observers` (e.g. an AttentionRecorder) see the cross-attention of the calls made inside the
        `with` block: `reg(...)` regulated, `reg.run(prompt, None, ...)` plain."""
        self.state.observers.extend(observers)
        try:
            yield self
        finally:
            for observer in observers:
                self.state.observers.remove(observer)

    def _bind(self, resolved: dict) -> tuple[tuple[int, ...], int, tuple[tuple[int, int], ...]]:
        """Columns (the nouns' tokens, then their modifiers'), the number of noun columns, and the
        (modifier column, noun column) pairs; records the modifiers in `resolved["modifiers"]`."""
        prompt = resolved["prompt"]
        nouns = list(resolved["indices"])
        words_of = self.word_tokens(prompt)
        text = {t.index: t.text for t in words_of}
        columns, pairs, words = list(nouns), [], []
        for target in resolved["targets"]:
            idx = self._columns(prompt, [target])
            for m in modifier_columns(words_of, idx[0], exclude=set(nouns)):
                if m not in columns:
                    columns.append(m)
                pairs.append((columns.index(m), nouns.index(idx[-1])))
                words.append(f"{text[m]} -> {target}")
        resolved["modifiers"] = words
        return tuple(columns), len(nouns), tuple(pairs)

    def run(self, prompt, plan: CallPlan | None, **kwargs):
        """Call the pipeline with the processors installed for `plan` (None: a plain call, seen by the
        observers only)."""
        state = self.state

        def remember_latent(module, args, kw):
            sample = args[0] if args else kw["sample"]
            state.latent_hw = tuple(sample.shape[-2:])

        wrapped = {
            key: RegulatedAttnProcessor(key.removesuffix(".processor"), proc, state)
            if key.removesuffix(".processor") in self.layers or state.observers
            else proc
            for key, proc in self.pipe.unet.attn_processors.items()
        }
        return self._call_with(self.pipe.unet, wrapped, remember_latent, prompt, plan, kwargs)

    def _call_with(self, model, wrapped: dict, pre_hook, prompt, plan, kwargs):
        """The pipeline call with `wrapped` as `model`'s processors and `pre_hook` before its forward; the
        step counted at each step's end (the user's own callback still runs), and the original processors
        (the same objects) back however the call ends."""
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        state, originals = self.state, model.attn_processors
        user_callback = kwargs.pop("callback_on_step_end", None)
        if isinstance(user_callback, (PipelineCallback, MultiPipelineCallbacks)):
            kwargs.setdefault("callback_on_step_end_tensor_inputs", user_callback.tensor_inputs)

        def on_step_end(pipe, step, timestep, callback_kwargs):
            state.step = step + 1
            return user_callback(pipe, step, timestep, callback_kwargs) if user_callback else {}

        hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        state.start(plan)
        try:
            model.set_attn_processor(wrapped)
            return self.pipe(prompt=pipeline_prompt(prompt, kwargs), callback_on_step_end=on_step_end, **kwargs)
        finally:
            model.set_attn_processor(originals)
            hook.remove()
            state.stop()

    def remove(self) -> None:
        """Switch regulation off for good. The pipeline already has its own processors back: they are
        only replaced while a call of this regulator runs."""
        self._removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
