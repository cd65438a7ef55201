"""The WenLan core against small references written independently here."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.config import WenLanConfig
from pretrain.wenlan import (NegativeQueue, click_weights, distill_alpha_at, info_nce, momentum_at, momentum_update,
                             wenlan_loss)


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


def ref_direction(q, pos_col, batch_cols, queue, qids, iids, batch_qids, batch_iids, tau, *, batch_counts,
                  mask_unfilled=True, mask_fn=True, queue_on=True, bias=0.0, key_q=None, key_batch=None, alpha=0.0,
                  weights=None, center=False, recenter=False, key_queue=None, teacher_tau=None,
                  recenter_on=None, extra_pos=False, queue_negatives=True, any_positive=False):
    """Loop over rows: the positive (column ``pos_col[i]`` of the batch block), then batch negatives (if
    ``batch_counts``) and queue slots, each skipped when excluded. Soft targets (ALBEF) from ``key_q`` against
    ``key_batch`` and ``key_queue`` (default: the queue's own features) at ``teacher_tau`` (default: tau)."""
    ttau = teacher_tau or tau
    q = q.double()
    filled = int(queue.filled)
    feats = queue.features.double()
    if center:  # each entry minus the mean of the filled entries
        mean = sum(feats[j] for j in range(filled)) / filled
        feats = feats - mean
    if recenter:  # the queue's mean moved onto the mean of this step's keys (key_batch)
        mean = sum(feats[j] for j in range(filled)) / filled
        on = key_batch if recenter_on is None else recenter_on  # this step's keys of the queue's modality
        kmean = sum(on[j].double() for j in range(on.shape[0])) / on.shape[0]
        feats = feats - mean + kmean
    losses = []
    for i in range(q.shape[0]):
        cols, kcols, is_pos = [], [], []  # (logit, key logit) of the positive, then every kept column
        def add(vec, kvec, b=0.0, positive=False):
            is_pos.append(positive or not cols)
            cols.append(float(q[i] @ vec.double()) / tau + b)
            if key_q is not None:
                kcols.append(float(key_q[i].double() @ kvec.double()) / ttau + b)
        p = int(pos_col[i])
        add(batch_cols[p], None if key_batch is None else key_batch[p])
        for j in range(batch_cols.shape[0]):
            if j == p or not batch_counts:
                continue
            shares = int(batch_qids[j]) == int(qids[i]) or int(batch_iids[j]) == int(iids[i])
            if mask_fn and shares and not extra_pos:
                continue
            add(batch_cols[j], None if key_batch is None else key_batch[j], positive=extra_pos and shares)
        for j in range(queue.size):
            if not queue_on or (mask_unfilled and j >= filled):
                continue
            shares = int(queue.query_ids[j]) == int(qids[i]) or int(queue.image_ids[j]) == int(iids[i])
            if mask_fn and shares and not extra_pos:
                continue
            if not queue_negatives and not shares:  # the queue only as a memory of positives
                continue
            add(feats[j], feats[j] if key_queue is None else key_queue.features[j], bias, positive=extra_pos and shares)
        mx = max(cols)
        logp = [c - (mx + math.log(sum(math.exp(x - mx) for x in cols))) for c in cols]
        hot = [1.0 / sum(is_pos) if t else 0.0 for t in is_pos]  # even over the positives
        if any_positive:  # MIL-NCE: -log of the probability mass on the set of positives
            losses.append(-math.log(sum(math.exp(l) for l, t in zip(logp, is_pos) if t)))
        elif alpha > 0:
            kmx = max(kcols)
            z = sum(math.exp(x - kmx) for x in kcols)
            soft = [math.exp(x - kmx) / z for x in kcols]
            target = [alpha * s + (1 - alpha) * h for s, h in zip(soft, hot)]
            losses.append(-sum(t * l for t, l in zip(target, logp)))
        else:
            losses.append(-sum(h * l for h, l in zip(hot, logp)))
    losses = np.array(losses)
    if weights is None:
        return losses.mean()
    w = weights.double().numpy()
    return (losses * w).sum() / w.sum()


def _setup(seed=0, m=5, k_size=9, d=4):
    torch.manual_seed(seed)
    unit = lambda n: F.normalize(torch.randn(n, d), dim=-1)
    qi, qt, ki, kt = unit(m), unit(m), unit(m), unit(m)
    qids, iids = torch.tensor([1, 2, 3, 4, 2]), torch.tensor([10, 20, 30, 10, 50])  # repeats in the batch
    iq, tq = NegativeQueue(k_size, d), NegativeQueue(k_size, d)
    # 6 of 9 slots filled; some entries share ids with the positives (false negatives)
    for q in (iq, tq):
        q.enqueue(unit(6), torch.tensor([1, 7, 3, 8, 9, 6]), torch.tensor([11, 20, 31, 41, 50, 61]), step=2)
    return qi, qt, ki, kt, qids, iids, iq, tq


def _gathered(ki, kt, qids, iids):
    return ki, kt, qids, iids  # one process: the gather is the identity


@pytest.mark.parametrize("variant", ["moco", "in_batch_negatives", "in_batch_block", "queue_off", "bias",
                                     "distill", "distill_block", "no_masking", "clicks", "center",
                                     "center_distill", "recenter", "recenter_moco"])
def test_wenlan_loss_matches_reference(variant):
    qi, qt, ki, kt, qids, iids, iq, tq = _setup()
    tau = 0.1
    kw = dict(mode="momentum")
    if variant in ("in_batch_negatives",):
        kw["in_batch_negatives"] = True
    if variant in ("in_batch_block", "distill_block", "bias"):
        kw["in_batch_block"] = True
    if variant == "queue_off":
        kw["queue_start_step"] = 10
    if variant == "bias":
        kw["queue_logit_bias"] = -1.5
    if variant == "no_masking":
        kw.update(mask_unfilled=False, mask_false_negatives=False)
    if variant == "clicks":
        kw["click_weighting"] = "log"
    if variant.startswith("center"):
        kw.update(queue_center=True, in_batch_block=True)
    if variant.startswith("recenter"):
        kw.update(queue_recenter=True, in_batch_block=variant == "recenter")
    cfg = WenLanConfig(**kw)
    alpha = 0.4 if "distill" in variant else 0.0
    clicks = torch.tensor([1.0, 5.0, 0.0, 20.0, 2.0]) if variant == "clicks" else None
    out = wenlan_loss(cfg, qi, qt, torch.tensor(tau), step=3, k_image=ki, k_text=kt,
                      gathered=_gathered(ki, kt, qids, iids), image_queue=iq, text_queue=tq, query_ids=qids,
                      image_ids=iids, clicks=clicks, distill_alpha=alpha)
    block = cfg.in_batch_block
    counts = cfg.in_batch_block or cfg.in_batch_negatives
    w = click_weights(clicks, "log") if clicks is not None else None
    common = dict(batch_counts=counts, mask_unfilled=cfg.mask_unfilled, mask_fn=cfg.mask_false_negatives,
                  queue_on=variant != "queue_off", bias=cfg.queue_logit_bias, alpha=alpha, weights=w,
                  center=cfg.queue_center, recenter=cfg.queue_recenter)
    pos = torch.arange(5)
    ref = (ref_direction(qi, pos, qt if block else kt, tq, qids, iids, qids, iids, tau, key_q=ki, key_batch=kt,
                         **common)
           + ref_direction(qt, pos, qi if block else ki, iq, qids, iids, qids, iids, tau, key_q=kt, key_batch=ki,
                           **common))
    assert out["loss"].item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("block", [True, False])
def test_caption_teacher_matches_reference(block):
    """``distill_teacher: caption``: in both directions the target is the softmax of the row's caption key
    against the caption keys behind every column (batch keys, then the *text* queue, also for the image queue's
    columns), at ``distill_temperature``."""
    qi, qt, ki, kt, qids, iids, iq, tq = _setup()
    tau, alpha = 0.1, 0.4
    cfg = WenLanConfig(in_batch_block=block, distill_teacher="caption", distill_temperature=0.2)
    out = wenlan_loss(cfg, qi, qt, torch.tensor(tau), step=3, k_image=ki, k_text=kt,
                      gathered=_gathered(ki, kt, qids, iids), image_queue=iq, text_queue=tq, query_ids=qids,
                      image_ids=iids, distill_alpha=alpha)
    common = dict(batch_counts=block, alpha=alpha, key_q=kt, key_batch=kt, key_queue=tq, teacher_tau=0.2)
    pos = torch.arange(5)
    ref = (ref_direction(qi, pos, qt if block else kt, tq, qids, iids, qids, iids, tau, **common)
           + ref_direction(qt, pos, qi if block else ki, iq, qids, iids, qids, iids, tau, **common))
    assert out["loss"].item() == pytest.approx(ref, rel=1e-5)
    cross = wenlan_loss(WenLanConfig(in_batch_block=block, distill_temperature=0.2), qi, qt, torch.tensor(tau), 3,
                        ki, kt, _gathered(ki, kt, qids, iids), iq, tq, qids, iids, distill_alpha=alpha)
    assert abs(cross["loss"].item() - ref) > 1e-4  # the reference tells the two teachers apart


@pytest.mark.parametrize("teacher", ["", "cross", "caption", "caption_recenter"])
def test_separate_queue_term_matches_reference(teacher):
    """``queue_loss: separate``: the OpenCLIP block alone (no queue columns), plus ``queue_loss_weight`` x a MoCo
    term in which each query scores its own momentum key (the positive) against the queue. With
    ``queue_recenter`` the caption teacher's text queue is recentred on this step's text keys as well."""
    qi, qt, ki, kt, qids, iids, iq, tq = _setup()
    tau, alpha = 0.1, (0.4 if teacher else 0.0)
    recenter = teacher.endswith("recenter")
    cfg = WenLanConfig(in_batch_block=True, queue_loss="separate", queue_loss_weight=0.5, queue_logit_bias=-0.7,
                       distill_teacher=teacher.split("_")[0] or "cross", queue_recenter=recenter)
    out = wenlan_loss(cfg, qi, qt, torch.tensor(tau), step=3, k_image=ki, k_text=kt,
                      gathered=_gathered(ki, kt, qids, iids), image_queue=iq, text_queue=tq, query_ids=qids,
                      image_ids=iids, distill_alpha=alpha)
    pos = torch.arange(5)
    if teacher.startswith("caption"):
        key_queue = tq
        if recenter:  # the 6 written slots' mean moved onto the mean of the 5 text keys
            f = tq.features.double().clone()
            f = f - f[:6].mean(0) + kt.double().mean(0)
            key_queue = type("Q", (), {"features": f})()
        t_i2t = t_t2i = dict(key_q=kt, key_batch=kt, key_queue=key_queue)
    else:
        t_i2t, t_t2i = dict(key_q=ki, key_batch=kt), dict(key_q=kt, key_batch=ki)
    common = dict(alpha=alpha, bias=-0.7, recenter=recenter)
    block = (ref_direction(qi, pos, qt, tq, qids, iids, qids, iids, tau, batch_counts=True, queue_on=False,
                           **common, **t_i2t)
             + ref_direction(qt, pos, qi, iq, qids, iids, qids, iids, tau, batch_counts=True, queue_on=False,
                             **common, **t_t2i))
    moco = (ref_direction(qi, pos, kt, tq, qids, iids, qids, iids, tau, batch_counts=False, recenter_on=kt,
                          **common, **t_i2t)
            + ref_direction(qt, pos, ki, iq, qids, iids, qids, iids, tau, batch_counts=False, recenter_on=ki,
                            **common, **t_t2i))
    assert out["loss"].item() == pytest.approx(block + 0.5 * moco, rel=1e-5)
    assert out["loss_queue"].item() == pytest.approx(moco, rel=1e-5)


@pytest.mark.parametrize("variant", ["moco", "block", "block_distill", "separate"])
def test_queue_positives_match_reference(variant):
    """``queue_positives``: columns sharing the row's query or image id are positives, the target even over them
    and the row's own positive; in ``separate`` mode only the MoCo term's queue has them (the block's other
    pairs: here two rows share image 10 and two share query 2)."""
    qi, qt, ki, kt, qids, iids, iq, tq = _setup()
    tau, alpha = 0.1, (0.4 if "distill" in variant else 0.0)
    block = variant != "moco"
    cfg = WenLanConfig(in_batch_block=block, queue_positives=True, queue_loss="separate" if variant == "separate" else "joint")
    out = wenlan_loss(cfg, qi, qt, torch.tensor(tau), step=3, k_image=ki, k_text=kt,
                      gathered=_gathered(ki, kt, qids, iids), image_queue=iq, text_queue=tq, query_ids=qids,
                      image_ids=iids, distill_alpha=alpha)
    pos = torch.arange(5)
    common = dict(alpha=alpha, extra_pos=True)
    if variant == "separate":
        ref = (ref_direction(qi, pos, qt, tq, qids, iids, qids, iids, tau, batch_counts=True, queue_on=False, **common)
               + ref_direction(qt, pos, qi, iq, qids, iids, qids, iids, tau, batch_counts=True, queue_on=False, **common)
               + ref_direction(qi, pos, kt, tq, qids, iids, qids, iids, tau, batch_counts=False, **common)
               + ref_direction(qt, pos, ki, iq, qids, iids, qids, iids, tau, batch_counts=False, **common))
    else:
        ref = (ref_direction(qi, pos, qt if block else kt, tq, qids, iids, qids, iids, tau, batch_counts=block,
                             key_q=ki, key_batch=kt, **common)
               + ref_direction(qt, pos, qi if block else ki, iq, qids, iids, qids, iids, tau, batch_counts=block,
                               key_q=kt, key_batch=ki, **common))
    assert out["loss"].item() == pytest.approx(ref, rel=1e-5)
    plain = wenlan_loss(WenLanConfig(in_batch_block=block), qi, qt, torch.tensor(tau), 3, ki, kt,
                        _gathered(ki, kt, qids, iids), iq, tq, qids, iids, distill_alpha=alpha)
    assert abs(plain["loss"].item() - ref) > 1e-3  # the queue's shared ids are in play in this setup
    assert float(out["extra_positives"]) > 0


def test_masking_changes_the_loss():
    """The reference can tell masked from unmasked: the check above is not vacuous."""
    qi, qt, ki, kt, qids, iids, iq, tq = _setup()
    a = wenlan_loss(WenLanConfig(), qi, qt, torch.tensor(0.1), 0, ki, kt, _gathered(ki, kt, qids, iids), iq, tq,
                    qids, iids)["loss"].item()
    b = wenlan_loss(WenLanConfig(mask_false_negatives=False), qi, qt, torch.tensor(0.1), 0, ki, kt,
                    _gathered(ki, kt, qids, iids), iq, tq, qids, iids)["loss"].item()
    assert abs(a - b) > 1e-3


def test_in_batch_block_scores_query_embeddings_with_gradient():
    """With the block, L_I2T scores q_I against the text *query* embeddings (not the momentum keys), and its
    gradient reaches q_T; in MoCo mode L_I2T does not depend on q_T at all."""
    qi, qt, ki, kt, qids, iids, iq, tq = _setup()
    qt = qt.clone().requires_grad_(True)

    def i2t(cfg, text):
        return wenlan_loss(cfg, qi, text, torch.tensor(0.1), 0, ki, kt, _gathered(ki, kt, qids, iids), iq, tq,
                           qids, iids)["loss_i2t"].item()
    block, moco = WenLanConfig(in_batch_block=True), WenLanConfig()
    shifted = F.normalize(qt.detach() + 0.5, dim=-1)
    assert i2t(block, qt.detach()) != pytest.approx(i2t(block, shifted), rel=1e-4)
    assert i2t(moco, qt.detach()) == pytest.approx(i2t(moco, shifted), rel=1e-7)
    loss = wenlan_loss(block, qi, qt, torch.tensor(0.1), 0, ki, kt, _gathered(ki, kt, qids, iids), iq, tq,
                       qids, iids)["loss"]
    (g,) = torch.autograd.grad(loss, [qt])
    assert float(g.norm()) > 0


def test_all_masked_negatives_gives_zero_loss():
    q = F.normalize(torch.randn(3, 4), dim=-1)
    empty = NegativeQueue(4, 4)  # every slot unfilled
    loss, stats = info_nce(q, torch.cat([q, empty.features]), torch.arange(3),
                           torch.cat([~torch.eye(3, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool)], 1),
                           torch.tensor(0.07), queue_cols=4)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert float(stats["queue_masked_frac"]) == 1.0 and float(stats["effective_negatives"]) == 0.0


def test_diagnostics_match_independent_computation():
    """pos/hardest-negative cosines, effective number of negatives (exp of the entropy of the softmax over the
    kept negatives), fraction of queue logits masked, queue share of the negative mass, key lag."""
    qi, qt, ki, kt, qids, iids, iq, tq = _setup(seed=3)
    tau = 0.2
    cfg = WenLanConfig(in_batch_negatives=True)
    out = wenlan_loss(cfg, qi, qt, torch.tensor(tau), 4, ki, kt, _gathered(ki, kt, qids, iids), iq, tq, qids, iids)

    def per_direction(q, batch_keys, queue):
        pos_c, hard, eff, masked, qmass = [], [], [], 0, []
        for i in range(5):
            pos_c.append(float(q[i] @ batch_keys[i]))
            negs = []   # (cosine, from queue)
            for j in range(5):
                if j != i and int(qids[j]) != int(qids[i]) and int(iids[j]) != int(iids[i]):
                    negs.append((float(q[i] @ batch_keys[j]), False))
            for j in range(queue.size):
                excluded = j >= int(queue.filled) or int(queue.query_ids[j]) == int(qids[i]) or \
                    int(queue.image_ids[j]) == int(iids[i])
                masked += excluded
                if not excluded:
                    negs.append((float(q[i] @ queue.features[j]), True))
            hard.append(max(c for c, _ in negs))
            e = [math.exp(c / tau) for c, _ in negs]
            p = [x / sum(e) for x in e]
            eff.append(math.exp(-sum(x * math.log(x) for x in p)))
            qmass.append(sum(x for x, (_, fromq) in zip(p, negs) if fromq))
        return (np.mean(pos_c), np.mean(hard), np.mean(eff), masked / (5 * queue.size), np.mean(qmass))

    a = per_direction(qi, kt, tq)
    b = per_direction(qt, ki, iq)
    for name, idx in (("pos_cos", 0), ("hardest_neg_cos", 1), ("effective_negatives", 2),
                      ("queue_masked_frac", 3), ("queue_mass", 4)):
        assert float(out[name]) == pytest.approx((a[idx] + b[idx]) / 2, rel=1e-5, abs=1e-6), name
    assert float(out["key_lag_cos_image"]) == pytest.approx(float(sum(qi[i] @ ki[i] for i in range(5)) / 5), rel=1e-5)
    assert float(out["key_lag_cos_text"]) == pytest.approx(float(sum(qt[i] @ kt[i] for i in range(5)) / 5), rel=1e-5)


def test_queue_age_from_enqueue_steps():
    q = NegativeQueue(5, 2)
    q.enqueue(torch.ones(3, 2), torch.arange(3), torch.arange(3), step=4)
    q.enqueue(torch.ones(3, 2), torch.arange(3), torch.arange(3), step=7)   # wraps: slot 0 rewritten at step 7
    assert q.steps.tolist() == [7, 4, 4, 7, 7]
    from pretrain.wenlan import WenLanStep
    st = WenLanStep.__new__(WenLanStep)
    st.keys = type("K", (), {"image_queue": q})()
    stats = st.queue_stats(10)
    assert stats["queue_age_mean"] == pytest.approx((3 + 6 + 6 + 3 + 3) / 5)
    assert stats["queue_age_max"] == 6 and stats["queue_fill"] == 1.0


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


def test_distill_alpha_ramp():
    c = WenLanConfig(distill_alpha=0.4, distill_ramp_steps=10)
    assert distill_alpha_at(0, c) == pytest.approx(0.04)
    assert distill_alpha_at(9, c) == pytest.approx(0.4)
    assert distill_alpha_at(50, c) == pytest.approx(0.4)
    assert distill_alpha_at(5, WenLanConfig()) == 0.0


def test_image_ssl_term_matches_reference():
    """``image_ssl_weight``: each image query against its own momentum image key, then every filled image-queue
    slot of another image, at the fixed ``image_ssl_temperature``; added to the cross-modal loss."""
    qi, qt, ki, kt, qids, iids, iq, tq = _setup()
    cfg = WenLanConfig(in_batch_block=True, image_ssl_weight=0.5, image_ssl_temperature=0.2)
    base = WenLanConfig(in_batch_block=True)
    args = (qi, qt, torch.tensor(0.1), 3, ki, kt, _gathered(ki, kt, qids, iids), iq, tq, qids, iids)
    out, plain = wenlan_loss(cfg, *args), wenlan_loss(base, *args)
    losses = []
    for i in range(5):
        logits = [float(qi[i].double() @ ki[i].double()) / 0.2]
        for j in range(int(iq.filled)):
            if int(iq.image_ids[j]) != int(iids[i]):
                logits.append(float(qi[i].double() @ iq.features[j].double()) / 0.2)
        mx = max(logits)
        losses.append(-(logits[0] - mx - math.log(sum(math.exp(x - mx) for x in logits))))
    ref = float(np.mean(losses))
    assert out["loss_image_ssl"].item() == pytest.approx(ref, rel=1e-5)
    assert out["loss"].item() == pytest.approx(plain["loss"].item() + 0.5 * ref, rel=1e-5)


def test_random_resized_views_flip_and_crop():
    from pretrain.wenlan import random_resized_views
    torch.manual_seed(0)
    img = torch.zeros(4, 3, 32, 32)
    img[..., :16] = 1.0                                            # left half bright
    flipped = random_resized_views(img, scale_min=1.0, hflip=1.0)   # full area (aspect 3/4..4/3), always flipped
    assert flipped.shape == img.shape
    assert bool((flipped[..., 20:].mean((1, 2, 3)) > 0.9).all()) and bool((flipped[..., :12].mean((1, 2, 3)) < 0.1).all())
    const = torch.full((4, 3, 32, 32), 0.25)
    assert torch.allclose(random_resized_views(const, scale_min=0.2), const, atol=1e-6)
    small = random_resized_views(torch.arange(32.0).expand(4, 3, 32, 32).clone(), scale_min=0.1, hflip=0.0)
    span = small[..., -1] - small[..., 0]                          # a crop of a ramp spans less of it
    assert bool((span > 0).all()) and float(span.mean()) < 31


@pytest.mark.parametrize("directions", ["i2t", "t2i"])
def test_queue_directions_match_reference(directions):
    """``queue_directions``: only the named direction's queries score their queue; the other direction is the
    OpenCLIP block alone. Also with the separate MoCo term: the direction without its queue adds no term."""
    qi, qt, ki, kt, qids, iids, iq, tq = _setup()
    tau = 0.1
    pos = torch.arange(5)
    for separate in (False, True):
        cfg = WenLanConfig(mode="momentum", in_batch_block=True, queue_directions=directions,
                           queue_loss="separate" if separate else "joint", queue_loss_weight=0.5)
        out = wenlan_loss(cfg, qi, qt, torch.tensor(tau), step=3, k_image=ki, k_text=kt,
                          gathered=_gathered(ki, kt, qids, iids), image_queue=iq, text_queue=tq, query_ids=qids,
                          image_ids=iids)
        common = dict(batch_counts=True)
        on_i2t, on_t2i = directions == "i2t", directions == "t2i"
        ref = (ref_direction(qi, pos, qt, tq, qids, iids, qids, iids, tau, queue_on=on_i2t and not separate, **common)
               + ref_direction(qt, pos, qi, iq, qids, iids, qids, iids, tau, queue_on=on_t2i and not separate, **common))
        if separate:  # the MoCo term: own momentum key, then the queue; only for the direction with a queue
            q, k, queue = (qi, kt, tq) if on_i2t else (qt, ki, iq)
            ref += 0.5 * ref_direction(q, pos, k, queue, qids, iids, qids, iids, tau, batch_counts=False)
        assert out["loss"].item() == pytest.approx(ref, rel=1e-5), (directions, separate)


@pytest.mark.parametrize("directions", ["both", "i2t"])
def test_queue_negatives_off_keeps_only_queue_positives(directions):
    """``queue_negatives: false``: a row scores its batch block plus only the queue entries sharing its query or
    image id (extra positives); every other queue entry is left out, as if it were not there."""
    qi, qt, ki, kt, qids, iids, iq, tq = _setup()
    tau = 0.1
    pos = torch.arange(5)
    cfg = WenLanConfig(mode="momentum", in_batch_block=True, queue_positives=True, queue_negatives=False,
                       queue_directions=directions)
    out = wenlan_loss(cfg, qi, qt, torch.tensor(tau), step=3, k_image=ki, k_text=kt,
                      gathered=_gathered(ki, kt, qids, iids), image_queue=iq, text_queue=tq, query_ids=qids,
                      image_ids=iids)
    common = dict(batch_counts=True, extra_pos=True, queue_negatives=False)
    ref = (ref_direction(qi, pos, qt, tq, qids, iids, qids, iids, tau, **common)
           + ref_direction(qt, pos, qi, iq, qids, iids, qids, iids, tau, queue_on=directions == "both", **common))
    assert out["loss"].item() == pytest.approx(ref, rel=1e-5)
    # the check can fail: with the queue's negatives in, or without its positives, the loss differs
    with_negs = ref_direction(qi, pos, qt, tq, qids, iids, qids, iids, tau, batch_counts=True, extra_pos=True)
    assert abs(with_negs - ref_direction(qi, pos, qt, tq, qids, iids, qids, iids, tau, **common)) > 1e-3
    no_queue = ref_direction(qi, pos, qt, tq, qids, iids, qids, iids, tau, batch_counts=True, extra_pos=True,
                             queue_on=False)
    assert abs(no_queue - ref_direction(qi, pos, qt, tq, qids, iids, qids, iids, tau, **common)) > 1e-3
    assert float(out["extra_positives"]) > 0


@pytest.mark.parametrize("queue_negatives", [True, False])
def test_queue_positives_any_is_mil_nce(queue_negatives):
    """``queue_positives_loss: any``: each row's loss is -log of the softmax mass on its positive and the columns
    sharing its ids (MIL-NCE), not a target spread over them."""
    qi, qt, ki, kt, qids, iids, iq, tq = _setup()
    tau = 0.1
    pos = torch.arange(5)
    cfg = WenLanConfig(mode="momentum", in_batch_block=True, queue_positives=True, queue_positives_loss="any",
                       queue_negatives=queue_negatives)
    out = wenlan_loss(cfg, qi, qt, torch.tensor(tau), step=3, k_image=ki, k_text=kt,
                      gathered=_gathered(ki, kt, qids, iids), image_queue=iq, text_queue=tq, query_ids=qids,
                      image_ids=iids)
    common = dict(batch_counts=True, extra_pos=True, queue_negatives=queue_negatives)
    ref = (ref_direction(qi, pos, qt, tq, qids, iids, qids, iids, tau, any_positive=True, **common)
           + ref_direction(qt, pos, qi, iq, qids, iids, qids, iids, tau, any_positive=True, **common))
    assert out["loss"].item() == pytest.approx(ref, rel=1e-5)
    spread = (ref_direction(qi, pos, qt, tq, qids, iids, qids, iids, tau, **common)
              + ref_direction(qt, pos, qi, iq, qids, iids, qids, iids, tau, **common))
    assert abs(spread - ref) > 1e-3  # the two forms differ in this setup: the check can fail
