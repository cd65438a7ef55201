"""Metrics sinks (rank 0 only): metrics.jsonl, TensorBoard, and a progress line with ETA."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Dict, Optional

log = logging.getLogger("pretrain")


def setup_logging(rank: int) -> None:
    """One logger; ranks other than 0 only report warnings and errors."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class MetricsWriter:
    def __init__(self, output_dir: str, enabled: bool, total_steps: int, start_step: int = 0,
                 purge_after: Optional[int] = None):
        """``purge_after``: a resumed run; TensorBoard drops the events of later steps (logged before a kill)."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.t0 = time.time()
        self.start_step = start_step
        self.tb = None
        self.jsonl = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"),
                                        purge_step=purge_after + 1 if purge_after is not None else None)
            except Exception as e:  # tensorboard is a dependency; keep training if it is broken
                log.warning("TensorBoard disabled: %s", e)

    def write(self, step: int, metrics: Dict[str, float], progress: bool = True, prefix: str = "") -> None:
        if not self.enabled:
            return
        clean = {f"{prefix}{k}": (float(v) if v is not None else None) for k, v in metrics.items()}
        record = {"step": step, "time": round(time.time() - self.t0, 3), **clean}
        self.jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if progress:
            log.info(self.progress_line(step, clean))

    def progress_line(self, step: int, m: Dict[str, float]) -> str:
        elapsed = time.time() - self.t0
        done = max(step - self.start_step, 1)
        eta = elapsed / done * max(self.total_steps - step, 0)
        parts = [f"step {step}/{self.total_steps}", f"eta {_fmt_time(eta)}"]
        for k in ("loss", "loss_i2t", "loss_t2i", "lr", "temperature", "samples_per_s", "data_wait_frac"):
            if k in m and m[k] is not None:
                parts.append(f"{k} {m[k]:.4g}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def truncate_metrics(output_dir: str, step: int, drop_eval_at_last: bool = False) -> int:
    """A resumed run: keep the records of ``metrics.jsonl`` up to ``step`` (the checkpoint's), so that each step
    is logged once (a killed run logged steps after its last checkpoint). ``drop_eval_at_last`` also drops
    the evaluation records of ``step`` itself (an evaluation killed midway is done again). Atomic (rename).
    Returns the records dropped. Call on rank 0 only."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                s = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1  # a line cut by a kill
                continue
            evaluation = any(k.startswith("eval") and "/" in k for k in rec)
            if s > step or (drop_eval_at_last and s == step and evaluation):
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        log.info("metrics.jsonl: dropped %d record(s) logged after step %d (the checkpoint resumed from)", dropped, step)
    return dropped


def set_aside_old_metrics(output_dir: str) -> Optional[str]:
    """A new run in an old run directory: rename its ``metrics.jsonl`` to ``metrics.jsonl.<YYYYmmdd-HHMMSS>.old``
    (``...-N.old`` when that name is taken) so that the new log starts empty and nothing is lost. Returns
    the new name, or None when there was no old log. Call it on rank 0 only."""
    old = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(old):
        return None
    stem = f"{old}.{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = f"{stem}.old", 1
    while os.path.exists(target):
        target, n = f"{stem}-{n}.old", n + 1
    os.replace(old, target)
    return target
