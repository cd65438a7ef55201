"""The plan of a build: which pairs go into which shard under which key, decided before any shard is written.

The steps, in this order; the same for both engines (``engines.py``: DuckDB locally, Spark on a cluster)::

    parse            rows.parse_file per input file (worker processes / executors) -> table t_rows
    examine images   images.examine_image per distinct image reference, once (workers / executors) -> t_images
    aggregate        sql.tables: usable rows aggregated by (normalised query, image content), bad rows with
                     their reasons, filters (min_clicks, min_ctr, query_too_short, query_too_long,
                     image_too_small, aspect_ratio), the log's ids (first non-empty in input order)
    shuffle          the kept pairs ordered by shuffle_key (blake2b of seed, query, image hash), streamed here
    describe         numbered (KEY = 9-digit global index), split by query hash, KEY.json made, cut into
                     shards by sample count and exact tar size; each shard's rows saved as it closes

Everything is deterministic from the inputs and the options, and memory does not grow with the log: the
engine spills to disk, and ``describe`` holds one open shard per split. Ids follow ``pretrain.data.ids``:
a query id or image id given in the log wins (the first non-empty one in input order), else
``query_hash`` of the normalised query and ``image_hash`` of the image bytes.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Dict, List

from .. import tar
from ..ids import query_hash
from . import sql
from .images import IMAGE_REASONS
from .inputs import BAD_ROW_REASONS
from .options import BuildOptions
from .rows import columns_of, parse_file, split_loc

SPLITS = ("train", "val")
BAD_REASONS = BAD_ROW_REASONS + IMAGE_REASONS
FILTER_REASONS = ("min_clicks", "min_ctr", "query_too_short", "query_too_long", "image_too_small", "aspect_ratio")
FIRST_N = 5


def split_of(qnorm: str, val_fraction: float) -> str:
    """train/val by a stable hash of the normalised query."""
    if val_fraction <= 0:
        return "train"
    u = int.from_bytes(hashlib.blake2b(qnorm.encode("utf-8"), digest_size=8, person=b"wl-split").digest(), "big")
    return "val" if u / 2.0 ** 64 < val_fraction else "train"


def shuffle_key(seed: int, qnorm: str, sha1_hex: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{qnorm}\0{sha1_hex}".encode("utf-8"), digest_size=16,
                           person=b"wl-shuffle").digest()


def loc_str(files, loc: int) -> str:
    fi, line = split_loc(loc)
    return f"{files[fi].rel}:{line}"


def _opt_json(text):
    return None if text is None else json.loads(text)


class ShardCutter:
    """Cuts one split's stream of described rows into shards (count and exact tar bytes); calls
    ``save(split, index, rows)`` when a shard closes, so only the open shard is held."""

    def __init__(self, split: str, options: BuildOptions, save: Callable):
        self.split, self.options, self.save = split, options, save
        self.shards: List[dict] = []
        self.rows: List[dict] = []
        self.bytes = 0

    def add(self, row: dict) -> None:
        if self.rows and (len(self.rows) >= self.options.shard_size
                          or tar.archive_bytes(self.bytes + row["nbytes"]) > self.options.max_shard_bytes):
            self.close()
        self.rows.append(row)
        self.bytes += row["nbytes"]

    def close(self) -> None:
        if not self.rows:
            return
        index = len(self.shards)
        self.shards.append({"count": len(self.rows), "bytes": tar.archive_bytes(self.bytes),
                            "name": f"shard-{index:06d}.tar"})
        self.save(self.split, index, self.rows)
        self.rows, self.bytes = [], 0


def describe(kept, options: BuildOptions, files, has_timestamp: bool, save: Callable) -> Dict[str, list]:
    """Number, split and describe the kept pairs (tuples of ``sql.KEPT_COLUMNS`` in shuffle order) and cut
    the shards; returns split -> [{"count", "bytes", "name"}]."""
    splits = [s for s in SPLITS if s == "train" or options.val_fraction > 0]
    cutters = {s: ShardCutter(s, options, save) for s in splits}
    for index, values in enumerate(kept):
        p = dict(zip(sql.KEPT_COLUMNS, values))
        key = f"{index:09d}"
        qid, iid = _opt_json(p["qid"]), _opt_json(p["iid"])
        meta = {
            "key": key,
            "query_id": qid if qid is not None else query_hash(p["qnorm"]),
            "image_id": iid if iid is not None else p["image_hash"],
            "clicks": p["clicks"],
            "impressions": p["impressions"],
            "query": p["query"],
            "source": loc_str(files, p["first_loc"]),
            "rows": p["n_rows"],
            "image_sha1": p["sha1"],
            "image_path": p["image_path"] or None,
            "width": p["sw"], "height": p["sh"],
            "original_width": p["w"], "original_height": p["h"],
            "split": p["split_name"],
        }
        if has_timestamp:
            meta["timestamp"] = json.loads(p["ts"])
        js = json.dumps(meta, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        txt = p["qnorm"]
        nbytes = (tar.member_bytes(p["jpg_size"]) + tar.member_bytes(len(txt.encode("utf-8")))
                  + tar.member_bytes(len(js.encode("utf-8"))))
        cutters[p["split_name"]].add({"key": key, "ref": p["ref"], "sha1": p["sha1"], "jpg_size": p["jpg_size"],
                                      "txt": txt, "json": js, "nbytes": nbytes})
    for c in cutters.values():
        c.close()
    return {s: c.shards for s, c in cutters.items()}


def make_plan(options: BuildOptions, files, engine, work: str, save: Callable, progress: Callable):
    """All the steps on ``engine``; shard rows go to ``save(split, index, rows)``. Returns (shards, stats)."""
    o = options
    cols = columns_of(o)
    tasks = [{"index": i, "input": f, "cols": cols, "images_root": o.images_root, "val_fraction": o.val_fraction,
              "dest": f"{work}/rows/part-{i:06d}.parquet"} for i, f in enumerate(files)]
    with progress(desc="read logs", unit=" files", total=len(tasks)) as bar:
        parsed = []
        for r in engine.map(parse_file, tasks):
            parsed.append(r)
            bar.update(1)
    parsed.sort(key=lambda r: r["file"])
    engine.load("t_rows", f"{work}/rows")
    examine = (o.resize, o.resize_mode, o.jpeg_quality, o.min_image_side, o.max_aspect_ratio, f"{work}/jpg")
    engine.examine(examine, f"{work}/images", progress)
    engine.load("t_images", f"{work}/images")
    for name, statement in sql.tables(o):
        engine.create(name, statement)
    has_timestamp = any(r["has_timestamp"] for r in parsed)
    engine.register_shuffle_key(o.seed)
    shards = describe(engine.stream(sql.KEPT), o, files, has_timestamp, save)
    return shards, _stats(engine, files, parsed, shards)


def _firsts(engine, statement, files) -> Dict[str, List[str]]:
    out: Dict[str, list] = {}
    for reason, loc in engine.query(statement.format(first_n=FIRST_N)):
        out.setdefault(reason, []).append(loc)
    return {r: [loc_str(files, x) for x in sorted(v)] for r, v in out.items()}


def _stats(engine, files, parsed, shards):
    bad_rows = {r: 0 for r in BAD_REASONS}
    bad_rows.update({r: int(n) for r, n in engine.query(sql.BAD_COUNTS)})
    bad_first = _firsts(engine, sql.BAD_FIRST, files)
    filt_rows, filt_pairs = {r: 0 for r in FILTER_REASONS}, {r: 0 for r in FILTER_REASONS}
    n_pairs = dup_total = dup_kept = written = 0
    for reason, pairs, rows, dups in engine.query(sql.PAIR_COUNTS):
        n_pairs += pairs
        dup_total += dups
        if reason is None:
            written, dup_kept = pairs, dups
        else:
            filt_rows[reason], filt_pairs[reason] = rows, pairs
    filt_first = _firsts(engine, sql.FILTERED_FIRST, files)
    refs, refs_ok, unique, encodes = (int(x) for x in engine.query(sql.IMAGE_COUNTS)[0])
    input_rows = sum(r["rows"] for r in parsed)
    bad_total, filtered_rows = sum(bad_rows.values()), sum(filt_rows.values())
    total = bad_total + dup_kept + filtered_rows + written
    stats = {
        "input_rows": input_rows,
        "blank_lines_skipped": sum(r["blank"] for r in parsed),
        "inputs": [{"file": f.rel, "url": f.url, "format": f.format, "rows": r["rows"]} for f, r in zip(files, parsed)],
        "bad_rows": {"total": bad_total,
                     "by_reason": {r: {"rows": bad_rows[r], "first_lines": bad_first.get(r, [])} for r in bad_rows}},
        "pairs": {"aggregated": n_pairs, "filtered": sum(filt_pairs.values()), "written": written},
        "filtered": {"total_pairs": sum(filt_pairs.values()), "total_rows": filtered_rows,
                     "by_reason": {r: {"pairs": filt_pairs[r], "rows": filt_rows[r],
                                       "first_lines": filt_first.get(r, [])} for r in filt_rows}},
        "duplicate_rows": {"total": dup_total, "in_written_pairs": dup_kept, "in_filtered_pairs": dup_total - dup_kept},
        "images": {"distinct_references": refs, "readable_references": refs_ok, "unique_images": unique,
                   "duplicate_images": refs_ok - unique, "fetches": refs, "encodes": encodes,
                   "dedup_hash": "sha1 of the raw image bytes (after base64 decoding)",
                   "note": "each distinct reference is fetched and decoded once; encoded once unless filtered"},
        "written": {s: {"samples": sum(x["count"] for x in shards[s]), "shards": len(shards[s])} for s in shards},
        "accounting": {
            "identity": "input_rows == bad_rows + duplicate_rows + filtered_rows + written_samples",
            "note": "duplicate_rows: rows merged into an earlier row's written pair; filtered_rows: all rows "
                    "of filtered pairs, their merged duplicates included",
            "input_rows": input_rows, "bad_rows": bad_total, "duplicate_rows": dup_kept,
            "filtered_rows": filtered_rows, "written_samples": written, "sum": total, "ok": input_rows == total,
        },
    }
    if not stats["accounting"]["ok"]:  # pragma: no cover - an internal invariant
        raise AssertionError(f"accounting does not add up: {stats['accounting']}")
    return stats
