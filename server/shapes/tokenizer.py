"""A real CLIP tokenizer for a small vocabulary, built offline.

CLIP's tokenizer is byte-level BPE with an end-of-word marker. We train the merges on our caption
corpus with the `tokenizers` library (hand-written merge chains break words: BPE applies merges by
global rank), write the legacy vocab.json + merges.txt pair that every transformers version loads,
and load it with `CLIPTokenizer.from_pretrained` like any Stable Diffusion tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_clip_tokenizer(corpus: list[str], folder: Path, max_length: int = 16) -> CLIPTokenizer:
    """Train BPE merges on `corpus`, save a CLIP tokenizer folder, and load it back."""
    alphabet = list(_bytes_to_unicode().values())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator([text.lower() for text in corpus], trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]

    vocab: dict[str, int] = {}
    for token in alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": max_length,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )
    return CLIPTokenizer.from_pretrained(folder)
