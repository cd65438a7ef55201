"""Karpathy JSON reader (clear errors naming file and field), caption datasets, and tools/make_vse_demo.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pretrain.data.karpathy import caption_texts, read_karpathy, training_splits
from pretrain.vse.data import CaptionPairs, caption_collate
from pretrain.vocab import WordVocab

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_set(root, images):
    """images: list of (filepath, filename, split, [captions]) -> dataset.json with those image files."""
    entries = []
    for n, (fp, fn, split, caps) in enumerate(images):
        os.makedirs(os.path.join(root, fp), exist_ok=True)
        Image.new("RGB", (8, 8), (n * 20 % 255, 0, 0)).save(os.path.join(root, fp, fn))
        entries.append({"filepath": fp, "filename": fn, "split": split, "imgid": n,
                        "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps]})
    path = os.path.join(root, "dataset.json")
    with open(path, "w") as f:
        json.dump({"images": entries}, f)
    return path


def test_reader_splits_restval_and_caption_cap(tmp_path):
    path = write_set(str(tmp_path), [("a", "0.jpg", "train", ["x"] * 6), ("a", "1.jpg", "restval", ["y", "z"]),
                                     ("b", "2.jpg", "val", ["v1", "v2"]), ("b", "3.jpg", "test", ["t"])])
    train = read_karpathy(path, str(tmp_path), training_splits("train", True), captions_per_image=5)
    assert [im.relpath for im in train] == [os.path.join("a", "0.jpg"), os.path.join("a", "1.jpg")]
    assert len(train[0].captions) == 5 and train[1].tokens == [["y"], ["z"]]
    assert [im.split for im in read_karpathy(path, str(tmp_path), training_splits("train", False))] == ["train"]
    val = read_karpathy(path, str(tmp_path), ["val"], captions_per_image=0)
    assert val[0].path == os.path.join(str(tmp_path), "b", "2.jpg") and val[0].image_id == 2
    texts, owner = caption_texts(train + val)
    assert owner.tolist() == [0] * 5 + [1, 1, 2, 2] and texts[5:] == ["y", "z", "v1", "v2"]


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["images"][1].pop("filename"), "images[1] (split 'train') has no field 'filename'"),
    (lambda d: d["images"][0].update(split=3), "field 'split' of images[0] must be str"),
    (lambda d: d["images"][1].update(sentences=[]), "field 'sentences' of images[1]"),
    (lambda d: d["images"][1]["sentences"][0].pop("raw") and d["images"][1]["sentences"][0].pop("tokens"),
     "images[1].sentences[0] has neither a field 'raw'"),
    (lambda d: d.pop("images"), "list field 'images'"),
])
def test_bad_fields_name_file_and_field(tmp_path, mutate, message):
    path = write_set(str(tmp_path), [("", "0.jpg", "train", ["a"]), ("", "1.jpg", "train", ["b"])])
    data = json.load(open(path))
    mutate(data)
    json.dump(data, open(path, "w"))
    with pytest.raises(ValueError) as e:
        read_karpathy(path, str(tmp_path), ["train"])
    assert path in str(e.value) and message in str(e.value)


def test_missing_images_and_splits_are_reported(tmp_path):
    path = write_set(str(tmp_path), [("imgs", f"{i}.jpg", "test", ["c"]) for i in range(5)])
    os.remove(os.path.join(str(tmp_path), "imgs", "1.jpg"))
    os.remove(os.path.join(str(tmp_path), "imgs", "3.jpg"))
    with pytest.raises(FileNotFoundError) as e:
        read_karpathy(path, str(tmp_path), ["test"])
    assert "2 of 5 image files" in str(e.value) and os.path.join("imgs", "1.jpg") in str(e.value) and path in str(e.value)
    with pytest.raises(ValueError, match="splits present: \\['test'\\]"):
        read_karpathy(path, str(tmp_path), ["val"])
    with pytest.raises(ValueError, match="not valid JSON"):
        open(path, "w").write("{")
        read_karpathy(path, str(tmp_path), ["test"])


def test_caption_pairs_batches_with_both_tokenizers(tmp_path):
    path = write_set(str(tmp_path), [("", "0.jpg", "train", ["Red circle", "红色圆形"]), ("", "1.jpg", "train", ["blue"])])
    images = read_karpathy(path, str(tmp_path), ["train"])
    to_tensor = lambda im: torch.zeros(3, 4, 4)  # noqa: E731
    vocab = WordVocab.build(["red circle", "红色圆形", "blue"], 1)
    ds = CaptionPairs(images, to_tensor, use_tokens=True, cache_images=True)
    assert len(ds) == 3
    batch = caption_collate(vocab, 6)([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 4, 4) and batch["image_index"].tolist() == [0, 0, 1]
    assert batch["attention_mask"].sum(1).tolist() == [2, 1, 1]   # the JSON's tokens: ["red","circle"], ["红色圆形"]
    raw = caption_collate(vocab, 6)([CaptionPairs(images, to_tensor)[1]])
    assert raw["attention_mask"].sum(1).tolist() == [4]              # raw text: one word per CJK character
    assert raw["input_ids"][0, :4].tolist() == [vocab.stoi[c] for c in "红色圆形"]


def _demo_raw(root):
    """A click log where two queries are shared by several images: the evaluation splits must not repeat them."""
    os.makedirs(os.path.join(root, "raw", "images"))
    rows = ["query\timage\tclicks\timpressions\ttimestamp"]
    for i in range(12):
        colour = (i * 20, 100, 200 - i * 10)
        Image.new("RGB", (16, 16), colour).save(os.path.join(root, "raw", "images", f"im{i}.jpg"))
        rows.append(f"shared query\timages/im{i}.jpg\t{i + 1}\t30\t0")
        rows.append(f"{'红色' if i % 2 else 'blue'} thing {i}\timages/im{i}.jpg\t3\t30\t0")
        rows.append(f"Group {i % 3}\timages/im{i}.jpg\t2\t30\t0")
    rows.append("zero click\timages/im0.jpg\t0\t5\t0")
    rows.append("missing\timages/nope.jpg\t3\t5\t0")
    rows.append("bad row")
    open(os.path.join(root, "raw", "clicklog.tsv"), "w").write("\n".join(rows) + "\n")


def test_make_vse_demo_keeps_evaluation_captions_unique(tmp_path):
    _demo_raw(str(tmp_path / "demo"))
    out = str(tmp_path / "vse")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_vse_demo.py"), "--demo", str(tmp_path / "demo"),
                        "--out", out, "--val", "3", "--test", "3", "--captions", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = json.load(open(os.path.join(out, "dataset.json")))
    assert len(data["images"]) == 12
    for split in ("val", "test"):
        imgs = read_karpathy(os.path.join(out, "dataset.json"), out, [split])
        assert 1 <= len(imgs) <= 3
        caps = [c.lower() for im in imgs for c in im.captions]
        assert len(caps) == len(set(caps)), (split, caps)
    train = read_karpathy(os.path.join(out, "dataset.json"), out, ["train"])
    assert all(len(im.captions) <= 2 for im in train)
    # captions are the most clicked queries first; tokens split CJK characters
    first = next(im for im in data["images"] if im["filename"] == "im11.jpg")
    assert first["sentences"][0]["raw"] == "shared query"
    assert ["红", "色", "thing", "11"] in [s["tokens"] for s in first["sentences"]] or len(first["sentences"]) == 2
