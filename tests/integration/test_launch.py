"""The real entry point: `python launch/pretrain.py` without the launcher, on shards; every listed metric
in metrics.jsonl and TensorBoard; a bad override exits non-zero naming the key."""
import json
import os
import subprocess
import sys

from _tiny import ROOT, tiny_overrides, write_shards

REQUIRED = ["loss", "loss_i2t", "loss_t2i", "lr", "temperature", "momentum", "samples_per_s", "data_wait_frac",
            "pos_cos", "hardest_neg_cos", "effective_negatives", "queue_masked_frac", "queue_mass", "key_lag_cos_image",
            "key_lag_cos_text", "queue_fill", "queue_age_mean", "queue_age_max", "grad_norm", "skipped_steps"]
EVAL = ["eval/t2i_hit@1", "eval/t2i_hit@5", "eval/t2i_hit@10", "eval/i2t_hit@1", "eval/i2t_hit@5", "eval/i2t_hit@10"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launch_ok(ov, run_dir):
    """`python launch/pretrain.py --config demo.yaml <ov>` must succeed; returns the metrics.jsonl records."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"),
                        "--config", os.path.join(ROOT, "configs", "pretrain", "demo.yaml")] + ov,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_python_launch_without_launcher_writes_all_metrics(tmp_path):
    write_shards(str(tmp_path / "train"), [30, 30, 0, 5])
    val = write_shards(str(tmp_path / "val"), [20], seed=1)
    run_dir = str(tmp_path / "run")
    ov = tiny_overrides(run_dir, 2, **{"train.steps": 4, "train.log_every": 2, "train.eval_every": 2,
                                      "data.train_shards": str(tmp_path / "train"),
                                      "data.val_shards": val[0], "data.num_workers": 1})
    recs = _launch_ok(ov, run_dir)
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


def _img2dataset_folder(folder, shards=2, per_shard=12):
    """What img2dataset writes (webdataset output): 00000.tar with KEY.jpg, KEY.txt (caption), KEY.json
    (its own fields: url, key, status, caption, width, ...) plus a parquet and a _stats.json per shard."""
    import io
    import tarfile

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    colors = [("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220))]
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                name, rgb = colors[i % len(colors)]
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), rgb).save(buf, format="JPEG")
                meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success",
                        "error_message": None, "caption": f"a {name} photo", "width": 40, "height": 30,
                        "original_width": 400, "original_height": 300, "exif": "{}", "sha256": "0" * 64}
                for fname, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", f"a {name} photo".encode()),
                                    (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(fname)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        with open(os.path.join(folder, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": per_shard, "successes": per_shard}, f)
        with open(os.path.join(folder, f"{s:05d}.parquet"), "wb") as f:
            f.write(b"PAR1 not read by the loader")


def test_img2dataset_folder_trains_without_conversion(tmp_path):
    folder = str(tmp_path / "img2dataset_out")
    _img2dataset_folder(folder)
    run_dir = str(tmp_path / "run")
    ov = tiny_overrides(run_dir, 0, **{"train.steps": 2, "train.log_every": 1, "train.eval_every": 2,
                                      "data.train_shards": folder,
                                      "data.val_shards": os.path.join(folder, "00001.tar"),
                                      "data.num_workers": 1})
    recs = _launch_ok(ov, run_dir)
    train_recs = [x for x in recs if "loss" in x]
    assert [x["step"] for x in train_recs] == [1, 2]
    assert all(x["skipped_steps"] == 0 for x in train_recs)
    eval_recs = [x for x in recs if "eval/t2i_hit@1" in x]
    # ids are hashed from the caption and the image bytes: 3 distinct captions, 3 distinct pictures
    assert eval_recs and eval_recs[-1]["eval/t2i_num_queries"] == 3, eval_recs


def _wait_for(predicate, proc, seconds=300):
    import time
    end = time.time() + seconds
    while time.time() < end:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_ctrl_c_prints_how_to_resume_not_a_traceback(tmp_path):
    """SIGINT (Ctrl-C) in the middle of training: exit 130 with the step, the newest checkpoint and the resume
    command, no traceback; the checkpoint it names is complete and one a --resume auto run continues from."""
    import signal
    write_shards(str(tmp_path / "train"), [30, 30])
    run_dir = str(tmp_path / "run")
    ov = tiny_overrides(run_dir, 0, **{"train.steps": 100000, "train.save_every": 3, "data.val_shards": "",
                                      "data.train_shards": str(tmp_path / "train")})
    cmd = [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config",
           os.path.join(ROOT, "configs", "pretrain", "demo.yaml")] + ov
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    latest = os.path.join(run_dir, "checkpoints", "latest")
    _wait_for(lambda: os.path.isfile(latest) and open(latest).read().strip() >= "step_00000006", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    line = next(l for l in err.splitlines() if l.startswith("interrupted after step "))
    step = int(line.split("interrupted after step ")[1].split()[0])
    named = line.split("newest checkpoint ")[1].split(".")[0]
    assert "--resume auto" in line and "SIGTERM" in line
    # the newest complete checkpoint (a save that Ctrl-C cut short is not complete and not named)
    newest = open(latest).read().strip()
    assert os.path.basename(named) == newest and int(newest[5:]) <= step
    ok = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export.py"), "--run", run_dir, "--out",
                         str(tmp_path / "export")], env=_env(), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]   # what it names loads
