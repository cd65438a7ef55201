"""Every cross-process call of the project lives here.

Only ``all_gather_with_local_grad`` carries gradients (into the local slice; the in-batch reference
loss). The others do not: gathered keys come from the momentum encoders under ``no_grad``, and
reductions are used for bookkeeping (flags, counters, metrics).
"""
from __future__ import annotations

import errno
import os
import socket
import sys
import threading
from typing import Any, Dict, List

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS_TIMEOUT_S = 60.0
"""How long the processes may take to find each other (``WENLAN_RENDEZVOUS_TIMEOUT`` overrides it)."""


def _rendezvous_hint(addr: str, port: str) -> str:
    return (f"pick a free port with `deepspeed --master_port PORT ...` (or MASTER_PORT=PORT), and check that "
            f"{addr} is this job's first node and reachable from every node")


def _check_port_free(addr: str, port: str) -> None:
    """Rank 0 hosts the rendezvous store on MASTER_PORT: if another job holds it, the other ranks would connect to
    that job's store and wait until the time-out. Say so now."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":  # torchrun's agent hosts it
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", int(port)))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise RuntimeError(f"rendezvous port {port} on {addr} is already in use (another job?): "
                                   f"{_rendezvous_hint(addr, port)}") from None


def _rendezvous(backend: str) -> None:
    """``init_process_group`` under a watchdog: a rendezvous that cannot complete ends this process within
    ``RENDEZVOUS_TIMEOUT_S`` with one line naming the address and port, instead of torch's 10-30 minute wait."""
    from deepspeed.constants import default_pg_timeout  # collectives keep DeepSpeed's time-out

    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    timeout = float(os.environ.get("WENLAN_RENDEZVOUS_TIMEOUT", RENDEZVOUS_TIMEOUT_S))
    if os.environ.get("RANK") == "0" and port.isdigit():
        try:
            _check_port_free(addr, port)
        except RuntimeError as e:
            print(f"error (rank 0): {e}", file=sys.stderr, flush=True)
            os._exit(2)

    def give_up() -> None:
        print(f"error (rank {os.environ.get('RANK', '?')}): the {os.environ.get('WORLD_SIZE', '?')} processes did not "
              f"meet at {addr}:{port} within {timeout:.0f} s: {_rendezvous_hint(addr, port)}",
              file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        dist.init_process_group(backend, timeout=default_pg_timeout)
    finally:
        timer.cancel()


def init_distributed(device: str) -> None:
    """Initialise torch.distributed, then DeepSpeed's communication on top of it.

    Run by ``deepspeed`` (or torchrun), the rank variables are set. Run as plain
    ``python launch/x.py``, they are not, and DeepSpeed would then look for mpi4py: set the
    single-process defaults first. The rendezvous runs under a watchdog (see ``_rendezvous``).
    """
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if dist.is_initialized():
        return
    import deepspeed

    backend = "nccl" if device == "cuda" else "gloo"
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        _rendezvous(backend)
    deepspeed.init_distributed(dist_backend=backend)


def start_tool(device_choice: str = "auto") -> str:
    """For tools that several processes may run (``deepspeed --num_gpus N tools/x.py`` or torchrun): the device
    (``auto``: cuda when available), and torch.distributed started when WORLD_SIZE > 1 (each rank on its GPU)."""
    device = "cuda" if device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available()) else "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed(device)
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) from all ranks along dim 0, in rank order.

    No gradient flows through it (used for keys, which come from the momentum encoders).
    """
    if not is_dist() or world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def all_gather_with_local_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks (rank order); gradients flow into this rank's own slice only
    (the other ranks' slices are constants here; each rank back-propagates through its own)."""
    if not is_dist() or world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.detach().contiguous())
    out[rank()] = tensor
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``); returns the tensor. No gradient."""
    if is_dist() and world_size() > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce(t, "max").item() > 0)


def all_gather_objects(obj: Any) -> List[Any]:
    """Picklable objects of every rank, in rank order (small payloads: metrics, eval embeddings)."""
    if not is_dist() or world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sum_counts(counts: Dict[str, float], device: torch.device = torch.device("cpu")) -> Dict[str, float]:
    """Sum a dict of counters over ranks. Ranks may know different keys: the key sets are merged first."""
    if not is_dist() or world_size() == 1:
        return dict(counts)
    keys = sorted(set().union(*all_gather_objects(sorted(counts))))
    t = torch.tensor([float(counts.get(k, 0)) for k in keys], dtype=torch.float64, device=device)
    all_reduce(t, "sum")
    return {k: (int(v) if float(v).is_integer() else float(v)) for k, v in zip(keys, t.tolist())}


@torch.no_grad()
def gather_rows_in_order(rows: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """Rows that each rank computed for global positions ``index`` -> the full ``[total, ...]`` tensor, row i
    at position i, on every rank. Ranks may hold different numbers of rows (padded for the all-gather, then
    trimmed). Every position must be covered exactly once over all ranks. No gradient (evaluation)."""
    index = index.to(device=rows.device, dtype=torch.long).reshape(-1)
    if index.numel() != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows but {index.numel()} indices")
    if is_dist() and world_size() > 1:
        n = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
        sizes = [torch.empty_like(n) for _ in range(world_size())]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        width = max(sizes)
        pad_rows = rows.new_zeros((width,) + tuple(rows.shape[1:]))
        pad_rows[:rows.shape[0]] = rows
        pad_index = torch.full((width,), -1, dtype=torch.long, device=rows.device)
        pad_index[:index.numel()] = index
        all_rows = [torch.empty_like(pad_rows) for _ in sizes]
        all_index = [torch.empty_like(pad_index) for _ in sizes]
        dist.all_gather(all_rows, pad_rows.contiguous())
        dist.all_gather(all_index, pad_index)
        rows = torch.cat([r[:s] for r, s in zip(all_rows, sizes)])
        index = torch.cat([i[:s] for i, s in zip(all_index, sizes)])
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= total):
        raise ValueError(f"gathered row positions fall outside 0..{total - 1}")
    if not bool((torch.bincount(index.cpu(), minlength=total) == 1).all()):
        raise ValueError(f"gathered rows do not cover positions 0..{total - 1} exactly once")
    out = rows.new_empty((total,) + tuple(rows.shape[1:]))
    out[index] = rows
    return out
