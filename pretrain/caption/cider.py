"""CIDEr-D (Vedantam et al. 2015), computed exactly as the COCO caption evaluation computes it.

pycocoevalcap's scorer named "CIDEr" is CIDEr-D: tf-idf n-gram vectors (n = 1..4) with idf from the
reference corpus, clipped hypothesis counts, a Gaussian length penalty (sigma 6) and a factor 10. This
implementation gives the same numbers on the same tokenised input, and can take its document frequencies
from another corpus (the training references) and cache reference vectors: that is the fast SCST reward.

Inputs are tokenised strings (words joined by single spaces); any token sequence works, e.g. ids.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

Ngram = Tuple[str, ...]


def ngram_counts(sentence: str, n: int = 4) -> Dict[Ngram, int]:
    words = sentence.split()
    counts: Dict[Ngram, int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D with document frequencies from ``corpus_refs`` (one list of reference strings per image)."""

    def __init__(self, corpus_refs: Iterable[Sequence[str]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.df: Dict[Ngram, float] = defaultdict(float)
        num_docs = 0
        for refs in corpus_refs:
            num_docs += 1
            for ngram in {g for r in refs for g in ngram_counts(r, n)}:
                self.df[ngram] += 1
        if num_docs == 0:
            raise ValueError("CIDEr-D needs at least one image with references")
        self.log_num_docs = math.log(float(num_docs))
        self._ref_cache: Dict[Tuple[str, ...], list] = {}

    def _vector(self, counts: Dict[Ngram, int]):
        """tf-idf weights per n-gram order, their norms, and the length (as COCO: the number of bigrams)."""
        vec: List[Dict[Ngram, float]] = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            w = float(tf) * (self.log_num_docs - math.log(max(1.0, self.df.get(ngram, 0.0))))
            vec[k][ngram] = w
            norm[k] += w * w
            if k == 1:  # pycocoevalcap counts bigrams here; only the difference of lengths is used
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _refs(self, refs: Sequence[str]) -> list:
        key = tuple(refs)
        hit = self._ref_cache.get(key)
        if hit is None:
            hit = [self._vector(ngram_counts(r, self.n)) for r in refs]
            if len(self._ref_cache) < 200_000:
                self._ref_cache[key] = hit
        return hit

    def score_one(self, hyp: str, refs: Sequence[str]) -> float:
        vh, nh, lh = self._vector(ngram_counts(hyp, self.n))
        total = np.zeros(self.n)
        for vr, nr, lr in self._refs(refs):
            delta = float(lh - lr)
            penalty = math.e ** (-(delta ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                val = 0.0
                ref_k = vr[k]
                for ngram, w in vh[k].items():
                    r = ref_k.get(ngram, 0.0)
                    val += min(w, r) * r
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        return float(np.mean(total) / len(refs) * 10.0)

    def scores(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        """Per-caption CIDEr-D of ``hyps[i]`` against ``refs[i]``."""
        return np.array([self.score_one(h, r) for h, r in zip(hyps, refs)], dtype=np.float64)


def cider_d(gts: Dict[str, List[str]], res: Dict[str, str]) -> Tuple[float, np.ndarray]:
    """Corpus CIDEr-D as pycocoevalcap computes it: idf from the references of the evaluated images.
    Returns (mean, per-image scores in the order of ``gts``)."""
    if set(gts) != set(res):
        raise ValueError("cider_d: references and candidates must have the same keys")
    keys = list(gts)
    scorer = CiderD([gts[k] for k in keys])
    per = scorer.scores([res[k] for k in keys], [gts[k] for k in keys])
    return float(per.mean()), per
