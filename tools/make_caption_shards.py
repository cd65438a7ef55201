#!/usr/bin/env python
"""Shards of real photos with human captions (Flickr8k/Flickr30k/COCO style) for the learning benchmark.

Each caption becomes a <query, image> pair (one click); the images are split, not the captions: the
``--val-images`` held-out photos keep all their captions, and no held-out photo is seen in training.

    python tools/make_caption_shards.py --images DIR --captions captions.txt --out data/flickr \
        [--val-images 200] [--max-images 1000] [--seed 0]

Caption files understood (by content):
  * CSV with a header ``image,caption`` (Kaggle's Flickr8k ``captions.txt``);
  * Flickr8k/30k token files, one ``IMAGE#N<TAB>caption`` per line (``Flickr8k.token.txt``);
  * COCO caption JSON (``captions_train2017.json``: ``images`` with ``file_name`` and ``annotations``).
Only captions whose image file exists under ``--images`` are used. Writes ``OUT/train.tsv``, ``OUT/val.tsv``
and builds ``OUT/shards/train`` and ``OUT/shards/val`` with tools/build_shards.py.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("give a CSV with the header 'image,caption', 'IMAGE#N<TAB>caption' lines (Flickr8k.token.txt) or a "
           "COCO captions JSON ('images' with 'id' and 'file_name', 'annotations' with 'image_id' and 'caption')")


def read_captions(path: str) -> Dict[str, List[str]]:
    """image file name -> its captions, in file order."""
    out: Dict[str, List[str]] = {}
    with open(path, encoding="utf-8") as f:
        head = f.read(4096)
    if head.lstrip().startswith("{"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        names = {im["id"]: im["file_name"] for im in data.get("images", [])}
        for ann in data.get("annotations", []):
            if ann.get("image_id") in names:
                out.setdefault(names[ann["image_id"]], []).append(ann["caption"])
        return out
    with open(path, encoding="utf-8", newline="") as f:
        if head.lower().startswith("image,caption"):
            for row in csv.DictReader(f):
                out.setdefault(row["image"].strip(), []).append(row["caption"])
        else:
            for line in f:
                if "\t" in line:
                    key, cap = line.rstrip("\n").split("\t", 1)
                    out.setdefault(key.split("#")[0].strip(), []).append(cap)
    return out


def held_out(name: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of the photos")
    p.add_argument("--captions", required=True, help="caption file (CSV image,caption; token file; COCO JSON)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val-images", type=int, default=200, help="photos held out for evaluation")
    p.add_argument("--max-images", type=int, default=0, help="use at most this many photos (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the photo split")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    for path, what in ((args.images, "--images"), (args.captions, "--captions")):
        if not os.path.exists(path):
            print(f"error: {what} {path} does not exist", file=sys.stderr)
            return 2
    if not os.path.isdir(args.images) or not os.path.isfile(args.captions):
        print(f"error: --images must be a folder and --captions a file (got {args.images}, {args.captions})",
              file=sys.stderr)
        return 2
    if args.val_images < 1 or args.max_images < 0 or args.workers < 1:
        print(f"error: --val-images and --workers must be >= 1 and --max-images >= 0 (got {args.val_images}, "
              f"{args.workers}, {args.max_images})", file=sys.stderr)
        return 2
    try:
        caps = read_captions(args.captions)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as e:
        print(f"error: cannot read captions from {args.captions} ({type(e).__name__}: {e}): {FORMATS}", file=sys.stderr)
        return 2
    if not caps:
        print(f"error: no captions recognised in {args.captions}: {FORMATS}", file=sys.stderr)
        return 2
    names = sorted(n for n in caps if os.path.isfile(os.path.join(args.images, n)))
    missing = sorted(set(caps) - set(names))
    if missing:  # said, not silently dropped: a wrong --images folder shows here first
        print(f"warning: {sum(len(caps[n]) for n in missing)} captions of {len(missing)} photos that are not under "
              f"{args.images} are skipped (e.g. {', '.join(missing[:3])})", file=sys.stderr)
    names.sort(key=lambda n: held_out(n, args.seed))          # a seeded order, stable under added files
    if args.max_images:
        names = names[:args.max_images]
    if len(names) <= args.val_images:
        print(f"error: {len(names)} photos of {args.captions} exist under {args.images}; need more than "
              f"--val-images {args.val_images}", file=sys.stderr)
        return 2
    split = {"val": names[:args.val_images], "train": names[args.val_images:]}
    os.makedirs(args.out, exist_ok=True)
    images_root = os.path.abspath(args.images)
    for part, files in split.items():
        tsv = os.path.join(args.out, f"{part}.tsv")
        with open(tsv, "w", encoding="utf-8") as f:
            f.write("query\timage\n")
            for n in sorted(files):
                for c in caps[n]:
                    c = " ".join(c.replace("\t", " ").split())
                    if c:
                        f.write(f"{c}\t{n}\n")
        cmd = [sys.executable, os.path.join(ROOT, "tools", "build_shards.py"), tsv, "--out",
               os.path.join(args.out, "shards", part), "--images-root", images_root, "--max-query-len", "0",
               "--min-image-side", "16", "--shard-size", "2000", "--workers", str(args.workers), "--overwrite",
               "--no-progress", "--quiet"]
        r = subprocess.run(cmd)
        if r.returncode:
            return r.returncode
        print(f"{part}: {len(files)} photos, {sum(len(caps[n]) for n in files)} captions -> "
              f"{os.path.join(args.out, 'shards', part)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
