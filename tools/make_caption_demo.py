"""Build a small Karpathy-format captioning set of synthetic pictures (no download, a few seconds).

Each 64x64 picture holds two coloured shapes (8 colours x 6 shapes) of varied size and position on a
varied background; its five reference captions name both objects ("a red circle and a blue square",
"a blue square next to a red circle", "a red circle to the left of a blue square", ...).

    python tools/make_caption_demo.py --out data/caption_demo [--train 800 --val 100 --test 100 --seed 0]

Writes ``OUT/dataset.json`` (Karpathy split format) and ``OUT/images/*.png``. With ``--conditioned`` every
sentence also has a ``focus`` field (a condition text, for ``data.condition_field=focus``): ``both`` for the
five captions above, and ``left`` / ``right`` for two more captions per side that name only that object
("a red circle", "a red circle on the left").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from typing import List, Optional, Tuple

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 70, 230), "yellow": (240, 220, 30),
           "purple": (150, 40, 190), "orange": (255, 140, 0), "white": (250, 250, 250), "black": (10, 10, 10)}
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
SIZE = 64


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> List[Tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(rot + a), cy + r * math.sin(rot + a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + i * math.pi / 5 + rot
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.36 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(shape)


def draw_shape(draw, shape: str, colour: Tuple[int, int, int], cx: float, cy: float, r: float, rot: float) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        s = 0.8 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=colour)


def _place(rng: random.Random) -> Optional[List[Tuple[float, float, float]]]:
    """Two (cx, cy, r) that do not overlap and are clearly left/right of each other."""
    for _ in range(100):
        objs = []
        for _ in range(2):
            r = rng.uniform(8.0, 13.0)
            objs.append((rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1), r))
        (x1, y1, r1), (x2, y2, r2) = objs
        if abs(x1 - x2) >= 16 and math.hypot(x1 - x2, y1 - y2) > r1 + r2 + 2:
            return objs
    return None


def _an(thing: str) -> str:
    return ("an " if thing[0] in "aeiou" else "a ") + thing


def captions_for(a: str, b: str, left: str, right: str) -> List[str]:
    a, b, left, right = _an(a), _an(b), _an(left), _an(right)
    return [f"{a} and {b}", f"{b} and {a}", f"{a} next to {b}", f"{left} to the left of {right}",
            f"{right} to the right of {left}"]


def make_image(rng: random.Random):
    from PIL import Image, ImageDraw, ImageFilter

    grey = rng.randint(70, 185)
    bg = tuple(max(0, min(255, grey + rng.randint(-15, 15))) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    draw = ImageDraw.Draw(img)
    while True:
        objs = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(2)]
        if objs[0] != objs[1]:
            break
    places = None
    while places is None:
        places = _place(rng)
    for (colour, shape), (cx, cy, r) in zip(objs, places):
        draw_shape(draw, shape, COLOURS[colour], cx, cy, r, rng.uniform(-0.3, 0.3))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.2, 0.7)))
    names = [f"{c} {s}" for c, s in objs]
    left, right = (names[0], names[1]) if places[0][0] < places[1][0] else (names[1], names[0])
    return img, captions_for(names[0], names[1], left, right), objs, places


def build(out: str, n_train: int, n_val: int, n_test: int, seed: int, conditioned: bool = False) -> str:
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    images, sentid = [], 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            img, caps, objs, places = make_image(rng)
            name = f"{split}_{i:05d}.png"
            img.save(os.path.join(out, "images", name))
            focus = ["both"] * len(caps)
            if conditioned:
                names = [_an(f"{c} {s}") for c, s in objs]
                left, right = (names[0], names[1]) if places[0][0] < places[1][0] else (names[1], names[0])
                caps = caps + [left, f"{left} on the left", right, f"{right} on the right"]
                focus += ["left", "left", "right", "right"]
            sents = []
            for c, f in zip(caps, focus):
                sent = {"raw": c[0].upper() + c[1:] + ".", "tokens": c.split(), "imgid": len(images), "sentid": sentid}
                if conditioned:
                    sent["focus"] = f
                sents.append(sent)
                sentid += 1
            images.append({"filepath": "images", "filename": name, "split": split, "imgid": len(images),
                           "sentids": [s["sentid"] for s in sents], "sentences": sents,
                           "objects": [{"colour": c, "shape": s, "x": round(p[0], 1), "y": round(p[1], 1),
                                        "r": round(p[2], 1)} for (c, s), p in zip(objs, places)]})
    path = os.path.join(out, "dataset.json")
    with open(path, "w") as f:
        json.dump({"dataset": "shapes_caption_demo", "images": images}, f)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/caption_demo", help="output directory")
    p.add_argument("--train", type=int, default=800, help="training images")
    p.add_argument("--val", type=int, default=100, help="validation images")
    p.add_argument("--test", type=int, default=100, help="test images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--conditioned", action="store_true", help="add the 'focus' condition field (both/left/right)")
    a = p.parse_args(argv)
    path = build(a.out, a.train, a.val, a.test, a.seed, a.conditioned)
    print(f"wrote {path} ({a.train} train, {a.val} val, {a.test} test images, {captions_summary(path)})")
    return 0


def captions_summary(path: str) -> str:
    """The number of captions per image as written ("5 captions each"; with conditions, also per condition)."""
    from collections import Counter

    with open(path) as f:
        images = json.load(f)["images"]
    per_image = sorted({len(im["sentences"]) for im in images})
    if not per_image:
        return "no captions"
    counts = (f"{per_image[0]} captions each" if len(per_image) == 1
              else f"{per_image[0]}-{per_image[-1]} captions per image")
    focus = Counter(s["focus"] for im in images for s in im["sentences"] if "focus" in s)
    if focus:
        counts += ": focus " + ", ".join(f"{k} {v // len(images)}" if v % len(images) == 0 else f"{k} {v} in all"
                                         for k, v in focus.items())
    return counts


if __name__ == "__main__":
    sys.exit(main())
