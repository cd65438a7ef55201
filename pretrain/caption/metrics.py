"""COCO caption metrics through pycocoevalcap, with the COCO tokenisation (Stanford PTB tokenizer).

``evaluate_captions(refs, hyps)`` gives BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE with exactly the numbers of
the COCO caption evaluation. What cannot run here is reported, never fatal:

- no Java: the PTB tokenizer is replaced by a Python approximation (warned: numbers may differ slightly from
  COCO's), METEOR and SPICE are reported unavailable;
- SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use: offline it is reported
  unavailable (install the jars in pycocoevalcap/spice/lib to enable it).
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

# what pycocoevalcap's PTBTokenizer drops after tokenising
PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                    "...", ";"}
DISPLAY = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4", "METEOR": "METEOR",
           "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr-D", "SPICE": "SPICE"}
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef])")


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def spice_missing_reason() -> Optional[str]:
    """None when SPICE can run; else why not (without trying to download anything)."""
    if not java_available():
        return "SPICE needs Java (not found)"
    try:
        from pycocoevalcap.spice import get_stanford_models as g
    except ImportError:
        return "pycocoevalcap is not installed"
    jar = os.path.join(os.path.dirname(g.__file__), g.SPICELIB, f"{g.JAR}.jar")
    if not os.path.exists(jar):
        return (f"SPICE needs Stanford CoreNLP ({jar}), which pycocoevalcap downloads on first use; "
                f"not present (offline?)")
    return None


def _python_ptb(sentence: str) -> List[str]:
    """Approximation of the PTB tokenizer + punctuation removal (lower case, split off punctuation)."""
    s = sentence.lower().replace("\n", " ")
    s = re.sub(r"([.,!?;:()\[\]{}\"`])", r" \1 ", s)
    s = re.sub(r"(\w)'(s|re|ve|ll|d|m)\b", r"\1 '\2", s)
    s = re.sub(r"n't\b", " n't", s)
    return [t for t in s.split() if t not in PTB_PUNCTUATIONS and t not in "()[]{}\""]


def tokenize(captions: Dict[str, List[str]], method: str = "ptb") -> Dict[str, List[str]]:
    """``{key: [caption, ...]}`` -> ``{key: [tokenised caption, ...]}`` as the COCO evaluation tokenises
    (``cjk``: CJK characters are split into words first)."""
    if method == "cjk":
        captions = {k: [_CJK.sub(r" \1 ", c) for c in v] for k, v in captions.items()}
    if not captions:
        return {}
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        # the tokenizer works line by line: empty captions would shift the lines, so they bypass it
        flat = [(k, i, c) for k, v in captions.items() for i, c in enumerate(v) if c.strip()]
        out = {k: [""] * len(v) for k, v in captions.items()}
        if flat:
            done = PTBTokenizer().tokenize({j: [{"caption": c}] for j, (_, _, c) in enumerate(flat)})
            for j, (k, i, _) in enumerate(flat):
                out[k][i] = done[j][0]
        return out
    _warn_no_java()
    return {k: [" ".join(_python_ptb(c)) for c in v] for k, v in captions.items()}


@functools.lru_cache(maxsize=1)
def _warn_no_java() -> None:
    log.warning("Java not found: captions are tokenised by a Python approximation of the PTB tokenizer; "
                "numbers may differ slightly from the COCO evaluation. METEOR and SPICE are unavailable.")


def score_tokenized(gts: Dict[str, List[str]], res: Dict[str, List[str]],
                    metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"),
                    ) -> Tuple[Dict[str, Optional[float]], Dict[str, str]]:
    """pycocoevalcap scorers on tokenised input (``res`` values: one-caption lists).
    Returns (scores by display name, {metric: why unavailable})."""
    scores, unavailable = score_many(gts, {"": res}, metrics)
    return scores[""], unavailable


def score_many(gts: Dict[str, List[str]], runs: Dict[str, Dict[str, List[str]]],
               metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"),
               ) -> Tuple[Dict[str, Dict[str, Optional[float]]], Dict[str, str]]:
    """``score_tokenized`` for several candidate sets against the same references (one METEOR process for all).
    Returns ({run: scores by display name}, {metric: why unavailable})."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: Dict[str, Dict[str, Optional[float]]] = {name: {} for name in runs}
    unavailable: Dict[str, str] = {}
    meteor = None
    if "METEOR" in metrics:
        if not java_available():
            unavailable["METEOR"] = "METEOR needs Java (not found)"
        else:
            try:
                from pycocoevalcap.meteor.meteor import Meteor
                meteor = Meteor()
            except Exception as e:  # a broken JVM must not end the run
                unavailable["METEOR"] = f"METEOR failed to start: {e}"
    spice_reason = spice_missing_reason() if "SPICE" in metrics else None
    try:
        for name, res in runs.items():
            out = scores[name]
            if "BLEU" in metrics:
                bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
                for i, b in enumerate(bleu):
                    out[f"BLEU-{i + 1}"] = float(b)
            if "METEOR" in metrics:
                out["METEOR"] = None
                if meteor is not None:
                    try:
                        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
                    except Exception as e:
                        unavailable["METEOR"] = f"METEOR failed: {e}"
            if "ROUGE_L" in metrics:
                out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
            if "CIDEr" in metrics:
                out["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
            if "SPICE" in metrics:
                out["SPICE"] = None
                if spice_reason is None:
                    try:
                        from pycocoevalcap.spice.spice import Spice
                        out["SPICE"] = float(Spice().compute_score(gts, res)[0])
                    except Exception as e:
                        spice_reason = f"SPICE failed: {e}"
                if spice_reason is not None:
                    unavailable["SPICE"] = spice_reason
    finally:
        if meteor is not None:
            _close_meteor(meteor)
    for name, why in unavailable.items():
        log.warning("%s unavailable: %s", name, why)
    return scores, unavailable


def _close_meteor(meteor) -> None:
    """Stop METEOR's JVM now (its __del__ would do it later, at an unknown time)."""
    with meteor.lock:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    meteor.__class__ = type("ClosedMeteor", (), {})  # __del__ must not close it twice


def evaluate_captions(refs: Dict[str, List[str]], hyps: Dict[str, str],
                      metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"),
                      method: str = "ptb", refs_tokenized: Optional[Dict[str, List[str]]] = None,
                      ) -> Tuple[Dict[str, Optional[float]], Dict[str, str]]:
    """COCO caption metrics of ``hyps`` (one caption per key) against ``refs`` (raw strings).
    ``refs_tokenized``: the references already passed through ``tokenize`` (saves a JVM start)."""
    if set(refs) != set(hyps):
        raise ValueError("evaluate_captions: references and candidates must have the same keys")
    if refs_tokenized is not None:
        gts = refs_tokenized
        res = tokenize({k: [h] for k, h in hyps.items()}, method)
    else:  # one tokenizer run (one JVM start) for references and candidates
        both = tokenize({**{("ref", k): v for k, v in refs.items()}, **{("hyp", k): [h] for k, h in hyps.items()}},
                        method)
        gts = {k: both[("ref", k)] for k in refs}
        res = {k: both[("hyp", k)] for k in hyps}
    return score_tokenized(gts, res, metrics)
