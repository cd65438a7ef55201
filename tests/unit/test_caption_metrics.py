"""The metrics wrapper gives pycocoevalcap's numbers (COCO tokenisation) and never crashes on missing tools."""
import pytest

from pretrain.caption import metrics as M

pytest.importorskip("pycocoevalcap")

REFS = {"1": ["A red circle and a blue square.", "A blue square next to a red circle!",
              "There's a red circle, left of a blue square."],
        "2": ["Two dogs play in the park.", "A couple of dogs running on grass.", "Dogs (two) playing outside."],
        "3": ["A man rides a bike down the street.", "Someone on a bicycle.", "A cyclist in the city."]}
HYPS = {"1": "a red circle and a square", "2": "two dogs playing on the grass", "3": "a man riding a bike"}

needs_java = pytest.mark.skipif(not M.java_available(), reason="Java is needed by the PTB tokenizer and METEOR")


@needs_java
def test_numbers_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours, unavailable = M.evaluate_captions(REFS, HYPS, ("BLEU", "METEOR", "ROUGE_L", "CIDEr"))
    # reference: the COCO caption evaluation's own steps (pycocoevalcap/eval.py)
    both = PTBTokenizer().tokenize({**{f"r{k}": [{"caption": c} for c in v] for k, v in REFS.items()},
                                    **{f"h{k}": [{"caption": h}] for k, h in HYPS.items()}})
    gts = {k: both[f"r{k}"] for k in REFS}
    res = {k: both[f"h{k}"] for k in HYPS}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    want = {"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3],
            "METEOR": meteor.compute_score(gts, res)[0], "ROUGE-L": Rouge().compute_score(gts, res)[0],
            "CIDEr-D": Cider().compute_score(gts, res)[0]}
    del meteor
    assert not unavailable
    assert set(ours) == set(want)
    for k, v in want.items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k
    assert 0 < ours["CIDEr-D"] and 0 < ours["METEOR"] < 1


@needs_java
def test_ptb_tokenisation_and_empty_captions():
    out = M.tokenize({"a": ["A red circle, and a BLUE square.", "", "Don't stop!"], "b": [""]})
    assert out == {"a": ["a red circle and a blue square", "", "do n't stop"], "b": [""]}


def test_spice_reported_unavailable_not_fatal(monkeypatch):
    monkeypatch.setattr(M, "spice_missing_reason", lambda: "no CoreNLP here (test)")
    gts = {"1": ["a red circle"], "2": ["a blue square"]}
    res = {"1": ["a red circle"], "2": ["a square"]}
    scores, unavailable = M.score_tokenized(gts, res, ("CIDEr", "SPICE"))
    assert scores["SPICE"] is None and "CoreNLP" in unavailable["SPICE"]
    assert scores["CIDEr-D"] > 0


def test_without_java_meteor_is_unavailable_and_tokenisation_falls_back(monkeypatch):
    monkeypatch.setattr(M, "java_available", lambda: False)
    scores, unavailable = M.evaluate_captions(REFS, HYPS, ("BLEU", "METEOR", "CIDEr", "SPICE"))
    assert scores["METEOR"] is None and "Java" in unavailable["METEOR"]
    assert scores["SPICE"] is None and "Java" in unavailable["SPICE"]
    assert scores["CIDEr-D"] > 0 and scores["BLEU-1"] > 0
    assert M.tokenize({"x": ["There's a red circle, left of a (blue) square."]}, "ptb") == {
        "x": ["there 's a red circle left of a blue square"]}


def test_cjk_split_before_tokenising(monkeypatch):
    monkeypatch.setattr(M, "java_available", lambda: False)
    assert M.tokenize({"x": ["红色的圆形和blue square"]}, "cjk") == {"x": ["红 色 的 圆 形 和 blue square"]}
