"""VSE training items out of a Karpathy split (read by ``pretrain.data.karpathy``): one item per caption,
with its image, as in VSE++ (one epoch sees every caption once).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Union

import torch
from torch.utils.data import Dataset

from ..data.karpathy import ImageFiles, KarpathyImage
from ..vocab import words_of


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
