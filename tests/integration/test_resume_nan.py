"""Train-stop-resume equals an uninterrupted run (ZeRO-2 and ZeRO-3, 2 processes, dropout on); a killed save is
never resumed from; a NaN injected on one rank skips that step on every rank and training goes on."""
import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from _tiny import TINY_TEXT, SyntheticStream, free_port, set_dist_env, tiny_overrides, write_shards

# the demo config's dropout (MiniLM's 0.1): exact resume must hold with it on
DROPOUT_TEXT = TINY_TEXT.replace("hidden_dropout_prob: 0.0", "hidden_dropout_prob: 0.1").replace(
    "attention_probs_dropout_prob: 0.0", "attention_probs_dropout_prob: 0.1")


def worker(rank, world, port, overrides, resume, outfile, synthetic):
    set_dist_env(rank, world, port)
    torch.set_num_threads(1)
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    cfg = load_config(None, overrides)
    tr = Trainer(cfg, resume=resume, stream=SyntheticStream(rank) if synthetic else None)
    tr.fit()
    torch.save({"step": tr.step, "skipped": tr.skipped, "queue": tr.wenlan.keys.image_queue.features.clone(),
                "key0": tr.wenlan.keys.full_parameters()[0]}, f"{outfile}_{rank}.pt")


def run(overrides, resume, outfile, synthetic=True):
    mp.spawn(worker, args=(2, free_port(), overrides, resume, str(outfile), synthetic), nprocs=2, join=True)
    return [torch.load(f"{outfile}_{r}.pt") for r in range(2)]


def losses(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_stop_resume_equals_uninterrupted(stage, tmp_path):
    n = 4
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    # real shards through the real loader (1 worker per rank, augmentation on): same data order after resume
    write_shards(str(tmp_path / "shards"), [13, 7, 0, 21], seed=3)
    data = {"data.train_shards": str(tmp_path / "shards"), "data.num_workers": 1, "data.shuffle_buffer": 8,
            "model.text.config_overrides": DROPOUT_TEXT}
    a = run(tiny_overrides(full, stage, **{"train.steps": 2 * n}, **data), "never", tmp_path / "a", False)
    run(tiny_overrides(part, stage, **{"train.steps": 2 * n, "train.stop_at": n}, **data), "never",
        tmp_path / "b1", False)
    # a save killed midway: a newer tag without its COMPLETE marker must be ignored by --resume auto
    ck = os.path.join(part, "checkpoints")
    shutil.copytree(os.path.join(ck, f"step_{n:08d}"), os.path.join(ck, "step_00000099"))
    os.remove(os.path.join(ck, "step_00000099", "COMPLETE"))
    b = run(tiny_overrides(part, stage, **{"train.steps": 2 * n}, **data), "auto", tmp_path / "b2", False)
    la, lb = losses(full), losses(part)
    assert sorted(lb) == list(range(1, 2 * n + 1))  # resumed at n, not at the fake step 99
    for s in range(1, 2 * n + 1):
        assert lb[s] == pytest.approx(la[s], rel=1e-5, abs=1e-6), (s, la, lb)
    for r in range(2):
        assert b[r]["step"] == 2 * n
        assert torch.allclose(a[r]["queue"], b[r]["queue"], atol=1e-6)
        assert torch.allclose(a[r]["key0"], b[r]["key0"], atol=1e-6)


def test_nan_on_one_rank_skips_step_everywhere(tmp_path):
    out = str(tmp_path / "nan")
    res = run(tiny_overrides(out, 2, **{"train.steps": 6, "train.inject_nan_at_step": 2,
                                        "train.inject_nan_rank": 1}), "never", tmp_path / "n")
    for r in res:
        assert r["step"] == 6 and r["skipped"] == 1
    assert torch.equal(res[0]["queue"], res[1]["queue"])
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert recs[-1]["skipped_steps"] == 1
    by_step = {r["step"]: r for r in recs if "loss" in r}
    assert by_step[3]["loss"] != by_step[3]["loss"]  # step 3 (index 2) had no finite micro-batch: NaN logged
    for s in (4, 5, 6):
        assert by_step[s]["loss"] == pytest.approx(by_step[s]["loss"])  # finite again
        assert abs(by_step[s]["loss"]) < 1e3
