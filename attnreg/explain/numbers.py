"""The numbers of `explain`: what explain.json holds, each token's peak attention, the dominant token,
and the one-line diagnosis per target."""

from __future__ import annotations

RUNS = ("vanilla", "regulated")  # the plain run first, then the regulated one from the same noise


def explain_numbers(*, prompt, info, seed, steps, edit_steps, steps_shown, violin_steps, layers, words, recorders,
                    config, seconds, per_word, maps_are="the cross-attention of the conditional half") -> dict:
    """explain.json (without the diagnosis): the settings, per run and word token its mean, max and p90
    attention at every step, and per run, recorded layer and target token its mean and max at the shown
    steps (`per_layer`, where the recorder kept each layer's map)."""
    runs = {}
    for run, recorder in recorders.items():
        recorded_steps, _ = recorder.statistic("mean")
        tokens = []
        for k, (index, text) in enumerate(words):
            entry = {"index": index, "token": text, "target": index in info["indices"]}
            for name in ("mean", "max", "p90"):
                entry[name] = [round(float(recorder.stats[s][name][0, k]), 5) for s in recorded_steps]
            tokens.append(entry)
        dominant = {str(s): dominant_token(recorder, words, s)[1] for s in violin_steps}
        runs[run] = {"seconds_with_recording": round(seconds[run], 3), "recorded_bytes": recorder.nbytes(),
                     "steps": recorded_steps, "dominant_at_violin_steps": dominant, "tokens": tokens}
        if recorder.layer_maps:
            runs[run]["per_layer_bytes"] = recorder.layer_nbytes()
            runs[run]["per_layer"] = _per_layer(recorder, info["indices"], steps_shown)
    return {
        "prompt": prompt,
        "seed": seed,
        "targets": {"words": [str(t) for t in info["targets"]], "indices": info["indices"], "tokens": info["tokens"],
                    "per_word": per_word, "source": info["source"]},
        "num_inference_steps": steps,
        "edit_steps": edit_steps,
        "steps_shown": steps_shown,
        "violin_steps": violin_steps,
        "recorded_layers": layers,
        "maps": maps_are,
        "statistics": "over the pixels of the head- and layer-averaged map",
        "config": config.to_dict(),
        "runs": runs,
    }


def _per_layer(recorder, targets, steps_shown) -> dict:
    """{layer: {target token index: {"mean": [...], "max": [...]}}} over the pixels of each layer's own
    head-averaged map, at the shown steps."""
    out: dict = {}
    for step in steps_shown:
        for layer, maps in recorder.layer_maps.get(step, {}).items():
            for index in targets:
                m = maps[0, recorder.token_index(index)]
                entry = out.setdefault(layer, {}).setdefault(str(index), {"mean": [], "max": []})
                entry["mean"].append(round(float(m.mean()), 5))
                entry["max"].append(round(float(m.max()), 5))
    return out


def _peak(recorder, words, indices, step) -> float:
    """The largest pixel value at `step` over the given token indices."""
    ks = [k for k, (i, _) in enumerate(words) if i in indices]
    return float(recorder.stats[step]["max"][0, ks].max())


def dominant_token(recorder, words, step, exclude=()) -> tuple[int, str, float] | None:
    """(index, text, peak) of the word token with the highest peak attention at `step`."""
    peaks = recorder.stats[step]["max"][0]
    best = None
    for k, (index, text) in enumerate(words):
        if index in exclude:
            continue
        if best is None or float(peaks[k]) > best[2]:
            best = (index, text, float(peaks[k]))
    return best


def _trend(before: float, after: float) -> str:
    if after < 0.9 * before:
        return "fell"
    if after > 1.1 * before:
        return "rose"
    return "barely moved"


def diagnose(recorders, words, per_word: dict, violin_steps) -> list[str]:
    """One line per target: its peak attention at the two violin steps, against the dominant token,
    without regulation, then with it."""
    a, b = violin_steps
    vanilla, regulated = recorders["vanilla"], recorders["regulated"]
    lines = []
    for word, indices in per_word.items():
        va, vb = _peak(vanilla, words, indices, a), _peak(vanilla, words, indices, b)
        line = f"{word}: peak attention {_trend(va, vb)} from {va:.2f} at step {a} to {vb:.2f} at step {b}"
        dom = dominant_token(vanilla, words, b, exclude=indices)
        if dom is not None:
            d_index, d_text, db = dom
            da = _peak(vanilla, words, [d_index], a)
            verb = {"fell": "fell", "rose": "rose", "barely moved": "stayed"}[_trend(da, db)]
            line += f" while {d_text} {verb} {'at' if verb == 'stayed' else 'to'} {db:.2f}"
        ra, rb = _peak(regulated, words, indices, a), _peak(regulated, words, indices, b)
        line += f"; regulated: {word} {ra:.2f} -> {rb:.2f}"
        if dom is not None:
            line += f", {dom[1]} {_peak(regulated, words, [dom[0]], b):.2f} at step {b}"
        lines.append(line)
    return lines
