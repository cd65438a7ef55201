"""Caption vocabularies: word-level (from the references' tokens) or the text tower's tokenizer.

Both give the same interface: ``pad``, ``bos``, ``eos``, ``unk`` ids, ``size``, ``encode(sentence)`` (ids without
BOS/EOS), ``decode(ids)`` (text up to the first EOS) and ``ids_of(words)`` (for the bad-ending ban).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List

from ..vocab import WordVocab


class TokenizerVocab:
    """The text tower's tokenizer as the caption vocabulary (BOS = ``[CLS]``, EOS = ``[SEP]``)."""

    kind = "tokenizer"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad = tokenizer.pad_token_id
        self.bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        self.eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        self.unk = tokenizer.unk_token_id
        if None in (self.pad, self.bos, self.eos):
            raise ValueError("data.vocab=tokenizer needs a tokenizer with pad and cls/bos and sep/eos tokens")

    @property
    def size(self) -> int:
        return len(self.tokenizer)

    def encode(self, sentence: Dict[str, Any]) -> List[int]:
        raw = sentence.get("raw") or " ".join(sentence.get("tokens", []))
        return list(self.tokenizer(raw, add_special_tokens=False)["input_ids"])

    def _until_eos(self, ids: Iterable[int]) -> List[int]:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i not in (self.pad, self.bos):
                out.append(i)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(self._until_eos(ids), skip_special_tokens=True).strip()

    def tokens(self, ids: Iterable[int]) -> List[str]:
        return [t[2:] if t.startswith("##") else t for t in self.tokenizer.convert_ids_to_tokens(self._until_eos(ids))]

    def ids_of(self, words: Iterable[str]) -> List[int]:
        vocab = self.tokenizer.get_vocab()
        return sorted({vocab[w] for w in words if w in vocab})

    def save(self, directory: str) -> None:
        self.tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
        with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({"kind": self.kind, "tokenizer": "tokenizer"}, f)


def load_vocab(directory: str):
    """The vocabulary saved in a model directory."""
    with open(os.path.join(directory, "vocab.json"), encoding="utf-8") as f:
        data = json.load(f)
    if data["kind"] == "word":
        return WordVocab.from_json(data, os.path.join(directory, "vocab.json"))
    from transformers import AutoTokenizer
    return TokenizerVocab(AutoTokenizer.from_pretrained(os.path.join(directory, data["tokenizer"])))
