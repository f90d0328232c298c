"""`JointAttentionRegulator`: `AttentionRegulator` on SD3 and FLUX pipelines."""

from __future__ import annotations

from ..config import RegulationConfig
from ..families import UnsupportedPipelineError, check_pipeline, joint_family
from ..processor import RegulationState
from ..regulator import AttentionRegulator, GuidanceError, pipeline_default
from ..tokens import Token
from .attention import JointRegulatedProcessor, editable_layers, select_joint_layers
from .text import TextStream, choose_text_stream, joint_token_tables, stream_columns, stream_table, word_tokens

class JointAttentionRegulator(AttentionRegulator):
    """`AttentionRegulator` for SD3 and FLUX (see the module docstring for what is edited where).

    text_stream: SD3 only, "t5" (default when the pipeline has T5) or "clip" (default without it).
    """

    calibrates_on_first_use = False  # see AttentionRegulator and the package docstring

    def __init__(self, pipe, config: RegulationConfig | None = None, text_stream: str | None = None):
        self.family = joint_family(pipe)
        if self.family is None:
            check_pipeline(pipe)  # the error naming what is supported
            raise UnsupportedPipelineError(f"{type(pipe).__name__} has no joint attention; use AttentionRegulator")
        self.stream = choose_text_stream(pipe, self.family, text_stream)
        super().__init__(pipe, config)
        self._length = self._max_length({})

    def _new_state(self) -> RegulationState:
        return RegulationState(self.config, self.layers, guided=self.family == "sd3", image_keys=True)

    def _max_length(self, kwargs) -> int:
        if self.stream.name == "clip":
            return self.stream.tokenizer.model_max_length
        return int(kwargs.get("max_sequence_length") or pipeline_default(self.pipe, "max_sequence_length"))

    # -- targets ------------------------------------------------------------------------------
    def resolve(self, prompt: str, targets) -> dict:
        """{"prompt", "targets", "indices" (columns of the joint text sequence), "tokens", "source",
        "stream" ("t5" or "clip"), "stream_indices" (the stream's own token indices)}."""
        info = super().resolve(prompt, targets)
        info.update(stream=self.stream.name, stream_indices=[i - self.stream.offset for i in info["indices"]])
        return info

    def _columns(self, prompt: str, targets: list) -> list[int]:
        return stream_columns(self.stream, prompt, targets, self._length)

    def token_table(self, prompt: str, max_sequence_length: int | None = None) -> list[Token]:
        """The target stream's tokens as the joint attention sees them, indexed by joint text column."""
        return stream_table(self.stream, prompt, self._length if max_sequence_length is None else max_sequence_length)

    def token_tables(self, prompt: str, max_sequence_length: int | None = None) -> list[tuple[TextStream, list[Token]]]:
        """Every stream of the joint text sequence with its tokens, indexed by joint text column (SD3: CLIP
        at 0..76, then T5 from 77; FLUX: T5). `self.stream` is the one targets are looked up in."""
        length = self._length if max_sequence_length is None else max_sequence_length
        return joint_token_tables(self.pipe, self.family, prompt, length)

    def word_tokens(self, prompt: str) -> list[Token]:
        return word_tokens(self.stream, self.token_table(prompt))

    def select_layers(self, layers) -> frozenset[str]:
        return select_joint_layers(self.pipe.transformer, None if layers is None else tuple(layers))

    def observable_layers(self) -> list[str]:
        return editable_layers(self.pipe.transformer)

    @property
    def maps_are(self) -> str:
        rows = "the conditional half" if self.family == "sd3" else "the whole (guidance-distilled) batch"
        return (f"the image-query rows at the {self.stream.name.upper()} text columns of the joint attention (softmax "
                f"over text + image keys, as regulated), of {rows}")

    def _eos(self, resolved: dict) -> int:
        return self.stream.offset + self.stream.eos(resolved["prompt"], self._length)

    # -- the call -----------------------------------------------------------------------------
    def plan(self, prompt, targets=None, **kwargs):
        for other in ("prompt_2", "prompt_3"):
            if kwargs.get(other) is not None:
                raise ValueError(f"attnreg finds the targets in `prompt`; {other} is not supported")
        self._length = self._max_length(kwargs)
        return super().plan(prompt, targets, **kwargs)

    def _check_guidance(self, kwargs: dict) -> None:
        if self.family == "flux":
            true_cfg = kwargs.get("true_cfg_scale", pipeline_default(self.pipe, "true_cfg_scale")) or 1.0
            if true_cfg > 1 and (kwargs.get("negative_prompt") is not None or kwargs.get("negative_prompt_embeds") is not None):
                raise GuidanceError("attnreg edits FLUX's single guidance-distilled batch; true CFG (true_cfg_scale > 1 "
                                    "with a negative prompt) runs a second transformer call and is not supported")
            return  # guidance-distilled: the guidance scale is an input, every image is edited
        guidance = kwargs.get("guidance_scale", pipeline_default(self.pipe, "guidance_scale"))
        if guidance <= 1:
            raise GuidanceError(f"attnreg edits the conditional half of SD3's classifier-free guidance; "
                                f"guidance_scale={guidance} gives no unconditional half. Use guidance_scale > 1.")
        if kwargs.get("skip_guidance_layers"):
            raise GuidanceError("SD3 skip-layer guidance runs extra transformer calls; not supported with attnreg")

    def run(self, prompt, plan, **kwargs):
        """Call the pipeline with the joint processors installed for `plan` (None: plain, observed)."""
        transformer, state = self.pipe.transformer, self.state
        patch = transformer.config.patch_size

        def remember_grid(module, args, kw):
            # The image tokens' grid: SD3 patchifies a (B, C, H, W) latent; FLUX's packed tokens carry
            # their (row, column) in img_ids.
            if self.family == "sd3":
                sample = args[0] if args else kw["hidden_states"]
                state.latent_hw = (sample.shape[-2] // patch, sample.shape[-1] // patch)
            else:
                ids = kw["img_ids"]
                state.latent_hw = (int(ids[..., 1].max()) + 1, int(ids[..., 2].max()) + 1)
                state.text_tokens = kw["encoder_hidden_states"].shape[1]  # the single-stream blocks' text rows

        joint = set(editable_layers(transformer))
        restore_sos = self.family == "sd3"
        first_word = self.stream.offset + (1 if self.stream.name == "clip" else 0)  # after CLIP's SOS
        wrapped = {
            key: JointRegulatedProcessor(name, proc, state, self.family, restore_sos, first_word)
            if (name := key.removesuffix(".processor")) in self.layers or (state.observers and name in joint)
            else proc
            for key, proc in transformer.attn_processors.items()
        }
        return self._call_with(transformer, wrapped, remember_grid, prompt, plan, kwargs)


for _family in ("sd3", "flux"):
    AttentionRegulator.register_family(_family, JointAttentionRegulator)
