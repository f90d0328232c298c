"""RegulationConfig: every constant of Attention Regulation, in one place, with its presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .regulation import LossWeights, RelativeLoss


class ConfigError(ValueError):
    """A RegulationConfig with impossible values."""


@dataclass(frozen=True)
class RegulationConfig:
    """What Attention Regulation does, and where. The dataclass defaults are the `paper` preset; the
    default preset of `AttentionRegulator(pipe)`, the command line and the benchmark is `auto` (below).

    The `paper` preset follows the authors' released code, with three fixes:
    8 x 8 maps work (bump sigma is at least 1 and the bump grid spans any map size), each image's
    initial weights come from its own seeded stream and it keeps its own best iterate (so a run is
    reproducible and an image does not depend on its batch; for one image this is the release's
    solver), and each edited attention is computed once (the release ran the layer's own forward,
    then recomputed it).

    Where:
      layers: UNet block prefixes ("down_blocks.2", "mid_block") or full attention module names
        ("down_blocks.2.attentions.0.transformer_blocks.0.attn2") whose cross-attention is edited.
        None: the model's own choice (`attnreg.json` next to its weights) or else every block at the
        lowest cross-attention resolution except the mid block, i.e. `down_blocks.2` and
        `up_blocks.1` (16 x 16 at 512 px) on SD 1.x/2.x, `down_blocks.2` and `up_blocks.0` on SDXL.
        On SD3 and FLUX: joint blocks ("transformer_blocks.8" or "8"); None: the middle third of them.
      edit_steps: edit the first `edit_steps` denoising steps; None: half of them (25 of 50).
    The maps (Sec. 4.2):
      bumps_per_side: the offsets are sums of bumps_per_side**2 Gaussian bumps (7 x 7 = 49).
      sigma_divisor: bump sigma = max(1, map width / sigma_divisor).
    The loss (Sec. 4.3), L = gamma L_high + delta L_prop + epsilon L_reg:
      gamma, delta, epsilon: 1, 80, 0.09 as released (epsilon is the paper's beta, Fig. 5).
      quantile, high_target: the top 10 % of a target's pixels should carry 0.9 of its attention.
      per_target_share: tau = min(1, per_target_share * n); each target's mean attention -> tau / n.
    The solver:
      iterations, lr: 20 gradient-descent steps of size 100 per (image, head); best iterate kept.
      init_low, init_high: initial weights uniform in [init_low, init_high), drawn per image from a
        stream keyed by `seed` and that image's generator seed (its position when no generator is given).
    Over steps:
      smoothing: applied = decay**s * (smoothing * previous best + (1 - smoothing) * best).
      decay: 0.99 as released.
      restore_special: after the softmax, put back the unedited SOS and first-EOS probabilities.

    Not documented by the authors, and where we differ from their release:
      - The release casts the edited logits to fp16 even in fp32 pipelines; we keep the logits, the
        optimisation and the edited softmax in fp32 whatever the pipeline's dtype.
      - On 8 x 8 maps the release crashes (sigma 0); patched to sigma 1 it would place 9 bumps and its
        solver then keeps the random start. Our 7 x 7 grid spanning any map is our own design, so results
        of the `paper` loss on 8 x 8 layers are attnreg's results, not the paper's.
      - edit_steps=None means half the steps; the release edits a fixed 25, the same only at 50 steps.

    The `auto` preset (ours; the default): the paper's idea with levels taken from the model and the call.
      layer_choice="calibrated": edit the layers the model's own attention says localise the targets
        (`attnreg calibrate`, stored in its attnreg.json or the user cache; see calibrate.py). The
        paper's 16 x 16 choice was tuned on SD 1.4: on the embedded model those layers put 93-98 % of
        their attention on EOS padding, and editing them made images worse.
      loss="relative": the paper's absolute levels (top decile at 0.9, mean 0.2 per target) ask a model
        whose targets peak at 0.02-0.1 for a 10-50x change, which draws blobs and extra objects. Here a
        neglected target is pulled up to the level of the dominant target of the same (image, head) row,
        its unedited 90th percentile and mean (the paper's own Fig. 2 diagnosis: in failures one target
        dominates), with a one-sided square in log units (`RelativeLoss` in regulation.py). Log units make
        the step size scale-free: lr 1 converges in 20 steps on every map we tried, where the release's
        lr 100 overshoots at once. lift > 1 asks for lift x the dominant level.
      Each (image, head) row keeps its own best iterate, so a batch gives the images of single calls.
      init_high=0: the solver starts from no offset (nothing changes unless the loss asks), not from
        random weights.
      neglect_ratio: per image and step, on the head-averaged maps, regulate only when the weakest
        target's top-decile level is below this fraction of the strongest's. A call where no image is
        ever neglected is bit for bit the plain pipeline (one target is never neglected).
      fast (on in this preset; False gives the exact solver, bit for bit): the same loss and the
        same end point, reached cheaply. The exact solver takes `iterations` unit steps of size `lr` from
        zero, i.e. it follows the gradient flow to time iterations x lr; the fast one reaches that time in
        10 growing steps (`FAST_STEP_SHARES` in regulation.py: the flow slows as the loss flattens), and on
        an edited layer only the conditional half is computed explicitly (the unconditional half goes
        through the layer's own processor). On the embedded model its weights are within ~1 % (median) of
        the exact ones; see benchmarks/RESULTS.md (issue 12). Groups with modifiers (`binding`) keep the
        binding solver.
      binding (2 in this preset since 2026-11-30 night, 1 before; 0 = off): also bind each target's modifiers (the content words before
        it, "red" in "a red circle") to it: a SynGen-like term that moves the modifier's map into its
        noun's region and out of the other nouns' (`binding_loss`); an image is then also regulated when a
        modifier's map overlaps another noun's more than its own. On by default since 2026-11-30: most of
        the embedded model's two-object failures draw both shapes in the wrong colours, and on the design
        set (benchmarks/RESULTS.md) binding 1 on top of lift 2 gave +19.8 pp on two objects against +14.6
        (kept 88 % against 79 %), three objects +7.3 against +9.4 (within noise). Targets without
        modifiers ("a cat and a dog") have no pairs and take the fast path; groups with modifiers take the
        binding solver (the exact steps; its gradient by hand since 2026-12-01, see closed_form).
        Weight 2, not 1: chosen on the design set (seeds 1000-1015: +3.1 pp over 1 on two and on three objects;
        3 and 4 were worse on two objects), then confirmed on the table (seeds 0-31) by a rule written before it
        ran: +4.1 pp [+2.0, +6.2] over binding 1 on two objects, +0.3 on three, one object unchanged.
      separation (an option, 0 = off; tried 2026-11-30, see benchmarks/RESULTS.md): also push every two
        nouns' maps apart (`separation_loss`, their mean Bhattacharyya overlap), for pictures that draw
        two objects in one place. Solved with the binding solver.
      concentration (2 in this preset since 2026-12-01, 0 before; 0 = off): also gather each noun's map into
        one place (`concentration_loss`: its spatial variance against the unedited one), against three-object
        pictures that draw one shape twice and miss another. A term of the binding solver: it acts on the
        groups that solver takes (modifiers with binding > 0, or separation), so binding=0 switches it off too;
        groups without modifiers keep the fast path, since it was measured only where binding runs. Chosen on the
        design set (30 design prompts x seeds 2000-2007: +5.4 pp [+1.2, +10.0] over binding alone on two
        objects, +2.9 on three; 0.5 was weaker), then confirmed on the table (seeds 0-31) by a rule written
        before it ran: +4.0 pp [+1.5, +6.4] on two objects and +3.6 [+1.9, +5.4] on three over binding 2
        alone, one object unchanged. It does not lower the extra-object rate (the duplicate is still drawn).
      fast_binding (an option, off; 2026-12-01): the binding solver in 14 growing steps to the same flow time
        (`BINDING_STEP_SHARES` in regulation.py) instead of 20 unit steps: about 0.6x its time per call, weights
        within ~1 % of the exact ones (median) on design prompts. Off: checked against the exact solver's
        pictures on the table (seeds 0-15), two objects moved +0.2 pp [-1.0, +1.4] but three -1.7 [-3.5, +0.2],
        outside the +-3 pp that issue 12's fast path had to meet (benchmarks/RESULTS.md).
      closed_form (on in this preset since 2026-12-01; False = autograd, as measured in issue 9's tables): the
        binding solver's gradient written by hand (`bound_loss_and_grad` in regulation.py) instead of autograd:
        the same loss and the same steps, equal to autograd to float rounding (tested in float64), about half
        its time per call. Checked by a rule written before the run: on the table's 960 two- and three-object
        pairs (seeds 0-15) every picture got the autograd picture's verdict, 600 were byte-identical, no pixel
        moved by more than 12 / 255 (benchmarks/RESULTS.md, issue 12). `fast=False` (--exact) does not imply it:
        the command line's --exact switches both off.
      text_units (every preset; MMDiT joint attention only): the loss reads each target's map as its share of
        the prompt's word columns (the image rows' probabilities renormalised over the words; SOS, EOS, padding,
        zero columns and the image keys left out), as the paper's maps on a UNet are shares of the prompt's
        tokens. The edit still adds the bumps to the target logits of the whole joint softmax. False: the maps
        are shares of the whole joint row, where the image keys hold nearly all of it. A UNet ignores it.
      text_floor (0 = off; MMDiT joint attention with text_units only): after the bumps, one constant offset
        per edited (image, head) row on every target column, so that the targets together hold about this share
        of the whole joint row (mean over the image tokens) where they hold less. The bumps set where each
        target attends (in the words' units); the floor sets how much the image listens to the targets at all.
      compile ("auto", "on", "off"; every preset): run the fast solver through torch.compile. "auto"
        compiles on CUDA only, because on CPU the first call's compile (10-75 s here) outweighs what it
        saves unless one process makes hundreds of images; a failure to compile falls back to eager with
        one warning (compiled.py).
    """

    layers: tuple[str, ...] | None = None
    edit_steps: int | None = None
    bumps_per_side: int = 7
    sigma_divisor: float = 16.0
    gamma: float = LossWeights.gamma  # the loss's defaults live with the loss, in regulation.py
    delta: float = LossWeights.delta
    epsilon: float = LossWeights.epsilon
    quantile: float = LossWeights.quantile
    high_target: float = LossWeights.high_target
    per_target_share: float = LossWeights.per_target_share
    iterations: int = 20
    lr: float = 100.0
    init_low: float = 0.0
    init_high: float = 1.0
    smoothing: float = 0.25
    decay: float = 0.99
    restore_special: bool = True
    seed: int = 0
    loss: str = "paper"
    lift: float = 1.0
    neglect_ratio: float | None = None
    layer_choice: str = "model"
    binding: float = 0.0
    separation: float = 0.0
    concentration: float = 0.0
    fast: bool = False
    fast_binding: bool = False
    closed_form: bool = False
    compile: str = "auto"
    text_units: bool = True
    text_floor: float = 0.0
    preset: str = field(default="paper", compare=False)

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
        if not self.separation >= 0:
            problems.append(f"separation={self.separation!r} must be >= 0")
        if not self.concentration >= 0:
            problems.append(f"concentration={self.concentration!r} must be >= 0")
        if self.concentration > 0 and self.loss != "relative":
            problems.append("concentration needs loss='relative' (the auto preset)")
        if self.separation > 0 and self.loss != "relative":
            problems.append("separation needs loss='relative' (the auto preset)")
        if self.binding > 0 and self.loss != "relative":
            problems.append("binding needs loss='relative' (the auto preset)")
        for option in ("fast_binding", "closed_form"):
            if getattr(self, option) and self.loss != "relative":
                problems.append(f"{option} needs loss='relative' (the auto preset)")
        if self.fast and self.loss != "relative":
            problems.append("fast needs loss='relative' (the auto preset); the paper preset keeps the release's solver")
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
    def from_preset(cls, name: str = "paper", **overrides) -> "RegulationConfig":
        """A preset by name, with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(k for k in overrides if k not in fields)
        if bad:
            raise ConfigError(f"unknown option(s) {', '.join(bad)}; valid: {', '.join(sorted(fields))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **overrides) -> "RegulationConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.fast:
            # Left out when off: configurations (and benchmark file names, which hash them) from before the
            # field existed stay the same.
            del d["fast"]
        for option in ("separation", "concentration", "fast_binding", "closed_form"):
            if not getattr(self, option):
                del d[option]  # options added later; off leaves earlier hashes as they were
        if self.text_units:
            del d["text_units"]
        if not self.text_floor:
            del d["text_floor"]  # the default; it acts on joint attention only
        if self.compile == "auto":
            del d["compile"]  # a runtime choice (the same results to float rounding); kept out of old hashes
        return d


LOSSES = ("paper", "relative")
LAYER_CHOICES = ("model", "calibrated")
COMPILE_CHOICES = ("auto", "on", "off")

PRESETS: dict[str, RegulationConfig] = {
    "paper": RegulationConfig(preset="paper"),
    "auto": RegulationConfig(
        loss="relative", layer_choice="calibrated", gamma=1.0, delta=1.0, epsilon=0.01, lr=1.0, init_high=0.0,
        lift=2.0, neglect_ratio=0.8, binding=2.0, concentration=2.0, fast=True, closed_form=True, preset="auto",
    ),
}
