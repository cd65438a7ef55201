"""Caption pictures with a trained captioning model directory (e.g. runs/caption_demo/scst_best).

    python launch/caption.py --model runs/caption_demo/scst_best --image photo.png [--beam-size 5]
                             [--attention-png out.png] [--condition "two"]

Prints one caption per image. With ``--attention-png`` (attention decoders), writes one picture per image: a grid
with one panel per word, the attention map of that word upsampled over the photo.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by launch/finetune_caption.py")
    p.add_argument("--image", required=True, nargs="+", help="image file(s)")
    p.add_argument("--beam-size", type=int, default=None, help="beams (default: the model's decode.beam_size; "
                                                               "1: greedy)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding")
    p.add_argument("--length-penalty", type=float, default=None, help="GNMT alpha (default: the model's)")
    p.add_argument("--max-length", type=int, default=None, help="longest caption in tokens (default: the model's)")
    p.add_argument("--condition", default=None, help="condition text, for models trained with data.condition_field")
    p.add_argument("--attention-png", default=None,
                   help="write the attention grid here (several images: NAME_0.png, NAME_1.png, ...)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    from PIL import Image

    from pretrain.caption.decoding import DecodeRules
    from pretrain.caption.model import load_model_dir
    from pretrain.caption.visualize import caption_image, save_attention_grid

    if not os.path.isfile(os.path.join(a.model, "model.safetensors")):
        print(f"error: {a.model} is not a caption model directory (no model.safetensors)", file=sys.stderr)
        return 2
    model, vocab, transform, cfg = load_model_dir(a.model, a.device)
    dc = cfg.decode
    beam = a.beam_size if a.beam_size is not None else dc.beam_size
    strategy = "greedy" if a.greedy or beam == 1 else "beam"
    rules = DecodeRules.from_vocab(vocab, a.max_length or dc.max_length, dc.min_length, dc.bad_endings, dc.allow_unk)
    lp = dc.length_penalty if a.length_penalty is None else a.length_penalty
    for i, path in enumerate(a.image):
        with Image.open(path) as im:
            photo = im.convert("RGB")
        caption, words, maps = caption_image(model, vocab, transform, photo, rules, strategy, beam, lp, a.condition)
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
