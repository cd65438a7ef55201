"""The output of a build: the saved plan, the shards (atomic, resumable), sizes.json and the report.

The plan is saved first (``_plan_pairs/SPLIT-NNNNNN.parquet``: the rows of each shard, written as the
plan cuts it; then ``_plan.json`` with the shard list and the statistics, which marks the plan complete)
under a fingerprint of the plan options and the inputs (URL and size). Each missing shard is then written
by ``write_shard`` (a worker process or a Spark executor) to ``NAME.tmp`` from the JPEGs the plan cached
in ``_work/jpg`` and renamed when complete; a shard whose final file has the planned size is skipped, so
a re-run resumes a killed build without losing or duplicating samples. ``_work`` (the parsed rows, the
image table, the JPEG cache, DuckDB's files) is removed when every shard is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, List, Optional, Tuple

from .. import tar
from .images import JpegCache, render_image
from .inputs import is_local
from .options import BuildError, BuildOptions, plan_options
from .plan import SPLITS

log = logging.getLogger(__name__)

PLAN_VERSION = 3  # 3: plan rows per shard, JPEG cache; 2: ids of pretrain.data.ids (the loader's), query
#                   normalisation lower-cases every script
PLAN_FILE = "_plan.json"
PAIRS_FILE = "_plan_pairs"
WORK_DIR = "_work"
REPORT_FILE = "report.json"
SIZES_FILE = "sizes.json"


def rename(fs, src: str, dst: str) -> None:
    if is_local(fs):
        os.replace(src, dst)
    else:
        fs.mv(src, dst)


def write_atomic(fs, path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    rename(fs, tmp, path)


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n").encode("utf-8")


def fingerprint(options: BuildOptions, files) -> str:
    spec = {"plan_version": PLAN_VERSION, "options": plan_options(options), "inputs": [[f.url, f.size] for f in files]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()


def prepare_out(options: BuildOptions, fs, root: str, fp: str) -> Optional[dict]:
    """The saved plan when it can be reused, else None (after the checks and ``overwrite``)."""
    plan_path = f"{root}/{PLAN_FILE}"
    plan = None
    if fs.exists(plan_path):
        with fs.open(plan_path, "rb") as f:
            plan = json.loads(f.read().decode("utf-8"))
        if plan.get("fingerprint") == fp and fs.exists(f"{root}/{PAIRS_FILE}") and not options.overwrite:
            return plan
    stale = [p for s in SPLITS if fs.exists(f"{root}/{s}")
             for p in fs.ls(f"{root}/{s}", detail=False) if p.endswith((".tar", ".tar.tmp", SIZES_FILE))]
    if (plan is not None or stale) and not options.overwrite:
        what = "different inputs or options" if plan is not None else "an unknown build (no plan file)"
        raise BuildError(f"{options.out} holds shards of {what}; refusing to mix them. "
                         f"Use a new output folder or pass --overwrite.")
    if options.overwrite:
        for s in SPLITS:
            if fs.exists(f"{root}/{s}"):
                fs.rm(f"{root}/{s}", recursive=True)
        for name in (PLAN_FILE, REPORT_FILE):
            if fs.exists(f"{root}/{name}"):
                fs.rm(f"{root}/{name}")
    for name in (PAIRS_FILE, WORK_DIR):  # left by a planning run that did not finish
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)
    return None


def shard_rows_path(root: str, split: str, index: int) -> str:
    return f"{root}/{PAIRS_FILE}/{split}-{index:06d}.parquet"


def saver(fs, root: str) -> Callable:
    """``save(split, index, rows)`` for ``plan.describe``: one Parquet file per shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs.makedirs(f"{root}/{PAIRS_FILE}", exist_ok=True)

    def save(split: str, index: int, rows: List[dict]) -> None:
        table = pa.table({
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "ref": pa.array([r["ref"] for r in rows], pa.large_string()),
            "sha1": pa.array([r["sha1"] for r in rows], pa.string()),
            "jpg_size": pa.array([r["jpg_size"] for r in rows], pa.int64()),
            "txt": pa.array([r["txt"] for r in rows], pa.string()),
            "json": pa.array([r["json"] for r in rows], pa.string()),
        })
        path = shard_rows_path(root, split, index)
        with fs.open(path, "wb") as f:
            pq.write_table(table, f)
    return save


def save_plan(fs, root: str, fp: str, options: BuildOptions, shards, stats) -> None:
    plan = {"plan_version": PLAN_VERSION, "fingerprint": fp, "options": plan_options(options),
            "shards": shards, "stats": stats}
    write_atomic(fs, f"{root}/{PLAN_FILE}", json_bytes(plan))


def pending_shards(fs, root: str, shards) -> Tuple[List[Tuple[str, int]], int]:
    """(split, index) of the shards to write, and how many are complete already (final file, planned size)."""
    pending, skipped = [], 0
    for s in shards:
        for i, sh in enumerate(shards[s]):
            path = f"{root}/{s}/{sh['name']}"
            if fs.exists(path):
                if fs.size(path) == sh["bytes"]:
                    skipped += 1
                    continue
                log.warning("%s/%s has %d bytes, the plan says %d: rewriting it", s, sh["name"], fs.size(path),
                            sh["bytes"])
            pending.append((s, i))
    return pending, skipped


def shard_tasks(options: BuildOptions, url: str, work: str, shards, pending) -> List[dict]:
    o = options
    return [{"url": url, "split": s, "index": i, "name": shards[s][i]["name"], "bytes": shards[s][i]["bytes"],
             "count": shards[s][i]["count"], "cache": f"{work}/jpg",
             "render": (o.resize, o.resize_mode, o.jpeg_quality),
             "crash_half": False} for s, i in pending]


def write_shard(task: dict) -> dict:
    """Write one shard (in a worker or an executor): ``NAME.tmp``, checked against the plan, then renamed.
    Returns {"shard", "error", "samples", "fetches", "encodes"} (fetches/encodes: cache misses only)."""
    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(task["url"])
    split, name = task["split"], task["name"]
    final = f"{root}/{split}/{name}"
    tmp = final + ".tmp"
    with fs.open(shard_rows_path(root, split, task["index"]), "rb") as f:
        rows = pq.read_table(f).to_pylist()
    out = {"shard": f"{split}/{name}", "error": None, "samples": 0, "fetches": 0, "encodes": 0}
    cache = JpegCache(task["cache"])
    with fs.open(tmp, "wb") as f:
        writer = tar.open_writer(f)
        for j, row in enumerate(rows):
            jpg = cache.get(row["sha1"], row["jpg_size"])
            if jpg is None:
                out["fetches"] += 1
                out["encodes"] += 1
                status, jpg = render_image((row["ref"], row["sha1"], row["jpg_size"]) + tuple(task["render"]))
                if status != "ok":
                    out["error"] = f"{row['key']}: {jpg}"
                    break
            key = row["key"]
            tar.add_member(writer, key + ".jpg", jpg)
            tar.add_member(writer, key + ".txt", row["txt"].encode("utf-8"))
            tar.add_member(writer, key + ".json", row["json"].encode("utf-8"))
            if task["crash_half"] and j == len(rows) // 2:
                f.flush()
                os._exit(75)  # simulates a killed build: half a .tmp shard, no cleanup
        writer.close()
    if out["error"] is None and fs.size(tmp) != task["bytes"]:
        out["error"] = f"wrote {fs.size(tmp)} bytes, the plan says {task['bytes']}"
    if out["error"] is not None:
        fs.rm(tmp)
        return out
    rename(fs, tmp, final)
    out["samples"] = task["count"]
    return out


def write_sizes(fs, root: str, shards, failed) -> None:
    """``sizes.json`` (OpenCLIP's format) of every split whose shards were all written."""
    failed_names = {f["shard"] for f in failed}
    for s in shards:
        if any(f"{s}/{sh['name']}" in failed_names for sh in shards[s]):
            continue
        sizes = {sh["name"]: sh["count"] for sh in shards[s]}
        if not sizes:
            log.warning("the %s split is empty", s)
        write_atomic(fs, f"{root}/{s}/{SIZES_FILE}", (json.dumps(sizes, indent=1) + "\n").encode("utf-8"))
