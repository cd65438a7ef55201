"""VSE trainer logs: per-epoch training values under train/, validation under val/; a rerun keeps the old log."""
import json
import os
from types import SimpleNamespace

from pretrain.metrics import MetricsWriter
from pretrain.metrics import set_aside_old_metrics
from pretrain.vse.train import VSETrainer


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_epoch_values_are_logged_under_train_and_val(tmp_path):
    writer = MetricsWriter(str(tmp_path), True, 10)
    t = SimpleNamespace(writer=writer, step=7, epoch=2)
    stats = {"loss": 0.5, "steps": 7, "skipped": 0, "seconds": 1.5, "pos_sim": 0.8, "hardest_neg_sim": 0.3}
    val = {"rsum": 123.0, "i2t_r1": 20.0, "eval_seconds": 0.2}
    VSETrainer.log_epoch(t, stats, val)
    writer.close()
    train_rec, val_rec = records(tmp_path / "metrics.jsonl")
    assert train_rec["step"] == val_rec["step"] == 7
    assert {k for k in train_rec if k not in ("step", "time")} == {f"train/{k}" for k in ("epoch", *stats)}
    assert train_rec["train/loss"] == 0.5 and train_rec["train/epoch"] == 2
    assert {k for k in val_rec if k not in ("step", "time")} == {f"val/{k}" for k in ("epoch", *val)}
    assert val_rec["val/rsum"] == 123.0


def test_rerun_sets_the_old_metrics_aside(tmp_path):
    assert set_aside_old_metrics(str(tmp_path)) is None           # nothing to keep
    logs = []
    for run in range(3):                                           # three reruns within one second
        with open(tmp_path / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"run": run}) + "\n")
        moved = set_aside_old_metrics(str(tmp_path))
        assert moved and moved.endswith(".old") and not (tmp_path / "metrics.jsonl").exists()
        logs.append(moved)
    assert len(set(logs)) == 3                                     # nothing overwritten
    assert [records(p)[0]["run"] for p in logs] == [0, 1, 2]
    assert all(os.path.basename(p).startswith("metrics.jsonl.") for p in logs)
