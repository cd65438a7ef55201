"""Retrieval metrics against brute-force references written here (full score matrix, full sorted lists).

Embeddings quantised to a few integers give exact dot products (in float32 and float64 alike) and
many ties, so the pessimistic tie policy is checked exactly: among equal scores, non-relevant items
rank before relevant ones, and relevant ones by ascending gain.
"""
import math

import numpy as np
import pytest
import torch

from pretrain.eval import retrieval
from pretrain.eval.retrieval import (build_pairs, coco_1k_5fold, pair_retrieval_metrics, search_metrics,
                                     topk_chunked, vse_metrics)


# ----------------------------------------------------------------------------- data
def quantised(n, d, seed, dtype=torch.float32):
    """Entries in {-1, 0, 1}: exact integer scores, many ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, d), generator=g).to(dtype)


def gaussian(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype)


def random_relevance(num_q, num_g, seed):
    """Per query a dict {gallery: gain}: some empty, some with several items, some gain-0 entries."""
    rng = np.random.RandomState(seed)
    rel = []
    for _ in range(num_q):
        n = rng.choice([0, 0, 1, 1, 2, 3, 5])
        items = rng.choice(num_g, size=n, replace=False)
        d = {int(j): float(rng.choice([0.5, 1.0, 1.0, 2.0, 3.0])) for j in items}
        if n and rng.rand() < 0.2:
            d[int(rng.choice([j for j in range(num_g) if j not in d]))] = 0.0  # judged not relevant
        rel.append(d)
    return rel


# ----------------------------------------------------------------------------- references
def ref_search(q_emb, g_emb, rel_dicts, ks):
    scores = q_emb.double().numpy() @ g_emb.double().numpy().T
    num_q, num_g = scores.shape
    per = {}
    without = 0
    for q in range(num_q):
        rel = {j: v for j, v in rel_dicts[q].items() if v > 0}
        if not rel:
            without += 1
            continue
        # the full ranking, worst case among ties: non-relevant first, then relevant by ascending gain
        order = sorted(range(num_g), key=lambda j: (-scores[q, j], j in rel, rel.get(j, 0.0)))
        m = {}
        for k in ks:
            kk = min(k, num_g)
            top = order[:kk]
            found = sum(j in rel for j in top)
            m[f"hit@{k}"] = float(found > 0)
            m[f"recall@{k}"] = found / len(rel)
            m[f"precision@{k}"] = found / kk
            dcg = sum((2 ** rel[j] - 1) / math.log2(pos + 2) for pos, j in enumerate(top) if j in rel)
            ideal = sorted(rel.values(), reverse=True)[:kk]
            idcg = sum((2 ** g - 1) / math.log2(pos + 2) for pos, g in enumerate(ideal))
            m[f"ndcg@{k}"] = dcg / idcg
        hits, precisions, first = 0, [], None
        for pos, j in enumerate(order, start=1):
            if j in rel:
                hits += 1
                precisions.append(hits / pos)
                first = pos if first is None else first
        m["map"] = sum(precisions) / len(rel)
        m["mrr"] = 1.0 / first
        m["chance_hit@1"] = len(rel) / num_g
        for key, v in m.items():
            per.setdefault(key, []).append(v)
    out = {key: float(np.mean(v)) for key, v in per.items()}
    out.update(num_queries=num_q, num_queries_without_relevant=without, gallery_size=num_g)
    return out


def ref_vse_ranks(img, txt, t2i):
    """1-based ranks; pessimistic ties: an equal-scored wrong item ranks before the right one."""
    s = img.double().numpy() @ txt.double().numpy().T  # N x T
    t2i = list(t2i.tolist())
    i2t_rank = []
    for i in range(s.shape[0]):
        order = sorted(range(s.shape[1]), key=lambda t: (-s[i, t], t2i[t] == i))
        i2t_rank.append(1 + min(pos for pos, t in enumerate(order) if t2i[t] == i))
    t2i_rank = []
    for t in range(s.shape[1]):
        order = sorted(range(s.shape[0]), key=lambda i: (-s[i, t], i == t2i[t]))
        t2i_rank.append(1 + order.index(t2i[t]))
    return np.array(i2t_rank), np.array(t2i_rank)


def ref_vse_from_ranks(i2t_rank, t2i_rank):
    out = {}
    for name, r in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(r <= k)
        out[f"{name}_medr"] = np.floor(np.median(r - 1)) + 1
        out[f"{name}_meanr"] = np.mean(r)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def vsepp_ranks(img, txt, t2i):
    """The VSE++ evaluation loop (argsort), valid when there are no ties."""
    s = img.numpy() @ txt.numpy().T
    i2t = [1 + min(np.where(np.argsort(-s[i]) == t)[0][0] for t in np.where(t2i.numpy() == i)[0])
           for i in range(s.shape[0])]
    t2i_r = [1 + np.where(np.argsort(-s[:, t]) == int(t2i[t]))[0][0] for t in range(s.shape[1])]
    return np.array(i2t), np.array(t2i_r)


def captions(num_images, seed):
    """1 to 4 captions per image, shuffled."""
    rng = np.random.RandomState(seed)
    t2i = np.concatenate([[i] * rng.randint(1, 5) for i in range(num_images)])
    return torch.as_tensor(rng.permutation(t2i))


def assert_close(got, ref, rel=1e-12):
    assert set(got) == set(ref), set(got) ^ set(ref)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=rel, abs=1e-12), key


# ----------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_topk_scores_match_full_topk_with_ties(chunk_size):
    q, g = quantised(40, 4, 0), quantised(57, 4, 1)
    full = torch.topk(q @ g.t(), 10, dim=1)
    scores, idx = topk_chunked(q, g, 10, chunk_size=chunk_size)
    assert torch.equal(scores, full.values)
    assert torch.equal(torch.gather(q @ g.t(), 1, idx), scores)  # the indices carry those scores


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_topk_indices_match_without_ties(chunk_size):
    q, g = gaussian(33, 8, 2), gaussian(45, 8, 3)
    full = torch.topk(q @ g.t(), 6, dim=1)
    scores, idx = topk_chunked(q, g, 6, chunk_size=chunk_size)
    assert torch.equal(idx, full.indices)
    torch.testing.assert_close(scores, full.values)


def test_topk_budget_bounds_the_score_block(monkeypatch):
    q, g = quantised(50, 4, 4), quantised(30, 4, 5)
    shapes = []
    real = retrieval._score_block

    def recording(*args):
        block = real(*args)
        shapes.append(block.shape)
        return block

    monkeypatch.setattr(retrieval, "_score_block", recording)
    scores, _ = topk_chunked(q, g, 3, memory_budget_bytes=30 * 4 * 6)  # 6 rows of 30 float32 scores
    assert max(s[0] for s in shapes) == 6 and len(shapes) == math.ceil(50 / 6)
    assert torch.equal(scores, torch.topk(q @ g.t(), 3).values)
    shapes.clear()
    search_metrics(q, g, random_relevance(50, 30, 6), memory_budget_bytes=30 * 4 * 6)
    assert shapes and max(s[0] for s in shapes) <= 6


def test_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        topk_chunked(quantised(3, 2, 0), quantised(4, 2, 1), 5)


# ----------------------------------------------------------------------------- search metrics
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_search_metrics_match_brute_force_with_ties(chunk_size):
    q, g = quantised(45, 3, 10), quantised(30, 3, 11)
    rel = random_relevance(45, 30, 12)
    ks = (1, 3, 5, 10, 100)  # 100 > G: clamped to the gallery size
    got = search_metrics(q, g, rel, ks=ks, chunk_size=chunk_size)
    ref = ref_search(q, g, rel, ks)
    assert ref["num_queries_without_relevant"] > 0 and ref["hit@1"] < 1
    assert_close(got, ref)


def test_search_metrics_match_brute_force_without_ties():
    q, g = gaussian(40, 6, 13), gaussian(35, 6, 14)
    rel = random_relevance(40, 35, 15)
    assert_close(search_metrics(q, g, rel, ks=(1, 5, 10)), ref_search(q, g, rel, (1, 5, 10)))


def test_ties_are_pessimistic():
    """All scores equal: every relevant item ranks after every non-relevant one."""
    q, g = torch.ones(2, 3), torch.ones(10, 3)
    m = search_metrics(q, g, [{4: 1.0}, {0: 1.0, 9: 2.0}], ks=(1, 9, 10))
    assert m["hit@1"] == 0.0 and m["hit@9"] == 0.5 and m["hit@10"] == 1.0
    assert m["mrr"] == pytest.approx((1 / 10 + 1 / 9) / 2)
    # query 1: gain 1 at rank 9, gain 2 at rank 10 (lower gain first among tied relevant items)
    ndcg1 = (1 / math.log2(10) + 3 / math.log2(11)) / (3 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(11) + ndcg1) / 2)


def test_chunking_invariance():
    q, g = quantised(60, 4, 20, torch.float64), quantised(40, 4, 21, torch.float64)
    rel = random_relevance(60, 40, 22)
    results = [search_metrics(q, g, rel, chunk_size=c) for c in (1, 7, 60, None)]
    assert all(r == results[0] for r in results[1:])
    t2i = captions(20, 25)
    img, txt = quantised(20, 3, 23), quantised(len(t2i), 3, 24)
    vse = [vse_metrics(img, txt, t2i, chunk_size=c) for c in (1, 7, None)]
    assert all(r == vse[0] for r in vse[1:])


def test_relevance_formats_agree():
    q, g = quantised(25, 3, 30), quantised(20, 3, 31)
    rel = random_relevance(25, 20, 32)
    trip = [(qi, gi, v) for qi, d in enumerate(rel) for gi, v in d.items()]
    qi, gi, v = (torch.tensor([t[i] for t in trip]) for i in range(3))
    sparse = torch.sparse_coo_tensor(torch.stack([qi, gi]), v.double(), (25, 20), check_invariants=True)
    a = search_metrics(q, g, rel)
    assert search_metrics(q, g, (qi, gi, v)) == a
    assert search_metrics(q, g, sparse) == a


def test_no_relevant_at_all_gives_nan_and_counts():
    m = search_metrics(quantised(4, 2, 0), quantised(5, 2, 1), [{}, {1: 0.0}, {}, {}])
    assert m["num_queries"] == 4 and m["num_queries_without_relevant"] == 4 and m["gallery_size"] == 5
    assert math.isnan(m["hit@1"]) and math.isnan(m["map"])


@pytest.mark.parametrize("relevance,match", [
    ((torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([1.0, 2.0])), "duplicate"),
    ((torch.tensor([0]), torch.tensor([9]), torch.tensor([1.0])), "gallery index"),
    ((torch.tensor([5]), torch.tensor([0]), torch.tensor([1.0])), "query index"),
    ((torch.tensor([0]), torch.tensor([0]), torch.tensor([-1.0])), "gains"),
    ([{0: 1.0}], "one per query"),
])
def test_bad_relevance_is_rejected(relevance, match):
    with pytest.raises(ValueError, match=match):
        search_metrics(quantised(3, 2, 0), quantised(5, 2, 1), relevance)


def test_non_finite_embeddings_are_rejected():
    q = quantised(3, 2, 0)
    q[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        search_metrics(q, quantised(5, 2, 1), [{0: 1.0}] * 3)


# ----------------------------------------------------------------------------- VSE protocol
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_vse_metrics_match_brute_force_with_ties(chunk_size):
    t2i = captions(30, 40)
    img, txt = quantised(30, 6, 41), quantised(len(t2i), 6, 42)
    got = vse_metrics(img, txt, t2i, chunk_size=chunk_size)
    ref = ref_vse_from_ranks(*ref_vse_ranks(img, txt, t2i))
    assert 0 < ref["i2t_r1"] < 100
    assert_close(got, ref)


def test_vse_metrics_match_vsepp_loop_without_ties():
    t2i = captions(40, 43)
    img, txt = gaussian(40, 6, 44), gaussian(len(t2i), 6, 45)
    assert_close(vse_metrics(img, txt, t2i), ref_vse_from_ranks(*vsepp_ranks(img, txt, t2i)))


def test_vse_rejects_image_without_caption():
    with pytest.raises(ValueError, match="no caption"):
        vse_metrics(quantised(3, 2, 0), quantised(2, 2, 1), torch.tensor([0, 2]))


def test_coco_1k_5fold_averages_folds():
    fold_size = 8
    t2i = captions(5 * fold_size, 50)
    img, txt = quantised(5 * fold_size, 3, 51), quantised(len(t2i), 3, 52)
    got = coco_1k_5fold(img, txt, t2i, fold_size=fold_size)
    folds = []
    for f in range(5):
        texts = [t for t in range(len(t2i)) if f * fold_size <= int(t2i[t]) < (f + 1) * fold_size]
        sub = t2i[texts] - f * fold_size
        folds.append(ref_vse_from_ranks(*ref_vse_ranks(img[f * fold_size:(f + 1) * fold_size], txt[texts], sub)))
    assert_close(got, {k: np.mean([m[k] for m in folds]) for k in folds[0]})


def test_coco_1k_5fold_rejects_wrong_image_count():
    t2i = captions(41, 53)
    with pytest.raises(ValueError, match="not a multiple"):
        coco_1k_5fold(quantised(41, 2, 0), quantised(len(t2i), 2, 1), t2i, fold_size=8)
    t2i = captions(48, 54)
    with pytest.raises(ValueError, match="expected 5"):
        coco_1k_5fold(quantised(48, 2, 0), quantised(len(t2i), 2, 1), t2i, fold_size=8)


# ----------------------------------------------------------------------------- pretraining evaluation
def test_build_pairs_matches_dict_reference():
    qids = torch.tensor([7, 3, 7, 9, 3, 7, 9, 1])
    iids = torch.tensor([100, 200, 100, 100, 300, 300, 100, 200])
    clicks = torch.tensor([2, 0, 3, 1, 4, 0, 5, 0])
    pq, pi, q_first, i_first, gains = build_pairs(qids, iids, clicks)
    # distinct ids in order of first occurrence, with their first row
    assert q_first.tolist() == [0, 1, 3, 7] and i_first.tolist() == [0, 1, 4]
    q_order, i_order = [7, 3, 9, 1], [100, 200, 300]
    total = {}
    for qq, ii, c in zip(qids.tolist(), iids.tolist(), clicks.tolist()):
        total[(qq, ii)] = total.get((qq, ii), 0) + c
    got = {(q_order[a], i_order[b]): g for a, b, g in zip(pq.tolist(), pi.tolist(), gains.tolist())}
    assert got == pytest.approx({key: math.log2(1 + max(c, 1)) for key, c in total.items()})
    _, _, _, _, g0 = build_pairs(qids, iids, clicks, min_clicks=0)
    assert sorted(g0.tolist()) == pytest.approx(sorted(math.log2(1 + c) for c in total.values()))


def test_pair_retrieval_metrics_both_directions():
    text, image = quantised(30, 3, 60), quantised(22, 3, 61)
    rng = np.random.RandomState(62)
    # texts 26-29 and images 20-21 have no pair: excluded from the means, still in the galleries
    pairs = sorted({(int(rng.randint(26)), int(rng.randint(20))) for _ in range(45)})
    pq, pi = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    gains = torch.log2(1 + torch.tensor(rng.randint(1, 6, len(pairs)), dtype=torch.float64))
    got = pair_retrieval_metrics(text, image, pq, pi, gains)
    t_rel = [{} for _ in range(30)]
    i_rel = [{} for _ in range(22)]
    for (a, b), v in zip(pairs, gains.tolist()):
        t_rel[a][b] = v
        i_rel[b][a] = v
    ref_t2i, ref_i2t = ref_search(text, image, t_rel, (1, 5, 10)), ref_search(image, text, i_rel, (1, 5, 10))
    ref = {**{f"t2i_{k}": v for k, v in ref_t2i.items()}, **{f"i2t_{k}": v for k, v in ref_i2t.items()}}
    ref["rsum"] = 100 * sum(m[f"hit@{k}"] for m in (ref_t2i, ref_i2t) for k in (1, 5, 10))
    assert got["t2i_num_queries_without_relevant"] >= 4 and got["i2t_num_queries_without_relevant"] >= 2
    assert_close(got, ref)


def test_build_pairs_then_pair_metrics_end_to_end():
    """Per-sample embeddings with repeated queries/images, as the trainer's evaluation sees them."""
    qids = torch.tensor([5, 6, 5, 7, 8, 6])
    iids = torch.tensor([1, 2, 3, 1, 4, 2])
    txt, img = quantised(6, 3, 70), quantised(6, 3, 71)
    pq, pi, q_first, i_first, gains = build_pairs(qids, iids, torch.ones(6))
    m = pair_retrieval_metrics(txt[q_first], img[i_first], pq, pi, gains)
    assert m["t2i_num_queries"] == 4 and m["t2i_gallery_size"] == 4 and m["i2t_num_queries"] == 4
    assert 0 <= m["t2i_hit@1"] <= m["t2i_hit@5"] <= 1 and 0 <= m["rsum"] <= 600
