#!/usr/bin/env python
"""Check WebDataset shards exactly as the trainer reads them; dump samples; draw a contact sheet.

    python tools/inspect_shards.py SHARDS... [--dump N] [--json] [--report FILE]
                                   [--contact-sheet out.png] [--num 32] [--random] [--seed 0]
                                   [--columns 8] [--thumb 128] [--warn-only] [--quiet]
                                   [--max-pixels N] [--image-key jpg;jpeg;png;webp] [--text-key txt]

SHARDS are shard specs as in `data.train_shards` (tar files, folders, globs, brace patterns, fsspec URLs,
`a::b` sources). Every sample goes through the loader's reading path and checks
(`pretrain/data/inspection.py`): problems are counted under the loader's skip reasons (`shard_error`,
`bad_image`, `invalid_text`, ...; see `pretrain.data.samples.SKIP_REASONS`) plus the layout problems
`duplicate_key`, `split_sample`, `size_mismatch` and `not_in_sizes_json` (checked against the sizes.json
beside the shards). Exit status: 1 when there are problems (0 with --warn-only), 2 when no shard is found.

--dump N prints the first N samples in reading order as the trainer sees them: key, the query after
normalisation, query_id, image_id, clicks and the decoded image size, or the reason the sample is
skipped. --json makes standard output JSON Lines: one object per dumped sample (`shard`, `key`, `query`,
`query_id`, `image_id`, `clicks`, `impressions`, `width`, `height`; or `shard`, `key`, `skip`), then one
line `{"summary": {"shards": [...], "samples": N, "problems": {reason: {"count", "examples"}}}}`.
--report FILE writes that summary object to FILE.

The contact sheet is a PNG grid of the first (or, with --random, a seeded random choice of) N good
samples with their queries drawn under them (a CJK font: see pretrain/fonts.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import fsspec

from pretrain.data.inspection import PROBLEMS, Inspection, contact_sheet, expand_shards
from pretrain.data.samples import MAX_PIXELS


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="inspect_shards.py", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("shards", nargs="+", metavar="SHARDS", help="shard specs: files, folders, globs, brace patterns")
    ap.add_argument("--dump", type=int, default=0, metavar="N", help="print the first N samples as the trainer sees them")
    ap.add_argument("--json", action="store_true", help="standard output as JSON Lines (dumped samples, then summary)")
    ap.add_argument("--report", default=None, metavar="FILE", help="also write the summary as JSON to FILE")
    ap.add_argument("--contact-sheet", default=None, metavar="PNG", help="write a contact sheet here")
    ap.add_argument("--num", type=int, default=32, help="samples on the contact sheet")
    ap.add_argument("--random", action="store_true", help="a random choice of samples instead of the first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--columns", type=int, default=8)
    ap.add_argument("--thumb", type=int, default=128, help="thumbnail side in pixels")
    ap.add_argument("--warn-only", action="store_true", help="exit 0 even when problems are found")
    ap.add_argument("--quiet", action="store_true", help="no per-shard lines")
    g = ap.add_argument_group("reading (as the data.* settings of the run)")
    g.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="data.max_pixels")
    g.add_argument("--image-key", default="jpg;jpeg;png;webp", help="data.image_key: image extensions, ';'-separated")
    g.add_argument("--text-key", default="txt", help="data.text_key")
    g.add_argument("--allow-pipe", action="store_true", help="data.allow_pipe: run pipe: URLs")
    return ap


def _dump_line(view: dict) -> str:
    where = f"{view['shard']}#{view['key']}" if view["key"] is not None else view["shard"]
    if "skip" in view:
        return f"{where}  SKIP {view['skip']}" + (f" ({view['detail']})" if view.get("detail") else "")
    return (f"{where}  query_id={view['query_id']} image_id={view['image_id']} clicks={view['clicks']:g} "
            f"{view['width']}x{view['height']}  {view['query']!r}")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logger = logging.getLogger("pretrain.data")
    level = logger.level
    logger.setLevel(logging.ERROR)  # read errors are counted and shown in the report, not logged too
    try:
        return run(args)
    finally:
        logger.setLevel(level)


def run(args: argparse.Namespace) -> int:
    try:
        shards = expand_shards(args.shards, args.allow_pipe)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not shards:
        print("error: no shards found in " + " ".join(args.shards), file=sys.stderr)
        return 2
    read = {"allow_pipe": args.allow_pipe, "max_pixels": args.max_pixels, "text_ext": args.text_key,
            "image_exts": tuple(e.strip().lower().lstrip(".") for e in args.image_key.split(";") if e.strip())}
    insp = Inspection(dump=max(0, args.dump), pick=args.num if args.contact_sheet else 0, pick_random=args.random,
                      seed=args.seed)
    out = sys.stdout
    width = max(len(s) for s in shards)
    for url in shards:
        entry = insp.add_shard(url, **read)
        if not args.quiet and not args.json:
            print(f"{url:<{width}}  {entry['samples']:>8} samples  {entry['sizes_json']}", file=out)
    summary = insp.summary()
    if args.json:
        for view in insp.dumped:
            print(json.dumps(view, ensure_ascii=False), file=out)
        print(json.dumps({"summary": summary}, ensure_ascii=False), file=out)
    else:
        for view in insp.dumped:
            print(_dump_line(view), file=out)
        print(f"total: {len(shards)} shards, {insp.samples} samples, {insp.total_problems()} problems", file=out)
        for reason in PROBLEMS:
            if insp.counts[reason]:
                print(f"  {reason}: {insp.counts[reason]}  e.g. {', '.join(insp.examples[reason])}", file=out)
    if args.contact_sheet:
        if insp.picked:
            size = contact_sheet(insp.picked, args.contact_sheet, args.columns, args.thumb)
            print(f"contact sheet: {args.contact_sheet} ({len(insp.picked)} samples, {size[0]}x{size[1]} px)",
                  file=sys.stderr if args.json else out)
        else:
            print("warning: no valid sample for the contact sheet", file=sys.stderr)
    if args.report:
        with fsspec.open(args.report, "w") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
    return 1 if insp.total_problems() and not args.warn_only else 0


if __name__ == "__main__":
    sys.exit(main())
