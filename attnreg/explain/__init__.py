"""`attnreg explain`: why a target goes missing, and what regulation changes (the paper's Figs. 2, 3).

One prompt, one seed, two runs (plain and regulated, the same starting noise), both recorded with an
`AttentionRecorder`. The result: the intermediate images and each target's attention map over the
steps (maps.png, Fig. 3's layout), violin plots of every prompt token's attention at two steps
(stats.png, Fig. 2's layout), the two final images side by side (compare.png), the per-token,
per-step numbers (explain.json) and a one-line diagnosis per target.

    from attnreg.explain import explain
    ex = explain(pipe, "a painting of an elephant with glasses", targets=["elephant", "glasses"], seed=42)
    ex.maps_figure; ex.stats_figure; ex.compare; print("\\n".join(ex.diagnosis))

run.py runs the two calls, numbers.py makes explain.json and the diagnosis, and the figures are drawn by
`attnreg.figures`.
"""

from ..figures import MAP_SCALES, RUN_LABELS, maps_figure, stats_figure
from .numbers import RUNS, diagnose, dominant_token, explain_numbers
from .run import (
    FILES, PAPER_STEPS_SHOWN, Explanation, decode_latents, default_steps_shown, default_violin_steps, explain,
)

__all__ = [
    "FILES", "MAP_SCALES", "PAPER_STEPS_SHOWN", "RUNS", "RUN_LABELS", "Explanation", "decode_latents",
    "default_steps_shown", "default_violin_steps", "diagnose", "dominant_token", "explain", "explain_numbers",
    "maps_figure", "stats_figure",
]
