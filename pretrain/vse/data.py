"""Karpathy-split caption data (COCO, Flickr30K, or any set in that format) for VSE training and evaluation.

The JSON (Karpathy & Fei-Fei's ``dataset_coco.json`` / ``dataset_flickr30k.json``)::

    {"images": [{"filename": "x.jpg", "filepath": "val2014",        # filepath optional (Flickr30K has none)
                 "split": "train" | "restval" | "val" | "test",
                 "cocoid" | "imgid": 123,                           # optional; else the list position
                 "sentences": [{"raw": "A dog ...", "tokens": ["a", "dog", ...]}, ...]}, ...]}

Image files are ``images_root/filepath/filename``. Every malformed field is reported with the file, the
image's position and the field name; missing image files are reported all at once (count and examples).
Training items are captions (each with its image), as in VSE++: one epoch sees every caption once.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..vocab import words_of

log = logging.getLogger(__name__)


@dataclass
class KarpathyImage:
    """One image of a Karpathy split with its captions."""
    path: str                 # file path (images_root joined)
    relpath: str              # filepath/filename as in the JSON
    image_id: int             # cocoid / imgid, else the position in the JSON
    split: str
    captions: List[str]       # raw sentences
    tokens: List[List[str]]   # their tokens (the JSON's, else empty lists: the GRU vocabulary splits the raw text)


def _field(obj: Dict[str, Any], name: str, types, where: str, json_path: str, required: bool = True):
    if name not in obj:
        if required:
            raise ValueError(f"{json_path}: {where} has no field '{name}'")
        return None
    if not isinstance(obj[name], types):
        raise ValueError(f"{json_path}: field '{name}' of {where} must be {_type_names(types)}, got {obj[name]!r}"[:300])
    return obj[name]


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def read_karpathy(json_path: str, images_root: str, splits: Sequence[str], captions_per_image: int = 5,
                  max_images: int = 0, check_files: bool = True) -> List[KarpathyImage]:
    """Images of the given splits in JSON order (``max_images`` > 0: the first N), with their captions.

    Raises ValueError naming the file and field for malformed entries, FileNotFoundError for missing files.
    """
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"Karpathy JSON '{json_path}' does not exist")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: the top level must be an object with a list field 'images'")
    wanted = set(splits)
    out: List[KarpathyImage] = []
    for n, img in enumerate(data["images"]):
        where = f"images[{n}]"
        if not isinstance(img, dict):
            raise ValueError(f"{json_path}: {where} must be an object, got {type(img).__name__}")
        split = _field(img, "split", str, where, json_path)
        if split not in wanted:
            continue
        filename = _field(img, "filename", str, where, json_path)
        filepath = _field(img, "filepath", str, where, json_path, required=False) or ""
        sentences = _field(img, "sentences", list, where, json_path)
        captions, tokens = [], []
        for s, sent in enumerate(sentences):
            swhere = f"{where}.sentences[{s}]"
            if not isinstance(sent, dict):
                raise ValueError(f"{json_path}: {swhere} must be an object with 'raw' and/or 'tokens'")
            raw = _field(sent, "raw", str, swhere, json_path, required=False)
            toks = _field(sent, "tokens", list, swhere, json_path, required=False)
            if toks is not None and not all(isinstance(t, str) for t in toks):
                raise ValueError(f"{json_path}: field 'tokens' of {swhere} must be a list of strings")
            if raw is None and not toks:
                raise ValueError(f"{json_path}: {swhere} has neither a field 'raw' nor a non-empty field 'tokens'")
            captions.append(raw if raw is not None else " ".join(toks))
            tokens.append(list(toks or []))
        if captions_per_image > 0:
            captions, tokens = captions[:captions_per_image], tokens[:captions_per_image]
        if not captions:
            raise ValueError(f"{json_path}: field 'sentences' of {where} ({filename}) is empty; "
                             f"every image needs at least one caption")
        image_id = img.get("cocoid", img.get("imgid", n))
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise ValueError(f"{json_path}: field 'cocoid'/'imgid' of {where} must be an integer, got {image_id!r}")
        relpath = os.path.join(filepath, filename)
        out.append(KarpathyImage(os.path.join(images_root, relpath), relpath, image_id, split, captions, tokens))
        if max_images and len(out) >= max_images:
            break
    if not out:
        found = sorted({i.get("split") for i in data["images"] if isinstance(i, dict)}, key=str)
        raise ValueError(f"{json_path}: no image has field 'split' in {sorted(wanted)}; splits present: {found}")
    if check_files:
        missing = [im for im in out if not os.path.isfile(im.path)]
        if missing:
            examples = ", ".join(f"'{m.relpath}' -> {m.path}" for m in missing[:3])
            raise FileNotFoundError(
                f"{json_path}: {len(missing)} of {len(out)} images of split(s) {sorted(wanted)} are missing under "
                f"images_root '{images_root}' (fields 'filepath'/'filename'), e.g. {examples}")
    return out


def training_splits(train_split: str, use_restval: bool) -> List[str]:
    return [train_split, "restval"] if use_restval and train_split != "restval" else [train_split]


def load_rgb(path: str) -> Image.Image:
    """Decoded RGB image; unreadable files raise ValueError naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image file '{path}': {e}") from None


class ImageFiles(Dataset):
    """Transformed images of the given paths, with their index (evaluation); optional in-memory cache."""

    def __init__(self, paths: Sequence[str], transform: Callable, indices: Optional[Sequence[int]] = None,
                 cache: Optional[Dict[str, Image.Image]] = None):
        self.paths = list(paths)
        self.transform = transform
        self.indices = list(range(len(self.paths))) if indices is None else list(indices)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, path: str) -> Image.Image:
        if self.cache is None:
            return load_rgb(path)
        if path not in self.cache:
            self.cache[path] = load_rgb(path)
        return self.cache[path]

    def __getitem__(self, i: int):
        idx = self.indices[i]
        return self.transform(self.image(self.paths[idx])), idx


class CaptionPairs(Dataset):
    """One item per caption: (transformed image, caption text or tokens, image position, text id).

    The text id numbers distinct normalised captions: click logs (and COCO, a little) repeat a caption
    over several images, and such a repeat is not a negative for the ranking loss."""

    def __init__(self, images: Sequence[KarpathyImage], transform: Callable, use_tokens: bool = False,
                 cache_images: bool = False):
        self.images = list(images)
        self.files = ImageFiles([im.path for im in self.images], transform, cache={} if cache_images else None)
        self.items = [(i, j) for i, im in enumerate(self.images) for j in range(len(im.captions))]
        self.use_tokens = use_tokens
        # identical captions (after case / punctuation normalisation) share a text id: not each other's negatives
        ids: Dict[str, int] = {}
        self.text_ids = [ids.setdefault(" ".join(words_of(self.images[i].captions[j])), len(ids))
                         for i, j in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def text(self, i: int, j: int) -> Union[str, List[str]]:
        im = self.images[i]
        return im.tokens[j] if self.use_tokens and im.tokens[j] else im.captions[j]

    def __getitem__(self, n: int):
        i, j = self.items[n]
        image, _ = self.files[i]
        return image, self.text(i, j), i, self.text_ids[n]


def caption_collate(tokenizer, max_length: int) -> Callable:
    """Batch of ``CaptionPairs`` items -> dict(image, input_ids, attention_mask, image_index, text_id)."""

    def collate(items):
        images, texts, image_index, text_id = zip(*items)
        tok = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        return {"image": torch.stack(images), "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
                "image_index": torch.tensor(image_index), "text_id": torch.tensor(text_id)}
    return collate


def caption_texts(images: Sequence[KarpathyImage], use_tokens: bool = False):
    """(texts, text_to_image) of all captions of ``images`` in order: the VSE evaluation's caption list."""
    texts, owner = [], []
    for i, im in enumerate(images):
        for j, raw in enumerate(im.captions):
            texts.append(im.tokens[j] if use_tokens and im.tokens[j] else raw)
            owner.append(i)
    return texts, torch.tensor(owner, dtype=torch.long)
