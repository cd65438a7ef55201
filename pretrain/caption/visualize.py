"""Caption one picture and draw where the decoder looked for every word.

``save_attention_grid`` writes one PNG: the caption on top, then one panel per word (the photo as the model saw
it, the word's attention map upsampled over it: the photo is dimmed where the word did not look and tinted with
a blue-to-red heat colour where it did, the word as title). Maps are scaled per word to their own maximum; the
panel title gives that maximum (the share of attention on the hottest region).
"""
from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .decoding import DecodeRules, decode

log = logging.getLogger(__name__)

def _font(size: int):
    from ..fonts import load_font
    return load_font(size)[0]


def center_square(image):
    """The part of the photo the eval transform keeps (shorter side resized, centre crop)."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def heat_colours(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 of a blue-cyan-yellow-red ramp (jet-like)."""
    x = np.clip(x, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def save_attention_grid(photo, words: Sequence[str], maps: np.ndarray, path: str, caption: Optional[str] = None,
                        panel: int = 160, columns: Optional[int] = None, alpha: float = 0.4) -> str:
    """photo: PIL image; maps: len(words) x h x w attention over the token grid. Writes and returns ``path``."""
    from PIL import Image, ImageDraw

    n = len(words)
    if n == 0:
        raise ValueError("no words to draw")
    cols = columns or min(n, 5)
    rows = math.ceil(n / cols)
    title_h, header_h, pad = 26, 34, 6
    base = center_square(photo.convert("RGB")).resize((panel, panel), Image.BICUBIC)
    sheet = Image.new("RGB", (cols * (panel + pad) + pad, header_h + rows * (panel + title_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), caption if caption is not None else " ".join(words), fill="black", font=_font(18))
    font = _font(16)
    for i, (word, m) in enumerate(zip(words, maps)):
        m = np.asarray(m, dtype=np.float32)
        peak = float(m.max())
        scaled = m / peak if peak > 0 else m
        heat = np.asarray(Image.fromarray(scaled).resize((panel, panel), Image.BILINEAR))  # upsampled smoothly
        # the photo dimmed where the word did not look, then the heat colours laid over it
        lit = np.asarray(base, dtype=np.float32) * (0.25 + 0.75 * heat[..., None])
        mixed = (1 - alpha) * lit + alpha * heat_colours(heat).astype(np.float32) * heat[..., None] ** 0.5
        blended = Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))
        x = pad + (i % cols) * (panel + pad)
        y = header_h + (i // cols) * (panel + title_h + pad)
        draw.text((x + 2, y + 3), f"{word}  ({peak:.2f})", fill="black", font=font)
        sheet.paste(blended, (x, y + title_h))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return path


@torch.no_grad()
@torch.no_grad()
def caption_image(model, vocab, transform, photo, rules: DecodeRules, strategy: str = "beam", beam_size: int = 3,
                  length_penalty: float = 0.0, condition: Optional[str] = None, temperature: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> Tuple[str, List[str], Optional[np.ndarray]]:
    """(caption, its words/tokens, attention maps len(words) x h x w or None) for one PIL image.
    ``temperature`` and ``generator`` are for ``strategy="sample"``."""
    device = next(model.parameters()).device
    x = transform(photo.convert("RGB")).unsqueeze(0).to(device)
    memory = model.encode(x, [condition] if condition is not None else None)
    seqs, att = decode(model.decoder, memory, rules, strategy, beam_size, length_penalty, temperature,
                       return_attention=True, generator=generator)
    ids = seqs[0].tolist()
    words = vocab.tokens(ids)
    caption = vocab.decode(ids)
    maps = None
    if att is not None and getattr(model.decoder, "has_attention", False):
        prefix, h, w = model.attention_grid(att.shape[-1])
        maps = att[0, :len(words), prefix:].float().cpu().numpy().reshape(len(words), h, w)
    return caption, words, maps
