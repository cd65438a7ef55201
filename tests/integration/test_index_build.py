"""tools/index.py build / eval / merge / search on demo shards, as real processes.

- the index holds every distinct image id of the shards once (counted here from the tar files directly);
- text-to-image hit@1/5/10 through the exact index equal tools/evaluate_retrieval.py --shards on the same data;
- a build killed midway and run again gives the same index as an uninterrupted one;
- two --range --parts-only builds merged give the one-pass index;
- refusals, one line and exit 2: another export, a half-written index, an empty query, a bad k.
"""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from _tiny import ROOT

PY = sys.executable
TOOL = os.path.join(ROOT, "tools", "index.py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run(*args, check=True, timeout=600, subprocess_=False):
    """tools/index.py ARGS, in this process (torch loaded once), or as a real process with ``subprocess_``."""
    if subprocess_:
        p = subprocess.run([PY, TOOL, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)
        res = Result(p.returncode, p.stdout, p.stderr)
    else:
        import contextlib
        import io
        import runpy
        tool = runpy.run_path(TOOL)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = tool["main"](list(args))
        res = Result(rc, out.getvalue(), err.getvalue())
    if check and res.returncode != 0:
        raise AssertionError(f"tools/index.py {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def one_line_error(p):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith("[") and "WARNING" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([PY, os.path.join(ROOT, "tools", "make_demo_data.py"), "--out", str(out), "--no-progress",
                    "--shard-size", "60", "--workers", "1"], check=True, env=ENV, capture_output=True)
    return out / "shards"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from conftest import export_random_model, tiny_model_config

    base = tmp_path_factory.mktemp("exports")
    a = export_random_model(tiny_model_config(), str(base / "a"), seed=0)
    b = export_random_model(tiny_model_config(), str(base / "b"), seed=1)
    return a, b


@pytest.fixture(scope="module")
def val_index(demo, exports, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("idx") / "val")
    run("build", "--export", exports[0], "--shards", str(demo / "val"), "--out", out, subprocess_=True)
    return out


def image_ids_in(folder):
    """Distinct image ids of a shard folder, read with tarfile (not the project's reader)."""
    ids = set()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(folder, name)) as t:
                for m in t.getmembers():
                    if m.name.endswith(".json"):
                        ids.add(int(json.load(t.extractfile(m))["image_id"]))
    return ids


def search_json(index, query):
    out = run("search", "--index", index, query, "--json").stdout
    return json.loads(out[out.index("{"):])


def index_state(folder):
    with open(os.path.join(folder, "index.json")) as f:
        info = json.load(f)
    with np.load(os.path.join(folder, "rows.npz")) as z:
        rows = {k: z[k] for k in z.files}
    with open(os.path.join(folder, "meta.jsonl"), "rb") as f:
        meta = f.read()
    import faiss
    index = faiss.read_index(os.path.join(folder, "index.faiss"))
    vectors = index.reconstruct_n(0, index.ntotal) if info["index"]["kind"] == "flat" else None
    return info, rows, meta, vectors


def test_index_holds_each_image_once_and_equals_evaluate_retrieval(val_index, demo, exports, tmp_path):
    info, rows, meta, vectors = index_state(val_index)
    ids = image_ids_in(demo / "val")
    assert info["count"] == len(ids) == len(set(rows["image_id"].tolist()))
    assert set(rows["image_id"].tolist()) == ids
    assert info["index"]["kind"] == "flat" and info["recall_at_10"] == 1.0
    assert info["export_checksum"] and info["dim"] == 16
    # the stored vectors are the export's image embeddings (recomputed here with the towers, row by row)
    import torch
    from pretrain.export import load_export
    from pretrain.data.samples import decode_image
    towers, _, transform = load_export(exports[0])
    lines = meta.decode().splitlines()
    for r in (0, len(lines) // 2, len(lines) - 1):
        key = json.loads(lines[r])["key"]
        url, _, k = key.rpartition("#")
        with tarfile.open(url) as t:
            data = t.extractfile(k + ".jpg").read()
        with torch.no_grad():
            ref = towers.image(transform(decode_image(data))[None])[0].numpy()
        np.testing.assert_allclose(vectors[r], ref, atol=1e-5)
    # hit@1/5/10 through the index == tools/evaluate_retrieval.py --shards
    ours = tmp_path / "ours.json"
    run("eval", "--index", val_index, "--shards", str(demo / "val"), "--json", str(ours))
    ev = subprocess.run([PY, os.path.join(ROOT, "tools", "evaluate_retrieval.py"), "--export", exports[0], "--shards",
                         str(demo / "val"), "--out", str(tmp_path / "ev"), "--grid-queries", "0"],
                        capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert ev.returncode == 0, ev.stderr
    ref = json.load(open(tmp_path / "ev" / "metrics.json"))
    got = json.load(open(ours))
    assert got["queries"] == ref["num_queries"] and got["images"] == ref["num_images"]
    for k in (1, 5, 10):
        assert got["metrics"][f"t2i_hit@{k}"] == pytest.approx(ref["metrics"][f"t2i_hit@{k}"], abs=1e-12), k


def test_search_cli_and_refusals(val_index, exports, tmp_path):
    p = run("search", "--index", val_index, "red circle", "-k", "3", "--json", "--grid", str(tmp_path / "g.png"))
    out = json.loads(p.stdout[p.stdout.index("{"):])
    assert [h["rank"] for h in out["hits"]] == [1, 2, 3]
    assert out["hits"][0]["score"] >= out["hits"][1]["score"] >= out["hits"][2]["score"]
    assert all(h["key"] and h["queries"] for h in out["hits"])
    assert os.path.getsize(tmp_path / "g.png") > 1000
    # independent check of the top hit: brute force over the stored vectors with the export's text tower
    _, rows, meta, vectors = index_state(val_index)
    from pretrain.export import load_export
    import torch
    towers, tok, _ = load_export(exports[0])
    t = tok(["red circle"], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        q = towers.text(t["input_ids"], t["attention_mask"])[0].numpy()
    assert out["hits"][0]["row"] == int(np.argmax(vectors @ q))
    # refusals
    assert "empty" in one_line_error(run("search", "--index", val_index, "  ", check=False, subprocess_=True))
    assert "k must" in one_line_error(run("search", "--index", val_index, "x", "-k", "0", check=False))
    assert "another export" in one_line_error(run("search", "--index", val_index, "x", "--export", exports[1], check=False))
    assert "another export" in one_line_error(
        run("build", "--export", exports[1], "--shards", os.path.dirname(json.load(
            open(os.path.join(val_index, "index.json")))["parts"][0]["url"]), "--out", val_index, check=False))
    shards_dir = os.path.dirname(json.load(open(os.path.join(val_index, "index.json")))["parts"][0]["url"])
    for bad, words in ((("--memory", "lots"), "as a size"), (("--range", "5:2"), "--range"),
                       (("--batch-size", "0"), "--batch-size"), (("--target-recall", "1.5"), "--target-recall")):
        assert words in one_line_error(run("build", "--export", exports[0], "--shards", shards_dir, "--out",
                                           str(tmp_path / "bad"), *bad, check=False))
    assert not os.path.exists(tmp_path / "bad")                       # refused before anything was written
    broken = tmp_path / "broken"
    os.makedirs(broken / "parts")
    assert "not a complete index" in one_line_error(run("search", "--index", str(broken), "x", check=False))
    assert "does not exist" in one_line_error(run("search", "--index", str(tmp_path / "nope"), "x", check=False))


def test_killed_build_resumes_to_the_same_index(demo, exports, tmp_path):
    shards = str(demo / "train")
    whole = str(tmp_path / "whole")
    ivf = ("--exact-below", "100")        # an IVF index: its k-means too must come out the same
    # every build in a process of its own, as the killed one: the same threads, so the same float sums
    run("build", "--export", exports[0], "--shards", shards, "--out", whole, *ivf, subprocess_=True)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([PY, TOOL, "build", "--export", exports[0], "--shards", shards, "--out", killed, *ivf],
                            env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        parts = [n for n in os.listdir(os.path.join(killed, "parts"))] if os.path.isdir(os.path.join(killed, "parts")) else []
        if sum(n.endswith(".json") for n in parts) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "index.json")), "the build finished before it was killed"
    p = run("build", "--export", exports[0], "--shards", shards, "--out", killed, *ivf, subprocess_=True)
    done = int(p.stdout.split("already embedded")[0].split(":")[-1].strip())
    assert done >= 3, p.stdout
    a, b = index_state(whole), index_state(killed)
    assert a[0]["count"] == b[0]["count"]
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k])
    assert a[2] == b[2]
    assert a[0]["index"]["kind"] == "ivf_flat" and a[0]["search_params"] == b[0]["search_params"]
    with open(os.path.join(whole, "index.faiss"), "rb") as f1, open(os.path.join(killed, "index.faiss"), "rb") as f2:
        assert f1.read() == f2.read()


def test_two_ranges_merged_equal_one_pass(demo, exports, val_index, tmp_path):
    shards = str(demo / "val")
    n = len([f for f in os.listdir(shards) if f.endswith(".tar")])
    r1, r2 = str(tmp_path / "r1"), str(tmp_path / "r2")
    run("build", "--export", exports[0], "--shards", shards, "--out", r1, "--range", f"0:{n // 2}", "--parts-only")
    run("build", "--export", exports[0], "--shards", shards, "--out", r2, "--range", f"{n // 2}:{n}", "--parts-only")
    assert not os.path.exists(os.path.join(r1, "index.json"))
    merged = str(tmp_path / "merged")
    run("merge", "--export", exports[0], "--out", merged, r1, r2)
    a, b = index_state(val_index), index_state(merged)
    assert a[0]["count"] == b[0]["count"] and a[0]["index"] == b[0]["index"]
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k])
    assert a[2] == b[2]
    np.testing.assert_allclose(a[3], b[3], atol=1e-6)    # the one-pass index was embedded in another process
    s1, s2 = search_json(val_index, "blue square"), search_json(merged, "blue square")
    assert [(h["row"], h["key"]) for h in s1["hits"]] == [(h["row"], h["key"]) for h in s2["hits"]]
    # a folder of another export cannot be merged in
    other = str(tmp_path / "other")
    run("build", "--export", exports[1], "--shards", shards, "--out", other, "--range", "0:1", "--parts-only")
    assert "another export" in one_line_error(run("merge", "--export", exports[0], "--out", str(tmp_path / "m2"),
                                                  r1, other, check=False))


def test_two_processes_share_the_shards(demo, exports, val_index, tmp_path):
    """Two real processes (torch.distributed over gloo, as deepspeed/torchrun start them) embed alternate shards;
    rank 0 assembles the same index as one process."""
    from _tiny import free_port
    out = str(tmp_path / "two")
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([PY, TOOL, "build", "--export", exports[0], "--shards", str(demo / "val"),
                                       "--out", out], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "rank 1: shard" in logs[1] and "rank 0: shard" in logs[0]       # both embedded a share
    a, b = index_state(val_index), index_state(out)
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k])
    assert a[2] == b[2]
    np.testing.assert_allclose(a[3], b[3], atol=1e-6)
