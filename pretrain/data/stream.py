"""The training-data stream: infinite, deterministic, resumable batches out of WebDataset shards.

Per rank, ``num_workers`` DataLoader workers (or the main process when 0) each run this pipeline::

    draw a shard  (with replacement: a source by weight, then a shard uniformly; RNG of seed, epoch, rank, worker)
    -> read its samples, cheap checks (json, text, image header and size)      every sample read
    -> shuffle buffer (RNG of seed, epoch, rank, worker)
    -> batch_size samples: decode, transform, tokenise, ids                    only samples used
    -> batch dict, with the worker's cumulative counters

The DataLoader (``batch_size=None``, ``in_order=True``) hands out batches in strict round robin:
batch i comes from worker i % num_workers. The stream's position is therefore one number, the batches
consumed. A resumed worker replays its shard draws and shuffle buffer up to where it was, reading and
checking samples but neither decoding nor transforming them, and the workers' roles are rotated so
that the round robin continues where it stopped. Augmentation is seeded per batch, so resumed batches
are identical, not only their keys.

An image whose header passes but whose data cannot be decoded (a truncated JPEG) is only found when
its batch is built. Its slot is then filled with another sample of the same batch (it appears twice;
counted as ``bad_image``): dropping it and pulling another sample would make the batch boundaries
depend on decoding, which the replay skips.

Streams are infinite, so every rank takes the same number of steps whatever the shard sizes.
"""
from __future__ import annotations

import logging
import os
import random
import re
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .samples import IMAGE_EXTS, MAX_PIXELS, SKIP_REASONS, TEXT_EXT, Record, decode_image, read_shard, sample_fields
from .urls import expand_urls

log = logging.getLogger(__name__)

READ = "_read"
"""Counter of items read: samples (good or bad) plus shard errors (each counts as one bad item)."""

_STATE_VERSION = 1


class DataError(RuntimeError):
    """The data cannot feed the run: too many bad samples, or no good sample at all."""


def _zero_counts() -> Dict[str, int]:
    return dict.fromkeys(SKIP_REASONS + (READ,), 0)


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))


@contextmanager
def _seeded(seed: Optional[int]):
    """Run the transforms with torch, random and numpy seeded by ``seed``; restore the callers' RNGs after."""
    if seed is None:
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _Reader:
    """Reads shards and builds batches; picklable (sent to DataLoader workers)."""

    def __init__(self, image_transform: Callable, tokenizer: Any, max_length: int, allow_pipe: bool, max_pixels: int,
                 image_exts: Sequence[str], text_ext: str, decode_size: Optional[int]):
        self.image_transform, self.tokenizer, self.max_length = image_transform, tokenizer, max_length
        self.allow_pipe, self.max_pixels, self.decode_size = allow_pipe, max_pixels, decode_size
        self.image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        self.text_ext = text_ext.lower().lstrip(".")

    def read_shard(self, url: str) -> Iterator[Tuple[Optional[Record], Optional[str]]]:
        """Every sample of one shard as ``(record, None)`` or ``(None, skip reason)`` (``samples.read_shard``)."""
        for item in read_shard(url, allow_pipe=self.allow_pipe, image_exts=self.image_exts, text_ext=self.text_ext,
                               max_pixels=self.max_pixels):
            yield item.record, item.reason

    def make_batch(self, recs: List[Record], counts: Dict[str, int], aug_seed: Optional[int],
                   fill_failed: bool) -> Tuple[Optional[Dict[str, Any]], List[int]]:
        """Decode, transform, tokenise. Undecodable images are counted, then either replaced by the batch's
        first good sample (``fill_failed``) or dropped. Returns the batch (None if no image decoded) and
        the positions in ``recs`` of its rows."""
        images: List[Optional[torch.Tensor]] = []
        with _seeded(aug_seed):
            for rec in recs:
                try:
                    img = decode_image(rec.image, self.decode_size)
                except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on corrupt data
                    log.debug("undecodable image %s: %s", rec.key, e)
                    counts["bad_image"] += 1
                    images.append(None)
                    continue
                images.append(self.image_transform(img))  # errors here are bugs, not bad data: raised
        good = [i for i, t in enumerate(images) if t is not None]
        if not good:
            return None, []
        rows = [i if images[i] is not None else good[0] for i in range(len(recs))] if fill_failed else good
        recs = [recs[i] for i in rows]
        tok = self.tokenizer([r.text for r in recs], padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        fields = [sample_fields(r) for r in recs]
        batch = {
            "image": torch.stack([images[i] for i in rows]),                                   # B x 3 x H x W
            "input_ids": tok["input_ids"].long(),                                              # B x L
            "attention_mask": tok["attention_mask"].long(),                                    # B x L
            "query_id": torch.tensor([f["query_id"] for f in fields], dtype=torch.int64),      # B
            "image_id": torch.tensor([f["image_id"] for f in fields], dtype=torch.int64),      # B
            "clicks": torch.tensor([f["clicks"] for f in fields], dtype=torch.float32),        # B
            "impressions": torch.tensor([f["impressions"] for f in fields], dtype=torch.float32),  # B
            "key": [r.key for r in recs],
        }
        return batch, rows


def _bookkeeping(counts: Dict[str, int]) -> Dict[str, Any]:
    return {"_skips": {r: counts[r] for r in SKIP_REASONS}, "_read": counts[READ]}


class _TrainBatches(IterableDataset):
    """What each DataLoader worker runs (see the module docstring)."""

    def __init__(self, reader: _Reader, sources: List[Tuple[List[str], float]], batch_size: int, rank: int,
                 seed: int, epoch: int, num_workers: int, shuffle_buffer: int, start_batch: int,
                 worker_counts: List[Optional[Dict[str, int]]]):
        super().__init__()
        self.reader, self.sources, self.batch_size = reader, sources, batch_size
        self.rank, self.seed, self.epoch = rank, seed, epoch
        self.slots, self.shuffle_buffer = max(num_workers, 1), shuffle_buffer
        self.start_batch, self.worker_counts = start_batch, worker_counts

    def _records(self, worker: int, counts: Dict[str, int]) -> Iterator[Record]:
        """Good records of shards drawn with replacement, forever."""
        rng = _rng(self.seed, self.epoch, self.rank, worker, 0)
        weights = np.array([w for _, w in self.sources], dtype=np.float64)
        p = weights / weights.sum()
        live = {u for urls, w in self.sources if w > 0 for u in urls}
        fruitless = set()
        while True:
            urls = self.sources[int(rng.choice(len(p), p=p)) if len(p) > 1 else 0][0]
            url = urls[int(rng.integers(len(urls)))]
            good = 0
            for rec, reason in self.reader.read_shard(url):
                counts[READ] += 1
                if reason:
                    counts[reason] += 1
                    continue
                good += 1
                yield rec
            if good:
                fruitless.clear()
                continue
            fruitless.add(url)
            if len(fruitless) >= len(live):
                bad = {k: v for k, v in counts.items() if v and k != READ}
                raise DataError(f"rank {self.rank} worker {worker}: read each of the {len(live)} shard(s) without "
                                f"getting a single good sample (skipped: {bad or 'none, the shards are empty'}); "
                                f"check the shard spec and the data (image extensions {self.reader.image_exts}, "
                                f"text extension {self.reader.text_ext!r})")

    def _shuffled(self, records: Iterator[Record], worker: int) -> Iterator[Record]:
        if self.shuffle_buffer <= 1:
            yield from records
            return
        rng = _rng(self.seed, self.epoch, self.rank, worker, 1)
        buf: List[Record] = []
        for rec in records:
            buf.append(rec)
            if len(buf) >= self.shuffle_buffer:
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.start_batch) % self.slots  # continue the round robin
        done = (self.start_batch - worker + self.slots - 1) // self.slots  # batches this worker gave before
        counts = _zero_counts()
        records = self._shuffled(self._records(worker, counts), worker)
        bs = self.batch_size
        for _ in range(done * bs):  # replay: read and check, no decoding
            next(records)
        if done:
            counts.update(self.worker_counts[worker] or {})  # includes decode failures the replay did not see
        while True:
            recs = [next(records) for _ in range(bs)]
            aug_seed = int(np.random.SeedSequence([self.seed, self.epoch, self.rank, worker, 2, done])
                           .generate_state(1)[0])
            batch, _ = self.reader.make_batch(recs, counts, aug_seed, fill_failed=True)
            if batch is None:
                raise DataError(f"rank {self.rank} worker {worker}: none of the {bs} images of batch {done} could be "
                                f"decoded ({', '.join(r.key for r in recs[:3])}, ...): the shards look corrupt")
            batch.update(_bookkeeping(counts), _worker=worker, _index=done)
            done += 1
            yield batch


WORKER_GRACE_S = 20.0
"""A loader worker lives this long after SIGTERM (see ``_worker_init``)."""


def _exit_after_grace(signum, frame) -> None:
    timer = threading.Timer(WORKER_GRACE_S, os._exit, args=(0,))
    timer.daemon = True
    timer.start()


def _worker_init(worker_id: int) -> None:
    """Launchers and schedulers signal the whole process tree. A worker dying at once would abort the training
    process's current step and its last save (torch raises in the parent when a worker dies), so a worker
    ignores SIGUSR1 and leaves only ``WORKER_GRACE_S`` after SIGTERM: time for the step and the save, and still
    an end when the parent shuts it down (terminate) or is gone."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_after_grace)


def _worker_error(e: BaseException, rank: int) -> DataError:
    """One line for an exception re-raised from a loader worker (torch puts the worker's whole traceback in the
    message; it goes to the debug log)."""
    text = str(e)
    log.debug("data loader worker error:\n%s", text)
    head = re.search(r"in DataLoader worker process (\d+)", text)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else type(e).__name__
    last = re.sub(r"^pretrain\.data\.stream\.", "", last)
    where = f"worker {head.group(1)}" if head else "a worker"
    return DataError(f"rank {rank} data loader {where}: {last}")


class ShardStream:
    """Infinite stream of training batches for one rank (module docstring: pipeline, determinism, resume).

    Iterating yields dicts: ``image`` float B x 3 x H x W, ``input_ids`` and ``attention_mask`` int64 B x L,
    ``query_id`` and ``image_id`` int64 B, ``clicks`` and ``impressions`` float32 B, ``key`` list of
    ``"shard url#KEY"``; and bookkeeping: ``_worker`` (logical worker), ``_index`` (its batch number),
    ``_skips`` (its cumulative skip counts by reason), ``_read`` (its items read).

    Each ``iter()`` continues from the batches consumed so far (replaying from the start of the stream:
    fine once per run, costly in a loop); use one iterator at a time.

    ``decode_size``: decode JPEGs at a reduced scale that keeps both sides >= it (give what the transform
    needs, e.g. image_size / sqrt(crop_scale_min) for random-resized crops); None decodes at full size.
    ``bad_check_after``: the bad fraction is checked once this many items were read on this rank.
    """

    def __init__(self, urls: str, *, batch_size: int, image_transform: Callable[[Any], torch.Tensor], tokenizer: Any,
                 max_length: int, rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle_buffer: int = 1000, allow_pipe: bool = False, max_pixels: int = MAX_PIXELS,
                 image_exts: Sequence[str] = IMAGE_EXTS, text_ext: str = TEXT_EXT,
                 max_bad_fraction: float = 0.1, decode_size: Optional[int] = None, epoch: int = 0,
                 prefetch_factor: int = 4, bad_check_after: int = 1000,
                 multiprocessing_context: Optional[str] = None):
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("max_length", max_length, 1),
                                 ("num_workers", num_workers, 0), ("seed", seed, 0), ("epoch", epoch, 0),
                                 ("shuffle_buffer", shuffle_buffer, 0), ("prefetch_factor", prefetch_factor, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"ShardStream: {name} must be an int >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardStream: rank {rank} is not in [0, world_size={world_size})")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"ShardStream: max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.urls, self.sources = urls, expand_urls(urls, allow_pipe)
        self.batch_size, self.rank, self.world_size, self.num_workers = batch_size, rank, world_size, num_workers
        self.seed, self.epoch, self.shuffle_buffer = seed, epoch, shuffle_buffer
        self.max_bad_fraction, self.bad_check_after = max_bad_fraction, bad_check_after
        self.prefetch_factor, self.multiprocessing_context = prefetch_factor, multiprocessing_context
        self.reader = _Reader(image_transform, tokenizer, max_length, allow_pipe, max_pixels, image_exts, text_ext,
                              decode_size)
        self._slots = max(num_workers, 1)
        self._batches = 0
        self._worker_counts: List[Optional[Dict[str, int]]] = [None] * self._slots
        log.info("data stream rank %d/%d: %d source(s), %d shard(s), %d worker(s), batch %d, shuffle buffer %d",
                 rank, world_size, len(self.sources), sum(len(u) for u, _ in self.sources), num_workers, batch_size,
                 shuffle_buffer)

    def _dataset(self) -> _TrainBatches:
        return _TrainBatches(self.reader, self.sources, self.batch_size, self.rank, self.seed, self.epoch,
                             self.num_workers, self.shuffle_buffer, self._batches, list(self._worker_counts))

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        nw = self.num_workers
        loader = DataLoader(self._dataset(), batch_size=None, num_workers=nw, pin_memory=torch.cuda.is_available(),
                            prefetch_factor=self.prefetch_factor if nw else None, persistent_workers=False,
                            in_order=True, multiprocessing_context=self.multiprocessing_context if nw else None,
                            worker_init_fn=_worker_init if nw else None)
        batches = iter(loader)
        while True:
            error = None
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:  # a worker's error: one line, not its whole traceback
                if "Original Traceback" not in str(e):
                    raise
                error = _worker_error(e, self.rank)
            if error is not None:  # raised here, holding neither the loader nor torch's exception: the
                batches = None     # workers shut down now, not when the traceback is collected
                raise error
            expected = self._batches % self._slots
            if batch["_worker"] != expected:
                raise DataError(f"batch {self._batches} came from worker {batch['_worker']}, expected {expected}: "
                                f"the DataLoader did not keep its round robin; exact resume would break")
            self._worker_counts[expected] = dict(batch["_skips"], **{READ: batch["_read"]})
            self._batches += 1
            self._check_bad_fraction()
            yield batch

    def skip_counts(self) -> Dict[str, int]:
        """Samples skipped on this rank by reason (every reason present), summed over workers."""
        out = dict.fromkeys(SKIP_REASONS, 0)
        for c in self._worker_counts:
            for r in SKIP_REASONS:
                out[r] += c[r] if c else 0
        return out

    def samples_read(self) -> int:
        """Items read on this rank (samples, good or bad, plus shard errors), summed over workers."""
        return sum(c[READ] for c in self._worker_counts if c)

    def _check_bad_fraction(self) -> None:
        read = self.samples_read()
        if read < self.bad_check_after:
            return
        counts = self.skip_counts()
        skipped = sum(counts.values())
        if skipped > self.max_bad_fraction * read:
            detail = ", ".join(f"{r} {n}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n)
            raise DataError(f"rank {self.rank}: {skipped} of {read} samples read were bad ({skipped / read:.1%} > "
                            f"max_bad_fraction {self.max_bad_fraction:.1%}): {detail}. Check the shards of "
                            f"{self.urls!r}, or raise data.max_bad_fraction if this is expected")

    def state_dict(self) -> Dict[str, Any]:
        """The position (batches consumed) and what must match to replay it, plus each worker's counters."""
        return {"version": _STATE_VERSION, "batches": self._batches, "seed": self.seed, "epoch": self.epoch,
                "rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer, "urls": self.urls,
                "worker_counts": [dict(c) if c else None for c in self._worker_counts]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from ``state`` at the next ``iter()``. Refuses another rank, world size, worker count or
        batch size (the replay could not reproduce the stream). A different seed, epoch, shuffle buffer or
        shard spec is accepted with a warning: the stream then continues, deterministically, but not as the
        saved run would have."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data stream state version {state.get('version')!r} is not {_STATE_VERSION}")
        for name in ("rank", "world_size", "num_workers", "batch_size"):
            if state[name] != getattr(self, name):
                raise ValueError(f"cannot resume the data stream: the checkpoint has {name}={state[name]}, this run "
                                 f"{getattr(self, name)}; resume with the same value (the stream's position depends "
                                 f"on it)")
        for name in ("seed", "epoch", "shuffle_buffer", "urls"):
            if state[name] != getattr(self, name):
                log.warning("data stream: the checkpoint has %s=%r, this run %r: resuming with this run's value, "
                            "the sample order will differ from the saved run's", name, state[name],
                            getattr(self, name))
        self._batches = int(state["batches"])
        self._worker_counts = [dict(c) if c else None for c in state["worker_counts"]]


def iter_eval_batches(urls: str, *, batch_size: int, image_transform: Callable[[Any], torch.Tensor], tokenizer: Any,
                      max_length: int, rank: int = 0, world_size: int = 1, max_samples: Optional[int] = None,
                      allow_pipe: bool = False, max_pixels: int = MAX_PIXELS,
                      image_exts: Sequence[str] = IMAGE_EXTS, text_ext: str = TEXT_EXT,
                      decode_size: Optional[int] = None,
                      counts: Optional[Dict[str, int]] = None) -> Iterator[Dict[str, Any]]:
    """Every shard once (sorted, duplicates removed), in order, no shuffle; this rank's share of the samples.

    Samples that pass the cheap checks are numbered 0, 1, ... in reading order (the same on every rank);
    this rank decodes those with ``index % world_size == rank`` and yields them in batches (the last one
    partial) with the training batch keys plus ``index`` (int64 B), so that the caller can all-gather and
    re-order. Stops after ``max_samples`` numbered samples. Samples whose image fails to decode are
    dropped (index gaps). Skips are counted once over all ranks (a sample by the rank of its read
    ordinal, a shard error by the rank of the shard's position): ``pretrain.dist.sum_counts`` of the ``counts``
    dicts (updated in place, also carried by each batch as ``_skips``/``_read``) gives the totals.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"iter_eval_batches: rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"iter_eval_batches: batch_size must be >= 1, got {batch_size}")
    shards = sorted({u for us, _ in expand_urls(urls, allow_pipe) for u in us})
    reader = _Reader(image_transform, tokenizer, max_length, allow_pipe, max_pixels, image_exts, text_ext, decode_size)
    if counts is None:
        counts = {}
    for k, v in _zero_counts().items():
        counts.setdefault(k, v)
    ordinal = index = 0
    pending: List[Tuple[int, Record]] = []

    def flush() -> Optional[Dict[str, Any]]:
        batch, rows = reader.make_batch([r for _, r in pending], counts, None, fill_failed=False)
        if batch is not None:
            batch["index"] = torch.tensor([pending[i][0] for i in rows], dtype=torch.int64)
            batch.update(_bookkeeping(counts))
        pending.clear()
        return batch

    for position, url in enumerate(shards):
        if max_samples is not None and index >= max_samples:
            break
        for rec, reason in reader.read_shard(url):
            owner = position % world_size if reason == "shard_error" else ordinal % world_size
            ordinal += reason != "shard_error"
            if owner == rank:
                counts[READ] += 1
                if reason:
                    counts[reason] += 1
            if reason:
                continue
            if index % world_size == rank:
                pending.append((index, rec))
            index += 1
            if len(pending) == batch_size:
                batch = flush()
                if batch is not None:
                    yield batch
            if max_samples is not None and index >= max_samples:
                break
    if pending:
        batch = flush()
        if batch is not None:
            yield batch
    skipped = {k: v for k, v in counts.items() if v and k != READ}
    if skipped:
        log.info("eval data rank %d: skipped %s of %d items read", rank, skipped, counts[READ])
