#!/usr/bin/env python
"""Build WebDataset shards of <query, image> pairs from search-engine click logs.

    python tools/build_shards.py LOGS... --out OUT [options]

LOGS are files, globs or folders, local or any fsspec URL (s3://, gs://, http(s)://, memory://...),
in TSV, CSV, JSONL or Parquet (from the extension, `.gz`/`.bz2`/`.xz`/`.zst` allowed for the text
formats, or --format). TSV/CSV have a header row. Columns are named by --query-col, --image-col,
--clicks-col, --impressions-col, --query-id-col, --image-id-col and --timestamp-col; only the query
and image columns are required. A missing clicks value counts as 1 click, a missing impressions
value as 0 (unknown: the CTR filter is then not applied).

`image` is a path (relative to --images-root; default: the folder of the log file that names it),
an fsspec URL, or the image bytes in base64 (`base64:...`, `data:image/...;base64,...`, or a bare
base64 string that decodes to a known image signature). Parquet binary columns hold raw bytes.

How it works (two passes, everything deterministic from the inputs and the options):

1. Plan. Read every row; a row that cannot be used is counted under a bad-input reason
   (bad_encoding, malformed_json, malformed_csv, wrong_column_count, missing_field, bad_field_type,
   bad_number, bad_base64, unreadable_image, undecodable_image) with its first line numbers.
   Queries are normalised (Unicode NFKC, whitespace collapsed, stripped, Latin letters lower-cased;
   Chinese untouched). Every distinct image reference is read, hashed, decoded, checked and
   re-encoded once (in --workers processes) to learn its content hash and its encoded size.
   Rows are aggregated per (normalised query, image content): clicks and impressions are summed,
   the first row gives the original query, the provenance and the timestamp. Image deduplication:
   the content hash is the SHA-1 of the image file's raw bytes (after base64 decoding), so the same
   bytes behind two paths or URLs are one image with one image_id. Pair filters, in this order:
   min_clicks, min_ctr, query_too_short, query_too_long, image_too_small, aspect_ratio.
   The surviving pairs are shuffled globally (order of blake2b(seed, query, image hash), so the
   order does not even depend on the order of the rows), numbered (KEY = 9-digit global index),
   split by query (blake2b of the normalised query against --val-fraction: a query is never in both
   splits, stable across runs and machines) and cut into shards by --shard-size samples and
   --max-shard-bytes (exact tar sizes are known from the encoded sizes). The plan is saved in
   OUT/_plan.json and OUT/_plan_pairs.parquet before any shard is written.
2. Write. Each missing shard is written to `NAME.tmp` and renamed when complete (atomic). Images
   are read again, their hash checked against the plan, re-encoded (JPEG, RGB, deterministic) and
   their size checked against the plan: a restarted build gives byte-identical shards. A shard
   whose final file exists (with the planned size) is skipped, so a re-run resumes a killed build
   without losing or duplicating samples. A re-run with other inputs or options is refused
   (use a new output folder or --overwrite).

Output:
    OUT/train/shard-000000.tar ...  OUT/train/sizes.json   ({"shard-000000.tar": 10000, ...}, OpenCLIP)
    OUT/val/shard-000000.tar ...    OUT/val/sizes.json     (only with --val-fraction > 0)
    OUT/report.json                 counts, reasons with first line numbers, accounting, throughput
    OUT/_plan.json, OUT/_plan_pairs.parquet   the deterministic plan (kept for resuming)

Each sample: KEY.jpg, KEY.txt (normalised query, UTF-8) and KEY.json with the fields
key, query_id, image_id, clicks, impressions, query (original text of the first row), source
("FILE:LINE" of the first row; for Parquet LINE is the 1-based row number), rows (how many input
rows were aggregated), image_sha1, image_path (the path/URL as written in the log, null for
base64), width, height (stored JPEG), original_width, original_height, split, and timestamp
(first row's value, an integer when it looks like one; only when the log has that column).
query_id: the --query-id-col value (first non-empty in row order for that normalised query), else
blake2b-64 of the normalised query, shifted right by 1 (a non-negative int64). image_id: the
--image-id-col value (first non-empty in row order for that image content), else the first 64 bits
of the image SHA-1 shifted right by 1. Integer-looking ids are stored as JSON integers.

Accounting (report.json "accounting"; exact):
    input_rows = bad_rows + duplicate_rows + filtered_rows + written_samples
where duplicate_rows counts rows merged into an earlier row's written pair, and filtered_rows counts
every row of a filtered pair (its merged duplicates included).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import codecs
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import posixpath
import re
import sys
import tarfile
import time
import unicodedata

import fsspec
from PIL import Image, ImageOps

PLAN_VERSION = 1
PLAN_FILE = "_plan.json"
PAIRS_FILE = "_plan_pairs.parquet"
REPORT_FILE = "report.json"
SIZES_FILE = "sizes.json"
SPLITS = ("train", "val")

BAD_REASONS = (
    "bad_encoding", "malformed_json", "malformed_csv", "wrong_column_count", "missing_field",
    "bad_field_type", "bad_number", "bad_base64", "unreadable_image", "undecodable_image",
)
FILTER_REASONS = (
    "min_clicks", "min_ctr", "query_too_short", "query_too_long", "image_too_small", "aspect_ratio",
)
FIRST_N = 5

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
_TAR_BLOCK = 512
_TAR_RECORD = 512 * 20
TAR_MTIME = 0


class BuildError(Exception):
    """A problem with the inputs, the options or the output folder: stops the build."""


class Base64Error(ValueError):
    """Image bytes given as base64 that do not decode."""


class _BadRow(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------- small helpers

def normalize_query(text: str) -> str:
    """NFKC, collapse whitespace, strip, lower-case Latin letters (other scripts untouched)."""
    text = " ".join(unicodedata.normalize("NFKC", text).split())
    out = []
    for ch in text:
        if "A" <= ch <= "Z":
            out.append(ch.lower())
        elif ord(ch) > 127 and ch.isupper() and unicodedata.name(ch, "").startswith("LATIN"):
            out.append(ch.lower())
        else:
            out.append(ch)
    return "".join(out)


def _h64(data: bytes, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=person).digest(), "big")


def query_hash_id(qnorm: str) -> int:
    """Stable non-negative int64 id of a normalised query."""
    return _h64(qnorm.encode("utf-8"), b"wl-query") >> 1


def image_hash_id(sha1_hex: str) -> int:
    """Stable non-negative int64 id of an image content hash."""
    return int(sha1_hex[:16], 16) >> 1


def split_of(qnorm: str, val_fraction: float) -> str:
    """train/val by a stable hash of the normalised query."""
    if val_fraction <= 0:
        return "train"
    u = _h64(qnorm.encode("utf-8"), b"wl-split") / 2.0 ** 64
    return "val" if u < val_fraction else "train"


def shuffle_key(seed: int, qnorm: str, sha1_hex: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{qnorm}\0{sha1_hex}".encode("utf-8"), digest_size=16,
                           person=b"wl-shuffle").digest()


def parse_count(value):
    """A non-negative integer count; None when the value is absent; _BadRow('bad_number') if bad."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise _BadRow("bad_number")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise _BadRow("bad_number")
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
                raise _BadRow("bad_number") from None
            if not math.isfinite(f) or not f.is_integer():
                raise _BadRow("bad_number")
            n = int(f)
    if n < 0:
        raise _BadRow("bad_number")
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


def _json_scalar(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _looks_like_base64_image(s: str) -> bool:
    if len(s) < 64 or not _B64_RE.fullmatch(s[:4096] if len(s) > 4096 else s):
        return False
    head = re.sub(r"\s", "", s[:64])[:32]
    try:
        raw = _b64decode(head)
    except ValueError:
        return False
    return raw.startswith(IMAGE_MAGIC)


def _b64decode(s: str) -> bytes:
    s = re.sub(r"\s", "", s)
    s += "=" * (-len(s) % 4)
    try:
        if "-" in s or "_" in s:
            return base64.urlsafe_b64decode(s)
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise Base64Error(f"bad base64: {e}") from None


def _is_url(s: str) -> bool:
    return "://" in s[:32]


def _join(base: str, rel: str) -> str:
    if _is_url(base):
        return posixpath.join(base, rel)
    return os.path.normpath(os.path.join(base, rel))


def canonical_image_ref(value, base_dir: str):
    """(resolved reference, path as written or None for embedded bytes). Raises _BadRow."""
    if value is None:
        raise _BadRow("missing_field")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise _BadRow("missing_field")
        return "base64:" + base64.b64encode(bytes(value)).decode("ascii"), None
    if not isinstance(value, str):
        raise _BadRow("bad_field_type")
    s = value.strip()
    if not s:
        raise _BadRow("missing_field")
    if s.startswith("base64:"):
        return "base64:" + s[7:].strip(), None
    if s.startswith("data:"):
        comma = s.find(",")
        if comma < 0 or ";base64" not in s[:comma]:
            raise _BadRow("bad_base64")
        return "base64:" + s[comma + 1:].strip(), None
    if _is_url(s):
        return s, s
    if _looks_like_base64_image(s):
        return "base64:" + s, None
    if os.path.isabs(s):
        return os.path.normpath(s), s
    return _join(base_dir, s), s


# ----------------------------------------------------------------------------- images

def read_image_bytes(ref: str, retries: int = 3) -> bytes:
    """Raw bytes of a resolved reference. ValueError for bad base64, OSError-likes otherwise."""
    if ref.startswith("base64:"):
        return _b64decode(ref[7:])
    if _is_url(ref):
        for attempt in range(retries):
            try:
                with fsspec.open(ref, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                raise
            except Exception:
                if attempt == retries - 1:
                    raise
                time.sleep(0.5 * 2 ** attempt)
    with open(ref, "rb") as f:
        return f.read()


def decode_image(data: bytes) -> Image.Image:
    """Fully decoded, EXIF-oriented RGB image (transparency composited on white)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    if im.mode.startswith("I") or im.mode == "F":
        im = im.point(lambda v: v * (1 / 256)) if im.mode.startswith("I;16") else im
        im = im.convert("L")
    return im.convert("RGB")


def resize_image(im: Image.Image, size: int, mode: str) -> Image.Image:
    """Keep the aspect ratio; only shrink; size 0 = unchanged."""
    if size <= 0:
        return im
    w, h = im.size
    side = max(w, h) if mode == "longest" else min(w, h)
    if side <= size:
        return im
    scale = size / side
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(new, Image.Resampling.LANCZOS)


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def examine_image(task):
    """Pass 1 (in a worker): read, hash, decode, check, encode. Returns a small tuple."""
    ref, resize, mode, quality, min_side, max_aspect = task
    try:
        data = read_image_bytes(ref)
    except Base64Error as e:
        return ("bad_base64", str(e)[:200])
    except Exception as e:  # noqa: BLE001 - any read failure is a counted bad row
        return ("unreadable_image", f"{type(e).__name__}: {e}"[:200])
    sha1 = hashlib.sha1(data).hexdigest()
    try:
        im = decode_image(data)
    except Exception as e:  # noqa: BLE001
        return ("undecodable_image", f"{type(e).__name__}: {e}"[:200])
    w, h = im.size
    if min(w, h) < min_side or (max_aspect > 0 and max(w, h) / max(1, min(w, h)) > max_aspect):
        return ("ok", sha1, w, h, 0, 0, 0)  # filtered later: no need to encode
    out = resize_image(im, resize, mode)
    jpg = encode_jpeg(out, quality)
    return ("ok", sha1, w, h, out.size[0], out.size[1], len(jpg))


def render_image(task):
    """Pass 2 (in a worker): the JPEG bytes of one sample, checked against the plan."""
    ref, sha1, size, resize, mode, quality = task
    try:
        data = read_image_bytes(ref)
        if hashlib.sha1(data).hexdigest() != sha1:
            return ("error", f"image changed since the plan was made: {ref[:200]}")
        jpg = encode_jpeg(resize_image(decode_image(data), resize, mode), quality)
    except Exception as e:  # noqa: BLE001
        return ("error", f"{type(e).__name__}: {e} ({ref[:200]})")
    if len(jpg) != size:
        return ("error", f"re-encoded JPEG has {len(jpg)} bytes, the plan says {size} "
                         f"(another Pillow/libjpeg than the planning run?): {ref[:200]}")
    return ("ok", jpg)


# ----------------------------------------------------------------------------- inputs

class InputFile:
    """One click-log file: its filesystem, path, name relative to the input spec, format and size."""

    def __init__(self, fs, path, rel, fmt):
        self.fs, self.path, self.rel, self.format = fs, path, rel, fmt
        if _is_local(fs):
            self.url = os.path.abspath(path)
            self.base_dir = os.path.dirname(self.url)
        else:
            self.url = fs.unstrip_protocol(path)
            self.base_dir = posixpath.dirname(self.url)
        self.size = fs.size(path)


def _is_local(fs) -> bool:
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


# ----------------------------------------------------------------------------- planning

class _RefAgg:
    """Rows with the same (normalised query, resolved image reference)."""
    __slots__ = ("qnorm", "ref", "image_path", "first", "locs", "rows", "clicks", "impressions",
                 "query", "image_id", "image_id_loc", "timestamp")

    def __init__(self, qnorm, ref, image_path, loc, query, timestamp):
        self.qnorm, self.ref, self.image_path = qnorm, ref, image_path
        self.first, self.locs = loc, [loc]
        self.rows = self.clicks = self.impressions = 0
        self.query, self.timestamp = query, timestamp
        self.image_id, self.image_id_loc = None, None


class _Pair:
    __slots__ = ("qnorm", "sha1", "first", "locs", "rows", "clicks", "impressions", "query",
                 "image_path", "ref", "timestamp", "info")

    def __init__(self, agg, sha1, info):
        self.qnorm, self.sha1, self.info = agg.qnorm, sha1, info
        self.first, self.locs = agg.first, list(agg.locs)
        self.rows, self.clicks, self.impressions = agg.rows, agg.clicks, agg.impressions
        self.query, self.image_path, self.ref, self.timestamp = agg.query, agg.image_path, agg.ref, agg.timestamp


class _Reasons:
    """Counts per reason with the first few locations (file index, line)."""

    def __init__(self, reasons):
        self.rows = {r: 0 for r in reasons}
        self.pairs = {r: 0 for r in reasons}
        self.locs = {r: [] for r in reasons}

    def add(self, reason, rows=1, locs=(), pairs=0):
        self.rows[reason] = self.rows.get(reason, 0) + rows
        self.pairs[reason] = self.pairs.get(reason, 0) + pairs
        lst = self.locs.setdefault(reason, [])
        lst.extend(locs)
        lst.sort()
        del lst[FIRST_N:]


def _loc_str(files, loc):
    return f"{files[loc[0]].rel}:{loc[1]}"


def _tar_member_bytes(n):
    return _TAR_BLOCK + (n + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK


def _tar_file_bytes(members_bytes):
    total = members_bytes + 2 * _TAR_BLOCK
    return (total + _TAR_RECORD - 1) // _TAR_RECORD * _TAR_RECORD


def _pool(workers):
    if workers <= 1:
        return None
    return multiprocessing.get_context().Pool(workers)


def _progress(args, **kw):
    from tqdm import tqdm

    return tqdm(file=sys.stderr, disable=True if getattr(args, "no_progress", False) else None, dynamic_ncols=True, **kw)


def make_plan(args, files, pool):
    """Pass 1: read the logs, examine the images, aggregate, filter, shuffle, split and shard."""
    cols = {"query": args.query_col, "image": args.image_col, "clicks": args.clicks_col,
            "impressions": args.impressions_col, "query_id": args.query_id_col,
            "image_id": args.image_id_col, "timestamp": args.timestamp_col}
    wanted = list(dict.fromkeys(cols.values()))
    bad = _Reasons(BAD_REASONS)
    input_rows = blank_lines = 0
    aggs: dict[tuple, _RefAgg] = {}
    query_ids: dict[str, tuple] = {}           # qnorm -> (loc, id) first non-empty in row order
    per_file_rows = []
    has_timestamp = False
    with _progress(args, desc="read logs", unit=" rows") as bar:
        for fi, inp in enumerate(files):
            n_file = 0
            present = None
            for line, rec, reason in iter_rows(inp, wanted):
                if line == "header":
                    if rec is not None:
                        present = set(rec)
                        missing = [c for c in (cols["query"], cols["image"]) if c not in present]
                        if missing:
                            raise BuildError(f"{inp.rel}: no column {missing} (columns: {sorted(present)}); "
                                             f"name them with --query-col/--image-col")
                        has_timestamp |= cols["timestamp"] in present
                    continue
                if rec is None and reason is None:
                    blank_lines += 1
                    continue
                input_rows += 1
                n_file += 1
                bar.update(1)
                loc = (fi, line)
                if reason is not None:
                    bad.add(reason, 1, [loc])
                    continue
                try:
                    q = rec.get(cols["query"])
                    if q is None or (isinstance(q, str) and not q.strip()):
                        raise _BadRow("missing_field")
                    if isinstance(q, bool) or not isinstance(q, (str, int, float)):
                        raise _BadRow("bad_field_type")
                    q = str(q)
                    ref, image_path = canonical_image_ref(rec.get(cols["image"]), args.images_root or inp.base_dir)
                    clicks = parse_count(rec.get(cols["clicks"]))
                    impressions = parse_count(rec.get(cols["impressions"]))
                    qnorm = normalize_query(q)
                    if not qnorm:
                        raise _BadRow("missing_field")
                except _BadRow as e:
                    bad.add(e.reason, 1, [loc])
                    continue
                if inp.format == "jsonl":
                    has_timestamp |= cols["timestamp"] in rec
                clicks = 1 if clicks is None else clicks
                impressions = 0 if impressions is None else impressions
                key = (qnorm, ref)
                agg = aggs.get(key)
                if agg is None:
                    agg = aggs[key] = _RefAgg(qnorm, ref, image_path, loc, q,
                                              _json_scalar(parse_id(rec.get(cols["timestamp"]))))
                elif len(agg.locs) < FIRST_N:
                    agg.locs.append(loc)
                agg.rows += 1
                agg.clicks += clicks
                agg.impressions += impressions
                qid = parse_id(rec.get(cols["query_id"]))
                if qid is not None and qnorm not in query_ids:
                    query_ids[qnorm] = qid
                iid = parse_id(rec.get(cols["image_id"]))
                if iid is not None and agg.image_id is None:
                    agg.image_id, agg.image_id_loc = iid, loc
            per_file_rows.append(n_file)

    # examine every distinct image reference once
    refs = list(dict.fromkeys(a.ref for a in aggs.values()))
    tasks = [(r, args.resize, args.resize_mode, args.jpeg_quality, args.min_image_side, args.max_aspect_ratio)
             for r in refs]
    results = {}
    with _progress(args, desc="examine images", unit=" img", total=len(tasks)) as bar:
        it = (pool.imap(examine_image, tasks, chunksize=max(1, min(64, len(tasks) // (8 * args.workers) or 1)))
              if pool else map(examine_image, tasks))
        for ref, res in zip(refs, it):
            results[ref] = res
            bar.update(1)

    # aggregate by image content
    pairs: dict[tuple, _Pair] = {}
    image_ids: dict[str, tuple] = {}           # sha1 -> (loc, id)
    sha_seen: dict[str, str] = {}
    for ref in refs:
        res = results[ref]
        if res[0] == "ok" and res[1] not in sha_seen:
            sha_seen[res[1]] = ref
    refs_ok = sum(1 for r in refs if results[r][0] == "ok")
    for agg in aggs.values():
        res = results[agg.ref]
        if res[0] != "ok":
            bad.add(res[0], agg.rows, agg.locs)
            continue
        sha1 = res[1]
        if agg.image_id is not None:
            cur = image_ids.get(sha1)
            if cur is None or agg.image_id_loc < cur[0]:
                image_ids[sha1] = (agg.image_id_loc, agg.image_id)
        key = (agg.qnorm, sha1)
        pair = pairs.get(key)
        if pair is None:
            pairs[key] = _Pair(agg, sha1, res)
        else:
            pair.rows += agg.rows
            pair.clicks += agg.clicks
            pair.impressions += agg.impressions
            pair.locs = sorted(pair.locs + agg.locs)[:FIRST_N]

    # filters
    filt = _Reasons(FILTER_REASONS)
    kept = []
    dup_written = dup_total = 0
    for pair in pairs.values():
        dup_total += pair.rows - 1
        _, _, w, h, _, _, _ = pair.info
        reason = None
        if pair.clicks < args.min_clicks:
            reason = "min_clicks"
        elif args.min_ctr > 0 and pair.impressions > 0 and pair.clicks / pair.impressions < args.min_ctr:
            reason = "min_ctr"
        elif len(pair.qnorm) < args.min_query_len:
            reason = "query_too_short"
        elif args.max_query_len > 0 and len(pair.qnorm) > args.max_query_len:
            reason = "query_too_long"
        elif min(w, h) < args.min_image_side:
            reason = "image_too_small"
        elif args.max_aspect_ratio > 0 and max(w, h) / max(1, min(w, h)) > args.max_aspect_ratio:
            reason = "aspect_ratio"
        if reason:
            filt.add(reason, pair.rows, pair.locs, pairs=1)
        else:
            kept.append(pair)
            dup_written += pair.rows - 1

    # shuffle, number, split, describe
    kept.sort(key=lambda p: shuffle_key(args.seed, p.qnorm, p.sha1))
    split_rows = {s: [] for s in SPLITS}
    for index, pair in enumerate(kept):
        key = f"{index:09d}"
        split = split_of(pair.qnorm, args.val_fraction)
        _, sha1, w, h, ow, oh, jpg_size = pair.info
        qid = query_ids.get(pair.qnorm)
        iid = image_ids.get(sha1)
        meta = {
            "key": key,
            "query_id": qid if qid is not None else query_hash_id(pair.qnorm),
            "image_id": iid[1] if iid is not None else image_hash_id(sha1),
            "clicks": pair.clicks,
            "impressions": pair.impressions,
            "query": pair.query,
            "source": _loc_str(files, pair.first),
            "rows": pair.rows,
            "image_sha1": sha1,
            "image_path": pair.image_path,
            "width": ow, "height": oh, "original_width": w, "original_height": h,
            "split": split,
        }
        if has_timestamp:
            meta["timestamp"] = pair.timestamp
        js = json.dumps(meta, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        txt = pair.qnorm
        nbytes = (_tar_member_bytes(jpg_size) + _tar_member_bytes(len(txt.encode("utf-8")))
                  + _tar_member_bytes(len(js.encode("utf-8"))))
        split_rows[split].append({"key": key, "ref": pair.ref, "sha1": sha1, "jpg_size": jpg_size,
                                  "txt": txt, "json": js, "nbytes": nbytes})

    shards = {}
    for split in SPLITS:
        if split == "val" and args.val_fraction <= 0:
            continue
        shards[split] = []
        cur, cur_bytes = 0, 0
        for row in split_rows[split]:
            if cur and (cur >= args.shard_size or _tar_file_bytes(cur_bytes + row["nbytes"]) > args.max_shard_bytes):
                shards[split].append({"count": cur, "bytes": _tar_file_bytes(cur_bytes)})
                cur, cur_bytes = 0, 0
            row["shard"] = len(shards[split])
            cur += 1
            cur_bytes += row["nbytes"]
        if cur:
            shards[split].append({"count": cur, "bytes": _tar_file_bytes(cur_bytes)})
        for i, sh in enumerate(shards[split]):
            sh["name"] = f"shard-{i:06d}.tar"

    bad_total = sum(bad.rows.values())
    filtered_rows = sum(filt.rows.values())
    written = len(kept)
    stats = {
        "input_rows": input_rows,
        "blank_lines_skipped": blank_lines,
        "inputs": [{"file": f.rel, "url": f.url, "format": f.format, "rows": n}
                   for f, n in zip(files, per_file_rows)],
        "bad_rows": {
            "total": bad_total,
            "by_reason": {r: {"rows": bad.rows[r], "first_lines": [_loc_str(files, l) for l in bad.locs[r]]}
                          for r in bad.rows},
        },
        "pairs": {"aggregated": len(pairs), "filtered": sum(filt.pairs.values()), "written": written},
        "filtered": {
            "total_pairs": sum(filt.pairs.values()),
            "total_rows": filtered_rows,
            "by_reason": {r: {"pairs": filt.pairs[r], "rows": filt.rows[r],
                              "first_lines": [_loc_str(files, l) for l in filt.locs[r]]} for r in filt.rows},
        },
        "duplicate_rows": {"total": dup_total, "in_written_pairs": dup_written,
                           "in_filtered_pairs": dup_total - dup_written},
        "images": {
            "distinct_references": len(refs),
            "readable_references": refs_ok,
            "unique_images": len(sha_seen),
            "duplicate_images": refs_ok - len(sha_seen),
            "dedup_hash": "sha1 of the raw image bytes (after base64 decoding)",
        },
        "written": {s: {"samples": sum(x["count"] for x in shards[s]), "shards": len(shards[s])} for s in shards},
        "accounting": {
            "identity": "input_rows == bad_rows + duplicate_rows + filtered_rows + written_samples",
            "note": "duplicate_rows: rows merged into an earlier row's written pair; filtered_rows: all rows "
                    "of filtered pairs, their merged duplicates included",
            "input_rows": input_rows,
            "bad_rows": bad_total,
            "duplicate_rows": dup_written,
            "filtered_rows": filtered_rows,
            "written_samples": written,
            "sum": bad_total + dup_written + filtered_rows + written,
            "ok": input_rows == bad_total + dup_written + filtered_rows + written,
        },
    }
    if not stats["accounting"]["ok"]:  # pragma: no cover - an internal invariant
        raise AssertionError(f"accounting does not add up: {stats['accounting']}")
    return shards, split_rows, stats


# ----------------------------------------------------------------------------- output

PLAN_OPTIONS = (
    "format", "images_root", "query_col", "image_col", "clicks_col", "impressions_col", "query_id_col",
    "image_id_col", "timestamp_col", "min_clicks", "min_ctr", "min_query_len", "max_query_len",
    "min_image_side", "max_aspect_ratio", "resize", "resize_mode", "jpeg_quality", "seed",
    "val_fraction", "shard_size", "max_shard_bytes",
)


def _rename(fs, src, dst):
    if _is_local(fs):
        os.replace(src, dst)
    else:
        fs.mv(src, dst)


def _write_atomic(fs, path, data: bytes):
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    _rename(fs, tmp, path)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n").encode("utf-8")


def fingerprint(args, files) -> str:
    spec = {
        "plan_version": PLAN_VERSION,
        "options": {k: getattr(args, k) for k in PLAN_OPTIONS},
        "inputs": [[f.url, f.size] for f in files],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()


def save_plan(fs, root, fp, args, shards, split_rows, stats):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(s, r) for s in SPLITS if s in shards for r in split_rows[s]]
    table = pa.table({
        "split": pa.array([s for s, _ in rows], pa.string()),
        "shard": pa.array([r["shard"] for _, r in rows], pa.int32()),
        "key": pa.array([r["key"] for _, r in rows], pa.string()),
        "ref": pa.array([r["ref"] for _, r in rows], pa.large_string()),
        "sha1": pa.array([r["sha1"] for _, r in rows], pa.string()),
        "jpg_size": pa.array([r["jpg_size"] for _, r in rows], pa.int64()),
        "txt": pa.array([r["txt"] for _, r in rows], pa.string()),
        "json": pa.array([r["json"] for _, r in rows], pa.string()),
    })
    path = f"{root}/{PAIRS_FILE}"
    with fs.open(path + ".tmp", "wb") as f:
        pq.write_table(table, f)
    _rename(fs, path + ".tmp", path)
    plan = {"plan_version": PLAN_VERSION, "fingerprint": fp,
            "options": {k: getattr(args, k) for k in PLAN_OPTIONS},
            "shards": shards, "stats": stats}
    _write_atomic(fs, f"{root}/{PLAN_FILE}", _json_bytes(plan))


def load_plan_rows(fs, root):
    import pyarrow.parquet as pq

    with fs.open(f"{root}/{PAIRS_FILE}", "rb") as f:
        table = pq.read_table(f)
    out = {}
    for r in table.to_pylist():
        out.setdefault((r["split"], r["shard"]), []).append(r)
    return out


def _tar_add(tar, name, data: bytes):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = TAR_MTIME
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tar.addfile(ti, io.BytesIO(data))


def write_shards(args, fs, root, shards, rows_by_shard, pending, pool):
    """Pass 2: write the pending shards (tmp name, then atomic rename)."""
    tasks = ((r["ref"], r["sha1"], r["jpg_size"], args.resize, args.resize_mode, args.jpeg_quality)
             for key in pending for r in rows_by_shard.get(key, ()))
    results = pool.imap(render_image, tasks, chunksize=4) if pool else map(render_image, tasks)
    total = sum(shards[s][i]["count"] for s, i in pending)
    failed, samples = [], 0
    crash_after = getattr(args, "debug_crash_after_shards", None)  # test hook: simulate a kill
    with _progress(args, desc="write shards", unit=" img", total=total) as bar:
        for n, (split, i) in enumerate(pending):
            sh = shards[split][i]
            final = f"{root}/{split}/{sh['name']}"
            tmp = final + ".tmp"
            rows = rows_by_shard.get((split, i), [])
            error = None
            with fs.open(tmp, "wb") as f:
                tar = tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT)
                for j, row in enumerate(rows):
                    status, payload = next(results)
                    if error is None and status != "ok":
                        error = f"{row['key']}: {payload}"
                    if error is not None:
                        continue
                    key = row["key"]
                    _tar_add(tar, key + ".jpg", payload)
                    _tar_add(tar, key + ".txt", row["txt"].encode("utf-8"))
                    _tar_add(tar, key + ".json", row["json"].encode("utf-8"))
                    bar.update(1)
                    if crash_after is not None and n == crash_after and j == len(rows) // 2:
                        f.flush()
                        os._exit(75)  # simulates a killed build: half a .tmp shard, no cleanup
                tar.close()
            if error is None and fs.size(tmp) != sh["bytes"]:
                error = f"wrote {fs.size(tmp)} bytes, the plan says {sh['bytes']}"
            if error is not None:
                fs.rm(tmp)
                failed.append({"shard": f"{split}/{sh['name']}", "error": error})
                print(f"error: {split}/{sh['name']} not written: {error}", file=sys.stderr)
                continue
            _rename(fs, tmp, final)
            samples += sh["count"]
    return samples, failed


def _prepare_out(args, fs, root, fp):
    """Returns the saved plan when it can be reused, else None (after checks and --overwrite)."""
    plan_path = f"{root}/{PLAN_FILE}"
    plan = None
    if fs.exists(plan_path):
        with fs.open(plan_path, "rb") as f:
            plan = json.loads(f.read().decode("utf-8"))
        if plan.get("fingerprint") == fp and fs.exists(f"{root}/{PAIRS_FILE}") and not args.overwrite:
            return plan
    stale = [p for s in SPLITS if fs.exists(f"{root}/{s}")
             for p in fs.ls(f"{root}/{s}", detail=False) if p.endswith((".tar", ".tar.tmp", SIZES_FILE))]
    if (plan is not None or stale) and not args.overwrite:
        what = "different inputs or options" if plan is not None else "an unknown build (no plan file)"
        raise BuildError(f"{args.out} holds shards of {what}; refusing to mix them. "
                         f"Use a new output folder or pass --overwrite.")
    if args.overwrite:
        for s in SPLITS:
            if fs.exists(f"{root}/{s}"):
                fs.rm(f"{root}/{s}", recursive=True)
        for name in (PLAN_FILE, PAIRS_FILE, REPORT_FILE):
            if fs.exists(f"{root}/{name}"):
                fs.rm(f"{root}/{name}")
    return None


def print_summary(report, file=sys.stdout):
    acc = report["accounting"]
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p(f"[build_shards] {report['out']}")
    p(f"  input rows        {acc['input_rows']}")
    p(f"  bad rows          {acc['bad_rows']}   " + ", ".join(
        f"{r}={v['rows']}" for r, v in report["bad_rows"]["by_reason"].items() if v["rows"]))
    p(f"  duplicate rows    {acc['duplicate_rows']} merged into written pairs "
      f"({report['duplicate_rows']['total']} in all pairs); duplicate images "
      f"{report['images']['duplicate_images']}")
    p(f"  filtered rows     {acc['filtered_rows']}   " + ", ".join(
        f"{r}={v['rows']} rows/{v['pairs']} pairs" for r, v in report["filtered"]["by_reason"].items() if v["rows"]))
    p(f"  written samples   {acc['written_samples']}   " + ", ".join(
        f"{s}: {v['samples']} in {v['shards']} shards" for s, v in report["written"].items()))
    p(f"  accounting        {acc['input_rows']} = {acc['bad_rows']} + {acc['duplicate_rows']} + "
      f"{acc['filtered_rows']} + {acc['written_samples']}  ({'ok' if acc['ok'] else 'MISMATCH'})")
    run = report["run"]
    p(f"  this run          {run['shards_written']} shards written, {run['shards_skipped']} skipped, "
      f"{run['shards_failed']} failed; {run['time_s']['total']:.1f} s, {run['images_per_s']:.0f} images/s")


def build(args) -> dict:
    """Run a build from parsed options; returns the report (also written to OUT/report.json)."""
    t0 = time.time()
    _check_args(args)
    files = list_inputs(args.inputs, args.format)
    fs, root = fsspec.core.url_to_fs(args.out)
    root = root.rstrip("/") or "/"
    if _is_local(fs):
        root = os.path.abspath(root)
    fs.makedirs(root, exist_ok=True)
    fp = fingerprint(args, files)
    plan = _prepare_out(args, fs, root, fp)
    pool = None
    ok = False
    try:
        if plan is None:
            pool = _pool(args.workers)
            shards, split_rows, stats = make_plan(args, files, pool)
            save_plan(fs, root, fp, args, shards, split_rows, stats)
            rows_by_shard = {}
            for s in shards:
                for r in split_rows[s]:
                    rows_by_shard.setdefault((s, r["shard"]), []).append(r)
            plan_reused = False
        else:
            shards, stats = plan["shards"], plan["stats"]
            rows_by_shard = None
            plan_reused = True
        t_plan = time.time()
        for s in shards:
            fs.makedirs(f"{root}/{s}", exist_ok=True)
        pending, skipped = [], 0
        for s in shards:
            for i, sh in enumerate(shards[s]):
                path = f"{root}/{s}/{sh['name']}"
                if fs.exists(path):
                    if fs.size(path) == sh["bytes"]:
                        skipped += 1
                        continue
                    print(f"warning: {s}/{sh['name']} has {fs.size(path)} bytes, the plan says "
                          f"{sh['bytes']}: rewriting it", file=sys.stderr)
                pending.append((s, i))
        samples, failed = 0, []
        if pending:
            if rows_by_shard is None:
                rows_by_shard = load_plan_rows(fs, root)
            if pool is None:
                pool = _pool(args.workers)
            samples, failed = write_shards(args, fs, root, shards, rows_by_shard, pending, pool)
        ok = True
    finally:
        if pool is not None:
            if ok:
                pool.close()
            else:
                pool.terminate()
            pool.join()
    t_write = time.time()
    failed_names = {f["shard"] for f in failed}
    for s in shards:
        if any(f"{s}/{sh['name']}" in failed_names for sh in shards[s]):
            continue
        sizes = {sh["name"]: sh["count"] for sh in shards[s]}
        if not sizes:
            print(f"warning: the {s} split is empty", file=sys.stderr)
        _write_atomic(fs, f"{root}/{s}/{SIZES_FILE}", (json.dumps(sizes, indent=1) + "\n").encode("utf-8"))
    write_s = max(t_write - t_plan, 1e-9)
    report = {"out": args.out, **stats}
    report["shards"] = {s: len(shards[s]) for s in shards}
    report["options"] = {k: getattr(args, k) for k in PLAN_OPTIONS}
    report["run"] = {
        "plan_reused": plan_reused,
        "shards_written": len(pending) - len(failed),
        "shards_skipped": skipped,
        "shards_failed": len(failed),
        "failed": failed,
        "samples_written": samples,
        "workers": args.workers,
        "time_s": {"plan": round(t_plan - t0, 3), "write": round(t_write - t_plan, 3),
                   "total": round(time.time() - t0, 3)},
        "images_per_s": round(samples / write_s, 1) if samples else 0.0,
    }
    report["time_s"] = report["run"]["time_s"]["total"]
    report["throughput_images_per_s"] = report["run"]["images_per_s"]
    _write_atomic(fs, f"{root}/{REPORT_FILE}", _json_bytes(report))
    return report


def _check_args(args):
    if args.shard_size < 1:
        raise BuildError("--shard-size must be >= 1")
    if args.max_shard_bytes < 1:
        raise BuildError("--max-shard-bytes must be >= 1")
    if not 0.0 <= args.val_fraction < 1.0:
        raise BuildError("--val-fraction must be in [0, 1)")
    if not 1 <= args.jpeg_quality <= 100:
        raise BuildError("--jpeg-quality must be in [1, 100]")
    if args.resize < 0:
        raise BuildError("--resize must be >= 0")
    if args.min_query_len < 0 or args.max_query_len < 0:
        raise BuildError("--min-query-len/--max-query-len must be >= 0")
    if args.workers < 1:
        args.workers = 1
    if args.images_root and not _is_url(args.images_root):
        args.images_root = os.path.abspath(args.images_root)


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1000000, 500MB, 1GB)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="build_shards.py", description="Build WebDataset shards of <query, image> pairs from click logs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="LOGS", help="click-log files, globs or folders (local or fsspec URLs)")
    ap.add_argument("--out", required=True, help="output folder (local or fsspec URL)")
    ap.add_argument("--format", choices=["tsv", "csv", "jsonl", "parquet"], default=None,
                    help="input format (default: from the file extension)")
    ap.add_argument("--images-root", default=None,
                    help="folder or URL that relative image paths are relative to (default: the log file's folder)")
    g = ap.add_argument_group("columns")
    for name, default in (("query", "query"), ("image", "image"), ("clicks", "clicks"),
                          ("impressions", "impressions"), ("query-id", "query_id"), ("image-id", "image_id"),
                          ("timestamp", "timestamp")):
        g.add_argument(f"--{name}-col", default=default)
    g = ap.add_argument_group("filters")
    g.add_argument("--min-clicks", type=int, default=1, help="minimum aggregated clicks of a pair")
    g.add_argument("--min-ctr", type=float, default=0.0, help="minimum clicks/impressions (when impressions > 0)")
    g.add_argument("--min-query-len", type=int, default=1, help="minimum characters of the normalised query")
    g.add_argument("--max-query-len", type=int, default=128, help="maximum characters (0 = no limit)")
    g.add_argument("--min-image-side", type=int, default=32, help="minimum shorter side in pixels")
    g.add_argument("--max-aspect-ratio", type=float, default=4.0, help="maximum long/short side (0 = no limit)")
    g = ap.add_argument_group("images")
    g.add_argument("--resize", type=int, default=0, help="target side in pixels, only shrinks (0 = no resize)")
    g.add_argument("--resize-mode", choices=["longest", "shortest"], default="longest",
                   help="which side --resize applies to (aspect ratio kept)")
    g.add_argument("--jpeg-quality", type=int, default=90)
    g = ap.add_argument_group("output")
    g.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    g.add_argument("--val-fraction", type=float, default=0.0, help="fraction of queries held out in val/")
    g.add_argument("--shard-size", type=int, default=10000, help="maximum samples per shard")
    g.add_argument("--max-shard-bytes", type=_size, default=1024 ** 3, help="maximum tar size (e.g. 500MB)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes reading/decoding/encoding images (1 = in this process)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the shards, plan and report of an earlier build in --out first")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--quiet", action="store_true", help="no summary")
    ap.add_argument("--debug-crash-after-shards", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        report = build(args)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print_summary(report)
    if report["run"]["shards_failed"]:
        print(f"error: {report['run']['shards_failed']} shard(s) failed (see {REPORT_FILE}); "
              f"run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
