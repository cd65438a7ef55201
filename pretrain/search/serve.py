"""The search page and JSON API over an opened :class:`~pretrain.search.index.SearchIndex` (standard library only).

Routes (GET and HEAD; every other path is 404, and no request path ever reaches the file system: the only
bytes served are the page below, JSON, and thumbnails that the index returns for a row number)::

    /                      the search page (self-contained: inline CSS and JS, no external resource)
    /search?q=TEXT&k=K     {"query", "k", "hits": [...], "ms"}; 400 {"error"} for an empty q or a bad k
    /thumb/ROW             the JPEG thumbnail of index row ROW (decimal digits, in range)
    /info                  the index's index.json

The towers are loaded once (by ``SearchIndex.open``); requests run on daemon threads, and the text forward
runs under a lock (one query embedding at a time; the faiss search itself is read-only).
"""
from __future__ import annotations

import http.server
import json
import logging
import re
import signal
import socket
import threading
import time
from typing import Any, Callable, Dict, Optional
from urllib.parse import parse_qs

log = logging.getLogger(__name__)

MAX_K = 100
MAX_QUERY_CHARS = 1000
_THUMB_PATH = re.compile(r"/thumb/([0-9]{1,12})")      # ASCII digits only (\d would take other scripts' digits)

# Browser hardening for every response; the page's CSP allows only its own inline code, fetches and images.
_COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
             "connect-src 'self'; base-uri 'none'; form-action 'none'")

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Text-to-image search</title>
<link rel="icon" href="data:,">
<style>
 body { font-family: system-ui, "Noto Sans CJK SC", sans-serif; margin: 1.5em; color: #222; }
 form { display: flex; gap: .5em; align-items: center; flex-wrap: wrap; }
 #q { flex: 1 1 24em; font-size: 1.1em; padding: .35em; }
 #status { color: #666; margin: .8em 0; min-height: 1.2em; }
 #status.error { color: #b00020; }
 #results { display: flex; flex-wrap: wrap; gap: 12px; }
 .hit { width: 170px; border: 1px solid #ddd; border-radius: 4px; padding: 5px; font-size: .85em; }
 .hit img { width: 160px; height: 160px; object-fit: contain; background: #eee; display: block; }
 .score { font-weight: 600; margin-top: 3px; }
 .queries { color: #555; overflow-wrap: anywhere; }
 .key { color: #999; font-size: .8em; overflow-wrap: anywhere; }
</style>
</head>
<body>
<h1>Text-to-image search</h1>
<div id="info"></div>
<form id="form" autocomplete="off">
 <input id="q" name="q" type="search" placeholder="type a query, e.g. 红色圆形" autofocus>
 <label>k <select id="k" name="k"></select></label>
 <button id="go" type="submit">Search</button>
</form>
<div id="status"></div>
<div id="results"></div>
<script>
"use strict";
// Every text from the index or the user goes into the page through textContent or attributes, never as HTML.
const $ = (id) => document.getElementById(id);
let count = 0, latest = 0;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function fillK(n) {
  const sel = $("k"), want = new URLSearchParams(location.search).get("k") || "10";
  sel.replaceChildren();
  for (const v of [1, 5, 10, 20, 50, 100]) {
    if (v > n && v !== 1) continue;
    const o = el("option", null, String(v));
    o.value = String(v);
    sel.appendChild(o);
  }
  if (n < 100 && ![1, 5, 10, 20, 50].includes(n)) {
    const o = el("option", null, "all (" + n + ")");
    o.value = String(n);
    sel.appendChild(o);
  }
  const values = [...sel.options].map((o) => o.value);
  sel.value = values.includes(want) ? want : values[Math.min(2, values.length - 1)];
}

function render(data) {
  const box = $("results");
  box.replaceChildren();
  for (const h of data.hits) {
    const row = Number(h.row);
    if (!Number.isInteger(row) || row < 0) continue;
    const card = el("div", "hit");
    card.id = "hit-" + h.rank;
    card.dataset.row = String(row);
    card.dataset.rank = String(h.rank);
    card.dataset.key = String(h.key);
    card.dataset.score = String(h.score);
    const img = el("img", "thumb");
    img.src = "/thumb/" + row;
    img.alt = String(h.key);
    card.appendChild(img);
    card.appendChild(el("div", "score", "#" + h.rank + "  " + Number(h.score).toFixed(4)));
    const qs = (h.queries || []).slice(0, 3).map((q) => String(q[0]) + " (" + q[1] + ")");
    card.appendChild(el("div", "queries", qs.join("; ")));
    card.appendChild(el("div", "key", String(h.key)));
    box.appendChild(card);
  }
}

async function search() {
  const q = $("q").value.trim(), k = $("k").value;
  if (!q) { setStatus("type a query", true); return; }
  const mine = ++latest;
  setStatus("searching…", false);
  history.replaceState(null, "", "?q=" + encodeURIComponent(q) + "&k=" + encodeURIComponent(k));
  try {
    const r = await fetch("/search?q=" + encodeURIComponent(q) + "&k=" + encodeURIComponent(k));
    const data = await r.json();
    if (mine !== latest) return;                    // a newer query was sent meanwhile
    if (!r.ok) { $("results").replaceChildren(); setStatus(data.error || ("HTTP " + r.status), true); return; }
    render(data);
    setStatus(data.hits.length + " images for “" + data.query + "” in " + data.ms + " ms", false);
  } catch (e) {
    if (mine === latest) setStatus("request failed: " + e, true);
  }
}

$("form").addEventListener("submit", (ev) => { ev.preventDefault(); search(); });

fetch("/info").then((r) => r.json()).then((info) => {
  count = Number(info.count) || 0;
  const kind = info.index && info.index.kind ? info.index.kind : "?";
  $("info").textContent = count + " images, index " + kind
    + (info.recall_at_10 !== undefined ? ", recall@10 " + Number(info.recall_at_10).toFixed(3) : "");
  fillK(count);
  const q = new URLSearchParams(location.search).get("q");
  if (q) { $("q").value = q; search(); }
}).catch((e) => setStatus("cannot read /info: " + e, true));
</script>
</body>
</html>
"""


class SearchServer(http.server.ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the index and the locks (daemon threads: a hung client never blocks exit)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, index):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.index = index
        self.search_lock = threading.Lock()          # one text forward at a time
        self.thumb_lock = threading.Lock()           # the index caches part arrays on first use
        super().__init__(address, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: SearchServer
    server_version = "wenlan-search/1"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # -------------------------------------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**_COMMON_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        body = json.dumps(data, ensure_ascii=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", {"Cache-Control": "no-store"})

    def _not_found(self) -> None:
        self._json(404, {"error": "not found"})

    # -------------------------------------------------------------------------------------------- routes
    def do_GET(self) -> None:
        # Route on the raw request path: nothing is decoded or normalised before matching, so '..', '%2F' or
        # a second slash can only make a path not match (404).
        path, _, query = self.path.partition("?")
        try:
            if path == "/":
                self._send(200, PAGE.encode("utf-8"), "text/html; charset=utf-8",
                           {"Cache-Control": "no-cache", "Content-Security-Policy": _PAGE_CSP})
            elif path == "/search":
                self._search(query)
            elif path == "/info":
                self._json(200, self.server.index.info)
            else:
                m = _THUMB_PATH.fullmatch(path)
                if m:
                    self._thumb(int(m.group(1)))
                else:
                    self._not_found()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # noqa: BLE001 - one bad request must not take the server down
            log.exception("error answering %s", self.path)
            try:
                self._json(500, {"error": "internal error (see the server's log)"})
            except OSError:
                pass

    do_HEAD = do_GET

    def _search(self, query: str) -> None:
        from .index import SearchIndexError

        try:
            params = parse_qs(query, keep_blank_values=True, encoding="utf-8", errors="strict")
        except (UnicodeDecodeError, ValueError):
            return self._json(400, {"error": "the query string is not valid UTF-8"})
        text = (params.get("q") or [""])[0].strip()
        n = len(self.server.index)
        k_text = (params.get("k") or [str(min(10, n))])[0].strip()
        if not text:
            return self._json(400, {"error": "the query is empty: give some text to search for (?q=...)"})
        if len(text) > MAX_QUERY_CHARS:
            return self._json(400, {"error": f"the query is longer than {MAX_QUERY_CHARS} characters"})
        top = min(MAX_K, n)
        if not re.fullmatch(r"[0-9]{1,4}", k_text) or not 1 <= int(k_text) <= top:
            return self._json(400, {"error": f"k must be a whole number from 1 to {top} "
                                             f"(the index holds {n} images), got {k_text!r}"})
        k = int(k_text)
        t0 = time.perf_counter()
        try:
            with self.server.search_lock:
                hits = self.server.index.search(text, k)
        except SearchIndexError as e:
            return self._json(400, {"error": str(e)})
        ms = round((time.perf_counter() - t0) * 1000, 1)
        self._json(200, {"query": text, "k": k, "hits": hits, "ms": ms})

    def _thumb(self, row: int) -> None:
        from .index import SearchIndexError

        if not 0 <= row < len(self.server.index):
            return self._not_found()
        try:
            with self.server.thumb_lock:
                data = self.server.index.thumbnail(row)
        except SearchIndexError:
            return self._not_found()
        self._send(200, data, "image/jpeg", {"Cache-Control": "public, max-age=3600"})


def make_server(index, host: str = "127.0.0.1", port: int = 0) -> SearchServer:
    """A bound (not yet serving) server; ``server.server_address[1]`` is the port (a free one for ``port=0``)."""
    return SearchServer((host, port), index)


def server_url(server: SearchServer) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(index, host: str = "127.0.0.1", port: int = 0, ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve until SIGINT or SIGTERM (then return normally). Once listening, calls ``ready(url)``, or without
    ``ready`` prints the one line ``serving http://HOST:PORT/ (N images) - Ctrl-C to stop`` (flushed), from
    which a caller that passed ``port=0`` reads the port."""
    server = make_server(index, host, port)
    url = server_url(server)
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        # shutdown() waits for serve_forever to return, so it must run on another thread than this one
        if not stop.is_set():
            stop.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        if ready is not None:
            ready(url)
        else:
            print(f"serving {url} ({len(index)} images) - Ctrl-C to stop", flush=True)
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped serving %s", url)
