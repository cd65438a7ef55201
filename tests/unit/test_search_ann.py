"""The vector index (pretrain/search/ann.py) against references written here: numpy brute force (full score
matrix, full argsort), set intersections by hand, byte counts by hand, and the raw code sizes of each kind."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from pretrain.search import ann  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACCURACY = ["flat", "ivf_flat", "ivf_sq8", "ivf_pq"]  # most accurate first


# ----------------------------------------------------------------------------- data
def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n, d, centres, seed, sigma=1.0, centre_seed=0):
    """Unit vectors around unit centres (drawn here, independently of tools/bench.py)."""
    c = unit(np.random.RandomState(centre_seed).randn(centres, d))
    rs = np.random.RandomState(seed)
    return unit(c[rs.randint(0, centres, n)] + sigma * rs.randn(n, d) / np.sqrt(d))


def chunks(x, sizes):
    """``x`` cut into pieces of the given sizes, cycling (uneven chunks)."""
    out, i, j = [], 0, 0
    while i < len(x):
        out.append(x[i:i + sizes[j % len(sizes)]])
        i += sizes[j % len(sizes)]
        j += 1
    return out


def numpy_topk(q, x, k):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def hand_recall(found, true, k):
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, true)]))


@pytest.fixture(scope="module")
def ivf_case():
    """20,000 x 32 around 200 centres, an IVF index planned above a low exact threshold, 100 queries."""
    x = clustered(20_000, 32, 200, seed=1)
    q = clustered(100, 32, 200, seed=2)
    plan = ann.plan_index(len(x), 32, 2 ** 30, exact_below=1_000)
    rs = np.random.RandomState(3)
    train = x[np.sort(rs.choice(len(x), ann.train_sample_size(plan, len(x)), replace=False))]
    index = ann.build_index(plan, chunks(x, [3000, 1234, 5000]), train, threads=1)
    return x, q, plan, index, numpy_topk(q, x, 10)[1]


# ----------------------------------------------------------------------------- plan
def test_plan_flat_below_threshold_and_approximate_above():
    p = ann.plan_index(49_999, 256, 2 * 2 ** 30)
    assert p["kind"] == "flat" and p["factory"] == "Flat" and p["metric"] == "ip"
    p = ann.plan_index(50_000, 256, 2 * 2 ** 30)
    assert p["kind"] == "ivf_flat" and p["factory"] == f"IVF{p['nlist']},Flat"
    assert 4 * np.sqrt(50_000) <= p["nlist"] <= 8 * np.sqrt(50_000)
    p = ann.plan_index(1_000_000, 256, ann.parse_bytes("2.5G"))
    assert p["kind"] == "ivf_flat" and 4_000 <= p["nlist"] <= 16_000
    assert json.loads(json.dumps(p)) == p
    assert isinstance(p["reason"], str) and p["reason"]
    assert ann.train_sample_size(p, 1_000_000) >= 30 * p["nlist"]
    assert ann.train_sample_size(ann.plan_index(10, 8, 2 ** 20), 10) == 0


def test_plan_respects_budget_and_degrades_in_accuracy_order():
    n, d = 1_000_000, 256
    raw = {"ivf_flat": n * d * 4, "ivf_sq8": n * d}  # code bytes alone, a lower bound of any honest estimate
    seen = []
    for mib in (8000, 3000, 2000, 1500, 1200, 900, 600, 400, 250):
        budget = mib * 2 ** 20
        try:
            p = ann.plan_index(n, d, budget)
        except ValueError:
            seen.append(None)
            continue
        assert p["estimated_bytes"] <= budget
        assert p["estimated_bytes"] >= raw.get(p["kind"], n * p["pq_m"])
        seen.append((ACCURACY.index(p["kind"]), -p["pq_m"]))
    kinds = [s for s in seen if s is not None]
    assert kinds == sorted(kinds), "a smaller budget never gives a more accurate kind"
    assert {k for k, _ in kinds} >= {1, 2, 3}
    assert seen[-1] is None or seen[-1][0] == 3


def test_plan_errors_are_clear():
    # below the threshold, flat (40,000 x 1 KiB = 39 MiB of vectors) does not fit, and nothing smaller does
    with pytest.raises(ValueError, match=r"30 MiB is too small for 40,000 vectors.*needs about"):
        ann.plan_index(40_000, 256, 30 * 2 ** 20)
    with pytest.raises(ValueError, match=r"too small.*--memory \d+M"):
        ann.plan_index(100_000_000, 256, ann.parse_bytes("1G"))
    with pytest.raises(ValueError):
        ann.plan_index(0, 256, 2 ** 30)
    with pytest.raises(ValueError, match="unknown index kind"):
        ann.plan_index(1000, 16, 2 ** 30, kind="lsh")
    assert ann.plan_index(100_000, 64, 2 ** 30, kind="ivf_sq8")["factory"].endswith(",SQ8")


# ----------------------------------------------------------------------------- exact search
def test_exact_topk_equals_numpy_argsort():
    rs = np.random.RandomState(0)
    x, q = unit(rs.randn(3_001, 24)), unit(rs.randn(37, 24))
    s, i = ann.exact_topk(q, chunks(x, [700, 5, 1000, 64]), 10, block_rows=256)
    ref_s, ref_i = numpy_topk(q, x, 10)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    assert s.dtype == np.float32 and i.dtype == np.int64


def test_exact_topk_pads_when_fewer_rows_than_k():
    rs = np.random.RandomState(1)
    x, q = unit(rs.randn(4, 8)), unit(rs.randn(3, 8))
    s, i = ann.exact_topk(q, [x[:1], x[1:]], 6)
    np.testing.assert_array_equal(i[:, :4], numpy_topk(q, x, 4)[1])
    assert (i[:, 4:] == -1).all() and np.isneginf(s[:, 4:]).all()


def test_flat_index_gives_numpy_topk():
    rs = np.random.RandomState(2)
    x, q = unit(rs.randn(5_000, 16)), unit(rs.randn(20, 16))
    plan = ann.plan_index(len(x), 16, 2 ** 30)
    assert plan["kind"] == "flat" and ann.train_sample_size(plan, len(x)) == 0
    index = ann.build_index(plan, chunks(x, [999, 2000]), None)
    assert index.ntotal == len(x)
    s, i = ann.search(index, q, 10)
    ref_s, ref_i = numpy_topk(q, x, 10)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    t = ann.tune(index, q, ref_i)
    assert t["params"] == {} and t["recall_at_10"] == 1.0


# ----------------------------------------------------------------------------- IVF
def test_ivf_row_ids_follow_chunk_order(ivf_case):
    x, q, plan, index, true = ivf_case
    assert plan["kind"] == "ivf_flat" and index.ntotal == len(x)
    ann.apply_params(index, {"nprobe": plan["nlist"]})  # every list: exact search
    _, i = ann.search(index, q, 10)
    np.testing.assert_array_equal(i, true)


def test_ivf_tune_reaches_recall_cheapest(ivf_case):
    x, q, plan, index, true = ivf_case
    t = ann.tune(index, q, true, k=10, target=0.9)
    nprobe = t["params"]["nprobe"]
    _, found = ann.search(index, q, 10)  # the chosen setting is left applied
    r = hand_recall(found, true, 10)
    assert r >= 0.9 and abs(r - t["recall_at_10"]) < 1e-4
    assert nprobe < plan["nlist"]
    for tried in t["tried"]:  # every cheaper setting that was tried missed the target
        if tried["params"]["nprobe"] < nprobe:
            assert tried["recall"] < 0.9
        assert tried["ms_per_query"] >= 0
    # held-out queries reach about the same recall with the tuned setting
    q2 = clustered(100, 32, 200, seed=5)
    _, f2 = ann.search(index, q2, 10)
    assert hand_recall(f2, numpy_topk(q2, x, 10)[1], 10) >= 0.85
    # an unreachable target: the best setting tried
    t = ann.tune(index, q, true, k=10, target=1.01)
    assert t["recall_at_10"] == max(tr["recall"] for tr in t["tried"])


def test_apply_params():
    flat = faiss.IndexFlatIP(8)
    ann.apply_params(flat, {"nprobe": 4})  # no-op for flat
    ivf = faiss.index_factory(8, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    ann.apply_params(ivf, {"nprobe": 3})
    assert faiss.extract_index_ivf(ivf).nprobe == 3
    with pytest.raises(ValueError, match="efSearch"):
        ann.apply_params(ivf, {"efSearch": 3})
    hnsw = faiss.index_factory(8, "HNSW16,Flat", faiss.METRIC_INNER_PRODUCT)
    ann.apply_params(hnsw, {"efSearch": 77})
    assert hnsw.hnsw.efSearch == 77


# ----------------------------------------------------------------------------- recall, sizes
def test_recall_at_k_hand_made():
    true = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert ann.recall_at_k(np.array([[4, 3, 2, 1], [8, 7, 6, 5]]), true, 4) == 1.0
    assert ann.recall_at_k(np.array([[1, 9, 9, 9], [9, 9, 9, 9]]), true, 4) == 0.125
    assert ann.recall_at_k(np.array([[1, -1, 2, 2], [6, 5, 0, 0]]), true, 2) == 0.75
    assert ann.recall_at_k(np.array([[3, 4, 1, 2]]), true[:1], 2) == 0.0  # only the top 2 of each count
    with pytest.raises(ValueError):
        ann.recall_at_k(true[:1], true, 4)


@pytest.mark.parametrize("text,value", [("2.5G", 2.5 * 2 ** 30), ("512M", 512 * 2 ** 20), ("1GiB", 2 ** 30),
                                        ("300000000", 300_000_000), ("64k", 65_536), ("1.5 GB", 1.5 * 2 ** 30),
                                        ("2T", 2 * 2 ** 40), (" 100 ", 100), ("100B", 100)])
def test_parse_bytes(text, value):
    assert ann.parse_bytes(text) == int(value)


@pytest.mark.parametrize("text", ["", "G", "2.5X", "-1G", "0", "1.5", "lots", "1 2G", "5iB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match=repr(text) if text else "size"):
        ann.parse_bytes(text)


# ----------------------------------------------------------------------------- bench
def test_bench_search_smoke(tmp_path):
    out = tmp_path / "bench_search.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench.py"), "search", "--n", "20000", "--dim", "32",
           "--centres", "200", "--queries", "50", "--tune-queries", "50", "--latency-queries", "50",
           "--exact-below", "1000", "--memory", "512M", "--kinds", "exact,auto", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["mode"] == "search" and r["n"] == 20000 and r["table"]
    assert set(r["kinds"]) == {"exact", "auto"}
    for kind, k in r["kinds"].items():
        for field in ("recall_at_k", "build_wall_s", "build_cpu_s", "peak_rss_build_mib", "latency_ms_p50",
                      "latency_ms_p99", "index_bytes", "search_params", "plan"):
            assert field in k, (kind, field)
        assert k["latency_ms_p50"] <= k["latency_ms_p99"] and k["peak_rss_build_mib"] > 0
    assert r["kinds"]["exact"]["recall_at_k"] == 1.0
    assert r["kinds"]["auto"]["plan"]["kind"] == "ivf_flat" and r["kinds"]["auto"]["recall_at_k"] >= 0.8
    assert "search" in res.stdout and "recall" in res.stdout
