"""Bad inputs stop `launch/pretrain.py` before any work: one line on stderr naming the key or path, exit code 2,
within 5 s, never a traceback. Also: overrides before and after --resume; a loader worker's error in one line;
a rendezvous that cannot complete ends within the watchdog's time naming address, port and --master_port."""
import os
import socket
import subprocess
import sys
import time

import pytest

from _tiny import ROOT, free_port, write_shards

DEMO = os.path.join(ROOT, "configs", "pretrain", "demo.yaml")


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _launch(args, timeout=60, **env):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py")] + args, env=_env(**env),
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return r, time.monotonic() - t0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shards(str(d / "train"), [6])
    write_shards(str(d / "val"), [4], seed=1)
    return d


def _bad_inputs(tmp, shards):
    binary = tmp / "config.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    ok = ["--config", DEMO, f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'val'}",
          "model.text.tokenizer=minilm"]
    return [
        (["--config", str(tmp)], str(tmp)),                                   # a directory
        (["--config", str(binary)], str(binary)),                             # a binary file
        (["--config", str(tmp / "nope.yaml")], "nope.yaml"),
        (ok + ["model.image.timm_kwargs=[1,2"], "model.image.timm_kwargs"),  # malformed YAML value
        (ok + ["optim.betas=[0.9,"], "optim.betas"),
        (ok + ["optim.lr=-1"], "optim.lr"),
        (ok + ["optim.head_lr=0"], "optim.head_lr"),
        (ok + ["optim.grad_clip=-1"], "optim.grad_clip"),
        (ok + ["optim.warmup_steps=-5"], "optim.warmup_steps"),
        (ok + ["optim.lr=nan"], "optim.lr"),
        (ok + ["train.steps=ten"], "train.steps"),
        (ok + [f"data.train_shards={tmp / 'missing_train'}"], "missing_train"),
        (ok + [f"data.val_shards={tmp / 'missing_val'}"], "missing_val"),
        (ok + [f"model.text.tokenizer={tmp / 'no_tokenizer'}"], "no_tokenizer"),
        (ok + [f"model.image.weights={tmp / 'no_weights.safetensors'}"], "no_weights"),
        (ok + ["train.stepz=3"], "train.stepz"),
    ]


def test_bad_inputs_one_line_exit_2_within_5_s(tmp_path, shards):
    for args, named in _bad_inputs(tmp_path, shards):
        r, seconds = _launch(args)
        err = r.stderr.strip()
        assert r.returncode == 2, (args, r.returncode, err[-2000:])
        assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, (args, err[-2000:])
        assert err.startswith("error") and named in err, (args, err)
        assert seconds < 5.0, (args, seconds)


def test_overrides_before_and_after_resume(shards):
    # both overrides must be parsed: the bad one after --resume is reported, the one before it too
    r, _ = _launch(["--config", DEMO, f"data.train_shards={shards / 'train'}", "--resume", "never", "optim.lr=-2"])
    assert r.returncode == 2 and "optim.lr" in r.stderr, r.stderr
    r, _ = _launch(["--config", DEMO, "optim.grad_clip=-3", "--resume", "auto", "train.steps=5"])
    assert r.returncode == 2 and "optim.grad_clip" in r.stderr, r.stderr


def test_loader_worker_error_is_one_line(tmp_path):
    """Shards without a single good sample: the DataError raised inside the worker process reaches the
    training process as one line (torch would carry the worker's whole traceback in the message)."""
    import tarfile

    from pretrain.data import DataError, ShardStream

    os.makedirs(tmp_path / "bad")
    with tarfile.open(tmp_path / "bad" / "shard-000000.tar", "w"):
        pass  # an empty shard
    stream = ShardStream(str(tmp_path / "bad"), batch_size=2, image_transform=lambda im: im, tokenizer=None,
                         max_length=4, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(stream))
    msg = str(info.value)
    info = None  # the traceback holds the loader: release it, its worker then shuts down at once
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert "worker" in msg and "without getting a single good sample" in msg, msg


def _rank_env(rank, port):
    return dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def test_rendezvous_that_cannot_complete_fails_fast_naming_address_and_port(tmp_path, shards):
    args = ["--config", DEMO, f"data.train_shards={shards / 'train'}", "data.val_shards=", "model.text.tokenizer=minilm",
            f"train.output_dir={tmp_path / 'run'}", "train.device=cpu"]
    # rank 1 alone: nobody hosts the store at that port; the watchdog (10 s here, 60 s by default) ends it
    port = free_port()
    r, seconds = _launch(args, timeout=120, WENLAN_RENDEZVOUS_TIMEOUT="10", **_rank_env(1, port))
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert f"127.0.0.1:{port}" in line and "--master_port" in line, line
    assert seconds < 60, seconds
    # rank 0 with its port held by another job: said at once
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        r, seconds = _launch(args, timeout=120, **_rank_env(0, port))
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert str(port) in line and "already in use" in line and "--master_port" in line, line


def test_default_rendezvous_watchdog_is_within_a_minute():
    from pretrain import dist

    assert dist.RENDEZVOUS_TIMEOUT_S <= 60
