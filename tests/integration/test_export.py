"""Exports from ZeRO-2 and ZeRO-3 checkpoints load without DeepSpeed and give the live model's embeddings."""
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from _tiny import ROOT, SyntheticStream, free_port, set_dist_env, tiny_overrides


def worker(rank, world, port, overrides, outfile):
    set_dist_env(rank, world, port)
    torch.set_num_threads(1)
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    tr = Trainer(load_config(None, overrides), resume="never", stream=SyntheticStream(rank))
    tr.fit()
    probe = SyntheticStream(rank=7).batch(0)
    module = tr.engine.module
    module.eval()
    with torch.no_grad():
        img = module.query.image(probe["image"])
        txt = module.query.text(probe["input_ids"], probe["attention_mask"])
    if rank == 0:
        torch.save({"img": img, "txt": txt, "probe": probe}, outfile)


@pytest.mark.parametrize("stage", [2, 3])
def test_export_matches_live_model(stage, tmp_path):
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides(run_dir, stage, **{"train.steps": 3})
    mp.spawn(worker, args=(2, free_port(), overrides, str(tmp_path / "live.pt")), nprocs=2, join=True)
    live = torch.load(tmp_path / "live.pt")
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import export as export_tool
    assert export_tool.main(["--run", run_dir, "--out", str(tmp_path / "exp")]) == 0
    from pretrain.export import load_export
    towers, tokenizer, transform = load_export(str(tmp_path / "exp"))
    p = live["probe"]
    with torch.no_grad():
        img = towers.image(p["image"])
        txt = towers.text(p["input_ids"], p["attention_mask"])
    assert torch.allclose(img, live["img"], atol=1e-5), (img - live["img"]).abs().max()
    assert torch.allclose(txt, live["txt"], atol=1e-5), (txt - live["txt"]).abs().max()
    # the export is not the untrained initialisation: a fresh model gives other embeddings
    torch.manual_seed(123)
    from pretrain.config import load_config
    from pretrain.models import DualEncoder
    fresh = DualEncoder(load_config(None, overrides).model).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.image(p["image"]), img, atol=1e-3)
