"""The detector backends of the GenEval scorer: boxes per class, and a colour name per box.

    owlv2   OWLv2 (transformers, `--owl-model`), open-vocabulary: GenEval's 80 class names are its queries;
            colours by zero-shot CLIP (`--clip-model`) over GenEval's ten names on each box's crop
    shapes  the embedded shapes world's exact detector (attnreg.toy): circle, square, triangle, and the
            colour it reads itself, so the whole rule engine runs on images with known answers

A backend has `name`, `classes`, `detect(images) -> [{class: [Detection]}]` and
`colours(image, classname, detections) -> [colour name]`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .geneval import COLOURS, Detection

DATA = Path(__file__).parent / "data"
DEFAULT_GENEVAL_CLIP = "openai/clip-vit-large-patch14"  # GenEval's colour model: OpenAI's ViT-L/14
# GenEval's three colour prompts per (colour, class)
COLOUR_TEMPLATES = ("a photo of a {colour} {name}", "a photo of a {colour}-colored {name}", "a photo of a {colour} object")
OWL_QUERY = "a photo of a {}"
OWL_NMS_IOU = 0.5  # OWLv2 fires on several overlapping patches per object; Mask2Former's instances do not
OWL_MIN_SCORE = 0.05  # boxes below it can pass no GenEval threshold worth using; fewer boxes to de-duplicate


@lru_cache(maxsize=1)
def geneval_classes() -> tuple[str, ...]:
    """GenEval's 80 object names (COCO's, in its order), from the shipped object_names.txt."""
    lines = (DATA / "geneval" / "object_names.txt").read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


class ShapesBackend:
    name = "shapes"

    def __init__(self, device: str = "cpu"):
        from attnreg.toy.world import SHAPES

        self.classes = SHAPES

    def detect(self, images) -> list[dict[str, list[Detection]]]:
        from attnreg.toy.detect import detect

        out = []
        for image in images:
            found: dict[str, list[Detection]] = {}
            for shape, colour, box in detect(image):
                found.setdefault(shape, []).append(Detection(tuple(float(v) for v in box), 1.0, colour))
            out.append(found)
        return out

    def colours(self, image, classname: str, detections) -> list[str]:
        return [d.colour for d in detections]


def nms(boxes, scores, iou: float):
    """Indices kept by greedy non-maximum suppression (torch tensors; boxes x0, y0, x1, y1)."""
    import torch

    order = torch.argsort(scores, descending=True)
    keep = []
    while order.numel():
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        lo = torch.maximum(boxes[i, :2], boxes[rest, :2])
        hi = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (hi - lo).clamp(min=0).prod(dim=1)
        area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
        overlap = inter / (area[i] + area[rest] - inter).clamp(min=1e-9)
        order = rest[overlap < iou]
    return keep


class OwlBackend:
    """OWLv2 boxes (each labelled with its most likely class, as OWL's own post-processing does, so that a
    box counts for one class as a closed-set detector's would), class-wise NMS; colours by CLIP."""

    name = "owlv2"

    def __init__(self, owl_model: str, clip_model: str, device: str = "cpu", classes=None,
                 nms_iou: float = OWL_NMS_IOU, min_score: float = OWL_MIN_SCORE):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        from .scorers import load_model

        self.classes = tuple(classes or geneval_classes())
        self.device, self.nms_iou, self.min_score = device, nms_iou, min_score
        self.model = load_model("OWL", owl_model, "--owl-model", Owlv2ForObjectDetection.from_pretrained).to(device).eval()
        self.processor = load_model("OWL processor", owl_model, "--owl-model", Owlv2Processor.from_pretrained)
        self.clip = ClipColours(clip_model, device)

    def detect(self, images) -> list[dict[str, list[Detection]]]:
        import torch

        queries = [OWL_QUERY.format(c) for c in self.classes]
        images = [im.convert("RGB") for im in images]
        inputs = self.processor(text=[queries] * len(images), images=images, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        scores, labels = torch.sigmoid(out.logits.float()).max(dim=-1)  # (images, boxes)
        return [self._boxes(im, out.pred_boxes[i].float().cpu(), scores[i].cpu(), labels[i].cpu())
                for i, im in enumerate(images)]

    def _boxes(self, image, cxcywh, scores, labels) -> dict[str, list[Detection]]:
        import torch

        # OWLv2 pads an image to a square at its bottom and right: boxes are relative to the longer side
        side = float(max(image.size))
        xyxy = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], dim=1) * side
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, image.size[0])
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, image.size[1])
        found: dict[str, list[Detection]] = {}
        for label in labels[scores >= self.min_score].unique().tolist():
            idx = torch.nonzero((labels == label) & (scores >= self.min_score)).flatten()
            kept = idx[nms(xyxy[idx], scores[idx], self.nms_iou)] if self.nms_iou < 1 else idx
            found[self.classes[label]] = [Detection(tuple(xyxy[j].tolist()), float(scores[j])) for j in kept]
        return found

    def colours(self, image, classname: str, detections) -> list[str]:
        return self.clip.colours(image, classname, detections)


class ClipColours:
    """GenEval's colour check: zero-shot CLIP over COLOURS on each box's crop; per (class, colour) the text
    embedding is the mean of the three templates' normalised embeddings, renormalised."""

    def __init__(self, clip_model: str, device: str = "cpu"):
        from .scorers import ClipText

        self.clip = ClipText(clip_model, device)
        self.device = device
        self.classifiers: dict[str, object] = {}

    def _classifier(self, classname: str):
        import torch

        if classname not in self.classifiers:
            rows = []
            for colour in COLOURS:
                texts = [t.format(colour=colour, name=classname) for t in COLOUR_TEMPLATES]
                tok = self.clip.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
                with torch.no_grad():
                    emb = self.clip._features(self.clip.model.get_text_features(
                        input_ids=tok.input_ids, attention_mask=tok.attention_mask)).float().cpu()
                mean = (emb / emb.norm(dim=-1, keepdim=True)).mean(dim=0)
                rows.append(mean / mean.norm())
            self.classifiers[classname] = torch.stack(rows)
        return self.classifiers[classname]

    def colours(self, image, classname: str, detections) -> list[str]:
        if not detections:
            return []
        crops = []
        for d in detections:
            x0, y0, x1, y1 = (int(round(v)) for v in d.box[:4])
            crops.append(image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))))
        logits = self.clip.images(crops) @ self._classifier(classname).T
        return [COLOURS[i] for i in logits.argmax(dim=1).tolist()]


BACKENDS = ("owlv2", "shapes")


def make_backend(settings: dict, device: str = "cpu"):
    if settings["detector"] == "shapes":
        return ShapesBackend(device)
    return OwlBackend(settings["owl_model"], settings["clip_model"], device, nms_iou=settings["owl_nms_iou"],
                      min_score=settings["owl_min_score"])


def backend_classes(detector: str) -> tuple[str, ...]:
    """The classes a backend looks for, without loading it."""
    if detector == "shapes":
        from attnreg.toy.world import SHAPES

        return tuple(SHAPES)
    return geneval_classes()
