"""Checkpoint files are loaded as data only: a pickled callable planted in a file does not run, and the load
fails with one line naming the file. The control shows that the payload is live under a plain pickle load."""
import os

import numpy as np
import pytest
import torch

from conftest import plant_payload as plant
from pretrain import checkpoint


def test_payload_is_live_under_plain_pickle(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "f.pt", marker)
    torch.load(tmp_path / "f.pt", weights_only=False)  # what DeepSpeed's and the old loader did
    assert marker.exists()


@pytest.mark.parametrize("name", ["wenlan.pt", "rank_00000.pt", "mp_rank_00_model_states.pt"])
def test_safe_load_and_scan_refuse_payload(tmp_path, name):
    marker = tmp_path / "ran"
    path = str(tmp_path / name)
    plant(path, marker)
    for fn in (checkpoint.safe_load, checkpoint.scan):
        with pytest.raises(checkpoint.CheckpointError) as info:
            fn(path)
        msg = str(info.value)
        assert path in msg and "\n" not in msg and "exec" in msg, msg
    assert not marker.exists()


def test_forced_weights_only_covers_third_party_loads(tmp_path):
    from pretrain.export import forced_weights_only

    marker = tmp_path / "ran"
    plant(tmp_path / "f.pt", marker)
    with pytest.raises(checkpoint.CheckpointError):
        with forced_weights_only():
            torch.load(tmp_path / "f.pt", weights_only=False)  # as deepspeed.utils.zero_to_fp32 asks
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.randn()  # a cached gaussian in the numpy state
    state = checkpoint.rng_state()
    torch.save(state, tmp_path / "rank_00000.pt")
    expected = (torch.rand(3), np.random.randn(3), [random.random() for _ in range(3)])
    checkpoint.set_rng_state(checkpoint.safe_load(str(tmp_path / "rank_00000.pt")))
    got = (torch.rand(3), np.random.randn(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_resolve_and_prune_never_touch_a_complete_checkpoint_early(tmp_path):
    ck = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        d = ck / checkpoint.tag_for(step)
        d.mkdir(parents=True)
        if complete:
            (d / checkpoint.MARKER).write_text("{}")
    assert checkpoint.resolve_resume(str(ck), "auto") == str(ck / "step_00000004")
    assert checkpoint.resolve_resume(str(ck), "never") is None
    assert checkpoint.resolve_resume(str(ck), str(ck / "step_00000002")) == str(ck / "step_00000002")
    assert checkpoint.resolve_resume(str(tmp_path), str(tmp_path)) == str(ck / "step_00000004")  # a run folder
    with pytest.raises(checkpoint.CheckpointError, match="step_00000006"):
        checkpoint.resolve_resume(str(ck), "step_00000006")  # incomplete
    checkpoint.prune(str(ck), keep=1)
    assert sorted(os.listdir(ck)) == ["step_00000004", "step_00000006"]  # a newer incomplete save is left alone


def test_truncate_metrics_keeps_each_step_once(tmp_path):
    import json

    from pretrain.metrics import truncate_metrics

    recs = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 5)] + [{"step": 3, "eval/t2i_hit@1": 0.5}]
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 6, "lo'  # a line cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    assert truncate_metrics(str(tmp_path), 3) == 3
    kept = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert kept == recs[:3] + recs[5:]
    assert truncate_metrics(str(tmp_path), 3, drop_eval_at_last=True) == 1
    assert [json.loads(l) for l in open(tmp_path / "metrics.jsonl")] == recs[:3]
