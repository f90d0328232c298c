"""Metrics of a benchmark folder, each a small registered object; computed after generation.

`score_dir(DIR, "clip,owl")` scores every complete record of DIR and stores the values per item in
DIR/scores/<metric>-<hash of its settings>.json (rewritten atomically every few items, so a killed run
resumes where it stopped). Values are floats (reported as means with a t interval) or booleans (rates,
Wilson interval).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

from PIL import Image

from .scorers import DEFAULT_BLIP, DEFAULT_CLIP, DEFAULT_OWL, ClipText, load_model
from .io import atomic_write_json, check_folder, iter_records, missing_images_note, records_without_image, stable_hash


class MetricError(ValueError):
    """An unknown metric or a metric that does not apply."""


METRICS: dict[str, type["Metric"]] = {}


def register_metric(cls):
    METRICS[cls.name] = cls
    return cls


def parse_metrics(metrics) -> list[str]:
    if metrics is None:
        return []
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    return [m for m in names if m and m != "none"]


def check_metrics(names: list[str]) -> None:
    bad = [n for n in names if n not in METRICS]
    if bad:
        columns = " (seconds and peak memory are not metrics: every report has them)" if {"time", "memory"} & set(bad) else ""
        raise MetricError(f"unknown metric(s) {', '.join(bad)}; valid: {', '.join(METRICS)}, or none{columns}")


MODEL_OPTIONS = {"clip_model": ("CLIP", "--clip-model"), "blip_model": ("BLIP", "--blip-model"),
                 "owl_model": ("OWL", "--owl-model")}


def check_metric_models(names: list[str], **options) -> None:
    """Before any image is made: every model the metrics will load has a readable configuration (a local
    folder, or the hub when it is reachable). A MetricModelError names the one that has not."""
    from transformers import AutoConfig

    for name in names:
        settings = METRICS[name](**{k: v for k, v in options.items() if v is not None}).settings()
        for key, value in settings.items():
            if key in MODEL_OPTIONS:
                kind, option = MODEL_OPTIONS[key]
                load_model(kind, str(value), option, lambda n: AutoConfig.from_pretrained(n))


def check_metric_records(names: list[str], records: list[dict], **options) -> None:
    """Before any image is made: each metric applies to some of the items (records as far as they are known
    then: prompt, dataset, metadata) and refuses none of them."""
    for name in names:
        metric = METRICS[name](**{k: v for k, v in options.items() if v is not None})
        if records and not any(metric.applies(r) for r in records):
            raise MetricError(f"metric {name} applies to none of the {len(records)} prompts of data set "
                              f"{records[0].get('dataset')!r} ({metric.description})")
        metric.check(records)


def split_prompt(prompt: str) -> list[str]:
    """A&E's halves: split on " and ", else on " with "; the whole prompt when neither occurs."""
    for sep in (" and ", " with "):
        if sep in prompt:
            return [p.strip() for p in prompt.split(sep) if p.strip()]
    return [prompt]


class Metric:
    """A metric: `settings()` (stored with the scores), `applies(record)`, and `score(records, images)`
    returning one dict of values per record. Models load lazily on first use."""

    name = "base"
    description = ""
    batch_size = 8

    def __init__(self, device: str = "cpu", **options):
        self.device = device
        self.options = options

    def settings(self) -> dict:
        return {}

    def applies(self, record: dict) -> bool:
        return True

    def score(self, records: list[dict], images: list[Image.Image]) -> list[dict]:
        raise NotImplementedError

    def check(self, records: list[dict]) -> None:
        """Refuse, before any image is made or scored, records this metric could not score (MetricError)."""


@register_metric
class Detect(Metric):
    name = "detect"
    description = "the exact shapes detector of the embedded world (attnreg.toy.score): shapes data set only"
    batch_size = 64

    def applies(self, record):
        return record.get("dataset") == "shapes"

    def score(self, records, images):
        try:
            from attnreg.toy import score
        except ImportError as err:
            raise MetricError(f"metric detect needs attnreg.toy.score, which is not available ({err})") from None
        out = []
        for record, image in zip(records, images):
            result = dict(score(record["prompt"], image))
            result.pop("n_named", None)  # a property of the prompt, not of the image
            out.append(json.loads(json.dumps(result, default=_plain)))
        return out


def _plain(value):
    """json.dumps fallback: numpy scalars and arrays to Python numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


@register_metric
class Clip(Metric):
    name = "clip"
    description = "CLIP full-prompt and minimum-object similarity (A&E convention, 80 templates)"

    def settings(self):
        return {"clip_model": str(self.options.get("clip_model") or DEFAULT_CLIP)}

    def score(self, records, images):
        if not hasattr(self, "clip"):
            self.clip = ClipText(self.settings()["clip_model"], self.device)
        img = self.clip.images(images)
        out = []
        for i, record in enumerate(records):
            halves = split_prompt(record["prompt"])
            text = self.clip.text([record["prompt"], *halves])
            sims = (text @ img[i]).tolist()
            out.append({"full": sims[0], "min_object": min(sims[1:])})
        return out


@register_metric
class Blip(Metric):
    name = "blip"
    description = "text-text similarity: BLIP caption vs prompt, CLIP text tower (80 templates), cosine"

    def settings(self):
        return {"blip_model": str(self.options.get("blip_model") or DEFAULT_BLIP),
                "clip_model": str(self.options.get("clip_model") or DEFAULT_CLIP), "max_new_tokens": 30}

    def score(self, records, images):
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        s = self.settings()
        if not hasattr(self, "blip"):
            self.blip = load_model("BLIP", s["blip_model"], "--blip-model",
                              lambda n: BlipForConditionalGeneration.from_pretrained(n)).to(self.device).eval()
            self.processor = load_model("BLIP processor", s["blip_model"], "--blip-model", lambda n: BlipProcessor.from_pretrained(n))
            self.clip = ClipText(s["clip_model"], self.device)
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = self.blip.generate(pixel_values=inputs["pixel_values"], max_new_tokens=s["max_new_tokens"])
        captions = [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]
        out = []
        for record, caption in zip(records, captions):
            a, b = self.clip.text([caption or " ", record["prompt"]])
            out.append({"text_text": float(a @ b), "caption": caption})
        return out


@register_metric
class Owl(Metric):
    name = "owl"
    description = "detection rate: OWLv2 / OWL-ViT finds every target noun above a threshold"

    def settings(self):
        return {"owl_model": str(self.options.get("owl_model") or DEFAULT_OWL),
                "owl_threshold": float(0.1 if self.options.get("owl_threshold") is None else self.options["owl_threshold"]), "query": "a photo of a {}"}

    def score(self, records, images):
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        s = self.settings()
        if not hasattr(self, "model"):
            self.model = load_model("OWL", s["owl_model"], "--owl-model",
                               lambda n: AutoModelForZeroShotObjectDetection.from_pretrained(n)).to(self.device).eval()
            self.processor = load_model("OWL processor", s["owl_model"], "--owl-model", lambda n: AutoProcessor.from_pretrained(n))
        out = []
        for record, image in zip(records, images):
            nouns = [str(t).split("#")[0] for t in record["targets"]]
            queries = [s["query"].format(n) for n in nouns]
            inputs = self.processor(text=[queries], images=[image.convert("RGB")], return_tensors="pt").to(self.device)
            with torch.no_grad():
                logits = self.model(**inputs).logits[0]  # (boxes, queries)
            best = torch.sigmoid(logits.float()).max(dim=0).values.tolist()
            found = [b >= s["owl_threshold"] for b in best]
            out.append({"all_found": all(found), "found_share": sum(found) / len(found),
                        "max_scores": dict(zip(nouns, best))})
        return out


@register_metric
class GenEval(Metric):
    name = "geneval"
    description = ("GenEval's rules (classes, counts, colours, positions) on a pluggable detector (--geneval-detector "
                   "owlv2 or shapes); records with GenEval metadata (--dataset geneval or geneval:PATH)")

    def settings(self):
        from .detectors import BACKENDS, DEFAULT_GENEVAL_CLIP, OWL_MIN_SCORE, OWL_NMS_IOU
        from .geneval import COUNTING_THRESHOLD, MAX_OBJECTS, NO_NMS, POSITION_MARGIN, THRESHOLD

        o = self.options
        detector = o.get("geneval_detector") or "owlv2"
        if detector not in BACKENDS:
            raise MetricError(f"unknown GenEval detector {detector!r}; valid: {', '.join(BACKENDS)}")
        given = {k: o.get(f"geneval_{k}") for k in ("threshold", "counting_threshold")}
        s = {"detector": detector, "threshold": float(THRESHOLD if given["threshold"] is None else given["threshold"]),
             "counting_threshold": float(COUNTING_THRESHOLD if given["counting_threshold"] is None
                                         else given["counting_threshold"]),
             "max_objects": MAX_OBJECTS, "max_overlap": NO_NMS, "position_margin": POSITION_MARGIN}
        if detector == "owlv2":
            s.update(owl_model=str(o.get("owl_model") or DEFAULT_OWL), owl_nms_iou=OWL_NMS_IOU, owl_min_score=OWL_MIN_SCORE,
                     clip_model=str(o.get("clip_model") or DEFAULT_GENEVAL_CLIP), colour_crop="box, no mask")
        return s

    def applies(self, record):
        return bool((record.get("metadata") or {}).get("include"))

    def check(self, records: list[dict]) -> None:
        """Every line's classes are ones the detector looks for (before any image is made or scored)."""
        from .detectors import backend_classes
        from .geneval import GenEvalError, check_classes

        detector = self.settings()["detector"]
        classes = backend_classes(detector)
        for record in records:
            if self.applies(record):
                try:
                    check_classes(record["metadata"], classes, detector)
                except GenEvalError as err:
                    raise MetricError(f"metric geneval: {err}") from None

    def score(self, records, images):
        from .detectors import make_backend
        from .geneval import evaluate, keep

        s = self.settings()
        if not hasattr(self, "backend"):
            self.backend = make_backend(s, self.device)
        out = []
        for record, image, raw in zip(records, images, self.backend.detect(images)):
            meta = record["metadata"]
            objects = keep(raw, meta["tag"], s["threshold"], s["counting_threshold"], s["max_objects"], s["max_overlap"])
            correct, reasons = evaluate(meta, objects, lambda name, dets, im=image: self.backend.colours(im, name, dets),
                                        s["position_margin"])
            out.append({"correct": correct, "tag": meta["tag"], "reason": "; ".join(reasons), "detector": s["detector"],
                        "detections": {k: [[*map(float, d.box), d.score] for d in v] for k, v in objects.items()}})
        return out


def scores_path(out: Path, metric: Metric) -> Path:
    return Path(out) / "scores" / f"{metric.name}-{stable_hash(metric.name, metric.settings())[:6]}.json"


def load_scores(out: Path) -> dict[str, dict]:
    """{metric name: {"settings", "items": {key: values}}}; the newest file when a metric has several."""
    root = Path(out) / "scores"
    found: dict[str, tuple[float, dict]] = {}
    if root.is_dir():
        for path in root.glob("*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            name, mtime = data.get("metric"), path.stat().st_mtime
            if name and (name not in found or mtime > found[name][0]):
                found[name] = (mtime, data)
    return {name: data for name, (_, data) in found.items()}


def journal_path(path: Path) -> Path:
    """Beside a scores file: one line per item scored since the file was last written, so that a scorer
    killed between two writes resumes without scoring any image twice."""
    return path.with_name(path.stem + ".partial.jsonl")


def read_scores(path: Path, metric: Metric) -> dict:
    """The scores file with its journal's items added (a line cut by a kill is ignored)."""
    data = {"metric": metric.name, "settings": metric.settings(), "items": {}}
    if path.is_file():
        data = json.loads(path.read_text())
    journal = journal_path(path)
    if journal.is_file():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            data["items"][row["key"]] = row["values"]
    return data


def write_scores(path: Path, data: dict) -> None:
    atomic_write_json(path, data)
    journal_path(path).unlink(missing_ok=True)  # after the write: a kill in between only repeats its items


def _score_items(out: Path, metric: Metric, path: Path, data: dict, todo: list[dict], progress: bool,
                 flush_every: float) -> None:
    """Score `todo` into data["items"]: each batch is appended to the journal at once, the file is
    rewritten every `flush_every` seconds and at the end, also when interrupted."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"score {metric.name}", unit="img", disable=not progress, file=sys.stderr)
    last = time.monotonic()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for start in range(0, len(todo), metric.batch_size):
            batch = todo[start : start + metric.batch_size]
            images = []
            for r in batch:
                with Image.open(out / r["image"]) as im:
                    images.append(im.convert("RGB"))
            values = metric.score(batch, images)
            with open(journal_path(path), "a", encoding="utf-8") as journal:
                for r, v in zip(batch, values):
                    data["items"][r["key"]] = v
                    journal.write(json.dumps({"key": r["key"], "values": v}) + "\n")
                journal.flush()
                os.fsync(journal.fileno())
            bar.update(len(batch))
            if time.monotonic() - last > flush_every:
                write_scores(path, data)
                last = time.monotonic()
    finally:
        bar.close()
        write_scores(path, data)


def score_dir(out, metrics, device: str = "cpu", progress: bool = True, flush_every: float = 20.0, **options) -> dict:
    """Score every complete record of `out` with `metrics`; items already scored are skipped.
    Returns {metric: {"scored": n, "skipped": n, "not_applicable": n, "file": path}}."""
    out = check_folder(out)
    names = parse_metrics(metrics)
    check_metrics(names)
    records = list(iter_records(out))
    no_image = records_without_image(out)
    if no_image:
        warnings.warn(f"attnreg score: {missing_images_note(out, no_image)}", stacklevel=2)
    if not records:
        raise MetricError(f"{out} holds no finished benchmark records (run `attnreg bench` first)")
    made = {name: METRICS[name](device=device, **{k: v for k, v in options.items() if v is not None}) for name in names}
    for metric in made.values():  # every metric's refusal before the first is scored
        metric.check(records)
    summary = {}
    for name, metric in made.items():
        path = scores_path(out, metric)
        data = read_scores(path, metric)
        todo = [r for r in records if metric.applies(r) and r["key"] not in data["items"]]
        n_na = sum(not metric.applies(r) for r in records)
        if n_na == len(records):
            raise MetricError(f"metric {name} applies to none of the {len(records)} records of {out} ({metric.description})")
        _score_items(out, metric, path, data, todo, progress, flush_every)
        summary[name] = {"scored": len(todo), "skipped": len(records) - len(todo) - n_na, "not_applicable": n_na,
                         "no_image": no_image, "file": str(path)}
        print(f"attnreg score: {name}: {len(todo)} scored, {summary[name]['skipped']} already scored, "
              f"{n_na} not applicable{f', {len(no_image)} without image' if no_image else ''} -> {path}", file=sys.stderr)
    return summary
