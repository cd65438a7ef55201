"""``wenlan.mode=in_batch`` builds no momentum towers and no queues: none in memory, none in checkpoints."""
import glob
import os

import torch
import torch.multiprocessing as mp

from _tiny import SyntheticStream, free_port, set_dist_env, tiny_overrides


def worker(rank, world, port, outdir, mode, momentum=0.9):
    set_dist_env(rank, world, port)
    torch.set_num_threads(1)
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    cfg = load_config(None, tiny_overrides(outdir, 2, **{"wenlan.mode": mode, "train.steps": 2,
                                                        "wenlan.momentum": momentum}))
    tr = Trainer(cfg, resume="never", stream=SyntheticStream(rank))
    tr.fit()
    import gc
    n_models = sum(1 for o in gc.get_objects() if type(o).__name__ == "DualEncoder")
    queues = sum(1 for o in gc.get_objects() if type(o).__name__ == "NegativeQueue")
    torch.save({"keys": tr.wenlan.keys is None, "dual_encoders": n_models, "queues": queues,
                "filled": int(tr.wenlan.keys.image_queue.filled) if tr.wenlan.keys is not None else 0,
                "params": sum(p.numel() for p in tr.engine.module.parameters())},
               os.path.join(outdir, f"probe_{rank}.pt"))


def run(tmp_path, mode, momentum=0.9):
    out = str(tmp_path / f"{mode}_{momentum}")
    os.makedirs(out)
    mp.spawn(worker, args=(2, free_port(), out, mode, momentum), nprocs=2, join=True)
    return out, torch.load(os.path.join(out, "probe_0.pt"))


def checkpoint_tensor_names(run_dir):
    names = []
    for f in glob.glob(os.path.join(run_dir, "checkpoints", "step_*", "*.pt")):
        def walk(obj, prefix):
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(v, f"{prefix}/{k}")
            elif torch.is_tensor(obj):
                names.append(f"{os.path.basename(f)}:{prefix}")
        walk(torch.load(f, map_location="cpu", weights_only=False), "")
    return names


def test_in_batch_has_no_key_towers_or_queues(tmp_path):
    out_ib, ib = run(tmp_path, "in_batch")
    out_m, mo = run(tmp_path, "momentum")
    assert ib["keys"] and not mo["keys"]
    assert ib["dual_encoders"] == 1 and mo["dual_encoders"] == 2     # query towers only vs query + momentum
    assert ib["queues"] == 0 and mo["queues"] == 2
    assert ib["params"] == mo["params"]                                # the trained model is the same
    names_ib, names_m = checkpoint_tensor_names(out_ib), checkpoint_tensor_names(out_m)
    queue_like = lambda names: [n for n in names if "queue" in n or "/keys/key/" in n]
    assert queue_like(names_m), "the check below would be vacuous: momentum checkpoints hold queues and key towers"
    assert not queue_like(names_ib), queue_like(names_ib)[:5]


def test_momentum_zero_builds_no_key_towers_but_fills_the_queues(tmp_path):
    out, m0 = run(tmp_path, "momentum", momentum=0.0)
    assert m0["dual_encoders"] == 1 and m0["queues"] == 2
    assert m0["filled"] == 2 * 2 * 4                                  # 2 steps x 2 ranks x 4 pairs
    names = checkpoint_tensor_names(out)
    assert [n for n in names if "queue" in n] and not [n for n in names if "/keys/key/" in n]


def test_export_of_momentum_towers_without_any_is_one_line_error(tmp_path):
    """``tools/export.py --encoders momentum`` on an in_batch run: one line naming the mode, exit 2."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out_ib, _ = run(tmp_path, "in_batch")
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "export.py"), "--run", out_ib,
                        "--out", str(tmp_path / "exp"), "--encoders", "momentum"], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "wenlan.mode=in_batch" in lines[0] and "--encoders query" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "export.py"), "--run", out_ib,
                        "--out", str(tmp_path / "exp"), "--encoders", "query"], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
