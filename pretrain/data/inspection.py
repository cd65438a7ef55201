"""Inspecting shards as the trainer will read them (CLI: ``tools/inspect_shards.py``).

Every sample goes through the loader's own path: ``urls.expand_urls`` for the shard list,
``samples.read_shard`` (strict tar reading, key splitting, the cheap checks) and then the full decode
(``samples.decode_image``) that the loader runs when it builds a batch. A sample the loader would skip is
counted under the loader's reason name (``samples.SKIP_REASONS``: a truncated tar is ``shard_error``, an
image that does not decode is ``bad_image``, text that is not UTF-8 is ``invalid_text``, ...), and the ids
of a good sample are the loader's (``samples.sample_fields``).

On top of that, layout problems that the loader does not count but that a shard set should not have
(``LAYOUT_PROBLEMS``): a key seen twice (``duplicate_key``: in two shards, or twice in one shard with other
samples between, ``split_sample``), and a count that disagrees with ``sizes.json`` beside the shards.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import random
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import fsspec
from PIL import Image, ImageDraw

from .ids import normalize_query
from .samples import IMAGE_EXTS, MAX_PIXELS, SKIP_REASONS, TEXT_EXT, decode_image, read_shard, sample_fields
from .urls import expand_urls

LAYOUT_PROBLEMS = ("duplicate_key", "split_sample", "size_mismatch", "not_in_sizes_json")
PROBLEMS = SKIP_REASONS + LAYOUT_PROBLEMS
MAX_EXAMPLES = 5


def expand_shards(specs: Sequence[str], allow_pipe: bool = False) -> List[str]:
    """Shard URLs of several specs (each as the loader reads ``data.train_shards``), in order, without repeats.
    FileNotFoundError / ValueError as ``expand_urls``."""
    out = [u for spec in specs for urls, _ in expand_urls(spec, allow_pipe) for u in urls]
    return list(dict.fromkeys(out))


def view_samples(url: str, *, allow_pipe: bool = False, image_exts: Sequence[str] = IMAGE_EXTS,
                 text_ext: str = TEXT_EXT, max_pixels: int = MAX_PIXELS) -> Iterator[Tuple[dict, Optional[bytes]]]:
    """What the trainer sees of each sample of one shard: ``(view, image bytes or None)``.

    A good sample's view: shard, key, query (normalised), query_id, image_id, clicks, impressions, width,
    height (decoded, EXIF-oriented), text (as stored). A skipped one: shard, key, skip (the loader's reason),
    and for a shard error, detail (key None)."""
    for item in read_shard(url, allow_pipe=allow_pipe, image_exts=image_exts, text_ext=text_ext,
                           max_pixels=max_pixels):
        if item.reason:
            view = {"shard": url, "key": item.key, "skip": item.reason}
            if item.detail:
                view["detail"] = item.detail[:200]
            yield view, None
            continue
        rec = item.record
        try:
            size = decode_image(rec.image).size
        except Exception:  # noqa: BLE001 - as the loader: any decoding failure is bad_image
            yield {"shard": url, "key": item.key, "skip": "bad_image"}, None
            continue
        f = sample_fields(rec)
        yield ({"shard": url, "key": item.key, "query": normalize_query(rec.text), "query_id": f["query_id"],
                "image_id": f["image_id"], "clicks": f["clicks"], "impressions": f["impressions"],
                "width": size[0], "height": size[1], "text": rec.text}, rec.image)


@dataclass
class Inspection:
    """Counts by problem with example places, per-shard results, a dump of the first samples and a pick of
    good samples (first or random, seeded) for a contact sheet."""

    dump: int = 0
    pick: int = 0
    pick_random: bool = False
    seed: int = 0
    counts: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBLEMS, 0))
    examples: Dict[str, List[str]] = field(default_factory=lambda: {p: [] for p in PROBLEMS})
    shards: List[dict] = field(default_factory=list)
    dumped: List[dict] = field(default_factory=list)
    picked: List[Tuple[bytes, str, str]] = field(default_factory=list)
    samples: int = 0
    _keys: Dict[str, str] = field(default_factory=dict)
    _good: int = 0
    _sizes: Dict[str, object] = field(default_factory=dict)
    _rng: Optional[random.Random] = None

    def __post_init__(self):
        self._rng = random.Random(self.seed)

    def problem(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(where)

    def total_problems(self) -> int:
        return sum(self.counts.values())

    def add_shard(self, url: str, **read_options) -> dict:
        """Read one shard; returns its entry of ``shards`` (samples, sizes.json note, error)."""
        name = posixpath.basename(url)
        count, error, seen = 0, None, set()
        last = None
        for view, image in view_samples(url, **read_options):
            key = view["key"]
            if len(self.dumped) < self.dump:
                self.dumped.append({k: v for k, v in view.items() if k != "text"})
            if key is None:  # shard error
                error = view.get("detail", "")
                self.problem("shard_error", f"{name} ({error[:120]})")
                continue
            count += 1
            where = f"{name}:{key}"
            if key in seen and key != last:
                self.problem("split_sample", where)
            elif key in self._keys and key not in seen:
                self.problem("duplicate_key", f"{where} (also in {self._keys[key]})")
            seen.add(key)
            self._keys.setdefault(key, name)
            last = key
            if "skip" in view:
                self.problem(view["skip"], where)
            else:
                self._keep(image, view["text"], where)
        self.samples += count
        entry = {"shard": url, "samples": count, "sizes_json": self._check_sizes(url, name, count), "error": error}
        self.shards.append(entry)
        return entry

    def _keep(self, image: bytes, text: str, where: str) -> None:
        if self.pick <= 0:
            return
        self._good += 1
        if len(self.picked) < self.pick:
            self.picked.append((image, text, where))
        elif self.pick_random:  # reservoir sampling
            j = self._rng.randrange(self._good)
            if j < self.pick:
                self.picked[j] = (image, text, where)

    def _check_sizes(self, url: str, name: str, count: int) -> str:
        folder = posixpath.dirname(url) if "://" in url else os.path.dirname(url)
        if folder not in self._sizes:
            try:
                with fsspec.open((folder + "/" if folder else "") + "sizes.json", "rb") as f:
                    self._sizes[folder] = json.loads(f.read().decode("utf-8"))
            except FileNotFoundError:
                self._sizes[folder] = None
            except Exception:  # noqa: BLE001 - unreadable or not JSON
                self._sizes[folder] = "unreadable"
        sizes = self._sizes[folder]
        if sizes == "unreadable":
            return "sizes.json unreadable"
        if not isinstance(sizes, dict):
            return ""
        if name not in sizes:
            self.problem("not_in_sizes_json", name)
            return "not in sizes.json"
        if sizes[name] != count:
            self.problem("size_mismatch", f"{name} (sizes.json {sizes[name]}, tar {count})")
            return f"sizes.json: {sizes[name]} MISMATCH"
        return f"sizes.json: {sizes[name]} ok"

    def summary(self) -> dict:
        return {"shards": self.shards, "samples": self.samples,
                "problems": {r: {"count": c, "examples": self.examples[r]} for r, c in self.counts.items() if c}}


# ------------------------------------------------------------------------------------------ contact sheet
PAD = 4
TEXT_LINES = 2


def font_px(thumb: int) -> int:
    return max(10, thumb // 8)


def sheet_size(n: int, columns: int, thumb: int) -> Tuple[int, int]:
    """columns*cell_w x rows*cell_h, cell_w = thumb + 2*PAD, cell_h = thumb + 2*PAD + TEXT_LINES*(font_px + 4)."""
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    return cols * (thumb + 2 * PAD), rows * (thumb + 2 * PAD + TEXT_LINES * (font_px(thumb) + 4))


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


def contact_sheet(samples, path: str, columns: int = 8, thumb: int = 128) -> Tuple[int, int]:
    """samples: [(image bytes, text, where)]; the query drawn under each image with a CJK-capable font
    (``pretrain.fonts``). Writes a PNG (local or fsspec URL); returns its size."""
    from .. import fonts

    n = max(1, len(samples))
    font, _ = fonts.load_font(font_px(thumb))
    width, height = sheet_size(n, columns, thumb)
    cols = max(1, min(columns, n))
    cell_w, cell_h = thumb + 2 * PAD, height // max(1, math.ceil(n / cols))
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, text, _where) in enumerate(samples):
        x0, y0 = (i % cols) * cell_w, (i // cols) * cell_h
        draw.rectangle([x0 + PAD, y0 + PAD, x0 + PAD + thumb - 1, y0 + PAD + thumb - 1], fill=(235, 235, 235))
        im = decode_image(image)
        scale = thumb / max(im.size)
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))),
                       Image.Resampling.LANCZOS)
        sheet.paste(im, (x0 + PAD + (thumb - im.size[0]) // 2, y0 + PAD + (thumb - im.size[1]) // 2))
        y = y0 + PAD + thumb + 2
        for line in _wrap(draw, text.strip(), font, thumb, TEXT_LINES):
            draw.text((x0 + PAD, y), line, fill=(0, 0, 0), font=font)
            y += font_px(thumb) + 4
    with fsspec.open(path, "wb") as f:
        sheet.save(f, format="PNG")
    return sheet.size
