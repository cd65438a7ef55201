"""Shared helpers of the integration tests: a tiny config, synthetic batches, process spawning."""
import os
import socket
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)



def load_script(relpath: str, name: str = None):
    """Import a script of launch/ or tools/ by its path, without putting its folder on sys.path
    (launch/pretrain.py on the path would shadow the `pretrain` package for every later test)."""
    import importlib.util

    path = os.path.join(ROOT, relpath)
    name = name or "_script_" + relpath.replace("/", "_").replace(".py", "")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


TINY_TEXT = ("{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64, "
             "hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}")


def tiny_overrides(output_dir: str, stage: int, **extra) -> list:
    items = {
        "model.image.name": "test_resnet", "model.image.image_size": 32,
        "model.text.pretrained": "false", "model.text.config_overrides": TINY_TEXT, "model.text.max_length": 8,
        "model.text.tokenizer": "minilm",
        "model.embed_dim": 16, "model.projection_hidden": 32,
        "wenlan.queue_size": 20, "wenlan.momentum": 0.9, "wenlan.temperature": 0.1,
        "optim.lr": 1e-2, "optim.head_lr": 1e-2, "optim.warmup_steps": 1, "optim.weight_decay": 0.0,
        "train.output_dir": output_dir, "train.micro_batch_size": 4, "train.zero_stage": stage,
        "train.precision": "fp32", "train.device": "cpu", "train.log_every": 1, "train.eval_every": 0,
        "train.save_every": 1000, "data.train_shards": "unused", "data.num_workers": 0,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


class SyntheticStream:
    """Deterministic batches that differ by rank; ids drawn from a small range so that queue entries
    share query/image ids with later positives (false negatives to mask)."""

    def __init__(self, rank: int, batch_size: int = 4, length: int = 8, size: int = 32, seed: int = 0):
        self.rank, self.bs, self.length, self.size, self.seed = rank, batch_size, length, size, seed
        self.consumed = 0

    def batch(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.rank * 1009 + i)
        return {"image": torch.randn(self.bs, 3, self.size, self.size, generator=g),
                "input_ids": torch.randint(1000, 1100, (self.bs, self.length), generator=g),
                "attention_mask": torch.ones(self.bs, self.length, dtype=torch.long),
                "query_id": torch.randint(0, 6, (self.bs,), generator=g),
                "image_id": torch.randint(0, 6, (self.bs,), generator=g),
                "clicks": torch.randint(1, 5, (self.bs,), generator=g).float()}

    def __iter__(self):
        while True:
            b = self.batch(self.consumed)
            self.consumed += 1
            yield b

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, s):
        self.consumed = s["consumed"]

    def skip_counts(self):
        return {}

    def samples_read(self):
        return self.consumed * self.bs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_dist_env(rank: int, world: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})


def write_shards(out_dir: str, sizes, image_size: int = 32, seed: int = 0, prefix: str = "shard") -> list:
    """Tiny WebDataset shards written with tarfile: KEY.jpg (a coloured square), KEY.txt, KEY.json."""
    import io
    import json
    import random
    import tarfile

    from PIL import Image

    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    paths, counter = [], 0
    for s, n in enumerate(sizes):
        path = os.path.join(out_dir, f"{prefix}-{s:06d}.tar")
        with tarfile.open(path, "w") as tar:
            for _ in range(n):
                name = rng.choice(sorted(colors))
                img = Image.new("RGB", (image_size, image_size), colors[name])
                buf = io.BytesIO()
                img.save(buf, format="JPEG")
                key = f"{counter:09d}"
                files = {f"{key}.jpg": buf.getvalue(), f"{key}.txt": f"{name} square".encode(),
                         f"{key}.json": json.dumps({"query_id": sorted(colors).index(name),
                                                    "image_id": counter, "clicks": rng.randint(1, 5)}).encode()}
                for fname, data in files.items():
                    info = tarfile.TarInfo(fname)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                counter += 1
        paths.append(path)
    return paths
