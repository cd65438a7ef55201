"""pretrain.data.build and its CLI tools/build_shards.py: click logs (TSV, CSV, JSONL, Parquet) -> WebDataset
shards, report, resume."""
import base64
import importlib.util
import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from pretrain.data import ids
from pretrain.data.build import BAD_REASONS, FILTER_REASONS, BuildOptions, build, images, inputs, plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_cli():
    """tools/build_shards.py by its path (tools/ is not a package; nothing is added to sys.path)."""
    spec = importlib.util.spec_from_file_location("_tool_build_shards", os.path.join(ROOT, "tools", "build_shards.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bs = _load_cli()

OPTS = ["--min-ctr", "0.05", "--min-query-len", "2", "--max-query-len", "20", "--val-fraction", "0.3",
        "--shard-size", "4", "--workers", "1", "--no-progress", "--quiet"]
COLORS = [(200, 30, 30), (30, 160, 40), (30, 60, 200), (230, 210, 30), (140, 40, 180), (20, 190, 200),
          (240, 120, 180), (90, 90, 90)]


def _img_bytes(size, color, fmt="JPEG"):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def _make_images(d):
    os.makedirs(d / "img", exist_ok=True)
    for i, c in enumerate(COLORS):
        (d / "img" / f"g{i}.jpg").write_bytes(_img_bytes((64, 48), c))
    (d / "img" / "copy_of_g0.jpg").write_bytes((d / "img" / "g0.jpg").read_bytes())
    (d / "img" / "tiny.jpg").write_bytes(_img_bytes((16, 16), (1, 2, 3)))
    (d / "img" / "wide.jpg").write_bytes(_img_bytes((200, 40), (9, 9, 9)))
    (d / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all" * 3)


def _planted():
    """(records, fates): each record a dict (or a raw malformed marker), each fate what must happen to it."""
    b64 = lambda i, fmt="JPEG": base64.b64encode(_img_bytes((40, 40), COLORS[i], fmt)).decode()  # noqa: E731
    R = []  # (query, image, clicks, impressions, fate)
    R += [("red apple", "img/g0.jpg", "3", "10", ("new", "red apple|g0")),
          ("Red  Apple", "img/g0.jpg", "2", "5", ("dup",)),
          ("red apple", "img/copy_of_g0.jpg", "1", "1", ("dup",)),          # same bytes as g0
          ("green pear", "img/g1.jpg", "1", "4", ("new",)),
          ("绿色的梨", "img/g1.jpg", "5", "9", ("new",)),
          ("蓝色 天空", "img/g2.jpg", "2", "2", ("new",)),
          ("ＢＬＵＥ  sky", "img/g2.jpg", "1", "3", ("new", "blue sky|g2")),   # NFKC + case -> "blue sky"
          ("blue sky", "img/g3.jpg", "4", "8", ("new",)),
          ("blue sky", "img/g2.jpg", "1", "", ("dup",)),
          ("yellow sun", "base64:" + b64(3), "2", "2", ("new",)),
          ("sun", "data:image/png;base64," + b64(4, "PNG"), "1", "1", ("new",)),
          ("moon", b64(5), "6", "7", ("new",)),                              # bare base64, detected
          ("star field", "img/g7.jpg", "1", "0", ("new",))]
    R += [(f"query number {k}", f"img/g{k % 8}.jpg", str(1 + k % 3), str(5 + k % 5), ("new",)) for k in range(14)]
    R += [("red apple", "img/g1.jpg", "0", "5", ("filtered", "min_clicks", True)),
          ("zero", "img/g2.jpg", "0", "3", ("filtered", "min_clicks", True)),
          ("zero", "img/g2.jpg", "0", "1", ("filtered", "min_clicks", False)),  # merged into the pair above
          ("rare", "img/g3.jpg", "1", "100", ("filtered", "min_ctr", True)),
          ("x" * 30, "img/g0.jpg", "1", "1", ("filtered", "query_too_long", True)),
          ("a", "img/g1.jpg", "1", "1", ("filtered", "query_too_short", True)),
          ("tiny thing", "img/tiny.jpg", "2", "3", ("filtered", "image_too_small", True)),
          ("banner", "img/wide.jpg", "2", "3", ("filtered", "aspect_ratio", True))]
    R += [("", "img/g0.jpg", "1", "1", ("bad", "missing_field")),
          ("   ", "img/g0.jpg", "1", "1", ("bad", "missing_field")),
          ("no image", "", "1", "1", ("bad", "missing_field")),
          ("bad clicks", "img/g0.jpg", "abc", "1", ("bad", "bad_number")),
          ("negative", "img/g0.jpg", "1", "-2", ("bad", "bad_number")),
          ("missing file", "img/nope.jpg", "1", "1", ("bad", "unreadable_image")),
          ("corrupt", "img/corrupt.jpg", "1", "1", ("bad", "undecodable_image")),
          ("corrupt", "img/corrupt.jpg", "2", "1", ("bad", "undecodable_image")),
          ("b64 junk", "base64:@@@not base64@@@", "1", "1", ("bad", "bad_base64"))]
    # interleave deterministically so that duplicates and bad rows are spread out
    order = sorted(range(len(R)), key=lambda i: (i * 7919) % len(R))
    rows = [R[i] for i in order]
    # keep each "dup" after the row it merges into, and the first "zero" before the second
    firsts = [r for r in rows if r[4][0] != "dup" and not (r[4][0] == "filtered" and not r[4][2])]
    later = [r for r in rows if r not in firsts]
    return firsts + later


def _write_log(d, fmt, rows):
    """Writes the log; returns {line number: fate} including the malformed lines of the format."""
    fates = {}
    cols = ["query", "image", "clicks", "impressions"]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: [r[i] if r[i] != "" or c in ("query", "image") else None for r in rows]
                          for i, c in enumerate(cols)})
        pq.write_table(table, d / "log.parquet")
        return {i + 1: r[4] for i, r in enumerate(rows)}
    lines = []
    for r in rows:
        if fmt == "jsonl":
            rec = {c: r[i] for i, c in enumerate(cols) if not (c == "impressions" and r[i] == "")}
            if rec["clicks"].isdigit():
                rec["clicks"] = int(rec["clicks"])
            lines.append((json.dumps(rec, ensure_ascii=False).encode("utf-8"), r[4]))
        elif fmt == "csv":
            buf = io.StringIO()
            csv.writer(buf, lineterminator="").writerow(list(r[:4]))
            lines.append((buf.getvalue().encode("utf-8"), r[4]))
        else:
            lines.append(("\t".join(r[:4]).encode("utf-8"), r[4]))
    malformed = {"tsv": b"only\ttwo", "csv": b"only,two", "jsonl": b'{"query": "broken", "image": '}
    reason = {"tsv": "wrong_column_count", "csv": "wrong_column_count", "jsonl": "malformed_json"}[fmt]
    lines.insert(5, (malformed[fmt], ("bad", reason)))
    lines.insert(11, (b"caf\xe9 latin-1\timg/g0.jpg\t1\t1" if fmt != "jsonl" else b'{"query": "caf\xe9"}',
                      ("bad", "bad_encoding")))
    lines.insert(17, (b"", None))  # a blank line: skipped, not a row
    header = {"tsv": b"query\timage\tclicks\timpressions\n", "csv": b"query,image,clicks,impressions\n", "jsonl": b""}
    first = 2 if header[fmt] else 1
    with open(d / f"log.{fmt}", "wb") as f:
        f.write(header[fmt])
        for i, (line, fate) in enumerate(lines):
            f.write(line + b"\n")
            if fate is not None:
                fates[first + i] = fate
    return fates


def _expected(fates, name):
    exp = {"input_rows": len(fates), "bad": {}, "bad_lines": {}, "filtered_rows": {}, "filtered_pairs": {},
           "dup": 0, "written": 0}
    for line, fate in sorted(fates.items()):
        kind = fate[0]
        if kind == "bad":
            exp["bad"][fate[1]] = exp["bad"].get(fate[1], 0) + 1
            exp["bad_lines"].setdefault(fate[1], []).append(f"{name}:{line}")
        elif kind == "filtered":
            exp["filtered_rows"][fate[1]] = exp["filtered_rows"].get(fate[1], 0) + 1
            exp["filtered_pairs"][fate[1]] = exp["filtered_pairs"].get(fate[1], 0) + int(fate[2])
        elif kind == "dup":
            exp["dup"] += 1
        else:
            exp["written"] += 1
    return exp


def _read_tars(split_dir):
    """{shard name: [(key, {ext: bytes})]} read with plain tarfile."""
    out = {}
    for name in sorted(os.listdir(split_dir)):
        if not name.endswith(".tar"):
            continue
        samples = []
        with tarfile.open(os.path.join(split_dir, name)) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = tar.extractfile(m).read()
        out[name] = samples
    return out


def _build(tmp_path, fmt, out_name="out", extra=()):
    src = tmp_path / "src"
    if not (src / "img").exists():
        src.mkdir(exist_ok=True)
        _make_images(src)
    fates = _write_log(src, fmt, _planted())
    out = tmp_path / out_name
    rc = bs.main([str(src / f"log.{fmt}"), "--out", str(out), *OPTS, *extra])
    return rc, out, fates


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_report_counts_match_the_planted_rows(tmp_path, fmt):
    rc, out, fates = _build(tmp_path, fmt)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    exp = _expected(fates, f"log.{fmt}")
    assert report["input_rows"] == exp["input_rows"]
    for reason in BAD_REASONS:
        got = report["bad_rows"]["by_reason"][reason]
        assert got["rows"] == exp["bad"].get(reason, 0), reason
        assert got["first_lines"] == exp["bad_lines"].get(reason, [])[:5], reason
    for reason in FILTER_REASONS:
        got = report["filtered"]["by_reason"][reason]
        assert got["rows"] == exp["filtered_rows"].get(reason, 0), reason
        assert got["pairs"] == exp["filtered_pairs"].get(reason, 0), reason
    acc = report["accounting"]
    assert acc["duplicate_rows"] == exp["dup"]
    assert acc["written_samples"] == exp["written"]
    assert acc["bad_rows"] == sum(exp["bad"].values())
    assert acc["filtered_rows"] == sum(exp["filtered_rows"].values())
    assert acc["ok"] and acc["sum"] == acc["input_rows"]
    assert acc["input_rows"] == acc["bad_rows"] + acc["duplicate_rows"] + acc["filtered_rows"] + acc["written_samples"]
    assert report["images"]["duplicate_images"] == 1                       # copy_of_g0.jpg
    assert sum(w["samples"] for w in report["written"].values()) == exp["written"]

    # shards: sizes.json matches the tars; splits disjoint by query; layout and json fields
    texts = {}
    by_sha = {}
    by_query = {}
    keys = set()
    for split in ("train", "val"):
        tars = _read_tars(out / split)
        sizes = json.loads((out / split / "sizes.json").read_text())
        assert sizes == {name: len(s) for name, s in tars.items()}
        assert list(sizes) == [f"shard-{i:06d}.tar" for i in range(len(sizes))]
        assert all(n <= 4 for n in sizes.values())
        texts[split] = set()
        for samples in tars.values():
            for key, files in samples:
                assert set(files) == {"jpg", "txt", "json"}
                assert key not in keys
                keys.add(key)
                meta = json.loads(files["json"])
                txt = files["txt"].decode("utf-8")
                texts[split].add(txt)
                assert meta["key"] == key and meta["split"] == split
                with Image.open(io.BytesIO(files["jpg"])) as im:
                    assert im.format == "JPEG" and im.mode == "RGB"
                    assert im.size == (meta["width"], meta["height"])
                assert isinstance(meta["query_id"], int) and isinstance(meta["image_id"], int)
                assert by_sha.setdefault(meta["image_sha1"], meta["image_id"]) == meta["image_id"]
                assert by_query.setdefault(txt, meta["query_id"]) == meta["query_id"]
                assert meta["query_id"] == ids.query_hash(txt)
                if txt == "red apple" and meta["image_path"] == "img/g0.jpg":
                    assert (meta["clicks"], meta["impressions"], meta["rows"]) == (6, 16, 3)
                    line = next(ln for ln, f in fates.items() if f == ("new", "red apple|g0"))
                    assert meta["source"] == f"log.{fmt}:{line}"
                    assert meta["query"] == "red apple"
                if txt == "blue sky" and meta["original_width"] == 64 and meta["image_path"] in ("img/g2.jpg",):
                    assert meta["query"] == "ＢＬＵＥ  sky" and meta["rows"] == 2
    assert texts["train"] and texts["val"]
    assert not texts["train"] & texts["val"]
    assert {"绿色的梨", "蓝色 天空", "blue sky", "red apple", "moon"} <= texts["train"] | texts["val"]
    assert len(keys) == exp["written"]


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    rc, out, fates = _build(tmp_path, "tsv")
    assert rc == 0
    sizes = json.loads((out / "train" / "sizes.json").read_text())
    urls = [str(out / "train" / name) for name in sizes]
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        assert sample["jpg"].mode == "RGB"
        assert isinstance(sample["txt"], str) and sample["txt"]
        assert sample["json"]["key"] == sample["__key__"]
        n += 1
    assert n == sum(sizes.values())


def test_killed_build_resumes_byte_identical_and_rerun_skips(tmp_path):
    rc, ref, _ = _build(tmp_path, "tsv", "ref")
    assert rc == 0
    src = tmp_path / "src" / "log.tsv"
    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "build_shards.py"), str(src), "--out", str(out), *OPTS,
           "--debug-crash-after-shards", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr
    assert (out / "train" / "shard-000000.tar").exists()
    assert not (out / "train" / "shard-000001.tar").exists()
    assert (out / "train" / "shard-000001.tar.tmp").exists()       # half-written, left by the "kill"
    assert not (out / "train" / "sizes.json").exists()
    assert bs.main([str(src), "--out", str(out), *OPTS]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["plan_reused"] and report["run"]["shards_skipped"] == 1

    def files(d):
        return {os.path.relpath(os.path.join(p, f), d): open(os.path.join(p, f), "rb").read()
                for p, _, fs in os.walk(d) for f in fs if p != str(d)}

    assert files(ref) == files(out)            # every shard and sizes.json, byte for byte; no .tmp left
    assert not any(name.endswith(".tmp") for name in files(out))

    mtimes = {p: os.stat(out / p).st_mtime_ns for p in files(out) if p.endswith(".tar")}
    assert bs.main([str(src), "--out", str(out), *OPTS]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["shards_written"] == 0
    assert report["run"]["shards_skipped"] == len(mtimes)
    assert mtimes == {p: os.stat(out / p).st_mtime_ns for p in mtimes}

    # other options: refused unless --overwrite
    assert bs.main([str(src), "--out", str(out), *OPTS, "--seed", "7"]) == 2
    assert bs.main([str(src), "--out", str(out), *OPTS, "--seed", "7", "--overwrite"]) == 0


def test_worker_processes_give_the_same_bytes(tmp_path):
    rc, ref, _ = _build(tmp_path, "jsonl", "one")
    assert rc == 0
    rc, out, _ = _build(tmp_path, "jsonl", "two", ["--workers", "2"])
    assert rc == 0
    for split in ("train", "val"):
        for name in os.listdir(ref / split):
            assert (ref / split / name).read_bytes() == (out / split / name).read_bytes()


def test_byte_limit_resize_and_fsspec_output(tmp_path):
    import fsspec

    src = tmp_path / "src"
    src.mkdir()
    lines = ["query\timage\tclicks"]
    for i in range(6):
        Image.effect_noise((300, 100), 60 + i).convert("RGB").save(src / f"n{i}.png")
        lines.append(f"noise {i}\tn{i}.png\t1")
    (src / "log.tsv").write_text("\n".join(lines) + "\n")
    out = "memory://bs-test/out"
    assert bs.main([str(src / "log.tsv"), "--out", out, "--resize", "64", "--resize-mode", "shortest",
                    "--max-shard-bytes", "45KB", "--workers", "1", "--no-progress", "--quiet"]) == 0
    fs = fsspec.filesystem("memory")
    sizes = json.loads(fs.cat("/bs-test/out/train/sizes.json"))
    assert sum(sizes.values()) == 6 and len(sizes) > 1
    for name in sizes:
        data = fs.cat(f"/bs-test/out/train/{name}")
        assert len(data) <= 45 * 1024
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    with Image.open(tar.extractfile(m)) as im:
                        assert im.size == (192, 64)      # shorter side 100 -> 64, ratio kept
    fs.rm("/bs-test", recursive=True)


def test_helpers():
    assert ids.normalize_query("  Ｒｅｄ\u3000 CIRCLE\t") == "red circle"
    assert ids.normalize_query("红色 的 圆形") == "红色 的 圆形"
    assert ids.normalize_query("ÉCOLE ΩMEGA") == "école ωmega"        # every script lower-cased
    im = Image.new("RGB", (300, 100))
    assert images.resize_image(im, 64, "longest").size == (64, 21)
    assert images.resize_image(im, 64, "shortest").size == (192, 64)
    assert images.resize_image(im, 400, "longest").size == (300, 100)   # never enlarged
    assert images.resize_image(im, 0, "longest").size == (300, 100)
    assert plan.split_of("red circle", 0.5) == plan.split_of("red circle", 0.5)
    assert 0 <= ids.query_hash("red circle") < 2 ** 63
    assert inputs.parse_count("3.0") == 3 and inputs.parse_count("") is None
    assert inputs.parse_id("0042") == 42 and inputs.parse_id("abc") == "abc"
    for bad in ("x", "-1", "2.5", "nan"):
        with pytest.raises(inputs.BadRow):
            inputs.parse_count(bad)
    assert bs.parse_size("45KB") == 45 * 1024 and bs.parse_size("1GB") == 1024 ** 3


def test_library_call_without_argparse(tmp_path):
    """The builder takes a BuildOptions: the same shards as the CLI, and bad options are a BuildError."""
    from pretrain.data.build import BuildError

    rc, ref, _ = _build(tmp_path, "tsv", "cli")
    assert rc == 0
    opts = BuildOptions(inputs=[str(tmp_path / "src" / "log.tsv")], out=str(tmp_path / "lib"), min_ctr=0.05,
                        min_query_len=2, max_query_len=20, val_fraction=0.3, shard_size=4, workers=1, progress=False)
    report = build(opts)
    assert report["accounting"]["ok"]
    for split in ("train", "val"):
        for name in os.listdir(ref / split):
            assert (ref / split / name).read_bytes() == (tmp_path / "lib" / split / name).read_bytes()
    with pytest.raises(BuildError, match="val-fraction"):
        build(BuildOptions(inputs=opts.inputs, out=str(tmp_path / "x"), val_fraction=1.5))


def test_builder_and_inspector_do_not_import_torch():
    code = "import pretrain.data.build, pretrain.data.inspection, sys; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
