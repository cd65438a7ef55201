"""Karpathy-split caption sets (COCO, Flickr8K/30K, or any set in that format): the one reader of VSE
fine-tuning, captioning and retrieval evaluation.

The JSON (Karpathy & Fei-Fei's ``dataset_coco.json`` / ``dataset_flickr30k.json``)::

    {"images": [{"filename": "x.jpg", "filepath": "val2014",        # filepath optional (Flickr30K has none)
                 "split": "train" | "restval" | "val" | "test",
                 "cocoid" | "imgid": 123,                           # optional; else the list position
                 "sentences": [{"raw": "A dog ...", "tokens": ["a", "dog", ...]}, ...]}, ...]}

Image files are ``images_root/filepath/filename``. Every malformed field is reported with the file, the
image's position and the field name; missing image files are reported all at once (count, first paths and
the images root), so that a wrong root fails before any training. Images are decoded with
``pretrain.data.samples.decode_image``, as shards are. No torch here (``caption_texts`` imports it on call).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from PIL import Image

from .samples import decode_image


@dataclass
class KarpathyImage:
    """One image of a Karpathy split with its captions."""
    path: str                 # file path (images_root joined)
    relpath: str              # filepath/filename as in the JSON
    image_id: int             # cocoid / imgid, else the position in the JSON
    split: str
    captions: List[str]       # raw sentences (``tokens`` joined by spaces when there is no ``raw``)
    tokens: List[List[str]]   # their tokens (the JSON's, else empty lists)
    sentences: List[Dict[str, Any]]  # the sentence objects as in the JSON (extra fields, e.g. a VQA answer)
    key: str                  # cocoid / imgid / id as text, else the position: a unique name of the image


def _field(obj: Dict[str, Any], name: str, types, where: str, json_path: str, required: bool = True):
    if name not in obj:
        if required:
            raise ValueError(f"{json_path}: {where} has no field '{name}'")
        return None
    if not isinstance(obj[name], types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ValueError(f"{json_path}: field '{name}' of {where} must be {names}, got {obj[name]!r}"[:300])
    return obj[name]


def _key(img: Dict[str, Any], index: int) -> str:
    return next((str(img[k]) for k in ("cocoid", "imgid", "id") if k in img), str(index))


def read_karpathy(json_path: str, images_root: str, splits: Sequence[str], captions_per_image: int = 5,
                  max_images: int = 0, check_files: bool = True) -> List[KarpathyImage]:
    """Images of the given splits in JSON order with their captions: the first ``captions_per_image`` of each
    (0: all), the first ``max_images`` images (0: all).

    Raises ValueError naming the file and field for malformed entries or when no image is in ``splits``, and
    FileNotFoundError for missing image files (``check_files``; see ``check_image_files``).
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
        where = f"images[{n}] (split '{split}')"
        filename = _field(img, "filename", str, where, json_path)
        if not filename:
            raise ValueError(f"{json_path}: field 'filename' of {where} must be a non-empty string")
        filepath = _field(img, "filepath", str, where, json_path, required=False) or ""
        sentences = _field(img, "sentences", list, where, json_path)
        if captions_per_image > 0:
            sentences = sentences[:captions_per_image]
        captions, tokens = [], []
        for s, sent in enumerate(sentences):
            swhere = f"images[{n}].sentences[{s}]"
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
        if not captions:
            raise ValueError(f"{json_path}: field 'sentences' of {where} ({filename}) is empty; "
                             f"every image needs at least one caption")
        image_id = img.get("cocoid", img.get("imgid", n))
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise ValueError(f"{json_path}: field 'cocoid'/'imgid' of {where} must be an integer, got {image_id!r}")
        relpath = os.path.join(filepath, filename)
        out.append(KarpathyImage(os.path.join(images_root, relpath), relpath, image_id, split, captions, tokens,
                                 list(sentences), _key(img, n)))
        if max_images and len(out) >= max_images:
            break
    if not out:
        found = sorted({i.get("split") for i in data["images"] if isinstance(i, dict)}, key=str)
        raise ValueError(f"{json_path}: no image has field 'split' in {sorted(wanted)}; splits present: {found}")
    if check_files:
        check_image_files([im.path for im in out], json_path, images_root, sorted(wanted))
    return out


def check_image_files(paths: Sequence[str], json_path: str, images_root: str, splits: Sequence[str],
                      examples: int = 3) -> None:
    """FileNotFoundError listing how many of the images are missing, the first few paths and the images root."""
    paths = list(dict.fromkeys(paths))  # an image named twice counts once
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:examples]) + (", ..." if len(missing) > examples else "")
        raise FileNotFoundError(
            f"{json_path}: {len(missing)} of {len(paths)} image files of split(s) {list(splits)} are missing under "
            f"images_root '{images_root}' (data.images_root; paths are images_root/filepath/filename), e.g. {shown}")


def training_splits(train_split: str, use_restval: bool) -> List[str]:
    return [train_split, "restval"] if use_restval and train_split != "restval" else [train_split]


def load_rgb(path: str) -> Image.Image:
    """Decoded RGB image of a file (``decode_image``); unreadable files raise ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return decode_image(data)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image file '{path}': {e}") from None


class ImageFiles:
    """Map-style dataset (for a torch DataLoader): transformed images of the given paths with their index;
    optional in-memory cache of the decoded images."""

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


def caption_texts(images: Sequence[KarpathyImage], use_tokens: bool = False):
    """(texts, text_to_image) of all captions of ``images`` in order: the VSE evaluation's caption list;
    ``text_to_image`` is a LongTensor of image positions."""
    import torch

    texts, owner = [], []
    for i, im in enumerate(images):
        for j, raw in enumerate(im.captions):
            texts.append(im.tokens[j] if use_tokens and im.tokens[j] else raw)
            owner.append(i)
    return texts, torch.tensor(owner, dtype=torch.long)
