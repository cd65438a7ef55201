"""tools/inspect_shards.py (on pretrain.data.inspection): counts, planted corruption, dump, contact sheet."""
import importlib.util
import io
import json
import math
import os
import tarfile

import pytest
from PIL import Image

from pretrain import fonts as _fonts
from pretrain.data.inspection import expand_shards

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_cli():
    """tools/inspect_shards.py by its path (tools/ is not a package; nothing is added to sys.path)."""
    spec = importlib.util.spec_from_file_location("_tool_inspect_shards",
                                                  os.path.join(ROOT, "tools", "inspect_shards.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


inspect_shards = _load_cli()


def _jpg(color):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))


def _sample(key, text, color=(200, 20, 20), meta=None):
    return [(f"{key}.jpg", _jpg(color)), (f"{key}.txt", text.encode("utf-8")),
            (f"{key}.json", json.dumps(meta or {"key": key}).encode())]


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    good = []
    for i, text in enumerate(["red circle", "红色圆形", "a blue square", "一个蓝色的正方形", "green star"]):
        good += _sample(f"{i:09d}", text, (40 * i, 100, 200 - 30 * i))
    _tar(d / "shard-000000.tar", good)
    bad = []
    bad += _sample("000000010", "fine")
    bad += [("000000011.jpg", b"\xff\xd8\xff not an image"), ("000000011.txt", b"x"), ("000000011.json", b"{}")]
    bad += [("000000012.jpg", _jpg((1, 2, 3))), ("000000012.txt", b"caf\xe9"), ("000000012.json", b"{}")]
    bad += [("000000013.jpg", _jpg((1, 2, 3))), ("000000013.txt", b"ok"), ("000000013.json", b"{not json")]
    bad += [("000000014.jpg", _jpg((1, 2, 3))), ("000000014.json", b"{}")]                 # no txt
    bad += _sample("000000002", "duplicate of a key in shard 0")
    _tar(d / "shard-000001.tar", bad)
    (d / "sizes.json").write_text(json.dumps({"shard-000000.tar": 5, "shard-000001.tar": 7}))
    return d


def test_counts_and_planted_problems(shards, tmp_path, capsys):
    result = tmp_path / "r.json"
    assert inspect_shards.main([str(shards), "--report", str(result)]) == 1
    out = capsys.readouterr().out
    assert "shard-000000.tar" in out and "sizes.json: 5 ok" in out and "MISMATCH" in out
    r = json.loads(result.read_text())
    assert [s["samples"] for s in r["shards"]] == [5, 6]
    assert r["samples"] == 11
    got = {k: v["count"] for k, v in r["problems"].items()}
    assert got == {"bad_image": 1, "invalid_text": 1, "bad_json": 1, "missing_text": 1,
                   "duplicate_key": 1, "size_mismatch": 1}
    assert r["problems"]["bad_json"]["examples"] == ["shard-000001.tar:000000013"]
    assert inspect_shards.main([str(shards), "--warn-only", "--quiet"]) == 0
    # brace pattern / glob / single file give the same shards
    assert expand_shards([str(shards / "shard-{000000..000001}.tar")]) == expand_shards([str(shards / "*.tar")]) \
        == expand_shards([str(shards)])
    assert inspect_shards.main([str(shards / "shard-000000.tar")]) == 0


def test_truncated_tar_is_reported(shards, capsys):
    data = (shards / "shard-000000.tar").read_bytes()
    (shards / "shard-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    assert inspect_shards.main([str(shards / "shard-000000.tar")]) == 1
    out = capsys.readouterr().out
    assert "shard_error: 1" in out


def test_contact_sheet_size_and_font(shards, tmp_path):
    png = tmp_path / "sheet.png"
    assert inspect_shards.main([str(shards / "shard-000000.tar"), "--contact-sheet", str(png), "--num", "5",
                                "--columns", "4", "--thumb", "64"]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG"
        font_px = max(10, 64 // 8)
        assert im.size == (4 * (64 + 8), math.ceil(5 / 4) * (64 + 8 + 2 * (font_px + 4)))
        # something is drawn in the text band under the first image
        band = im.crop((4, 64 + 6, 68, 64 + 8 + 2 * (font_px + 4))).convert("L")
        assert band.getextrema()[0] < 128
    if _fonts.find_cjk_font() is None:
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk)")
    font, cjk = _fonts.load_font(16)
    assert cjk and _fonts.covers_cjk(font)


def test_font_without_cjk_is_detected():
    from PIL import ImageFont

    try:
        latin = ImageFont.load_default(size=16)
    except TypeError:
        pytest.skip("Pillow too old for a sized default font")
    assert not _fonts.covers_cjk(latin)


def test_dump_prints_what_the_trainer_sees(shards, capsys):
    assert inspect_shards.main([str(shards / "shard-000001.tar"), "--dump", "3", "--warn-only", "--quiet"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "#0000000" in ln]
    assert len(lines) == 3
    assert "#000000010  query_id=" in lines[0] and "40x30" in lines[0] and "'fine'" in lines[0]
    assert lines[1].endswith("#000000011  SKIP bad_image")
    assert lines[2].endswith("#000000012  SKIP invalid_text")
    # --json: JSON Lines, the dumped samples then the summary; ids as the loader computes them
    assert inspect_shards.main([str(shards / "shard-000000.tar"), "--dump", "2", "--json"]) == 0
    objs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [o.get("key") for o in objs[:2]] == ["000000000", "000000001"] and "summary" in objs[2]
    from pretrain.data.ids import query_hash

    assert objs[1]["query"] == "红色圆形" and objs[1]["query_id"] == query_hash("红色圆形")
    assert objs[2]["summary"]["samples"] == 5 and objs[2]["summary"]["problems"] == {}
