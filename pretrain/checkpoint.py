"""Checkpoints that survive a cluster: never corrupted by a killed save, never deleted before their
replacement is complete, agreed on by every rank, and loaded as data, never as code.

Layout under ``<output_dir>/checkpoints/``::

    step_00001000/            DeepSpeed tag: engine, optimizer (ZeRO partitions), lr schedule
        wenlan.pt             rank 0: momentum encoders, both queues (features, pointer, ids), counters
        rank_00000.pt ...     each rank: data-stream position, RNG states (plain tensors and ints)
        COMPLETE              written last, after every rank has finished (atomic rename)
    latest                    the newest complete tag (atomic replace; DeepSpeed reads it too)

Rules (each is a collective: every rank calls, rank 0 decides and broadcasts):

- ``--resume auto`` takes the newest tag with a ``COMPLETE`` marker (a save killed midway has none);
  ``--resume PATH`` any complete checkpoint folder, or a run / ``checkpoints`` folder (its newest).
- Saving a step that already has a complete checkpoint is a no-op; an incomplete folder of that step
  (a killed save) is replaced. The newest ``keep`` complete tags are kept, older ones are deleted only
  after the new one is complete.
- Every file is read with ``torch.load(weights_only=True)`` (DeepSpeed's own engine load too, see
  ``install_safe_engine``): tensors, containers, numbers and strings, plus the few DeepSpeed types
  listed in ``_deepspeed_globals``. Anything else (a pickled callable: code) stops the load with one line
  naming the file. All files of a checkpoint are scanned before any rank loads, so every rank fails alike.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import dist

log = logging.getLogger("pretrain")

MARKER = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the file or folder."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str) -> int:
    m = TAG_RE.match(os.path.basename(os.path.normpath(path)))
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint folder (expected a name like step_00001000)")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------- safe loading
def _deepspeed_globals() -> List[Any]:
    """The non-tensor types DeepSpeed pickles into its optimizer states (enums, a loss scaler, a dataclass)."""
    out = []
    for module, names in (("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        out += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return out


def allowed_globals() -> List[Any]:
    return _deepspeed_globals()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it refers to {m.group(1)}, which is not plain data"
    return (text.splitlines() or [type(e).__name__])[0][:300]


def scan(path: str) -> None:
    """Raise CheckpointError unless ``path`` is a torch.save file whose pickle names only allowed types.

    Reads only the pickle record (static disassembly, nothing runs); the load itself is weights_only too."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            bad = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (ValueError, RuntimeError, zipfile.BadZipFile, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: not a readable torch.save file ({_first_line(e)})") from None
    if bad:
        raise CheckpointError(f"{path}: refused to load: it refers to {', '.join(sorted(bad))}, which is not "
                              f"plain data (checkpoints are loaded with weights_only=True; a pickled callable is code)")


def safe_load(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's few types allowed; one-line errors naming the file."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: {_first_line(e)} (checkpoints are loaded with "
                              f"weights_only=True; a pickled callable is code)") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read ({_first_line(e)})") from None


def install_safe_engine(engine) -> None:
    """Make DeepSpeed's checkpoint engine load with ``safe_load`` (its own load uses weights_only=False)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or getattr(ce, "_wenlan_safe", False):
        return

    def load(path, map_location=None):
        return safe_load(path, map_location=map_location if map_location is not None else "cpu")

    ce.load = load
    ce._wenlan_safe = True


@contextlib.contextmanager
def forced_weights_only():
    """Every ``torch.load`` inside, whatever its arguments, is ``weights_only=True`` (torch's own switch),
    with DeepSpeed's few types allowed; the unpickler's refusal becomes a CheckpointError."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load a checkpoint file: {str(e).splitlines()[0]}") from None
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def scan_checkpoint(path: str) -> None:
    """Scan every ``*.pt`` file of a checkpoint folder (see ``scan``)."""
    for name in sorted(os.listdir(path)):
        if name.endswith(".pt"):
            scan(os.path.join(path, name))


# ---------------------------------------------------------------------------------------------- writing
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


def _resolve(ckpt_dir: str, resume: Optional[str]) -> Optional[str]:
    """The checkpoint folder to resume from, or None to start fresh (see ``resolve_resume``)."""
    if resume in (None, "", "never", "none"):
        return None
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        return os.path.join(ckpt_dir, tags[-1]) if tags else None
    if os.path.isdir(resume):
        if os.path.isfile(os.path.join(resume, MARKER)):
            return os.path.abspath(resume)
        for folder in (resume, os.path.join(resume, "checkpoints")):
            tags = complete_tags(folder)
            if tags:
                return os.path.abspath(os.path.join(folder, tags[-1]))
        raise CheckpointError(f"--resume {resume}: no complete checkpoint there (no {MARKER} marker in it, nor a "
                              f"complete step_* folder in it or in its checkpoints/)")
    path = os.path.join(ckpt_dir, os.path.basename(os.path.normpath(resume)))
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(f"--resume {resume}: no complete checkpoint at {path} (no {MARKER} marker); "
                              f"complete ones in {ckpt_dir}: {complete_tags(ckpt_dir) or 'none'}")
    return path


def resolve_resume(ckpt_dir: str, resume: Optional[str]) -> Optional[str]:
    """Collective. ``None``/``never``: start fresh. ``auto``: the newest complete tag of ``ckpt_dir``, or fresh.
    Else a tag of ``ckpt_dir`` or a path (a complete checkpoint folder, or a run or checkpoints folder: its newest).
    Rank 0 decides and broadcasts, so every rank loads the same checkpoint."""
    answer: Tuple[Optional[str], Optional[str]] = (None, None)
    if dist.rank() == 0:
        try:
            answer = (_resolve(ckpt_dir, resume), None)
        except CheckpointError as e:
            answer = (None, str(e))
    path, error = dist.broadcast_object(answer)
    if error:
        raise CheckpointError(error)
    return path


def save(engine, ckpt_dir: str, step: int, shared_state: Dict[str, Any], rank_state: Dict[str, Any],
         keep: int) -> Tuple[str, bool]:
    """Collective: every rank must call it. Returns (the checkpoint folder, whether it was written now).

    A step that already has a complete checkpoint is not written again (a re-run, or a stop on a save step)."""
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    exists = False
    if dist.rank() == 0:
        exists = os.path.isfile(os.path.join(path, MARKER))
        if not exists and os.path.isdir(path):  # leftovers of a killed save of this step: never complete
            shutil.rmtree(path)
    if dist.broadcast_object(exists):
        return path, False
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
    return path, True


def prune(ckpt_dir: str, keep: int) -> None:
    """Delete complete tags beyond the newest ``keep`` and incomplete ones older than the newest complete one
    (dead saves). Call after the new checkpoint is complete, on one rank."""
    tags = complete_tags(ckpt_dir)
    newest = int(TAG_RE.match(tags[-1]).group(1)) if tags else None
    for t in tags[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        if m and newest is not None and int(m.group(1)) < newest and name not in tags:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------- loading
def load(engine, path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Collective. Restores the engine in place from the checkpoint folder ``path``; returns (shared state,
    this rank's state). Every rank checks the files first and all fail alike; no rank goes on before all
    have loaded."""
    error = None
    try:
        meta_path = os.path.join(path, MARKER)
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{meta_path}: unreadable marker ({_first_line(e)})") from None
        if meta.get("world_size") != dist.world_size():
            raise CheckpointError(
                f"checkpoint {path} was written by {meta.get('world_size')} processes, this run has "
                f"{dist.world_size()}: exact resume needs the same world size (the data-stream position is per "
                f"rank). Start a new run from an export instead.")
        scan_checkpoint(path)
    except CheckpointError as e:
        error = str(e)
    errors = [e for e in dist.all_gather_objects(error) if e]
    if errors:
        raise CheckpointError(errors[0])
    install_safe_engine(engine)
    load_path, _ = engine.load_checkpoint(os.path.dirname(os.path.abspath(path)), tag=os.path.basename(path),
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
    shared = safe_load(os.path.join(path, "wenlan.pt"))
    own = safe_load(os.path.join(path, f"rank_{dist.rank():05d}.pt"))
    dist.barrier()  # every rank has loaded before any goes on (and perhaps saves over a folder)
    return shared, own


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> Dict[str, Any]:
    """Every RNG of this process as tensors, ints and tuples (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
