"""RegulationConfig: every constant of Attention Regulation, in one place, with its presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .regulation import LossWeights, RelativeLoss

DEFAULT_PRESET = "auto"  # what AttentionRegulator(pipe), the command line, the benchmark and the app use

# options that no longer exist, and what to use instead
REMOVED_OPTIONS = {
    "fast": "the relative loss has one solver (the scheduled one); --preset paper gives the release's solver",
    "closed_form": "the binding solver's gradient is always the closed form (equal to autograd to float rounding)",
    "fast_binding": "it was rejected (docs/decisions.md); the binding solver takes its unit steps",
    "separation": "it was rejected (docs/decisions.md); concentration is the default's term against overlaps",
}


class ConfigError(ValueError):
    """A RegulationConfig with impossible values."""


@dataclass(frozen=True)
class RegulationConfig:
    """What Attention Regulation does, and where. `RegulationConfig()` is the default method (the `auto`
    preset); `RegulationConfig.paper()` is the authors' release, with the fixes listed below.

    Where and when:
      layers: UNet block prefixes ("down_blocks.2", "mid_block") or full attention module names
        ("down_blocks.2.attentions.0.transformer_blocks.0.attn2") whose cross-attention is edited; on SD3
        and FLUX joint blocks ("transformer_blocks.8" or "8"). None: chosen by `layer_choice`.
      layer_choice: "calibrated" (default): the layers the model's own attention says localise the targets
        (`attnreg calibrate`, stored in its attnreg.json or the user cache; see calibrate.py), else the
        structural rule; "model": the model's attnreg.json `layers`, else the structural rule: every UNet
        block at the lowest cross-attention resolution except the mid block (`down_blocks.2` and
        `up_blocks.1` on SD 1.x/2.x, `down_blocks.2` and `up_blocks.0` on SDXL), the middle third of an
        MMDiT's joint blocks.
      edit_steps: edit the first `edit_steps` denoising steps; None: half of them.
    The offsets (Sec. 4.2): sums of bumps_per_side**2 Gaussian bumps of sigma max(1, map width / sigma_divisor).
    The loss, `loss`: "relative" (default) or "paper". Both are gamma x (top-level term) + delta x
      (mean-level term) + epsilon x L_reg (the mean squared bump weight, the paper's beta), the levels being
      each target's `quantile` (its top decile) and its mean attention:
      relative: a target whose levels fall short of `lift` x the dominant target's unedited levels in the same
        (image, head) row is pulled up, a one-sided square in log units (`RelativeLoss`); a target at or above
        them costs nothing. neglect_ratio: per image and step, regulate only when the weakest target's
        top-decile level (head-averaged) is below this fraction of the strongest's (None: always). A call
        where no image is neglected is the plain pipeline, bit for bit.
        binding: also bind each target's modifiers (the content words before it, "red" in "a red circle") to
          it: the modifier's map drawn into its noun's region and out of the other nouns' (`binding_loss`);
          an image is then also regulated when a modifier's map overlaps another noun more than its own.
          0: off. Groups with modifiers take the binding solver, the others `optimise_rows`.
        concentration: a term of the binding solver: each noun's map gathered into one place (its spatial
          spread against the unedited one), against one shape drawn twice and another missing. 0: off.
      paper (the release): the top decile of each target should carry `high_target`, each target's mean
        attention tau / n with tau = min(1, per_target_share x n) (L_prop).
    The solver: `iterations` steps of size `lr` per (image, head) row from initial weights uniform in
      [init_low, init_high), drawn per image from a stream keyed by `seed` and that image's generator seed;
      each row keeps its best iterate. The relative loss spends the same flow time in the growing steps of
      `FAST_STEP_SHARES` (regulation/relative.py); the release takes the unit steps and keeps the batch's best.
      compile: "auto" (CUDA only), "on" or "off": the relative loss's solver through torch.compile; a failure
      falls back to eager with one warning (compiled.py).
    Over steps: applied = decay**s x (smoothing x previous best + (1 - smoothing) x best); restore_special
      puts back the unedited SOS and first-EOS probabilities after the softmax.
    MMDiT joint attention only (a UNet ignores them):
      text_units: the loss reads each target's map as its share of the prompt's word columns (the image rows'
        probabilities renormalised over the words; SOS, EOS, padding, zero columns and the image keys left
        out), as a UNet's maps are shares of the prompt's tokens; the edit still acts in the whole softmax.
      text_floor: after the bumps, one constant offset per edited row on the target columns so that the
        targets hold about this share of the whole joint row where they hold less (0: off).

    The `paper` preset follows the authors' released code with these differences: 8 x 8 maps work (bump sigma
    is at least 1 and the bump grid spans any map size; results on 8 x 8 layers are attnreg's, not the
    paper's), each image's initial weights come from its own seeded stream and it keeps its own best iterate
    (an image does not depend on its batch; for one image this is the release's solver), each edited
    attention is computed once, the logits and the solve stay in fp32 whatever the pipeline's dtype (the
    release casts them to fp16), and edit_steps=None means half the steps (the release edits a fixed 25).
    """

    layers: tuple[str, ...] | None = None
    layer_choice: str = "calibrated"
    edit_steps: int | None = None
    bumps_per_side: int = 7
    sigma_divisor: float = 16.0
    loss: str = "relative"
    gamma: float = RelativeLoss.gamma  # each loss's constants live with the loss, in regulation/
    delta: float = RelativeLoss.delta
    epsilon: float = RelativeLoss.epsilon
    quantile: float = RelativeLoss.quantile
    lift: float = 2.0
    neglect_ratio: float | None = 0.8
    binding: float = 2.0
    concentration: float = 2.0
    high_target: float = LossWeights.high_target
    per_target_share: float = LossWeights.per_target_share
    iterations: int = 20
    lr: float = 1.0
    init_low: float = 0.0
    init_high: float = 0.0
    seed: int = 0
    compile: str = "auto"
    smoothing: float = 0.25
    decay: float = 0.99
    restore_special: bool = True
    text_units: bool = True
    text_floor: float = 0.0

    def __post_init__(self):
        if isinstance(self.layers, (list, str)):
            object.__setattr__(self, "layers", tuple([self.layers] if isinstance(self.layers, str) else self.layers))
        problems = []
        if self.layers is not None and len(self.layers) == 0:
            problems.append("layers is empty (use None for the model's default layers)")
        if self.edit_steps is not None and (not isinstance(self.edit_steps, int) or self.edit_steps < 0):
            problems.append(f"edit_steps={self.edit_steps!r} must be a non-negative integer or None")
        if not isinstance(self.bumps_per_side, int) or self.bumps_per_side < 1:
            problems.append(f"bumps_per_side={self.bumps_per_side!r} must be an integer >= 1")
        if not self.sigma_divisor > 0:
            problems.append(f"sigma_divisor={self.sigma_divisor!r} must be > 0")
        for name in ("gamma", "delta", "epsilon"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name}={getattr(self, name)!r} must be >= 0")
        if not 0 < self.quantile < 1:
            problems.append(f"quantile={self.quantile!r} must be in (0, 1)")
        if not 0 < self.high_target <= 1:
            problems.append(f"high_target={self.high_target!r} must be in (0, 1]")
        if not 0 < self.per_target_share <= 1:
            problems.append(f"per_target_share={self.per_target_share!r} must be in (0, 1]")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            problems.append(f"iterations={self.iterations!r} must be an integer >= 1")
        if not self.lr > 0:
            problems.append(f"lr={self.lr!r} must be > 0")
        if not self.init_low <= self.init_high:
            problems.append(f"init_low={self.init_low!r} must be <= init_high={self.init_high!r}")
        if not 0 <= self.smoothing <= 1:
            problems.append(f"smoothing={self.smoothing!r} must be in [0, 1]")
        if self.loss not in LOSSES:
            problems.append(f"loss={self.loss!r} is not one of {', '.join(LOSSES)}")
        if not self.lift >= 1:
            problems.append(f"lift={self.lift!r} must be >= 1")
        if self.neglect_ratio is not None and not 0 < self.neglect_ratio <= 1:
            problems.append(f"neglect_ratio={self.neglect_ratio!r} must be in (0, 1] or None")
        if self.layer_choice not in LAYER_CHOICES:
            problems.append(f"layer_choice={self.layer_choice!r} is not one of {', '.join(LAYER_CHOICES)}")
        if not self.binding >= 0:
            problems.append(f"binding={self.binding!r} must be >= 0")
        if not self.concentration >= 0:
            problems.append(f"concentration={self.concentration!r} must be >= 0")
        if self.concentration > 0 and self.loss != "relative":
            problems.append("concentration needs loss='relative' (the auto preset)")
        if self.binding > 0 and self.loss != "relative":
            problems.append("binding needs loss='relative' (the auto preset)")
        if self.compile not in COMPILE_CHOICES:
            problems.append(f"compile={self.compile!r} is not one of {', '.join(COMPILE_CHOICES)}")
        if not 0 <= self.text_floor < 1:
            problems.append(f"text_floor={self.text_floor!r} must be in [0, 1)")
        if not 0 < self.decay <= 1:
            problems.append(f"decay={self.decay!r} must be in (0, 1]")
        if problems:
            raise ConfigError("invalid RegulationConfig: " + "; ".join(problems))

    @property
    def loss_weights(self) -> LossWeights | RelativeLoss:
        if self.loss == "relative":
            return RelativeLoss(self.gamma, self.delta, self.epsilon, self.quantile, self.lift)
        return LossWeights(self.gamma, self.delta, self.epsilon, self.quantile, self.high_target, self.per_target_share)

    @classmethod
    def paper(cls, **overrides) -> "RegulationConfig":
        """The authors' release (see the class docstring for where it differs), with any field overridden."""
        return cls.from_preset("paper", **overrides)

    @classmethod
    def from_preset(cls, name: str = DEFAULT_PRESET, **overrides) -> "RegulationConfig":
        """A preset by name, with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
        removed = [k for k in overrides if k in REMOVED_OPTIONS]
        if removed:
            raise ConfigError("; ".join(f"option {k} was removed: {REMOVED_OPTIONS[k]}" for k in removed))
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(k for k in overrides if k not in fields)
        if bad:
            raise ConfigError(f"unknown option(s) {', '.join(bad)}; valid: {', '.join(sorted(fields))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @property
    def preset(self) -> str:
        """The preset whose method this is: its loss, solver and levels, whatever the layers, edit steps,
        seed and compile choice; "custom" when it matches none."""
        where = {"layers": None, "edit_steps": None, "seed": 0, "compile": "auto"}
        own = dataclasses.replace(self, **where)
        return next((name for name, config in PRESETS.items() if own == config), "custom")

    def replace(self, **overrides) -> "RegulationConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        """Every field, and the derived `preset` (JSON-able but for the `layers` tuple)."""
        return {**dataclasses.asdict(self), "preset": self.preset}


LOSSES = ("paper", "relative")
LAYER_CHOICES = ("model", "calibrated")
COMPILE_CHOICES = ("auto", "on", "off")

PRESETS: dict[str, RegulationConfig] = {
    "auto": RegulationConfig(),
    "paper": RegulationConfig(
        layer_choice="model", loss="paper", gamma=LossWeights.gamma, delta=LossWeights.delta,
        epsilon=LossWeights.epsilon, quantile=LossWeights.quantile, lift=1.0, neglect_ratio=None, binding=0.0,
        concentration=0.0, lr=100.0, init_high=1.0,
    ),
}
