"""Checkpoints under hostile re-runs, 2 processes (gloo), the real Trainer:

- re-running a finished `train.stop_at` run with --resume auto ten times (the ranks started out of step)
  neither removes nor changes a complete checkpoint, nor hangs; saving a step twice is a no-op;
- `--resume PATH` continues from another run's checkpoint;
- a pickle payload planted in any file of a checkpoint does not run: the load fails on every rank with one
  line naming the file (also DeepSpeed's own engine load), and tools/export.py refuses it too.
"""
import hashlib
import json
import os
import random
import shutil
import time

import torch
import torch.multiprocessing as mp

from _tiny import SyntheticStream, free_port, load_script, set_dist_env, tiny_overrides
from conftest import plant_payload as plant


def digest(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def worker(rank, world, port, tmp):
    set_dist_env(rank, world, port)
    torch.set_num_threads(1)
    from pretrain import checkpoint, dist
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    run, other = os.path.join(tmp, "run"), os.path.join(tmp, "other")
    report = {}

    def trainer(out_dir, resume, **extra):
        ov = tiny_overrides(out_dir, 2, **{"train.steps": 6, "train.save_every": 3, **extra})
        return Trainer(load_config(None, ov), resume=resume, stream=SyntheticStream(rank))

    # stop_at a multiple of save_every: step 3 is saved by the loop, then again as the final save (a no-op)
    tr = trainer(run, "never", **{"train.stop_at": 3})
    tr.fit()
    ck = os.path.join(run, "checkpoints")
    dist.barrier()
    before = digest(ck)
    metrics = open(os.path.join(run, "metrics.jsonl")).read()
    rng = random.Random(rank)
    for i in range(10):
        time.sleep(rng.random() * 0.5)  # ranks out of step, as on a busy cluster
        tr = trainer(run, "auto", **{"train.stop_at": 3})
        assert tr.step == 3
        tr.fit()
        dist.barrier()
        assert digest(ck) == before, i
        assert open(os.path.join(run, "metrics.jsonl")).read() == metrics, i
        assert open(os.path.join(ck, "latest")).read() == "step_00000003"

    # --resume PATH: another run's checkpoint
    tr = trainer(other, os.path.join(ck, "step_00000003"))
    report["other_start"] = tr.step
    tr.fit()
    report["other_end"] = tr.step
    dist.barrier()
    assert digest(ck) == before

    # payloads: a poisoned copy per file; every rank must fail alike, naming the file, before DeepSpeed loads
    src = os.path.join(ck, "step_00000003")
    names = sorted(n for n in os.listdir(src) if n.endswith(".pt"))
    if rank == 0:
        for n in names:
            dst = os.path.join(tmp, "poison", n, "checkpoints", "step_00000003")
            shutil.copytree(src, dst)
            shutil.copy(os.path.join(run, "config.yaml"), os.path.join(tmp, "poison", n, "config.yaml"))
            plant(os.path.join(dst, n), os.path.join(tmp, f"ran_{n}"))
    dist.barrier()
    report["errors"] = {}
    for n in names:
        path = os.path.join(tmp, "poison", n, "checkpoints", "step_00000003")
        try:
            checkpoint.load(tr.engine, path)
            report["errors"][n] = None
        except checkpoint.CheckpointError as e:
            report["errors"][n] = str(e)
    # DeepSpeed's own engine load, without our scan in front: its checkpoint engine loads weights_only
    path = os.path.join(tmp, "poison", "mp_rank_00_model_states.pt", "checkpoints")
    try:
        tr.engine.load_checkpoint(path, tag="step_00000003")
        report["engine_error"] = None
    except checkpoint.CheckpointError as e:
        report["engine_error"] = str(e)
    report["names"] = names
    with open(os.path.join(tmp, f"report_{rank}.json"), "w") as f:
        json.dump(report, f)


def test_reruns_resume_path_and_payloads(tmp_path):
    tmp = str(tmp_path)
    mp.spawn(worker, args=(2, free_port(), tmp), nprocs=2, join=True)
    reports = [json.load(open(tmp_path / f"report_{r}.json")) for r in range(2)]
    names = reports[0]["names"]
    assert {"wenlan.pt", "rank_00000.pt", "rank_00001.pt", "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(names)
    for rep in reports:
        assert rep["other_start"] == 3 and rep["other_end"] == 6
        for n in names:
            msg = rep["errors"][n]
            assert msg and n in msg and "\n" not in msg and "exec" in msg, (n, msg)
        assert rep["engine_error"] and "mp_rank_00_model_states.pt" in rep["engine_error"], rep["engine_error"]
    assert os.path.isfile(tmp_path / "other" / "checkpoints" / "step_00000006" / "COMPLETE")
    steps = [json.loads(l)["step"] for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3]  # each step once after ten re-runs

    # export: a clean copy exports; each poisoned file it reads is refused with one line naming it
    export = load_script("tools/export.py")
    assert export.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "exp_ok")]) == 0
    for n, encoders in (("wenlan.pt", "momentum"), ("mp_rank_00_model_states.pt", "query"),
                        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "query"),
                        ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "query")):
        rc = export.main(["--run", str(tmp_path / "poison" / n), "--out", str(tmp_path / f"exp_{n}"),
                          "--encoders", encoders])
        assert rc == 2, n
    for n in names:
        assert not os.path.exists(tmp_path / f"ran_{n}"), f"the payload in {n} ran"
