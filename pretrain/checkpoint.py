"""Checkpoints that an interrupted save never corrupts.

Layout under ``<output_dir>/checkpoints/``::

    step_00001000/            DeepSpeed tag: engine, optimizer (ZeRO partitions), lr schedule
        wenlan.pt             rank 0: momentum encoders, both queues (features, pointer, ids), counters
        rank_00000.pt ...     each rank: data-stream position, RNG states
        COMPLETE              written last, after every rank has finished (atomic rename)
    latest                    the newest complete tag (atomic replace; DeepSpeed reads it too)

``--resume auto`` takes the newest tag with a ``COMPLETE`` marker: a save killed midway has none
and is never picked up. The newest ``keep`` complete tags are kept; older ones are deleted.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from . import dist

MARKER = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def complete_tags(ckpt_dir: str) -> List[str]:
    """Complete checkpoint tags, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = []
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, MARKER)):
            tags.append((int(m.group(1)), name))
    return [t for _, t in sorted(tags)]


def find_resume_tag(ckpt_dir: str, resume: Optional[str]) -> Optional[str]:
    """``None``/``never``: start fresh. ``auto``: newest complete tag, or fresh if none. Else a tag name or path."""
    if resume in (None, "", "never", "none"):
        return None
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        return tags[-1] if tags else None
    tag = os.path.basename(os.path.normpath(resume))
    path = resume if os.path.isdir(resume) else os.path.join(ckpt_dir, tag)
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint at {path} (no {MARKER} marker); "
                                f"complete ones: {complete_tags(ckpt_dir) or 'none'}")
    return tag


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: str, step: int, shared_state: Dict[str, Any], rank_state: Dict[str, Any],
         keep: int) -> str:
    """Collective: every rank must call it. Returns the tag."""
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    if dist.rank() == 0 and os.path.isdir(path):  # leftovers of an interrupted save of the same step
        shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
    if dist.rank() == 0:
        _atomic_torch_save(shared_state, os.path.join(path, "wenlan.pt"))
    _atomic_torch_save(rank_state, os.path.join(path, f"rank_{dist.rank():05d}.pt"))
    dist.barrier()
    if dist.rank() == 0:
        _atomic_write_text(os.path.join(path, MARKER), json.dumps({"step": step, "world_size": dist.world_size()}))
        _atomic_write_text(os.path.join(ckpt_dir, "latest"), tag)
        prune(ckpt_dir, keep)
    dist.barrier()
    return tag


def prune(ckpt_dir: str, keep: int) -> None:
    tags = complete_tags(ckpt_dir)
    newest = TAG_RE.match(tags[-1]).group(1) if tags else None
    for t in tags[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
    # incomplete tags older than the newest complete one are dead saves
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        if m and newest and int(m.group(1)) < int(newest) and name not in tags:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def load(engine, ckpt_dir: str, tag: str):
    """Collective. Restores the engine in place; returns (shared_state, this rank's state)."""
    path = os.path.join(ckpt_dir, tag)
    meta = json.load(open(os.path.join(path, MARKER)))
    if meta.get("world_size") != dist.world_size():
        raise RuntimeError(f"checkpoint {path} was written by {meta.get('world_size')} processes, this run has "
                           f"{dist.world_size()}: exact resume needs the same world size (the data-stream "
                           f"position is per rank). Start a new run from an export instead.")
    load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    shared = torch.load(os.path.join(path, "wenlan.pt"), map_location="cpu", weights_only=False)
    own = torch.load(os.path.join(path, f"rank_{dist.rank():05d}.pt"), map_location="cpu", weights_only=False)
    return shared, own
