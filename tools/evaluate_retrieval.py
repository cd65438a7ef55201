#!/usr/bin/env python
"""Retrieval evaluation of an export directory: a JSON of all metrics and a PNG grid of top-5 results.

Search protocol (held-out click-log shards): distinct queries and distinct images, graded relevance from
clicks (``build_pairs`` -> ``pair_retrieval_metrics``, both directions)::

    python tools/evaluate_retrieval.py --export exports/demo --shards data/demo/shards/val --out runs/eval_demo

VSE protocol (Karpathy-split JSON + images folder): ``vse_metrics`` on the split, plus the COCO 1K
protocol (5 folds of 1000) when the split has exactly 5000 images::

    python tools/evaluate_retrieval.py --export runs/vse_demo/best --karpathy-json data/vse_demo/dataset.json \\
        --images-root data/vse_demo --split test --out runs/eval_vse_demo

Several processes share the embedding work (``deepspeed --num_gpus N tools/evaluate_retrieval.py ...`` or
torchrun); rank 0 writes ``OUT/metrics.json`` and ``OUT/grid.png``: for a few queries (the query text above each
row) the top-5 images, green border = relevant, red = not, with their scores. The export may be a pretraining
export or a VSE model (``runs/vse_*/best``, GRU text encoders included).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Set, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

THUMB, BORDER, GAP, TEXT_H, SCORE_H = 112, 5, 8, 28, 18


def read_shard_samples(keys: Set[str]) -> Dict[str, Dict[str, bytes]]:
    """Raw members (``jpg``, ``txt``, ...) of the samples named ``"shard url#KEY"`` (as the loader's batches)."""
    from pretrain.data import iter_samples, open_shard

    by_url: Dict[str, Set[str]] = {}
    for k in keys:
        url, _, key = k.rpartition("#")
        by_url.setdefault(url, set()).add(key)
    out: Dict[str, Dict[str, bytes]] = {}
    for url, wanted in by_url.items():
        with open_shard(url) as stream:
            for key, members in iter_samples(stream):
                if key in wanted:
                    out[f"{url}#{key}"] = members
    return out


def _image_from_members(members: Dict[str, bytes]):
    from pretrain.data.samples import IMAGE_EXTS, decode_image

    ext = next((e for e in IMAGE_EXTS if e in members), None)
    return decode_image(members[ext]) if ext else None


def draw_grid(rows: Sequence[Tuple[str, List[Tuple[object, bool, float]]]], path: str) -> bool:
    """One row per query: its text above, then (image, relevant, score) thumbnails. Returns whether the font
    covers Chinese (a warning is printed when it does not)."""
    from PIL import Image, ImageDraw

    from pretrain.fonts import load_font

    font, cjk = load_font(16)
    small, _ = load_font(12, warn=False)
    k = max((len(r[1]) for r in rows), default=1)
    cell = THUMB + 2 * BORDER
    width = GAP + k * (cell + GAP)
    row_h = TEXT_H + cell + SCORE_H + GAP
    canvas = Image.new("RGB", (max(width, 320), GAP + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (text, hits) in enumerate(rows):
        y = GAP + r * row_h
        label = text if len(text) <= 60 else text[:57] + "..."
        draw.text((GAP, y + 4), label, fill="black", font=font)
        for j, (img, relevant, score) in enumerate(hits):
            x = GAP + j * (cell + GAP)
            colour = (30, 170, 50) if relevant else (215, 40, 40)
            draw.rectangle([x, y + TEXT_H, x + cell - 1, y + TEXT_H + cell - 1], fill=colour)
            if img is not None:
                scale = THUMB / max(img.size)                       # fit the cell (small images are enlarged)
                thumb = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
                canvas.paste(thumb, (x + BORDER + (THUMB - thumb.width) // 2, y + TEXT_H + BORDER + (THUMB - thumb.height) // 2))
            draw.text((x + 2, y + TEXT_H + cell + 2), f"#{j + 1}  {score:.3f}", fill=colour, font=small)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return cjk


def spaced(n: int, k: int) -> List[int]:
    """k positions spread evenly over range(n) (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return [round(i * (n - 1) / (k - 1)) if k > 1 else 0 for i in range(k)]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="export directory (tools/export.py, or runs/vse_*/best)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="held-out shards (search protocol): paths, brace patterns, fsspec URLs")
    src.add_argument("--karpathy-json", help="Karpathy-split JSON (VSE protocol); needs --images-root")
    p.add_argument("--images-root", help="folder that the JSON's filepath/filename are relative to")
    p.add_argument("--split", default="test", help="Karpathy split to evaluate (default test)")
    p.add_argument("--captions-per-image", type=int, default=5, help="first N captions of every image (0: all)")
    p.add_argument("--max-samples", type=int, default=0, help="shards: at most this many held-out pairs (0: all)")
    p.add_argument("--out", required=True, help="output folder: metrics.json, grid.png")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0, help="image-reading worker processes (Karpathy)")
    p.add_argument("--grid-queries", type=int, default=6, help="queries shown in grid.png (0: no grid)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.karpathy_json and not args.images_root:
        p.error("--karpathy-json needs --images-root")

    import torch

    from pretrain import dist
    from pretrain.eval.embed import embed_karpathy, embed_shards
    from pretrain.eval.retrieval import build_pairs, coco_1k_5fold, pair_retrieval_metrics, topk_chunked, vse_metrics
    from pretrain.metrics import setup_logging
    from pretrain.data.karpathy import read_karpathy
    from pretrain.vse.model import load_vse_export

    device = dist.start_tool(args.device)
    rank, world = dist.rank(), dist.world_size()
    setup_logging(rank)
    logging.getLogger("pretrain.data").setLevel(logging.WARNING)
    dev = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    t0 = time.perf_counter()
    try:
        model, tokenizer, transform, max_length, _ = load_vse_export(args.export, str(dev))
        use_tokens = model.text_kind == "gru"
        common = dict(max_length=max_length, batch_size=args.batch_size, rank=rank, world_size=world, device=dev)
        if args.karpathy_json:
            images = read_karpathy(args.karpathy_json, args.images_root, [args.split], args.captions_per_image)
            emb = embed_karpathy(model, images, transform, tokenizer, use_tokens=use_tokens,
                                 num_workers=args.num_workers, **common)
        else:
            emb = embed_shards(model, args.shards, transform, tokenizer, max_samples=args.max_samples, **common)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0

    # ------------------------------------------------------------------ metrics (rank 0)
    info = {"export": os.path.abspath(args.export), "text_encoder": model.text_kind, "processes": world}
    if args.karpathy_json:
        metrics = vse_metrics(emb.image, emb.text, emb.text_to_image)
        if len(images) == 5000:
            metrics.update({f"1k_{k}": v for k, v in coco_1k_5fold(emb.image, emb.text, emb.text_to_image).items()})
        info.update(protocol="vse", karpathy_json=os.path.abspath(args.karpathy_json), split=args.split,
                    num_images=len(images), num_captions=len(emb.captions))
        queries, gallery = emb.text, emb.image
        relevant = [{int(g)} for g in emb.text_to_image]
        query_text = emb.captions
        per_image = torch.bincount(emb.text_to_image, minlength=len(images))
        first_caption = (torch.cumsum(per_image, 0) - per_image).tolist()      # captions are in image order
        picks = [first_caption[i] for i in spaced(len(images), args.grid_queries)]
    else:
        pq, pi, q_first, i_first, gains = build_pairs(emb.query_id, emb.image_id, emb.clicks)
        metrics = pair_retrieval_metrics(emb.text[q_first], emb.image[i_first], pq, pi, gains)
        info.update(protocol="search", shards=args.shards, num_pairs=int(emb.text.shape[0]),
                    num_queries=int(q_first.numel()), num_images=int(i_first.numel()))
        queries, gallery = emb.text[q_first], emb.image[i_first]
        relevant = [set() for _ in range(q_first.numel())]
        for q, i in zip(pq.tolist(), pi.tolist()):
            relevant[q].add(i)
        picks = spaced(q_first.numel(), args.grid_queries)
        query_text = {}
    os.makedirs(args.out, exist_ok=True)
    result = {**info, "metrics": metrics, "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ grid of the top 5
    if args.grid_queries > 0 and picks:
        k = min(5, gallery.shape[0])
        scores, top = topk_chunked(queries[picks], gallery, k)
        if args.karpathy_json:
            from pretrain.data.karpathy import load_rgb

            def image_of(g: int):
                return load_rgb(images[g].path)
            texts = [query_text[q] for q in picks]
        else:
            need = {emb.keys[int(q_first[q])] for q in picks} | {emb.keys[int(i_first[g])] for g in top.flatten().tolist()}
            raw = read_shard_samples(need)

            def image_of(g: int):
                members = raw.get(emb.keys[int(i_first[g])])
                return _image_from_members(members) if members else None
            texts = [raw.get(emb.keys[int(q_first[q])], {}).get("txt", b"?").decode("utf-8", "replace").strip()
                     for q in picks]
        rows = [(text, [(image_of(g), g in relevant[q], s) for g, s in zip(top[r].tolist(), scores[r].tolist())])
                for r, (q, text) in enumerate(zip(picks, texts))]
        grid = os.path.join(args.out, "grid.png")
        result["grid"] = {"path": grid, "cjk_font": draw_grid(rows, grid),
                          "queries": [{"text": t, "top5_relevant": [h[1] for h in hits]} for t, hits in rows]}
    with open(os.path.join(args.out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    m = metrics
    if args.karpathy_json:
        print(f"{args.split}: {len(images)} images, {len(emb.captions)} captions | rsum {m['rsum']:.2f} | i2t R@1 "
              f"{m['i2t_r1']:.1f} R@5 {m['i2t_r5']:.1f} R@10 {m['i2t_r10']:.1f} | t2i R@1 {m['t2i_r1']:.1f} R@5 "
              f"{m['t2i_r5']:.1f} R@10 {m['t2i_r10']:.1f}" + (f" | 1K rsum {m['1k_rsum']:.2f}" if "1k_rsum" in m else ""))
    else:
        print(f"search: {info['num_queries']} queries, {info['num_images']} images | rsum {m['rsum']:.2f} | t2i hit@1 "
              f"{m['t2i_hit@1']:.3f} hit@5 {m['t2i_hit@5']:.3f} ndcg@10 {m['t2i_ndcg@10']:.3f} | i2t hit@1 "
              f"{m['i2t_hit@1']:.3f} hit@5 {m['i2t_hit@5']:.3f}")
    print(f"wrote {os.path.join(args.out, 'metrics.json')}" + (f" and {result['grid']['path']}" if "grid" in result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
