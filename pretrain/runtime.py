"""What the three trainers (pretraining, VSE, captioning) share to run: device and distributed start-up,
logging on rank 0, the run directory, autocast, the DeepSpeed config and the optimizer.

Library code: typed arguments, no argparse.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch

from . import dist
from .config import save_config
from .metrics import set_aside_old_metrics, setup_logging

log = logging.getLogger("pretrain")


@dataclass
class Run:
    """Where a trainer runs: its device, rank, world size and the autocast context of its precision."""
    device: torch.device
    rank: int
    world: int
    autocast: Any


def start_run(cfg: Any, device: str, precision: str, output_dir: str, make_dirs: Sequence[str] = (),
              set_aside_metrics: bool = True) -> Run:
    """Distributed init (``device``: ``auto``, ``cuda`` or ``cpu``), logging on rank 0, the run directory with
    its ``config.yaml`` (and ``make_dirs``), an older run's ``metrics.jsonl`` set aside unless
    ``set_aside_metrics`` is False (a resumable run keeps and truncates its own); every rank waits for it."""
    dev = "cuda" if (device == "cuda" or (device == "auto" and torch.cuda.is_available())) else "cpu"
    dist.init_distributed(dev)
    rank, world = dist.rank(), dist.world_size()
    setup_logging(rank)
    if dev == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    here = torch.device(dev, torch.cuda.current_device()) if dev == "cuda" else torch.device("cpu")
    if dev == "cpu" and precision != "fp32":
        log.warning("train.precision=%s on CPU: bf16/fp16 are for GPUs (bf16 was measured 20x slower than fp32 "
                    "on CPU); use train.precision=fp32", precision)
    if rank == 0:
        for d in (output_dir, *make_dirs):
            os.makedirs(d, exist_ok=True)
        save_config(cfg, os.path.join(output_dir, "config.yaml"))
        if set_aside_metrics:
            moved = set_aside_old_metrics(output_dir)
            if moved:
                log.info("%s holds an earlier run's metrics.jsonl: kept as %s", output_dir, os.path.basename(moved))
    dist.barrier()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if dev == "cuda" and precision != "fp32" else nullcontext())
    return Run(here, rank, world, autocast)


def deepspeed_config(micro_batch: int, accum: int, world: int, grad_clip: float, zero_stage: int, precision: str,
                     fragment: Optional[str] = None) -> Dict[str, Any]:
    """The DeepSpeed config follows from the run config; a user JSON ``fragment`` may add settings, but not
    batch sizes, optimizer, scheduler, or a ZeRO stage or precision that contradicts the run config."""
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro_batch * accum * world,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    if fragment:
        with open(fragment) as f:
            extra = json.load(f)
        for forbidden in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                          "optimizer", "scheduler"):
            if forbidden in extra:
                raise ValueError(f"{fragment}: '{forbidden}' is derived from the run config "
                                 f"(train.micro_batch_size, train.grad_accum_steps, optim.*); remove it from the JSON")
        stage = extra.get("zero_optimization", {}).get("stage", zero_stage)
        if stage != zero_stage:
            raise ValueError(f"{fragment}: zero_optimization.stage {stage} contradicts train.zero_stage "
                             f"{zero_stage}; set the stage with train.zero_stage and drop it from the JSON")
        for name in ("bf16", "fp16"):
            enabled = extra.get(name, {}).get("enabled")
            if enabled is not None and bool(enabled) != (precision == name):
                raise ValueError(f"{fragment}: {name}.enabled={enabled} contradicts train.precision="
                                 f"{precision}; choose the precision with train.precision")
        ds = _deep_merge(ds, extra)
    return ds


def _deep_merge(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def adamw(groups, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one (CPU and CUDA in torch >= 2.4): measured 3x faster than
    the foreach kernel on 32M parameters on one CPU thread, which is 10 % of a small model's step."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
