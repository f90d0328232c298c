"""The pretrained models metrics load (CLIP, BLIP, OWL), by hub id or local folder, with an error that names the
option to pass when one cannot be loaded; and CLIP's text and image embeddings."""

from __future__ import annotations


class MetricModelError(OSError):
    """A metric's model that cannot be loaded."""


# The 80 ImageNet prompt templates of CLIP (Radford et al. 2021), as A&E's CLIP metrics use them.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"
DEFAULT_OWL = "google/owlv2-base-patch16-ensemble"


def load_model(kind: str, name: str, option: str, loader):
    try:
        return loader(name)
    except Exception as err:  # noqa: BLE001 - from_pretrained raises OSError, ValueError, EnvironmentError...
        raise MetricModelError(
            f"could not load the {kind} model {name!r}: {type(err).__name__}: {str(err)[:300]}. Without access to "
            f"the Hugging Face hub, download it elsewhere (e.g. `huggingface-cli download {name}` or "
            f"save_pretrained) and pass its local folder with {option} PATH."
        ) from err


class ClipText:
    """CLIP text embeddings: the mean of the 80 templates' normalised embeddings, renormalised (cached)."""

    def __init__(self, name: str, device: str):
        from transformers import CLIPModel, CLIPProcessor

        self.name = name
        self.model = load_model("CLIP", name, "--clip-model", lambda n: CLIPModel.from_pretrained(n)).to(device).eval()
        self.processor = load_model("CLIP processor", name, "--clip-model", lambda n: CLIPProcessor.from_pretrained(n))
        self.device = device
        self.cache: dict[str, object] = {}

    @staticmethod
    def _features(out):
        import torch

        return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a model output

    def text(self, texts: list[str]):
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for text in missing:
            batch = [template.format(text) for template in IMAGENET_TEMPLATES]
            tok = self.processor.tokenizer(batch, padding=True, truncation=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                emb = self._features(self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            self.cache[text] = (mean / mean.norm()).float().cpu()
        return torch.stack([self.cache[t] for t in texts])

    def images(self, images):
        import torch

        pixels = self.processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        with torch.no_grad():
            emb = self._features(self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device)))
        return (emb / emb.norm(dim=-1, keepdim=True)).float().cpu()
