"""The WenLan core against small references written independently here."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.config import WenLanConfig
from pretrain.wenlan import NegativeQueue, click_weights, contrastive_loss, momentum_at, momentum_update


def ref_ring(size, batches):
    """Plain-Python ring buffer: list of slots, pointer, filled count."""
    slots = [None] * size
    ptr, filled = 0, 0
    for rows in batches:
        for r in rows[-size:] if len(rows) > size else rows:
            slots[ptr] = r
            ptr = (ptr + 1) % size
            filled = min(filled + 1, size)
    return slots, ptr, filled


@pytest.mark.parametrize("size,batch_sizes", [(8, [3, 3, 3, 3]), (7, [4, 4, 4]), (5, [12]), (6, [2, 6, 1])])
def test_queue_ring_matches_reference(size, batch_sizes):
    q = NegativeQueue(size, 2)
    batches, counter = [], 0
    for n in batch_sizes:
        rows = [(counter + i) for i in range(n)]
        counter += n
        batches.append(rows)
        keys = torch.tensor([[float(r), -float(r)] for r in rows])
        q.enqueue(keys, torch.tensor(rows) * 10, torch.tensor(rows) * 100)
    slots, ptr, filled = ref_ring(size, batches)
    assert int(q.ptr) == ptr and int(q.filled) == filled
    for j, r in enumerate(slots):
        if r is None:
            assert not bool(q.valid()[j])
        else:
            assert bool(q.valid()[j])
            assert q.features[j].tolist() == [float(r), -float(r)]
            assert int(q.query_ids[j]) == r * 10 and int(q.image_ids[j]) == r * 100


def ref_loss(q, k, negs, excluded, tau, weights=None):
    """Loop over samples: -log softmax of the positive among positive + non-excluded negatives."""
    q, k, negs = q.double().numpy(), k.double().numpy(), negs.double().numpy()
    losses = []
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[i]) / tau]
        for j in range(negs.shape[0]):
            if not excluded(i, j):
                logits.append(float(q[i] @ negs[j]) / tau)
        mx = max(logits)
        lse = mx + math.log(sum(math.exp(x - mx) for x in logits))
        losses.append(lse - logits[0])
    losses = np.array(losses)
    if weights is None:
        return losses.mean()
    w = weights.double().numpy()
    return (losses * w).sum() / w.sum()


def test_contrastive_loss_masks_unfilled_and_false_negatives():
    torch.manual_seed(0)
    m, k_size, d, tau = 5, 9, 4, 0.1
    q = F.normalize(torch.randn(m, d), dim=-1)
    k = F.normalize(torch.randn(m, d), dim=-1)
    queue = NegativeQueue(k_size, d)
    qids = torch.tensor([1, 2, 3, 4, 5])
    iids = torch.tensor([10, 20, 30, 40, 50])
    # 6 of 9 slots filled; slot entries share ids with some positives (false negatives)
    queue.enqueue(F.normalize(torch.randn(6, d), dim=-1), torch.tensor([1, 7, 3, 8, 9, 6]),
                  torch.tensor([11, 20, 31, 41, 50, 61]))
    filled = 6
    mask = ~queue.valid().unsqueeze(0) | (queue.query_ids[None] == qids[:, None]) | (queue.image_ids[None] == iids[:, None])
    loss, pos, neg = contrastive_loss(q, k, queue.features, mask, torch.tensor(tau))

    def excluded(i, j):
        return j >= filled or int(queue.query_ids[j]) == int(qids[i]) or int(queue.image_ids[j]) == int(iids[i])
    assert loss.item() == pytest.approx(ref_loss(q, k, queue.features, excluded, tau), rel=1e-5)
    # the masking matters: without it the loss differs
    assert abs(ref_loss(q, k, queue.features, lambda i, j: False, tau) - loss.item()) > 1e-3
    # weighted variant
    w = click_weights(torch.tensor([1.0, 5.0, 0.0, 20.0, 2.0]), "log")
    loss_w, _, _ = contrastive_loss(q, k, queue.features, mask, torch.tensor(tau), w)
    assert loss_w.item() == pytest.approx(ref_loss(q, k, queue.features, excluded, tau, w), rel=1e-5)


def test_all_masked_negatives_gives_zero_loss():
    q = F.normalize(torch.randn(3, 4), dim=-1)
    queue = NegativeQueue(4, 4)  # empty: every slot unfilled
    mask = ~queue.valid().unsqueeze(0).expand(3, 4)
    loss, _, _ = contrastive_loss(q, q, queue.features, mask, torch.tensor(0.07))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_momentum_update_is_ema():
    torch.manual_seed(0)
    key = [torch.randn(3, 4), torch.randn(5)]
    query = [torch.randn(3, 4), torch.randn(5)]
    expected = [0.9 * a + 0.1 * b for a, b in zip(key, query)]
    momentum_update(key, query, 0.9)
    for got, exp in zip(key, expected):
        assert torch.allclose(got, exp, atol=1e-6)


def test_momentum_schedule():
    c = WenLanConfig(momentum=0.99, momentum_schedule="cosine", momentum_end=1.0)
    assert momentum_at(0, 100, c) == pytest.approx(0.99)
    assert momentum_at(50, 100, c) == pytest.approx(0.995)
    assert momentum_at(100, 100, c) == pytest.approx(1.0)
    assert momentum_at(30, 100, WenLanConfig(momentum=0.9)) == 0.9


def test_in_batch_loss_single_process_matches_reference():
    from pretrain.wenlan import in_batch_loss
    torch.manual_seed(1)
    qi = F.normalize(torch.randn(6, 8), dim=-1)
    qt = F.normalize(torch.randn(6, 8), dim=-1)
    out = in_batch_loss(qi, qt, torch.tensor(0.1))
    # as a loop: row i's positive is column i, negatives are the other columns
    def ref(a, b):
        tot = 0.0
        for i in range(6):
            logits = [float(a[i] @ b[j]) / 0.1 for j in range(6)]
            mx = max(logits)
            tot += mx + math.log(sum(math.exp(x - mx) for x in logits)) - logits[i]
        return tot / 6
    assert out["loss"].item() == pytest.approx(ref(qi, qt) + ref(qt, qi), rel=1e-5)
