"""Karpathy-split captioning data (the JSON is read by ``pretrain.data.karpathy``, its format is described there).

A *unit* is what one caption is generated for: an image, or an (image, condition) pair when
``data.condition_field`` names a per-sentence condition (IVQA: the answer; the sentences are the questions).
Its references are the sentences of that image (with that condition).
"""
from __future__ import annotations

import logging
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ..data.karpathy import check_image_files, load_rgb, read_karpathy

log = logging.getLogger(__name__)


@dataclass
class CaptionUnit:
    key: str
    """Unique id: the image id, or ``imgid|condition``."""
    image_path: str
    refs_raw: List[str]
    """Reference captions as written (metrics tokenise them with the PTB tokenizer)."""
    sentences: List[Dict[str, Any]] = field(default_factory=list)
    """The reference sentences (``raw`` and ``tokens``), for the vocabulary."""
    condition: Optional[str] = None


def load_karpathy(json_path: str, images_root: str, splits: Sequence[str],
                  condition_field: str = "", check_files: bool = True) -> List[CaptionUnit]:
    """Units of the given splits, in file order, from ``pretrain.data.karpathy.read_karpathy`` (every caption;
    its errors: ValueError naming the entry and field, FileNotFoundError for missing image files)."""
    units: List[CaptionUnit] = []
    for im in read_karpathy(json_path, images_root, splits, captions_per_image=0, check_files=check_files):
        groups: "OrderedDict[Optional[str], List[Tuple[Dict[str, Any], str]]]" = OrderedDict()
        for sent, raw in zip(im.sentences, im.captions):
            cond = None
            if condition_field:
                if condition_field not in sent:
                    raise ValueError(f"{json_path}: image {im.relpath} has a sentence without the condition "
                                     f"field '{condition_field}' (data.condition_field)")
                cond = str(sent[condition_field])
            groups.setdefault(cond, []).append((sent, raw))
        for cond, group in groups.items():
            units.append(CaptionUnit(key=im.key if cond is None else f"{im.key}|{cond}", image_path=im.path,
                                     refs_raw=[raw for _, raw in group], sentences=[s for s, _ in group],
                                     condition=cond))
    return units


def split_units(json_path: str, images_root: str, condition_field: str = "",
                use_restval: bool = True, check_files: bool = True) -> Dict[str, List[CaptionUnit]]:
    """Units of ``train`` (+ ``restval``), ``val`` and ``test``; each split must be non-empty. With ``check_files``
    every image file of the three splits must exist (one report for all of them)."""
    train_splits = ("train", "restval") if use_restval else ("train",)
    out = {"train": load_karpathy(json_path, images_root, train_splits, condition_field, check_files=False),
           "val": load_karpathy(json_path, images_root, ("val",), condition_field, check_files=False),
           "test": load_karpathy(json_path, images_root, ("test",), condition_field, check_files=False)}
    for name, units in out.items():
        if not units:
            raise ValueError(f"{json_path}: the '{name}' split is empty")
    if check_files:
        check_image_files([u.image_path for units in out.values() for u in units], json_path, images_root,
                          [*train_splits, "val", "test"])
    return out


def make_labels(ids: List[int], max_length: int, bos: int, eos: int, pad: int) -> List[int]:
    """``[BOS] w1 .. wn [EOS] [PAD]..`` of length ``max_length + 2`` (n truncated to ``max_length``)."""
    ids = ids[:max_length]
    return [bos] + ids + [eos] + [pad] * (max_length - len(ids))


class CaptionDataset(Dataset):
    """Items: ``image`` (3 x H x W), ``index``, and with ``train`` (while ``with_labels`` is true) ``labels``
    (seq_per_img references drawn from the unit's, each ``max_length + 2`` ids)."""

    def __init__(self, units: List[CaptionUnit], transform, vocab=None, max_length: int = 16, seq_per_img: int = 5,
                 train: bool = False, cache_images: bool = False, seed: int = 0, random_shift: int = 0):
        self.units, self.transform, self.vocab = units, transform, vocab
        self.max_length, self.seq_per_img, self.with_labels = max_length, seq_per_img, train
        self.cache: Optional[Dict[int, torch.Tensor]] = {} if cache_images else None
        self.seed, self.epoch = seed, 0
        self.random_shift = random_shift if train else 0
        if train:
            self.encoded = [[vocab.encode(s) for s in u.sentences] for u in units]

    def __len__(self) -> int:
        return len(self.units)

    def set_epoch(self, epoch: int) -> None:
        """References drawn for an image depend on (seed, epoch, index) only: the same in any worker."""
        self.epoch = epoch

    def image(self, i: int) -> torch.Tensor:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        x = self.transform(load_rgb(self.units[i].image_path))
        if self.cache is not None:
            self.cache[i] = x
        return x

    def __getitem__(self, i: int) -> Dict[str, Any]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch * 10_007 + i)
        item: Dict[str, Any] = {"image": shift(self.image(i), self.random_shift, rng), "index": i}
        if self.with_labels:
            refs = self.encoded[i]
            if len(refs) >= self.seq_per_img:
                chosen = rng.sample(range(len(refs)), self.seq_per_img)
            else:  # fewer references than seq_per_img: all of them, then repeats
                chosen = list(range(len(refs))) + [rng.randrange(len(refs))
                                                   for _ in range(self.seq_per_img - len(refs))]
            v = self.vocab
            item["labels"] = torch.tensor([make_labels(refs[j], self.max_length, v.bos, v.eos, v.pad) for j in chosen])
        return item


def shift(image: torch.Tensor, max_shift: int, rng: random.Random) -> torch.Tensor:
    """Translate a C x H x W image by up to ``max_shift`` pixels each way, replicating the edges."""
    if max_shift <= 0:
        return image
    import torch.nn.functional as F

    dx, dy = rng.randint(-max_shift, max_shift), rng.randint(-max_shift, max_shift)
    m = max_shift
    padded = F.pad(image.unsqueeze(0), (m, m, m, m), mode="replicate")[0]
    h, w = image.shape[1:]
    return padded[:, m + dy:m + dy + h, m + dx:m + dx + w]


def collate(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    out = {"image": torch.stack([it["image"] for it in items]),
           "index": torch.tensor([it["index"] for it in items])}
    if "labels" in items[0]:
        out["labels"] = torch.stack([it["labels"] for it in items])  # B x S x T
    return out
