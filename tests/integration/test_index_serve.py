"""tools/index.py serve, as a real process, driven by headless Chromium (selenium) and raw HTTP.

- the page: a query typed into #q (Enter) shows as first hit the image that a brute-force search computed here
  with the export's towers ranks first, and its thumbnail loads; index texts reach the page as text, not HTML;
- the JSON API equals that brute-force ranking; an empty query and a bad k get 400 with a JSON error;
- nothing outside the index is served: traversal paths, encoded or not, and unknown rows get 404;
- concurrent queries get the same answers as sequential ones; SIGTERM stops the server with exit 0.

Chromium is part of the set-up (.ci/setup.sh installs it): when it is missing the test fails, it does not skip.
"""
import http.client
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from _tiny import ROOT

PY = sys.executable
TOOL = os.path.join(ROOT, "tools", "index.py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
           TOKENIZERS_PARALLELISM="false")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

TEXTS = ["红色圆形", "蓝色方块", "绿色三角", "黄色星星", "黑白条纹", "紫色花朵",
         "橙色汽车", "白色小猫", "灰色大象", "粉色气球", "棕色木桌", "金色钥匙"]
CANDIDATE_QUERIES = TEXTS + ["red circle", "一只小狗在草地上", "夜晚的城市", "blue sky",
                             "海边的日落", "咖啡杯"]
# Every image also carries this query text (fewer clicks): if the page inserted index text as HTML, it would run.
HOSTILE = "<img id=\"pwn\" src=\"x\" onerror=\"document.title='pwned'\">"


def write_noise_shards(out_dir, per_shard=6, shards=2, size=40):
    """Shards of distinct noisy-colour JPEGs (no two images embed alike, so the top hit is unambiguous); each
    image in two samples: its own Chinese query (5 clicks) and HOSTILE (1 click). Returns {image_id: jpeg}."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(out_dir, exist_ok=True)
    images = {}
    for s in range(shards):
        with tarfile.open(os.path.join(out_dir, f"noise-{s:06d}.tar"), "w") as tar:
            for j in range(per_shard):
                iid = s * per_shard + j
                buf = io.BytesIO()
                base = rng.integers(0, 256, 3)[None, None, :]                     # a distinct colour, plus noise
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(buf, "JPEG", quality=90)
                images[iid] = buf.getvalue()
                for n, (text, qid, clicks) in enumerate([(TEXTS[iid], iid, 5), (HOSTILE, 100, 1)]):
                    key = f"{iid:05d}{n}"
                    meta = {"query_id": qid, "image_id": iid, "clicks": clicks}
                    for name, data in ((f"{key}.jpg", images[iid]), (f"{key}.txt", text.encode("utf-8")),
                                       (f"{key}.json", json.dumps(meta).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return images


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from conftest import export_random_model, tiny_model_config

    base = tmp_path_factory.mktemp("serve")
    cfg = tiny_model_config()
    export = export_random_model(cfg, str(base / "export"), seed=3)
    images = write_noise_shards(str(base / "shards"))
    out = str(base / "index")
    p = subprocess.run([PY, TOOL, "build", "--export", export, "--shards", str(base / "shards"), "--out", out,
                        "--device", "cpu"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 0, f"tools/index.py build failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return {"export": export, "cfg": cfg, "images": images, "index": out}


@pytest.fixture(scope="module")
def reference(built):
    """Brute-force ranking computed here: the export's towers (pretrain.export.load_export) embed the shards'
    images (decoded with PIL) and the candidate queries; cosine similarity; the query with the clearest top-1."""
    import torch
    from PIL import Image

    from pretrain.export import load_export

    towers, tokenizer, transform = load_export(built["export"])
    ids = sorted(built["images"])
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(io.BytesIO(built["images"][i])).convert("RGB")) for i in ids])
        img = towers.image(pixels).numpy()
        tok = tokenizer(CANDIDATE_QUERIES, padding="max_length", truncation=True,
                        max_length=built["cfg"].text.max_length, return_tensors="pt")
        txt = towers.text(tok["input_ids"], tok["attention_mask"]).numpy()
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    scores = txt @ img.T                                                     # Q x N
    top2 = np.sort(scores, axis=1)[:, -2:]
    best = int(np.argmax(top2[:, 1] - top2[:, 0]))
    assert top2[best, 1] - top2[best, 0] > 1e-3, "no candidate query has a clear first result"
    order = np.argsort(-scores[best], kind="stable")
    return {"query": CANDIDATE_QUERIES[best], "image_ids": [ids[i] for i in order],
            "scores": scores[best][order].tolist(), "scores_all": scores, "ids": ids}


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    """``tools/index.py serve --index I --port 0`` as a subprocess; the URL read from its one ready line."""
    err_path = tmp_path_factory.mktemp("serve_log") / "stderr.txt"
    err = open(err_path, "w")
    proc = subprocess.Popen([PY, TOOL, "serve", "--index", built["index"], "--port", "0"], stdout=subprocess.PIPE,
                            stderr=err, text=True, env=ENV, cwd=ROOT)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    url, deadline = None, time.time() + 120
    while url is None and time.time() < deadline and proc.poll() is None:
        try:
            m = re.fullmatch(r"serving (http://\S+/) \((\d+) images\) - Ctrl-C to stop", lines.get(timeout=1).strip())
        except queue.Empty:
            continue
        if m:
            url, count = m.group(1), int(m.group(2))
    if url is None:
        proc.kill()
        raise AssertionError(f"serve printed no 'serving URL' line (exit {proc.poll()}):\n{open(err_path).read()}")
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    yield {"proc": proc, "url": url, "host": host, "port": port, "count": count, "stderr": err_path}
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    err.close()


def get(server, path):
    """(status, headers, body) of a raw GET: http.client sends the path exactly as given (no normalisation)."""
    conn = http.client.HTTPConnection(server["host"], server["port"], timeout=60)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def search(server, q, k):
    status, headers, body = get(server, "/search?" + urllib.parse.urlencode({"q": q, "k": k}))
    return status, json.loads(body.decode("utf-8"))


def chrome():
    """Headless Chromium under selenium; fails (never skips) when the set-up did not install it."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.isfile(p)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: run `bash .ci/setup.sh` (as root it installs the Debian "
                    f"packages chromium and chromium-driver); the search page's browser test needs them")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: run `bash .ci/setup.sh` (pip install -e '.[test]')")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


def test_page_shows_the_expected_first_result(server, reference):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    assert server["host"] == "127.0.0.1" and server["count"] == len(reference["ids"])
    driver = chrome()
    try:
        driver.get(server["url"])
        WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#k option"))
        box = driver.find_element(By.ID, "q")
        box.send_keys(reference["query"] + Keys.ENTER)
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".hit"))
        hits = driver.find_elements(By.CSS_SELECTOR, ".hit")
        assert len(hits) == min(10, server["count"])
        first = hits[0]
        key = first.get_attribute("data-key")
        want = reference["image_ids"][0]
        assert key.rpartition("#")[2] == f"{want:05d}0", (key, want)         # the first sample of that image
        row = int(first.get_attribute("data-row"))
        img = first.find_element(By.TAG_NAME, "img")
        assert img.get_attribute("src") == f"{server['url']}thumb/{row}"
        WebDriverWait(driver, 20).until(lambda d: d.execute_script(
            "const i = document.querySelector('.hit img'); return i.complete && i.naturalWidth > 0"))
        assert driver.execute_script("return document.querySelector('.hit img').naturalWidth") == 40  # 40 px image
        # the caption: score and the image's query texts, the hostile one shown as text
        status, data = search(server, reference["query"], 10)
        assert status == 200 and row == data["hits"][0]["row"]                # the page agrees with the API
        assert data["hits"][0]["score"] == pytest.approx(reference["scores"][0], abs=1e-4)
        assert f"{data['hits'][0]['score']:.4f}" in first.text
        assert TEXTS[want] in first.text and HOSTILE in first.text
        assert not driver.find_elements(By.ID, "pwn") and driver.title != "pwned"
    finally:
        driver.quit()


def test_json_api_equals_brute_force(server, reference):
    k = server["count"]
    status, data = search(server, reference["query"], k)
    assert status == 200 and data["query"] == reference["query"] and data["k"] == k and data["ms"] >= 0
    assert [h["rank"] for h in data["hits"]] == list(range(1, k + 1))
    # every image once, each with the score computed here, in descending order (near-ties may swap places)
    ref_score = dict(zip(reference["image_ids"], reference["scores"]))
    assert sorted(h["image_id"] for h in data["hits"]) == sorted(ref_score)
    np.testing.assert_allclose([h["score"] for h in data["hits"]], [ref_score[h["image_id"]] for h in data["hits"]],
                               atol=1e-4)
    assert all(a["score"] >= b["score"] for a, b in zip(data["hits"], data["hits"][1:]))
    assert data["hits"][0]["image_id"] == reference["image_ids"][0]
    assert data["hits"][0]["queries"][0] == [TEXTS[reference["image_ids"][0]], 5.0]
    status, headers, body = get(server, "/info")
    assert status == 200 and json.loads(body)["count"] == k
    status, headers, body = get(server, f"/thumb/{data['hits'][0]['row']}")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    assert headers["x-content-type-options"] == "nosniff" and "max-age" in headers["cache-control"]
    status, headers, body = get(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b'id="q"' in body
    assert b"http://" not in body and b"https://" not in body                # self-contained page


def test_bad_queries_get_400(server):
    n = server["count"]
    for path in ("/search?q=", "/search?q=%20%20", "/search", "/search?q=x&k=0", "/search?q=x&k=-1",
                 "/search?q=x&k=abc", "/search?q=x&k=1.5", f"/search?q=x&k={n + 1}", "/search?q=x&k=101",
                 "/search?q=%FF%FE"):
        status, headers, body = get(server, path)
        assert status == 400, (path, status, body)
        assert headers["content-type"].startswith("application/json") and json.loads(body)["error"], path


def test_paths_outside_the_index_are_refused(server):
    for path in ("/thumb/999999", f"/thumb/{server['count']}", "/thumb/-1", "/thumb/1x", "/thumb/", "/thumb/0/",
                 "/../../etc/passwd", "/thumb/../../etc/passwd", "/thumb/..%2F..%2Fetc%2Fpasswd",
                 "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd", "/static/../../etc/passwd", "/etc/passwd",
                 "/info/../../../etc/passwd", "/index.json", "/meta.jsonl", "/search/../../etc/passwd",
                 "/thumb/%30", "/thumb/%D9%A1"):
        status, _, body = get(server, path)
        assert status == 404, (path, status)
        assert b"root:" not in body and b"/bin/" not in body, path


def test_concurrent_queries_equal_sequential(server, reference):
    queries = [(q, k) for q in CANDIDATE_QUERIES[:8] for k in (1, 3, 5)]
    sequential = {qk: search(server, *qk) for qk in queries}
    with ThreadPoolExecutor(8) as pool:
        concurrent = dict(zip(queries, pool.map(lambda qk: search(server, *qk), queries)))
    for qk in queries:
        s1, d1 = sequential[qk]
        s2, d2 = concurrent[qk]
        assert s1 == s2 == 200, (qk, d1, d2)
        assert [h["row"] for h in d1["hits"]] == [h["row"] for h in d2["hits"]], qk
        np.testing.assert_allclose([h["score"] for h in d1["hits"]], [h["score"] for h in d2["hits"]], atol=1e-6)
        # and the first hit is the brute force's, where that one is clear
        row_scores = reference["scores_all"][CANDIDATE_QUERIES.index(qk[0])]
        two = np.sort(row_scores)[-2:]
        if two[1] - two[0] > 1e-3:
            assert d1["hits"][0]["image_id"] == reference["ids"][int(np.argmax(row_scores))], qk


def test_sigterm_stops_the_server(server):
    proc = server["proc"]
    assert proc.poll() is None, open(server["stderr"]).read()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, open(server["stderr"]).read()
    assert "Traceback" not in open(server["stderr"]).read()
