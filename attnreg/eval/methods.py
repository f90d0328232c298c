"""Methods compared by `attnreg bench`: small registered objects.

Adding a method touches only this file: subclass `Method`, give it a `name`, implement `generate`, and
decorate it with `@register_method`.
"""

from __future__ import annotations

import json


class MethodError(ValueError):
    """An unknown method, a bad option, or a method that cannot run on this pipeline."""


METHODS: dict[str, type["Method"]] = {}
NAMED_OPTIONS: dict[str, dict] = {}  # method name -> options it sets before the user's (--set)


def register_method(cls, name: str | None = None, description: str | None = None, **options):
    """Register `cls` under its `name` (as a decorator), or under another name with some options set:
    `register_method(AttnReg, "attnreg-paper", "...", preset="paper")`. A method registered under another
    name is a subclass that carries that name, so its messages name it."""
    if name and name != cls.name:
        cls = type(cls.__name__, (cls,), {"name": name, "description": description or cls.description})
    METHODS[cls.name] = cls
    if options:
        NAMED_OPTIONS[cls.name] = options
    return cls


class Method:
    """One way of making an image from (prompt, targets, generator).

    `options` are the method's own settings (from `--set METHOD.KEY=VALUE` or the Python API); they are
    stored in every record, and a different set of options gives different file names."""

    name = "base"
    description = ""

    def __init__(self, pipe, **options):
        self.pipe = pipe
        self.options = dict(options)

    def config(self) -> dict:
        """JSON-able description of everything this method does differently (stored in records)."""
        return dict(self.options)

    def generate(self, prompt: str, targets: list, generator, **call):
        """One PIL image. `call` holds num_inference_steps, guidance_scale, height, width."""
        raise NotImplementedError


def make_method(name: str, pipe, **options) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name](pipe, **{**NAMED_OPTIONS.get(name, {}), **options})


def check_methods(names: list[str]) -> None:
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise MethodError(f"unknown method(s) {', '.join(bad)}; valid: {', '.join(METHODS)}")


@register_method
class PlainSD(Method):
    name = "sd"
    description = "the pipeline as it is"

    def __init__(self, pipe, **options):
        if options:
            raise MethodError(f"method sd takes no options, got {', '.join(options)}")
        super().__init__(pipe)

    def generate(self, prompt, targets, generator, **call):
        return self.pipe(prompt, generator=generator, **call).images[0]


@register_method
class AttnReg(Method):
    """Attention Regulation; options are `RegulationConfig` fields, `preset` included (default: auto)."""

    name = "attnreg"
    description = "Attention Regulation, the default preset (auto)"

    def __init__(self, pipe, preset: str | None = None, **options):
        from attnreg import AttentionRegulator, RegulationConfig
        from attnreg.config import DEFAULT_PRESET, ConfigError

        preset = preset or DEFAULT_PRESET
        super().__init__(pipe, preset=preset, **options)
        try:  # an unknown option is a ConfigError too (it lists the valid ones)
            self.reg_config = RegulationConfig.from_preset(preset, **options)
        except ConfigError as err:
            raise MethodError(f"method {self.name}: {err}") from None
        self.regulator = AttentionRegulator(pipe, self.reg_config)

    def config(self) -> dict:
        # The layers actually edited: with layers=None they come from the model (its calibration).
        return json.loads(json.dumps({**self.reg_config.to_dict(), "edited_layers": sorted(self.regulator.layers)}))

    def generate(self, prompt, targets, generator, **call):
        return self.regulator(prompt, targets=list(targets), generator=generator, **call).images[0]


register_method(AttnReg, "attnreg-paper", "Attention Regulation, the authors' release (paper preset)", preset="paper")
register_method(AttnReg, "attnreg-bind", "Attention Regulation with binding 1 and no concentration",
                binding=1.0, concentration=0.0)


@register_method
class Taca(Method):
    """TACA, training-free (attnreg.taca): on SD3 / FLUX only. Options: gamma (1.2), steps (3)."""

    name = "taca"
    description = "TACA (Lv et al. 2025), training-free: image-query x text-key logits x gamma in the first steps"

    def __init__(self, pipe, **options):
        from attnreg.regulator import UnsupportedPipelineError
        from attnreg.taca import GAMMA, STEPS, TextAttentionScaling

        defaults = {"gamma": GAMMA, "steps": STEPS}
        bad = [k for k in options if k not in defaults]
        if bad:
            raise MethodError(f"unknown option(s) {', '.join(bad)} for method {self.name}; valid: {', '.join(defaults)}")
        super().__init__(pipe, **{**defaults, **options})
        try:
            self.scaler = TextAttentionScaling(pipe, **self.options)
        except (UnsupportedPipelineError, ValueError) as err:
            raise MethodError(f"method {self.name}: {err}") from None

    def generate(self, prompt, targets, generator, **call):
        return self.scaler(prompt, generator=generator, **call).images[0]


def cross_attention_resolution(unet, height: int, vae_scale_factor: int, layers=None) -> tuple[int, int]:
    """Side of the cross-attention maps of `layers` (default: attnreg's default layers) at `height`;
    with layers at several resolutions, the lowest is taken."""
    from attnreg.geometry import block_of, map_side
    from attnreg.regulator import select_layers

    latent = height // vae_scale_factor
    side = min(map_side(unet, block_of(name), latent) for name in select_layers(unet, tuple(layers) if layers else None))
    return (side, side)


def _ae_pipeline_class():
    """diffusers' A&E pipeline class, or None when the installed diffusers lacks it."""
    try:
        from diffusers import StableDiffusionAttendAndExcitePipeline
    except (ImportError, AttributeError):
        return None
    return StableDiffusionAttendAndExcitePipeline


@register_method
class AttendAndExcite(Method):
    """diffusers' StableDiffusionAttendAndExcitePipeline on the same components (SD 1.x/2.x only).

    Options: max_iter_to_alter (default 25, i.e. the first half of 50 steps), thresholds (dict step ->
    loss threshold; {} switches refinement off), scale_factor (20), layers (where attn_res is measured)."""

    name = "attend-and-excite"
    description = "Attend-and-Excite (Chefer et al. 2023), diffusers' pipeline"
    DEFAULTS = {"max_iter_to_alter": 25, "thresholds": {0: 0.05, 10: 0.5, 20: 0.8}, "scale_factor": 20}

    def __init__(self, pipe, **options):
        bad = [k for k in options if k not in (*self.DEFAULTS, "layers")]
        if bad:
            raise MethodError(
                f"unknown option(s) {', '.join(bad)} for method {self.name}; valid: {', '.join([*self.DEFAULTS, 'layers'])}"
            )
        super().__init__(pipe, **options)
        StableDiffusionAttendAndExcitePipeline = _ae_pipeline_class()
        if StableDiffusionAttendAndExcitePipeline is None:
            import diffusers

            raise MethodError(
                f"method attend-and-excite needs diffusers' StableDiffusionAttendAndExcitePipeline, which diffusers "
                f"{diffusers.__version__} does not provide (it is in diffusers 0.15 .. 0.42 at least)"
            ) from None
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if isinstance(pipe, StableDiffusionXLPipeline) or not isinstance(pipe, StableDiffusionPipeline):
            raise MethodError(
                f"method attend-and-excite runs only on Stable Diffusion 1.x/2.x pipelines, not {type(pipe).__name__}"
            )
        components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
        self.ae = StableDiffusionAttendAndExcitePipeline(**components)
        self.ae.set_progress_bar_config(disable=True)
        opts = {**self.DEFAULTS, **{k: v for k, v in options.items() if k != "layers"}}
        opts["thresholds"] = {int(k): float(v) for k, v in dict(opts["thresholds"]).items()}
        self.call_options = opts

    def attn_res(self, height: int | None) -> tuple[int, int]:
        from attnreg.pipelines import default_image_size

        height = height or default_image_size(self.pipe)
        return cross_attention_resolution(self.pipe.unet, height, self.pipe.vae_scale_factor, self.options.get("layers"))

    def config(self) -> dict:
        out = dict(self.call_options)
        out["thresholds"] = {str(k): v for k, v in out["thresholds"].items()}
        if "layers" in self.options:
            out["layers"] = list(self.options["layers"])
        return out

    def generate(self, prompt, targets, generator, **call):
        from attnreg.tokens import resolve_targets

        indices = resolve_targets(self.pipe.tokenizer, prompt, list(targets))
        unet = self.pipe.unet
        originals = unet.attn_processors  # A&E installs its own processors on the shared UNet: put them back
        try:
            return self.ae(
                prompt, token_indices=indices, generator=generator, attn_res=self.attn_res(call.get("height")),
                **self.call_options, **call,
            ).images[0]
        finally:
            unet.set_attn_processor(originals)
