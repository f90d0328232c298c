"""The real CLIP BPE tokenizer, built offline from OpenAI's vendored merge file.

SD 1.x/2.x/SDXL all use this tokenizer; shipping it lets tests and the embedded model run with no
network. Conversion follows OpenAI's `simple_tokenizer.py`: merges are lines 1..48894 of the file,
the vocabulary is the 256 byte characters, the same with "</w>", every merge joined, then the two
special tokens (49,408 entries).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
N_MERGES = 49152 - 256 - 2  # OpenAI's count: vocab 49408 minus the byte and special tokens
VOCAB_SIZE = 49408
SOS_ID, EOS_ID = 49406, 49407  # <|startoftext|>, <|endoftext|> (also SD's padding)
# what a CLIPTextConfig needs to read this tokenizer's ids (75 words + SOS + EOS)
CLIP_TEXT_IDS = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=77, bos_token_id=SOS_ID, eos_token_id=EOS_ID,
                     pad_token_id=EOS_ID)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(BPE_PATH, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : N_MERGES + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def save_clip_tokenizer_files(directory: str | Path) -> Path:
    """Write `vocab.json` and `merges.txt` (Hugging Face layout) into `directory`."""
    import json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


def load_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """The CLIP tokenizer as SD ships it (pad with EOS, 77 tokens). SDXL's second one pads with "!"."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    # transformers 5: pass the vocab and merges themselves; the file-path form builds a broken tokenizer.
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges], pad_token=pad_token, model_max_length=model_max_length)
