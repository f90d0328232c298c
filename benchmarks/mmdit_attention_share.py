"""Where the image queries of an SD3 (MMDiT) pipeline put their attention: per joint block and step, the
share of the joint softmax on the image keys, on the CLIP text columns (SOS, words, EOS, padding), on the
T5 (or zero) columns after them, and on the prompt's target words; plain pipeline, conditional half.

It shows how little of each image token's attention the text, and the targets in it, hold, and whether the
targets' word shares localise (their top-decile pixel over their mean: 1 when a target is read the same
everywhere; a model that draws each word in its own place reads it far above its mean there).

    OMP_NUM_THREADS=1 python benchmarks/mmdit_attention_share.py --model toy-mmdit --seeds 1000-1003
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch


def main() -> None:
    from attnreg.joint import CLIP_LENGTH, sd3_streams
    from attnreg.pipelines import load_pipeline
    from attnreg.regulator import AttentionRegulator
    from attnreg.toy import model_path, prompt_targets

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy-mmdit", help="an SD3 pipeline folder or toy-mmdit")
    ap.add_argument("--prompts", default="a red circle and a blue square|a green triangle and a yellow circle")
    ap.add_argument("--seeds", default="1000-1001")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--max-sequence-length", type=int, default=None, help="the call's zero (T5) columns (default: the "
                    "pipeline's)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    path = model_path(a.model) if a.model.startswith("toy-") else a.model
    pipe = load_pipeline(str(path))
    first, _, last = a.seeds.partition("-")
    shares: dict[tuple[int, str], list[list[float]]] = defaultdict(list)  # (block, part) -> per step
    state = {"step": 0, "targets": [], "words": []}

    class Share:
        """diffusers' own processor for the output; the shares computed beside it from the same q and k."""

        def __init__(self, block: int, original):
            self.block, self.original = block, original

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kw):
            (q, k, _), (_, ck, _) = sd3_streams(attn, hidden_states, encoder_hidden_states)
            cond = q.shape[0] // 2  # the conditional half of classifier-free guidance
            keys = torch.cat([k, ck], dim=2)[cond:]
            p = (q[cond:] @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1).mean(dim=(0, 1, 2))
            n = k.shape[2]
            last_word = max(state["words"])
            parts = {"image keys": p[:n].sum(), "clip text": p[n : n + CLIP_LENGTH].sum(), "sos": p[n],
                     "eos + padding": p[n + last_word + 1 : n + CLIP_LENGTH].sum(),
                     "t5 / zero columns": p[n + CLIP_LENGTH :].sum(),
                     "words": p[[n + t for t in state["words"]]].sum(),
                     "targets": p[[n + t for t in state["targets"]]].sum()}
            words = (q[cond:] @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)[..., [n + t for t in state["words"]]]
            in_words = words / words.sum(dim=-1, keepdim=True)  # the loss's units: shares of the prompt's words
            targets = [state["words"].index(t) for t in state["targets"]]
            parts["targets / words"] = in_words[..., targets].sum(dim=-1).mean()
            # localisation: each target's word share at its top-decile pixel over its mean (1: the same everywhere)
            maps = in_words[..., targets].mean(dim=1)  # (images, pixels, targets), heads averaged
            parts["target q90 / mean (x100)"] = (maps.quantile(0.9, dim=1) / maps.mean(dim=1)).mean()
            for name, value in parts.items():
                rows = shares[(self.block, name)]
                while len(rows) <= state["step"]:
                    rows.append([])
                rows[state["step"]].append(float(value))
            return self.original(attn, hidden_states, encoder_hidden_states, **kw)

    blocks = pipe.transformer.transformer_blocks
    originals = [b.attn.processor for b in blocks]
    for i, b in enumerate(blocks):
        b.attn.set_processor(Share(i, originals[i]))
    reg = AttentionRegulator(pipe)  # only to find the target columns, as regulation would

    def count(pipe_, step, timestep, kwargs):
        state["step"] = step + 1
        return kwargs

    for prompt in a.prompts.split("|"):
        state["targets"] = reg.resolve(prompt, prompt_targets(prompt))["indices"]
        state["words"] = [t.index for t in reg.word_tokens(prompt)]
        for seed in range(int(first), int(last or first) + 1):
            state["step"] = 0
            pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=a.steps,
                 guidance_scale=a.guidance, callback_on_step_end=count,
                 **({"max_sequence_length": a.max_sequence_length} if a.max_sequence_length else {}))
    for b, original in zip(blocks, originals):
        b.attn.set_processor(original)
    shown = [0, a.steps // 4, a.steps // 2, a.steps - 1]
    print(f"mean share of the image queries' joint softmax (conditional half), {a.model}, prompts x seeds; "
          "'targets / words': the targets' share of the prompt's word columns alone")
    print("| block | part | " + " | ".join(f"step {s}" for s in shown) + " |")
    print("|---|---|" + "---|" * len(shown))
    for (block, part), rows in sorted(shares.items()):
        cells = [f"{100 * sum(rows[s]) / len(rows[s]):.2f} %" for s in shown]
        print(f"| {block} | {part} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
