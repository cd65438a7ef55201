#!/usr/bin/env python
"""Build WebDataset shards of <query, image> pairs from search-engine click logs.

    python tools/build_shards.py LOGS... --out OUT [options]

LOGS are files, globs or folders, local or any fsspec URL, in TSV, CSV, JSONL or Parquet (from the
extension, `.gz`/`.bz2`/`.xz`/`.zst` allowed for the text formats, or --format). TSV/CSV have a header
row. `image` is a path (relative to --images-root; default: the folder of the log file that names it), an
fsspec URL, or the image bytes in base64 (`base64:...`, `data:image/...;base64,...`, or a bare base64
string that decodes to a known image signature); Parquet binary columns hold raw bytes.

How a build works, the sample layout and the report: `pretrain/data/build/__init__.py`; the query
normalisation and the ids: `pretrain/data/ids.py` (and the README).

Output:
    OUT/train/shard-000000.tar ...  OUT/train/sizes.json   ({"shard-000000.tar": 10000, ...}, OpenCLIP)
    OUT/val/shard-000000.tar ...    OUT/val/sizes.json     (only with --val-fraction > 0)
    OUT/report.json                 counts, reasons with first line numbers, accounting, throughput
    OUT/_plan.json, OUT/_plan_pairs/       the deterministic plan (kept for resuming)
    OUT/_work/                      parsed rows, image table, JPEG cache (removed when every shard is written)

Engines: --engine local (default; DuckDB, bounded memory --memory-limit, spills to OUT/_work) or
--engine spark (PySpark; --spark-master local[N] | yarn | spark://... | k8s://..., or under spark-submit:
    spark-submit --py-files pretrain.zip tools/build_shards.py LOGS... --out hdfs:///... --engine spark).

Exit status: 0 when done, 1 if some shards failed (run the same command again to retry them), 2 on a
usage error or bad inputs.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from pretrain.data.build import REPORT_FILE, BuildError, BuildOptions, build, format_summary


def parse_size(text: str) -> int:
    """``1000000``, ``500MB``, ``1GB``, ``45KB`` (powers of 1024) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1000000, 500MB, 1GB)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def parser() -> argparse.ArgumentParser:
    d = BuildOptions(inputs=[], out="")
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
    for name in ("query", "image", "clicks", "impressions", "query_id", "image_id", "timestamp"):
        g.add_argument(f"--{name.replace('_', '-')}-col", default=getattr(d, f"{name}_col"))
    g = ap.add_argument_group("filters")
    g.add_argument("--min-clicks", type=int, default=d.min_clicks, help="minimum aggregated clicks of a pair")
    g.add_argument("--min-ctr", type=float, default=d.min_ctr, help="minimum clicks/impressions (when impressions > 0)")
    g.add_argument("--min-query-len", type=int, default=d.min_query_len,
                   help="minimum characters of the normalised query")
    g.add_argument("--max-query-len", type=int, default=d.max_query_len, help="maximum characters (0 = no limit)")
    g.add_argument("--min-image-side", type=int, default=d.min_image_side, help="minimum shorter side in pixels")
    g.add_argument("--max-aspect-ratio", type=float, default=d.max_aspect_ratio,
                   help="maximum long/short side (0 = no limit)")
    g = ap.add_argument_group("images")
    g.add_argument("--resize", type=int, default=d.resize, help="target side in pixels, only shrinks (0 = no resize)")
    g.add_argument("--resize-mode", choices=["longest", "shortest"], default=d.resize_mode,
                   help="which side --resize applies to (aspect ratio kept)")
    g.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    g = ap.add_argument_group("output")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the global shuffle")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="fraction of queries held out in val/")
    g.add_argument("--shard-size", type=int, default=d.shard_size, help="maximum samples per shard")
    g.add_argument("--max-shard-bytes", type=parse_size, default=d.max_shard_bytes,
                   help="maximum tar size (e.g. 500MB)")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="processes reading/decoding/encoding images (1 = in this process)")
    g = ap.add_argument_group("engine")
    g.add_argument("--engine", choices=["local", "spark"], default=d.engine,
                   help="local: DuckDB in this process (out of core); spark: PySpark (same shards)")
    g.add_argument("--spark-master", default=d.spark_master,
                   help="Spark master: local[N], yarn, spark://HOST:PORT, k8s://... (default: spark-submit's)")
    g.add_argument("--memory-limit", default=d.memory_limit,
                   help="local engine: DuckDB memory limit; beyond it the plan spills to OUT/_work")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the shards, plan and report of an earlier build in --out first")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--quiet", action="store_true", help="no summary")
    ap.add_argument("--debug-crash-after-shards", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def options_from(args: argparse.Namespace) -> BuildOptions:
    fields = {k: v for k, v in vars(args).items() if k not in ("no_progress", "quiet")}
    return BuildOptions(**fields, progress=not args.no_progress)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        report = build(options_from(args))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_summary(report))
    if report["run"]["shards_failed"]:
        print(f"error: {report['run']['shards_failed']} shard(s) failed (see {os.path.join(args.out, REPORT_FILE)}); "
              f"run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
