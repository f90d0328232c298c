"""Does an attention statistic predict which vanilla images fail? (the neglect test of the auto preset)

On the design set of design_auto.py (vanilla, seeds 1000-1007), record at the calibrated layer
(down_blocks.1) per image and step: the weakest/strongest target top-decile ratio (the neglect test),
the overlap of the first two targets' maps, the weakest and strongest levels; print the AUC of each for
telling failures from successes. Usage: OMP_NUM_THREADS=1 python benchmarks/archive/design_gate.py [OUT.json]
"""
import json
import sys

import numpy as np
import torch
torch.set_num_threads(1)
sys.path.insert(0, "benchmarks")
from design_auto import design_prompts
from attnreg import AttentionRegulator, RegulationConfig
from attnreg.toy import load_pipeline, prompt_targets, score
from attnreg.tokens import resolve_targets
from attnreg.regulation import quantile_along_pixels
pipe = load_pipeline()
reg = AttentionRegulator(pipe, RegulationConfig(layers=("down_blocks.1",)))
rows = []
class Obs:
    def __init__(s, idx): s.idx, s.f = idx, {}
    def wants(s, l, st): return l.startswith("down_blocks.1") and st < 25
    def record(s, l, st, probs, state):
        n = probs.shape[0] // 2
        m = probs[n:].float().mean(1)[..., s.idx]  # images, P, 2
        q = quantile_along_pixels(m, 0.9)[0]
        a = m / m.sum(1, keepdim=True)
        bc = torch.sqrt(a[..., 0] * a[..., 1]).sum(1)
        s.f[st] = (q.amin(-1) / q.amax(-1), bc, q.amin(-1), q.amax(-1))
for kind in (2, 3):
  for p in design_prompts(kind, 12):
    idx = resolve_targets(pipe.tokenizer, p, prompt_targets(p))
    o = Obs(idx); reg.state.observers[:] = [o]
    seeds = list(range(1000, 1008))
    ims = reg.run(p, None, generator=[torch.Generator().manual_seed(x) for x in seeds], num_images_per_prompt=8).images
    for i, (sd, im) in enumerate(zip(seeds, ims)):
        sc = score(p, im)
        rows.append({"kind": kind, "prompt": p, "seed": sd, "success": bool(sc["success"]), "shapes": bool(sc["shapes_present"]),
                     "feat": {st: [float(v[i]) for v in o.f[st]] for st in o.f}})
OUT = sys.argv[1] if len(sys.argv) > 1 else "runs/design/gate.json"
json.dump(rows, open(OUT, "w"))

# -- the AUCs
rows = json.load(open(OUT))
def auc(score, label):
    score, label = np.array(score), np.array(label)
    pos, neg = score[label], score[~label]
    if len(pos) == 0 or len(neg) == 0: return float("nan")
    return float(((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()))
for kind in (2, 3):
    rs = [r for r in rows if r["kind"] == kind]
    y = [not r["success"] for r in rs]  # failure
    print("kind", kind, "failures", sum(y), "of", len(rs))
    for st in ("0", "5", "10", "15", "20", "24"):
        for j, name in enumerate(["ratio", "overlap", "min q", "max q"]):
            s = [r["feat"][st][j] for r in rs]
            a = auc([-v if name in ("ratio", "min q") else v for v in s], y)
            print(f"  step {st:>2} {name:8s} AUC(failure) {a:.2f}")
    # mean over steps 0-9
    for j, name in enumerate(["ratio", "overlap", "min q"]):
        s = [np.mean([r["feat"][str(t)][j] for t in range(0, 10)]) for r in rs]
        print(f"  mean 0-9 {name} AUC {auc([-v if name != 'overlap' else v for v in s], y):.2f}")
