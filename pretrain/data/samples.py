"""Samples of a shard as the trainer sees them: the checks, their skip reasons, image decoding, the fields.

``read_shard`` is the one reading path: the training stream, the evaluation reader and
``tools/inspect_shards.py`` all take samples from it, so they agree on which samples are good and on the
name of every problem. Checks run in two phases, so that a resumed stream can replay its past without
decoding images: ``check_sample`` (cheap: json, text, image header and size) runs on every sample read;
the full decode (``decode_image``) runs only on samples that are used, and a failure there is counted as
``bad_image`` too.
"""
from __future__ import annotations

import io
import json
import logging
import math
import warnings
from contextlib import closing
from dataclasses import dataclass
from typing import Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

from PIL import Image, ImageOps

from .ids import as_id, image_hash, query_hash
from .tar import iter_samples
from .urls import open_shard

log = logging.getLogger(__name__)

SKIP_REASONS: Tuple[str, ...] = (
    "bad_image",        # the image cannot be identified or decoded
    "bad_json",         # KEY.json is not a UTF-8 JSON object
    "empty_text",       # the text is empty after stripping
    "invalid_text",     # the text is not valid UTF-8
    "missing_image",    # no member with one of the image extensions
    "missing_text",     # no member with the text extension
    "shard_error",      # the shard could not be opened or read to its end (truncated, corrupt, unreachable)
    "too_many_pixels",  # width x height above max_pixels (checked from the header, before decoding)
)
"""Why samples are skipped; the fixed, sorted list that every rank reduces in the same order."""

IMAGE_EXTS: Tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit


@dataclass
class Record:
    """A sample that passed the cheap checks (its image is not decoded yet)."""

    key: str            # "shard url#KEY"
    text: str
    image: bytes
    meta: dict


class Checked(NamedTuple):
    """One item read from a shard: a good ``record``, or a skip ``reason`` (with ``detail`` for shard errors)."""

    key: Optional[str]          # the sample's key in the shard; None for a shard error
    record: Optional[Record]
    reason: Optional[str]
    detail: str = ""


def check_sample(url: str, key: str, members: Dict[str, bytes], image_exts: Sequence[str] = IMAGE_EXTS,
                 text_ext: str = TEXT_EXT, max_pixels: int = MAX_PIXELS) -> Tuple[Optional[Record], Optional[str]]:
    """The cheap checks, in order json, text, image header: ``(Record, None)`` or ``(None, reason)``.

    KEY.json is optional (img2dataset folders may lack it); when present it must be a JSON object."""
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None, "bad_json"
        if not isinstance(meta, dict):
            return None, "bad_json"
    raw = members.get(text_ext)
    if raw is None:
        return None, "missing_text"
    try:
        text = raw.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError:
        return None, "invalid_text"
    if not text:
        return None, "empty_text"
    ext = next((e for e in image_exts if e in members), None)
    if ext is None:
        return None, "missing_image"
    data = members[ext]
    reason = image_header_problem(data, max_pixels)
    if reason:
        return None, reason
    return Record(f"{url}#{key}", text, data, meta), None


def read_shard(url: str, *, allow_pipe: bool = False, image_exts: Sequence[str] = IMAGE_EXTS,
               text_ext: str = TEXT_EXT, max_pixels: int = MAX_PIXELS) -> Iterator[Checked]:
    """Every sample of one shard, checked (``check_sample``), in tar order. A shard that cannot be opened or
    read to its end ends with a ``shard_error`` item (a sample cut by the error is not yielded)."""
    try:
        stream = open_shard(url, allow_pipe)
    except Exception as e:  # noqa: BLE001 - fsspec backends raise many kinds (OSError, aiohttp, botocore)
        log.warning("cannot open shard %s: %s: %s", url, type(e).__name__, e)
        yield Checked(None, None, "shard_error", f"cannot open: {type(e).__name__}: {e}")
        return
    with closing(stream):
        samples = iter_samples(stream)
        while True:
            try:
                key, members = next(samples)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - truncation, corruption, network errors
                log.warning("shard %s: read error, rest of the shard skipped: %s: %s", url, type(e).__name__, e)
                yield Checked(None, None, "shard_error", f"{type(e).__name__}: {e}")
                return
            rec, reason = check_sample(url, key, members, image_exts, text_ext, max_pixels)
            yield Checked(key, rec, reason)


def image_header_problem(data: bytes, max_pixels: int = MAX_PIXELS) -> Optional[str]:
    """Open the image lazily (header only): None if fine, else ``bad_image`` or ``too_many_pixels``.

    Pillow itself raises DecompressionBombError above 2 x ``Image.MAX_IMAGE_PIXELS``: counted as
    ``too_many_pixels`` too (so max_pixels above that bound has no effect).
    """
    if not data:
        return "bad_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Image.DecompressionBombError:
        return "too_many_pixels"
    except Exception:  # noqa: BLE001 - Pillow raises many kinds (UnidentifiedImageError, SyntaxError, struct.error)
        return "bad_image"
    return "too_many_pixels" if w * h > max_pixels else None


def decode_image(data: bytes, decode_size: Optional[int] = None) -> Image.Image:
    """Decode image bytes to an RGB image: the one decoder of the builder and the loader.

    EXIF orientation is applied, transparency is composited on white, 16-bit and float greys are scaled
    to 8 bits. With ``decode_size``, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps
    both sides >= decode_size (DCT scaling: much cheaper than decoding then resizing). Raises on data
    that does not decode.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # palette images with transparency
        im = Image.open(io.BytesIO(data))
        if decode_size and im.format == "JPEG":
            im.draft("RGB", (decode_size, decode_size))
        im.load()
        if im.getexif().get(0x0112, 1) != 1:  # orientation tag: only then is a transposed copy worth making
            im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGB", im.size, (255, 255, 255))
        white.paste(im, mask=im.getchannel("A"))
        return white
    if im.mode.startswith("I") or im.mode == "F":
        im = im.point(lambda v: v * (1 / 256)) if im.mode.startswith("I;16") else im
        im = im.convert("L")
    return im.convert("RGB")


def _number_or(value, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)


def sample_fields(rec: Record) -> Dict[str, float]:
    """What the trainer takes from a sample besides image and text (the id contract of ``ids``):
    query_id and image_id from KEY.json when valid (``as_id``), else ``query_hash(text)`` and
    ``image_hash(image bytes)``; clicks (default 1) and impressions (default 0)."""
    m = rec.meta
    qid = as_id(m.get("query_id"))
    iid = as_id(m.get("image_id"))
    return {"query_id": qid if qid is not None else query_hash(rec.text),
            "image_id": iid if iid is not None else image_hash(rec.image),
            "clicks": _number_or(m.get("clicks"), 1.0),
            "impressions": _number_or(m.get("impressions"), 0.0)}
