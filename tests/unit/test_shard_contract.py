"""The shard contract shared by builder, loader and inspector (issue 10, acceptance 1 and 2).

1. A click log built by the builder and an img2dataset-layout folder holding the same query texts (mixed case,
   Latin, Greek, Chinese, full-width forms) and the same image bytes give identical query_id and image_id in
   ``inspect_shards.py --dump --json``, and the loader sees the same ids.
2. A truncated shard, a shard with a bad JPEG and one with invalid UTF-8 text are flagged by the inspector with
   the reason names that the loader counts.

Expected ids are computed here independently of the library (NFKC, collapsed white space, lower case; unkeyed
blake2b-64 masked to 63 bits).
"""
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import tarfile
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data import ShardStream, iter_eval_batches
from pretrain.data.build import BuildOptions, build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (as written in the click log, as written in the img2dataset caption): the same query in other spellings
QUERIES = [
    ("Red Circle", "red  CIRCLE"),
    ("ÉCOLE Ancienne", "école ancienne"),
    ("Κόκκινος ΚΎΚΛΟΣ", "κόκκινος κύκλος"),
    ("红色圆形", " 红色圆形 "),
    ("ＢＬＵＥ　Ｓｑｕａｒｅ", "Blue Square"),
    ("绿色ＳＴＡＲ ２", "绿色star 2"),
]


def _ref_norm(text):
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def _ref_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") & (2 ** 63 - 1)


def _jpeg(seed, size=48):
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _inspect_cli():
    spec = importlib.util.spec_from_file_location("_tool_inspect_shards_contract",
                                                  os.path.join(ROOT, "tools", "inspect_shards.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dump(spec, capsys, n=100):
    """(dumped sample objects, summary) of ``inspect_shards.py SPEC --dump n --json``."""
    rc = _inspect_cli().main([spec, "--dump", str(n), "--json", "--warn-only"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "summary" in lines[-1]
    return lines[:-1], lines[-1]["summary"]


def _tokenize(texts, **_):
    n = len(texts)
    return {"input_ids": torch.zeros(n, 4, dtype=torch.long), "attention_mask": torch.ones(n, 4, dtype=torch.long)}


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _loader(spec, counts=None):
    """{"shard#KEY": (query_id, image_id)} as the evaluation loader reads them."""
    out = {}
    for b in iter_eval_batches(spec, batch_size=4, image_transform=_to_tensor, tokenizer=_tokenize, max_length=4,
                               counts=counts):
        for key, q, i in zip(b["key"], b["query_id"].tolist(), b["image_id"].tolist()):
            out[key] = (q, i)
    return out


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_builder_and_img2dataset_folder_give_the_same_ids(tmp_path, capsys):
    images = [_jpeg(i) for i in range(len(QUERIES))]
    # a click log of the builder (no id columns), the images as files
    src = tmp_path / "log"
    src.mkdir()
    rows = ["query\timage\tclicks"]
    for i, ((q, _), data) in enumerate(zip(QUERIES, images)):
        (src / f"{i}.jpg").write_bytes(data)
        rows.append(f"{q}\t{i}.jpg\t{i + 1}")
    (src / "clicks.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    built = tmp_path / "built"
    build(BuildOptions(inputs=[str(src / "clicks.tsv")], out=str(built), workers=1, progress=False, shard_size=4))
    # an img2dataset folder: the same bytes, the other spelling, its own json fields and no ids
    folder = tmp_path / "img2dataset"
    folder.mkdir()
    members = []
    for i, ((_, caption), data) in enumerate(zip(QUERIES, images)):
        key = f"{i:09d}"
        meta = {"url": f"http://example.com/{i}.jpg", "key": key, "status": "success", "caption": caption,
                "width": 48, "height": 48, "original_width": 48, "original_height": 48}
        members += [(f"{key}.jpg", data), (f"{key}.txt", caption.encode("utf-8")),
                    (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))]
    _write_tar(folder / "00000.tar", members)

    expected = {_ref_norm(q): (_ref_hash(_ref_norm(q).encode("utf-8")), _ref_hash(data))
                for (q, _), data in zip(QUERIES, images)}
    assert len(expected) == len(QUERIES)
    assert all(_ref_norm(q) == _ref_norm(c) for q, c in QUERIES)  # the test data: one query, two spellings

    views_built, summary = _dump(str(built / "train"), capsys)
    assert summary["samples"] == len(QUERIES) and not summary["problems"]
    views_folder, summary = _dump(str(folder), capsys)
    assert summary["samples"] == len(QUERIES) and not summary["problems"]
    for views in (views_built, views_folder):
        assert len(views) == len(QUERIES)
        got = {v["query"]: (v["query_id"], v["image_id"]) for v in views}
        assert got == expected
        assert all(v["width"] == v["height"] == 48 and v["clicks"] >= 1 for v in views)
    # the loader: the same ids, sample by sample, for both sources and for the two joined
    for spec, views in ((str(built / "train"), views_built), (str(folder), views_folder)):
        assert _loader(spec) == {f"{v['shard']}#{v['key']}": (v["query_id"], v["image_id"]) for v in views}
        # the training stream too (shards drawn with replacement: every sample it gives has the same ids)
        stream = ShardStream(spec, batch_size=len(QUERIES), image_transform=_to_tensor, tokenizer=_tokenize,
                             max_length=4, shuffle_buffer=0)
        b = next(iter(stream))
        seen = dict(zip(b["key"], zip(b["query_id"].tolist(), b["image_id"].tolist())))
        assert seen and all(_loader(spec)[k] == v for k, v in seen.items())
    both = _loader(f"{built / 'train'}::{folder}")
    assert sorted(both.values()) == sorted(list(expected.values()) * 2)  # mixed sources: one id per query, image


def _good(key, seed):
    return [(f"{key}.jpg", _jpeg(seed)), (f"{key}.txt", f"query {seed}".encode()), (f"{key}.json", b"{}")]


@pytest.fixture
def broken_shards(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    # truncated: cut right after the third sample's last member, before the end-of-archive blocks. tarfile
    # (and so webdataset) reads this as a complete archive of three samples; the loader counts shard_error.
    members = [m for k in range(5) for m in _good(f"t{k}", k)]
    full = _write_tar(d / "truncated.tar", members)
    with tarfile.open(full) as tar:
        last = tar.getmembers()[8]
        cut = last.offset_data + -(-last.size // 512) * 512
    data = open(full, "rb").read()[:cut]
    open(full, "wb").write(data)
    with tarfile.open(full, "r|") as tar:  # what the old inspector did: no error at all
        assert len([m for m in tar]) == 9
    # a bad JPEG: a valid header with its body cut off (fails only when decoded), and bytes that are no image
    bad_jpeg = _good("j0", 10) + [("j1.jpg", _jpeg(11, 256)[:700]), ("j1.txt", b"cut jpeg"), ("j1.json", b"{}")]
    bad_jpeg += [("j2.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("j2.txt", b"no jpeg"), ("j2.json", b"{}")]
    _write_tar(d / "bad_jpeg.tar", bad_jpeg + _good("j3", 13))
    # invalid UTF-8 text
    _write_tar(d / "bad_text.tar", _good("u0", 20) + [("u1.jpg", _jpeg(21)), ("u1.txt", b"caf\xe9 cr\xe8me")]
               + _good("u2", 22))
    return d


@pytest.mark.parametrize("name,expected", [
    ("truncated.tar", {"shard_error": 1}),
    ("bad_jpeg.tar", {"bad_image": 2}),
    ("bad_text.tar", {"invalid_text": 1}),
])
def test_inspector_flags_what_the_loader_skips_with_its_reason_names(broken_shards, capsys, name, expected):
    spec = str(broken_shards / name)
    views, summary = _dump(spec, capsys)
    got = {reason: p["count"] for reason, p in summary["problems"].items()}
    assert got == expected
    counts = {}
    with contextlib.redirect_stderr(io.StringIO()):
        read = _loader(spec, counts)
    assert {r: n for r, n in counts.items() if n and r != "_read"} == expected
    assert set(read) == {f"{spec}#{v['key']}" for v in views if "skip" not in v}  # the good samples agree too
    skipped = [v["skip"] for v in views if "skip" in v]
    assert sorted(skipped) == sorted(r for r, n in expected.items() for _ in range(n))
    assert _inspect_cli().main([spec, "--quiet"]) == 1                      # problems: exit status 1
    capsys.readouterr()
