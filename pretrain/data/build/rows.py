"""Step 1 of a plan, run per input file by either engine: parse a click-log file into a Parquet table of rows.

One output row per input row (blank lines are counted, not rows), in input order, with the fields the
SQL plan (``sql.py``) works on. The parsing itself (formats, counts, ids, image references, the query
normalisation) is ``inputs.py`` and ``pretrain.data.ids``: the same Python code runs in the local
engine's worker processes and in Spark's executors, so both engines see the same rows.

Columns: ``loc`` (file index << 40 | line or row number: sorts in input order), ``reason`` (a bad-input
reason, or null for a usable row), ``qnorm``, ``qlen`` (characters of ``qnorm``), ``split_name``,
``ref`` (resolved image reference), ``image_path`` ('' for embedded bytes), ``query`` (as written),
``clicks`` (missing: 1), ``impressions`` (missing: 0), ``qid``/``iid`` (the log's ids as JSON, null when
absent) and ``ts`` (the timestamp as JSON, "null" when absent).
"""
from __future__ import annotations

import json

from ..ids import normalize_query
from .inputs import BadRow, canonical_image_ref, iter_rows, parse_count, parse_id
from .options import BuildError

LOC_SHIFT = 40
BATCH_ROWS = 65536
COLUMNS = ("loc", "reason", "qnorm", "qlen", "split_name", "ref", "image_path", "query", "clicks", "impressions",
           "qid", "iid", "ts")


def schema():
    import pyarrow as pa

    s, i = pa.string(), pa.int64()
    return pa.schema([("loc", i), ("reason", s), ("qnorm", s), ("qlen", pa.int32()), ("split_name", s),
                      ("ref", pa.large_string()), ("image_path", s), ("query", s), ("clicks", i),
                      ("impressions", i), ("qid", s), ("iid", s), ("ts", s)])


def loc_of(file_index: int, line: int) -> int:
    return (file_index << LOC_SHIFT) | line


def split_loc(loc: int):
    return loc >> LOC_SHIFT, loc & ((1 << LOC_SHIFT) - 1)


def _json(value):
    return None if value is None else json.dumps(value if isinstance(value, (bool, int, float, str)) else str(value),
                                                 ensure_ascii=False)


def check_header(inp, cols) -> None:
    """BuildError when the file's header lacks the query or image column (read in the driver, before work)."""
    for line, rec, _ in iter_rows(inp, list(dict.fromkeys(cols.values()))):
        if line == "header":
            if rec is not None:
                missing = [c for c in (cols["query"], cols["image"]) if c not in rec]
                if missing:
                    raise BuildError(f"{inp.rel}: no column {missing} (columns: {sorted(rec)}); "
                                     f"name them with --query-col/--image-col")
            return


def columns_of(options) -> dict:
    o = options
    return {"query": o.query_col, "image": o.image_col, "clicks": o.clicks_col, "impressions": o.impressions_col,
            "query_id": o.query_id_col, "image_id": o.image_id_col, "timestamp": o.timestamp_col}


def parse_file(task):
    """Parse one file into the Parquet file ``task["dest"]`` (an fsspec URL); returns its counts:
    ``{"file": index, "rows": n, "blank": n, "has_timestamp": bool}``."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .plan import split_of

    fi, inp, cols, images_root, val_fraction = (task["index"], task["input"], task["cols"], task["images_root"],
                                                task["val_fraction"])
    wanted = list(dict.fromkeys(cols.values()))
    base_dir = images_root or inp.base_dir
    rows = blank = 0
    has_ts = False
    buf = {c: [] for c in COLUMNS}
    split_cache, refs = {}, {}  # bounded caches: queries and image strings repeat across rows
    (b_loc, b_reason, b_qnorm, b_qlen, b_split, b_ref, b_path, b_query, b_clicks, b_impr, b_qid, b_iid,
     b_ts) = (buf[c].append for c in COLUMNS)
    sch = schema()
    with fsspec.open(task["dest"] + ".tmp", "wb") as f:
        writer = pq.ParquetWriter(f, sch)

        def flush():
            writer.write_table(pa.table({c: buf[c] for c in COLUMNS}, schema=sch))
            for c in COLUMNS:
                buf[c].clear()

        def bad(loc, reason):
            for c in COLUMNS:
                buf[c].append(None)
            buf["loc"][-1], buf["reason"][-1] = loc, reason

        for line, rec, reason in iter_rows(inp, wanted):
            if line == "header":
                has_ts |= rec is not None and cols["timestamp"] in rec
                continue
            if rec is None and reason is None:
                blank += 1
                continue
            rows += 1
            loc = loc_of(fi, line)
            if len(buf["loc"]) >= BATCH_ROWS:
                flush()
            if reason is not None:
                bad(loc, reason)
                continue
            try:
                q = rec.get(cols["query"])
                if q is None or (isinstance(q, str) and not q.strip()):
                    raise BadRow("missing_field")
                if isinstance(q, bool) or not isinstance(q, (str, int, float)):
                    raise BadRow("bad_field_type")
                q = str(q)
                image = rec.get(cols["image"])
                resolved = refs.get(image) if isinstance(image, str) else None
                if resolved is None:
                    resolved = canonical_image_ref(image, base_dir)
                    if isinstance(image, str) and len(image) < 1024:
                        if len(refs) > 100000:
                            refs.clear()
                        refs[image] = resolved
                ref, image_path = resolved
                clicks = _count(rec.get(cols["clicks"]))
                impressions = _count(rec.get(cols["impressions"]))
                qnorm = normalize_query(q)
                if not qnorm:
                    raise BadRow("missing_field")
            except BadRow as e:
                bad(loc, e.reason)
                continue
            if inp.format == "jsonl":
                has_ts |= cols["timestamp"] in rec
            split = split_cache.get(qnorm)
            if split is None:
                if len(split_cache) > 100000:
                    split_cache.clear()
                split = split_cache[qnorm] = split_of(qnorm, val_fraction)
            ts = rec.get(cols["timestamp"])
            qid, iid = rec.get(cols["query_id"]), rec.get(cols["image_id"])
            b_loc(loc)
            b_reason(None)
            b_qnorm(qnorm)
            b_qlen(len(qnorm))
            b_split(split)
            b_ref(ref)
            b_path(image_path or "")
            b_query(q)
            b_clicks(1 if clicks is None else clicks)
            b_impr(0 if impressions is None else impressions)
            b_qid(None if qid is None else _json(parse_id(qid)))
            b_iid(None if iid is None else _json(parse_id(iid)))
            b_ts("null" if ts is None else json.dumps(_ts(ts), ensure_ascii=False))
        flush()
        writer.close()
    fs, path = fsspec.core.url_to_fs(task["dest"])
    fs.mv(path + ".tmp", path)
    return {"file": fi, "rows": rows, "blank": blank, "has_timestamp": has_ts}


def _count(value):
    if isinstance(value, str) and value.isdigit() and value.isascii():
        return int(value)
    return parse_count(value)


def _ts(value):
    v = parse_id(value)
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
