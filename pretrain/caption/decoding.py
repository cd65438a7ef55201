"""Greedy decoding, sampling and beam search (batched over images) for the decoders of decoders.py.

Rules shared by all three (``DecodeRules``): ``<pad>`` and ``<bos>`` are never generated, ``<unk>`` only when
allowed; EOS is banned before ``min_length`` words and right after a bad ending word ("a", "the", ...);
a caption that reaches ``max_length`` words is cut there (EOS forced), so bad ending words are also banned as
its last word (position ``max_length - 1``): no caption ends on one. Sequences are returned as B x T word ids with
``<pad>`` after the EOS (T <= max_length + 1).

Beam search ranks beams by ``logprob / lp(length)``, GNMT's ``lp(n) = ((5 + n) / 6) ** alpha`` (alpha =
``length_penalty``; 0: raw log-probability), at every step and at the end; a finished beam competes with
its final score. Each image's search depends on that image only, so batched and one-at-a-time decoding
give the same captions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .decoders import CaptionDecoder, Memory, expand_memory, select_state

NEG_INF = float("-inf")


@dataclass
class DecodeRules:
    bos: int
    eos: int
    pad: int
    unk: Optional[int] = None
    max_length: int = 16
    min_length: int = 1
    bad_ending_ids: Sequence[int] = field(default_factory=list)
    allow_unk: bool = False

    @classmethod
    def from_vocab(cls, vocab, max_length: int = 16, min_length: int = 1, bad_endings: Sequence[str] = (),
                   allow_unk: bool = False) -> "DecodeRules":
        return cls(bos=vocab.bos, eos=vocab.eos, pad=vocab.pad, unk=vocab.unk, max_length=max_length,
                   min_length=min_length, bad_ending_ids=vocab.ids_of(bad_endings), allow_unk=allow_unk)


def _constrain(logp: torch.Tensor, prev: Optional[torch.Tensor], t: int, rules: DecodeRules,
               banned_table: Optional[torch.Tensor]) -> torch.Tensor:
    """Apply the rules to log-probabilities (N x V) of step t (t words generated so far; ``prev``: the last)."""
    logp = logp.clone()
    logp[:, rules.pad] = NEG_INF
    logp[:, rules.bos] = NEG_INF
    if rules.unk is not None and not rules.allow_unk and rules.unk not in (rules.eos, rules.pad, rules.bos):
        logp[:, rules.unk] = NEG_INF
    if t < rules.min_length:
        logp[:, rules.eos] = NEG_INF
    elif prev is not None and banned_table is not None:
        logp[:, rules.eos] = logp[:, rules.eos].masked_fill(banned_table[prev], NEG_INF)
    if t == rules.max_length - 1 and banned_table is not None:
        # the end is forced right after this word, so it may not be a bad ending word either
        # (rows where nothing else would be left, a degenerate vocabulary, keep them)
        masked = logp.masked_fill(banned_table, NEG_INF)
        logp = torch.where(torch.isfinite(masked).any(-1, keepdim=True), masked, logp)
    return logp


def _banned_table(rules: DecodeRules, vocab_size: int, device) -> Optional[torch.Tensor]:
    if not rules.bad_ending_ids:
        return None
    table = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    table[torch.as_tensor(list(rules.bad_ending_ids), device=device)] = True
    return table


@torch.no_grad()
def greedy(decoder: CaptionDecoder, memory: Memory, rules: DecodeRules, return_attention: bool = False):
    """Arg-max words. Returns (seqs B x T, sum of log-probs B, attention B x T x N or None)."""
    out = sample(decoder, memory, rules, n=1, temperature=1.0, greedy_pick=True)
    seqs, logps, mask, att = out
    return seqs, (logps * mask).sum(1), (att if return_attention else None)


def sample(decoder: CaptionDecoder, memory: Memory, rules: DecodeRules, n: int = 1, temperature: float = 1.0,
           greedy_pick: bool = False, generator: Optional[torch.Generator] = None):
    """``n`` captions per image (rows ``i*n .. i*n+n-1`` belong to image i), words drawn from
    ``softmax(logits / temperature)`` (or arg-max). Gradients flow into the returned log-probabilities
    (log p of each chosen word under the model, temperature 1) when called with grad enabled.
    Returns (seqs B*n x T, logprobs B*n x T, mask B*n x T (words and the EOS), attention B*n x T x N)."""
    if n > 1:
        memory = expand_memory(memory, n)
    batch = next(iter(memory.values())).shape[0]
    device = next(iter(memory.values())).device
    state = decoder.init_state(memory)
    tokens = torch.full((batch,), rules.bos, dtype=torch.long, device=device)
    banned = _banned_table(rules, decoder.vocab_size, device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    seqs, logps, masks, atts = [], [], [], []
    prev = None
    for t in range(rules.max_length + 1):
        logits, state, alpha = decoder.step(tokens, state, memory)
        # the policy is the constrained distribution: renormalise over the allowed words
        logp = _constrain(F.log_softmax(logits.float(), dim=-1), prev, t, rules, banned)
        logp = logp - logp.logsumexp(-1, keepdim=True)
        if t == rules.max_length:  # no room for more words: end here (not a decision of the model)
            pick = torch.full((batch,), rules.eos, dtype=torch.long, device=device)
        elif greedy_pick:
            pick = logp.detach().argmax(-1)
        else:
            scaled = logp.detach() / temperature if temperature != 1.0 else logp.detach()
            pick = torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator)[:, 0]
        live = ~done
        tok = torch.where(live, pick, torch.full_like(pick, rules.pad))
        seqs.append(tok)
        decided = live & (t < rules.max_length)
        logps.append(logp.gather(1, pick.unsqueeze(1)).squeeze(1).masked_fill(~decided, 0.0))
        masks.append(decided)
        atts.append(alpha * live.unsqueeze(1).to(alpha.dtype))
        done = done | (tok == rules.eos)
        prev = tokens = tok
        if bool(done.all()):
            break
    return (torch.stack(seqs, 1), torch.stack(logps, 1), torch.stack(masks, 1).to(torch.float32),
            torch.stack(atts, 1))


def _length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 0.0:
        return torch.ones_like(length, dtype=torch.float32)
    return ((5.0 + length.float()) / 6.0) ** alpha


@torch.no_grad()
def beam_search(decoder: CaptionDecoder, memory: Memory, rules: DecodeRules, beam_size: int = 3,
                length_penalty: float = 0.0, return_attention: bool = False):
    """Beam search for every image of the batch at once.
    Returns (seqs B x T, scores B (length-normalised log-probs), attention B x T x N or None)."""
    k = beam_size
    b = next(iter(memory.values())).shape[0]
    device = next(iter(memory.values())).device
    memory = expand_memory(memory, k)                       # B*K rows, beam j of image i at i*K + j
    state = decoder.init_state(memory)
    vocab = decoder.vocab_size
    banned = _banned_table(rules, vocab, device)
    t_max = rules.max_length + 1
    seqs = torch.full((b, k, t_max), rules.pad, dtype=torch.long, device=device)
    score = torch.zeros(b, k, device=device)                 # sum of log-probs
    score[:, 1:] = NEG_INF                                   # all beams start equal: keep one
    length = torch.zeros(b, k, dtype=torch.long, device=device)
    finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    att_hist = None
    tokens = torch.full((b * k,), rules.bos, dtype=torch.long, device=device)
    prev = None
    base = (torch.arange(b, device=device) * k).unsqueeze(1)  # B x 1
    pad_only = torch.full((vocab,), NEG_INF, device=device)
    pad_only[rules.pad] = 0.0
    steps = 0
    for t in range(t_max):
        logits, state, alpha = decoder.step(tokens, state, memory)
        logp = _constrain(F.log_softmax(logits.float(), dim=-1), prev, t, rules, banned)
        if t == rules.max_length:  # cut: the only continuation is the end
            forced = torch.full_like(logp, NEG_INF)
            forced[:, rules.eos] = 0.0
            logp = forced
        logp = logp.view(b, k, vocab)
        logp = torch.where(finished.unsqueeze(-1), pad_only.view(1, 1, vocab), logp)  # finished: stay as is
        cand = score.unsqueeze(-1) + logp                                              # B x K x V
        cand_len = torch.where(finished, length, length + 1)                           # B x K
        ranked = cand / _length_penalty(cand_len, length_penalty).unsqueeze(-1)
        top_idx = ranked.view(b, k * vocab).topk(k, dim=1).indices                    # B x K
        beam_idx, word = top_idx // vocab, top_idx % vocab
        score = cand.view(b, k * vocab).gather(1, top_idx)
        was_finished = finished.gather(1, beam_idx)
        length = cand_len.gather(1, beam_idx)
        seqs = seqs.gather(1, beam_idx.unsqueeze(-1).expand(-1, -1, t_max))
        seqs[:, :, t] = torch.where(was_finished, torch.full_like(word, rules.pad), word)
        finished = was_finished | (word == rules.eos)
        flat = (base + beam_idx).view(-1)
        if return_attention:
            a = alpha.view(b, k, -1).gather(1, beam_idx.unsqueeze(-1).expand(-1, -1, alpha.shape[-1]))
            a = a * (~was_finished).unsqueeze(-1).to(a.dtype)
            att_hist = a.unsqueeze(2) if att_hist is None else torch.cat(
                [att_hist.gather(1, beam_idx[..., None, None].expand(-1, -1, *att_hist.shape[2:])), a.unsqueeze(2)], 2)
        state = select_state(state, flat)
        tokens = torch.where(finished, torch.full_like(word, rules.pad), word).view(-1)
        prev = tokens
        steps = t + 1
        if bool(finished.all()):
            break
    final = score / _length_penalty(length, length_penalty)
    best = final.argmax(1)                                                              # B
    out = seqs[torch.arange(b, device=device), best][:, :steps]
    att = att_hist[torch.arange(b, device=device), best] if return_attention else None
    return out, final.gather(1, best.unsqueeze(1)).squeeze(1), att


def decode(decoder: CaptionDecoder, memory: Memory, rules: DecodeRules, strategy: str = "greedy", beam_size: int = 3,
           length_penalty: float = 0.0, temperature: float = 1.0, return_attention: bool = False,
           generator: Optional[torch.Generator] = None):
    """(seqs B x T, attention B x T x N or None) by ``greedy``, ``beam`` or ``sample``."""
    if strategy == "greedy" or (strategy == "beam" and beam_size == 1 and not length_penalty):
        seqs, _, att = greedy(decoder, memory, rules, return_attention)
    elif strategy == "beam":
        seqs, _, att = beam_search(decoder, memory, rules, beam_size, length_penalty, return_attention)
    elif strategy == "sample":
        with torch.no_grad():
            seqs, _, _, att = sample(decoder, memory, rules, 1, temperature, generator=generator)
    else:
        raise ValueError(f"unknown decoding strategy '{strategy}': greedy, beam or sample")
    return seqs, att


def sequences_to_lists(seqs: torch.Tensor, eos: int, pad: int) -> List[List[int]]:
    """Word ids of each caption without EOS and padding."""
    out = []
    for row in seqs.tolist():
        words = []
        for w in row:
            if w == eos or w == pad:
                break
            words.append(w)
        out.append(words)
    return out
