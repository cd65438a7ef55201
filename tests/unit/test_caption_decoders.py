"""Decoders and cross-entropy losses against small references written here."""
import pytest
import torch
import torch.nn.functional as F

from pretrain.caption.config import DecoderConfig
from pretrain.caption.decoders import AdditiveAttention, build_decoder
from pretrain.caption.losses import doubly_stochastic, label_smoothed_nll, scheduled_sampling_prob


def make(kind, cond_dim=0, vocab=15, dropout=0.0):
    torch.manual_seed(0)
    cfg = DecoderConfig(kind=kind, embed_dim=8, hidden_dim=16, feature_dim=12, att_dim=8, num_heads=4,
                        refiner_layers=2, dropout=dropout)
    return build_decoder(cfg, vocab, 10, cond_dim)


@pytest.mark.parametrize("kind", ["sat", "aoa"])
def test_attention_weights_are_distributions(kind):
    dec = make(kind).eval()
    inputs = torch.randint(4, 15, (3, 7))
    logits, alphas = dec(dec.prepare(torch.randn(3, 9, 10)), inputs)
    assert logits.shape == (3, 7, 15) and alphas.shape == (3, 7, 9)
    assert (alphas >= 0).all()
    torch.testing.assert_close(alphas.sum(-1), torch.ones(3, 7))


def test_additive_attention_matches_formula():
    torch.manual_seed(1)
    att = AdditiveAttention(5, 4, 6)
    q, v = torch.randn(2, 5), torch.randn(2, 3, 4)
    ctx, alpha = att(q, v, att.key_proj(v))
    for b in range(2):
        e = torch.stack([att.score(torch.tanh(att.key_proj(v[b, i]) + att.query_proj(q[b]))).squeeze()
                         for i in range(3)])
        a = torch.softmax(e, 0)
        torch.testing.assert_close(alpha[b], a)
        torch.testing.assert_close(ctx[b], (a[:, None] * v[b]).sum(0))


def test_sat_gate_and_initial_state_follow_the_paper():
    dec = make("sat").eval()
    feats = torch.randn(2, 6, 10)
    memory = dec.prepare(feats)
    h0, c0 = dec.init_state(memory)
    f = dec.feat_embed(feats)
    torch.testing.assert_close(h0, torch.tanh(dec.init_h(f.mean(1))))
    torch.testing.assert_close(c0, torch.tanh(dec.init_c(f.mean(1))))
    # one step by hand: gated context z = sigmoid(W h) * sum alpha f ; LSTM([E y; z])
    tok = torch.tensor([5, 6])
    logits, (h1, c1), alpha = dec.step(tok, (h0, c0), memory)
    z, a = dec.att(h0, f, dec.att.key_proj(f))
    z = torch.sigmoid(dec.gate(h0)) * z
    hh, cc = dec.lstm(torch.cat([dec.embed(tok), z], -1), (h0, c0))
    torch.testing.assert_close(h1, hh)
    torch.testing.assert_close(alpha, a)
    torch.testing.assert_close(logits, dec.classifier(dec.embed(tok) + dec.out_h(hh) + dec.out_z(z)))


def test_doubly_stochastic_equals_hand_computation():
    torch.manual_seed(2)
    alphas = torch.softmax(torch.randn(3, 5, 4), -1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    total, count = 0.0, 0
    for b in range(3):
        for i in range(4):
            s = sum(float(alphas[b, t, i]) for t in range(5) if mask[b, t])
            total += (1.0 - s) ** 2
            count += 1
    assert float(doubly_stochastic(alphas, mask)) == pytest.approx(total / count, rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_torch_reference(eps):
    torch.manual_seed(3)
    logits = torch.randn(4, 6, 11)
    targets = torch.randint(1, 11, (4, 6))
    targets[1, 3:] = 0
    targets[3, 1:] = 0
    mask = targets != 0
    ours = label_smoothed_nll(logits, targets, mask, eps)
    want = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=0, label_smoothing=eps)
    assert float(ours) == pytest.approx(float(want), rel=1e-6)


def test_scheduled_sampling_feeds_model_words():
    dec = make("sat").eval()
    memory = dec.prepare(torch.randn(4, 5, 10))
    inputs = torch.randint(4, 15, (4, 6))
    plain, _ = dec(memory, inputs, ss_prob=0.0)
    again, _ = dec(memory, inputs, ss_prob=0.0)
    torch.testing.assert_close(plain, again)
    sampled, _ = dec(memory, inputs, ss_prob=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sampled[:, 0], plain[:, 0])        # the first input is always BOS
    assert not torch.allclose(sampled[:, 1:], plain[:, 1:])
    assert scheduled_sampling_prob(3, -1, 5, 0.05, 0.25) == 0.0
    assert scheduled_sampling_prob(4, 5, 5, 0.05, 0.25) == 0.0
    assert scheduled_sampling_prob(5, 5, 5, 0.05, 0.25) == pytest.approx(0.05)
    assert scheduled_sampling_prob(14, 5, 5, 0.05, 0.25) == pytest.approx(0.10)
    assert scheduled_sampling_prob(99, 5, 5, 0.05, 0.25) == pytest.approx(0.25)


@pytest.mark.parametrize("kind", ["sat", "aoa"])
def test_condition_is_attended_and_padding_ignored(kind):
    dec = make(kind, cond_dim=7).eval()
    feats = torch.randn(2, 5, 10)
    inputs = torch.randint(4, 15, (2, 4))
    cond = torch.randn(2, 3, 7)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out, _ = dec(dec.prepare(feats, cond, mask), inputs)
    other = cond.clone()
    other[0, 2] += torch.randn(7)  # a padded position of sample 0
    out_pad, _ = dec(dec.prepare(feats, other, mask), inputs)
    torch.testing.assert_close(out, out_pad)
    other[0, 0] += torch.randn(7)  # a real token
    out_real, _ = dec(dec.prepare(feats, other, mask), inputs)
    assert not torch.allclose(out[0], out_real[0])
    torch.testing.assert_close(out[1], out_real[1])
    with pytest.raises(ValueError):
        dec.prepare(feats)
