"""WenLan-style pretraining entry point.

    deepspeed --num_gpus 8 launch/pretrain.py --config configs/pretrain/base.yaml [key=value ...]
    python launch/pretrain.py --config configs/pretrain/demo.yaml train.steps=50   # one process

``key=value`` arguments (before or after the options) override config fields (e.g. ``train.zero_stage=3``).
Everything that can be checked before start-up is: the config (keys, types, ranges) and the paths it names
(shards, tokenizer, weights). Errors are one line on stderr, exit code 2 (3: the run stopped on bad steps or
bad data). SIGTERM or SIGUSR1 stops every rank after the same step with a checkpoint, exit code 0.
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

import warnings  # noqa: E402

# DeepSpeed's ZeRO calls a torch collective that torch marks deprecated, once per step
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def _error(message: str) -> None:
    rank = os.environ.get("RANK", "0")
    prefix = "error" if os.environ.get("WORLD_SIZE", "1") == "1" else f"error (rank {rank})"
    print(f"{prefix}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def _resume_hint(config: str, overrides: List[str]) -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"deepspeed --num_gpus {world} " if world > 1 else "python "
    rest = " ".join(overrides)
    return f"{launcher}launch/pretrain.py --config {config} --resume auto{' ' + rest if rest else ''}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (configs/pretrain/*.yaml)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (newest complete checkpoint in train.output_dir, else fresh), 'never', "
                             "a checkpoint tag, or a path: a checkpoint folder, or a run folder (its newest)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_intermixed_args(argv)  # overrides before and after the options

    from pretrain.config import ConfigError, check_paths, load_config

    try:
        cfg = check_paths(load_config(args.config, args.overrides))
    except ConfigError as e:  # before any work: name the key and what is allowed
        _error(e)
        return 2

    from pretrain.checkpoint import CheckpointError
    from pretrain.data import DataError
    from pretrain.trainer import Trainer, TrainingStopped

    trainer = None
    try:
        trainer = Trainer(cfg, resume=args.resume)
        trainer.fit()
    except KeyboardInterrupt:  # Ctrl-C: a message, not a traceback (SIGTERM/SIGUSR1 also save the current step)
        if os.environ.get("RANK", "0") == "0":
            step = getattr(trainer, "step", None)
            ckpt = getattr(trainer, "last_checkpoint", None)
            print(f"interrupted{f' after step {step} of {cfg.train.steps}' if step is not None else ''}; "
                  f"{f'newest checkpoint {ckpt}' if ckpt else 'no checkpoint written or loaded by this run'}. "
                  f"To resume from the newest complete checkpoint: {_resume_hint(args.config, args.overrides)} "
                  f"(to stop with a checkpoint of the current step, send SIGTERM or SIGUSR1 instead of Ctrl-C)",
                  file=sys.stderr, flush=True)
        return 130
    except (TrainingStopped, DataError) as e:
        _error(e)
        return 3
    except (CheckpointError, ConfigError) as e:
        _error(e)
        return 2
    except (ValueError, FileNotFoundError) as e:  # bad paths, shards, checkpoints: a message, not a traceback
        _error(f"{type(e).__name__}: {e}")
        return 2
    if trainer.stopped_by and trainer.rank == 0:
        print(f"stopped by {trainer.stopped_by} after step {trainer.step} of {cfg.train.steps}; checkpoint "
              f"{trainer.last_checkpoint}. To resume: {_resume_hint(args.config, args.overrides)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
