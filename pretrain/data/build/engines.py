"""The two engines that run a plan: ``local`` (DuckDB, embedded, out of core) and ``spark`` (PySpark).

Both offer the same few operations to ``plan.make_plan`` and ``write``: ``map`` a picklable function over
a list of tasks (parse a file, write a shard), ``examine`` every distinct image reference once, ``load`` a
folder of Parquet files as a table, ``create`` a table from a statement of ``sql.py``, ``query`` a small
result and ``stream`` a large ordered one in batches. The Python work (parsing, images, shards) is the same
functions in the local worker processes and in Spark's executors; the relational work is the same SQL.

Why DuckDB for the local engine: its hash aggregation, joins, window functions and sorts spill to a temp
folder when they pass ``memory_limit``, so one process handles a log of any size in a fixed budget, with
no service to start (measured in the README: peak RSS flat from 1 M to 10 M rows).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Iterator

from .images import IMAGE_FIELDS, examine_image

STREAM_BATCH = 10000


def images_schema():
    import pyarrow as pa

    s, i = pa.string(), pa.int64()
    return pa.schema([("ref", pa.large_string()), ("status", s), ("sha1", s), ("image_id", i), ("w", i), ("h", i),
                      ("sw", i), ("sh", i), ("jpg_size", i), ("encoded", i), ("message", s)])


class LocalEngine:
    """DuckDB in one process (a database file in the work folder, ``memory_limit``, spilling to disk);
    image and shard work in ``pool`` (a multiprocessing pool, or None: in this process)."""

    name = "local"

    def __init__(self, work: str, pool, memory_limit: str, threads: int):
        import duckdb

        self.work, self.pool = work, pool
        os.makedirs(work, exist_ok=True)
        self.con = duckdb.connect(os.path.join(work, "plan.duckdb"))
        for setting in (f"memory_limit='{memory_limit}'", f"threads={max(1, threads)}",
                        f"temp_directory='{os.path.join(work, 'spill')}'", "preserve_insertion_order=false"):
            self.con.execute(f"SET {setting}")

    def map(self, fn: Callable, tasks: list, chunksize: int = 1) -> Iterator:
        return self.pool.imap_unordered(fn, tasks, chunksize=chunksize) if self.pool else map(fn, tasks)

    def load(self, name: str, folder: str) -> None:
        self.con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{folder}/*.parquet')")

    def create(self, name: str, statement: str) -> None:
        self.con.execute(f"CREATE OR REPLACE TABLE {name} AS {statement}")

    def query(self, statement: str) -> list:
        return self.con.execute(statement).fetchall()

    def stream(self, statement: str) -> Iterator[tuple]:
        cur = self.con.execute(statement)
        while True:
            batch = cur.fetchmany(STREAM_BATCH)
            if not batch:
                return
            yield from batch

    def register_shuffle_key(self, seed: int) -> None:
        import pyarrow as pa
        import duckdb

        from .plan import shuffle_key

        def key(q, s):
            return pa.array([shuffle_key(seed, a, b).hex() for a, b in zip(q.to_pylist(), s.to_pylist())], pa.string())

        try:
            self.con.remove_function("shuffle_key")
        except Exception:  # noqa: BLE001 - not registered yet
            pass
        varchar = duckdb.sqltype("VARCHAR") if hasattr(duckdb, "sqltype") else duckdb.typing.VARCHAR
        self.con.create_function("shuffle_key", key, [varchar, varchar], varchar, type="arrow")

    def examine(self, params: tuple, folder: str, progress: Callable) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .sql import DISTINCT_REFS

        os.makedirs(folder, exist_ok=True)
        total = self.con.execute(f"SELECT COUNT(*) FROM ({DISTINCT_REFS}) t").fetchone()[0]
        schema = images_schema()
        tasks = ((row[0],) + params for row in self.stream(f"SELECT ref FROM ({DISTINCT_REFS}) t"))
        workers = getattr(self.pool, "_processes", 1) if self.pool else 1
        chunk = max(1, min(64, total // (8 * workers) or 1))
        results = (self.pool.imap_unordered(examine_image, tasks, chunksize=chunk) if self.pool
                   else map(examine_image, tasks))
        path = os.path.join(folder, "part-000000.parquet")
        buf = []
        with pq.ParquetWriter(path + ".tmp", schema) as writer, progress(desc="examine images", unit=" img",
                                                                          total=total) as bar:
            for res in results:
                buf.append(res)
                bar.update(1)
                if len(buf) >= STREAM_BATCH:
                    writer.write_table(pa.Table.from_pylist([dict(zip(IMAGE_FIELDS, r)) for r in buf], schema))
                    buf.clear()
            writer.write_table(pa.Table.from_pylist([dict(zip(IMAGE_FIELDS, r)) for r in buf], schema))
        os.replace(path + ".tmp", path)

    def close(self) -> None:
        self.con.close()


class SparkEngine:
    """PySpark: the session of ``spark-submit`` when there is one, else one on ``master`` (``local[N]``,
    ``yarn``, ``spark://...``, ``k8s://...``). Tables are Parquet folders under the work URL, which every
    executor must reach (HDFS, S3, GCS, or a local path with ``local[N]``)."""

    name = "spark"

    def __init__(self, work: str, master: str | None, shuffle_partitions: int | None = None):
        from pyspark import SparkContext
        from pyspark.sql import SparkSession

        self.owned = SparkContext._active_spark_context is None  # else spark-submit's or the caller's session
        if master and master.startswith("local"):
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        builder = SparkSession.builder.appName("wenlan-build-shards")
        if master:
            builder = builder.master(master)
        if master and master.startswith("local"):
            builder = (builder.config("spark.sql.shuffle.partitions", str(shuffle_partitions or 8))
                       .config("spark.ui.enabled", "false").config("spark.driver.memory", "2g")
                       .config("spark.ui.showConsoleProgress", "false"))
        self.spark = builder.getOrCreate()
        self.spark.sparkContext.setLogLevel("ERROR")
        self.work = work

    @staticmethod
    def _spark_url(url: str) -> str:
        """The URL Spark's Hadoop filesystems read (fsspec's ``s3://`` is Hadoop's ``s3a://``)."""
        if "://" not in url[:32]:
            return "file://" + os.path.abspath(url)
        return "s3a://" + url[5:] if url.startswith("s3://") else url

    def map(self, fn: Callable, tasks: list, chunksize: int = 1) -> Iterator:
        if not tasks:
            return iter(())
        sc = self.spark.sparkContext
        return iter(sc.parallelize(tasks, len(tasks)).map(fn).collect())

    def load(self, name: str, folder: str) -> None:
        self.spark.read.parquet(self._spark_url(folder)).createOrReplaceTempView(name)

    def create(self, name: str, statement: str) -> None:
        from pyspark import StorageLevel

        # on disk: with local[N] the executors share the driver's heap, which the streamed results need
        df = self.spark.sql(statement).persist(StorageLevel.DISK_ONLY)
        df.createOrReplaceTempView(name)

    def query(self, statement: str) -> list:
        return [tuple(r) for r in self.spark.sql(statement).collect()]

    def stream(self, statement: str) -> Iterator[tuple]:
        for r in self.spark.sql(statement).toLocalIterator(prefetchPartitions=False):
            yield tuple(r)

    def register_shuffle_key(self, seed: int) -> None:
        from pyspark.sql.types import StringType

        from .plan import shuffle_key

        self.spark.udf.register("shuffle_key", lambda q, s: shuffle_key(seed, q, s).hex(), StringType())

    def examine(self, params: tuple, folder: str, progress: Callable) -> None:
        from pyspark.sql.types import LongType, StringType, StructField, StructType

        from .sql import DISTINCT_REFS

        refs = self.spark.sql(DISTINCT_REFS)
        n = max(self.spark.sparkContext.defaultParallelism, 1)
        rdd = refs.repartition(n).rdd.map(lambda row: examine_image((row[0],) + params))
        types = {"image_id": LongType(), "w": LongType(), "h": LongType(), "sw": LongType(), "sh": LongType(),
                 "jpg_size": LongType(), "encoded": LongType()}
        schema = StructType([StructField(f, types.get(f, StringType()), True) for f in IMAGE_FIELDS])
        self.spark.createDataFrame(rdd, schema).write.mode("overwrite").parquet(self._spark_url(folder))

    def close(self) -> None:
        """Drop the cached tables; a session this engine started is stopped and its JVM waited for (so that
        its CPU time is accounted to this process, and a later build starts a fresh one)."""
        from pyspark import SparkContext

        self.spark.catalog.clearCache()
        if not self.owned:
            return
        self.spark.stop()
        if os.environ.get("PYSPARK_GATEWAY_PORT"):  # under spark-submit: the JVM is our parent, not ours to end
            return
        gateway = SparkContext._gateway
        proc = getattr(gateway, "proc", None)
        if gateway is not None:
            gateway.shutdown()
        if proc is not None:
            proc.stdin.close()
            proc.wait(timeout=120)
        SparkContext._gateway = None
        SparkContext._jvm = None


def make_engine(options, work: str, pool):
    if options.engine == "spark":
        return SparkEngine(work, options.spark_master)
    return LocalEngine(work, pool, options.memory_limit, options.workers)
