"""Greedy, sampling and beam search against references written here (one-at-a-time runs, exhaustive search)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.caption.config import DecoderConfig
from pretrain.caption.decoders import build_decoder, expand_memory
from pretrain.caption.decoding import DecodeRules, beam_search, decode, greedy, sample, sequences_to_lists

PAD, BOS, EOS, UNK = 0, 1, 2, 3


def tiny(kind, vocab=12, feat_dim=10, seed=0, cond_dim=0):
    torch.manual_seed(seed)
    cfg = DecoderConfig(kind=kind, embed_dim=8, hidden_dim=16, feature_dim=12, att_dim=8, num_heads=2,
                        refiner_layers=1, dropout=0.0)
    dec = build_decoder(cfg, vocab, feat_dim, cond_dim).eval()
    with torch.no_grad():  # sharper, more varied distributions than the default init
        dec.classifier.weight.mul_(6.0)
        dec.classifier.bias.normal_(0, 1.0)
    return dec


def rules(max_length=6, bad=(4, 5), min_length=1):
    return DecodeRules(bos=BOS, eos=EOS, pad=PAD, unk=UNK, max_length=max_length, min_length=min_length,
                       bad_ending_ids=list(bad))


def strip(seqs):
    return sequences_to_lists(seqs, EOS, PAD)


@pytest.mark.parametrize("kind", ["sat", "aoa"])
@pytest.mark.parametrize("beam,lp", [(3, 0.0), (4, 0.8), (2, 1.5)])
def test_batched_beam_equals_one_image_at_a_time(kind, beam, lp):
    dec = tiny(kind)
    feats = torch.randn(7, 9, 10)
    r = rules()
    batched, scores, att = beam_search(dec, dec.prepare(feats), r, beam, lp, return_attention=True)
    for i in range(feats.shape[0]):
        one, s1, a1 = beam_search(dec, dec.prepare(feats[i:i + 1]), r, beam, lp, return_attention=True)
        assert strip(one) == strip(batched[i:i + 1]), i
        assert float(s1) == pytest.approx(float(scores[i]), abs=1e-5)
        n = len(strip(one)[0])
        torch.testing.assert_close(a1[0, :n], att[i, :n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["sat", "aoa"])
def test_beam_size_one_equals_greedy(kind):
    dec = tiny(kind, seed=3)
    memory = dec.prepare(torch.randn(10, 5, 10))
    r = rules(max_length=8)
    g, g_score, g_att = greedy(dec, memory, r, return_attention=True)
    b, b_score, b_att = beam_search(dec, memory, r, beam_size=1, return_attention=True)
    assert strip(g) == strip(b)
    torch.testing.assert_close(g_att[:, :b_att.shape[1]], b_att, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def exhaustive_best(dec, feats, r, lp_alpha, words):
    """Every caption allowed by the rules, scored by teacher forcing: the best by logprob / lp(length)."""
    best, best_seq = -math.inf, None
    for k in range(1, r.max_length + 1):
        for body in itertools.product(words, repeat=k):
            if body[-1] in r.bad_ending_ids:
                continue  # EOS banned after a bad ending; bad endings banned as the last word before the cut
            seq = list(body) + ([EOS] if k < r.max_length else [])
            memory = dec.prepare(feats)
            state = dec.init_state(memory)
            tok, total = torch.tensor([BOS]), 0.0
            for w in seq:
                logits, state, _ = dec.step(tok, state, memory)
                total += float(F.log_softmax(logits, -1)[0, w])
                tok = torch.tensor([w])
            n = k + 1  # words + the end
            score = total / (((5.0 + n) / 6.0) ** lp_alpha)
            if score > best:
                best, best_seq = score, list(body)
    return best, best_seq


@pytest.mark.parametrize("kind,lp", [("sat", 0.0), ("aoa", 0.0), ("sat", 1.0)])
def test_wide_beam_finds_the_exhaustive_optimum(kind, lp):
    vocab = 7  # pad bos eos unk + words 4 5 6
    dec = tiny(kind, vocab=vocab, seed=11)
    r = rules(max_length=3, bad=(4,))
    for i in range(3):
        feats = torch.randn(1, 4, 10)
        want_score, want = exhaustive_best(dec, feats, r, lp, words=(4, 5, 6))
        seqs, score, _ = beam_search(dec, dec.prepare(feats), r, beam_size=40, length_penalty=lp)
        assert strip(seqs)[0] == want
        assert float(score) == pytest.approx(want_score, abs=1e-4)
        narrow, narrow_score, _ = beam_search(dec, dec.prepare(feats), r, beam_size=2, length_penalty=lp)
        assert float(narrow_score) <= want_score + 1e-5


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_rules_hold_for_every_strategy(strategy):
    dec = tiny("sat", seed=5)
    with torch.no_grad():  # make ending attractive right away, and the bad words frequent
        dec.classifier.bias[EOS] += 4.0
        dec.classifier.bias[4] += 3.0
        dec.classifier.bias[UNK] += 5.0
    r = rules(max_length=5, bad=(4, 5), min_length=2)
    torch.manual_seed(0)
    seqs, _ = decode(dec, dec.prepare(torch.randn(40, 6, 10)), r, strategy, beam_size=3)
    for row in seqs.tolist():
        body = row[:row.index(EOS)] if EOS in row else row
        assert len(body) >= 2
        assert not {PAD, BOS, UNK} & set(body)
        assert body[-1] not in (4, 5), row  # also for captions cut at max_length
        assert all(w == PAD for w in row[len(body) + 1:])


def test_max_length_cuts_the_caption():
    dec = tiny("aoa", seed=2)
    with torch.no_grad():
        dec.classifier.bias[EOS] -= 50.0  # never wants to stop
    r = rules(max_length=4)
    for strategy in ("greedy", "beam", "sample"):
        seqs, _ = decode(dec, dec.prepare(torch.randn(3, 5, 10)), r, strategy, beam_size=3)
        assert [len(x) for x in strip(seqs)] == [4, 4, 4]
        assert seqs.shape[1] == 5 and (seqs[:, 4] == EOS).all()


def test_sampled_logprobs_carry_gradients_and_match_teacher_forcing():
    dec = tiny("sat", seed=4)
    memory = dec.prepare(torch.randn(3, 5, 10))
    r = rules(max_length=6, bad=())
    seqs, logps, mask, _ = sample(dec, memory, r, n=4, generator=torch.Generator().manual_seed(0))
    assert seqs.shape[0] == 12 and logps.requires_grad
    (-(logps * mask).sum()).backward()
    assert dec.classifier.weight.grad.abs().sum() > 0
    # reference: teacher forcing on the sampled captions (rows i*4..i*4+3 belong to image i)
    inputs = torch.cat([torch.full((12, 1), BOS), seqs[:, :-1].clamp_min(0)], 1)
    with torch.no_grad():
        logits, _ = dec(expand_memory(memory, 4), inputs)
    ref = F.log_softmax(logits, -1)
    ref[..., [PAD, BOS, UNK]] = -math.inf
    ref[:, 0, EOS] = -math.inf  # min_length 1
    ref = ref - ref.logsumexp(-1, keepdim=True)
    want = ref.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logps.detach()[mask.bool()], want.detach()[mask.bool()], atol=1e-5, rtol=1e-5)


class PreferWordDecoder(torch.nn.Module):
    """A fake decoder whose logits strongly prefer one word at every step (then a second word, then EOS)."""

    has_attention = True

    def __init__(self, vocab=8, favourite=4, second=6):
        super().__init__()
        self.vocab_size = vocab
        self.bias = torch.full((vocab,), -10.0)
        self.bias[favourite] = 10.0
        self.bias[second] = 2.0
        self.bias[EOS] = 0.0

    def init_state(self, memory):
        n = memory["feats"].shape[0]
        return (torch.zeros(n, 1),)

    def step(self, tokens, state, memory):
        n = tokens.shape[0]
        return self.bias.expand(n, -1).clone(), (state[0] + 1,), torch.full((n, 3), 1.0 / 3)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
@pytest.mark.parametrize("max_length", [1, 2, 5])
def test_bad_ending_ban_holds_when_the_caption_is_cut(strategy, max_length):
    dec = PreferWordDecoder(favourite=4, second=6)  # 4 is a bad ending word and by far the most likely
    memory = {"feats": torch.zeros(50, 3, 2)}
    r = rules(max_length=max_length, bad=(4, 5))
    torch.manual_seed(0)
    seqs, _ = decode(dec, memory, r, strategy, beam_size=3)
    bodies = strip(seqs)
    assert all(body and body[-1] not in (4, 5) for body in bodies), bodies
    if strategy == "sample":  # most captions run into the cut (EOS is banned after 4, which is far likelier)
        assert sum(len(body) == max_length for body in bodies) > 40
    else:  # 4 up to the last word, where the best allowed word is taken
        assert seqs.shape[1] == max_length + 1
        assert all(body == [4] * (max_length - 1) + [6] for body in bodies), bodies


def test_last_word_ban_keeps_a_row_when_only_bad_words_are_left():
    dec = PreferWordDecoder(vocab=6, favourite=4, second=5)  # words: 4 and 5, both bad endings
    r = rules(max_length=2, bad=(4, 5), min_length=3)     # EOS banned throughout: only 4 or 5 can be chosen
    for strategy in ("greedy", "beam", "sample"):
        seqs, _ = decode(dec, {"feats": torch.zeros(2, 3, 2)}, r, strategy, beam_size=2)
        assert strip(seqs) == [[4, 4], [4, 4]]
