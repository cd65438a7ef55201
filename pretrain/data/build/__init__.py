"""The shard builder: click logs -> WebDataset shards of <query, image> pairs (CLI: ``tools/build_shards.py``).

    from pretrain.data.build import BuildOptions, build
    report = build(BuildOptions(inputs=["logs/*.tsv"], out="shards", val_fraction=0.01))

Modules, in the order a build uses them: ``options`` (the typed options), ``inputs`` (listing and reading
the logs, parsing fields), ``rows`` (one log file -> a Parquet table of parsed rows), ``images`` (fetching,
examining, encoding and caching images), ``sql`` (the relational plan, one SQL text for both engines),
``engines`` (DuckDB and Spark), ``plan`` (the steps in order; numbering, splitting and cutting shards),
``write`` (plan files, shards, sizes.json). The shard layout, the query normalisation and the ids are those of
``pretrain.data.ids`` and ``pretrain.data.tar``, which the loader and the inspector read with.

Two passes, everything deterministic from the inputs and the options, on one of two engines
(``engines.py``: ``local`` = DuckDB, embedded and out of core; ``spark`` = PySpark) that give
byte-identical shards:

1. Plan (``plan.py``, ``rows.py``, ``sql.py``). Every row is parsed (per file, in worker processes or
   executors); a row that cannot be used is counted under a bad-input reason (``plan.BAD_REASONS``) with
   its first locations. Every distinct image reference is fetched, hashed, decoded, checked and encoded
   once (the JPEG cached in ``OUT/_work/jpg``). Rows are aggregated per (normalised query, image
   content): clicks and impressions are summed; the first row gives the original query, the provenance
   and the timestamp. Pair filters: ``plan.FILTER_REASONS``. The surviving pairs are shuffled globally,
   numbered (KEY = 9-digit global index), split by query and cut into shards by count and exact tar size.
   The plan is saved before any shard is written.
2. Write (``write.py``). Each missing shard is written to ``NAME.tmp`` from the cached JPEGs and renamed
   when complete: a restarted build gives byte-identical shards. A re-run with other inputs or options is
   refused unless ``overwrite``.

Each sample: ``KEY.jpg``, ``KEY.txt`` (the normalised query, UTF-8) and ``KEY.json`` with key, query_id,
image_id, clicks, impressions, query (original text of the first row), source ("FILE:LINE" of the first
row; Parquet: the 1-based row number), rows (input rows aggregated), image_sha1, image_path (as written in
the log, null for base64), width, height (stored JPEG), original_width, original_height, split and, when
the log has that column, timestamp. Report accounting (exact):
``input_rows = bad_rows + duplicate_rows + filtered_rows + written_samples``.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time

import fsspec

from .engines import make_engine
from .inputs import is_local, list_inputs
from .options import BuildError, BuildOptions, plan_options
from .plan import BAD_REASONS, FILTER_REASONS, make_plan
from .rows import check_header, columns_of
from .write import (REPORT_FILE, WORK_DIR, fingerprint, json_bytes, pending_shards, prepare_out, save_plan, saver,
                    shard_tasks, write_atomic, write_shard, write_sizes)

log = logging.getLogger(__name__)

__all__ = ["BAD_REASONS", "FILTER_REASONS", "REPORT_FILE", "BuildError", "BuildOptions", "build", "format_summary"]


def _progress_factory(enabled: bool):
    def progress(**kw):
        from tqdm import tqdm

        return tqdm(file=sys.stderr, disable=None if enabled else True, dynamic_ncols=True, **kw)
    return progress


def _pool(workers: int):
    return multiprocessing.get_context().Pool(workers) if workers > 1 else None


def _peak_rss_mib() -> dict:
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"main_mib": round(self_kib / 1024, 1), "largest_child_mib": round(children_kib / 1024, 1)}


def _write(options, engine, fs, root, url, work, shards, pending, progress):
    """Write the pending shards on the engine: (samples, failed, cache-miss fetches, encodes)."""
    tasks = shard_tasks(options, url, work, shards, pending)
    crash = options.debug_crash_after_shards
    if crash is not None and crash < len(tasks):
        tasks, last = tasks[:crash], dict(tasks[crash], crash_half=True)
    else:
        last = None
    samples, failed, fetches, encodes = 0, [], 0, 0
    with progress(desc="write shards", unit=" shards", total=len(pending)) as bar:
        for r in engine.map(write_shard, tasks):
            samples += r["samples"]
            fetches += r["fetches"]
            encodes += r["encodes"]
            if r["error"]:
                failed.append({"shard": r["shard"], "error": r["error"]})
                log.error("%s not written: %s", r["shard"], r["error"])
            bar.update(1)
    if last is not None:
        write_shard(last)  # test hook: exits half-way through this shard
    failed.sort(key=lambda f: f["shard"])
    return samples, failed, fetches, encodes


def build(options: BuildOptions) -> dict:
    """Run a build; returns the report (also written to ``OUT/report.json``). BuildError on bad inputs,
    options or output folder. Failed shards are listed in ``report["run"]["failed"]`` (a re-run retries them)."""
    t0 = time.time()
    options = options.checked()
    progress = _progress_factory(options.progress)
    files = list_inputs(options.inputs, options.format)
    for f in files:
        check_header(f, columns_of(options))
    fs, root = fsspec.core.url_to_fs(options.out)
    root = root.rstrip("/") or "/"
    if is_local(fs):
        root = os.path.abspath(root)
    url = root if is_local(fs) else fs.unstrip_protocol(root)
    fs.makedirs(root, exist_ok=True)
    fp = fingerprint(options, files)
    plan = prepare_out(options, fs, root, fp)
    if is_local(fs) or options.engine == "spark":
        work, tmp_work = f"{url}/{WORK_DIR}", None
    else:  # the local engine with a remote output: its tables and cache on this machine
        work = tmp_work = tempfile.mkdtemp(prefix="build_shards_")
    pool = _pool(options.workers) if options.engine == "local" else None
    engine, ok = None, False
    try:
        engine = make_engine(options, work, pool)
        if plan is None:
            shards, stats = make_plan(options, files, engine, work, saver(fs, root), progress)
            save_plan(fs, root, fp, options, shards, stats)
        else:
            shards, stats = plan["shards"], plan["stats"]
        t_plan = time.time()
        for s in shards:
            fs.makedirs(f"{root}/{s}", exist_ok=True)
        pending, skipped = pending_shards(fs, root, shards)
        samples, failed, fetches, encodes = _write(options, engine, fs, root, url, work, shards, pending, progress)
        ok = True
    finally:
        if engine is not None:
            engine.close()
        if pool is not None:
            pool.close() if ok else pool.terminate()
            pool.join()
    t_write = time.time()
    write_sizes(fs, root, shards, failed)
    if not failed:  # the JPEG cache and the engine's tables are no longer needed
        wfs, wpath = fsspec.core.url_to_fs(work)
        if wfs.exists(wpath):
            wfs.rm(wpath, recursive=True)
    elif tmp_work:
        shutil.rmtree(tmp_work, ignore_errors=True)
    report = {"out": options.out, **stats, "shards": {s: len(shards[s]) for s in shards},
              "options": plan_options(options)}
    report["run"] = {
        "engine": options.engine,
        "plan_reused": plan is not None,
        "shards_written": len(pending) - len(failed),
        "shards_skipped": skipped,
        "shards_failed": len(failed),
        "failed": failed,
        "samples_written": samples,
        "workers": options.workers,
        "write_fetches": fetches,
        "write_encodes": encodes,
        "time_s": {"plan": round(t_plan - t0, 3), "write": round(t_write - t_plan, 3),
                   "total": round(time.time() - t0, 3)},
        "images_per_s": round(samples / max(t_write - t_plan, 1e-9), 1) if samples else 0.0,
        "peak_rss": _peak_rss_mib(),
    }
    report["time_s"] = report["run"]["time_s"]["total"]
    report["throughput_images_per_s"] = report["run"]["images_per_s"]
    write_atomic(fs, f"{root}/{REPORT_FILE}", json_bytes(report))
    return report


def format_summary(report: dict) -> str:
    """The report in a few lines (what the CLI prints)."""
    acc, run = report["accounting"], report["run"]
    lines = [
        f"[build_shards] {report['out']}",
        f"  input rows        {acc['input_rows']}",
        f"  bad rows          {acc['bad_rows']}   " + ", ".join(
            f"{r}={v['rows']}" for r, v in report["bad_rows"]["by_reason"].items() if v["rows"]),
        f"  duplicate rows    {acc['duplicate_rows']} merged into written pairs "
        f"({report['duplicate_rows']['total']} in all pairs); duplicate images {report['images']['duplicate_images']}",
        f"  filtered rows     {acc['filtered_rows']}   " + ", ".join(
            f"{r}={v['rows']} rows/{v['pairs']} pairs" for r, v in report["filtered"]["by_reason"].items() if v["rows"]),
        f"  written samples   {acc['written_samples']}   " + ", ".join(
            f"{s}: {v['samples']} in {v['shards']} shards" for s, v in report["written"].items()),
        f"  accounting        {acc['input_rows']} = {acc['bad_rows']} + {acc['duplicate_rows']} + "
        f"{acc['filtered_rows']} + {acc['written_samples']}  ({'ok' if acc['ok'] else 'MISMATCH'})",
        f"  this run          {run['shards_written']} shards written, {run['shards_skipped']} skipped, "
        f"{run['shards_failed']} failed; {run['time_s']['total']:.1f} s, {run['images_per_s']:.0f} images/s",
    ]
    return "\n".join(lines)
