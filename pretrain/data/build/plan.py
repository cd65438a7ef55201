"""The plan of a build: which pairs go into which shard under which key, decided before any shard is written.

The steps, each a function over the previous one's output, in this order::

    read_rows        read every row, normalise the query (ids.normalize_query), aggregate by (query, image ref)
    examine_images   read, hash, decode, check and encode every distinct image reference once (workers)
    merge_by_content deduplicate images by content (SHA-1 of the bytes): aggregate by (query, image content)
    filter_pairs     min_clicks, min_ctr, query_too_short, query_too_long, image_too_small, aspect_ratio
    describe         global shuffle (blake2b of seed, query, image hash), keys, train/val split, KEY.json
    assign_shards    cut each split into shards by sample count and exact tar size

Everything is deterministic from the inputs and the options. Ids follow ``pretrain.data.ids``: a query id
or image id given in the log wins (the first non-empty one in row order), else ``query_hash`` of the
normalised query and ``image_hash`` of the image bytes, as the loader computes them for folders without
ids. This in-memory implementation holds one small object per distinct (query, image) pair.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from .. import tar
from ..ids import normalize_query, query_hash
from .images import IMAGE_REASONS, examine_image
from .inputs import BAD_ROW_REASONS, BadRow, canonical_image_ref, iter_rows, parse_count, parse_id
from .options import BuildError, BuildOptions

SPLITS = ("train", "val")
BAD_REASONS = BAD_ROW_REASONS + IMAGE_REASONS
FILTER_REASONS = ("min_clicks", "min_ctr", "query_too_short", "query_too_long", "image_too_small", "aspect_ratio")
FIRST_N = 5
Loc = Tuple[int, int]  # (input file index, line or row number)


class ImageInfo(NamedTuple):
    """What ``examine_image`` learnt about one readable image."""
    sha1: str
    image_id: int        # ids.image_hash of the bytes
    width: int           # decoded (EXIF-oriented) size
    height: int
    stored_width: int    # after resizing (0 when the image is filtered anyway)
    stored_height: int
    jpeg_bytes: int


class Agg:
    """Rows with the same (normalised query, resolved image reference or, after merging, image content)."""
    __slots__ = ("qnorm", "ref", "image_path", "first", "locs", "rows", "clicks", "impressions",
                 "query", "image_id", "image_id_loc", "timestamp", "info")

    def __init__(self, qnorm, ref, image_path, loc, query, timestamp):
        self.qnorm, self.ref, self.image_path = qnorm, ref, image_path
        self.first, self.locs = loc, [loc]
        self.rows = self.clicks = self.impressions = 0
        self.query, self.timestamp = query, timestamp
        self.image_id, self.image_id_loc = None, None
        self.info: Optional[ImageInfo] = None


class Reasons:
    """Counts per reason with the first few locations."""

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


class RowsRead(NamedTuple):
    aggs: Dict[Tuple[str, str], Agg]     # (qnorm, ref) -> rows
    query_ids: Dict[str, object]          # qnorm -> the log's first non-empty query id
    bad: Reasons
    input_rows: int
    blank_lines: int
    per_file_rows: List[int]
    has_timestamp: bool


def split_of(qnorm: str, val_fraction: float) -> str:
    """train/val by a stable hash of the normalised query."""
    if val_fraction <= 0:
        return "train"
    u = int.from_bytes(hashlib.blake2b(qnorm.encode("utf-8"), digest_size=8, person=b"wl-split").digest(), "big")
    return "val" if u / 2.0 ** 64 < val_fraction else "train"


def shuffle_key(seed: int, qnorm: str, sha1_hex: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{qnorm}\0{sha1_hex}".encode("utf-8"), digest_size=16,
                           person=b"wl-shuffle").digest()


def _json_scalar(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def read_rows(options: BuildOptions, files, progress: Callable) -> RowsRead:
    """Read every row of every file; count bad rows; aggregate good ones by (normalised query, image ref)."""
    o = options
    cols = {"query": o.query_col, "image": o.image_col, "clicks": o.clicks_col, "impressions": o.impressions_col,
            "query_id": o.query_id_col, "image_id": o.image_id_col, "timestamp": o.timestamp_col}
    wanted = list(dict.fromkeys(cols.values()))
    bad = Reasons(BAD_REASONS)
    input_rows = blank_lines = 0
    aggs: Dict[Tuple[str, str], Agg] = {}
    query_ids: Dict[str, object] = {}
    per_file_rows, has_timestamp = [], False
    with progress(desc="read logs", unit=" rows") as bar:
        for fi, inp in enumerate(files):
            n_file = 0
            for line, rec, reason in iter_rows(inp, wanted):
                if line == "header":
                    if rec is not None:
                        missing = [c for c in (cols["query"], cols["image"]) if c not in rec]
                        if missing:
                            raise BuildError(f"{inp.rel}: no column {missing} (columns: {sorted(rec)}); "
                                             f"name them with --query-col/--image-col")
                        has_timestamp |= cols["timestamp"] in rec
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
                        raise BadRow("missing_field")
                    if isinstance(q, bool) or not isinstance(q, (str, int, float)):
                        raise BadRow("bad_field_type")
                    q = str(q)
                    ref, image_path = canonical_image_ref(rec.get(cols["image"]), o.images_root or inp.base_dir)
                    clicks = parse_count(rec.get(cols["clicks"]))
                    impressions = parse_count(rec.get(cols["impressions"]))
                    qnorm = normalize_query(q)
                    if not qnorm:
                        raise BadRow("missing_field")
                except BadRow as e:
                    bad.add(e.reason, 1, [loc])
                    continue
                if inp.format == "jsonl":
                    has_timestamp |= cols["timestamp"] in rec
                agg = aggs.get((qnorm, ref))
                if agg is None:
                    agg = aggs[(qnorm, ref)] = Agg(qnorm, ref, image_path, loc, q,
                                                   _json_scalar(parse_id(rec.get(cols["timestamp"]))))
                elif len(agg.locs) < FIRST_N:
                    agg.locs.append(loc)
                agg.rows += 1
                agg.clicks += 1 if clicks is None else clicks
                agg.impressions += 0 if impressions is None else impressions
                qid = parse_id(rec.get(cols["query_id"]))
                if qid is not None and qnorm not in query_ids:
                    query_ids[qnorm] = qid
                iid = parse_id(rec.get(cols["image_id"]))
                if iid is not None and agg.image_id is None:
                    agg.image_id, agg.image_id_loc = iid, loc
            per_file_rows.append(n_file)
    return RowsRead(aggs, query_ids, bad, input_rows, blank_lines, per_file_rows, has_timestamp)


def examine_images(refs: List[str], options: BuildOptions, pool, progress: Callable) -> Dict[str, tuple]:
    """ref -> ``examine_image`` result, each distinct reference once (in ``pool`` when given)."""
    o = options
    tasks = [(r, o.resize, o.resize_mode, o.jpeg_quality, o.min_image_side, o.max_aspect_ratio) for r in refs]
    results = {}
    with progress(desc="examine images", unit=" img", total=len(tasks)) as bar:
        chunk = max(1, min(64, len(tasks) // (8 * o.workers) or 1))
        it = pool.imap(examine_image, tasks, chunksize=chunk) if pool else map(examine_image, tasks)
        for ref, res in zip(refs, it):
            results[ref] = res
            bar.update(1)
    return results


def merge_by_content(aggs, results, bad: Reasons):
    """Aggregate by (normalised query, image content); rows of unusable images are counted as bad.
    Returns (pairs, image ids given in the log per sha1, image stats)."""
    pairs: Dict[Tuple[str, str], Agg] = {}
    log_image_ids: Dict[str, tuple] = {}   # sha1 -> (loc, id): the earliest row's
    refs = list(dict.fromkeys(a.ref for a in aggs.values()))
    refs_ok = sum(1 for r in refs if results[r][0] == "ok")
    sha_seen = {results[r][1] for r in refs if results[r][0] == "ok"}
    for agg in aggs.values():
        res = results[agg.ref]
        if res[0] != "ok":
            bad.add(res[0], agg.rows, agg.locs)
            continue
        info = ImageInfo(*res[1:])
        if agg.image_id is not None:
            cur = log_image_ids.get(info.sha1)
            if cur is None or agg.image_id_loc < cur[0]:
                log_image_ids[info.sha1] = (agg.image_id_loc, agg.image_id)
        pair = pairs.get((agg.qnorm, info.sha1))
        if pair is None:
            agg.info = info
            pairs[(agg.qnorm, info.sha1)] = agg
        else:
            pair.rows += agg.rows
            pair.clicks += agg.clicks
            pair.impressions += agg.impressions
            pair.locs = sorted(pair.locs + agg.locs)[:FIRST_N]
    images = {"distinct_references": len(refs), "readable_references": refs_ok, "unique_images": len(sha_seen),
              "duplicate_images": refs_ok - len(sha_seen),
              "dedup_hash": "sha1 of the raw image bytes (after base64 decoding)"}
    return list(pairs.values()), log_image_ids, images


def filter_reason(pair: Agg, o: BuildOptions) -> Optional[str]:
    w, h = pair.info.width, pair.info.height
    if pair.clicks < o.min_clicks:
        return "min_clicks"
    if o.min_ctr > 0 and pair.impressions > 0 and pair.clicks / pair.impressions < o.min_ctr:
        return "min_ctr"
    if len(pair.qnorm) < o.min_query_len:
        return "query_too_short"
    if o.max_query_len > 0 and len(pair.qnorm) > o.max_query_len:
        return "query_too_long"
    if min(w, h) < o.min_image_side:
        return "image_too_small"
    if o.max_aspect_ratio > 0 and max(w, h) / max(1, min(w, h)) > o.max_aspect_ratio:
        return "aspect_ratio"
    return None


def filter_pairs(pairs: List[Agg], options: BuildOptions):
    """(kept pairs, Reasons of the filtered ones, duplicate rows in all pairs, duplicate rows in kept pairs)."""
    filt = Reasons(FILTER_REASONS)
    kept, dup_total, dup_kept = [], 0, 0
    for pair in pairs:
        dup_total += pair.rows - 1
        reason = filter_reason(pair, options)
        if reason:
            filt.add(reason, pair.rows, pair.locs, pairs=1)
        else:
            kept.append(pair)
            dup_kept += pair.rows - 1
    return kept, filt, dup_total, dup_kept


def describe(kept: List[Agg], options: BuildOptions, query_ids, log_image_ids, files, has_timestamp):
    """Shuffle, number (KEY = 9-digit global index), split and describe every kept pair: split -> rows."""
    kept = sorted(kept, key=lambda p: shuffle_key(options.seed, p.qnorm, p.info.sha1))
    split_rows = {s: [] for s in SPLITS}
    for index, pair in enumerate(kept):
        key = f"{index:09d}"
        split = split_of(pair.qnorm, options.val_fraction)
        info = pair.info
        qid = query_ids.get(pair.qnorm)
        iid = log_image_ids.get(info.sha1)
        meta = {
            "key": key,
            "query_id": qid if qid is not None else query_hash(pair.qnorm),
            "image_id": iid[1] if iid is not None else info.image_id,
            "clicks": pair.clicks,
            "impressions": pair.impressions,
            "query": pair.query,
            "source": loc_str(files, pair.first),
            "rows": pair.rows,
            "image_sha1": info.sha1,
            "image_path": pair.image_path,
            "width": info.stored_width, "height": info.stored_height,
            "original_width": info.width, "original_height": info.height,
            "split": split,
        }
        if has_timestamp:
            meta["timestamp"] = pair.timestamp
        js = json.dumps(meta, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        txt = pair.qnorm
        nbytes = (tar.member_bytes(info.jpeg_bytes) + tar.member_bytes(len(txt.encode("utf-8")))
                  + tar.member_bytes(len(js.encode("utf-8"))))
        split_rows[split].append({"key": key, "ref": pair.ref, "sha1": info.sha1, "jpg_size": info.jpeg_bytes,
                                  "txt": txt, "json": js, "nbytes": nbytes})
    return split_rows


def assign_shards(split_rows, options: BuildOptions):
    """Cut each split into shards of at most ``shard_size`` samples and ``max_shard_bytes`` bytes (sets
    ``row["shard"]``); returns split -> [{"count", "bytes", "name"}]."""
    shards = {}
    for split in SPLITS:
        if split == "val" and options.val_fraction <= 0:
            continue
        shards[split] = []
        cur, cur_bytes = 0, 0
        for row in split_rows[split]:
            if cur and (cur >= options.shard_size
                        or tar.archive_bytes(cur_bytes + row["nbytes"]) > options.max_shard_bytes):
                shards[split].append({"count": cur, "bytes": tar.archive_bytes(cur_bytes)})
                cur, cur_bytes = 0, 0
            row["shard"] = len(shards[split])
            cur += 1
            cur_bytes += row["nbytes"]
        if cur:
            shards[split].append({"count": cur, "bytes": tar.archive_bytes(cur_bytes)})
        for i, sh in enumerate(shards[split]):
            sh["name"] = f"shard-{i:06d}.tar"
    return shards


def loc_str(files, loc: Loc) -> str:
    return f"{files[loc[0]].rel}:{loc[1]}"


def make_plan(options: BuildOptions, files, pool, progress: Callable):
    """All the steps: returns (shards, split_rows, stats)."""
    read = read_rows(options, files, progress)
    refs = list(dict.fromkeys(a.ref for a in read.aggs.values()))
    results = examine_images(refs, options, pool, progress)
    pairs, log_image_ids, images = merge_by_content(read.aggs, results, read.bad)
    kept, filt, dup_total, dup_kept = filter_pairs(pairs, options)
    split_rows = describe(kept, options, read.query_ids, log_image_ids, files, read.has_timestamp)
    shards = assign_shards(split_rows, options)
    stats = _stats(read, files, pairs, kept, filt, dup_total, dup_kept, images, shards)
    return shards, split_rows, stats


def _stats(read: RowsRead, files, pairs, kept, filt: Reasons, dup_total, dup_kept, images, shards):
    bad = read.bad
    bad_total, filtered_rows, written = sum(bad.rows.values()), sum(filt.rows.values()), len(kept)
    total = bad_total + dup_kept + filtered_rows + written
    stats = {
        "input_rows": read.input_rows,
        "blank_lines_skipped": read.blank_lines,
        "inputs": [{"file": f.rel, "url": f.url, "format": f.format, "rows": n}
                   for f, n in zip(files, read.per_file_rows)],
        "bad_rows": {"total": bad_total,
                     "by_reason": {r: {"rows": bad.rows[r], "first_lines": [loc_str(files, x) for x in bad.locs[r]]}
                                   for r in bad.rows}},
        "pairs": {"aggregated": len(pairs), "filtered": sum(filt.pairs.values()), "written": written},
        "filtered": {"total_pairs": sum(filt.pairs.values()), "total_rows": filtered_rows,
                     "by_reason": {r: {"pairs": filt.pairs[r], "rows": filt.rows[r],
                                       "first_lines": [loc_str(files, x) for x in filt.locs[r]]} for r in filt.rows}},
        "duplicate_rows": {"total": dup_total, "in_written_pairs": dup_kept, "in_filtered_pairs": dup_total - dup_kept},
        "images": images,
        "written": {s: {"samples": sum(x["count"] for x in shards[s]), "shards": len(shards[s])} for s in shards},
        "accounting": {
            "identity": "input_rows == bad_rows + duplicate_rows + filtered_rows + written_samples",
            "note": "duplicate_rows: rows merged into an earlier row's written pair; filtered_rows: all rows "
                    "of filtered pairs, their merged duplicates included",
            "input_rows": read.input_rows, "bad_rows": bad_total, "duplicate_rows": dup_kept,
            "filtered_rows": filtered_rows, "written_samples": written, "sum": total, "ok": read.input_rows == total,
        },
    }
    if not stats["accounting"]["ok"]:  # pragma: no cover - an internal invariant
        raise AssertionError(f"accounting does not add up: {stats['accounting']}")
    return stats
