"""Caption decoders over image token features (B x N x C), one word at a time.

Both decoders share one interface, used by teacher forcing (``forward``) and by every search in decoding.py::

    memory = decoder.prepare(feats, cond, cond_mask)     # per-image tensors, batch first
    state  = decoder.init_state(memory)                   # tuple of B x H tensors
    logits, state, alpha = decoder.step(tokens, state, memory)   # B x V, new state, B x N attention

``sat``  Show, Attend and Tell (Xu et al. 2015): additive soft attention over the regions with the previous
         hidden state, a sigmoid gate beta = sigmoid(W h) on the attended context, an LSTM cell fed
         [word embedding; gated context], initial state from the mean feature, deep output layer.
``aoa``  Attention on Attention (Huang et al. 2019): a refiner of multi-head self-attention with AoA over the
         features, then an LSTM fed [word; mean feature + previous context] whose hidden state queries the
         refined features with multi-head attention + AoA: the AoA output is the context and feeds the classifier.

Optional condition tokens (the text tower's states of e.g. an answer, IVQA) are attended at every step with an
additive attention from the previous hidden state; that context joins the LSTM input.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DecoderConfig

Memory = Dict[str, torch.Tensor]
State = Tuple[torch.Tensor, ...]


class AdditiveAttention(nn.Module):
    """alpha = softmax_i(w . tanh(W_k k_i + W_q q)); context = sum_i alpha_i v_i (Bahdanau; SAT's f_att)."""

    def __init__(self, query_dim: int, key_dim: int, att_dim: int):
        super().__init__()
        self.key_proj = nn.Linear(key_dim, att_dim)
        self.query_proj = nn.Linear(query_dim, att_dim)
        self.score = nn.Linear(att_dim, 1)

    def forward(self, query: torch.Tensor, values: torch.Tensor, keys_proj: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        # query: B x Q, values: B x N x K, keys_proj: B x N x A (precomputed key_proj(values)), mask: B x N
        e = self.score(torch.tanh(keys_proj + self.query_proj(query).unsqueeze(1))).squeeze(-1)  # B x N
        if mask is not None:
            e = e.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(e, dim=-1)
        return torch.bmm(alpha.unsqueeze(1), values).squeeze(1), alpha  # B x K, B x N


class AoAAttention(nn.Module):
    """Multi-head scaled dot-product attention, then attention on attention:
    ``i = W_i [v_hat; q] , g = sigmoid(W_g [v_hat; q]) , out = i * g`` (one linear + GLU)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.aoa = nn.Linear(2 * dim, 2 * dim)
        self.dropout = nn.Dropout(dropout)

    def project_kv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        k = self.k(x).view(b, n, self.heads, self.dh).transpose(1, 2)  # B x H x N x dh
        v = self.v(x).view(b, n, self.heads, self.dh).transpose(1, 2)
        return k, v

    def forward(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        # query: B x M x D -> out B x M x D, weights B x H x M x N
        b, m, d = query.shape
        q = self.q(query).view(b, m, self.heads, self.dh).transpose(1, 2)  # B x H x M x dh
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh)  # B x H x M x N
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        w = torch.softmax(scores, dim=-1)
        v_hat = (self.dropout(w) @ v).transpose(1, 2).reshape(b, m, d)
        return F.glu(self.aoa(torch.cat([v_hat, query], dim=-1)), dim=-1), w


class AoARefiner(nn.Module):
    """Pre-norm residual AoA self-attention layers over the region features, then a LayerNorm."""

    def __init__(self, dim: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.atts = nn.ModuleList(AoAAttention(dim, heads, dropout) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, att in zip(self.norms, self.atts):
            y = norm(x)
            k, v = att.project_kv(y)
            x = x + self.dropout(att(y, k, v)[0])
        return self.out_norm(x)


class CaptionDecoder(nn.Module):
    """Shared parts: word embedding, condition attention, teacher forcing with scheduled sampling."""

    has_attention = True

    def __init__(self, vocab_size: int, feat_dim: int, cfg: DecoderConfig, cond_dim: int = 0):
        super().__init__()
        self.vocab_size, self.cfg = vocab_size, cfg
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.cond_dim = cond_dim
        if cond_dim:
            self.cond_embed = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, cfg.embed_dim))
            self.cond_att = AdditiveAttention(cfg.hidden_dim, cfg.embed_dim, cfg.att_dim)

    def _prepare_condition(self, memory: Memory, cond: Optional[torch.Tensor], cond_mask: Optional[torch.Tensor]):
        if not self.cond_dim:
            return
        if cond is None:
            raise ValueError("this decoder was built for a condition text: give the condition tokens")
        c = self.cond_embed(cond)
        memory["cond"], memory["cond_proj"] = c, self.cond_att.key_proj(c)
        memory["cond_mask"] = (cond_mask.bool() if cond_mask is not None
                               else torch.ones(c.shape[:2], dtype=torch.bool, device=c.device))

    def _condition_context(self, h: torch.Tensor, memory: Memory) -> list:
        if not self.cond_dim:
            return []
        return [self.cond_att(h, memory["cond"], memory["cond_proj"], memory["cond_mask"])[0]]

    def prepare(self, feats: torch.Tensor, cond: Optional[torch.Tensor] = None,
                cond_mask: Optional[torch.Tensor] = None) -> Memory:
        raise NotImplementedError

    def init_state(self, memory: Memory) -> State:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: State, memory: Memory):
        raise NotImplementedError

    def forward(self, memory: Memory, inputs: torch.Tensor, ss_prob: float = 0.0,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: ``inputs`` B x T (BOS first) -> logits B x T x V, attention B x T x N.
        With ``ss_prob`` > 0 (scheduled sampling), each input after the first is replaced, with that probability,
        by a word sampled from the model's own previous distribution (no gradient through the sample)."""
        state = self.init_state(memory)
        logits_all, alphas = [], []
        logits = None
        for t in range(inputs.shape[1]):
            tok = inputs[:, t]
            if t > 0 and ss_prob > 0.0:
                use = torch.rand(tok.shape, generator=generator, device=tok.device) < ss_prob
                if bool(use.any()):
                    sampled = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator)[:, 0]
                    tok = torch.where(use, sampled, tok)
            logits, state, alpha = self.step(tok, state, memory)
            logits_all.append(logits)
            alphas.append(alpha)
        return torch.stack(logits_all, 1), torch.stack(alphas, 1)


class ShowAttendTell(CaptionDecoder):
    def __init__(self, vocab_size: int, feat_dim: int, cfg: DecoderConfig, cond_dim: int = 0):
        super().__init__(vocab_size, feat_dim, cfg, cond_dim)
        d, h, e = cfg.feature_dim, cfg.hidden_dim, cfg.embed_dim
        self.feat_embed = nn.Sequential(nn.LayerNorm(feat_dim), nn.Linear(feat_dim, d), nn.ReLU(),
                                        nn.Dropout(cfg.dropout))
        self.att = AdditiveAttention(h, d, cfg.att_dim)
        self.gate = nn.Linear(h, d)  # beta_t = sigmoid(f_beta(h_{t-1}))
        self.init_h = nn.Linear(d, h)
        self.init_c = nn.Linear(d, h)
        self.lstm = nn.LSTMCell(e + d + (e if cond_dim else 0), h)
        # deep output: logits = L_o(E y_{t-1} + L_h h_t + L_z z_t)
        self.out_h = nn.Linear(h, e)
        self.out_z = nn.Linear(d, e)
        self.classifier = nn.Linear(e, vocab_size)

    def prepare(self, feats, cond=None, cond_mask=None) -> Memory:
        f = self.feat_embed(feats)  # B x N x d
        memory = {"feats": f, "feats_proj": self.att.key_proj(f), "mean": f.mean(1)}
        self._prepare_condition(memory, cond, cond_mask)
        return memory

    def init_state(self, memory: Memory) -> State:
        m = memory["mean"]
        return torch.tanh(self.init_h(m)), torch.tanh(self.init_c(m))

    def step(self, tokens, state, memory):
        h, c = state
        w = self.embed(tokens)
        z, alpha = self.att(h, memory["feats"], memory["feats_proj"])
        z = torch.sigmoid(self.gate(h)) * z
        h, c = self.lstm(torch.cat([w, z] + self._condition_context(h, memory), -1), (h, c))
        logits = self.classifier(self.dropout(w + self.out_h(h) + self.out_z(z)))
        return logits, (h, c), alpha


class AoADecoder(CaptionDecoder):
    def __init__(self, vocab_size: int, feat_dim: int, cfg: DecoderConfig, cond_dim: int = 0):
        super().__init__(vocab_size, feat_dim, cfg, cond_dim)
        d, e = cfg.hidden_dim, cfg.embed_dim
        self.feat_embed = nn.Sequential(nn.LayerNorm(feat_dim), nn.Linear(feat_dim, d), nn.ReLU(),
                                        nn.Dropout(cfg.dropout))
        self.refiner = AoARefiner(d, cfg.num_heads, cfg.refiner_layers, cfg.dropout)
        self.lstm = nn.LSTMCell(e + d + (e if cond_dim else 0), d)
        self.att = AoAAttention(d, cfg.num_heads, cfg.dropout)
        self.classifier = nn.Linear(d, vocab_size)

    def prepare(self, feats, cond=None, cond_mask=None) -> Memory:
        a = self.refiner(self.feat_embed(feats))  # B x N x d
        k, v = self.att.project_kv(a)
        memory = {"k": k, "v": v, "mean": a.mean(1)}
        self._prepare_condition(memory, cond, cond_mask)
        return memory

    def init_state(self, memory: Memory) -> State:
        z = torch.zeros_like(memory["mean"])
        return z, z, z  # h, c, previous context

    def step(self, tokens, state, memory):
        h, c, ctx = state
        x = torch.cat([self.embed(tokens), memory["mean"] + ctx] + self._condition_context(h, memory), -1)
        h, c = self.lstm(x, (h, c))
        out, w = self.att(h.unsqueeze(1), memory["k"], memory["v"])
        ctx = out[:, 0]
        return self.classifier(self.dropout(ctx)), (h, c, ctx), w.mean(1)[:, 0]  # heads averaged: B x N


DECODERS = {"sat": ShowAttendTell, "aoa": AoADecoder}


def build_decoder(cfg: DecoderConfig, vocab_size: int, feat_dim: int, cond_dim: int = 0) -> CaptionDecoder:
    return DECODERS[cfg.kind](vocab_size, feat_dim, cfg, cond_dim)


def expand_memory(memory: Memory, n: int) -> Memory:
    """Each image's memory repeated n times (consecutive rows): for several captions or beams per image."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in memory.items()}


def select_state(state: State, index: torch.Tensor) -> State:
    return tuple(s.index_select(0, index) for s in state)
