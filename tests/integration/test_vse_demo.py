"""The real VSE entry points on a tiny Karpathy set built from the demo click log, with a tiny random export:
launch/finetune_vse.py (frozen backbones, transformer and GRU text encoders), tools/evaluate_retrieval.py
(VSE and search protocols), and clear errors for bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=_env(), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, random_export):
    import shutil

    root = tmp_path_factory.mktemp("vse")
    r = _run("tools/make_demo_data.py", "--out", str(root / "demo"), "--images-per-concept", "3", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run("tools/make_vse_demo.py", "--demo", str(root / "demo"), "--out", str(root / "vse"), "--val", "16",
             "--test", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.copytree(random_export, root / "export")
    return root


def _finetune(demo, out, *extra):
    return _run("launch/finetune_vse.py", "--config", os.path.join(ROOT, "configs", "finetune", "vse_demo.yaml"),
                f"model.export={demo / 'export'}", f"data.karpathy_json={demo / 'vse' / 'dataset.json'}",
                f"data.images_root={demo / 'vse'}", f"train.output_dir={out}", "train.batch_size=16",
                "optim.lr=2e-3", "train.log_every=5", *extra)


def test_frozen_heads_only_epoch_beats_zero_shot(demo, tmp_path):
    from safetensors.torch import load_file

    from pretrain.export import load_export

    out = tmp_path / "run"
    r = _finetune(demo, out, "train.epochs=1", "optim.freeze_epochs=1", "model.embed_dim=24")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "zero-shot val: rsum" in r.stdout and "best fine-tuned val rsum" in r.stdout
    res = json.load(open(out / "results.json"))
    assert res["best_val_rsum"] > res["zero_shot"]["val"]["rsum"]
    assert "test" in res and "rsum" in res["test"]
    # the best model is a plain export: load_export reads it, with the new 24-d heads
    towers, _, _ = load_export(str(out / "best"))
    assert towers.image.proj[-1].out_features == 24
    # frozen backbones did not move; the heads did
    before = load_file(str(demo / "export" / "image_tower.safetensors"))
    after = load_file(str(out / "best" / "image_tower.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    text_before = load_file(str(demo / "export" / "text_tower.safetensors"))
    text_after = load_file(str(out / "best" / "text_tower.safetensors"))
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before if k.startswith("encoder."))
    assert after["proj.0.weight"].shape != before["proj.0.weight"].shape or \
        not torch.equal(after["proj.0.weight"], before["proj.0.weight"])
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("loss" in x for x in recs) and any("val/rsum" in x for x in recs)


def test_gru_trains_evaluates_and_is_read_by_evaluate_retrieval(demo, tmp_path):
    out = tmp_path / "gru"
    r = _finetune(demo, out, "train.epochs=2", "model.text_encoder=gru", "model.bidirectional=true",
                  "model.min_word_freq=1", "loss.kind=hinge", "loss.warmup_epochs=1", "train.eval_zero_shot=false")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert len(res["history"]) == 2 and res["history"][1]["loss"] < res["history"][0]["loss"]
    assert os.path.isfile(out / "best" / "text_gru.safetensors") and os.path.isfile(out / "best" / "vocab.json")
    ev = tmp_path / "eval"
    r = _run("tools/evaluate_retrieval.py", "--export", str(out / "best"), "--karpathy-json",
             str(demo / "vse" / "dataset.json"), "--images-root", str(demo / "vse"), "--split", "test",
             "--out", str(ev), "--grid-queries", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.load(open(ev / "metrics.json"))
    assert m["protocol"] == "vse" and m["text_encoder"] == "gru"
    assert m["metrics"]["rsum"] == pytest.approx(res["test"]["rsum"], abs=1e-6)   # same model, same protocol
    assert len(m["grid"]["queries"]) == 3 and os.path.getsize(ev / "grid.png") > 1000


def test_evaluate_retrieval_search_protocol_on_shards(demo, tmp_path):
    r = _run("tools/evaluate_retrieval.py", "--export", str(demo / "export"), "--shards",
             str(demo / "demo" / "shards" / "val"), "--out", str(tmp_path), "--grid-queries", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.load(open(tmp_path / "metrics.json"))
    assert m["protocol"] == "search" and m["num_queries"] > 0
    for k in ("t2i_hit@1", "t2i_ndcg@10", "i2t_map", "rsum"):
        assert k in m["metrics"]
    assert len(m["grid"]["queries"]) == 4 and all(len(q["top5_relevant"]) == 5 for q in m["grid"]["queries"])


def test_bad_input_is_named(demo, tmp_path):
    r = _finetune(demo, tmp_path / "x", "train.epochz=1")
    assert r.returncode == 2 and "train.epochz" in r.stderr and "train.epochs" in r.stderr
    data = json.load(open(demo / "vse" / "dataset.json"))
    data["images"][0].update(filename="does_not_exist.jpg", split="train")
    del data["images"][1]["split"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    r = _run("tools/evaluate_retrieval.py", "--export", str(demo / "export"), "--karpathy-json", str(bad),
             "--images-root", str(demo / "vse"), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and str(bad) in r.stderr and "images[1] has no field 'split'" in r.stderr
    data["images"][1]["split"] = "train"
    bad.write_text(json.dumps(data))
    r = _finetune(demo, tmp_path / "y", f"data.karpathy_json={bad}")
    assert r.returncode == 2 and "does_not_exist.jpg" in r.stderr and "images_root" in r.stderr
