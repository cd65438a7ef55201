"""The builder's two engines: the local one (DuckDB, out of core) and Spark (real PySpark, ``local[2]``) give
byte-identical shards, the same sizes.json and the same report counts on a dirty click log; each image is
fetched and encoded once; a killed build of either engine resumes to the same shards."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_build_shards import OPTS, _make_images, _read_tars, _write_log, _planted, bs, ROOT

NOT_COMPARED = ("out", "inputs", "run", "time_s", "throughput_images_per_s")


def _java_ok():
    if shutil.which("java") is None:
        return False
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return False
    return True


spark_only = pytest.mark.skipif(not _java_ok(), reason="needs pyspark and a Java runtime (.ci/setup.sh installs them)")
SPARK = ["--engine", "spark", "--spark-master", "local[2]"]


@pytest.fixture(scope="module")
def dirty_log(tmp_path_factory):
    """Two files (TSV and JSONL) of the planted dirty log: duplicates, filtered rows, broken and missing
    images, bad base64, malformed lines, invalid UTF-8, a blank line; the same image under two paths."""
    src = tmp_path_factory.mktemp("engines") / "src"
    src.mkdir()
    _make_images(src)
    _write_log(src, "tsv", _planted())
    _write_log(src, "jsonl", _planted())
    return [str(src / "log.tsv"), str(src / "log.jsonl")]


def _files(d):
    """Every file below the split folders, by relative path (shards and sizes.json)."""
    return {os.path.relpath(os.path.join(p, f), d): open(os.path.join(p, f), "rb").read()
            for s in ("train", "val") for p, _, fs in os.walk(os.path.join(d, s)) for f in fs}


def _counts(out):
    report = json.loads((out / "report.json").read_text())
    return {k: v for k, v in report.items() if k not in NOT_COMPARED}, report


@pytest.fixture(scope="module")
def local_ref(dirty_log, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    assert bs.main([*dirty_log, "--out", str(out), *OPTS]) == 0
    return out


def test_local_engine_fetches_and_encodes_each_image_once(local_ref, tmp_path):
    counts, report = _counts(local_ref)
    images = counts["images"]
    assert images["fetches"] == images["distinct_references"] == 17
    failures = images["distinct_references"] - images["readable_references"]
    assert images["encodes"] <= images["unique_images"] + images["duplicate_images"]
    assert images["encodes"] <= images["distinct_references"] - failures
    assert report["run"]["write_fetches"] == report["run"]["write_encodes"] == 0
    assert not (local_ref / "_work").exists()                 # the JPEG cache is gone once every shard is written
    assert report["accounting"]["ok"]
    # the same shards with a tiny DuckDB memory limit (its operators spill to OUT/_work)
    out = tmp_path / "small"
    assert bs.main([*_inputs(local_ref), "--out", str(out), *OPTS, "--memory-limit", "16MB"]) == 0
    assert _files(out) == _files(local_ref)


def _inputs(out):
    report = json.loads((out / "report.json").read_text())
    return [x["url"] for x in report["inputs"]]


def test_deleted_shard_is_rewritten_without_the_cache(local_ref, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(local_ref, out)
    (out / "train" / "shard-000001.tar").unlink()
    assert bs.main([*_inputs(local_ref), "--out", str(out), *OPTS]) == 0
    _, report = _counts(out)
    assert report["run"]["plan_reused"] and report["run"]["shards_written"] == 1
    assert 0 < report["run"]["write_encodes"] <= 4             # fetched and encoded again: the cache was removed
    assert _files(out) == _files(local_ref)


@spark_only
def test_spark_and_local_engines_give_the_same_shards(dirty_log, local_ref, tmp_path):
    out = tmp_path / "spark"
    assert bs.main([*dirty_log, "--out", str(out), *OPTS, *SPARK]) == 0
    ref_files, got = _files(local_ref), _files(out)
    assert sorted(got) == sorted(ref_files)
    assert got == ref_files                                    # every shard and sizes.json, byte for byte
    ref_counts, _ = _counts(local_ref)
    counts, report = _counts(out)
    assert counts == ref_counts                                # every count, reason and first location
    assert report["run"]["engine"] == "spark"
    assert counts["bad_rows"]["by_reason"]["bad_encoding"]["rows"] == 2
    assert counts["bad_rows"]["by_reason"]["malformed_json"]["first_lines"] == ["log.jsonl:6"]
    assert counts["duplicate_rows"]["total"] > 0 and counts["filtered"]["total_rows"] > 0
    queries = {}
    for split in ("train", "val"):
        queries[split] = {files["txt"] for samples in _read_tars(out / split).values() for _, files in samples}
    assert queries["train"] and queries["val"] and not queries["train"] & queries["val"]


@spark_only
@pytest.mark.parametrize("engine", ["spark", "local"])
def test_killed_build_resumes_to_the_same_shards(dirty_log, local_ref, tmp_path, engine):
    """Killed half-way through writing (either engine), re-run: the same shards as an uninterrupted build."""
    out = tmp_path / "killed"
    flags = SPARK if engine == "spark" else ["--engine", "local"]
    cmd = [sys.executable, os.path.join(ROOT, "tools", "build_shards.py"), *dirty_log, "--out", str(out), *OPTS,
           *flags, "--debug-crash-after-shards", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert (out / "train" / "shard-000002.tar.tmp").exists() and not (out / "train" / "sizes.json").exists()
    # resumed by the other engine for the local kill, by Spark again for the Spark kill
    assert bs.main([*dirty_log, "--out", str(out), *OPTS, *SPARK]) == 0
    _, report = _counts(out)
    assert report["run"]["plan_reused"] and report["run"]["shards_skipped"] == 2
    assert _files(out) == _files(local_ref)
    assert not any(name.endswith(".tmp") for name in _files(out))


def test_ustar_writer_matches_tarfile():
    """The shard writer's ustar stream is byte for byte what tarfile writes for the same members."""
    import io
    import random
    import tarfile

    from pretrain.data import tar

    rng = random.Random(0)
    for trial in range(60):
        members = [(f"{rng.randrange(10 ** 9):09d}.{rng.choice(['jpg', 'txt', 'json'])}" + "x" * (trial % 5) * 17,
                    rng.randbytes(rng.choice([0, 1, 511, 512, 513, rng.randrange(20000)])))
                   for _ in range(rng.randrange(0, 8))]
        ref = io.BytesIO()
        with tarfile.open(fileobj=ref, mode="w|", format=tarfile.USTAR_FORMAT) as t:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
                t.addfile(info, io.BytesIO(data))
        got = io.BytesIO()
        w = tar.open_writer(got)
        for name, data in members:
            tar.add_member(w, name, data)
        w.close()
        assert got.getvalue() == ref.getvalue()
        assert len(got.getvalue()) == tar.archive_bytes(sum(tar.member_bytes(len(d)) for _, d in members))
