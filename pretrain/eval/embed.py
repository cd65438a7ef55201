"""Embeddings of an evaluation set, sharded over ranks and gathered in order.

Two sources:

- a Karpathy-split JSON with an images folder (``embed_karpathy``): every image once and every caption
  once, with ``text_to_image`` (the VSE protocol of ``pretrain.eval.retrieval.vse_metrics``);
- WebDataset shards (``embed_shards``): every held-out ``<query, image>`` pair with its query id, image
  id and clicks (the search protocol: ``build_pairs`` then ``pair_retrieval_metrics``).

``towers`` is anything with ``towers.image(images) -> B x D`` and ``towers.text(input_ids,
attention_mask) -> B x D`` (a ``DualEncoder``, a ``VSEModel``). Rank r embeds items r, r+G, r+2G, ...
of G ranks; the rows are then gathered so that every rank holds the same tensors, in the source's
order, equal to what one process computes. Embeddings come back as float32 on the CPU.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader

from .. import dist
from ..data.karpathy import ImageFiles, KarpathyImage, caption_texts

log = logging.getLogger(__name__)


@dataclass
class KarpathyEmbeddings:
    image: torch.Tensor          # I x D, in the order of the images given
    text: torch.Tensor           # T x D, the captions of image 0, then of image 1, ...
    text_to_image: torch.Tensor  # T: image position of every caption
    captions: List[str]          # T raw captions (for displays)


@dataclass
class ShardEmbeddings:
    image: torch.Tensor          # N x D, one row per held-out pair, in the loader's order (its ``index``)
    text: torch.Tensor           # N x D
    query_id: torch.Tensor       # N
    image_id: torch.Tensor       # N
    clicks: torch.Tensor         # N
    index: torch.Tensor          # N: the loader's sample index (ascending)
    keys: List[str]              # N: WebDataset keys (to find the raw sample again)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Evaluation mode inside, the previous train/eval state of every submodule restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)


def _my_share(n: int, rank: int, world_size: int) -> List[int]:
    return list(range(rank, n, world_size))


@torch.no_grad()
def embed_image_files(image_tower: Callable, paths: Sequence[str], transform: Callable, *, batch_size: int,
                      rank: int = 0, world_size: int = 1, device: Union[str, torch.device] = "cpu",
                      num_workers: int = 0) -> torch.Tensor:
    """N x D embeddings of the image files, in order, on every rank (each rank reads its share)."""
    mine = _my_share(len(paths), rank, world_size)
    loader = DataLoader(ImageFiles(paths, transform, indices=mine), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    rows, index = [], []
    for images, idx in loader:
        rows.append(image_tower(images.to(device)).float().cpu())
        index.append(idx)
    return _gather(rows, index, len(paths))


@torch.no_grad()
def embed_texts(text_tower: Callable, texts: Sequence[Union[str, List[str]]], tokenizer, *, max_length: int,
                batch_size: int, rank: int = 0, world_size: int = 1,
                device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """T x D embeddings of the texts (raw strings; token lists for a ``WordVocab``), in order, on every rank."""
    mine = _my_share(len(texts), rank, world_size)
    rows, index = [], []
    for s in range(0, len(mine), batch_size):
        idx = mine[s:s + batch_size]
        tok = tokenizer([texts[i] for i in idx], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        rows.append(text_tower(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu())
        index.append(torch.tensor(idx, dtype=torch.long))
    return _gather(rows, index, len(texts))


def _gather(rows: List[torch.Tensor], index: List[torch.Tensor], total: int) -> torch.Tensor:
    dim = _dim_from_peers(rows[0].shape[1] if rows else None)
    local = torch.cat(rows) if rows else torch.zeros(0, dim)     # a rank may have no items (more ranks than items)
    local_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    return dist.gather_rows_in_order(local, local_index, total)


def _dim_from_peers(dim: Optional[int]) -> int:
    """Embedding width agreed over ranks (a rank without items learns it from the others)."""
    dims = [d for d in dist.all_gather_objects(dim) if d is not None]
    if not dims:
        raise ValueError("no rank embedded anything: the evaluation set is empty")
    return dims[0]


@torch.no_grad()
def embed_karpathy(towers, images: Sequence[KarpathyImage], transform: Callable, tokenizer, *, max_length: int,
                   batch_size: int, rank: int = 0, world_size: int = 1, device: Union[str, torch.device] = "cpu",
                   use_tokens: bool = False, num_workers: int = 0) -> KarpathyEmbeddings:
    """Every image and every caption of ``images`` (``read_karpathy`` output), sharded over ranks."""
    texts, owner = caption_texts(images, use_tokens)
    with eval_mode(towers):
        img = embed_image_files(towers.image, [im.path for im in images], transform, batch_size=batch_size, rank=rank,
                                world_size=world_size, device=device, num_workers=num_workers)
        txt = embed_texts(towers.text, texts, tokenizer, max_length=max_length, batch_size=batch_size, rank=rank,
                          world_size=world_size, device=device)
    captions = [c for im in images for c in im.captions]
    return KarpathyEmbeddings(img, txt, owner, captions)


@torch.no_grad()
def embed_shards(towers, urls: str, transform: Callable, tokenizer, *, max_length: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, device: Union[str, torch.device] = "cpu",
                 max_samples: int = 0, lockstep: bool = False, autocast=None,
                 dummy: Optional[Dict[str, torch.Tensor]] = None) -> ShardEmbeddings:
    """Every held-out pair of the shards (``pretrain.data.iter_eval_batches`` splits them over ranks), streamed:
    only the embeddings are kept. ``lockstep`` (ZeRO-3, whose forwards are collective): every rank runs the
    same number of forwards, a rank that has run out of batches forwarding its first batch (or ``dummy``) again."""
    from ..data import iter_eval_batches

    rows_i, rows_t = [], []
    meta: Dict[str, list] = {"index": [], "query_id": [], "image_id": [], "clicks": [], "key": []}
    batches = iter(iter_eval_batches(urls, batch_size=batch_size, image_transform=transform, tokenizer=tokenizer,
                                     max_length=max_length, rank=rank, world_size=world_size,
                                     max_samples=max_samples or None))
    spare = None
    with eval_mode(towers):
        while True:
            b = next(batches, None)
            if lockstep:  # one flag per batch: go on while any rank still has a batch
                if not dist.any_rank(b is not None, torch.device(device)):
                    break
                spare = spare if spare is not None else (b or dummy)
                if b is None:
                    with autocast or contextlib.nullcontext():
                        towers.image(spare["image"].to(device))
                        towers.text(spare["input_ids"].to(device), spare["attention_mask"].to(device))
                    continue
            elif b is None:
                break
            with autocast or contextlib.nullcontext():
                rows_i.append(towers.image(b["image"].to(device)).float().cpu())
                rows_t.append(towers.text(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu())
            n = b["image"].shape[0]
            meta["index"] += torch.as_tensor(b["index"]).reshape(-1).tolist()
            for k in ("query_id", "image_id", "clicks"):
                meta[k] += torch.as_tensor(b[k]).reshape(-1).tolist()
            keys = b.get("key")
            meta["key"] += list(keys) if keys is not None else [""] * n
    # the global order: every rank's sample indices, sorted; positions of this rank's rows in it
    every = dist.all_gather_objects(meta)
    order = sorted(i for m in every for i in m["index"])
    if len(set(order)) != len(order):
        raise ValueError("the shard loader gave the same sample index to two held-out samples")
    if not order:
        raise ValueError(f"no held-out sample was read from '{urls}'")
    position = {idx: p for p, idx in enumerate(order)}
    local_pos = torch.tensor([position[i] for i in meta["index"]], dtype=torch.long)
    dim = _dim_from_peers(rows_i[0].shape[1] if rows_i else None)
    img = torch.cat(rows_i) if rows_i else torch.zeros(0, dim)
    txt = torch.cat(rows_t) if rows_t else torch.zeros(0, dim)
    img = dist.gather_rows_in_order(img, local_pos, len(order))
    txt = dist.gather_rows_in_order(txt, local_pos, len(order))
    merged = {k: [None] * len(order) for k in meta}
    for m in every:
        for j, idx in enumerate(m["index"]):
            for k in meta:
                merged[k][position[idx]] = m[k][j]
    return ShardEmbeddings(img, txt, torch.tensor(merged["query_id"], dtype=torch.long),
                           torch.tensor(merged["image_id"], dtype=torch.long),
                           torch.tensor(merged["clicks"], dtype=torch.float64),
                           torch.tensor(merged["index"], dtype=torch.long), [str(k) for k in merged["key"]])
