#!/usr/bin/env python
"""Build a small Karpathy-format retrieval set from the demo click log: images with their clicked queries as captions.

    python tools/make_vse_demo.py --demo data/demo --out data/vse_demo [--captions 5] [--val 60 --test 60] [--seed 0]

Reads ``DEMO/raw/clicklog.{tsv,csv,jsonl}`` (columns ``query``, ``image`` relative to ``DEMO/raw``,
optionally ``clicks``) and the images it names. Rows that are malformed, have 0 clicks, or name a missing or
undecodable image are skipped (counted); byte-identical copies of an image are merged into the first one.
Each image gets its most clicked distinct queries as captions (up to ``--captions``).

Evaluation splits must be well posed: within ``val`` and within ``test`` no caption text belongs to two
images (click logs repeat a query over many images; identical captions of different images would make
the ranking a tie). Images are drawn in a seeded random order and added to a split only when none of
their captions is already used there, up to ``--val`` / ``--test`` images; everything else is ``train``.

Writes ``OUT/dataset.json`` (Karpathy format: ``images[].filepath = "images"``, ``filename``, ``split``,
``imgid``, ``sentences[].raw``/``tokens``; images root = OUT) and copies the images to ``OUT/images/``.
"""
from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import json
import os
import random
import shutil
import sys
from typing import Dict, List, Tuple



def find_click_log(raw_dir: str) -> str:
    for name in ("clicklog.tsv", "clicklog.jsonl", "clicklog.csv"):
        if os.path.isfile(os.path.join(raw_dir, name)):
            return os.path.join(raw_dir, name)
    raise FileNotFoundError(f"no click log (clicklog.tsv / .jsonl / .csv) in {raw_dir}: "
                            f"write the demo data first (python tools/make_demo_data.py --out DEMO)")


def read_rows(path: str, skipped: collections.Counter) -> List[Tuple[str, str, float]]:
    """(query, image reference, clicks) of the well-formed rows; the others are counted in ``skipped``."""
    rows = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if path.endswith(".jsonl"):
            records = []
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    skipped["malformed row"] += 1
        else:
            records = list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",",
                                          quoting=csv.QUOTE_NONE if path.endswith(".tsv") else csv.QUOTE_MINIMAL))
    for r in records:
        if not isinstance(r, dict) or not isinstance(r.get("query"), str) or not isinstance(r.get("image"), str):
            skipped["malformed row"] += 1
            continue
        try:
            clicks = float(r.get("clicks", 1) if r.get("clicks") not in (None, "") else 1)
        except (TypeError, ValueError):
            skipped["malformed row"] += 1
            continue
        query = " ".join(r["query"].split())
        if not query or not r["image"].strip():
            skipped["malformed row"] += 1
        elif clicks <= 0:
            skipped["no clicks"] += 1
        else:
            rows.append((query, r["image"].strip(), clicks))
    return rows


def check_image(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
            w, h = im.size
            return min(w, h) >= 8 and max(w, h) <= 4 * min(w, h)   # no icons, no banners
    except Exception:  # noqa: BLE001 - Pillow raises many kinds on bad files
        return False


def build(demo: str, out: str, captions: int, n_val: int, n_test: int, seed: int) -> Dict[str, int]:
    from pretrain.vocab import words_of

    raw_dir = os.path.join(demo, "raw")
    log_path = find_click_log(raw_dir)
    skipped: collections.Counter = collections.Counter()
    rows = read_rows(log_path, skipped)
    # clicks per (image, query): the query text as written (case and spaces normalised for the merge)
    clicks: Dict[str, Dict[str, float]] = collections.defaultdict(dict)
    shown: Dict[str, str] = {}
    canonical: Dict[str, str] = {}     # image path -> first path with the same bytes
    by_hash: Dict[str, str] = {}
    usable: Dict[str, bool] = {}
    for query, ref, c in rows:
        path = os.path.normpath(os.path.join(raw_dir, ref))
        if path not in usable:
            usable[path] = os.path.isfile(path) and check_image(path)
            if usable[path]:
                with open(path, "rb") as f:
                    digest = hashlib.sha1(f.read()).hexdigest()
                canonical[path] = by_hash.setdefault(digest, path)
        if not usable[path]:
            skipped["missing or undecodable image"] += 1
            continue
        key = query.lower()
        shown.setdefault(key, query)
        target = clicks[canonical[path]]
        target[key] = target.get(key, 0.0) + c
    images = []
    for path in sorted(clicks):
        ranked = sorted(clicks[path].items(), key=lambda kv: (-kv[1], kv[0]))[:captions]
        images.append((path, [shown[q] for q, _ in ranked]))
    if not images:
        raise ValueError(f"{log_path}: no usable (query, image) row")

    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    split = ["train"] * len(images)
    for name, target in (("test", n_test), ("val", n_val)):
        used: set = set()
        taken = 0
        for i in order:
            if taken >= target:
                break
            caps = {c.lower() for c in images[i][1]}
            if split[i] != "train" or caps & used:
                continue
            split[i] = name
            used |= caps
            taken += 1

    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    entries, names = [], set()
    sentid = 0
    for imgid, ((path, caps), sp) in enumerate(zip(images, split)):
        name = os.path.basename(path)
        if name in names:
            name = f"{imgid:05d}_{name}"
        names.add(name)
        shutil.copyfile(path, os.path.join(out, "images", name))
        sentences = []
        for c in caps:
            sentences.append({"raw": c, "tokens": words_of(c), "imgid": imgid, "sentid": sentid})
            sentid += 1
        entries.append({"filepath": "images", "filename": name, "split": sp, "imgid": imgid,
                        "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    with open(os.path.join(out, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump({"dataset": "vse_demo", "source": os.path.abspath(log_path), "images": entries}, f,
                  ensure_ascii=False)
    counts = collections.Counter(split)
    stats = {"images": len(images), "captions": sentid, **{f"{k}_images": v for k, v in sorted(counts.items())},
             **{f"skipped_rows ({k})": v for k, v in skipped.items()}}
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="data/demo", help="demo data folder (holds raw/clicklog.* and raw/images/)")
    p.add_argument("--out", default="data/vse_demo", help="output folder (dataset.json, images/)")
    p.add_argument("--captions", type=int, default=5, help="captions per image: its most clicked queries")
    p.add_argument("--val", type=int, default=60, help="validation images (at most; captions unique within the split)")
    p.add_argument("--test", type=int, default=60, help="test images (at most; captions unique within the split)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.captions < 1 or args.val < 1 or args.test < 1:
        print("error: --captions, --val and --test must be >= 1", file=sys.stderr)
        return 2
    try:
        stats = build(args.demo, args.out, args.captions, args.val, args.test, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[make_vse_demo] {os.path.join(args.out, 'dataset.json')}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
