#!/usr/bin/env python
"""Export the pretrained towers of a run (any ZeRO stage) as safetensors + config + tokenizer.

    python tools/export.py --run runs/demo --out exports/demo [--tag step_00000600] [--encoders query|momentum]
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (holds config.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="export directory to write")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete one)")
    p.add_argument("--encoders", choices=("query", "momentum"), default="query",
                   help="export the trained query encoders f (default) or the momentum encoders g")
    args = p.parse_args(argv)
    from pretrain.export import export_checkpoint

    try:
        out = export_checkpoint(args.run, args.out, tag=args.tag, which=args.encoders)
    except (FileNotFoundError, RuntimeError, ValueError) as e:  # CheckpointError, ConfigError included
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"exported {args.encoders} encoders of {args.run} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
