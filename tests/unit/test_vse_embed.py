"""Embedding extraction sharded over 2 gloo processes equals one process: same rows, same order."""
import io
import json
import os
import socket
import tarfile

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from pretrain import dist

CAPTIONS = [["red"], ["blue one", "blue two", "blue three"], ["green"], ["a", "b"], ["c"], ["d", "e", "f"], ["g"]]


def make_data(root):
    """7 Karpathy images (1-3 captions: uneven shares per rank) and 2 shards of 5 + 4 samples."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    entries = []
    for i, caps in enumerate(CAPTIONS):
        Image.new("RGB", (20, 20), (30 * i, 255 - 30 * i, 90)).save(os.path.join(root, "img", f"{i}.png"))
        entries.append({"filepath": "img", "filename": f"{i}.png", "split": "test",
                        "sentences": [{"raw": c} for c in caps]})
    json.dump({"images": entries}, open(os.path.join(root, "data.json"), "w"))
    os.makedirs(os.path.join(root, "shards"), exist_ok=True)
    n = 0
    for s, size in enumerate([5, 4]):
        with tarfile.open(os.path.join(root, "shards", f"s-{s:03d}.tar"), "w") as tar:
            for _ in range(size):
                buf = io.BytesIO()
                Image.new("RGB", (20, 20), (25 * n, 80, 255 - 25 * n)).save(buf, format="JPEG")
                files = {f"{n:05d}.jpg": buf.getvalue(), f"{n:05d}.txt": f"query {n % 4}".encode(),
                         f"{n:05d}.json": json.dumps({"query_id": n % 4, "image_id": n, "clicks": n + 1}).encode()}
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1


def embed_all(root, rank, world):
    from pretrain.eval.embed import embed_karpathy, embed_shards
    from pretrain.models import DualEncoder, build_tokenizer
    from pretrain.data.karpathy import read_karpathy
    from pretrain.models import image_transform as eval_transform
    from conftest import tiny_model_config

    torch.manual_seed(0)
    cfg = tiny_model_config()
    towers = DualEncoder(cfg)
    tok = build_tokenizer(cfg.text)
    tf = eval_transform(towers.image, cfg.image.image_size)
    images = read_karpathy(os.path.join(root, "data.json"), root, ["test"], captions_per_image=0)
    k = embed_karpathy(towers, images, tf, tok, max_length=8, batch_size=2, rank=rank, world_size=world)
    s = embed_shards(towers, os.path.join(root, "shards"), tf, tok, max_length=8, batch_size=2, rank=rank,
                     world_size=world)
    return {"k_img": k.image, "k_txt": k.text, "k_t2i": k.text_to_image, "k_caps": k.captions,
            "s_img": s.image, "s_txt": s.text, "s_qid": s.query_id, "s_iid": s.image_id, "s_clicks": s.clicks,
            "s_index": s.index, "s_keys": s.keys}


def worker(rank, world, port, root):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false"})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    out = embed_all(root, rank, world)
    torch.save(out, os.path.join(root, f"out{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    root = str(tmp_path)
    make_data(root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, root), nprocs=2, join=True)
    one = embed_all(root, 0, 1)
    for rank in (0, 1):  # every rank ends with the full, ordered result
        two = torch.load(os.path.join(root, f"out{rank}.pt"))
        for key, ref in one.items():
            if torch.is_tensor(ref):
                assert torch.allclose(two[key], ref, atol=1e-6), key
            else:
                assert two[key] == ref, key
    assert one["k_img"].shape[0] == 7 and one["k_txt"].shape[0] == 12
    assert one["k_t2i"].tolist() == [i for i, c in enumerate(CAPTIONS) for _ in c]
    assert one["s_index"].tolist() == list(range(9)) and one["s_iid"].tolist() == list(range(9))
    assert one["s_keys"][0].endswith("#00000") and one["s_clicks"].tolist() == [float(n + 1) for n in range(9)]


def test_gather_rows_in_order_checks_coverage():
    rows = torch.arange(6.0).reshape(3, 2)
    assert dist.gather_rows_in_order(rows, torch.tensor([2, 0, 1]), 3).tolist() == [[2, 3], [4, 5], [0, 1]]
    with pytest.raises(ValueError, match="exactly once"):
        dist.gather_rows_in_order(rows, torch.tensor([0, 0, 1]), 3)
    with pytest.raises(ValueError, match="outside"):
        dist.gather_rows_in_order(rows, torch.tensor([0, 1, 3]), 3)
