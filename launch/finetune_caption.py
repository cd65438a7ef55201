"""Captioning fine-tuning: cross-entropy then self-critical training (CIDEr-D), evaluated on the test split.

    deepspeed --num_gpus 8 launch/finetune_caption.py --config configs/finetune/caption_aoa.yaml encoder.export=exports/x
    python launch/finetune_caption.py --config configs/finetune/caption_demo.yaml          # one CPU process

Trailing ``key=value`` arguments override config fields (e.g. ``scst.baseline=mean``). Prints the final table:
the constant-caption baseline, the best XE and the best SCST model with greedy and beam decoding.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

try:
    import _launch_path  # noqa: F401  (launch/_launch_path.py: this folder's name clash, handled once)
except ImportError:  # imported by file path (tests): the package is importable already
    pass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (configs/finetune/caption_*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. xe.epochs=5")
    args = parser.parse_args(argv)

    from pretrain.caption.config import load_caption_config
    from pretrain.config import ConfigError

    try:
        cfg = load_caption_config(args.config, args.overrides)
    except ConfigError as e:  # before any work: name the key and what is allowed
        print(f"error: {e}", file=sys.stderr)
        return 2

    from pretrain import dist
    from pretrain.caption.train import CaptionTrainer, format_table

    results = CaptionTrainer(cfg).fit()
    if dist.rank() == 0:
        print(f"\nTest split ({cfg.data.karpathy_json}); run directory {cfg.train.output_dir}")
        print(format_table(results))
        t = results["time_s"]
        print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
