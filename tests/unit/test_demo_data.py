"""tools/make_demo_data.py: a small synthetic click log and its train/val shards."""
import json
import os
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_demo_data  # noqa: E402


def _texts(split_dir):
    sizes = json.loads(open(os.path.join(split_dir, "sizes.json")).read())
    texts, n = set(), 0
    for name, count in sizes.items():
        with tarfile.open(os.path.join(split_dir, name)) as tar:
            members = tar.getmembers()
            assert len(members) == 3 * count
            for m in members:
                if m.name.endswith(".txt"):
                    texts.add(tar.extractfile(m).read().decode("utf-8"))
                    n += 1
    return texts, n


def test_demo_generator_builds_disjoint_train_and_val(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = make_demo_data.main(["--out", str(out), "--images-per-concept", "4", "--workers", "1", "--no-progress",
                              "--image-size", "48"])
    assert rc == 0
    assert (out / "raw" / "clicklog.tsv").exists()
    assert len(list((out / "raw" / "images").glob("*_*_*.jpg"))) == 8 * 6 * 4
    train, n_train = _texts(out / "shards" / "train")
    val, n_val = _texts(out / "shards" / "val")
    assert n_train > 0 and n_val > 0 and not train & val
    everything = train | val
    assert "red circle" in everything or "a red circle" in everything
    assert any("\u4e00" <= ch <= "\u9fff" for t in everything for ch in t)       # Chinese queries
    report = json.loads((out / "shards" / "report.json").read_text())
    acc = report["accounting"]
    assert acc["ok"] and acc["written_samples"] == n_train + n_val
    bad = report["bad_rows"]["by_reason"]
    for reason in ("missing_field", "bad_number", "unreadable_image", "undecodable_image", "wrong_column_count",
                   "bad_encoding"):
        assert bad[reason]["rows"] > 0, reason
    assert bad["bad_encoding"]["rows"] + bad["wrong_column_count"]["rows"] <= 2
    filtered = report["filtered"]["by_reason"]
    for reason in ("min_clicks", "image_too_small", "aspect_ratio", "query_too_long"):
        assert filtered[reason]["rows"] > 0, reason
    assert acc["duplicate_rows"] > 0 and report["images"]["duplicate_images"] == 10
    assert acc["bad_rows"] + acc["filtered_rows"] < 0.2 * acc["input_rows"]
    printed = capsys.readouterr().out
    assert "train:" in printed and "val:" in printed


def test_generation_is_deterministic(tmp_path):
    a, _ = make_demo_data.generate(str(tmp_path / "a"), seed=3, image_size=32, images_per_concept=2)
    b, _ = make_demo_data.generate(str(tmp_path / "b"), seed=3, image_size=32, images_per_concept=2)
    assert open(a, "rb").read() == open(b, "rb").read()
    img = "images/red_circle_00.jpg"
    assert (tmp_path / "a" / "raw" / img).read_bytes() == (tmp_path / "b" / "raw" / img).read_bytes()
