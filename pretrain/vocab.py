"""The word vocabulary of the heads that do not use the text tower's tokenizer (the VSE++ GRU, word-level
captioning): one class, called like a Hugging Face tokenizer where a tokenizer is expected.

Words: the Karpathy ``tokens`` when given, else the lower-cased words of the raw text with every CJK
character a word of its own (Chinese has no spaces). Ids: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2,
``<unk>`` = 3, then the words by decreasing training frequency (ties: alphabetical). A vocabulary saved
with other special tokens (older VSE exports: ``<pad>``, ``<unk>``) keeps its ids when loaded.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any, Dict, Iterable, List, Sequence, Union

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+(?:'[^\W_]+)?", re.UNICODE)

Text = Union[str, Sequence[str], Dict[str, Any]]


def words_of(text: str) -> List[str]:
    """Lower-cased words; CJK ideographs one by one; punctuation dropped."""
    return _WORD.findall(text.lower())


def sentence_tokens(sentence: Dict[str, Any]) -> List[str]:
    """The words of a Karpathy sentence: its ``tokens`` if any, else the words of its ``raw`` text."""
    toks = sentence.get("tokens")
    return [t.lower() for t in toks] if toks else words_of(sentence.get("raw", ""))


def _words(text: Text) -> List[str]:
    if isinstance(text, dict):
        return sentence_tokens(text)
    return words_of(text) if isinstance(text, str) else [w.lower() for w in text]


class WordVocab:
    kind = "word"

    def __init__(self, itos: Sequence[str]):
        """``itos``: every entry, special tokens included (``WordVocab.build`` or ``WordVocab.load`` make one)."""
        self.itos: List[str] = list(itos)
        self.stoi: Dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if "<pad>" not in self.stoi or "<unk>" not in self.stoi:
            raise ValueError("a word vocabulary needs <pad> and <unk> entries")
        self.pad, self.unk = self.stoi["<pad>"], self.stoi["<unk>"]
        self.bos, self.eos = self.stoi.get("<bos>"), self.stoi.get("<eos>")
        self.pad_token_id, self.unk_token_id = self.pad, self.unk   # the Hugging Face names

    @classmethod
    def from_words(cls, words: Sequence[str]) -> "WordVocab":
        return cls(SPECIALS + [w for w in words if w not in SPECIALS])

    @classmethod
    def build(cls, texts: Iterable[Text], min_freq: int) -> "WordVocab":
        """From training captions (raw strings, token lists or Karpathy sentences); words seen fewer than
        ``min_freq`` times are left out."""
        counts = Counter(w for t in texts for w in _words(t))
        return cls.from_words(sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w)))

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def size(self) -> int:
        return len(self.itos)

    def encode(self, text: Text) -> List[int]:
        """Ids of the words (no BOS/EOS)."""
        return [self.stoi.get(w, self.unk) for w in _words(text)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text up to the first EOS, without padding and BOS."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if skip_special_tokens and i in (self.pad, self.bos):
                continue
            out.append(self.itos[i])
        return " ".join(out)

    def tokens(self, ids: Iterable[int]) -> List[str]:
        """One display string per id up to EOS (attention maps)."""
        return self.decode(ids).split()

    def ids_of(self, words: Iterable[str]) -> List[int]:
        return sorted({self.stoi[w] for w in words if w in self.stoi})

    def __call__(self, texts: Union[Text, List[Text]], padding: Union[bool, str] = "max_length",
                 truncation: bool = True, max_length: int = 32, return_tensors: str = "pt",
                 **_ignored) -> Dict[str, Any]:
        """Hugging Face tokenizer interface: ids padded to ``max_length`` (or the longest with padding=True)."""
        import torch

        if isinstance(texts, (str, dict)):
            texts = [texts]
        ids = [self.encode(t)[:max_length] if truncation else self.encode(t) for t in texts]
        width = max_length if padding == "max_length" else max([len(x) for x in ids] + [1])
        input_ids = torch.full((len(ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, :len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def save(self, path: str) -> None:
        """Write ``path`` (a directory: ``path/vocab.json``) as JSON."""
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"kind": self.kind, "itos": self.itos}, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str) -> "WordVocab":
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.json")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: Any, where: str = "vocab.json") -> "WordVocab":
        if isinstance(data, dict) and isinstance(data.get("itos"), list):
            return cls(data["itos"])
        if isinstance(data, dict) and isinstance(data.get("words"), list):   # captioning's earlier format
            return cls.from_words(data["words"])
        raise ValueError(f"{where}: not a word vocabulary (expected a JSON object with a list 'itos')")
