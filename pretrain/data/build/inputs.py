"""Click-log inputs of the builder: listing files, reading rows (TSV, CSV, JSONL, Parquet), parsing fields.

A row that cannot be used raises or is reported with a bad-input reason (``BAD_ROW_REASONS``); the
builder counts it with its line number and goes on. Image references are resolved here (a path under the
images root, an fsspec URL, or base64 bytes), not read.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import csv
import io
import json
import math
import os
import posixpath
import re

import fsspec

from .options import BuildError

BAD_ROW_REASONS = (
    "bad_encoding", "malformed_json", "malformed_csv", "wrong_column_count", "missing_field",
    "bad_field_type", "bad_number",
)
"""Bad-input reasons found while reading rows (the image reasons are in ``images.IMAGE_REASONS``)."""

LOG_FORMATS = {
    ".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
    ".pq": "parquet",
}
EXPLICIT_ONLY_FORMATS = {".json": "jsonl", ".txt": "tsv"}  # only for files named one by one
COMPRESSION_EXTS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
_B64_RE = re.compile(r"[A-Za-z0-9+/_\-\s]+={0,2}\s*")
_INT_RE = re.compile(r"[+-]?\d+")
_SURROGATE_RE = re.compile("[\udc80-\udcff]")


class Base64Error(ValueError):
    """Image bytes given as base64 that do not decode."""


class BadRow(Exception):
    """A row that cannot be used; ``reason`` is one of the bad-input reasons."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def parse_count(value):
    """A non-negative integer count; None when the value is absent; BadRow('bad_number') if bad."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRow("bad_number")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise BadRow("bad_number")
        n = int(value)
    else:
        s = str(value).strip()
        if not s:
            return None
        if _INT_RE.fullmatch(s):
            n = int(s)
        else:
            try:
                f = float(s)
            except ValueError:
                raise BadRow("bad_number") from None
            if not math.isfinite(f) or not f.is_integer():
                raise BadRow("bad_number")
            n = int(f)
    if n < 0:
        raise BadRow("bad_number")
    return n


def parse_id(value):
    """An id: int when it looks like an int64, else a string; None when absent."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else str(value)
    s = str(value).strip()
    if not s:
        return None
    if _INT_RE.fullmatch(s) and -2 ** 63 <= int(s) < 2 ** 63:
        return int(s)
    return s


def _looks_like_base64_image(s: str) -> bool:
    if len(s) < 64 or not _B64_RE.fullmatch(s[:4096] if len(s) > 4096 else s):
        return False
    head = re.sub(r"\s", "", s[:64])[:32]
    try:
        raw = b64decode(head)
    except ValueError:
        return False
    return raw.startswith(IMAGE_MAGIC)


def b64decode(s: str) -> bytes:
    s = re.sub(r"\s", "", s)
    s += "=" * (-len(s) % 4)
    try:
        if "-" in s or "_" in s:
            return base64.urlsafeb64decode(s)
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise Base64Error(f"bad base64: {e}") from None


def is_url(s: str) -> bool:
    return "://" in s[:32]


def _join(base: str, rel: str) -> str:
    if is_url(base):
        return posixpath.join(base, rel)
    return os.path.normpath(os.path.join(base, rel))


def canonical_image_ref(value, base_dir: str):
    """(resolved reference, path as written or None for embedded bytes). Raises BadRow."""
    if value is None:
        raise BadRow("missing_field")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise BadRow("missing_field")
        return "base64:" + base64.b64encode(bytes(value)).decode("ascii"), None
    if not isinstance(value, str):
        raise BadRow("bad_field_type")
    s = value.strip()
    if not s:
        raise BadRow("missing_field")
    if s.startswith("base64:"):
        return "base64:" + s[7:].strip(), None
    if s.startswith("data:"):
        comma = s.find(",")
        if comma < 0 or ";base64" not in s[:comma]:
            raise BadRow("bad_base64")
        return "base64:" + s[comma + 1:].strip(), None
    if is_url(s):
        return s, s
    if _looks_like_base64_image(s):
        return "base64:" + s, None
    if os.path.isabs(s):
        return os.path.normpath(s), s
    return _join(base_dir, s), s



class InputFile:
    """One click-log file: its filesystem, path, name relative to the input spec, format and size."""

    def __init__(self, fs, path, rel, fmt):
        self.fs, self.path, self.rel, self.format = fs, path, rel, fmt
        if is_local(fs):
            self.url = os.path.abspath(path)
            self.base_dir = os.path.dirname(self.url)
        else:
            self.url = fs.unstrip_protocol(path)
            self.base_dir = posixpath.dirname(self.url)
        self.size = fs.size(path)


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def detect_format(path: str, forced: str | None, explicit: bool = True) -> str | None:
    """Format from --format or the extension (.gz etc. ignored); None when unknown.

    Folder scans (explicit=False) take only files with a click-log extension, whatever --format says."""
    root, ext = posixpath.splitext(path.lower())
    if ext in COMPRESSION_EXTS:
        root, ext = posixpath.splitext(root)
    fmt = LOG_FORMATS.get(ext) or (EXPLICIT_ONLY_FORMATS.get(ext) if explicit else None)
    if forced and (explicit or fmt):
        return forced
    return fmt


def list_inputs(specs, forced_format) -> list[InputFile]:
    files, seen = [], set()
    for spec in specs:
        fs, path = fsspec.core.url_to_fs(spec)
        if any(c in path for c in "*?["):
            matches = sorted(p for p in fs.glob(path) if not fs.isdir(p))
            static = re.split(r"[*?\[]", path, maxsplit=1)[0]
            base = static if static.endswith("/") else posixpath.dirname(static)
        elif fs.isdir(path):
            base = path.rstrip("/")
            matches = sorted(p for p in fs.find(path)
                             if detect_format(p, forced_format, explicit=False)
                             and not posixpath.basename(p).startswith(("_", ".")))
        elif fs.exists(path):
            matches, base = [path], posixpath.dirname(path)
        else:
            raise BuildError(f"input not found: {spec}")
        if not matches:
            raise BuildError(f"no click-log files in {spec}")
        for p in matches:
            fmt = detect_format(p, forced_format)
            if fmt is None:
                raise BuildError(f"cannot tell the format of {p}: use --format tsv|csv|jsonl|parquet")
            rel = posixpath.relpath(p, base) if base else p
            f = InputFile(fs, p, rel, fmt)
            if f.url not in seen:
                seen.add(f.url)
                files.append(f)
    return files


def _open_text_source(inp: InputFile):
    compression = "infer" if inp.format != "parquet" else None
    return fsspec.open(inp.url, "rb", compression=compression)


def iter_rows(inp: InputFile, wanted_cols):
    """Yield (line, record dict | None, bad reason | None); None/None for blank lines."""
    with _open_text_source(inp) as f:
        if inp.format == "tsv":
            yield from _iter_tsv(f, inp)
        elif inp.format == "csv":
            yield from _iter_csv(f, inp)
        elif inp.format == "jsonl":
            yield from _iter_jsonl(f)
        elif inp.format == "parquet":
            yield from _iter_parquet(f, inp, wanted_cols)
        else:
            raise BuildError(f"unknown format {inp.format!r}")


def _header(cells, inp):
    header = [c.strip() for c in cells]
    if len(set(header)) != len(header):
        raise BuildError(f"{inp.rel}: duplicate column names in the header: {header}")
    return header


def _iter_tsv(f, inp):
    header, line_no = None, 0
    for raw in f:
        line_no += 1
        raw = raw.rstrip(b"\r\n")
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if header is None:
            if not raw.strip():
                continue
            try:
                header = _header(raw.decode("utf-8").split("\t"), inp)
            except UnicodeDecodeError:
                raise BuildError(f"{inp.rel}: the header line is not UTF-8") from None
            yield "header", header, None
            continue
        if not raw.strip():
            yield line_no, None, None
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield line_no, None, "bad_encoding"
            continue
        cells = text.split("\t")
        if len(cells) != len(header):
            yield line_no, None, "wrong_column_count"
            continue
        yield line_no, dict(zip(header, cells)), None


def _iter_csv(f, inp):
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    header, last = None, 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error:
            start = last + 1
            if reader.line_num <= last:  # no progress: give up on the rest of the file
                yield start, None, "malformed_csv"
                break
            last = reader.line_num
            yield start, None, "malformed_csv"
            continue
        start, last = last + 1, reader.line_num
        if header is None:
            if not cells:
                continue
            if any(_SURROGATE_RE.search(c) for c in cells):
                raise BuildError(f"{inp.rel}: the header line is not UTF-8")
            header = _header(cells, inp)
            yield "header", header, None
            continue
        if not cells or all(not c.strip() for c in cells) and len(cells) <= 1:
            yield start, None, None
            continue
        if any(_SURROGATE_RE.search(c) for c in cells):
            yield start, None, "bad_encoding"
            continue
        if len(cells) != len(header):
            yield start, None, "wrong_column_count"
            continue
        yield start, dict(zip(header, cells)), None


def _iter_jsonl(f):
    yield "header", None, None
    line_no = 0
    for raw in f:
        line_no += 1
        raw = raw.rstrip(b"\r\n")
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if not raw.strip():
            yield line_no, None, None
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield line_no, None, "bad_encoding"
            continue
        try:
            rec = json.loads(text)
        except ValueError:
            yield line_no, None, "malformed_json"
            continue
        if not isinstance(rec, dict):
            yield line_no, None, "malformed_json"
            continue
        yield line_no, rec, None


def _iter_parquet(f, inp, wanted_cols):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    yield "header", names, None
    cols = [c for c in wanted_cols if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=cols):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec, None
