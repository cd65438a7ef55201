#!/usr/bin/env python
"""Check WebDataset shards and draw a contact sheet of some samples.

    python tools/inspect_shards.py SHARDS... [--contact-sheet out.png] [--num 32] [--random]
                                   [--seed 0] [--columns 8] [--thumb 128] [--warn-only]

SHARDS are tar files, brace patterns (shard-{000000..000009}.tar), globs or folders (every *.tar
below them), local or fsspec URLs. For each shard it prints the sample count and, when a
sizes.json lies beside it, whether the count matches. Every sample is validated: it has an image
(jpg/jpeg/png/webp) that decodes, a txt that is valid, non-empty UTF-8, a json that parses to an
object, a key not seen before, and its files are adjacent in the tar. Problems are counted by
reason with example keys; the exit status is 1 when there are any (0 with --warn-only), 2 when no
shard was found.

The contact sheet is a PNG grid of the first (or, with --random, a seeded random choice of) N
valid samples, the query drawn under each image with a CJK-capable font (see pretrain/fonts.py;
without one it warns and suggests `apt-get install fonts-noto-cjk`). Its size is
columns*cell_w x rows*cell_h with columns = min(--columns, N), rows = ceil(N / columns),
cell_w = thumb + 2*PAD and cell_h = thumb + 2*PAD + TEXT_LINES*(font_px + 4),
font_px = max(10, thumb // 8), PAD = 4, TEXT_LINES = 2.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import posixpath
import random
import re
import sys
import tarfile

import fsspec
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain import fonts as _fonts  # noqa: E402

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PAD = 4
TEXT_LINES = 2
MAX_EXAMPLES = 5
PROBLEMS = (
    "unreadable_shard", "bad_tar", "missing_image", "undecodable_image", "missing_text", "bad_text_encoding",
    "empty_text", "missing_json", "bad_json", "duplicate_key", "split_sample", "size_mismatch",
    "not_in_sizes_json",
)


def font_px(thumb: int) -> int:
    return max(10, thumb // 8)


def sheet_size(n: int, columns: int, thumb: int) -> tuple[int, int]:
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    return cols * (thumb + 2 * PAD), rows * (thumb + 2 * PAD + TEXT_LINES * (font_px(thumb) + 4))


def expand_shards(specs) -> list[str]:
    """Shard URLs (local paths stay paths) from paths, brace patterns, globs and folders."""
    from braceexpand import braceexpand

    out = []
    for spec in specs:
        for one in braceexpand(spec):
            fs, path = fsspec.core.url_to_fs(one)
            local = "file" in (fs.protocol if isinstance(fs.protocol, (list, tuple)) else (fs.protocol,))
            name = (lambda p: p) if local else fs.unstrip_protocol
            if any(c in path for c in "*?["):
                out.extend(name(p) for p in sorted(fs.glob(path)) if p.endswith(".tar"))
            elif fs.isdir(path):
                out.extend(name(p) for p in sorted(fs.find(path)) if p.endswith(".tar"))
            else:
                out.append(one if not local else path)
    return list(dict.fromkeys(out))


def _split_name(name: str):
    """WebDataset's convention: the key is everything before the first dot of the file name."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (name, "")


class Inspector:
    def __init__(self, num=0, pick_random=False, seed=0):
        self.counts = {p: 0 for p in PROBLEMS}
        self.examples = {p: [] for p in PROBLEMS}
        self.keys = {}
        self.num, self.pick_random = num, pick_random
        self.rng = random.Random(seed)
        self.picked = []           # (image bytes, text, where)
        self.valid_seen = 0
        self.total = 0
        self.per_shard = []
        self._sizes_cache = {}

    def problem(self, reason, where):
        self.counts[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(where)

    def _sizes_for(self, url):
        folder = posixpath.dirname(url) if "://" in url else os.path.dirname(url)
        if folder not in self._sizes_cache:
            sizes = None
            path = (folder + "/" if folder else "") + "sizes.json"
            try:
                with fsspec.open(path, "rb") as f:
                    sizes = json.loads(f.read().decode("utf-8"))
            except FileNotFoundError:
                sizes = None
            except Exception:  # noqa: BLE001
                sizes = "unreadable"
            self._sizes_cache[folder] = sizes
        return self._sizes_cache[folder]

    def _keep(self, image, text, where):
        if self.num <= 0:
            return
        self.valid_seen += 1
        if not self.pick_random:
            if len(self.picked) < self.num:
                self.picked.append((image, text, where))
            return
        if len(self.picked) < self.num:
            self.picked.append((image, text, where))
        else:
            j = self.rng.randrange(self.valid_seen)
            if j < self.num:
                self.picked[j] = (image, text, where)

    def check_sample(self, shard, key, files):
        where = f"{shard}:{key}"
        if key in self.keys:
            self.problem("duplicate_key", f"{where} (also in {self.keys[key]})")
        else:
            self.keys[key] = shard
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        ok = True
        image = None
        if image_ext is None:
            self.problem("missing_image", where)
            ok = False
        else:
            image = files[image_ext]
            try:
                with Image.open(io.BytesIO(image)) as im:
                    im.load()
            except Exception:  # noqa: BLE001
                self.problem("undecodable_image", where)
                ok = False
        text = None
        if "txt" not in files:
            self.problem("missing_text", where)
            ok = False
        else:
            try:
                text = files["txt"].decode("utf-8")
                if not text.strip():
                    self.problem("empty_text", where)
                    ok = False
            except UnicodeDecodeError:
                self.problem("bad_text_encoding", where)
                ok = False
        if "json" not in files:
            self.problem("missing_json", where)
            ok = False
        else:
            try:
                meta = json.loads(files["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except Exception:  # noqa: BLE001
                self.problem("bad_json", where)
                ok = False
        if ok:
            self._keep(image, text, where)

    def inspect_shard(self, url):
        name = posixpath.basename(url) if "://" in url else os.path.basename(url)
        count = 0
        shard_keys = set()
        current, files = None, {}
        error = None
        try:
            with fsspec.open(url, "rb") as f:
                with tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, ext = _split_name(member.name)
                        data = tar.extractfile(member).read()
                        if key != current:
                            if current is not None:
                                self.check_sample(name, current, files)
                                count += 1
                            if key in shard_keys:
                                self.problem("split_sample", f"{name}:{key}")
                            shard_keys.add(key)
                            current, files = key, {}
                        files[ext] = data
        except FileNotFoundError as e:
            error = ("unreadable_shard", str(e))
        except (tarfile.TarError, OSError, EOFError) as e:
            error = ("bad_tar", f"{type(e).__name__}: {e}")
        if current is not None:
            self.check_sample(name, current, files)
            count += 1
        if error:
            self.problem(error[0], f"{name} ({error[1][:120]})")
        self.total += count
        sizes = self._sizes_for(url)
        note = ""
        if isinstance(sizes, dict):
            if name in sizes:
                if sizes[name] == count:
                    note = f"sizes.json: {sizes[name]} ok"
                else:
                    note = f"sizes.json: {sizes[name]} MISMATCH"
                    self.problem("size_mismatch", f"{name} (sizes.json {sizes[name]}, tar {count})")
            else:
                note = "not in sizes.json"
                self.problem("not_in_sizes_json", name)
        elif sizes == "unreadable":
            note = "sizes.json unreadable"
        self.per_shard.append({"shard": url, "samples": count, "sizes_json": note, "error": error})
        return count, note


def _wrap(draw, text, font, width, lines):
    """Greedy wrap into at most `lines` lines (breaking at spaces when possible, anywhere in CJK)."""
    text = " ".join(text.split())
    out, cur, i = [], "", 0
    while i < len(text) and len(out) < lines:
        ch = text[i]
        if not cur or draw.textlength(cur + ch, font=font) <= width:
            cur += ch
            i += 1
            continue
        cut = cur.rfind(" ")
        if ch != " " and cut > 0 and len(out) < lines - 1:
            out.append(cur[:cut])
            cur = cur[cut + 1:]
        else:
            out.append(cur.rstrip())
            cur = ""
            if ch == " ":
                i += 1
    if cur and len(out) < lines:
        out.append(cur)
        cur = ""
    if i < len(text) or cur:
        last = out[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        out[-1] = last + "…"
    return out


def contact_sheet(samples, path, columns=8, thumb=128):
    """samples: [(image bytes, text, where)]. Writes a PNG; returns its size."""
    n = max(1, len(samples))
    font, _ = _fonts.load_font(font_px(thumb))
    width, height = sheet_size(n, columns, thumb)
    cols = max(1, min(columns, n))
    cell_w = thumb + 2 * PAD
    cell_h = height // max(1, math.ceil(n / cols))
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, text, _where) in enumerate(samples):
        x0, y0 = (i % cols) * cell_w, (i // cols) * cell_h
        draw.rectangle([x0 + PAD, y0 + PAD, x0 + PAD + thumb - 1, y0 + PAD + thumb - 1], fill=(235, 235, 235))
        try:
            with Image.open(io.BytesIO(image)) as im:
                im = im.convert("RGB")
                scale = thumb / max(im.size)
                im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))),
                               Image.Resampling.LANCZOS)
                sheet.paste(im, (x0 + PAD + (thumb - im.size[0]) // 2, y0 + PAD + (thumb - im.size[1]) // 2))
        except Exception:  # noqa: BLE001
            pass
        y = y0 + PAD + thumb + 2
        for line in _wrap(draw, text.strip(), font, thumb, TEXT_LINES):
            draw.text((x0 + PAD, y), line, fill=(0, 0, 0), font=font)
            y += font_px(thumb) + 4
    with fsspec.open(path, "wb") as f:
        sheet.save(f, format="PNG")
    return sheet.size


def parser():
    ap = argparse.ArgumentParser(prog="inspect_shards.py", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("shards", nargs="+", metavar="SHARDS", help="tar files, brace patterns, globs or folders")
    ap.add_argument("--contact-sheet", default=None, metavar="PNG", help="write a contact sheet here")
    ap.add_argument("--num", type=int, default=32, help="samples on the contact sheet")
    ap.add_argument("--random", action="store_true", help="a random choice of samples instead of the first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--columns", type=int, default=8)
    ap.add_argument("--thumb", type=int, default=128, help="thumbnail side in pixels")
    ap.add_argument("--warn-only", action="store_true", help="exit 0 even when problems are found")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--quiet", action="store_true", help="no per-shard lines")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    shards = expand_shards(args.shards)
    if not shards:
        print("error: no shards found in " + " ".join(args.shards), file=sys.stderr)
        return 2
    insp = Inspector(num=args.num if args.contact_sheet else 0, pick_random=args.random, seed=args.seed)
    width = max(len(s) for s in shards)
    for url in shards:
        count, note = insp.inspect_shard(url)
        if not args.quiet:
            print(f"{url:<{width}}  {count:>8} samples  {note}")
    n_problems = sum(insp.counts.values())
    print(f"total: {len(shards)} shards, {insp.total} samples, {n_problems} problems")
    for reason in PROBLEMS:
        if insp.counts[reason]:
            print(f"  {reason}: {insp.counts[reason]}  e.g. {', '.join(insp.examples[reason])}")
    if args.contact_sheet:
        if insp.picked:
            size = contact_sheet(insp.picked, args.contact_sheet, args.columns, args.thumb)
            print(f"contact sheet: {args.contact_sheet} ({len(insp.picked)} samples, {size[0]}x{size[1]} px)")
        else:
            print("warning: no valid sample for the contact sheet", file=sys.stderr)
    if args.json:
        result = {"shards": insp.per_shard, "samples": insp.total,
                  "problems": {r: {"count": c, "examples": insp.examples[r]} for r, c in insp.counts.items() if c}}
        with fsspec.open(args.json, "w") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
    if n_problems and not args.warn_only:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
