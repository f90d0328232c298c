"""GenEval's scoring rules as pure functions of detections: no model is loaded here.

GenEval (Ghosh et al., NeurIPS 2023 D&B) scores an image against a metadata line
`{"tag", "prompt", "include": [clause, ...], "exclude": [clause, ...]}`, a clause being
`{"class", "count"[, "color"][, "position": [relation, index of an earlier clause]]}`. The rules, as its
evaluation/evaluate_images.py and summary_scores.py apply them (written anew here, not copied):

- detections of each class are kept above 0.3 confidence (0.9 when the tag is `counting`), most confident
  first, at most 16 per class, then optionally de-duplicated (IoU >= `max_overlap`; 1.0, the default, is off);
- an `include` clause takes the `count` most confident detections of its class and fails when there are fewer;
  with a colour, each of them is named by a colour classifier over ten colour names and at least `count` must
  be the one asked; with a position, every one of them must stand in that relation to every object of the
  clause it refers to, which must itself have passed;
- an `exclude` clause fails the image when `count` or more of its class are kept;
- the summary: per tag the share of correct images, overall the mean of the tags' shares (each tag counts
  the same, whatever its size), and the shares of correct images and of prompts with any correct image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_MARGIN = 0.1  # the offset of two centres shrinks by this share of the two boxes' sizes
NO_NMS = 1.0
ROW_FIELDS = ("tag", "prompt", "include", "exclude")
INCLUDE_FIELDS = ("class", "count", "color", "position")
EXCLUDE_FIELDS = ("class", "count")


class GenEvalError(ValueError):
    """A malformed metadata line, or one naming a class the detector was not given."""


@dataclass(frozen=True)
class Detection:
    """One detected object: its box (x0, y0, x1, y1) in pixels, its confidence, and the colour the detector
    itself read (the shapes world's exact detector; None where a colour classifier names it)."""

    box: tuple[float, float, float, float]
    score: float
    colour: str | None = None


# -- metadata ------------------------------------------------------------------------------------------------
def _unknown(fields, valid, where, what) -> None:
    bad = [f for f in fields if f not in valid]
    if bad:
        raise GenEvalError(f"{where}: unknown field(s) {', '.join(map(repr, bad))} in {what}; valid: {', '.join(valid)}")


def _count(clause: dict, where: str) -> int:
    count = clause.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise GenEvalError(f"{where}: \"count\" must be an integer >= 1, got {count!r}")
    return count


def _clause(clause, i: int, where: str, kind: str) -> dict:
    where = f"{where}, {kind}[{i}]"
    if not isinstance(clause, dict):
        raise GenEvalError(f"{where}: expected an object with \"class\" and \"count\", got {type(clause).__name__}")
    _unknown(clause, INCLUDE_FIELDS if kind == "include" else EXCLUDE_FIELDS, where, kind)
    name = clause.get("class")
    if not isinstance(name, str) or not name.strip():
        raise GenEvalError(f"{where}: \"class\" must be a non-empty string")
    out = {"class": name.strip(), "count": _count(clause, where)}
    if "color" in clause:
        if clause["color"] not in COLOURS:
            raise GenEvalError(f"{where}: unknown color {clause['color']!r}; valid: {', '.join(COLOURS)}")
        out["color"] = clause["color"]
    if "position" in clause:
        pos = clause["position"]
        ok = isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in RELATIONS
        if not ok or isinstance(pos[1], bool) or not isinstance(pos[1], int) or not 0 <= pos[1] < i:
            earlier = f"0..{i - 1}" if i else "none: the first clause has nothing to be placed against"
            raise GenEvalError(f"{where}: \"position\" must be [relation, index of an earlier include clause] with "
                               f"relation one of {', '.join(RELATIONS)} and index in {earlier}; got {pos!r}")
        out["position"] = [pos[0], pos[1]]
    return out


def check_metadata(row, where: str = "metadata") -> dict:
    """A GenEval metadata line, checked and normalised; a GenEvalError names the line and the field."""
    if not isinstance(row, dict):
        raise GenEvalError(f"{where}: expected a JSON object with {', '.join(ROW_FIELDS)}, got {type(row).__name__}")
    _unknown(row, ROW_FIELDS, where, "the line")
    if row.get("tag") not in TAGS:
        raise GenEvalError(f"{where}: unknown tag {row.get('tag')!r}; valid: {', '.join(TAGS)}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenEvalError(f"{where}: \"prompt\" is missing or not a non-empty string")
    include, exclude = row.get("include"), row.get("exclude", [])
    if not isinstance(include, list) or not include:
        raise GenEvalError(f"{where}: \"include\" must be a non-empty list of clauses")
    if not isinstance(exclude, list):
        raise GenEvalError(f"{where}: \"exclude\" must be a list of clauses")
    return {"tag": row["tag"], "prompt": prompt.strip(),
            "include": [_clause(c, i, where, "include") for i, c in enumerate(include)],
            "exclude": [_clause(c, i, where, "exclude") for i, c in enumerate(exclude)]}


def classes_of(metadata: dict) -> list[str]:
    return list(dict.fromkeys(c["class"] for c in [*metadata["include"], *metadata.get("exclude", [])]))


def check_classes(metadata: dict, classes, detector: str) -> None:
    """Every class the line names is one the detector looks for."""
    bad = [c for c in classes_of(metadata) if c not in classes]
    if bad:
        shown = ", ".join(list(classes)[:12]) + (f", ... ({len(classes)} in all)" if len(classes) > 12 else "")
        raise GenEvalError(f"prompt {metadata['prompt']!r}: class(es) {', '.join(map(repr, bad))} are not among the "
                           f"{detector} detector's classes; valid: {shown}")


# -- the rules -----------------------------------------------------------------------------------------------
def iou(a, b) -> float:
    """Intersection over union of two boxes, pixels counted inclusively as GenEval's NMS does."""
    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def keep(raw: dict, tag: str, threshold: float = THRESHOLD, counting_threshold: float = COUNTING_THRESHOLD,
         max_objects: int = MAX_OBJECTS, max_overlap: float = NO_NMS) -> dict[str, list[Detection]]:
    """{class: detections} -> the kept ones, most confident first (classes with none left out)."""
    floor = counting_threshold if tag == "counting" else threshold
    kept = {}
    for name, dets in raw.items():
        order = sorted((d for d in dets if d.score > floor), key=lambda d: -d.score)[:max_objects]
        chosen: list[Detection] = []
        for d in order:
            if max_overlap >= 1.0 or all(iou(d.box, c.box) < max_overlap for c in chosen):
                chosen.append(d)
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(a: Detection, b: Detection, margin: float = POSITION_MARGIN) -> set[str]:
    """Where `a` is relative to `b`: a subset of RELATIONS. The centres' offset shrinks towards zero by
    `margin` x (the sum of the boxes' widths, resp. heights); a direction holds when the shrunk offset
    keeps more than half the length of the full offset along it. Image y grows downwards."""
    boxes = np.array([a.box[:4], b.box[:4]], dtype=np.float64).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=1)
    size_a, size_b = boxes[:, 1] - boxes[:, 0]
    offset = centre_a - centre_b
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - margin * (size_a + size_b), 0.0)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {name for name, holds in found.items() if holds}


def _position_fails(objs, targets, relation, margin) -> str | None:
    for obj in objs:
        for target in targets:
            seen = relative_position(obj, target, margin)
            if relation not in seen:
                return f"found {' and '.join(sorted(seen)) or 'no clear relation'} instead"
    return None


def evaluate(metadata: dict, objects: dict, colours_of, margin: float = POSITION_MARGIN) -> tuple[bool, list[str]]:
    """(correct, reasons) for one image. `objects` is `keep`'s output; `colours_of(class, detections)` names
    the colour of each detection (called only for clauses with a colour)."""
    correct, reasons, groups = True, [], []
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        passed = len(found) >= count
        if not passed:
            reasons.append(f"expected {name} >= {count}, found {len(found)}")
        if passed and "color" in clause:
            colours = list(colours_of(name, found))
            if colours.count(clause["color"]) < count:
                passed = False
                named = ", ".join(f"{colours.count(c)} {c}" for c in COLOURS if c in colours)
                reasons.append(f"expected {clause['color']} {name} >= {count}, found {named}")
        if passed and "position" in clause:
            relation, index = clause["position"]
            if groups[index] is None:
                passed = False
                reasons.append(f"no {metadata['include'][index]['class']} for {name} to be {relation}")
            else:
                failure = _position_fails(found, groups[index], relation, margin)
                if failure:
                    passed = False
                    reasons.append(f"expected {name} {relation} {metadata['include'][index]['class']}, {failure}")
        correct = correct and passed
        groups.append(found if passed else None)
    for clause in metadata.get("exclude", []):
        n = len(objects.get(clause["class"], []))
        if n >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']} < {clause['count']}, found {n}")
    return correct, reasons


# -- the summary ---------------------------------------------------------------------------------------------
def summarise(results) -> dict:
    """GenEval's summary of per-image results ({"tag", "prompt", "correct"}; images of one prompt share its
    prompt): images, prompts, the share of correct images, of prompts with at least one correct image,
    per tag (in order of first appearance) its share and counts, and overall = the mean of the tags' shares."""
    results = list(results)
    by_prompt: dict[str, bool] = {}
    by_tag: dict[str, list[bool]] = {}
    for r in results:
        by_prompt[r["prompt"]] = by_prompt.get(r["prompt"], False) or bool(r["correct"])
        by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
    tags = {t: {"score": sum(v) / len(v), "correct": sum(v), "images": len(v)} for t, v in by_tag.items()}
    return {
        "images": len(results), "prompts": len(by_prompt),
        "correct_images": sum(bool(r["correct"]) for r in results) / len(results) if results else float("nan"),
        "correct_prompts": sum(by_prompt.values()) / len(by_prompt) if by_prompt else float("nan"),
        "tags": tags,
        "overall": float(np.mean([t["score"] for t in tags.values()])) if tags else float("nan"),
    }


def scorer_name(settings: dict) -> str:
    """Which detector scored it, in words: a GenEval number is comparable only with one of the same scorer."""
    if settings.get("detector") == "shapes":
        return "the shapes world's exact detector (attnreg.toy; colours read by it)"
    return (f"OWLv2 ({settings.get('owl_model')}, class-wise NMS at IoU {settings.get('owl_nms_iou')}) with CLIP colours "
            f"({settings.get('clip_model')}, box crops)")


def summary_lines(results_by_method: dict, settings: dict) -> list[str]:
    """A markdown section: per method GenEval's summary (overall, each tag, correct images and prompts)."""
    summaries = {m: summarise(r) for m, r in results_by_method.items() if r}
    if not summaries:
        return []
    tags = list(dict.fromkeys(t for s in summaries.values() for t in s["tags"]))
    lines = ["## GenEval", "",
             f"Scored with attnreg's GenEval rules on {scorer_name(settings)}; thresholds {settings.get('threshold')} "
             f"(counting {settings.get('counting_threshold')}). Not the official Mask2Former score: compare only with "
             "numbers of the same detector. Overall = the mean of the tags' shares of correct images.", "",
             "| method | images | prompts | overall | " + " | ".join(tags) + " | correct images | correct prompts |",
             "|---|" + "---|" * (len(tags) + 5)]
    for method, s in summaries.items():
        cells = [f"{s['tags'][t]['score']:.3f} ({s['tags'][t]['correct']}/{s['tags'][t]['images']})"
                 if t in s["tags"] else "-" for t in tags]
        lines.append(f"| {method} | {s['images']} | {s['prompts']} | {s['overall']:.4f} | " + " | ".join(cells)
                     + f" | {s['correct_images'] * 100:.1f} % | {s['correct_prompts'] * 100:.1f} % |")
    return [*lines, ""]
