"""VSE (image-text retrieval) fine-tuning of pretrained towers, VSE++ style.

    python launch/finetune_vse.py --config configs/finetune/vse_demo.yaml model.export=exports/demo
    deepspeed --num_gpus 8 launch/finetune_vse.py --config configs/finetune/vse_coco.yaml model.export=DIR

Prints the zero-shot rsum of the export before training and the best fine-tuned rsum at the end
(results in train.output_dir: results.json, metrics.jsonl, best/ in the export format).
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


def _fmt(m: dict) -> str:
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
    if "i2t_r1" in m:
        return f"rsum {m['rsum']:.2f} (" + ", ".join(f"{k} {m[k]:.1f}" for k in keys) + ")"
    return f"rsum {m['rsum']:.2f}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (configs/finetune/vse_*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    args = parser.parse_args(argv)

    from pretrain.config import ConfigError
    from pretrain.vse.config import load_vse_config

    try:
        cfg = load_vse_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from pretrain import dist
    from pretrain.vse.train import VSETrainer

    try:
        trainer = VSETrainer(cfg)
        zs = trainer.results["zero_shot"]
        if dist.rank() == 0:
            for split in ("val", "test"):
                if split in zs:
                    print(f"zero-shot {split}: {_fmt(zs[split])}", flush=True)
        results = trainer.fit()
    except (ValueError, FileNotFoundError) as e:  # bad data, paths, exports: a message, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if dist.rank() == 0:
        if "val" in zs:
            print(f"zero-shot val rsum: {zs['val']['rsum']:.2f}")
        print(f"best fine-tuned val rsum: {results['best_val_rsum']:.2f} (epoch {results['best_epoch']}, "
              f"saved in {results['best_dir']})")
        if "test" in results:
            line = f"test of the best model: {_fmt(results['test'])}"
            if "1k_rsum" in results["test"]:
                line += f" | COCO 1K (5-fold) rsum {results['test']['1k_rsum']:.2f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
