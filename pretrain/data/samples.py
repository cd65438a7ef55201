"""Samples out of WebDataset shards: tar reading, grouping by key, checks, image decoding, stable ids.

A sample is the run of consecutive tar members sharing a key. The key of ``dir.v2/abc.def.jpg`` is
``dir.v2/abc`` and its extension ``def.jpg``: as in webdataset, the key is everything up to the first
dot of the base name (dots in directory names are kept), extensions are lower-cased.

Checks run in two phases, so that a resumed stream can replay its past without decoding images:
``check_sample`` (cheap: json, text, image header and size) runs on every sample read; the full
decode (``decode_image``) runs only on samples that are used.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import unicodedata
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Callable, Dict, Iterator, Optional, Sequence, Tuple

from PIL import Image

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

_BLOCK = 512
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$", re.DOTALL)
_INT = re.compile(r"^\s*\+?\d+\s*$")
_INT63 = (1 << 63) - 1


class ShardFormatError(OSError):
    """The bytes of a shard are not a complete tar archive."""


# --------------------------------------------------------------------------------------------- tar
def _read_exact(stream: BinaryIO, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else n
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax(data: bytes) -> Dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, value = data[sp + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def _members(stream: BinaryIO) -> Iterator[Tuple[str, Callable[[], bytes]]]:
    """Yield ``(name, read)`` per regular file as soon as its header is parsed; ``read()`` returns its data
    and must be called before the next step (so a caller learns a name before its data can fail)."""
    offset, long_name, pax = 0, None, {}

    def read_data(size: int) -> bytes:
        padded = -(-size // _BLOCK) * _BLOCK
        data = _read_exact(stream, padded)
        if len(data) < padded:
            raise ShardFormatError(f"truncated tar archive: member at byte {offset} needs {size} bytes, "
                                   f"{len(data)} left")
        return data[:size]

    while True:
        header = _read_exact(stream, _BLOCK)
        if len(header) < _BLOCK:
            what = "empty file" if offset == 0 and not header else "ends without the end-of-archive block"
            raise ShardFormatError(f"not a complete tar archive: {what} (at byte {offset + len(header)})")
        if header == bytes(_BLOCK):
            return
        kind = header[156:157]
        try:
            if _number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
                raise ValueError("checksum mismatch")
            size = _number(header[124:136]) if kind in (b"x", b"g") else int(pax.get("size", _number(header[124:136])))
            if size < 0:
                raise ValueError(f"negative size {size}")
        except ValueError as e:
            raise ShardFormatError(f"corrupt tar header at byte {offset} ({e})") from None
        if kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "replace") + "/" + name
            yield pax.get("path", long_name or name), lambda: read_data(size)
            long_name, pax = None, {}
        else:
            data = read_data(size)
            if kind == b"x":
                try:
                    pax = _pax(data)
                except ValueError:
                    raise ShardFormatError(f"corrupt pax header at byte {offset}") from None
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:  # global pax, GNU long link, links, folders, devices: nothing to keep
                long_name, pax = None, {}
        offset += _BLOCK + -(-size // _BLOCK) * _BLOCK


def iter_tar(stream: BinaryIO) -> Iterator[Tuple[str, bytes]]:
    """Yield ``(member name, data)`` of the regular files of a tar stream, in order.

    Strict where tarfile is lenient: a truncated archive, a corrupt header or a missing end-of-archive
    block raises ShardFormatError (tarfile in stream mode takes a truncated header as the end).
    Reads ustar, GNU (long names, base-256 sizes) and pax headers.
    """
    for name, read in _members(stream):
        yield name, read()


def split_key(name: str) -> Tuple[Optional[str], Optional[str]]:
    """``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``) as webdataset does; (None, None) without a dot."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def iter_samples(stream: BinaryIO) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Group consecutive tar members by key: yield ``(key, {extension: data})``.

    A sample is yielded once the next key's header is read (or the archive ends cleanly), so a sample
    cut by a truncation is never yielded. A repeated extension within a sample keeps the first member.
    """
    key, members = None, {}
    for name, read in _members(stream):
        k, ext = split_key(name)
        if k is not None and k != key:
            if members:
                yield key, members  # complete: the next key's header is read, before its data can fail
            key, members = k, {}
        data = read()
        if k is not None:
            members.setdefault(ext, data)
    if members:
        yield key, members


# --------------------------------------------------------------------------------------------- ids
def normalize_query(text: str) -> str:
    """NFKC, whitespace stripped and collapsed, lower-cased: the form whose hash is the query id."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def stable_hash(data: bytes) -> int:
    """blake2b (8 bytes, big-endian) masked to 63 bits: a non-negative int64, stable across runs and machines."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") & _INT63


def query_hash(text: str) -> int:
    return stable_hash(normalize_query(text).encode("utf-8"))


def image_hash(data: bytes) -> int:
    return stable_hash(data)


def as_id(value) -> Optional[int]:
    """An id given in KEY.json: a non-negative int (or int-like string) below 2**63, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and _INT.match(value):
        value = int(value)
    if isinstance(value, int) and 0 <= value <= _INT63:
        return value
    return None


def _number_or(value, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)


# --------------------------------------------------------------------------------------------- checks
@dataclass
class Record:
    """A sample that passed the cheap checks (its image is not decoded yet)."""

    key: str            # "shard url#KEY"
    text: str
    image: bytes
    meta: dict


def check_sample(url: str, key: str, members: Dict[str, bytes], image_exts: Sequence[str], text_ext: str,
                 max_pixels: int) -> Tuple[Optional[Record], Optional[str]]:
    """The cheap checks, in order json, text, image header: ``(Record, None)`` or ``(None, reason)``."""
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


def image_header_problem(data: bytes, max_pixels: int) -> Optional[str]:
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
    """Decode to RGB. With ``decode_size``, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale
    that keeps both sides >= decode_size (DCT scaling: much cheaper than decoding then resizing).
    Raises on undecodable data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # palette images with transparency
        img = Image.open(io.BytesIO(data))
        if decode_size and img.format == "JPEG":
            img.draft("RGB", (decode_size, decode_size))
        return img.convert("RGB")


def sample_fields(rec: Record) -> Dict[str, float]:
    """query_id, image_id (from KEY.json when valid, else stable hashes), clicks (default 1), impressions (0)."""
    m = rec.meta
    qid = as_id(m.get("query_id"))
    iid = as_id(m.get("image_id"))
    return {"query_id": qid if qid is not None else query_hash(rec.text),
            "image_id": iid if iid is not None else image_hash(rec.image),
            "clicks": _number_or(m.get("clicks"), 1.0),
            "impressions": _number_or(m.get("impressions"), 0.0)}
