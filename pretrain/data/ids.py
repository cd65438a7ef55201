"""The id contract of a shard: one query normalisation and one hash, shared by the builder, the loader and
the inspector, so that a query or an image gets the same id whichever tool wrote or read its sample.

- ``normalize_query``: Unicode NFKC (full-width forms become ASCII, compatibility characters fold), white
  space collapsed to single spaces and stripped, then lower-cased in every script (Latin, Greek, Cyrillic,
  ...; Chinese has no case and is unchanged). It is idempotent. The builder writes this form as ``KEY.txt``.
- ``query_hash(text)``: the ``query_id`` of a query without a usable id in ``KEY.json``:
  ``stable_hash(normalize_query(text).encode("utf-8"))``.
- ``image_hash(data)``: the ``image_id`` of an image without a usable id: ``stable_hash`` of the image
  file's bytes (the builder hashes the bytes it read, before re-encoding, so the same file in a click log and
  in an img2dataset folder gets one id).
- ``stable_hash``: the first 8 bytes of blake2b (unkeyed, no personalisation) read big-endian, masked to
  63 bits: a non-negative int64, the same on every machine and Python version.
- ``as_id``: an id given in ``KEY.json`` counts when it is a non-negative integer below 2**63 (or a string of
  decimal digits); anything else (negative, text, float) is ignored and the hash is used instead.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Optional

INT63 = (1 << 63) - 1
_INT = re.compile(r"^\s*\+?\d+\s*$")


def normalize_query(text: str) -> str:
    """NFKC, white space collapsed and stripped, lower-cased: the form whose hash is the query id."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def stable_hash(data: bytes) -> int:
    """blake2b (8 bytes, big-endian) masked to 63 bits: a non-negative int64, stable across runs and machines."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") & INT63


def query_hash(text: str) -> int:
    """The query id of a query text (normalised here; normalising twice changes nothing)."""
    return stable_hash(normalize_query(text).encode("utf-8"))


def image_hash(data: bytes) -> int:
    """The image id of an image file's bytes."""
    return stable_hash(data)


def as_id(value) -> Optional[int]:
    """An id given in KEY.json: a non-negative int (or digit string) below 2**63, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and _INT.match(value):
        value = int(value)
    if isinstance(value, int) and 0 <= value <= INT63:
        return value
    return None
