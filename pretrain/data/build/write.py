"""The output of a build: the saved plan, the shards (atomic, resumable), sizes.json and the report.

The plan is saved first (``_plan.json`` with the shard list and the statistics, ``_plan_pairs.parquet``
with one row per sample) under a fingerprint of the plan options and the inputs (URL and size). Each
missing shard is then written to ``NAME.tmp`` and renamed when complete; a shard whose final file has the
planned size is skipped, so a re-run resumes a killed build without losing or duplicating samples.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

from .. import tar
from .images import render_image
from .inputs import is_local
from .options import BuildError, BuildOptions, plan_options
from .plan import SPLITS

log = logging.getLogger(__name__)

PLAN_VERSION = 2  # 2: ids of pretrain.data.ids (the loader's), query normalisation lower-cases every script
PLAN_FILE = "_plan.json"
PAIRS_FILE = "_plan_pairs.parquet"
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
        for name in (PLAN_FILE, PAIRS_FILE, REPORT_FILE):
            if fs.exists(f"{root}/{name}"):
                fs.rm(f"{root}/{name}")
    return None


def save_plan(fs, root: str, fp: str, options: BuildOptions, shards, split_rows, stats) -> None:
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
    rename(fs, path + ".tmp", path)
    plan = {"plan_version": PLAN_VERSION, "fingerprint": fp, "options": plan_options(options),
            "shards": shards, "stats": stats}
    write_atomic(fs, f"{root}/{PLAN_FILE}", json_bytes(plan))


def load_plan_rows(fs, root: str) -> Dict[Tuple[str, int], List[dict]]:
    import pyarrow.parquet as pq

    with fs.open(f"{root}/{PAIRS_FILE}", "rb") as f:
        table = pq.read_table(f)
    out: Dict[Tuple[str, int], List[dict]] = {}
    for r in table.to_pylist():
        out.setdefault((r["split"], r["shard"]), []).append(r)
    return out


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


def write_shards(options: BuildOptions, fs, root: str, shards, rows_by_shard, pending, pool, progress: Callable):
    """Write the pending shards (tmp name, then atomic rename): (samples written, failed shards)."""
    o = options
    tasks = ((r["ref"], r["sha1"], r["jpg_size"], o.resize, o.resize_mode, o.jpeg_quality)
             for key in pending for r in rows_by_shard.get(key, ()))
    results = pool.imap(render_image, tasks, chunksize=4) if pool else map(render_image, tasks)
    total = sum(shards[s][i]["count"] for s, i in pending)
    failed, samples = [], 0
    with progress(desc="write shards", unit=" img", total=total) as bar:
        for n, (split, i) in enumerate(pending):
            sh = shards[split][i]
            final = f"{root}/{split}/{sh['name']}"
            tmp = final + ".tmp"
            rows = rows_by_shard.get((split, i), [])
            error = None
            with fs.open(tmp, "wb") as f:
                writer = tar.open_writer(f)
                for j, row in enumerate(rows):
                    status, payload = next(results)
                    if error is None and status != "ok":
                        error = f"{row['key']}: {payload}"
                    if error is not None:
                        continue
                    key = row["key"]
                    tar.add_member(writer, key + ".jpg", payload)
                    tar.add_member(writer, key + ".txt", row["txt"].encode("utf-8"))
                    tar.add_member(writer, key + ".json", row["json"].encode("utf-8"))
                    bar.update(1)
                    if o.debug_crash_after_shards is not None and n == o.debug_crash_after_shards and j == len(rows) // 2:
                        f.flush()
                        os._exit(75)  # simulates a killed build: half a .tmp shard, no cleanup
                writer.close()
            if error is None and fs.size(tmp) != sh["bytes"]:
                error = f"wrote {fs.size(tmp)} bytes, the plan says {sh['bytes']}"
            if error is not None:
                fs.rm(tmp)
                failed.append({"shard": f"{split}/{sh['name']}", "error": error})
                log.error("%s/%s not written: %s", split, sh["name"], error)
                continue
            rename(fs, tmp, final)
            samples += sh["count"]
    return samples, failed


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
