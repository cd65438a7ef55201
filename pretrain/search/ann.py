"""The vector part of the search index: plan a faiss index for a size and a memory budget, build it from a
stream of chunks, measure and tune its recall against exact search.

Vectors are float32 and L2-normalised; the score is the inner product (``metric: "ip"``). Nothing here knows
about images or text.

Plan rules (``plan_index``):

* ``n < exact_below``: exact search (``IndexFlatIP``) when it fits the budget.
* otherwise the most accurate kind whose estimated resident size fits ``memory_bytes``, in this order:
  ``ivf_flat`` (float32 codes) > ``ivf_sq8`` (one byte per dimension) > ``ivf_pq`` with m = d/2, d/4, ...
  bytes per vector (8-bit codes). HNSW (``hnsw_flat``) is never chosen automatically: its build costs an
  order of magnitude more CPU than IVF for the same recall here; ask for it with ``kind="hnsw_flat"``.
* IVF lists: ``nlist`` = the smallest power of two >= 4 sqrt(n) (so 4-8 sqrt(n), 4096 for a million; at most
  n/39, faiss's minimum of training points per list); trained on ``train_sample_size`` = 40 nlist vectors
  (at least 10,240 for PQ codebooks; at most n), 10 spherical k-means iterations.
* the estimate (``estimated_bytes``) counts the index (codes, ids, centroids, growth slack of the inverted lists),
  the training sample and k-means temporaries, one add chunk of ``CHUNK_ROWS`` vectors with faiss's per-chunk
  temporaries. The process's own baseline (interpreter, numpy, faiss: about 50-100 MiB; more with torch) comes
  on top of it. Checked on 1M x 256 (tools/bench.py search): IVF4096,Flat estimated 1753 MiB, build process
  peak 1642 MiB; Flat estimated 1041 MiB, peak 1215 MiB (interpreter included).
"""
from __future__ import annotations

import math
import re
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

CHUNK_ROWS = 65_536            # rows of one add chunk assumed by the estimate (the caller's chunks may differ)
LIST_SLACK = 0.25              # inverted lists are std::vectors grown by doubling: slack over the codes
IVF_TRAIN_PER_LIST = 40        # training points per IVF list (faiss warns below 39)
KMEANS_ITERS = 10
PQ_TRAIN_MIN = 40 * 256        # 8-bit PQ codebooks: 256 centroids per sub-quantizer
HNSW_M = 32
KINDS = ("flat", "ivf_flat", "ivf_sq8", "ivf_pq", "hnsw_flat")


# ----------------------------------------------------------------------------------------------- plan
def _nlist(n: int) -> int:
    nlist = 2 ** math.ceil(math.log2(max(4 * math.sqrt(n), 1)))
    return int(max(1, min(nlist, n // 39)))


def _pq_choices(dim: int) -> List[int]:
    """Bytes per vector of 8-bit PQ codes, most accurate first: m divides dim, 2 to 64 dimensions per byte."""
    return [m for m in range(dim // 2, 0, -1) if dim % m == 0 and 2 <= dim // m <= 64]


def _estimate(kind: str, n: int, dim: int, nlist: int = 0, pq_m: int = 0) -> int:
    f32 = 4 * dim
    rows = min(CHUNK_ROWS, n)
    chunk = rows * f32
    if kind == "flat":
        return int(n * f32 + chunk)
    if kind == "hnsw_flat":
        links = 2 * HNSW_M * 4 * 1.1  # level 0 has 2M int32 neighbours; upper levels add ~1/M of that
        return int(n * (f32 + links) + chunk)
    code = {"ivf_flat": f32, "ivf_sq8": dim, "ivf_pq": pq_m}[kind]
    lists = n * (code + 8) * (1 + LIST_SLACK)  # codes + int64 ids
    ntrain = min(n, max(IVF_TRAIN_PER_LIST * nlist, PQ_TRAIN_MIN if kind == "ivf_pq" else 0))
    # k-means: the sample, faiss's own copy of it, assignments; the chunk: itself, residuals, codes, list ids
    train = 2 * ntrain * f32 + ntrain * 12 + 2 * nlist * f32
    per_chunk = chunk * (2 if kind == "ivf_pq" else 1) + rows * (code + 16)
    return int(lists + train + chunk + per_chunk)


def _describe(kind: str, n: int, dim: int, nlist: int = 0, pq_m: int = 0) -> Dict[str, Any]:
    factory = {"flat": "Flat", "ivf_flat": f"IVF{nlist},Flat", "ivf_sq8": f"IVF{nlist},SQ8",
               "ivf_pq": f"IVF{nlist},PQ{pq_m}x8", "hnsw_flat": f"HNSW{HNSW_M},Flat"}[kind]
    plan: Dict[str, Any] = {"kind": kind, "factory": factory, "metric": "ip", "n": n, "dim": dim,
                            "nlist": nlist, "pq_m": pq_m, "estimated_bytes": _estimate(kind, n, dim, nlist, pq_m)}
    if kind.startswith("ivf"):
        plan["kmeans_iters"] = KMEANS_ITERS
    if kind == "hnsw_flat":
        plan["hnsw_m"] = HNSW_M
    return plan


def _candidates(n: int, dim: int) -> List[Dict[str, Any]]:
    nlist = _nlist(n)
    out = [_describe("ivf_flat", n, dim, nlist), _describe("ivf_sq8", n, dim, nlist)]
    if n >= 1024:  # PQ codebooks need a few thousand training points to mean anything
        out += [_describe("ivf_pq", n, dim, nlist, m) for m in _pq_choices(dim)]
    return out


def _mib(b: float) -> str:
    return f"{b / 2 ** 20:,.0f} MiB" if b < 2 ** 30 else f"{b / 2 ** 30:.2f} GiB"


def plan_index(n: int, dim: int, memory_bytes: int, exact_below: int = 50_000,
               kind: Optional[str] = None) -> Dict[str, Any]:
    """A JSON-able plan for ``n`` vectors of ``dim`` dimensions within ``memory_bytes`` (rules: module docstring).

    ``kind`` forces one kind (``flat``, ``ivf_flat``, ``ivf_sq8``, ``ivf_pq`` with the largest m that fits,
    ``hnsw_flat``); the budget still applies. Raises ``ValueError`` when nothing fits."""
    if n <= 0 or dim <= 0:
        raise ValueError(f"cannot plan an index of {n} vectors of dimension {dim}: both must be positive")
    if memory_bytes <= 0:
        raise ValueError(f"memory budget must be positive, got {memory_bytes} bytes")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}: one of {', '.join(KINDS)}")
    flat = _describe("flat", n, dim)
    if kind in (None, "flat") and (kind == "flat" or n < exact_below) and flat["estimated_bytes"] <= memory_bytes:
        flat["reason"] = (f"exact inner product: {n:,} vectors" +
                          (f" < {exact_below:,}" if kind is None else " (kind asked for)"))
        return flat
    if kind == "hnsw_flat":
        cands = [_describe("hnsw_flat", n, dim)]
    elif kind == "flat":
        cands = [flat]
    else:
        cands = [c for c in _candidates(n, dim) if kind is None or c["kind"] == kind]
    for c in cands:
        if c["estimated_bytes"] <= memory_bytes:
            if kind is not None:
                head = f"kind {kind} asked for"
            elif n < exact_below:
                head = f"exact index (about {_mib(flat['estimated_bytes'])}) over budget: most accurate approximate one"
            else:
                head = f"{n:,} vectors >= {exact_below:,}: most accurate approximate index"
            c["reason"] = f"{head} within {_mib(memory_bytes)} (estimated {_mib(c['estimated_bytes'])})"
            return c
    if not cands:
        raise ValueError(f"no index of kind {kind} can be built for {n:,} vectors of dimension {dim}")
    smallest = min(cands, key=lambda c: c["estimated_bytes"])
    raise ValueError(f"memory budget {_mib(memory_bytes)} is too small for {n:,} vectors of dimension {dim}: the "
                     f"smallest index ({smallest['factory']}) needs about {_mib(smallest['estimated_bytes'])}; "
                     f"give --memory {math.ceil(smallest['estimated_bytes'] / 2 ** 20)}M or more")


def train_sample_size(plan: Dict[str, Any], n: int) -> int:
    """How many vectors ``build_index`` wants for training (0 when the kind needs none); at most ``n``."""
    if not plan["kind"].startswith("ivf"):
        return 0
    want = IVF_TRAIN_PER_LIST * plan["nlist"]
    if plan["kind"] == "ivf_pq":
        want = max(want, PQ_TRAIN_MIN)
    return int(min(n, want))


# ----------------------------------------------------------------------------------------------- build
def _as_f32(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} has shape {x.shape}, expected (rows, {dim})")
    return np.ascontiguousarray(x, dtype=np.float32)


class _Threads:
    """faiss's OpenMP threads set for a block and restored after it (0: leave as is)."""

    def __init__(self, threads: int):
        self.threads = threads

    def __enter__(self):
        import faiss
        self.before = faiss.omp_get_max_threads()
        if self.threads > 0:
            faiss.omp_set_num_threads(self.threads)

    def __exit__(self, *exc):
        import faiss
        faiss.omp_set_num_threads(self.before)


def build_index(plan: Dict[str, Any], chunks: Iterable[np.ndarray], train: Optional[np.ndarray],
                threads: int = 0):
    """The planned index, trained on ``train`` and filled with ``chunks`` in order (row ids 0..n-1).

    Holds one chunk at a time besides the index (a chunk of another dtype than float32 is converted, one copy).
    ``threads`` > 0 sets faiss's OpenMP threads for the build (restored after)."""
    import faiss

    dim = int(plan["dim"])
    index = faiss.index_factory(dim, plan["factory"], faiss.METRIC_INNER_PRODUCT)
    with _Threads(threads):
        if plan["kind"].startswith("ivf"):
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.niter = int(plan.get("kmeans_iters", KMEANS_ITERS))
            ivf.cp.seed = 1234
            if plan["kind"] == "ivf_pq":
                # on by default: minutes of CPU for a Hamming pre-filter that search never uses here
                faiss.downcast_index(ivf).do_polysemous_training = False
        if not index.is_trained:
            if train is None or len(train) < plan["nlist"]:
                raise ValueError(f"index {plan['factory']} needs a training sample of at least {plan['nlist']} "
                                 f"vectors (train_sample_size says {train_sample_size(plan, plan['n'])}), "
                                 f"got {0 if train is None else len(train)}")
            index.train(_as_f32(train, dim, "the training sample"))
        for chunk in chunks:
            x = _as_f32(chunk, dim, "a chunk")
            if len(x):
                index.add(x)
            del x, chunk
    return index


# ----------------------------------------------------------------------------------------------- exact
def exact_topk(queries: np.ndarray, chunks: Iterable[np.ndarray], k: int,
               block_rows: int = 16_384) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores desc, ties by row id) of ``queries`` over the vectors of ``chunks``.

    Row ids are global row numbers in chunk order. Memory: one chunk plus a (queries x ``block_rows``) score
    block; a query gets ``-inf`` / ``-1`` padding when there are fewer than ``k`` rows."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2:
        raise ValueError(f"queries must be a 2-D array, got shape {q.shape}")
    nq = q.shape[0]
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    best_s = np.full((nq, k), -np.inf, np.float32)
    best_i = np.full((nq, k), -1, np.int64)
    qb = max(1, 2 ** 24 // block_rows)  # queries per block: at most 16M scores (64 MiB) at a time
    offset = 0
    for chunk in chunks:
        x = _as_f32(chunk, q.shape[1], "a chunk")
        for r0 in range(0, len(x), block_rows):
            xb = x[r0:r0 + block_rows]
            for q0 in range(0, nq, qb):
                s = q[q0:q0 + qb] @ xb.T                               # (qb, rows)
                if s.shape[1] > k:
                    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
                else:
                    part = np.broadcast_to(np.arange(s.shape[1]), s.shape)
                cs = np.concatenate([best_s[q0:q0 + qb], np.take_along_axis(s, part, 1)], 1)
                ci = np.concatenate([best_i[q0:q0 + qb], part + offset + r0], 1)
                keep = np.argpartition(-cs, k - 1, axis=1)[:, :k]
                best_s[q0:q0 + qb] = np.take_along_axis(cs, keep, 1)
                best_i[q0:q0 + qb] = np.take_along_axis(ci, keep, 1)
        offset += len(x)
    # final order: score descending, then row id ascending (padding last)
    order = np.lexsort((np.where(best_i < 0, np.iinfo(np.int64).max, best_i), -best_s), axis=1)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |found top-k ∩ true top-k| / k (-1 entries ignored; k shrinks to the true
    neighbours there are when a collection has fewer than k rows)."""
    found, true = np.asarray(found_ids)[:, :k], np.asarray(true_ids)[:, :k]
    if found.shape[0] != true.shape[0]:
        raise ValueError(f"found ids for {found.shape[0]} queries, true ids for {true.shape[0]}")
    if found.shape[0] == 0:
        raise ValueError("recall of no queries")
    total = 0.0
    for f, t in zip(found, true):
        t = set(t[t >= 0].tolist())
        total += len(t.intersection(f[f >= 0].tolist())) / max(1, min(k, len(t)))
    return total / found.shape[0]


# ----------------------------------------------------------------------------------------------- search
def _flat(index) -> bool:
    import faiss
    return isinstance(index, faiss.IndexFlat)


def _grid(index, k: int) -> List[Dict[str, int]]:
    import faiss
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        nlist = ivf.nlist
        steps = sorted({min(2 ** i, nlist) for i in range(int(math.log2(nlist)) + 2)})
        return [{"nprobe": p} for p in steps]
    if hasattr(index, "hnsw"):
        return [{"efSearch": e} for e in sorted({max(k, e) for e in (16, 32, 64, 128, 256, 512, 1024, 2048)})]
    return [{}]


def apply_params(index, params: Dict[str, Any]) -> None:
    """Set search-time parameters (``nprobe``, ``efSearch``) on ``index``; a no-op for exact (flat) indexes.
    Raises ``ValueError`` for a parameter that the index does not have."""
    if not params or _flat(index):
        return
    import faiss
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            ps.set_index_parameter(index, name, float(value))
        except RuntimeError:
            raise ValueError(f"index {type(index).__name__} has no search parameter {name!r}") from None


def search(index, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Scores and row ids (faiss order: best first, -1 where fewer than k were found) of ``queries``."""
    q = _as_f32(queries, index.d, "the queries")
    return index.search(q, k)


def tune(index, queries: np.ndarray, true_ids: np.ndarray, k: int = 10, target: float = 0.95) -> Dict[str, Any]:
    """The cheapest search setting whose recall@k on ``queries`` reaches ``target`` (the best reached if none).

    IVF: ``nprobe`` doubling from 1, then bisected between the last miss and the first hit; HNSW: ``efSearch``
    doubling from 16; flat: ``{}``. ``ms_per_query`` is the batch search time over the queries, with faiss's
    current threads. The chosen setting is left applied on ``index``."""
    q = _as_f32(queries, index.d, "the queries")
    tried: List[Dict[str, Any]] = []

    def trial(params: Dict[str, Any]) -> float:
        apply_params(index, params)
        t0 = time.perf_counter()
        _, ids = index.search(q, k)
        ms = (time.perf_counter() - t0) * 1000 / max(1, len(q))
        r = recall_at_k(ids, true_ids, k)
        tried.append({"params": dict(params), "recall": round(r, 5), "ms_per_query": round(ms, 4)})
        return r

    grid = _grid(index, k)
    hit = None
    for i, params in enumerate(grid):
        if trial(params) >= target:
            hit = i
            break
    if hit is not None and hit > 0 and "nprobe" in grid[hit]:
        lo, hi = grid[hit - 1]["nprobe"], grid[hit]["nprobe"]   # lo misses, hi reaches
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if trial({"nprobe": mid}) >= target:
                hi = mid
            else:
                lo = mid
    reached = [t for t in tried if t["recall"] >= target]
    if reached:
        best = min(reached, key=lambda t: sum(t["params"].values()))
    else:
        best = max(tried, key=lambda t: (t["recall"], -sum(t["params"].values())))
    apply_params(index, best["params"])
    return {"params": best["params"], "recall_at_10": best["recall"], "k": k, "target": target, "tried": tried}


# ----------------------------------------------------------------------------------------------- sizes
_UNITS = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_bytes(text: str) -> int:
    """A byte count: a plain integer or a number with a binary unit (K, M, G, T, optionally followed by
    "iB" or "B": all powers of 1024). "2.5G" -> 2684354560, "512M", "1GiB", "300000000"."""
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgGtT]?)(i?[bB])?", s)
    if not m or (m.group(3) and m.group(3)[0] == "i" and not m.group(2)):
        raise ValueError(f"cannot read {text!r} as a size: give bytes (300000000) or a number with a unit "
                         f"K, M, G or T (2.5G, 512M, 1GiB; powers of 1024)")
    number, unit = m.group(1), m.group(2).lower()
    if not unit and "." in number:
        raise ValueError(f"{text!r}: a byte count without unit must be a whole number (or add a unit: 2.5G)")
    value = int(float(number) * _UNITS[unit]) if unit else int(number)
    if value <= 0:
        raise ValueError(f"{text!r}: a memory size must be positive")
    return value
