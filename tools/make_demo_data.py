#!/usr/bin/env python
"""Write a small, learnable synthetic click log with its images, then build its shards.

    python tools/make_demo_data.py --out data/demo [--seed 0] [--image-size 64]
                                   [--images-per-concept 24] [--format tsv|jsonl] [--overwrite]

Concepts: 8 colours x 6 shapes (circle, square, triangle, star, cross, ring). Each concept has
--images-per-concept distinct images (shape of varied size, position and small rotation, on a
light or dark background with mild noise). Each concept has 10 queries, 5 English ("red circle",
"a red circle", "circle in red", "red colored circle", "picture of a red circle") and 5 Chinese
("红色圆形", "红色的圆", "一个红色的圆形", "红圆", "红色圆形图片"); each query is clicked on a random
third to two thirds of its concept's images (8-16 of 24) with 1-20 clicks and impressions >= clicks,
so an image is clicked by several queries, as in real logs. Planted on top, so that the build report
shows every path: repeated rows (some with other case/spacing of the query) to be aggregated, rows
with 0 clicks (filtered), byte copies of images under other names (duplicate images), a too small
and a too elongated image (filtered), a too long query, and a handful of malformed rows (missing
field, bad number, missing image file, undecodable image, wrong column count, bad UTF-8).

Output:
    OUT/raw/clicklog.tsv (or .jsonl)   columns query, image, clicks, impressions, timestamp
    OUT/raw/images/*.jpg
    OUT/shards/train/shard-*.tar, sizes.json;  OUT/shards/val/...;  OUT/shards/report.json
The shards are built by tools/build_shards.py with --val-fraction 0.1 --shard-size 500.
Everything is deterministic from --seed; a re-run reuses finished shards.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from pretrain.data.build import BuildError, BuildOptions, build, format_summary

# (English, Chinese, Chinese one-character form, RGB)
COLOURS = [
    ("red", "红色", "红", (220, 30, 30)),
    ("orange", "橙色", "橙", (245, 135, 20)),
    ("yellow", "黄色", "黄", (245, 215, 25)),
    ("green", "绿色", "绿", (35, 165, 55)),
    ("cyan", "青色", "青", (20, 195, 205)),
    ("blue", "蓝色", "蓝", (35, 70, 215)),
    ("purple", "紫色", "紫", (135, 50, 185)),
    ("pink", "粉色", "粉", (245, 125, 185)),
]
# (English, Chinese, Chinese short form)
SHAPES = [
    ("circle", "圆形", "圆"),
    ("square", "正方形", "方块"),
    ("triangle", "三角形", "三角"),
    ("star", "五角星", "星星"),
    ("cross", "十字形", "十字"),
    ("ring", "圆环", "环"),
]


def queries_for(colour, shape):
    en, zh, zh1, _ = colour
    sen, szh, szh1 = shape
    article = "an" if en[0] in "aeiou" else "a"
    return [
        f"{en} {sen}", f"{article} {en} {sen}", f"{sen} in {en}", f"{en} colored {sen}",
        f"picture of {article} {en} {sen}",
        f"{zh}{szh}", f"{zh}的{szh1}", f"一个{zh}的{szh}", f"{zh1}{szh1}", f"{zh}{szh}图片",
    ]


def _polygon(cx, cy, radii, angle_deg, n):
    pts = []
    for k in range(n):
        a = math.radians(angle_deg - 90 + 360.0 * k / n)
        r = radii[k % len(radii)]
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def draw_image(rng, np_rng, colour, shape, size):
    """One 'size' x 'size' RGB picture of a coloured shape (drawn at 2x, then downsampled)."""
    s = 2 * size
    dark = rng.random() < 0.4
    base = rng.randint(25, 80) if dark else rng.randint(185, 245)
    bg = tuple(max(0, min(255, base + rng.randint(-12, 12))) for _ in range(3))
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    col = tuple(max(0, min(255, c + rng.randint(-14, 14))) for c in colour[3])
    r = rng.uniform(0.2, 0.36) * s
    cx = rng.uniform(r + 0.04 * s, s - r - 0.04 * s)
    cy = rng.uniform(r + 0.04 * s, s - r - 0.04 * s)
    rot = rng.uniform(-20, 20)
    name = shape[0]
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=col, width=max(2, int(r * 0.38)))
    elif name == "square":
        d.polygon(_polygon(cx, cy, [r * 0.95], rot + 45, 4), fill=col)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy + r * 0.15, [r * 1.1], rot, 3), fill=col)
    elif name == "star":
        d.polygon(_polygon(cx, cy, [r * 1.1, r * 0.45], rot, 10), fill=col)
    elif name == "cross":
        w = r * 0.34
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
               (-r, -w), (-w, -w)]
        a = math.radians(rot)
        d.polygon([(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a))
                   for x, y in pts], fill=col)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32)
    arr += np_rng.normal(0.0, 6.0, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _noise_image(np_rng, w, h):
    return Image.fromarray(np_rng.integers(60, 200, (h, w, 3), dtype=np.uint8))


def generate(out, seed=0, image_size=64, images_per_concept=24, fmt="tsv"):
    """Write OUT/raw; returns (log path, planted counts)."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    raw = os.path.join(out, "raw")
    img_dir = os.path.join(raw, "images")
    if os.path.isdir(img_dir):
        shutil.rmtree(img_dir)
    os.makedirs(img_dir)
    concepts = []
    for colour in COLOURS:
        for shape in SHAPES:
            names = []
            for k in range(images_per_concept):
                name = f"{colour[0]}_{shape[0]}_{k:02d}.jpg"
                draw_image(rng, np_rng, colour, shape, image_size).save(os.path.join(img_dir, name), quality=90)
                names.append("images/" + name)
            concepts.append((colour, shape, queries_for(colour, shape), names))

    rows = []          # (query, image, clicks, impressions)
    paired = set()
    planted = {"pairs": 0, "duplicate_rows": 0, "zero_click_rows": 0, "copied_images": 0}
    n = images_per_concept
    lo, hi = max(1, n // 3), max(1, (2 * n) // 3)
    for colour, shape, queries, names in concepts:
        for q in queries:
            for name in rng.sample(names, rng.randint(lo, hi)):
                clicks = rng.randint(1, 20)
                rows.append((q, name, str(clicks), str(clicks + rng.randint(0, 40))))
                paired.add((q, name))
                planted["pairs"] += 1
    # repeated rows of the same pair (some with another spelling of the same normalised query)
    base_rows = list(rows)
    for q, name, _, _ in rng.sample(base_rows, max(1, len(base_rows) // 25)):
        if q.isascii() and rng.random() < 0.5:
            q = rng.choice([q.title(), q.upper(), "  " + q.replace(" ", "  ") + " "])
        clicks = rng.randint(1, 5)
        rows.append((q, name, str(clicks), str(clicks + rng.randint(0, 10))))
        planted["duplicate_rows"] += 1
    # shown but never clicked: filtered by --min-clicks 1
    for colour, shape, queries, names in rng.sample(concepts, min(len(concepts), 40)):
        q = rng.choice(queries)
        free = [nm for nm in names if (q, nm) not in paired]
        if free:
            nm = rng.choice(free)
            paired.add((q, nm))
            rows.append((q, nm, "0", str(rng.randint(1, 12))))
            planted["zero_click_rows"] += 1
    # the same image bytes under another name: one image, one image_id
    for i, (colour, shape, queries, names) in enumerate(rng.sample(concepts, min(len(concepts), 10))):
        src = rng.choice(names)
        copy = f"images/copy_{i:02d}.jpg"
        shutil.copyfile(os.path.join(raw, src), os.path.join(raw, copy))
        q = rng.choice(queries)
        rows.append((q, copy, str(rng.randint(1, 10)), str(rng.randint(10, 30))))
        planted["copied_images"] += 1
    # images the builder filters out, a too long query
    _noise_image(np_rng, 20, 20).save(os.path.join(img_dir, "tiny.jpg"))
    _noise_image(np_rng, 256, 48).save(os.path.join(img_dir, "banner.jpg"))
    rows.append(("red circle", "images/tiny.jpg", "3", "9"))
    rows.append(("blue square", "images/banner.jpg", "2", "7"))
    rows.append(("red circle " * 15, concepts[0][3][0], "2", "5"))
    # malformed rows
    with open(os.path.join(img_dir, "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg " + bytes(np_rng.integers(0, 256, 64, dtype=np.uint8)))
    bad = [
        ("", concepts[1][3][0], "3", "5"),                     # missing_field
        ("green star", "", "3", "5"),                          # missing_field
        ("blue ring", concepts[2][3][1], "many", "5"),         # bad_number
        ("pink cross", concepts[3][3][1], "-3", "5"),          # bad_number
        ("yellow triangle", "images/no_such_file.jpg", "3", "5"),  # unreadable_image
        ("purple circle", "images/lost_image.jpg", "1", "2"),      # unreadable_image
        ("cyan square", "images/corrupt.jpg", "4", "9"),           # undecodable_image
    ]
    rows.extend(bad)
    rng.shuffle(rows)
    t0 = 1_700_000_000
    lines = []
    for i, (q, name, clicks, imps) in enumerate(rows):
        ts = t0 + i * 7 + rng.randint(0, 6)
        if fmt == "jsonl":
            lines.append(json.dumps({"query": q, "image": name, "clicks": clicks, "impressions": imps,
                                     "timestamp": ts}, ensure_ascii=False).encode("utf-8"))
        else:
            lines.append("\t".join([q, name, clicks, imps, str(ts)]).encode("utf-8"))
    # two rows the parser rejects, at fixed places
    if fmt == "jsonl":
        lines.insert(len(lines) // 3, b'{"query": "red star", "image": ')              # malformed_json
    else:
        lines.insert(len(lines) // 3, "red star\timages/x.jpg\t3".encode("utf-8"))     # wrong_column_count
    lines.insert(2 * len(lines) // 3, b"bad \xff\xfe bytes\timages/x.jpg\t3\t5\t1700000000")  # bad_encoding
    path = os.path.join(raw, "clicklog." + fmt)
    with open(path, "wb") as f:
        if fmt == "tsv":
            f.write(b"query\timage\tclicks\timpressions\ttimestamp\n")
        f.write(b"\n".join(lines) + b"\n")
    planted["rows"] = len(lines)
    planted["images"] = len(concepts) * images_per_concept
    return path, planted


def parser():
    ap = argparse.ArgumentParser(prog="make_demo_data.py", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (raw/ and shards/ go inside)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--images-per-concept", type=int, default=24)
    ap.add_argument("--format", choices=["tsv", "jsonl"], default="tsv")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--overwrite", action="store_true", help="rebuild the shards from scratch")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    t0 = time.time()
    log, planted = generate(args.out, args.seed, args.image_size, args.images_per_concept, args.format)
    t_gen = time.time() - t0
    print(f"[make_demo_data] wrote {log}: {planted['rows']} rows, {planted['images']} concept images "
          f"({len(COLOURS)} colours x {len(SHAPES)} shapes), {t_gen:.1f} s")
    shards = os.path.join(args.out, "shards")
    options = BuildOptions(inputs=[log], out=shards, val_fraction=args.val_fraction, shard_size=args.shard_size,
                           seed=args.seed, workers=args.workers, overwrite=args.overwrite,
                           progress=not args.no_progress)
    try:
        report = build(options)
    except BuildError as e:
        print(f"error: building the shards failed: {e}", file=sys.stderr)
        return 2
    print(format_summary(report))
    if report["run"]["shards_failed"]:
        print("error: building the shards failed (see report.json); run again to retry", file=sys.stderr)
        return 1
    for split in ("train", "val"):
        w = report["written"].get(split)
        if w:
            print(f"[make_demo_data] {split}: {w['samples']} samples in {w['shards']} shards -> "
                  f"{os.path.join(shards, split)}")
    print(f"[make_demo_data] done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
