"""The one word vocabulary (VSE GRU and word-level captioning)."""
import json

import pytest

from pretrain.vocab import WordVocab, sentence_tokens, words_of


def test_words_and_vocabulary(tmp_path):
    assert words_of("A red-circle, 红色圆形! don't") == ["a", "red", "circle", "红", "色", "圆", "形", "don't"]
    assert sentence_tokens({"tokens": ["A", "Dog"], "raw": "ignored"}) == ["a", "dog"]
    assert sentence_tokens({"raw": "Two dogs."}) == ["two", "dogs"]
    vocab = WordVocab.build(["red circle", "red square", "blue circle", "red", ["Green", "circle"]], min_freq=2)
    assert vocab.itos == ["<pad>", "<bos>", "<eos>", "<unk>", "circle", "red"]  # by frequency; green/blue/square < 2
    assert (vocab.pad, vocab.bos, vocab.eos, vocab.unk) == (0, 1, 2, 3)
    assert vocab.encode("red blue circle") == [5, 3, 4]
    assert vocab.encode({"tokens": ["Red", "circle"]}) == [5, 4]
    out = vocab(["red circle", "blue"], padding="max_length", max_length=4, return_tensors="pt")
    assert out["input_ids"].tolist() == [[5, 4, 0, 0], [3, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert vocab(["red red red"], padding=True, max_length=2)["input_ids"].tolist() == [[5, 5]]
    assert vocab.decode([1, 5, 4, 2, 5]) == "red circle" and vocab.tokens([5, 0, 4]) == ["red", "circle"]
    assert vocab.ids_of(["circle", "nope"]) == [4]
    vocab.save(str(tmp_path / "v.json"))
    assert WordVocab.load(str(tmp_path / "v.json")).itos == vocab.itos
    vocab.save(str(tmp_path))                                   # a directory: DIR/vocab.json
    assert WordVocab.load(str(tmp_path)).itos == vocab.itos


def test_earlier_formats_keep_their_ids(tmp_path):
    (tmp_path / "vse.json").write_text(json.dumps({"itos": ["<pad>", "<unk>", "dog"]}))   # older VSE exports
    v = WordVocab.load(str(tmp_path / "vse.json"))
    assert (v.pad, v.unk, v.bos, v.eos) == (0, 1, None, None) and v.encode("dog cat") == [2, 1]
    (tmp_path / "cap.json").write_text(json.dumps({"kind": "word", "words": ["dog"]}))     # older caption models
    assert WordVocab.load(str(tmp_path / "cap.json")).itos == ["<pad>", "<bos>", "<eos>", "<unk>", "dog"]
    (tmp_path / "bad.json").write_text('{"words": 3}')
    with pytest.raises(ValueError, match="not a word vocabulary"):
        WordVocab.load(str(tmp_path / "bad.json"))
