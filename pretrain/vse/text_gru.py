"""The VSE++ text baseline: word embeddings and a GRU over packed sequences.

Its vocabulary is ``pretrain.vocab.WordVocab``, called like a Hugging Face tokenizer, so the GRU encoder
takes the same inputs (``input_ids``, ``attention_mask``) as the transformer text tower.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

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
