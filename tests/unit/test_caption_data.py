"""Vocabularies, Karpathy-split loading, labels and the caption config."""
import json
import os

import pytest
import torch

from pretrain.caption.config import load_caption_config
from pretrain.caption.data import CaptionDataset, collate, load_karpathy, make_labels, shift, split_units
from pretrain.caption.vocab import TokenizerVocab, load_vocab
from pretrain.vocab import WordVocab
from pretrain.config import ConfigError


def karpathy(tmp_path, with_answer=False):
    from PIL import Image

    os.makedirs(tmp_path / "imgs" / "a", exist_ok=True)
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "train"]):
        Image.new("RGB", (20, 16), (i * 40, 0, 0)).save(tmp_path / "imgs" / "a" / f"{i}.png")
        sents = [{"raw": f"A red thing {i}.", "tokens": ["a", "red", "thing", str(i)]},
                 {"raw": "Red box!", "tokens": ["red", "box"]}]
        if with_answer:
            sents[0]["answer"], sents[1]["answer"] = "red", "box"
            sents.append({"raw": "What is it?", "tokens": ["what", "is", "it"], "answer": "red"})
        images.append({"filepath": "a", "filename": f"{i}.png", "split": split, "imgid": i, "sentences": sents})
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"images": images}))
    return str(path), str(tmp_path / "imgs")


def test_word_vocab_min_frequency_and_round_trip(tmp_path):
    v = WordVocab.build([["a", "red", "box"], ["a", "blue", "box"], ["a", "red", "ball"]], min_freq=2)
    assert v.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert v.itos[4:] == ["a", "box", "red"]  # by frequency, then alphabetically
    ids = v.encode({"tokens": ["a", "blue", "box"]})
    assert ids == [4, v.unk, 5]
    assert v.decode(ids + [v.eos, 6]) == "a <unk> box"
    assert v.ids_of(["a", "the"]) == [4]
    v.save(str(tmp_path))
    assert load_vocab(str(tmp_path)).itos == v.itos
    assert v.encode({"raw": "A red, box."}) == [4, 6, 5]  # no tokens field: lower-cased words


def test_tokenizer_vocab_handles_chinese(tmp_path):
    from transformers import BertTokenizer

    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "红", "色", "圆", "形", "的",
                                     "a", "red", "circle"]) + "\n")
    v = TokenizerVocab(BertTokenizer(str(vocab_file)))
    ids = v.encode({"raw": "红色的圆形"})
    assert ids == [5, 6, 9, 7, 8]
    assert v.decode(ids + [v.eos, 5]).replace(" ", "") == "红色的圆形"
    assert v.tokens(ids) == ["红", "色", "的", "圆", "形"]
    assert (v.pad, v.bos, v.eos) == (0, 2, 3)
    assert v.ids_of(["的", "the"]) == [9]
    v.save(str(tmp_path / "m"))
    assert load_vocab(str(tmp_path / "m")).encode({"raw": "红色的圆形"}) == ids


def test_karpathy_splits_and_conditions(tmp_path):
    path, root = karpathy(tmp_path)
    units = split_units(path, root)
    assert [u.key for u in units["train"]] == ["0", "1", "4"]  # train + restval
    assert [u.key for u in split_units(path, root, use_restval=False)["train"]] == ["0", "4"]
    assert units["val"][0].refs_raw == ["A red thing 2.", "Red box!"]
    assert units["test"][0].image_path == os.path.join(root, "a", "3.png")
    path, root = karpathy(tmp_path, with_answer=True)
    cond = load_karpathy(path, root, ("val",), condition_field="answer")
    assert [(u.key, u.condition, len(u.refs_raw)) for u in cond] == [("2|red", "red", 2), ("2|box", "box", 1)]
    with pytest.raises(ValueError):
        load_karpathy(path, root, ("val",), condition_field="missing")


def test_missing_image_files_are_reported_before_training(tmp_path):
    path, root = karpathy(tmp_path)
    os.remove(os.path.join(root, "a", "1.png"))   # restval
    os.remove(os.path.join(root, "a", "3.png"))   # test
    with pytest.raises(FileNotFoundError) as e:
        split_units(path, root)
    msg = str(e.value)
    assert "2 of 5 image files" in msg and f"images_root '{root}'" in msg and path in msg
    assert os.path.join(root, "a", "1.png") in msg and os.path.join(root, "a", "3.png") in msg
    assert [u.key for u in split_units(path, root, check_files=False)["test"]] == ["3"]
    with pytest.raises(FileNotFoundError, match="1 of 1 image files"):
        load_karpathy(path, root, ("test",))
    assert len(load_karpathy(path, root, ("val",))) == 1           # its own split is complete
    # many missing: the count, the first few paths only
    with pytest.raises(FileNotFoundError) as e:
        split_units(path, str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "5 of 5 image files" in msg and msg.count("nowhere") == 4 and msg.endswith(", ...")


@pytest.mark.parametrize("mutate,message", [
    (lambda im: im.pop("filename"), r"images\[3\] \(split 'test'\) has no field 'filename'"),
    (lambda im: im.update(filename=7), r"field 'filename' of images\[3\]"),
    (lambda im: im.update(filepath=["a"]), r"field 'filepath' of images\[3\]"),
])
def test_bad_filename_fields_name_the_entry(tmp_path, mutate, message):
    path, root = karpathy(tmp_path)
    data = json.loads(open(path).read())
    mutate(data["images"][3])
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match=message):
        split_units(path, root)
    assert len(load_karpathy(path, root, ("val",))) == 1            # other splits do not read that entry


def test_labels_and_dataset(tmp_path):
    assert make_labels([5, 6, 7], 4, bos=1, eos=2, pad=0) == [1, 5, 6, 7, 2, 0]
    assert make_labels([5, 6, 7, 8, 9], 3, bos=1, eos=2, pad=0) == [1, 5, 6, 7, 2]
    path, root = karpathy(tmp_path)
    units = split_units(path, root)["train"]
    v = WordVocab.build([s["tokens"] for u in units for s in u.sentences], 1)
    import torchvision.transforms as T

    ds = CaptionDataset(units, T.ToTensor(), v, max_length=5, seq_per_img=3, train=True, cache_images=True)
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 16, 20) and batch["labels"].shape == (2, 3, 7)
    assert set(batch["labels"][:, :, 0].flatten().tolist()) == {v.bos}
    first = ds[2]["labels"]
    assert torch.equal(first, ds[2]["labels"])  # the same draw for the same (epoch, index)
    ds.with_labels = False
    assert "labels" not in ds[0]


def test_shift_moves_content_and_keeps_size():
    import random

    img = torch.zeros(1, 8, 8)
    img[0, 4, 4] = 1.0
    out = shift(img, 2, random.Random(0))
    assert out.shape == img.shape and float(out.sum()) == 1.0
    assert torch.equal(shift(img, 0, random.Random(0)), img)


def test_config_errors_name_the_key(tmp_path):
    cfg = load_caption_config(None, ["data.karpathy_json=x.json", "decoder.kind=aoa", "decoder.num_heads=4"])
    assert cfg.decoder.kind == "aoa" and cfg.encoder.model.image.name == "resnet18"
    with pytest.raises(ConfigError, match="decoder.kind"):
        load_caption_config(None, ["data.karpathy_json=x.json", "decoder.kind=transformer"])
    with pytest.raises(ConfigError, match="scst.baselin"):
        load_caption_config(None, ["data.karpathy_json=x.json", "scst.baselin=mean"])
    with pytest.raises(ConfigError, match="num_samples"):
        load_caption_config(None, ["data.karpathy_json=x.json", "scst.baseline=mean", "scst.num_samples=1"])
    with pytest.raises(ConfigError, match="karpathy_json"):
        load_caption_config(None, [])
    for name in ("caption_sat", "caption_aoa", "caption_demo"):
        load_caption_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "finetune", f"{name}.yaml"))


def _make_caption_demo():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "tools", "make_caption_demo.py")
    spec = importlib.util.spec_from_file_location("_script_tools_make_caption_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("conditioned,per_image", [(False, 5), (True, 9)])
def test_make_caption_demo_prints_the_true_caption_count(tmp_path, capsys, conditioned, per_image):
    tool = _make_caption_demo()
    argv = ["--out", str(tmp_path), "--train", "2", "--val", "1", "--test", "1"] + (["--conditioned"] * conditioned)
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "dataset.json").read_text())
    assert {len(im["sentences"]) for im in data["images"]} == {per_image}
    assert f"{per_image} captions each" in out
    if conditioned:
        assert "9 captions each: focus both 5, left 2, right 2)" in out
