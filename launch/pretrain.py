"""WenLan-style pretraining entry point.

    deepspeed --num_gpus 8 launch/pretrain.py --config configs/pretrain/base.yaml [key=value ...]
    python launch/pretrain.py --config configs/pretrain/demo.yaml train.steps=50   # one process

Trailing ``key=value`` arguments override config fields (e.g. ``train.zero_stage=3``).
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

import warnings  # noqa: E402

# DeepSpeed's ZeRO calls a torch collective that torch marks deprecated, once per step
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (configs/pretrain/*.yaml)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (newest complete checkpoint in train.output_dir, else fresh), 'never', "
                             "or a checkpoint tag/path")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)

    from pretrain.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:  # before any work: name the key and what is allowed
        print(f"error: {e}", file=sys.stderr)
        return 2

    from pretrain.data import DataError
    from pretrain.trainer import Trainer, TrainingStopped

    try:
        trainer = Trainer(cfg, resume=args.resume)
        trainer.fit()
    except (TrainingStopped, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as e:  # bad paths, shards, checkpoints: a message, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
