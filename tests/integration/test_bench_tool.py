"""tools/bench.py runs end to end on a tiny config (a smoke test of the tool, not a timing): its JSON
holds consistent figures (ratio = quotient of the two samples/s, time split within the step, FLOPs
counted, the FLOP bound below 1 because the momentum mode does more work)."""
import json
import os
import subprocess
import sys

from _tiny import ROOT, tiny_overrides, write_shards


def _bench(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py")] + args + ["--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_train_mode_compares_with_in_batch(tmp_path):
    write_shards(str(tmp_path / "shards"), [40, 40])
    ov = [o for o in tiny_overrides(str(tmp_path / "run"), 0, **{"data.num_workers": 1})
          if not o.startswith(("train.output_dir", "data.train_shards"))]
    res, stdout = _bench(["train", "--config", os.path.join(ROOT, "configs", "pretrain", "demo.yaml"),
                          "--shards", str(tmp_path / "shards"), "--compare-in-batch", "--steps", "4", "--block", "2",
                          "--warmup", "1"] + ov, tmp_path, "train")
    m, b = res["momentum"], res["in_batch"]
    assert abs(res["ratio_momentum_over_in_batch"] - m["samples_per_s"] / b["samples_per_s"]) < 1e-9
    assert len(res["block_pair_ratios"]) == 2
    assert 0 < res["flop_ratio_in_batch_over_momentum"] < 1  # key towers: more FLOPs per WenLan step
    assert m["flops_per_step"] > b["flops_per_step"] > 0
    for mode in (m, b):
        split = mode["time_split"]
        assert all(v >= 0 for v in split.values()) and sum(split.values()) <= 1.0 + 1e-6
    for phase in ("key_forward", "momentum", "gather_enqueue"):
        assert b["time_split"][phase] == 0 and m["time_split"][phase] > 0, phase
    assert len(res["rss_trace"]) == 2 and res["matmul_peak_flops"] > 0
    assert "WenLan / in-batch samples/s" in stdout


def test_data_and_build_modes(tmp_path):
    write_shards(str(tmp_path / "shards"), [50, 50])
    res, _ = _bench(["data", "--config", os.path.join(ROOT, "configs", "pretrain", "demo.yaml"),
                     "--shards", str(tmp_path / "shards"), "--workers", "1", "--steps", "3", "--warmup", "1",
                     "model.text.tokenizer=minilm", "train.micro_batch_size=8"], tmp_path, "data")
    assert res["samples_per_s"] > 0 and res["workers"] == 1
    res, _ = _bench(["build", "--photos", "12", "--workers", "1"], tmp_path, "build")
    assert res["unique_images"] == 12 and res["samples_written"] == 12 and res["images_per_s"] > 0
