"""A text-to-image search index over WebDataset shards: the embedding pass, the index files, the searcher.

Layout of an index folder (``tools/index.py build --out INDEX``)::

    parts/NNNNN-HASH.npz     one per shard (NNNNN = the shard's position in the sorted shard list): the image
                             embeddings (float32, L2-normalised), image ids, and JPEG thumbnails of the shard's
                             distinct images; written atomically, so a killed build resumes shard by shard
    parts/NNNNN-HASH.json    its metadata: the shard URL, per image the sample key and the first query texts
                             with their clicks, skip counts, the export's checksum (the part's completion mark)
    rows.npz                 per index row: its part, its row in the part, its image id
    meta.jsonl               per index row, one JSON line: key, image_id, queries [[text, clicks], ...]
    meta.offsets.npy         byte offset of every line of meta.jsonl
    index.faiss              the faiss index (row ids = index rows)
    index.json               what was built: export and its checksum, count, dim, the index kind and its
                             parameters, recall@10 against exact search, times; written last, atomically

An image (``image_id`` of the shard contract) that occurs in several samples or shards is indexed once, at its
first occurrence in shard order; its query texts and clicks are gathered from all of them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
THUMB_SIZE = 160
QUERIES_KEPT = 5


class SearchIndexError(ValueError):
    """A one-line user-facing error (bad index, other export, bad query)."""


# ----------------------------------------------------------------------------------------------- export
def export_checksum(export_dir: str) -> str:
    """sha256 over the export's tower weights (every ``*.safetensors`` file, by name): which towers made the
    embeddings. Two exports with the same weights have the same checksum wherever they lie."""
    if not os.path.isdir(export_dir):
        raise SearchIndexError(f"export folder {export_dir} does not exist (tools/export.py writes one)")
    names = sorted(n for n in os.listdir(export_dir) if n.endswith(".safetensors"))
    if not names:
        raise SearchIndexError(f"{export_dir} holds no *.safetensors tower weights: is it an export folder?")
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
        with open(os.path.join(export_dir, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def load_towers(export_dir: str, device: str = "cpu"):
    """``(model, tokenizer, transform, max_length)`` of any export (pretraining or VSE), in eval mode."""
    from ..vse.model import load_vse_export

    try:
        model, tokenizer, transform, max_length, _ = load_vse_export(export_dir, device)
    except (OSError, KeyError, ValueError) as e:
        raise SearchIndexError(f"cannot load the export {export_dir}: {type(e).__name__}: {e}") from None
    return model, tokenizer, transform, max_length


def embed_query_texts(model, tokenizer, max_length: int, texts: Sequence[str], batch_size: int = 64,
                      device: str = "cpu") -> np.ndarray:
    """Q x D float32 text embeddings (padding to max_length, as the evaluation does)."""
    import torch

    rows = []
    with torch.no_grad():      # a Hugging Face tokenizer, or the WordVocab of a GRU export (raw strings both)
        for s in range(0, len(texts), batch_size):
            chunk = list(texts[s:s + batch_size])
            tok = tokenizer(chunk, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
            rows.append(model.text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu())
    dim = rows[0].shape[1] if rows else 0
    return torch.cat(rows).numpy() if rows else np.zeros((0, dim), np.float32)


# ----------------------------------------------------------------------------------------------- parts
def part_name(position: int, url: str) -> str:
    return f"{position:05d}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def _atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _thumbnail(img, size: int) -> bytes:
    t = img.copy()
    t.thumbnail((size, size))
    buf = io.BytesIO()
    t.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _add_query(queries: Dict[str, List], text: str, clicks: float) -> None:
    entry = queries.get(text)
    if entry is None:
        queries[text] = [text, clicks]
    else:
        entry[1] += clicks


def _top_queries(queries: Dict[str, List], n: int = QUERIES_KEPT) -> List[List]:
    """The n queries with most clicks (ties: first seen first)."""
    ranked = sorted(enumerate(queries.values()), key=lambda e: (-e[1][1], e[0]))
    return [[q, float(c)] for _, (q, c) in ranked[:n]]


def embed_shard(model, transform, url: str, position: int, out_dir: str, checksum: str, *, batch_size: int = 64,
                thumb_size: int = THUMB_SIZE, device: str = "cpu") -> Dict[str, Any]:
    """Embed the distinct images of one shard into ``out_dir/parts/NNNNN-HASH.{npz,json}`` (atomically; the
    JSON, written last, marks the part complete). Returns the part's JSON data."""
    import torch

    from ..data.samples import decode_image, read_shard, sample_fields

    name = part_name(position, url)
    counts: Dict[str, int] = {"samples": 0}
    first: Dict[int, int] = {}                     # image_id -> row in this part
    keys: List[str] = []
    ids: List[int] = []
    queries: List[Dict[str, List]] = []
    thumbs: List[bytes] = []
    emb: List[np.ndarray] = []
    pending: List[Any] = []

    def flush() -> None:
        if pending:
            with torch.no_grad():
                emb.append(model.image(torch.stack(pending).to(device)).float().cpu().numpy())
            pending.clear()

    for item in read_shard(url):
        if item.reason:
            counts[item.reason] = counts.get(item.reason, 0) + 1
            continue
        counts["samples"] += 1
        rec = item.record
        fields = sample_fields(rec)
        iid = int(fields["image_id"])
        row = first.get(iid)
        if row is None:
            try:
                img = decode_image(rec.image)
            except Exception:  # noqa: BLE001 - Pillow raises many kinds on corrupt data
                counts["bad_image"] = counts.get("bad_image", 0) + 1
                continue
            row = first[iid] = len(keys)
            keys.append(rec.key.rpartition("#")[2])
            ids.append(iid)
            queries.append({})
            thumbs.append(_thumbnail(img, thumb_size) if thumb_size > 0 else b"")
            pending.append(transform(img))
            if len(pending) == batch_size:
                flush()
        _add_query(queries[row], rec.text, fields["clicks"])
    flush()
    vectors = np.concatenate(emb) if emb else np.zeros((0, 0), np.float32)
    offsets = np.zeros(len(thumbs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(t) for t in thumbs])
    os.makedirs(os.path.join(out_dir, "parts"), exist_ok=True)
    base = os.path.join(out_dir, "parts", name)
    _atomic_write(base + ".npz", lambda f: np.savez(f, emb=vectors.astype(np.float32), image_id=np.array(ids, np.int64),
                                                    thumb_offsets=offsets,
                                                    thumbs=np.frombuffer(b"".join(thumbs), np.uint8)))
    data = {"format": FORMAT, "url": url, "position": position, "name": name, "export_checksum": checksum,
            "images": len(keys), "dim": int(vectors.shape[1]) if len(keys) else None, "counts": counts,
            "keys": keys, "queries": [_top_queries(q) for q in queries]}
    _atomic_write(base + ".json", lambda f: f.write(json.dumps(data, ensure_ascii=False).encode("utf-8")))
    return data


def read_part_json(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def complete_parts(folder: str) -> Dict[int, Dict[str, Any]]:
    """position -> part JSON of the complete parts of ``folder/parts`` (a part whose npz is missing is not)."""
    parts_dir = os.path.join(folder, "parts")
    out: Dict[int, Dict[str, Any]] = {}
    if not os.path.isdir(parts_dir):
        return out
    for name in sorted(os.listdir(parts_dir)):
        if not name.endswith(".json") or ".tmp" in name:
            continue
        base = os.path.join(parts_dir, name[:-5])
        if not os.path.isfile(base + ".npz"):
            continue
        try:
            data = read_part_json(base + ".json")
        except (OSError, ValueError):
            continue
        data["_folder"] = folder
        out[int(data["position"])] = data
    return out


def check_parts_export(parts: Dict[int, Dict[str, Any]], checksum: str, where: str) -> None:
    other = sorted({p["export_checksum"] for p in parts.values()} - {checksum})
    if other:
        raise SearchIndexError(f"{where} holds embeddings of another export (checksum {other[0]}, this export "
                               f"{checksum}): use a new --out folder, or the export that built it")


# ----------------------------------------------------------------------------------------------- assembly
@dataclass
class _Rows:
    part: np.ndarray        # int32: index into the sorted part list
    local: np.ndarray       # int32: row inside that part
    image_id: np.ndarray    # int64


def _load_part_array(part: Dict[str, Any], key: str) -> np.ndarray:
    """One array of a part (an npz member is read on its own: the thumbnails stay on disk)."""
    with np.load(os.path.join(part["_folder"], "parts", part["name"] + ".npz")) as z:
        return z[key]


def _vector_chunks(parts: List[Dict[str, Any]], rows: _Rows) -> Iterator[np.ndarray]:
    """The index's vectors in row order, one chunk per part (one part's embeddings in memory at a time)."""
    for p, part in enumerate(parts):
        sel = rows.local[rows.part == p]
        if sel.size:
            yield np.ascontiguousarray(_load_part_array(part, "emb")[sel], dtype=np.float32)


def assemble(parts: List[Dict[str, Any]], out_dir: str, *, export_dir: str, checksum: str, memory_bytes: int,
             target_recall: float = 0.95, recall_queries: int = 500, exact_below: int = 50_000, threads: int = 0,
             model=None, tokenizer=None, max_length: int = 0, seed: int = 0, extra: Optional[Dict[str, Any]] = None
             ) -> Dict[str, Any]:
    """Rows, metadata, the faiss index and ``index.json`` from complete parts (sorted by shard position)."""
    import faiss

    from . import ann

    t0 = time.time()
    parts = sorted(parts, key=lambda p: p["position"])
    dims = {p["dim"] for p in parts if p["images"]}
    if not dims:
        raise SearchIndexError("no image of the shards could be read: nothing to index")
    if len(dims) > 1:
        raise SearchIndexError(f"the parts have different embedding dimensions {sorted(dims)}")
    dim = dims.pop()
    # rows: the first occurrence of every image id, in shard order; metadata gathered over all occurrences
    where: Dict[int, int] = {}
    r_part: List[int] = []
    r_local: List[int] = []
    r_ids: List[int] = []
    r_queries: List[Dict[str, List]] = []
    r_keys: List[str] = []
    duplicates = 0
    for p, part in enumerate(parts):
        if not part["images"]:
            continue
        ids = _load_part_array(part, "image_id")
        for j, iid in enumerate(ids.tolist()):
            row = where.get(iid)
            if row is None:
                row = where[iid] = len(r_ids)
                r_part.append(p)
                r_local.append(j)
                r_ids.append(iid)
                r_keys.append(part["url"] + "#" + part["keys"][j])
                r_queries.append({})
            else:
                duplicates += 1
            for text, clicks in part["queries"][j]:
                _add_query(r_queries[row], text, clicks)
    rows = _Rows(np.array(r_part, np.int32), np.array(r_local, np.int32), np.array(r_ids, np.int64))
    n = len(r_ids)
    np.savez(os.path.join(out_dir, "rows.npz"), part=rows.part, local=rows.local, image_id=rows.image_id)
    offsets = np.zeros(n, np.int64)
    with open(os.path.join(out_dir, "meta.jsonl"), "wb") as f:
        for i in range(n):
            offsets[i] = f.tell()
            f.write(json.dumps({"key": r_keys[i], "image_id": r_ids[i], "queries": _top_queries(r_queries[i])},
                               ensure_ascii=False).encode("utf-8") + b"\n")
    np.save(os.path.join(out_dir, "meta.offsets.npy"), offsets)
    sample_texts = sorted({q[0] for qs in r_queries for q in qs.values()})
    del r_queries, r_keys, where

    # the index: planned by size and memory, trained on a sample, filled part by part
    plan = ann.plan_index(n, dim, memory_bytes, exact_below=exact_below)
    rng = np.random.default_rng(seed)
    want = min(ann.train_sample_size(plan, n), n)
    train = None
    if want:
        pick = np.sort(rng.choice(n, size=want, replace=False))
        train = np.concatenate(list(_chunks_subset(parts, rows, pick)))
    t_build = time.time()
    index = ann.build_index(plan, _vector_chunks(parts, rows), train, threads=threads)
    del train
    build_s = time.time() - t_build
    # recall@10 against exact search, on real query texts of the collection (images when it has too few)
    k = min(10, n)
    if model is not None and sample_texts:
        idx = rng.choice(len(sample_texts), size=min(recall_queries, len(sample_texts)), replace=False)
        queries = embed_query_texts(model, tokenizer, max_length, [sample_texts[i] for i in sorted(idx)])
        query_source = "query texts"
    else:
        pick = np.sort(rng.choice(n, size=min(recall_queries, n), replace=False))
        queries = np.concatenate(list(_chunks_subset(parts, rows, pick)))
        query_source = "images"
    _, true_ids = ann.exact_topk(queries, _vector_chunks(parts, rows), k)
    tuned = ann.tune(index, queries, true_ids, k=k, target=target_recall)
    ann.apply_params(index, tuned["params"])
    _atomic_write(os.path.join(out_dir, "index.faiss"), lambda f: f.write(faiss.serialize_index(index).tobytes()))
    info = {"format": FORMAT, "export": os.path.abspath(export_dir), "export_checksum": checksum, "count": n,
            "dim": dim, "duplicates_merged": duplicates, "shards": len(parts),
            "samples": int(sum(p["counts"].get("samples", 0) for p in parts)),
            "skipped": _sum_skips(parts), "index": plan, "search_params": tuned["params"],
            "recall_at_10": tuned["recall_at_10"], "recall_queries": int(queries.shape[0]),
            "recall_query_source": query_source, "target_recall": target_recall, "tuning": tuned.get("tried", []),
            "build_seconds": round(build_s, 3), "assemble_seconds": round(time.time() - t0, 3),
            "parts": [{"folder": os.path.relpath(p["_folder"], out_dir), "name": p["name"], "url": p["url"],
                       "images": p["images"]} for p in parts],
            "files": {name: os.path.getsize(os.path.join(out_dir, name))
                      for name in ("index.faiss", "rows.npz", "meta.jsonl", "meta.offsets.npy")}}
    info.update(extra or {})
    _atomic_write(os.path.join(out_dir, "index.json"),
                  lambda f: f.write(json.dumps(info, indent=1, ensure_ascii=False).encode("utf-8")))
    return info


def _chunks_subset(parts: List[Dict[str, Any]], rows: _Rows, pick: np.ndarray) -> Iterator[np.ndarray]:
    """Vectors of the index rows ``pick`` (sorted), part by part."""
    for p, part in enumerate(parts):
        in_part = np.nonzero(rows.part == p)[0]
        sel = np.intersect1d(in_part, pick, assume_unique=True)
        if sel.size:
            yield _load_part_array(part, "emb")[rows.local[sel]].astype(np.float32)


def _sum_skips(parts: List[Dict[str, Any]]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for p in parts:
        for k, v in p["counts"].items():
            if k != "samples" and v:
                out[k] = out.get(k, 0) + int(v)
    return out


# ----------------------------------------------------------------------------------------------- search
class SearchIndex:
    """An index folder opened for search: the faiss index, the metadata and the export's towers (loaded once).

    ``search`` is safe to call from several threads (the towers run under a lock; faiss searches are
    thread-safe for reading)."""

    def __init__(self, path: str, info: Dict[str, Any], index, rows: Dict[str, np.ndarray], offsets: np.ndarray,
                 towers: Tuple[Any, Any, Any, int], device: str):
        import threading

        self.path, self.info, self.index, self.rows, self.offsets = path, info, index, rows, offsets
        self.model, self.tokenizer, self.transform, self.max_length = towers
        self.device = device
        self._lock = threading.Lock()
        self._parts: Dict[int, Dict[str, np.ndarray]] = {}
        self.parts = info["parts"]

    @classmethod
    def open(cls, path: str, device: str = "cpu", export: Optional[str] = None) -> "SearchIndex":
        info = read_index_info(path)
        export_dir = export or info["export"]
        checksum = export_checksum(export_dir)
        if checksum != info["export_checksum"]:
            raise SearchIndexError(f"index {path} was built by another export (checksum {info['export_checksum']}, "
                                   f"{export_dir} has {checksum}): rebuild it with tools/index.py build")
        import faiss

        from . import ann

        with open(os.path.join(path, "index.faiss"), "rb") as f:
            index = faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))
        ann.apply_params(index, info.get("search_params") or {})
        with np.load(os.path.join(path, "rows.npz")) as z:
            rows = {k: z[k] for k in z.files}
        offsets = np.load(os.path.join(path, "meta.offsets.npy"))
        towers = load_towers(export_dir, device)
        dim = embed_query_texts(towers[0], towers[1], towers[3], ["probe"], device=device).shape[1]
        if dim != info["dim"] or index.d != info["dim"]:
            raise SearchIndexError(f"index {path} holds {index.d}-d embeddings, the export {export_dir} gives {dim}-d: "
                                   f"rebuild the index with this export")
        return cls(path, info, index, rows, offsets, towers, device)

    def __len__(self) -> int:
        return int(self.info["count"])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            return embed_query_texts(self.model, self.tokenizer, self.max_length, texts, device=self.device)

    def search(self, text: str, k: int = 10) -> List[Dict[str, Any]]:
        return self.search_many([text], k)[0]

    def search_many(self, texts: Sequence[str], k: int = 10) -> List[List[Dict[str, Any]]]:
        from . import ann

        k = check_k(k, len(self))
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise SearchIndexError("the query is empty: give some text to search for")
        q = self.embed([t.strip() for t in texts])
        scores, ids = ann.search(self.index, q, k)
        return [[dict(rank=r + 1, row=int(i), score=float(s), **self.meta(int(i)))
                 for r, (s, i) in enumerate(zip(srow.tolist(), irow.tolist())) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def meta(self, row: int) -> Dict[str, Any]:
        self._check_row(row)
        with open(os.path.join(self.path, "meta.jsonl"), "rb") as f:
            f.seek(int(self.offsets[row]))
            return json.loads(f.readline().decode("utf-8"))

    def _check_row(self, row: int) -> None:
        if not isinstance(row, (int, np.integer)) or not 0 <= int(row) < len(self):
            raise SearchIndexError(f"row {row} is not in the index (0..{len(self) - 1})")

    def thumbnail(self, row: int) -> bytes:
        """JPEG thumbnail of the row's image (from the part that embedded it)."""
        self._check_row(row)
        p, local = int(self.rows["part"][row]), int(self.rows["local"][row])
        arrays = self._parts.get(p)
        if arrays is None:
            part = self.parts[p]
            with np.load(os.path.join(self.path, part["folder"], "parts", part["name"] + ".npz")) as z:
                arrays = {"thumb_offsets": z["thumb_offsets"], "thumbs": z["thumbs"]}
            self._parts[p] = arrays
        a, b = int(arrays["thumb_offsets"][local]), int(arrays["thumb_offsets"][local + 1])
        if b > a:
            return arrays["thumbs"][a:b].tobytes()
        return self._thumbnail_from_shard(row)

    def _thumbnail_from_shard(self, row: int) -> bytes:
        """Built with --thumb-size 0: read the image from its shard (sequentially) and shrink it."""
        from ..data import iter_samples, open_shard
        from ..data.samples import IMAGE_EXTS, decode_image

        url, _, key = self.meta(row)["key"].rpartition("#")
        with open_shard(url) as stream:
            for k, members in iter_samples(stream):
                if k == key:
                    ext = next((e for e in IMAGE_EXTS if e in members), None)
                    if ext:
                        return _thumbnail(decode_image(members[ext]), THUMB_SIZE)
        raise SearchIndexError(f"the image of row {row} is no longer in {url}")


def check_k(k, n: int) -> int:
    try:
        k_int = int(k)
    except (TypeError, ValueError):
        raise SearchIndexError(f"k must be a whole number, got {k!r}") from None
    if str(k).strip() != str(k_int) and not isinstance(k, int):
        raise SearchIndexError(f"k must be a whole number, got {k!r}")
    if not 1 <= k_int <= min(n, 1000):
        raise SearchIndexError(f"k must be between 1 and {min(n, 1000)} (the index holds {n} images), got {k}")
    return k_int


def read_index_info(path: str) -> Dict[str, Any]:
    """index.json of a complete index, or a SearchIndexError saying what is missing."""
    if not os.path.isdir(path):
        raise SearchIndexError(f"index folder {path} does not exist (tools/index.py build --out {path} makes it)")
    meta_path = os.path.join(path, "index.json")
    if not os.path.isfile(meta_path):
        has_parts = os.path.isdir(os.path.join(path, "parts"))
        raise SearchIndexError(f"{path} is not a complete index (no index.json"
                               + ("; its build was interrupted: run the same tools/index.py build again to finish it)"
                                  if has_parts else ")"))
    try:
        with open(meta_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise SearchIndexError(f"{meta_path} cannot be read: {e}") from None
    for name, size in (info.get("files") or {}).items():
        fp = os.path.join(path, name)
        if not os.path.isfile(fp) or os.path.getsize(fp) != size:
            raise SearchIndexError(f"index {path} is damaged: {name} is missing or has another size than when built; "
                                   f"rebuild it")
    for part in info.get("parts", []):
        if not os.path.isfile(os.path.join(path, part["folder"], "parts", part["name"] + ".npz")):
            raise SearchIndexError(f"index {path} is damaged: part {part['name']} ({part['url']}) is missing; "
                                   f"rebuild it")
    return info
