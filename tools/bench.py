#!/usr/bin/env python
"""Benchmarks (a tool, not a test). Modes:

  train   the real trainer on given shards: samples/s after warm-up, the time split by phase, FLOPs per
          step (torch.utils.flop_counter) and achieved FLOP/s next to a measured matmul peak; with
          --compare-in-batch the same towers and data in the in-batch (OpenCLIP loss) mode, interleaved
          in blocks in one process, and the ratio WenLan / in-batch.
  memory  per-process model-state bytes (parameters, gradients, optimizer state, momentum encoders),
          counted after a backward and before the optimizer step (their peak), for ZeRO stage 0 and 3
          with 2 processes, and their ratio.
  data    the loader alone (decode, transform, tokenise): samples/s, per worker.
  build   the shard builder: images/s per worker process; with --rows N --images M a synthetic click log
          built by each --engine (local, spark): rows/s, images/s, CPU s, peak RSS, image fetches/encodes.
  learn   settings trained on real captioned photos for the same samples and several seeds, evaluated on
          held-out photos: one table of retrieval metrics with their spread, wall and CPU seconds
          (tools/bench_learn.py; its own options: python tools/bench.py learn --help).
  search  the vector index of tools/index.py (pretrain/search/ann.py) on --n synthetic unit vectors of --dim
          dimensions: c_j = normalize(N(0, I_d)) for j < --centres, x = normalize(c_j + sigma N(0, I_d)/sqrt(d))
          with j uniform (--sigma 1.0: a point's noise is as long as its centre), streamed in chunks from
          per-chunk seeds. Per --kinds (exact = IndexFlatIP, auto = plan_index's choice for --memory, or a kind):
          the build in a child process (wall and CPU s, its peak RSS = VmHWM), search parameters tuned on 500
          queries of their own, recall@k of 1000 other queries against exact search over the same stream, p50 /
          p99 latency of single-query searches (one query at a time, faiss threads = 1), index bytes.

  python tools/bench.py train --config configs/pretrain/bench.yaml --shards data/demo/shards/train --compare-in-batch
  python tools/bench.py memory --config configs/pretrain/bench.yaml --shards data/demo/shards/train
  python tools/bench.py data --config configs/pretrain/bench.yaml --shards data/demo/shards/train --workers 2
  python tools/bench.py build --workers 2          (synthetic 640x480 photos, resized to 256)
  python tools/bench.py build --log data/demo/raw/clicklog.tsv --images-root data/demo/raw --workers 2
  python tools/bench.py build --rows 1000000 --queries 200000 --images 2000 --workers 2 --engine local,spark
  python tools/bench.py search --n 1000000 --dim 256 --centres 10000 --sigma 1.0 --memory 2.5G --kinds exact,auto

Output: a table on the terminal and a JSON file (--json, default bench_<mode>.json).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PHASES = ("data_wait", "key_forward", "query_forward", "backward", "optimizer", "momentum", "gather_enqueue")


def machine() -> Dict[str, Any]:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(device, seconds: float = 2.0) -> float:
    """Measured fp32 matmul FLOP/s of this device: the best of square products of a few sizes."""
    return max(_matmul_flops(device, seconds / 3, n) for n in (1024, 2048, 4096))


def _matmul_flops(device, seconds: float, n: int) -> float:
    import torch
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def build_trainer(args, overrides: List[str], mode: str, out_dir: str):
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    ov = list(overrides) + [f"wenlan.mode={mode}", f"train.output_dir={out_dir}", "data.val_shards=",
                            f"data.train_shards={args.shards}"]
    if args.workers is not None:
        ov.append(f"data.num_workers={args.workers}")
    return Trainer(load_config(args.config, ov), resume="never")


def run_steps(tr, it, n: int, timings: Dict[str, float]) -> int:
    """n optimizer steps of the real trainer's pieces; returns samples processed."""
    samples = 0
    for _ in range(n):
        for _ in range(tr.cfg.train.grad_accum_steps):
            t0 = time.perf_counter()
            batch = tr._to_device(next(it))
            timings["data_wait"] = timings.get("data_wait", 0.0) + time.perf_counter() - t0
            tr.wenlan.micro_step(batch, tr.step, timings)
            samples += batch["image"].shape[0] * tr.world
        tr.wenlan.boundary(tr.step, timings)
        tr.step += 1
    return samples


def count_flops(tr, it) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    batch = tr._to_device(next(it))
    with FlopCounterMode(display=False) as fc:
        tr.wenlan.micro_step(batch, tr.step, {})
        tr.wenlan.boundary(tr.step, {})
    tr.step += 1
    return float(fc.get_total_flops()) * tr.cfg.train.grad_accum_steps


def mode_train(args, overrides) -> Dict[str, Any]:
    modes = ["momentum", "in_batch"] if args.compare_in_batch else ["momentum"]
    tmp = tempfile.mkdtemp(prefix="bench_")
    trainers = {m: build_trainer(args, overrides, m, os.path.join(tmp, m)) for m in modes}
    iters = {m: iter(trainers[m].stream) for m in modes}
    for m in modes:
        trainers[m].engine.train()
        run_steps(trainers[m], iters[m], args.warmup, {})
    flops = {m: count_flops(trainers[m], iters[m]) for m in modes}
    results: Dict[str, Dict[str, Any]] = {m: {"samples": 0, "seconds": 0.0, "timings": {}, "blocks": []}
                                          for m in modes}
    gc.collect()
    rss_start = rss_mib()
    blocks = max(1, args.steps // args.block)
    rss_trace = []  # (steps done per mode, MiB) after each block: growth shows as a trend, not one number
    for b in range(blocks):  # A B A B ... so that drift of a shared machine hits both alike
        for m in modes:
            t0 = time.perf_counter()
            n = run_steps(trainers[m], iters[m], args.block, results[m]["timings"])
            dt = time.perf_counter() - t0
            results[m]["samples"] += n
            results[m]["seconds"] += dt
            results[m]["blocks"].append(n / dt)
        rss_trace.append(((b + 1) * args.block, round(rss_mib(), 1)))
        if args.progress and (b + 1) % max(1, blocks // 20) == 0:
            print(f"[bench] {(b + 1) * args.block}/{blocks * args.block} steps, RSS {rss_trace[-1][1]:.0f} MiB",
                  flush=True)
    gc.collect()
    rss_end = rss_mib()
    peak = matmul_peak(trainers[modes[0]].device)
    out: Dict[str, Any] = {"mode": "train", "machine": machine(), "config": args.config, "overrides": overrides,
                           "steps_timed": blocks * args.block, "warmup": args.warmup, "matmul_peak_flops": peak,
                           "rss_mib_start": rss_start, "rss_mib_end": rss_end, "rss_trace": rss_trace}
    for m in modes:
        r = results[m]
        sps = r["samples"] / r["seconds"]
        step_s = r["seconds"] / (blocks * args.block)
        out[m] = {"samples_per_s": sps, "step_seconds": step_s, "flops_per_step": flops[m],
                  "achieved_flops": flops[m] / step_s, "fraction_of_matmul_peak": flops[m] / step_s / peak,
                  "time_split": {k: r["timings"].get(k, 0.0) / r["seconds"] for k in PHASES}}
    if args.compare_in_batch:
        out["ratio_momentum_over_in_batch"] = out["momentum"]["samples_per_s"] / out["in_batch"]["samples_per_s"]
        out["flop_ratio_in_batch_over_momentum"] = flops["in_batch"] / flops["momentum"]
        # adjacent blocks share the machine's state: the median of their ratios resists bursts of load
        pairs = sorted(a / b for a, b in zip(results["momentum"]["blocks"], results["in_batch"]["blocks"]))
        out["ratio_median_of_block_pairs"] = statistics.median(pairs)
        out["block_pair_ratios"] = pairs
    lines = [f"machine: {out['machine']['cpu']} ({out['machine']['cores']} cores), torch {out['machine']['torch']}",
             f"matmul peak (fp32, measured): {peak / 1e9:.1f} GFLOP/s",
             f"{'mode':<10}{'samples/s':>11}{'step s':>9}{'GFLOP/step':>12}{'GFLOP/s':>10}{'% peak':>8}  " +
             " ".join(f"{k[:9]:>9}" for k in PHASES)]
    for m in modes:
        o = out[m]
        lines.append(f"{m:<10}{o['samples_per_s']:>11.1f}{o['step_seconds']:>9.3f}{o['flops_per_step'] / 1e9:>12.1f}"
                     f"{o['achieved_flops'] / 1e9:>10.1f}{100 * o['fraction_of_matmul_peak']:>7.1f}%  " +
                     " ".join(f"{100 * o['time_split'][k]:>8.1f}%" for k in PHASES))
    if args.compare_in_batch:
        lines.append(f"WenLan / in-batch samples/s: {out['ratio_momentum_over_in_batch']:.3f} "
                     f"(median over {len(pairs)} adjacent block pairs: {out['ratio_median_of_block_pairs']:.3f}; "
                     f"FLOP bound: {out['flop_ratio_in_batch_over_momentum']:.3f})")
    half = rss_trace[len(rss_trace) // 2][1] if rss_trace else rss_start
    lines.append(f"resident memory: {rss_start:.0f} MiB after warm-up, {half:.0f} MiB at half-way, "
                 f"{rss_end:.0f} MiB at the end ({blocks * args.block} steps per mode)")
    out["table"] = lines
    return out


def _tensor_bytes(objs) -> int:
    """Bytes of distinct storages reachable from ``objs`` (dicts, lists, tensors, parameters' ds_tensor)."""
    import torch
    seen, total, stack, visited = set(), 0, list(objs), set()
    while stack:
        o = stack.pop()
        if id(o) in visited:
            continue
        visited.add(id(o))
        if isinstance(o, torch.Tensor):
            for t in (o, getattr(o, "ds_tensor", None), o.grad if o.is_leaf else None):
                if isinstance(t, torch.Tensor) and t.numel() > 0:
                    st = t.untyped_storage()
                    if st.data_ptr() not in seen:
                        seen.add(st.data_ptr())
                        total += st.nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set)):
            stack.extend(o)
    return total


def _memory_worker(rank, world, port, config, overrides, stage, outfile):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    torch.set_num_threads(1)
    from pretrain.config import load_config
    from pretrain.trainer import Trainer
    cfg = load_config(config, list(overrides) + [f"train.zero_stage={stage}", "data.num_workers=0",
                                                 "train.output_dir=" + tempfile.mkdtemp(prefix="benchmem_")])
    tr = Trainer(cfg, resume="never")
    it = iter(tr.stream)
    run_steps(tr, it, 2, {})
    # measure at the peak of the model state: gradients of a full backward present, before the step
    tr.wenlan.micro_step(tr._to_device(next(it)), tr.step, {})
    gc.collect()
    opt = tr.engine.optimizer
    opt_objs = [vars(opt)] + ([vars(opt.optimizer)] if hasattr(opt, "optimizer") else [])
    params = list(tr.engine.module.parameters())
    parts = {
        "parameters_and_gradients": _tensor_bytes(params),
        "optimizer_incl_master_and_grad_partitions": _tensor_bytes(opt_objs),
        "momentum_encoders": _tensor_bytes(list(tr.wenlan.keys.key.parameters())),
        # each storage once, whoever reaches it
        "total": _tensor_bytes(params + opt_objs + list(tr.wenlan.keys.key.parameters())),
    }
    tr.wenlan.boundary(tr.step, {})
    if rank == 0:
        with open(outfile, "w") as f:
            json.dump(parts, f)


def mode_memory(args, overrides) -> Dict[str, Any]:
    import socket
    import torch.multiprocessing as mp
    out: Dict[str, Any] = {"mode": "memory", "machine": machine(), "config": args.config, "processes": 2}
    for stage in (0, 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        f = os.path.join(tempfile.mkdtemp(prefix="benchmem_"), "result.json")
        ov = list(overrides) + [f"data.train_shards={args.shards}", "data.val_shards="]
        mp.spawn(_memory_worker, args=(2, port, args.config, ov, stage, f), nprocs=2, join=True)
        out[f"zero{stage}"] = json.load(open(f))
    out["ratio_zero3_over_zero0"] = out["zero3"]["total"] / out["zero0"]["total"]
    out["table"] = [f"{'':<44}{'ZeRO-0 MiB':>12}{'ZeRO-3 MiB':>12}"] + [
        f"{k:<44}{out['zero0'][k] / 2**20:>12.1f}{out['zero3'][k] / 2**20:>12.1f}" for k in out["zero0"]] + [
        f"model-state memory per process, ZeRO-3 / ZeRO-0 (2 processes): {out['ratio_zero3_over_zero0']:.3f}"]
    return out


def mode_data(args, overrides) -> Dict[str, Any]:
    from pretrain.config import load_config
    from pretrain.data import ShardStream
    from pretrain.models import build_tokenizer
    from pretrain.trainer import build_transforms
    import timm

    cfg = load_config(args.config, list(overrides))
    backbone = timm.create_model(cfg.model.image.name, pretrained=False, num_classes=0, **cfg.model.image.timm_kwargs)
    train_tf, _ = build_transforms(cfg, backbone)
    workers = cfg.data.num_workers if args.workers is None else args.workers
    stream = ShardStream(args.shards, batch_size=cfg.train.micro_batch_size, rank=0, world_size=1,
                         num_workers=workers, seed=0, shuffle_buffer=cfg.data.shuffle_buffer,
                         image_transform=train_tf, tokenizer=build_tokenizer(cfg.model.text),
                         max_length=cfg.model.text.max_length)
    it = iter(stream)
    for _ in range(args.warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(args.steps):
        n += next(it)["image"].shape[0]
    dt = time.perf_counter() - t0
    out = {"mode": "data", "machine": machine(), "shards": args.shards, "workers": workers,
           "samples_per_s": n / dt, "samples_per_s_per_worker": n / dt / max(workers, 1),
           "image_size": cfg.model.image.image_size, "batch": cfg.train.micro_batch_size}
    out["table"] = [f"loader: {out['samples_per_s']:.1f} samples/s with {workers} worker(s) "
                    f"({out['samples_per_s_per_worker']:.1f} per worker), {cfg.model.image.image_size} px, "
                    f"batch {cfg.train.micro_batch_size}, {args.steps} batches after {args.warmup} warm-up"]
    return out


def synthetic_photo_log(folder: str, n: int, size=(640, 480), seed: int = 0) -> str:
    """A click log of ``n`` distinct photo-sized JPEGs (smooth colour fields plus noise, so that JPEG
    decoding and encoding cost about what real photos cost), one query per image."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lines = ["query\timage\tclicks\timpressions"]
    for i in range(n):
        base = np.stack([np.sin(xx / rng.uniform(20, 200) + rng.uniform(0, 6)) * 80 + 128
                         for _ in range(3)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, "images", f"{i:06d}.jpg"), quality=90)
        lines.append(f"query {i}\timages/{i:06d}.jpg\t{1 + i % 5}\t10")
    path = os.path.join(folder, "clicklog.tsv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def synthetic_click_log(folder: str, rows: int, images: int, queries: int, images_per_query: int = 0,
                        side: int = 96, seed: int = 0) -> str:
    """A click log of ``rows`` rows over ``queries`` queries and ``images`` small distinct JPEGs (``side`` x
    3/4 ``side``, colour fields plus noise). Each row: a uniformly drawn query and image (with
    ``images_per_query`` K > 0: one of the query's K images, as a query's clicks concentrate on a few
    pictures), 1-3 clicks, 1-20 impressions. Written in blocks: the generator's memory does not grow."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    w, h = side, side * 3 // 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(images):
        a, b, c = rng.uniform(4, 40, 3)
        base = np.stack([np.sin(xx / a + c) * 80 + 128, np.cos(yy / b) * 80 + 128, (xx + yy) / (w + h) * 255], -1)
        img = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, "images", f"{i:06d}.jpg"), quality=85)
    path = os.path.join(folder, "clicklog.tsv")
    block = 1_000_000
    with open(path, "w", encoding="utf-8") as f:
        f.write("query\timage\tclicks\timpressions\n")
        for start in range(0, rows, block):
            n = min(block, rows - start)
            q = rng.integers(0, queries, n)
            if images_per_query > 0:
                img = (q * 7919 + rng.integers(0, images_per_query, n) * 104729) % images
            else:
                img = rng.integers(0, images, n)
            clicks = rng.integers(1, 4, n)
            impressions = clicks + rng.integers(0, 18, n)
            f.write("".join(f"query {a} 查询\timages/{b:06d}.jpg\t{c}\t{d}\n"
                            for a, b, c, d in zip(q.tolist(), img.tolist(), clicks.tolist(), impressions.tolist())))
    return path


def _run_build(cmd) -> Dict[str, Any]:
    """Run a build as a child process: wall seconds, CPU seconds of it and its workers, the largest peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "largest_process_peak_rss_mib": after.ru_maxrss / 1024}


def mode_build_log(args, overrides) -> Dict[str, Any]:
    """``build --rows N --images M``: a synthetic click log, built by each engine of ``--engine``."""
    src = tempfile.mkdtemp(prefix="benchlog_")
    queries = args.queries or max(1, args.rows // 5)
    t0 = time.perf_counter()
    log_path = synthetic_click_log(src, args.rows, args.images, queries, args.images_per_query, args.image_side)
    gen_s = time.perf_counter() - t0
    workers = args.workers or 2
    out = {"mode": "build", "rows": args.rows, "images": args.images, "queries": queries,
           "images_per_query": args.images_per_query, "image_side": args.image_side, "workers": workers,
           "log_bytes": os.path.getsize(log_path), "generate_s": gen_s, "options": list(overrides), "engines": {},
           "table": []}
    for engine in args.engine.split(","):
        out_dir = tempfile.mkdtemp(prefix=f"benchbuild_{engine}_")
        cmd = [sys.executable, os.path.join(ROOT, "tools", "build_shards.py"), log_path, "--out", out_dir,
               "--workers", str(workers), "--no-progress", "--engine", engine, "--overwrite"]
        if engine == "spark":
            cmd += ["--spark-master", args.spark_master]
        run = _run_build(cmd + list(overrides))
        with open(os.path.join(out_dir, "report.json")) as f:
            report = json.load(f)
        shutil.rmtree(out_dir, ignore_errors=True)
        img = report["images"]
        r = {**run, "input_rows": report["input_rows"], "samples": report["accounting"]["written_samples"],
             "distinct_images": img["distinct_references"],
             "image_fetches": img["fetches"] + report["run"]["write_fetches"],
             "image_encodes": img["encodes"] + report["run"]["write_encodes"],
             "bad_rows": report["accounting"]["bad_rows"], "peak_rss_mib": report["run"]["peak_rss"],
             "time_s": report["run"]["time_s"]}
        r["rows_per_s"] = r["input_rows"] / run["wall_s"]
        r["images_per_s"] = r["distinct_images"] / run["wall_s"]
        r["rows_per_cpu_s"] = r["input_rows"] / max(run["cpu_s"], 1e-9)
        out["engines"][engine] = r
        out["table"].append(
            f"{engine}: {r['input_rows']:,} rows, {r['distinct_images']:,} images -> {r['samples']:,} samples; "
            f"{run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} CPU s; {r['rows_per_s']:,.0f} rows/s, "
            f"{r['images_per_s']:,.1f} images/s; peak RSS main {r['peak_rss_mib']['main_mib']:.0f} MiB "
            f"(largest process {run['largest_process_peak_rss_mib']:.0f} MiB); "
            f"fetches {r['image_fetches']:,}, encodes {r['image_encodes']:,}")
    shutil.rmtree(src, ignore_errors=True)
    out["machine"] = machine()  # imports torch: after the builds, whose peak RSS would count it (kept over exec)
    return out


def mode_build(args, overrides) -> Dict[str, Any]:
    if args.rows:
        return mode_build_log(args, overrides)
    out_dir = tempfile.mkdtemp(prefix="benchbuild_")
    workers = args.workers or 1
    log_path, images_root, source = args.log, args.images_root, args.log
    if not log_path:
        src = tempfile.mkdtemp(prefix="benchphotos_")
        log_path, images_root = synthetic_photo_log(src, args.photos), src
        source = f"{args.photos} synthetic 640x480 JPEGs"
        overrides = ["--resize", "256"] + list(overrides)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "build_shards.py"), log_path, "--out", out_dir,
           "--workers", str(workers), "--no-progress"] + \
        (["--images-root", images_root] if images_root else []) + list(overrides)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with open(os.path.join(out_dir, "report.json")) as f:
        report = json.load(f)
    run = report["run"]
    images = report["images"]["unique_images"]
    build_s = run["time_s"]["total"]
    out = {"mode": "build", "machine": machine(), "source": source, "options": list(overrides), "workers": workers,
           "unique_images": images, "samples_written": run["samples_written"], "build_seconds": build_s,
           "process_seconds": wall, "images_per_s": images / build_s,
           "images_per_s_per_worker": images / build_s / workers}
    out["table"] = [f"builder: {images} images ({run['samples_written']} pairs) in {build_s:.1f} s = "
                    f"{out['images_per_s']:.1f} images/s with {workers} worker(s) "
                    f"({out['images_per_s_per_worker']:.1f} per worker; {wall:.1f} s for the whole process); "
                    f"source: {source}"]
    return out


# ----------------------------------------------------------------------------------------------- search
def synthetic_centres(dim: int, centres: int, seed: int):
    """``centres`` unit vectors c_j = normalize(N(0, I_d)), the same for a given seed."""
    import numpy as np
    c = np.random.default_rng((seed, 0)).standard_normal((centres, dim), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def synthetic_vectors(centre_vectors, n: int, sigma: float, seed: int, chunk_rows: int = 65_536):
    """``n`` vectors normalize(c_j + sigma N(0, I_d) / sqrt(d)), j uniform over the centres, in chunks of
    ``chunk_rows``; chunk i comes from its own generator (seed, 1, i): the same stream can be replayed."""
    import numpy as np
    dim = centre_vectors.shape[1]
    for i, start in enumerate(range(0, n, chunk_rows)):
        rng = np.random.default_rng((seed, 1, i))
        m = min(chunk_rows, n - start)
        x = centre_vectors[rng.integers(0, len(centre_vectors), m)]
        x += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(sigma / dim ** 0.5)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x


def _vm_hwm_mib() -> float:
    """Peak resident set of this process (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _search_build(spec_path: str) -> int:
    """Child process of ``search``: plan, sample, train and fill one index from the synthetic stream, tune it on
    its own queries against exact search, write it. Alone in its process, so that VmHWM is the build's."""
    import faiss
    import numpy as np
    from pretrain.search import ann

    with open(spec_path) as f:
        spec = json.load(f)
    n, dim, seed = spec["n"], spec["dim"], spec["seed"]
    centres = synthetic_centres(dim, spec["centres"], seed)

    def stream(stream_seed, rows):
        return synthetic_vectors(centres, rows, spec["sigma"], stream_seed)

    kind = spec["kind"]
    plan = (ann.plan_index(n, dim, spec["memory_bytes"], exact_below=spec["exact_below"]) if kind == "auto" else
            ann.plan_index(n, dim, spec["memory_bytes"], kind="flat" if kind == "exact" else kind))
    times: Dict[str, Dict[str, float]] = {}

    def timed(name, fn):
        w, c = time.perf_counter(), time.process_time()
        value = fn()
        times[name] = {"wall_s": round(time.perf_counter() - w, 3), "cpu_s": round(time.process_time() - c, 3)}
        return value

    def sample():  # the caller's part in tools/index.py: random rows of the collection, one pass
        want = ann.train_sample_size(plan, n)
        if not want:
            return None
        pick = np.sort(np.random.default_rng((seed, 2)).choice(n, size=want, replace=False))
        out, start = [], 0
        for x in stream(seed, n):
            sel = pick[(pick >= start) & (pick < start + len(x))] - start
            out.append(x[sel])
            start += len(x)
        return np.concatenate(out)

    train = timed("sample", sample)
    index = timed("build", lambda: ann.build_index(plan, stream(seed, n), train, threads=spec["threads"]))
    del train
    peak_build = _vm_hwm_mib()
    tq = np.concatenate(list(stream(seed + 2, spec["tune_queries"])))
    _, true_ids = timed("tune_ground_truth", lambda: ann.exact_topk(tq, stream(seed, n), spec["k"]))
    tuned = timed("tune", lambda: ann.tune(index, tq, true_ids, k=spec["k"], target=spec["target"]))
    timed("write", lambda: faiss.write_index(index, spec["out"]))
    result = {"plan": plan, "times": times, "tuned": tuned, "peak_rss_build_mib": round(peak_build, 1),
              "peak_rss_process_mib": round(_vm_hwm_mib(), 1), "index_bytes": os.path.getsize(spec["out"]),
              "ntotal": int(index.ntotal)}
    with open(spec["out"] + ".json", "w") as f:
        json.dump(result, f)
    return 0


def mode_search(args, overrides) -> Dict[str, Any]:
    """``search``: each kind built in a child process from the synthetic stream (peak RSS = the child's VmHWM),
    then searched here with held-out queries against exact ground truth computed over the same stream."""
    import faiss
    import numpy as np
    from pretrain.search import ann

    nq = args.queries or 1000
    memory = ann.parse_bytes(args.memory)
    centres = synthetic_centres(args.dim, args.centres, args.seed)
    queries = np.concatenate(list(synthetic_vectors(centres, nq, args.sigma, args.seed + 1)))
    w, c = time.perf_counter(), time.process_time()
    _, true_ids = ann.exact_topk(queries, synthetic_vectors(centres, args.n, args.sigma, args.seed), args.k)
    gt = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}
    out: Dict[str, Any] = {
        "mode": "search", "n": args.n, "dim": args.dim, "centres": args.centres, "sigma": args.sigma,
        "seed": args.seed, "queries": nq, "tune_queries": args.tune_queries, "k": args.k, "memory_bytes": memory,
        "target_recall": args.target_recall, "threads": args.threads, "exact_below": args.exact_below,
        "generator": "c_j = normalize(N(0, I_d)), j < centres; x = normalize(c_j + sigma N(0, I_d) / sqrt(d)), j "
                     "uniform; collection seed S, evaluation queries S+1, tuning queries S+2",
        "latency": "single-query searches, one at a time, faiss threads = 1", "ground_truth": gt, "kinds": {}}
    for kind in args.kinds.split(","):
        path = os.path.join(tempfile.mkdtemp(prefix=f"benchsearch_{kind}_"), "index.faiss")
        spec = {"n": args.n, "dim": args.dim, "centres": args.centres, "sigma": args.sigma, "seed": args.seed,
                "kind": kind, "memory_bytes": memory, "exact_below": args.exact_below, "threads": args.threads,
                "tune_queries": args.tune_queries, "k": args.k, "target": args.target_recall, "out": path}
        with open(path + ".spec.json", "w") as f:
            json.dump(spec, f)
        run = _run_build([sys.executable, os.path.abspath(__file__), "_search_build", path + ".spec.json"])
        with open(path + ".json") as f:
            r = json.load(f)
        index = faiss.read_index(path)
        ann.apply_params(index, r["tuned"]["params"])
        _, ids = ann.search(index, queries, args.k)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        lat = []
        for i in range(min(nq, args.latency_queries)):
            t0 = time.perf_counter()
            index.search(queries[i:i + 1], args.k)
            lat.append((time.perf_counter() - t0) * 1000)
        faiss.omp_set_num_threads(threads)
        del index
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        b = r["times"]["build"]
        out["kinds"][kind] = {
            "plan": r["plan"], "search_params": r["tuned"]["params"], "tuning": r["tuned"]["tried"],
            "tune_recall_at_k": r["tuned"]["recall_at_10"],
            "recall_at_k": ann.recall_at_k(ids, true_ids, args.k),
            "build_wall_s": b["wall_s"], "build_cpu_s": b["cpu_s"], "times": r["times"],
            "process_wall_s": run["wall_s"], "process_cpu_s": run["cpu_s"],
            "peak_rss_build_mib": r["peak_rss_build_mib"], "peak_rss_process_mib": r["peak_rss_process_mib"],
            "estimated_mib": r["plan"]["estimated_bytes"] / 2 ** 20, "index_bytes": r["index_bytes"],
            "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p99": float(np.percentile(lat, 99)),
            "latency_queries": len(lat)}
    out["machine"] = machine()
    g = out["ground_truth"]
    out["table"] = [
        f"{args.n:,} x {args.dim} vectors around {args.centres:,} centres, sigma {args.sigma}; {nq} queries, "
        f"recall@{args.k} vs exact (ground truth {g['wall_s']:.1f} s wall, {g['cpu_s']:.1f} CPU s); budget "
        f"{memory / 2 ** 30:.2f} GiB; latency: one query at a time, faiss threads = 1",
        f"{'kind':<10}{'index':<20}{'params':<14}{'build s':>9}{'CPU s':>8}{'peak RSS':>10}{'est.':>8}"
        f"{'recall':>8}{'p50 ms':>8}{'p99 ms':>8}{'index MiB':>11}"]
    for kind, r in out["kinds"].items():
        params = ",".join(f"{k}={v}" for k, v in r["search_params"].items()) or "-"
        out["table"].append(
            f"{kind:<10}{r['plan']['factory']:<20}{params:<14}{r['build_wall_s']:>9.1f}{r['build_cpu_s']:>8.1f}"
            f"{r['peak_rss_build_mib']:>10.0f}{r['estimated_mib']:>8.0f}{r['recall_at_k']:>8.4f}"
            f"{r['latency_ms_p50']:>8.2f}{r['latency_ms_p99']:>8.2f}{r['index_bytes'] / 2 ** 20:>11.1f}")
    out["table"].append("build s / CPU s: sampling excluded (train + add); peak RSS and est.: MiB, the build "
                        "process's VmHWM after the build and the plan's estimate (interpreter excluded)")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["learn"]:
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "bench_learn", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_learn.py"))
        bench_learn = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_learn)
        return bench_learn.main(argv[1:])
    if argv[:1] == ["_search_build"]:  # the child process of ``search``
        return _search_build(argv[1])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("train", "memory", "data", "build", "learn", "search"))
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "pretrain", "bench.yaml"))
    p.add_argument("--shards", default=os.path.join(ROOT, "data", "demo", "shards", "train"))
    p.add_argument("--steps", type=int, default=40, help="timed steps (train) or batches (data)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--block", type=int, default=10, help="steps per block when interleaving modes")
    p.add_argument("--workers", type=int, default=None, help="loader / builder workers (default: config)")
    p.add_argument("--progress", action="store_true", help="train: print steps and RSS as the run goes")
    p.add_argument("--compare-in-batch", action="store_true", help="also run the in-batch (OpenCLIP) mode")
    p.add_argument("--log", help="build: click log to build from (default: synthetic photos, see --photos)")
    p.add_argument("--photos", type=int, default=400, help="build: synthetic 640x480 photos when no --log")
    p.add_argument("--images-root", help="build: images root")
    p.add_argument("--rows", type=int, default=0, help="build: rows of a synthetic click log (with --images)")
    p.add_argument("--images", type=int, default=2000, help="build: distinct images of the synthetic click log")
    p.add_argument("--queries", type=int, default=0,
                   help="build: distinct queries (default rows/5); search: evaluation queries (default 1000)")
    p.add_argument("--images-per-query", type=int, default=0,
                   help="build: each query clicks one of its K images (0: any image)")
    p.add_argument("--image-side", type=int, default=96, help="build: width of the synthetic JPEGs")
    p.add_argument("--engine", default="local", help="build: engines to run, comma-separated (local,spark)")
    p.add_argument("--spark-master", default="local[2]", help="build: Spark master of --engine spark")
    p.add_argument("--n", type=int, default=1_000_000, help="search: vectors in the collection")
    p.add_argument("--dim", type=int, default=256, help="search: dimension")
    p.add_argument("--centres", type=int, default=10_000, help="search: cluster centres of the synthetic vectors")
    p.add_argument("--sigma", type=float, default=1.0, help="search: noise around a centre (norm ~ sigma)")
    p.add_argument("--k", type=int, default=10, help="search: neighbours (recall@k)")
    p.add_argument("--memory", default="2.5G", help="search: memory budget of the index plan (2.5G, 512M)")
    p.add_argument("--target-recall", type=float, default=0.95, help="search: recall the tuning aims at")
    p.add_argument("--kinds", default="exact,auto",
                   help="search: exact, auto (the plan's choice), ivf_flat, ivf_sq8, ivf_pq, hnsw_flat")
    p.add_argument("--tune-queries", type=int, default=500, help="search: queries that tune nprobe/efSearch")
    p.add_argument("--latency-queries", type=int, default=1000, help="search: single-query searches timed")
    p.add_argument("--exact-below", type=int, default=50_000, help="search: exact index below this size")
    p.add_argument("--threads", type=int, default=0, help="search: faiss threads of the build (0: all cores)")
    p.add_argument("--seed", type=int, default=0, help="search: seed of the synthetic collection")
    p.add_argument("--json", default=None, help="output JSON (default bench_<mode>.json)")
    p.add_argument("overrides", nargs="*", help="config key=value overrides (build: extra builder options)")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come before or after the options
    if args.mode not in ("build", "search"):
        from pretrain.dist import init_distributed
        if args.mode != "memory":
            init_distributed("cpu")
            from pretrain.metrics import setup_logging
            setup_logging(0)
    # every run directory, shard and photo of the bench goes below one scratch folder, removed at the end
    scratch = tempfile.mkdtemp(prefix=f"bench_{args.mode}_")
    tempfile.tempdir = os.environ["TMPDIR"] = scratch  # TMPDIR: spawned workers too
    from pretrain.schema import ConfigError
    try:
        out = {"train": mode_train, "memory": mode_memory, "data": mode_data, "build": mode_build,
               "search": mode_search}[args.mode](
            args, args.overrides)
    except ConfigError as e:  # a bad config or override: the message names the key, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for line in out["table"]:
        print(line)
    path = args.json or f"bench_{args.mode}.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
