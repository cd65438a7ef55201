"""Caption pictures with a trained captioning model directory (e.g. runs/caption_demo/scst_best).

    python launch/caption.py --model runs/caption_demo/scst_best --image photo.png [--beam-size 5 | --greedy |
                             --sample [--temperature 0.7]] [--attention-png out.png] [--condition "two"]

Prints one caption per image, decoded as the model's saved ``decode`` settings say (``strategy``, ``beam_size``,
``length_penalty``, ``temperature``, ``max_length`` and the ending rules) unless overridden. With
``--attention-png`` (attention decoders), writes one picture per image: a grid with one panel per word, the
attention map of that word upsampled over the photo.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, NamedTuple, Optional

try:
    import _launch_path  # noqa: F401  (launch/_launch_path.py: this folder's name clash, handled once)
except ImportError:  # imported by file path (tests): the package is importable already
    pass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Decoding(NamedTuple):
    strategy: str  # greedy, beam or sample
    beam_size: int
    length_penalty: float
    temperature: float


def resolve_decoding(a: argparse.Namespace, dc) -> Decoding:
    """The decoding to use: the model's ``decode`` section (``dc``) with the command line's overrides.
    Raises ValueError for contradictory options."""
    if a.beam_size is not None and a.beam_size < 1:
        raise ValueError(f"--beam-size must be >= 1, got {a.beam_size}")
    if a.beam_size is not None and (a.greedy or a.sample):
        raise ValueError("--beam-size selects beam search (1: greedy): not with --greedy or --sample")
    if a.greedy:
        strategy = "greedy"
    elif a.sample:
        strategy = "sample"
    elif a.beam_size is not None:
        strategy = "beam"
    else:
        strategy = dc.strategy
    beam = a.beam_size if a.beam_size is not None else dc.beam_size
    lp = dc.length_penalty if a.length_penalty is None else a.length_penalty
    temperature = dc.temperature if a.temperature is None else a.temperature
    if strategy not in ("greedy", "beam", "sample"):
        raise ValueError(f"unknown decode.strategy '{strategy}' in the model: greedy, beam or sample")
    if a.temperature is not None and strategy != "sample":
        raise ValueError(f"--temperature is for sampling (--sample, or a model saved with decode.strategy "
                         f"sample); this decoding is {strategy}")
    if a.length_penalty is not None and strategy != "beam":
        raise ValueError(f"--length-penalty is for beam search; this decoding is {strategy}")
    if strategy == "sample" and not temperature > 0:
        raise ValueError(f"the sampling temperature must be > 0, got {temperature}")
    if strategy == "beam" and beam < 1:
        raise ValueError(f"the beam size must be >= 1, got {beam}")
    if strategy == "beam" and beam == 1:
        strategy = "greedy"  # a single beam picks the arg-max word at every step, whatever the length penalty
    return Decoding(strategy, beam, lp, temperature)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by launch/finetune_caption.py")
    p.add_argument("--image", required=True, nargs="+", help="image file(s)")
    p.add_argument("--beam-size", type=int, default=None,
                   help="beam search with N beams (1: greedy); default: the model's decode.strategy and beam_size")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding")
    mode.add_argument("--sample", action="store_true", help="sample each word (see --temperature, --seed)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the model's decode.temperature)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: unseeded)")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="GNMT alpha of beam search (default: the model's)")
    p.add_argument("--max-length", type=int, default=None, help="longest caption in tokens (default: the model's)")
    p.add_argument("--condition", default=None, help="condition text, for models trained with data.condition_field")
    p.add_argument("--attention-png", default=None,
                   help="write the attention grid here (several images: NAME_0.png, NAME_1.png, ...)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    import torch
    from PIL import Image

    from pretrain.caption.decoding import DecodeRules
    from pretrain.caption.model import load_model_dir
    from pretrain.caption.visualize import caption_image, save_attention_grid

    if not os.path.isfile(os.path.join(a.model, "model.safetensors")):
        print(f"error: {a.model} is not a caption model directory (no model.safetensors)", file=sys.stderr)
        return 2
    if a.max_length is not None and a.max_length < 1:
        print(f"error: --max-length must be >= 1, got {a.max_length}", file=sys.stderr)
        return 2
    model, vocab, transform, cfg = load_model_dir(a.model, a.device)
    dc = cfg.decode
    try:
        decoding = resolve_decoding(a, dc)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rules = DecodeRules.from_vocab(vocab, a.max_length or dc.max_length, dc.min_length, dc.bad_endings, dc.allow_unk)
    generator = None
    if decoding.strategy == "sample" and a.seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(a.seed)
    for i, path in enumerate(a.image):
        with Image.open(path) as im:
            photo = im.convert("RGB")
        caption, words, maps = caption_image(model, vocab, transform, photo, rules, decoding.strategy,
                                             decoding.beam_size, decoding.length_penalty, a.condition,
                                             decoding.temperature, generator)
        print(f"{path}\t{caption}" if len(a.image) > 1 else caption)
        if a.attention_png:
            if maps is None:
                print("note: this decoder has no attention maps", file=sys.stderr)
                continue
            out = a.attention_png
            if len(a.image) > 1:
                root, ext = os.path.splitext(out)
                out = f"{root}_{i}{ext or '.png'}"
            save_attention_grid(photo, words, maps, out, caption)
            print(f"attention map: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
