"""The VSE++ text baseline: its own word vocabulary, word embeddings and a GRU over packed sequences.

``WordVocab`` is called like a Hugging Face tokenizer (``vocab(texts, padding="max_length",
truncation=True, max_length=L, return_tensors="pt")`` -> ``input_ids``, ``attention_mask``), so the
GRU encoder takes the same inputs as the transformer text tower and every caller stays the same.
Words: the Karpathy ``tokens`` when given, else lower-cased words of the raw text with every CJK
character a word of its own (Chinese queries have no spaces).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Dict, Iterable, List, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+(?:'[^\W_]+)?", re.UNICODE)


def words_of(text: str) -> List[str]:
    """Lower-cased words; CJK ideographs one by one; punctuation dropped."""
    return _WORD.findall(text.lower())


class WordVocab:
    """``<pad>`` = 0, ``<unk>`` = 1, then the words by decreasing training frequency (ties: alphabetical)."""

    def __init__(self, words: Sequence[str]):
        self.itos: List[str] = [PAD, UNK] + [w for w in words if w not in (PAD, UNK)]
        self.stoi: Dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.pad_token_id, self.unk_token_id = 0, 1

    @classmethod
    def build(cls, texts: Iterable[Union[str, Sequence[str]]], min_freq: int) -> "WordVocab":
        """From training captions (raw strings or token lists); words seen < ``min_freq`` times are left out."""
        counts = Counter(w for t in texts for w in (words_of(t) if isinstance(t, str) else [x.lower() for x in t]))
        return cls(sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w)))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: Union[str, Sequence[str]]) -> List[int]:
        toks = words_of(text) if isinstance(text, str) else [x.lower() for x in text]
        return [self.stoi.get(w, self.unk_token_id) for w in toks]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = [self.itos[int(i)] for i in ids if not (skip_special_tokens and int(i) == self.pad_token_id)]
        return " ".join(out)

    def __call__(self, texts: Union[str, Sequence[str]], padding: Union[bool, str] = "max_length",
                 truncation: bool = True, max_length: int = 32, return_tensors: str = "pt",
                 **_ignored) -> Dict[str, torch.Tensor]:
        """Hugging Face tokenizer interface: ids padded to ``max_length`` (or the longest with padding=True)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = [self.encode(t)[:max_length] if truncation else self.encode(t) for t in texts]
        width = max_length if padding == "max_length" else max([len(x) for x in ids] + [1])
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, :len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"itos": self.itos}, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str) -> "WordVocab":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("itos"), list) or data["itos"][:2] != [PAD, UNK]:
            raise ValueError(f"{path}: field 'itos' must be a list of words starting with {PAD}, {UNK}")
        return cls(data["itos"][2:])


class GRUTextEncoder(nn.Module):
    """Word embedding -> (bi)GRU over packed sequences -> final hidden state -> L2-normalised B x D.

    Bidirectional: the mean of the forward and backward final states (as SCAN / VSRN). A linear map
    to ``embed_dim`` follows only when ``hidden_dim`` differs from it.
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, hidden_dim: int = 0, num_layers: int = 1,
                 bidirectional: bool = False):
        super().__init__()
        hidden_dim = hidden_dim or embed_dim
        self.hparams = {"vocab_size": vocab_size, "word_dim": word_dim, "embed_dim": embed_dim,
                        "hidden_dim": hidden_dim, "num_layers": num_layers, "bidirectional": bidirectional}
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, hidden_dim, num_layers, batch_first=True, bidirectional=bidirectional)
        self.proj = nn.Linear(hidden_dim, embed_dim) if hidden_dim != embed_dim else nn.Identity()
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # VSE++ initialisation
        with torch.no_grad():
            self.embed.weight[0].zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(1).clamp(min=1).cpu()                 # B (an empty caption reads one <pad>)
        words = self.embed(input_ids)                                      # B x L x word_dim
        packed = pack_padded_sequence(words, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)                                            # (layers * dirs) x B x H, batch order
        dirs = 2 if self.gru.bidirectional else 1
        last = h[-dirs:].mean(0)                                           # B x H: last layer, mean of directions
        return F.normalize(self.proj(last), dim=-1)
