"""Tiny random CLIP, BLIP and OWLv2 models (with processors) saved like real ones, for offline tests.

They are loaded back through exactly the code path of real models (`from_pretrained(path)`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..tokenizer import CLIP_TEXT_IDS

WORDS = (
    "a an the and with of in on cat dog bird bear lion horse elephant monkey frog turtle rabbit mouse backpack glasses "
    "crown suitcase chair balloon bow car bowl bench clock apple red orange yellow green blue purple pink brown gray "
    "black white circle square triangle photo picture there is are two"
).split()


# The small transformer every tiny tower shares; text towers add their vocabulary and positions.
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = dict(TINY_TOWER, image_size=32, patch_size=8)


def _clip_tokenizer():
    from attnreg.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


def tiny_clip(path: str | Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(TINY_TOWER, **CLIP_TEXT_IDS),
        vision_config=TINY_VISION,
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=_clip_tokenizer()).save_pretrained(path)
    return Path(path)


def tiny_blip(path: str | Path, seed: int = 0) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "[DEC]"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(path / "vocab.txt"), bos_token="[DEC]")
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=dict(TINY_TOWER, vocab_size=len(vocab), encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=vocab.index("[DEC]"), pad_token_id=0, sep_token_id=vocab.index("[SEP]"),
                         eos_token_id=vocab.index("[SEP]")),
        vision_config=TINY_VISION,
        projection_dim=16,
    )
    BlipForConditionalGeneration(config).eval().save_pretrained(path)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def tiny_owl(path: str | Path, seed: int = 0) -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    torch.manual_seed(seed)
    config = Owlv2Config(
        text_config=dict(TINY_TOWER, **{**CLIP_TEXT_IDS, "max_position_embeddings": 16, "pad_token_id": 0}),
        vision_config=TINY_VISION,
        projection_dim=32,  # OWL: must equal the text hidden size
    )
    Owlv2ForObjectDetection(config).eval().save_pretrained(path)
    image_processor = Owlv2ImageProcessorPil(size={"height": 32, "width": 32})
    tokenizer = _clip_tokenizer()
    tokenizer.model_max_length = 16
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return Path(path)
