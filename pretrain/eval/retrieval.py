"""Retrieval metrics in bounded memory: top-k, the VSE (COCO/Flickr) protocol, graded search metrics.

Score of a (query, gallery item) pair = dot product of their embeddings (cosine when the caller
L2-normalised them). The Q x G score matrix is never materialised: queries are processed in chunks
of ``chunk_size`` rows (by default as many as fit ``memory_budget_bytes``), and for each chunk only
what the metrics need is kept: the score of every relevant pair and the number of gallery items
scoring at least as high. Peak working memory is about ``chunk_size x G`` scores plus a few MiB,
on top of the inputs (measured: 100k x 100k x 256 float32 in about 1 GiB of process RSS).

Tie policy (pessimistic, used by every function here): the gallery is ranked by score, descending;
among items with EQUAL scores the non-relevant ones come first, then the relevant ones by
ascending gain. A relevant item is therefore never helped by a tie, so ranks cannot be inflated by
degenerate embeddings (e.g. a collapsed model that scores everything equal ranks relevant items
last, not first). Concretely, the i-th relevant item of a query (in that order) has rank::

    rank_i = #{non-relevant j : s_j >= s_i} + i                       (1-based)

and the best ranked relevant item has rank 1 + #{non-relevant j : s_j >= its score}. Without ties
this is the usual rank. (VSE++ breaks ties by argsort order, so it agrees with this except on ties.)

Units: ``vse_metrics`` / ``coco_1k_5fold`` report recalls and rsum in PERCENT (0-100), as VSE++
does; ``search_metrics`` reports fractions in [0, 1]; ``pair_retrieval_metrics`` reports the
fractions of ``search_metrics`` per direction and an ``rsum`` in PERCENT. Scores are computed in
float32 (float64 if an input is float64); the tensors may live on any device.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 256 * 2 ** 20  # bytes for the score block of one query chunk
_SLAB_ELEMENTS = 2 ** 20                # scores compared at once when counting ranks (~13 MiB of temporaries)

Relevance = Union[Sequence[Mapping[int, float]], Tuple[Tensor, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- helpers
def _check_embeddings(queries: Tensor, gallery: Tensor) -> torch.dtype:
    if queries.dim() != 2 or gallery.dim() != 2:
        raise ValueError(f"embeddings must be 2-D, got {tuple(queries.shape)} and {tuple(gallery.shape)}")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"embedding dims differ: queries {queries.shape[1]} vs gallery {gallery.shape[1]}")
    if gallery.shape[0] == 0:
        raise ValueError("the gallery is empty")
    for name, t in (("queries", queries), ("gallery", gallery)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contain NaN or infinite values")
    return torch.float64 if torch.float64 in (queries.dtype, gallery.dtype) else torch.float32


def _rows_per_chunk(gallery_size: int, dtype: torch.dtype, chunk_size: Optional[int],
                    memory_budget_bytes: int) -> int:
    """Query rows per chunk: ``chunk_size`` if given, else as many C x G score rows as fit the budget."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    row_bytes = gallery_size * torch.finfo(dtype).bits // 8
    return max(1, int(memory_budget_bytes) // row_bytes)  # at least one row, whatever the budget


def _count_at_least(block: Tensor, rows: Optional[Tensor], thresholds: Tensor) -> Tensor:
    """Per threshold t_j: #{g : block[rows[j], g] >= t_j} (rows None: every row of the block, in order).

    Counted in column slabs so that the bool mask, its int64 sum and any copied rows stay small
    instead of adding 13 bytes per score of the C x G block.
    """
    n, num_g = thresholds.numel(), block.shape[1]
    width = max(256, _SLAB_ELEMENTS // max(n, 1))
    counts = torch.zeros(n, dtype=torch.long, device=block.device)
    for c in range(0, num_g, width):
        slab = block[:, c:c + width]
        if rows is not None:
            slab = slab.index_select(0, rows)
        counts += (slab >= thresholds[:, None]).sum(1)
    return counts


def _score_block(queries: Tensor, gallery_t: Tensor, dtype: torch.dtype) -> Tensor:
    return queries.to(dtype) @ gallery_t  # C x G, the only large allocation


# ----------------------------------------------------------------------------- top-k
@torch.no_grad()
def topk_chunked(queries: Tensor, gallery: Tensor, k: int, chunk_size: Optional[int] = None,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> Tuple[Tensor, Tensor]:
    """Top-k gallery items of every query by dot product: ``(scores [Q, k], indices [Q, k])``.

    Sorted by descending score. Among equal scores the order of indices is torch.topk's (unspecified).
    Memory: one ``chunk_size x G`` score block at a time (``chunk_size`` from the budget if None).
    """
    dtype = _check_embeddings(queries, gallery)
    num_q, num_g = queries.shape[0], gallery.shape[0]
    if not 1 <= k <= num_g:
        raise ValueError(f"k must be in [1, gallery size {num_g}], got {k}")
    rows = _rows_per_chunk(num_g, dtype, chunk_size, memory_budget_bytes)
    gallery_t = gallery.to(dtype).t()                                 # D x G (a view unless cast)
    scores = torch.empty(num_q, k, dtype=dtype, device=queries.device)
    indices = torch.empty(num_q, k, dtype=torch.long, device=queries.device)
    for start in range(0, num_q, rows):
        block = _score_block(queries[start:start + rows], gallery_t, dtype)       # C x G
        torch.topk(block, k, dim=1, largest=True, sorted=True,
                   out=(scores[start:start + rows], indices[start:start + rows]))
        del block
    return scores, indices


# ----------------------------------------------------------------------------- relevance input
def _relevance_to_coo(relevance: Relevance, num_queries: int, gallery_size: int,
                      device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """(query index, gallery index, gain float64) of every relevant pair; gain 0 entries dropped."""
    if isinstance(relevance, Tensor):
        if not relevance.is_sparse:
            raise ValueError("a relevance tensor must be a sparse COO tensor of shape [Q, G]")
        if tuple(relevance.shape) != (num_queries, gallery_size):
            raise ValueError(f"sparse relevance has shape {tuple(relevance.shape)}, expected "
                             f"{(num_queries, gallery_size)}")
        relevance = relevance.coalesce()
        qi, gi, gain = relevance.indices()[0], relevance.indices()[1], relevance.values()
    elif isinstance(relevance, tuple):
        if len(relevance) != 3:
            raise ValueError("COO relevance must be a tuple (query_idx, gallery_idx, gain)")
        qi, gi, gain = (torch.as_tensor(t) for t in relevance)
    else:
        if len(relevance) != num_queries:
            raise ValueError(f"relevance has {len(relevance)} entries, expected one per query ({num_queries})")
        qs: List[int] = []
        gs: List[int] = []
        vs: List[float] = []
        for q, rel in enumerate(relevance):
            for g, v in rel.items():
                qs.append(q)
                gs.append(int(g))
                vs.append(float(v))
        qi, gi, gain = torch.tensor(qs, dtype=torch.long), torch.tensor(gs, dtype=torch.long), torch.tensor(vs)
    qi, gi = qi.to(device=device, dtype=torch.long).reshape(-1), gi.to(device=device, dtype=torch.long).reshape(-1)
    gain = gain.to(device=device, dtype=torch.float64).reshape(-1)
    if not qi.numel() == gi.numel() == gain.numel():
        raise ValueError(f"COO relevance lengths differ: {qi.numel()}, {gi.numel()}, {gain.numel()}")
    if qi.numel():
        if int(qi.min()) < 0 or int(qi.max()) >= num_queries:
            raise ValueError(f"query index out of range [0, {num_queries})")
        if int(gi.min()) < 0 or int(gi.max()) >= gallery_size:
            raise ValueError(f"gallery index out of range [0, {gallery_size})")
        if not bool(torch.isfinite(gain).all()) or bool((gain < 0).any()):
            raise ValueError("gains must be finite and >= 0")
        if torch.unique(qi * gallery_size + gi).numel() != qi.numel():
            raise ValueError("duplicate (query, gallery) pairs in the relevance; aggregate them first "
                             "(build_pairs does so for click logs)")
    keep = gain > 0  # gain 0 = judged not relevant
    return qi[keep], gi[keep], gain[keep]


# ----------------------------------------------------------------------------- ranks (the core)
class _Ranked(NamedTuple):
    """Relevant pairs sorted by (query, pessimistic rank), with per-query offsets."""
    query: Tensor         # [P] query index of the pair
    rank: Tensor          # [P] pessimistic 1-based rank of the pair's gallery item
    gain: Tensor          # [P] graded relevance (float64)
    position: Tensor      # [P] 1-based index among the query's relevant items
    num_relevant: Tensor  # [Q]
    start: Tensor         # [Q] offset of the query's first pair


@torch.no_grad()
def _rank_relevant(queries: Tensor, gallery: Tensor, qi: Tensor, gi: Tensor, gain: Tensor,
                   chunk_size: Optional[int], memory_budget_bytes: int) -> _Ranked:
    """Pessimistic 1-based rank of every relevant pair (see the module docstring), chunk by chunk."""
    dtype = _check_embeddings(queries, gallery)
    num_q, num_g = queries.shape[0], gallery.shape[0]
    device = queries.device
    order = torch.argsort(qi, stable=True)
    qi, gi, gain = qi[order], gi[order], gain[order]
    num_relevant = torch.bincount(qi, minlength=num_q)                              # Q
    offsets = torch.zeros(num_q + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(num_relevant, 0)

    score = torch.empty(qi.numel(), dtype=dtype, device=device)                     # P
    count_ge = torch.zeros(qi.numel(), dtype=torch.long, device=device)             # P: items with s >= s_pair
    active = torch.nonzero(num_relevant).flatten()      # queries without relevant items are never scored
    rows = _rows_per_chunk(num_g, dtype, chunk_size, memory_budget_bytes)
    gallery_t = gallery.to(dtype).t()                                 # D x G (a view unless cast)
    off_cpu = offsets.cpu()
    for a in range(0, active.numel(), rows):
        chunk = active[a:a + rows]                                                   # C query indices
        block = _score_block(queries.index_select(0, chunk), gallery_t, dtype)      # C x G
        # pairs of these queries are contiguous: [p0, p1)
        p0, p1 = int(off_cpu[int(chunk[0])]), int(off_cpu[int(chunk[-1]) + 1])
        local = torch.repeat_interleave(torch.arange(chunk.numel(), device=device), num_relevant[chunk])
        s = block[local, gi[p0:p1]]
        score[p0:p1] = s
        # the r-th relevant item of every query, one round per r, while a round covers most rows:
        # a full round compares the block in place (copying rows costs more than comparing them)
        nth = torch.arange(p1 - p0, device=device) - (offsets[chunk] - p0)[local]   # 0-based position
        counts = torch.zeros(p1 - p0, dtype=torch.long, device=device)
        r = 0
        while True:
            sel = torch.nonzero(nth == r).flatten()
            if sel.numel() == 0 or 2 * sel.numel() < chunk.numel():
                break
            full = sel.numel() == chunk.numel()
            counts[sel] = _count_at_least(block, None if full else local[sel], s[sel])
            r += 1
        rest = torch.nonzero(nth >= r).flatten()  # items beyond the common rounds: rows copied, <= C at a time
        for b in range(0, rest.numel(), rows):
            sel = rest[b:b + rows]
            counts[sel] = _count_at_least(block, local[sel], s[sel])
        count_ge[p0:p1] = counts
        del block

    # sort each query's pairs by (score desc, gain asc): the pessimistic order among relevant items
    perm = torch.argsort(gain, stable=True)
    perm = perm[torch.argsort(score[perm], descending=True, stable=True)]
    perm = perm[torch.argsort(qi[perm], stable=True)]
    qi, gain, score, count_ge = qi[perm], gain[perm], score[perm], count_ge[perm]
    # relevant items of the same query scoring >= this one = end of its tie block - query start
    n = qi.numel()
    new_block = torch.ones(n, dtype=torch.bool, device=device)
    if n > 1:
        new_block[1:] = (qi[1:] != qi[:-1]) | (score[1:] != score[:-1])
    block_id = torch.cumsum(new_block.long(), 0) - 1
    block_end = torch.nonzero(torch.cat([new_block[1:], new_block.new_ones(1)])).flatten() + 1
    start = offsets[:-1]
    relevant_ge = block_end[block_id] - start[qi]
    position = torch.arange(n, device=device) - start[qi] + 1
    rank = count_ge - relevant_ge + position  # non-relevant items at or above it + its own position
    return _Ranked(qi, rank, gain, position, num_relevant, start)


def _median(x: Tensor) -> float:
    """Median as numpy computes it (mean of the two middle values for an even count)."""
    s = torch.sort(x.double()).values
    n = s.numel()
    return float((s[(n - 1) // 2] + s[n // 2]) / 2)


# ----------------------------------------------------------------------------- VSE protocol
def _vse_direction(ranks: Tensor, prefix: str) -> Dict[str, float]:
    r = ranks.double()
    out = {f"{prefix}_r{k}": 100.0 * float((r <= k).double().mean()) for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = math.floor(_median(r - 1)) + 1.0  # as VSE++
    out[f"{prefix}_meanr"] = float(r.mean())
    return out


@torch.no_grad()
def vse_metrics(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk_size: Optional[int] = None,
                memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> Dict[str, float]:
    """VSE++ protocol: each caption belongs to exactly one image, an image has one or more captions.

    Image->text: rank of the BEST ranked caption of the image; text->image: rank of its image.
    Returns i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr, the same with t2i_, and rsum = sum of the
    six recalls. Recalls and rsum in PERCENT (0-100); medr = floor(median(rank - 1)) + 1 and
    meanr = mean rank, ranks 1-based, as VSE++ computes them. Ties: pessimistic (module docstring).
    """
    num_i, num_t = image_emb.shape[0], text_emb.shape[0]
    t2i = torch.as_tensor(text_to_image).to(device=text_emb.device, dtype=torch.long).reshape(-1)
    if t2i.numel() != num_t:
        raise ValueError(f"text_to_image has {t2i.numel()} entries for {num_t} captions")
    if num_t == 0 or int(t2i.min()) < 0 or int(t2i.max()) >= num_i:
        raise ValueError(f"text_to_image must map every caption to an image in [0, {num_i})")
    missing = int((torch.bincount(t2i, minlength=num_i) == 0).sum())
    if missing:
        raise ValueError(f"{missing} images have no caption; the VSE protocol needs at least one per image")
    texts = torch.arange(num_t, device=t2i.device)
    ones = torch.ones(num_t, dtype=torch.float64, device=t2i.device)
    t2i_ranked = _rank_relevant(text_emb, image_emb, texts, t2i, ones, chunk_size, memory_budget_bytes)
    i2t_ranked = _rank_relevant(image_emb, text_emb, t2i, texts, ones, chunk_size, memory_budget_bytes)
    out = _vse_direction(i2t_ranked.rank[i2t_ranked.start], "i2t")  # first (best) caption of each image
    out.update(_vse_direction(t2i_ranked.rank, "t2i"))                # one pair per caption
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


@torch.no_grad()
def coco_1k_5fold(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, num_folds: int = 5,
                  fold_size: int = 1000, chunk_size: Optional[int] = None,
                  memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> Dict[str, float]:
    """COCO 1K test: ``vse_metrics`` on 5 folds of 1000 consecutive images (each with its captions),
    every metric averaged over the folds (medr and meanr too, as VSE++ does).

    The image count must be exactly ``num_folds * fold_size`` (5000 for COCO). COCO "5K" is
    ``vse_metrics`` on the whole set.
    """
    num_i = image_emb.shape[0]
    if num_i % fold_size:
        raise ValueError(f"{num_i} images is not a multiple of the fold size {fold_size}: the 1K protocol needs "
                         f"{num_folds} x {fold_size} images (use vse_metrics on the whole set for 5K)")
    if num_i != num_folds * fold_size:
        raise ValueError(f"{num_i} images = {num_i // fold_size} folds of {fold_size}, expected {num_folds}")
    t2i = torch.as_tensor(text_to_image).to(device=text_emb.device, dtype=torch.long).reshape(-1)
    if t2i.numel() != text_emb.shape[0]:
        raise ValueError(f"text_to_image has {t2i.numel()} entries for {text_emb.shape[0]} captions")
    folds = []
    for f in range(num_folds):
        lo = f * fold_size
        texts = torch.nonzero((t2i >= lo) & (t2i < lo + fold_size)).flatten()
        folds.append(vse_metrics(image_emb[lo:lo + fold_size], text_emb[texts], t2i[texts] - lo,
                                 chunk_size, memory_budget_bytes))
    return {k: sum(m[k] for m in folds) / num_folds for k in folds[0]}


# ----------------------------------------------------------------------------- search protocol
@torch.no_grad()
def search_metrics(query_emb: Tensor, gallery_emb: Tensor, relevance: Relevance, ks: Sequence[int] = (1, 5, 10),
                   chunk_size: Optional[int] = None,
                   memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> Dict[str, float]:
    """Search metrics for distinct queries with graded relevance (e.g. derived from clicks).

    ``relevance``: per query a dict {gallery_index: rel}, or COO ``(query_idx, gallery_idx, rel)``
    tensors, or a sparse COO tensor [Q, G]. rel > 0 is relevant (graded), rel == 0 is not relevant,
    duplicate pairs are an error. Ranks are over the full gallery, ties pessimistic (module docstring).
    With k' = min(k, G), for each k in ``ks``, fractions in [0, 1]:

    - ``hit@k``: at least one relevant item in the top k' (what papers call R@k when a query has
      several relevant items);
    - ``recall@k`` = |relevant in top k'| / |relevant|;  ``precision@k`` = |relevant in top k'| / k';
    - ``ndcg@k`` = DCG@k / IDCG@k, DCG@k = sum over relevant items ranked r <= k' of
      (2^rel - 1) / log2(r + 1); IDCG@k the same for the query's own gains sorted descending;
    - ``map``: mean of average precision over the full ranking, AP = mean over the query's relevant
      items of (relevant items ranked at or above it) / its rank;
    - ``mrr``: mean of 1 / rank of the first relevant item.

    Means are over the queries having at least one relevant item (NaN if none has);
    ``num_queries_without_relevant`` counts the others. Also ``num_queries`` (all), ``gallery_size``,
    and ``chance_hit@1`` = mean over those queries of |relevant| / G (hit@1 of a random ranking).
    """
    num_q, num_g = query_emb.shape[0], gallery_emb.shape[0]
    qi, gi, gain = _relevance_to_coo(relevance, num_q, num_g, query_emb.device)
    r = _rank_relevant(query_emb, gallery_emb, qi, gi, gain, chunk_size, memory_budget_bytes)
    has = r.num_relevant > 0
    n_with = int(has.sum())
    nrel = r.num_relevant[has].double()
    out: Dict[str, float] = {"num_queries": num_q, "num_queries_without_relevant": num_q - n_with,
                             "gallery_size": num_g}
    if n_with == 0:
        log.warning("search_metrics: none of the %d queries has a relevant item; metrics are NaN", num_q)

    def per_query(values: Tensor) -> Tensor:  # sum of per-pair values for each query with relevant items
        return torch.zeros(num_q, dtype=torch.float64, device=values.device).index_add_(0, r.query, values)[has]

    def mean(x: Tensor) -> float:
        return float(x.mean()) if n_with else float("nan")

    rank = r.rank.double()
    first_rank = rank[r.start[has]]
    gain_value = torch.exp2(r.gain) - 1.0                                           # 2^rel - 1
    # ideal order: the query's gains sorted descending
    ideal = torch.argsort(r.gain, descending=True, stable=True)
    ideal = ideal[torch.argsort(r.query[ideal], stable=True)]
    ideal_pos = r.position.double()  # positions are the same 1..n_q pattern in any per-query order
    ideal_value = gain_value[ideal]
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(int(k), num_g)
        in_top = (rank <= kk).double()
        found = per_query(in_top)
        out[f"hit@{k}"] = mean((first_rank <= kk).double())
        out[f"recall@{k}"] = mean(found / nrel)
        out[f"precision@{k}"] = mean(found / kk)
        dcg = per_query(in_top * gain_value / torch.log2(rank + 1.0))
        idcg = per_query((ideal_pos <= kk).double() * ideal_value / torch.log2(ideal_pos + 1.0))
        out[f"ndcg@{k}"] = mean(dcg / idcg)
    out["map"] = mean(per_query(r.position.double() / rank) / nrel)
    out["mrr"] = mean(1.0 / first_rank)
    out["chance_hit@1"] = mean(nrel / num_g)
    return out


# ----------------------------------------------------------------------------- pretraining evaluation
@torch.no_grad()
def build_pairs(query_ids: Tensor, image_ids: Tensor, clicks: Optional[Tensor] = None,
                min_clicks: float = 1.0) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Deduplicate per-sample (query, image) rows into distinct queries, distinct images and pairs.

    Returns ``(pair_query, pair_image, query_first, image_first, gains)``:

    - ``query_first`` [U_q]: row of the first occurrence of each distinct query id, in order of first
      occurrence (``text_emb[query_first]`` keeps that row's embedding); ``image_first`` likewise;
    - ``pair_query``, ``pair_image`` [P']: distinct query / image index of each distinct pair
      (pairs sorted by (query, image));
    - ``gains`` [P'] = log2(1 + clicks summed over the duplicates of the pair), the graded
      relevance for ``search_metrics`` (its NDCG gain 2^rel - 1 is then exactly the click count).

    Every logged pair is a positive in pretraining, so summed clicks are raised to at least
    ``min_clicks`` (rows whose clicks are absent / 0 still count as relevant); pass 0 to make
    never-clicked pairs non-relevant. ``clicks=None`` counts one click per row.
    """
    query_ids = torch.as_tensor(query_ids).reshape(-1)
    image_ids = torch.as_tensor(image_ids).reshape(-1)
    n = query_ids.numel()
    if image_ids.numel() != n:
        raise ValueError(f"{n} query ids but {image_ids.numel()} image ids")
    clicks = torch.ones(n, dtype=torch.float64) if clicks is None else torch.as_tensor(clicks).reshape(-1)
    if clicks.numel() != n:
        raise ValueError(f"{clicks.numel()} click counts for {n} rows")
    clicks = clicks.to(device=query_ids.device, dtype=torch.float64)
    if not bool(torch.isfinite(clicks).all()) or bool((clicks < 0).any()):
        raise ValueError("clicks must be finite and >= 0")
    q_of_row, query_first = _first_occurrence(query_ids)
    i_of_row, image_first = _first_occurrence(image_ids.to(query_ids.device))
    num_images = image_first.numel()
    pair_key, row_to_pair = torch.unique(q_of_row * num_images + i_of_row, return_inverse=True)
    total = torch.zeros(pair_key.numel(), dtype=torch.float64, device=clicks.device)
    total.index_add_(0, row_to_pair, clicks)
    gains = torch.log2(1.0 + total.clamp(min=min_clicks))
    return pair_key // num_images, pair_key % num_images, query_first, image_first, gains


def _first_occurrence(ids: Tensor) -> Tuple[Tensor, Tensor]:
    """(distinct index of each row, first row of each distinct id), distinct ids in first-occurrence order."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, rows, reduce="amin")
    order = torch.argsort(first)
    remap = torch.empty_like(order)
    remap[order] = torch.arange(order.numel(), device=ids.device)
    return remap[inverse], first[order]


@torch.no_grad()
def pair_retrieval_metrics(text_emb: Tensor, image_emb: Tensor, pairs_q: Tensor, pairs_i: Tensor,
                           gains: Optional[Tensor] = None, ks: Sequence[int] = (1, 5, 10),
                           chunk_size: Optional[int] = None,
                           memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> Dict[str, float]:
    """Both directions of retrieval over distinct queries [Q, D] and distinct images [I, D].

    ``(pairs_q[j], pairs_i[j])`` are distinct click pairs (see ``build_pairs``) with graded
    relevance ``gains[j]`` (default 1). Returns ``search_metrics`` text->image with keys prefixed
    ``t2i_`` and image->text (relevance transposed) prefixed ``i2t_``, each in [0, 1], and
    ``rsum`` = sum over both directions of hit@k for k in ``ks``, in PERCENT.
    """
    pairs_q = torch.as_tensor(pairs_q).reshape(-1)
    pairs_i = torch.as_tensor(pairs_i).reshape(-1)
    if gains is None:
        gains = torch.ones(pairs_q.numel(), dtype=torch.float64)
    gains = torch.as_tensor(gains).reshape(-1)
    out: Dict[str, float] = {}
    t2i = search_metrics(text_emb, image_emb, (pairs_q, pairs_i, gains), ks, chunk_size, memory_budget_bytes)
    i2t = search_metrics(image_emb, text_emb, (pairs_i, pairs_q, gains), ks, chunk_size, memory_budget_bytes)
    out.update({f"t2i_{k}": v for k, v in t2i.items()})
    out.update({f"i2t_{k}": v for k, v in i2t.items()})
    out["rsum"] = 100.0 * sum(m[f"hit@{k}"] for m in (t2i, i2t) for k in ks)
    return out
