#!/usr/bin/env python
"""Text-to-image search over shards with an export's towers: build an index, search it, serve it.

  build   embed every image of the shards with the export's image tower and write a faiss index chosen by the
          collection's size and --memory (exact for small collections, IVF with or without quantisation above),
          its metadata (sample key, image id, the first query texts and clicks of every image) and index.json,
          which ends with the index's recall@10 against exact search. Resumable: a killed build, run again,
          embeds only the shards it had not finished. Several processes share the shards
          (``deepspeed --num_gpus N tools/index.py build ...`` or torchrun); ``--range A:B --parts-only`` embeds
          shards A..B-1 only (one task of a cluster job), and ``merge`` makes one index of such folders.
  merge   one index from the part folders of several ``build --parts-only`` runs (the same shard list).
  search  top-k images of a text query: keys, scores, metadata; --json; --grid PNG (a contact sheet).
  eval    text-to-image hit@1/5/10 through the index on held-out shards (the search protocol of
          tools/evaluate_retrieval.py, restricted to the images in the index).
  serve   an HTTP JSON API (/search?q=...&k=...) and a search page, on localhost unless --host says otherwise.

  python tools/index.py build --export exports/demo --shards data/demo/shards/val --out indexes/demo
  python tools/index.py search --index indexes/demo "红色圆形" -k 5 --grid top5.png
  python tools/index.py serve --index indexes/demo --port 8080

Errors (a bad index, an index of another export, an empty query, a bad k) are one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("index")


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _shard_list(spec: str) -> List[str]:
    from pretrain.data import expand_urls

    shards = sorted({u for us, _ in expand_urls(spec) for u in us})
    if not shards:
        raise ValueError(f"no shard matches '{spec}'")
    return shards


def _parse_range(text: Optional[str], n: int) -> range:
    if not text:
        return range(n)
    a, sep, b = text.partition(":")
    try:
        start, stop = int(a or 0), int(b) if b else n
    except ValueError:
        raise ValueError(f"--range must be A:B (shard positions, B excluded), got '{text}'") from None
    if not sep or not 0 <= start < stop <= n:
        raise ValueError(f"--range {text} is not a non-empty A:B within the {n} shards (0:{n})")
    return range(start, stop)


def _eta(done: int, total: int, elapsed: float) -> str:
    if not done:
        return "?"
    s = elapsed / done * (total - done)
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


# ------------------------------------------------------------------------------------------------ build
def cmd_build(args) -> int:
    from pretrain import dist
    from pretrain.search.index import (SearchIndexError, check_parts_export, complete_parts, embed_shard,
                                       export_checksum, load_towers)

    _check_assembly_options(args)  # bad options fail before the embedding pass, not after it
    if args.batch_size < 1 or args.thumb_size < 0:
        raise ValueError(f"--batch-size must be >= 1 and --thumb-size >= 0, got {args.batch_size} and {args.thumb_size}")
    device = dist.start_tool(args.device)
    rank, world = dist.rank(), dist.world_size()
    checksum = export_checksum(args.export)
    shards = _shard_list(args.shards)
    todo_range = _parse_range(args.range, len(shards))
    done = complete_parts(args.out)
    check_parts_export(done, checksum, args.out)
    for pos, part in done.items():
        if pos >= len(shards) or shards[pos] != part["url"]:
            raise SearchIndexError(f"{args.out} was built from another shard list (part {part['name']} is "
                                   f"{part['url']}, shard {pos} is now {shards[pos] if pos < len(shards) else 'none'}): "
                                   f"use a new --out folder")
    if os.path.isfile(os.path.join(args.out, "index.json")) and rank == 0:
        with open(os.path.join(args.out, "index.json"), encoding="utf-8") as f:
            old = json.load(f)
        if old.get("export_checksum") != checksum:
            raise SearchIndexError(f"{args.out} is an index of another export (checksum {old.get('export_checksum')}, "
                                   f"this export {checksum}): use a new --out folder")
    os.makedirs(os.path.join(args.out, "parts"), exist_ok=True)
    todo = [p for p in todo_range if p not in done]
    mine = [p for i, p in enumerate(todo) if i % world == rank]
    if rank == 0:
        print(f"[index] {len(shards)} shards, positions {todo_range.start}..{todo_range.stop - 1}: "
              f"{len(todo_range) - len(todo)} already embedded, {len(todo)} to embed over {world} process(es)",
              flush=True)
    if mine:
        model, _, transform, _ = load_towers(args.export, device)
        t0, images = time.time(), 0
        for i, pos in enumerate(mine):
            part = embed_shard(model, transform, shards[pos], pos, args.out, checksum, batch_size=args.batch_size,
                               thumb_size=args.thumb_size, device=device)
            images += part["images"]
            el = time.time() - t0
            print(f"[index] rank {rank}: shard {i + 1}/{len(mine)} {shards[pos]}: {part['images']} images "
                  f"({images / max(el, 1e-9):.1f} images/s, ETA {_eta(i + 1, len(mine), el)})", flush=True)
    dist.barrier()
    if rank != 0:
        return 0
    parts = complete_parts(args.out)
    missing = [p for p in todo_range if p not in parts]
    if missing:
        raise SearchIndexError(f"shards {missing[:5]} were not embedded; run the build again to finish")
    if args.parts_only:
        print(f"[index] parts of shards {todo_range.start}..{todo_range.stop - 1} are in {args.out}/parts; "
              f"make the index with: tools/index.py merge --export {args.export} --out FINAL {args.out} ...")
        return 0
    chosen = [parts[p] for p in todo_range]
    return _assemble_and_report(chosen, args)


def _check_assembly_options(args) -> None:
    from pretrain.search import ann

    ann.parse_bytes(args.memory)
    if not 0 < args.target_recall <= 1:
        raise ValueError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    if args.recall_queries < 1 or args.exact_below < 0 or args.threads < 0:
        raise ValueError("--recall-queries must be >= 1, --exact-below and --threads >= 0")


def _assemble_and_report(parts: List[Dict[str, Any]], args) -> int:
    from pretrain.search import ann
    from pretrain.search.index import assemble, export_checksum, load_towers

    model, tokenizer, _, max_length = load_towers(args.export, "cpu")
    t0 = time.time()
    print(f"[index] assembling {len(parts)} parts ...", flush=True)
    info = assemble(parts, args.out, export_dir=args.export, checksum=export_checksum(args.export),
                    memory_bytes=ann.parse_bytes(args.memory), target_recall=args.target_recall,
                    recall_queries=args.recall_queries, exact_below=args.exact_below, threads=args.threads,
                    model=model, tokenizer=tokenizer, max_length=max_length)
    plan = info["index"]
    print(f"[index] {info['count']} distinct images from {info['samples']} samples of {info['shards']} shards; index {plan['kind']} ({plan.get('factory')}), "
          f"params {info['search_params']}; recall@10 vs exact {info['recall_at_10']:.4f} on "
          f"{info['recall_queries']} {info['recall_query_source']}; {time.time() - t0:.1f} s")
    print(f"[index] wrote {os.path.join(args.out, 'index.json')}")
    return 0


def cmd_merge(args) -> int:
    from pretrain.search.index import SearchIndexError, check_parts_export, complete_parts, export_checksum

    _check_assembly_options(args)
    checksum = export_checksum(args.export)
    merged: Dict[int, Dict[str, Any]] = {}
    for folder in args.folders:
        if not os.path.isdir(os.path.join(folder, "parts")):
            raise SearchIndexError(f"{folder} holds no parts/ folder (make it with tools/index.py build --parts-only)")
        parts = complete_parts(folder)
        check_parts_export(parts, checksum, folder)
        for pos, part in parts.items():
            other = merged.get(pos)
            if other is not None and other["url"] != part["url"]:
                raise SearchIndexError(f"shard position {pos} is {other['url']} in {other['_folder']} but {part['url']} "
                                       f"in {folder}: the folders were built from different shard lists")
            merged.setdefault(pos, part)
    if not merged:
        raise SearchIndexError("the folders hold no complete part")
    os.makedirs(os.path.join(args.out, "parts"), exist_ok=True)
    out_parts = []
    for pos in sorted(merged):
        part = merged[pos]
        for ext in (".npz", ".json"):
            src = os.path.join(part["_folder"], "parts", part["name"] + ext)
            dst = os.path.join(args.out, "parts", part["name"] + ext)
            if os.path.abspath(src) == os.path.abspath(dst):
                continue
            if os.path.exists(dst):
                os.remove(dst)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        out_parts.append(dict(part, _folder=args.out))
    positions = sorted(merged)
    gaps = sorted(set(range(positions[0], positions[-1] + 1)) - set(positions))
    if gaps:
        print(f"[index] warning: shard positions {gaps[:10]} are in none of the folders", file=sys.stderr)
    print(f"[index] merging {len(out_parts)} parts from {len(args.folders)} folders", flush=True)
    return _assemble_and_report(out_parts, args)


# ------------------------------------------------------------------------------------------------ search
def cmd_search(args) -> int:
    from pretrain.search.index import SearchIndex

    index = SearchIndex.open(args.index, export=args.export)
    hits = index.search(args.query, args.k)
    if args.grid:
        draw_sheet(index, args.query, hits, args.grid)
    if args.json:
        print(json.dumps({"query": args.query, "k": args.k, "hits": hits}, ensure_ascii=False, indent=1))
    else:
        for h in hits:
            qs = "; ".join(f"{q} ({c:g})" for q, c in h["queries"][:3])
            print(f"{h['rank']:>3}  {h['score']:.4f}  {h['key']}  image_id {h['image_id']}  queries: {qs}")
        if args.grid:
            print(f"wrote {args.grid}")
    return 0


def draw_sheet(index, query: str, hits: List[Dict[str, Any]], path: str) -> None:
    """A contact sheet: the query on top, then the hits' thumbnails in rows of 5 with rank, score, first query."""
    import io

    from PIL import Image, ImageDraw

    from pretrain.fonts import load_font

    font, _ = load_font(16)
    small, _ = load_font(12, warn=False)
    cell, gap, cols = 160, 10, max(1, min(5, len(hits)))
    rows = max(1, -(-len(hits) // cols))
    width = max(gap + cols * (cell + gap), 420)
    height = 40 + rows * (cell + 40 + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 10), f"query: {query}", fill="black", font=font)
    for j, h in enumerate(hits):
        x, y = gap + (j % cols) * (cell + gap), 40 + (j // cols) * (cell + 40 + gap)
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(235, 235, 235))
        img = Image.open(io.BytesIO(index.thumbnail(h["row"]))).convert("RGB")
        scale = cell / max(img.size)                                 # fit the cell (small images enlarged)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        canvas.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))
        draw.text((x, y + cell + 2), f"#{h['rank']}  {h['score']:.3f}", fill="black", font=small)
        first = h["queries"][0][0] if h["queries"] else ""
        draw.text((x, y + cell + 18), first if len(first) <= 22 else first[:21] + "…", fill=(90, 90, 90), font=small)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def cmd_eval(args) -> int:
    """t2i hit@k through the index: distinct held-out queries (first text of each query id, in reading order),
    relevant = the images they clicked that the index holds."""
    from pretrain.data import read_shard
    from pretrain.data.samples import sample_fields
    from pretrain.search import ann
    from pretrain.search.index import SearchIndex

    index = SearchIndex.open(args.index, export=args.export)
    indexed = set(index.rows["image_id"].tolist())
    first_text: Dict[int, str] = {}
    relevant: Dict[int, set] = {}
    for url in _shard_list(args.shards):
        for item in read_shard(url):
            if item.reason:
                continue
            f = sample_fields(item.record)
            qid, iid = int(f["query_id"]), int(f["image_id"])
            if iid not in indexed or f["clicks"] <= 0:
                continue
            first_text.setdefault(qid, item.record.text)
            relevant.setdefault(qid, set()).add(iid)
    if not first_text:
        return _fail(f"no held-out pair of '{args.shards}' has its image in the index {args.index}")
    qids = list(first_text)
    emb = index.embed([first_text[q] for q in qids])
    ks = (1, 5, 10)
    k = min(max(ks), len(index))
    _, ids = ann.search(index.index, emb, k)
    row_image = index.rows["image_id"]
    hits = {kk: 0 for kk in ks}
    for qi, q in enumerate(qids):
        got = [int(row_image[i]) if i >= 0 else None for i in ids[qi]]
        for kk in ks:
            hits[kk] += any(g in relevant[q] for g in got[:kk])
    metrics = {f"t2i_hit@{kk}": hits[kk] / len(qids) for kk in ks}
    out = {"index": os.path.abspath(args.index), "shards": args.shards, "queries": len(qids),
           "images": len(index), "index_kind": index.info["index"]["kind"], "metrics": metrics}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    print(f"search through the index: {len(qids)} queries, {len(index)} images ({out['index_kind']}) | "
          + " ".join(f"t2i hit@{kk} {metrics[f't2i_hit@{kk}']:.4f}" for kk in ks))
    return 0


def cmd_serve(args) -> int:
    from pretrain.search.index import SearchIndex
    from pretrain.search.serve import serve

    index = SearchIndex.open(args.index, export=args.export)
    serve(index, host=args.host, port=args.port)
    # Stopped by SIGINT/SIGTERM: nothing is left to write. Leave without running the C++ libraries' static
    # destructors, which can abort ("terminate called without an active exception") while a daemon request
    # thread is still inside a torch or faiss call.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    sub = p.add_subparsers(dest="cmd", required=True)

    def assembly_options(q):
        q.add_argument("--memory", default="4G", help="memory budget of the index in RAM (e.g. 2.5G, 800M): "
                       "decides exact vs IVF and the quantisation (default 4G)")
        q.add_argument("--target-recall", type=float, default=0.95,
                       help="search parameters (nprobe) are the cheapest reaching this recall@10 vs exact")
        q.add_argument("--recall-queries", type=int, default=500, help="queries measuring recall@10 (default 500)")
        q.add_argument("--exact-below", type=int, default=50_000,
                       help="collections smaller than this get an exact index (default 50000)")
        q.add_argument("--threads", type=int, default=0, help="faiss threads (0: all cores)")

    b = sub.add_parser("build", help="embed shards and write an index (resumable)")
    b.add_argument("--export", required=True, help="export folder (tools/export.py, or runs/vse_*/best)")
    b.add_argument("--shards", required=True, help="shards: paths, folders, brace patterns, fsspec URLs")
    b.add_argument("--out", required=True, help="index folder (created; a folder of an interrupted build resumes)")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--thumb-size", type=int, default=160, help="thumbnail side kept per image (0: none; the page "
                   "then reads images from the shards)")
    b.add_argument("--range", help="only shards A..B-1 of the sorted shard list (one task of a cluster job)")
    b.add_argument("--parts-only", action="store_true", help="embed only; make the index later with merge")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    assembly_options(b)
    b.set_defaults(func=cmd_build)

    m = sub.add_parser("merge", help="one index from the folders of several build --parts-only runs")
    m.add_argument("--export", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("folders", nargs="+")
    assembly_options(m)
    m.set_defaults(func=cmd_merge)

    s = sub.add_parser("search", help="top-k images of a text query")
    s.add_argument("--index", required=True)
    s.add_argument("query")
    s.add_argument("-k", "--k", type=int, default=10)
    s.add_argument("--json", action="store_true", help="print the hits as JSON")
    s.add_argument("--grid", help="write a contact sheet of the hits to this PNG")
    s.add_argument("--export", help="the export, when it has moved since the build (checked by checksum)")
    s.set_defaults(func=cmd_search)

    e = sub.add_parser("eval", help="t2i hit@1/5/10 through the index on held-out shards")
    e.add_argument("--index", required=True)
    e.add_argument("--shards", required=True)
    e.add_argument("--json", help="also write the metrics to this JSON file")
    e.add_argument("--export", help="the export, when it has moved since the build")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("serve", help="HTTP JSON API and search page")
    v.add_argument("--index", required=True)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default localhost only)")
    v.add_argument("--port", type=int, default=0, help="port (0: a free one, printed)")
    v.add_argument("--export", help="the export, when it has moved since the build")
    v.set_defaults(func=cmd_serve)

    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pretrain.search.index import SearchIndexError

    try:
        return args.func(args)
    except (SearchIndexError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
