"""Our CIDEr-D (the SCST reward) against pycocoevalcap's "CIDEr" scorer, which is CIDEr-D."""
import random

import numpy as np
import pytest

from pretrain.caption.cider import CiderD, cider_d
from pretrain.caption.scst import CiderReward

pytest.importorskip("pycocoevalcap")
from pycocoevalcap.cider.cider import Cider  # noqa: E402

WORDS = "a an the red blue green circle square star and next to left of right big small".split()


def random_corpus(seed, n_images=40):
    rng = random.Random(seed)
    gts = {f"img{i}": [" ".join(rng.choices(WORDS, k=rng.randint(1, 10))) for _ in range(rng.randint(1, 6))]
           for i in range(n_images)}
    res = {k: " ".join(rng.choices(WORDS, k=rng.randint(0, 11))) for k in gts}
    return gts, res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corpus_cider_d_equals_pycocoevalcap(seed):
    gts, res = random_corpus(seed)
    res["img0"] = gts["img0"][0]            # an exact match
    res["img1"] = ""                          # an empty caption
    ours, per = cider_d(gts, res)
    theirs, their_per = Cider().compute_score(gts, {k: [v] for k, v in res.items()})
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(per, their_per, rtol=1e-12, atol=1e-12)
    assert ours > 0


def test_document_frequencies_from_another_corpus():
    """With idf from a training corpus, a score equals pycocoevalcap run on that corpus with the same refs."""
    train, _ = random_corpus(5, n_images=30)
    scorer = CiderD(list(train.values()))
    rng = random.Random(7)
    for key in list(train)[:10]:
        hyp = " ".join(rng.choices(WORDS, k=6))
        # reference: pycocoevalcap on the training corpus, our hypothesis placed on this image, the others'
        # hypotheses arbitrary (they do not change the idf, which comes from the references only)
        res = {k: [hyp if k == key else "a"] for k in train}
        _, per = Cider().compute_score(train, res)
        assert scorer.score_one(hyp, train[key]) == pytest.approx(per[list(train).index(key)], rel=1e-12)


def test_reward_on_token_ids_equals_words():
    train, _ = random_corpus(3, n_images=20)
    vocab = {w: i + 4 for i, w in enumerate(WORDS)}
    refs_ids = [[[vocab[w] for w in r.split()] for r in refs] for refs in train.values()]
    reward = CiderReward(refs_ids)
    words_scorer = CiderD(list(train.values()))
    hyps = [["red", "circle", "and", "a", "star"], ["the", "big"], ["left"]]
    ids = [[vocab[w] for w in h] for h in hyps]
    got = reward([0, 0, 1], ids, per_unit=1)
    refs = list(train.values())
    want = [words_scorer.score_one(" ".join(h), refs[u]) for h, u in zip(hyps, [0, 0, 1])]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # per_unit: consecutive captions belong to the same unit
    np.testing.assert_allclose(reward([0, 1], ids[:2] + [ids[0], ids[1]], per_unit=2),
                               [words_scorer.score_one(" ".join(hyps[0]), refs[0]),
                                words_scorer.score_one(" ".join(hyps[1]), refs[0]),
                                words_scorer.score_one(" ".join(hyps[0]), refs[1]),
                                words_scorer.score_one(" ".join(hyps[1]), refs[1])], rtol=1e-12)


def test_a_reference_scores_higher_than_noise():
    gts = {"a": ["a red circle and a blue square", "a blue square next to a red circle"],
           "b": ["a green star and a white cross", "a white cross next to a green star"],
           "c": ["a black diamond and a red circle", "a red circle next to a black diamond"]}
    good, _ = cider_d(gts, {k: v[0] for k, v in gts.items()})
    bad, _ = cider_d(gts, {"a": "a white cross", "b": "a red circle", "c": "a blue square"})
    assert good > 3 * bad
