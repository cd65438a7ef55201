#!/usr/bin/env python
"""The learning benchmark: train several settings on the same shards for the same number of samples and
several seeds, evaluate each on held-out data, and print one table (``python tools/bench.py learn``).

    python tools/bench.py learn --config configs/pretrain/learn.yaml \
        --train-shards data/flickr/shards/train/train --val-shards data/flickr/shards/val/train \
        --setting in_batch:wenlan.mode=in_batch --setting wenlan: \
        --setting moco:wenlan.in_batch_block=false,wenlan.distill_alpha=0 --seeds 0 1 --jobs 2

A setting is ``NAME:key=value,key=value`` (config overrides on top of ``--config``; ``NAME:`` alone is the
config as it is). Each (setting, seed) is one run of ``launch/pretrain.py`` in its own process, with
``train.seed`` and ``data.seed`` set to the seed; ``--jobs`` runs that many at once, each with
cores/jobs threads. CPU seconds are the user + system time of the run's process and its loader workers,
less every evaluation's (start-up included); wall seconds likewise exclude the evaluations.
``--eval-every N`` also evaluates every N steps and prints held-out rsum by step.
Every run directory is kept under ``--out``: a rerun reuses a finished run of the same setting, seed and inputs
(delete it to start over); one made with other overrides or inputs is refused, never silently reused.
Every setting's config (keys, values, shards, paths) is checked before any run starts.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIVE: Dict[int, subprocess.Popen] = {}   # the training processes running now, stopped on Ctrl-C
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()
METRICS = ("rsum", "t2i_hit@1", "t2i_hit@5", "t2i_hit@10", "i2t_hit@1", "i2t_hit@5", "i2t_hit@10")


def parse_setting(text: str) -> Tuple[str, List[str]]:
    name, colon, rest = text.partition(":")
    if not name or not all(c.isalnum() or c in "_-.+" for c in name):
        raise ValueError(f"--setting '{text}': give NAME:key=value,key=value (a name of letters, digits, _-.+)")
    if not colon:  # 'in_batch' alone would silently run the config as it is under that name
        raise ValueError(f"--setting '{text}' has no ':': give NAME:key=value,key=value, or '{text}:' for the "
                         f"config as it is")
    overrides = [o.strip() for o in rest.split(",") if o.strip()]
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"--setting '{text}': '{o}' is not key=value")
    return name, overrides


def run_inputs(args) -> Dict[str, Any]:
    return {"config": os.path.abspath(args.config), "train_shards": args.train_shards,
            "val_shards": args.val_shards, "steps": args.steps, "eval_every": args.eval_every}


def finished_run(args, name: str, overrides: List[str], seed: int) -> Optional[Dict[str, Any]]:
    """The stored result of this (setting, seed) under --out, or None; ValueError when it was made with other
    overrides or inputs (checked for every run before any starts)."""
    run_dir = os.path.join(args.out, f"{name}_seed{seed}")
    done = os.path.join(run_dir, "bench_result.json")
    if not os.path.isfile(done):
        return None
    with open(done) as f:
        old = json.load(f)
    inputs = run_inputs(args)
    if old.get("overrides") != overrides or old.get("inputs", inputs) != inputs:
        raise ValueError(f"{run_dir} holds a finished run of setting {name} seed {seed} made with other overrides "
                         f"or inputs ({old.get('overrides')}, {old.get('inputs')}); delete it, rename the setting "
                         f"or choose another --out")
    return old


def run_overrides(args, overrides: List[str], seed: int, run_dir: str) -> List[str]:
    """The config overrides of one (setting, seed) run, the bench's own first, the setting's last."""
    return [f"data.train_shards={args.train_shards}", f"data.val_shards={args.val_shards}",
            f"train.seed={seed}", f"data.seed={seed}", f"train.output_dir={run_dir}",
            f"train.eval_every={args.eval_every}", f"train.save_every={10 ** 9}"] + \
        (["train.steps=%d" % args.steps] if args.steps else []) + overrides


def check_settings(args, settings: List[Tuple[str, List[str]]]) -> None:
    """Load and check the config of every setting, shards and paths included, before any run starts: a typo in
    the last setting must not wait for the first ones to train. Raises ValueError naming the setting."""
    from pretrain.config import ConfigError, check_paths, load_config
    for name, overrides in settings:
        try:
            cfg = check_paths(load_config(args.config, run_overrides(args, overrides, args.seeds[0],
                                                                     os.path.join(args.out, name))))
        except ConfigError as e:
            raise ValueError(f"setting {name}: {e}") from None
        if not cfg.data.val_shards:
            raise ValueError(f"setting {name}: no held-out shards to evaluate on (--val-shards is empty)")


def last_error(log_path: str) -> str:
    """The run's own last 'error:' line, so that a failed run says why without opening its log."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip().lower().startswith("error")]
    except OSError:
        return ""
    return f": {lines[-1]}" if lines else ""


def run_one(args, name: str, overrides: List[str], seed: int, threads: int) -> Dict[str, Any]:
    """Train and evaluate one (setting, seed) that has no finished run under --out (main checks that)."""
    run_dir = os.path.join(args.out, f"{name}_seed{seed}")
    done = os.path.join(run_dir, "bench_result.json")
    inputs = run_inputs(args)
    cmd = [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config", args.config, "--resume",
           "never"] + run_overrides(args, overrides, seed, run_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if os.path.isdir(run_dir):
        import shutil
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    t0 = time.perf_counter()
    with open(os.path.join(run_dir, "bench.log"), "w") as log:
        with _LIVE_LOCK:
            if _STOPPING.is_set():
                raise RuntimeError("interrupted")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            _LIVE[proc.pid] = proc
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        with _LIVE_LOCK:
            _LIVE.pop(proc.pid, None)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"setting {name} seed {seed} failed (exit {proc.returncode})"
                           f"{last_error(os.path.join(run_dir, 'bench.log'))}; see {run_dir}/bench.log")
    curve, curve_m = read_evals(os.path.join(run_dir, "eval")), read_evals(os.path.join(run_dir, "eval_momentum"))
    if not curve:
        raise RuntimeError(f"setting {name} seed {seed}: no evaluation written; is data.val_shards set?")
    ev = curve[-1]
    ev_m = curve_m[-1] if curve_m else {}
    samples = 0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            samples = max(samples, int(rec.get("samples", 0) or 0))
    cpu = usage.ru_utime + usage.ru_stime
    every = curve + curve_m  # every evaluation, the ones during training too, is left out of the cost
    eval_wall = sum(e.get("eval_seconds", 0.0) for e in every)
    eval_cpu = sum(e.get("eval_cpu_seconds", 0.0) for e in every)
    res = {"setting": name, "seed": seed, "overrides": overrides, "inputs": inputs, "wall_s": wall - eval_wall,
           "cpu_s": cpu - eval_cpu, "run_cpu_s": cpu, "samples": samples,
           "momentum_towers": {k: ev_m.get(k) for k in METRICS} if ev_m else None, "step": ev.get("step"),
           "eval_images": ev.get("t2i_gallery_size"), "eval_queries": ev.get("t2i_num_queries"),
           **{k: ev.get(k) for k in METRICS},
           "curve": {str(e["step"]): e.get("rsum") for e in curve},
           "curve_momentum": {str(e["step"]): e.get("rsum") for e in curve_m} if curve_m else None}
    with open(done, "w") as f:
        json.dump(res, f, indent=1)
    return res


def read_evals(folder: str) -> List[Dict[str, Any]]:
    """The evaluations a run wrote (``step_XXXXXXXX.json``), in step order."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "step_*.json"))):
        with open(path) as f:
            out.append(json.load(f))
    return out


def curve_table(results: List[Dict[str, Any]], names: List[str]) -> List[str]:
    """Held-out rsum by step (mean over seeds), one row per setting (and its momentum towers): where a run's
    held-out result stops improving while its training loss still falls."""
    def curve_of(r, key):
        return {int(k): v for k, v in (r.get(key) or {}).items() if v is not None}
    rows = []
    for name in names:
        rs = [r for r in results if r["setting"] == name]
        for key, label in (("curve", name), ("curve_momentum", name + " [g]")):
            curves = [curve_of(r, key) for r in rs]
            if rs and all(curves):
                rows.append((label, curves))
    steps = sorted(set().union(*[c for _, cs in rows for c in cs])) if rows else []
    if len(steps) < 2:
        return []
    head = f"{'held-out rsum by step':<22}" + "".join(f"{s:>7}" for s in steps)
    lines = [head, "-" * len(head)]
    for label, curves in rows:
        cells = []
        for s in steps:
            vals = [c[s] for c in curves if s in c]
            cells.append(f"{statistics.mean(vals):>7.1f}" if len(vals) == len(curves) else f"{'-':>7}")
        lines.append(f"{label:<22}" + "".join(cells))
    lines.append("mean over seeds (--eval-every); the last column is the table above")
    return lines


def summarise(results: List[Dict[str, Any]], names: List[str]) -> List[str]:
    def cell(vals: List[float], fmt: str) -> str:
        if len(vals) == 1:
            return format(vals[0], fmt)
        return f"{format(statistics.mean(vals), fmt)} ±{format((max(vals) - min(vals)) / 2, fmt)}"
    head = (f"{'setting':<22}{'seeds':>6}{'rsum':>14}{'t2i R@1':>14}{'t2i R@10':>14}{'i2t R@1':>14}"
            f"{'samples':>9}{'wall s':>9}{'CPU s':>9}")
    lines = [head, "-" * len(head)]
    rows = []
    for name in names:
        rs = [r for r in results if r["setting"] == name]
        if rs:
            rows.append((name, rs, [r for r in rs]))
            if all(r.get("momentum_towers") for r in rs):   # the momentum towers evaluated too
                rows.append((name + " [g]", rs, [dict(r, **r["momentum_towers"]) for r in rs]))
    for name, rs, ms in rows:
        lines.append(f"{name:<22}{len(rs):>6}{cell([r['rsum'] for r in ms], '.1f'):>14}"
                     f"{cell([r['t2i_hit@1'] for r in ms], '.3f'):>14}{cell([r['t2i_hit@10'] for r in ms], '.3f'):>14}"
                     f"{cell([r['i2t_hit@1'] for r in ms], '.3f'):>14}{rs[0]['samples']:>9}"
                     f"{statistics.mean(r['wall_s'] for r in rs):>9.0f}{statistics.mean(r['cpu_s'] for r in rs):>9.0f}")
    first = results[0] if results else {}
    lines.append(f"mean ± half-range over seeds; held-out: {first.get('eval_queries')} captions x "
                 f"{first.get('eval_images')} images; rsum = sum of R@1/5/10 both directions, in percent; "
                 f"[g]: the same runs' momentum towers")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "pretrain", "learn.yaml"))
    p.add_argument("--train-shards", required=True)
    p.add_argument("--val-shards", required=True)
    p.add_argument("--setting", action="append", required=True, help="NAME:key=value,key=value (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=0, help="override train.steps of every setting (0: the config's)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate every N steps and print held-out rsum by step (0: at the end only); "
                        "the evaluations are left out of the wall and CPU seconds")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--out", default="runs/bench_learn", help="folder of the run directories")
    p.add_argument("--json", default="bench_learn.json")
    args = p.parse_args(argv)
    try:
        settings = [parse_setting(s) for s in args.setting]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, what in ((args.config, "--config"),):
        if not os.path.isfile(path):
            print(f"error: {what} {path} does not exist", file=sys.stderr)
            return 2
    if args.eval_every < 0 or args.steps < 0 or args.jobs < 1:
        print("error: --eval-every and --steps must be >= 0 and --jobs >= 1", file=sys.stderr)
        return 2
    names = [n for n, _ in settings]
    if len(set(names)) != len(names):
        print("error: two --setting share a name", file=sys.stderr)
        return 2
    threads = max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    jobs = [(n, ov, s) for s in args.seeds for n, ov in settings]
    try:
        check_settings(args, settings)
        stored = [finished_run(args, n, ov, s) for n, ov, s in jobs]  # a finished run is reused, not run again
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results: List[Dict[str, Any]] = []
    pool = ThreadPoolExecutor(max_workers=max(args.jobs, 1))
    try:
        futures = [None if old is not None else pool.submit(run_one, args, n, ov, s, threads)
                   for (n, ov, s), old in zip(jobs, stored)]
        for (n, _, s), old, fut in zip(jobs, stored, futures):
            try:
                r = old if fut is None else fut.result()
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            results.append(r)
            print(f"[learn] {n} seed {s}: rsum {r['rsum']:.1f}, t2i R@1 {r['t2i_hit@1']:.3f}, "
                  f"{r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} CPU s", flush=True)
    except KeyboardInterrupt:  # Ctrl-C, or SIGINT to this process alone: stop every run, start no other
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _STOPPING.set()
        pool.shutdown(wait=False, cancel_futures=True)
        with _LIVE_LOCK:
            running = list(_LIVE.values())
        for proc in running:
            proc.kill()
        pool.shutdown(wait=True)
        finished = sum(os.path.isfile(os.path.join(args.out, f"{n}_seed{s}", "bench_result.json")) for n, _, s in jobs)
        print(f"interrupted: stopped {len(running)} running run(s); the {finished} finished one(s) are kept "
              f"under {args.out} and reused by the same command, which runs the others from the start",
              file=sys.stderr)
        return 130
    finally:
        pool.shutdown(wait=True)
    table = summarise(results, names)
    curves = curve_table(results, names)
    if curves:
        table += [""] + curves
    print("\n".join(table))
    with open(args.json, "w") as f:
        json.dump({"config": args.config, "train_shards": args.train_shards, "val_shards": args.val_shards,
                   "seeds": args.seeds, "runs": results, "table": table}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
