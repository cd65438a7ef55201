"""Runs that survive a cluster, with the real launcher: `deepspeed --num_gpus 2 --master_port <free>`,
`launch/pretrain.py`, the demo config (dropout on in the text tower, augmentation on) on tiny shards.

- kill -9 of one rank after a checkpoint, then `--resume auto`: the same logged losses as an uninterrupted
  run, each step once in metrics.jsonl; a re-run of the finished run changes no checkpoint;
- SIGTERM to the launcher's process group mid-run: every rank stops after the same step, a complete
  checkpoint of that step is written, rank 0 says how to resume, and resuming continues exactly;
- the final checkpoint is written before the final evaluation.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from _tiny import ROOT, free_port, write_shards

DEMO = os.path.join(ROOT, "configs", "pretrain", "demo.yaml")
STEPS = 8


def _overrides(tmp, out):
    return [f"data.train_shards={tmp / 'shards'}", f"data.val_shards={tmp / 'val'}", "model.text.tokenizer=minilm",
            "model.image.image_size=32", "train.micro_batch_size=4", f"train.steps={STEPS}", "train.save_every=3",
            "train.log_every=1", "train.eval_every=0", "optim.warmup_steps=2", "data.num_workers=1",
            "data.shuffle_buffer=8", "wenlan.queue_size=20", "data.val_max_samples=8", f"train.output_dir={out}"]


class Launch:
    """`deepspeed --num_gpus 2` in its own session (a scheduler's view of a job: one process group)."""

    def __init__(self, tmp, out, resume, log):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                   PYTHONPATH=ROOT, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        self.log = log
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
               str(free_port()), os.path.join(ROOT, "launch", "pretrain.py"), "--config", DEMO, "--resume", resume]
        self.proc = subprocess.Popen(cmd + _overrides(tmp, out), cwd=ROOT, env=env, stdout=open(log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def ranks(self):
        """The two rank processes (not their loader workers, which are forks with the same command line)."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return {}
        out = {}
        for p in kids:
            try:
                cmd, parent = p.cmdline(), p.parent().cmdline()
            except (psutil.Error, AttributeError):
                continue
            if any(c.startswith("--local_rank=") for c in parent):
                continue  # a loader worker (its parent is a rank)
            for r in (0, 1):
                if f"--local_rank={r}" in cmd and any(c.endswith("pretrain.py") for c in cmd):
                    out[r] = p
        return out

    def wait_all(self, timeout=900):
        """Wait for the launcher and every process under it; the launcher's exit code."""
        procs = psutil.Process(self.proc.pid).children(recursive=True)
        rc = self.proc.wait(timeout=timeout)  # (reaped by subprocess, not psutil: keeps the exit code)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        assert not alive, f"still running after {timeout} s: {alive}\n{self.output()[-3000:]}"
        return rc

    def output(self):
        return open(self.log).read()


def _records(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    recs = []
    for line in open(path):
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass
    return recs


def _losses(out):
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in _records(out) if "loss" in r}


def _wait_for(cond, launch, timeout=900):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        assert launch.proc.poll() is None or launch.ranks(), \
            f"the run ended before the test could interrupt it:\n{launch.output()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError("timed out")


def _digest(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = hashlib.sha1(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    write_shards(str(tmp / "shards"), [13, 7, 21], seed=3)
    write_shards(str(tmp / "val"), [8], seed=5)
    return tmp


@pytest.fixture(scope="module")
def reference(data):
    out = data / "reference"
    run = Launch(data, out, "never", data / "reference.log")
    assert run.wait_all() == 0, run.output()[-3000:]
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    # the final checkpoint is complete before the final evaluation is written
    marker = out / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE"
    assert os.path.getmtime(marker) <= os.path.getmtime(out / "eval" / f"step_{STEPS:08d}.json")
    return losses


def _same(losses, reference):
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    for s in losses:
        assert losses[s] == pytest.approx(reference[s], rel=1e-5, abs=1e-6), (s, losses, reference)


def test_kill9_one_rank_then_resume_auto_is_exact(data, reference):
    out = data / "killed"
    run = Launch(data, out, "never", data / "killed.log")
    ck = out / "checkpoints" / "step_00000003" / "COMPLETE"
    _wait_for(lambda: ck.exists() and max([r["step"] for r in _records(out)] or [0]) >= 4, run)
    run.ranks()[1].kill()  # SIGKILL: no handler, no save
    assert run.wait_all() != 0
    logged = [r["step"] for r in _records(out) if "loss" in r]
    assert max(logged) >= 4  # steps after the checkpoint were logged: the resume must drop them
    again = Launch(data, out, "auto", data / "killed_resume.log")
    assert again.wait_all() == 0, again.output()[-3000:]
    _same(_losses(out), reference)

    # re-running the finished run changes no checkpoint
    before = _digest(out / "checkpoints")
    rerun = Launch(data, out, "auto", data / "killed_rerun.log")
    assert rerun.wait_all() == 0, rerun.output()[-3000:]
    assert _digest(out / "checkpoints") == before
    _same(_losses(out), reference)


def test_sigterm_stops_every_rank_with_a_checkpoint_and_resume_is_exact(data, reference):
    out = data / "preempted"
    run = Launch(data, out, "never", data / "preempted.log")
    _wait_for(lambda: max([r["step"] for r in _records(out)] or [0]) >= 1, run)
    os.killpg(run.proc.pid, signal.SIGTERM)  # what a scheduler does to a job
    run.wait_all()
    text = run.output()
    line = [ln for ln in text.splitlines() if ln.startswith("stopped by SIGTERM")]
    assert len(line) == 1 and "--resume auto" in line[0], text[-3000:]
    step = max(r["step"] for r in _records(out))
    assert 1 <= step < STEPS
    assert f"after step {step} " in line[0]
    tag = out / "checkpoints" / f"step_{step:08d}"
    assert (tag / "COMPLETE").exists() and (tag / "rank_00000.pt").exists() and (tag / "rank_00001.pt").exists()
    assert open(out / "checkpoints" / "latest").read() == tag.name
    again = Launch(data, out, "auto", data / "preempted_resume.log")
    assert again.wait_all() == 0, again.output()[-3000:]
    _same(_losses(out), reference)
