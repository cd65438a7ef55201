"""The builder's options: one typed dataclass (the CLI ``tools/build_shards.py`` fills it from its flags)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional

FORMATS = ("tsv", "csv", "jsonl", "parquet")
ENGINES = ("local", "spark")


class BuildError(Exception):
    """A problem with the inputs, the options or the output folder: stops the build."""


@dataclass
class BuildOptions:
    """Everything a build depends on. Fields in ``PLAN_FIELDS`` change the plan (and its fingerprint)."""

    inputs: List[str]
    """Click-log files, globs or folders, local or any fsspec URL."""
    out: str
    """Output folder, local or an fsspec URL."""
    format: Optional[str] = None
    """Input format (tsv, csv, jsonl, parquet); None: from each file's extension."""
    images_root: Optional[str] = None
    """Folder or URL that relative image paths are relative to; None: the folder of the log file naming them."""
    query_col: str = "query"
    """Column of the query text (required)."""
    image_col: str = "image"
    """Column of the image: a path, an fsspec URL or base64 bytes (required)."""
    clicks_col: str = "clicks"
    """Column of the click count (missing: 1)."""
    impressions_col: str = "impressions"
    """Column of the impression count (missing: 0, the CTR filter then does not apply)."""
    query_id_col: str = "query_id"
    """Column of a query id of the log's own (the first non-empty one of a normalised query is kept)."""
    image_id_col: str = "image_id"
    """Column of an image id of the log's own (the first non-empty one of an image content is kept)."""
    timestamp_col: str = "timestamp"
    """Column of a timestamp, kept in KEY.json (first row of a pair)."""
    min_clicks: int = 1
    """Minimum aggregated clicks of a pair."""
    min_ctr: float = 0.0
    """Minimum clicks / impressions of a pair (when impressions > 0)."""
    min_query_len: int = 1
    """Minimum characters of the normalised query."""
    max_query_len: int = 128
    """Maximum characters of the normalised query (0: no limit)."""
    min_image_side: int = 32
    """Minimum shorter side of the image in pixels."""
    max_aspect_ratio: float = 4.0
    """Maximum long side / short side (0: no limit)."""
    resize: int = 0
    """Target side in pixels, only shrinks, ratio kept (0: no resize)."""
    resize_mode: str = "longest"
    """Which side ``resize`` applies to: longest or shortest."""
    jpeg_quality: int = 90
    """JPEG quality of the stored images (1-100)."""
    seed: int = 0
    """Seed of the global shuffle."""
    val_fraction: float = 0.0
    """Fraction of normalised queries held out in val/ (by a stable hash: a query is never in both splits)."""
    shard_size: int = 10000
    """Maximum samples per shard."""
    max_shard_bytes: int = 1024 ** 3
    """Maximum bytes per shard (tar file size)."""
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    """Processes that read, decode and encode images (1: in this process)."""
    engine: str = "local"
    """What runs the plan: ``local`` (DuckDB in this process, out of core; image work in ``workers``
    processes) or ``spark`` (PySpark; image work in executors). Both give byte-identical shards."""
    spark_master: Optional[str] = None
    """Spark master (``local[N]``, ``yarn``, ``spark://...``, ``k8s://...``); None: spark-submit's, else
    Spark's default."""
    memory_limit: str = "512MB"
    """Local engine: DuckDB's memory limit; beyond it joins, aggregations and sorts spill to ``OUT/_work``."""
    overwrite: bool = False
    """Delete the shards, plan and report of an earlier build in ``out`` first."""
    progress: bool = True
    """Progress bars on stderr."""
    debug_crash_after_shards: Optional[int] = None
    """Test hook: exit (status 75) half-way through the shard after this many, as a killed build would."""

    def checked(self) -> "BuildOptions":
        """A copy with defaults resolved (``images_root`` absolute, ``workers`` >= 1); BuildError if invalid."""
        if self.format is not None and self.format not in FORMATS:
            raise BuildError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.resize_mode not in ("longest", "shortest"):
            raise BuildError(f"resize_mode must be longest or shortest, got {self.resize_mode!r}")
        for name, ok, rule in (("shard_size", self.shard_size >= 1, ">= 1"),
                               ("max_shard_bytes", self.max_shard_bytes >= 1, ">= 1"),
                               ("val_fraction", 0.0 <= self.val_fraction < 1.0, "in [0, 1)"),
                               ("jpeg_quality", 1 <= self.jpeg_quality <= 100, "in [1, 100]"),
                               ("resize", self.resize >= 0, ">= 0"),
                               ("min_query_len", self.min_query_len >= 0, ">= 0"),
                               ("max_query_len", self.max_query_len >= 0, ">= 0")):
            if not ok:
                raise BuildError(f"--{name.replace('_', '-')} must be {rule}")
        if self.engine not in ENGINES:
            raise BuildError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if not self.inputs:
            raise BuildError("no input click log given")
        root = self.images_root
        if root and "://" not in root[:32]:
            root = os.path.abspath(root)
        return dataclasses.replace(self, inputs=list(self.inputs), images_root=root, workers=max(1, self.workers))


PLAN_FIELDS = (
    "format", "images_root", "query_col", "image_col", "clicks_col", "impressions_col", "query_id_col",
    "image_id_col", "timestamp_col", "min_clicks", "min_ctr", "min_query_len", "max_query_len",
    "min_image_side", "max_aspect_ratio", "resize", "resize_mode", "jpeg_quality", "seed",
    "val_fraction", "shard_size", "max_shard_bytes",
)
"""The options the plan depends on (saved in the plan and the report; a change refuses to resume)."""


def plan_options(options: BuildOptions) -> dict:
    return {k: getattr(options, k) for k in PLAN_FIELDS}
