"""The real entry point: `python launch/pretrain.py` without the launcher, on shards; every listed metric
in metrics.jsonl and TensorBoard; a bad override exits non-zero naming the key."""
import json
import os
import subprocess
import sys

from _tiny import ROOT, tiny_overrides, write_shards

REQUIRED = ["loss", "loss_i2t", "loss_t2i", "lr", "temperature", "momentum", "samples_per_s", "data_wait_frac",
            "pos_logit", "neg_logit", "queue_fill", "grad_norm", "skipped_steps"]
EVAL = ["eval/t2i_hit@1", "eval/t2i_hit@5", "eval/t2i_hit@10", "eval/i2t_hit@1", "eval/i2t_hit@5", "eval/i2t_hit@10"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_python_launch_without_launcher_writes_all_metrics(tmp_path):
    train = write_shards(str(tmp_path / "train"), [30, 30, 0, 5])
    val = write_shards(str(tmp_path / "val"), [20], seed=1)
    run_dir = str(tmp_path / "run")
    ov = tiny_overrides(run_dir, 2, **{"train.steps": 4, "train.log_every": 2, "train.eval_every": 2,
                                      "data.train_shards": str(tmp_path / "train"),
                                      "data.val_shards": val[0], "data.num_workers": 1})
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"),
                        "--config", os.path.join(ROOT, "configs", "pretrain", "demo.yaml")] + ov,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    train_recs = [x for x in recs if "loss" in x]
    assert [x["step"] for x in train_recs] == [2, 4]
    for k in REQUIRED:
        assert all(k in x for x in train_recs), k
    eval_recs = [x for x in recs if "eval/t2i_hit@1" in x]
    assert [x["step"] for x in eval_recs] == [2, 4]
    for k in EVAL:
        assert 0.0 <= eval_recs[-1][k] <= 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for k in REQUIRED + EVAL:
        assert k in tags, k
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "latest"))


def test_bad_override_exits_nonzero_naming_the_key(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config",
                        os.path.join(ROOT, "configs", "pretrain", "demo.yaml"), "wenlan.queue_sise=10"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "wenlan.queue_sise" in r.stderr and "queue_size" in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config",
                        os.path.join(ROOT, "configs", "pretrain", "demo.yaml"), "train.zero_stage=5"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "train.zero_stage" in r.stderr
