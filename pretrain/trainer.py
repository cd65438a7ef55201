"""The pretraining loop: builds the DeepSpeed engine, the WenLan step (momentum towers and queues, see
``pretrain/wenlan.py``) and the data stream, then trains, logs, evaluates and checkpoints. Typed arguments
only; launch/pretrain.py is the CLI.

A micro-batch whose loss is not finite on any rank is skipped on every rank and counted; after
``train.max_bad_steps_in_row`` such steps in a row the run stops.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from typing import Any, Dict, List, Optional

import torch

from . import checkpoint, dist
from .config import RunConfig
from .metrics import MetricsWriter, set_aside_old_metrics, truncate_metrics
from .models import build_tokenizer, image_transform, momentum_copy
from .runtime import adamw, deepspeed_config, start_run
from .wenlan import WenLanModel, WenLanStep, key_towers_are_query, momentum_at

log = logging.getLogger("pretrain")


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (too many bad steps, too much bad data)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Schedulers send one of these before they kill a job (SLURM: ``--signal=USR1@120``; Kubernetes: SIGTERM)."""


class StopRequest:
    """Records SIGTERM / SIGUSR1 instead of dying; the loop polls ``signum`` at each optimizer step and all
    ranks agree (``dist.any_rank``), so that every rank stops at the same step and saves."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def install(self) -> None:
        for s in STOP_SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a test harness): no preemption handling
                return

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def derive_deepspeed_config(cfg: RunConfig, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed config of a pretraining run (``runtime.deepspeed_config``, with the fragment checks)."""
    t = cfg.train
    return deepspeed_config(t.micro_batch_size, t.grad_accum_steps, world_size, cfg.optim.grad_clip, t.zero_stage,
                            t.precision, t.deepspeed_config)


def param_groups(model: WenLanModel, cfg: RunConfig) -> List[Dict[str, Any]]:
    """Towers at ``optim.lr``; heads (pooling, projections, temperature) at ``optim.head_lr``;
    no weight decay on biases, norms (1-d tensors) and the temperature."""
    groups: Dict[str, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = ".proj." in name or ".pool." in name or name == "logit_scale"
        decay = p.ndim >= 2 and name != "logit_scale"
        key = f"{'head' if is_head else 'tower'}_{'decay' if decay else 'nodecay'}"
        g = groups.setdefault(key, {"params": [], "name": key,
                                    "lr": cfg.optim.head_lr if is_head else cfg.optim.lr,
                                    "weight_decay": cfg.optim.weight_decay if decay else 0.0})
        g["params"].append(p)
    return list(groups.values())


def share_fp32_master_partitions(optimizer) -> int:
    """ZeRO-3 in fp32: let the optimizer's fp32 master partitions be the parameter partitions themselves.

    DeepSpeed means to skip the master copy when the partitions are already fp32 on the right device,
    but it compares ``tensor.device`` with a device *name* ('cpu', 'cuda:0'), which is never equal, so an
    fp32 run keeps a second full fp32 copy of its partition (1/G of the model, per process). The two
    hold equal values at this point and DeepSpeed copies master -> partition after each step, which
    is a no-op once they share storage. Returns the bytes saved per process."""
    lp_groups = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    hp_groups = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if not lp_groups or not hp_groups or getattr(optimizer, "offload_optimizer", False) or \
            getattr(optimizer, "offload_param", False):
        return 0
    saved = 0
    for lp, hp in zip(lp_groups, hp_groups):
        if lp is None or lp is hp or lp.dtype != hp.dtype or lp.device != hp.device or lp.shape != hp.shape \
                or lp.data_ptr() == hp.data_ptr() or not torch.equal(lp, hp):
            continue
        saved += hp.numel() * hp.element_size()
        hp.data = lp.data
    if saved:
        log.info("ZeRO-3 fp32: master partitions share the parameter partitions (%.1f MiB saved per process)",
                 saved / 2 ** 20)
    return saved


def lr_lambda(cfg: RunConfig):
    warm, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = min((step - warm) / max(total - warm, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    return f


def build_transforms(cfg: RunConfig, image_tower):
    """(train, evaluation) transforms of the pretraining run."""
    d, size = cfg.data, cfg.model.image.image_size
    train = image_transform(image_tower, size, train=d.augment, crop_scale_min=d.crop_scale_min, hflip=d.hflip,
                            color_jitter=d.color_jitter)
    return train, image_transform(image_tower, size)


class Trainer:
    def __init__(self, cfg: RunConfig, resume: Optional[str] = None, stream=None):
        """``stream``: an iterable of batches to use instead of the shards of ``cfg.data`` (tests)."""
        import deepspeed

        self.cfg = cfg
        t = cfg.train
        self.stop_request = StopRequest()
        self.stop_request.install()  # before the slow start-up: a signal then still ends in a clean stop
        self.stopped_by: Optional[str] = None  # signal name when the run stopped early on a signal
        self.ckpt_dir = os.path.join(t.output_dir, "checkpoints")
        run = start_run(cfg, t.device, t.precision, t.output_dir, make_dirs=[self.ckpt_dir],
                        set_aside_metrics=False)  # a resumed run keeps (and truncates) its own metrics.jsonl
        self.device, self.rank, self.world, self.autocast = run.device, run.rank, run.world, run.autocast

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = WenLanModel(cfg.model, cfg.wenlan)
        momentum_towers = cfg.wenlan.mode == "momentum" and not key_towers_are_query(cfg.wenlan)
        key = momentum_copy(model.query) if momentum_towers else None  # g starts equal to f
        optimizer = adamw(param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                      eps=cfg.optim.eps)
        self.ds_config = derive_deepspeed_config(cfg, self.world)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
        checkpoint.install_safe_engine(self.engine)  # DeepSpeed's own load: weights_only=True
        if t.zero_stage == 3:
            share_fp32_master_partitions(self.engine.optimizer)
        self.wenlan = WenLanStep(self.engine, cfg.wenlan, key, cfg.model.embed_dim, self.device, self.autocast,
                                 total_steps=t.steps, zero_stage=t.zero_stage)

        self.tokenizer = build_tokenizer(cfg.model.text)
        self.train_transform, self.eval_transform = build_transforms(cfg, model.query.image)
        self.stream = stream if stream is not None else self._build_stream()

        self.step = 0                 # optimizer steps done
        self.samples = 0              # pairs seen (all ranks)
        self.skipped = 0              # non-finite micro-batches skipped on every rank
        self.bad_in_row = 0
        self.ds_skipped_base = 0
        self.last_eval: Dict[str, float] = {}
        self.last_checkpoint: Optional[str] = None
        self._resume_rng = None       # restored right before the first step (see fit)
        self.resumed_from = checkpoint.resolve_resume(self.ckpt_dir, resume)
        if self.resumed_from:
            self._restore(self.resumed_from)
            if self.rank == 0:  # each step once in the log: drop what was logged after this checkpoint
                truncate_metrics(t.output_dir, self.step)
        else:
            existing = dist.broadcast_object(checkpoint.complete_tags(self.ckpt_dir) if self.rank == 0 else None)
            if existing:
                raise ValueError(f"{self.ckpt_dir} already holds checkpoints ({existing[-1]}) and --resume is "
                                 f"'{resume}': continue with --resume auto, or choose a new train.output_dir")
            if self.rank == 0:  # a fresh run: keep the old log aside, lose nothing
                set_aside_old_metrics(t.output_dir)
        dist.barrier()
        self.writer = MetricsWriter(t.output_dir, self.rank == 0, t.steps, start_step=self.step,
                                    purge_after=self.step if self.resumed_from else None)

    # ------------------------------------------------------------------ data
    def _build_stream(self):
        from .data import ShardStream

        d, t = self.cfg.data, self.cfg.train
        if not d.train_shards:
            raise ValueError("data.train_shards is empty: give the training shards, e.g. "
                             "data.train_shards=data/demo/shards/train (see tools/make_demo_data.py)")
        return ShardStream(d.train_shards, batch_size=t.micro_batch_size, rank=self.rank, world_size=self.world,
                           num_workers=d.num_workers, seed=d.seed, shuffle_buffer=d.shuffle_buffer,
                           image_transform=self.train_transform, tokenizer=self.tokenizer,
                           max_length=self.cfg.model.text.max_length, allow_pipe=d.allow_pipe,
                           max_pixels=d.max_pixels, image_exts=tuple(d.image_key.split(";")), text_ext=d.text_key,
                           max_bad_fraction=d.max_bad_fraction,
                           # decode JPEGs reduced, but large enough for the smallest random crop
                           decode_size=int(math.ceil(self.cfg.model.image.image_size /
                                                     math.sqrt(d.crop_scale_min if d.augment else 1.0))))

    def _to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    # ------------------------------------------------------------------ loop
    def fit(self) -> Dict[str, float]:
        t = self.cfg.train
        if self.step >= t.steps:
            log.info("run already at step %d of %d: nothing to train", self.step, t.steps)
            if self._final_eval_missing():  # killed during the final evaluation (the checkpoint came first)
                self.evaluate()
            self.writer.close()
            return self.last_eval
        self.engine.train()
        if self.wenlan.keys is not None and self.wenlan.keys.key is not None:
            self.wenlan.keys.key.train()
        log.info("training %d steps on %d process(es): micro-batch %d x accumulation %d x %d = %d pairs/step, "
                 "ZeRO-%d, %s, device %s", t.steps - self.step, self.world, t.micro_batch_size, t.grad_accum_steps,
                 self.world, t.micro_batch_size * t.grad_accum_steps * self.world, t.zero_stage, t.precision,
                 self.device)
        it = iter(self.stream)
        window: Dict[str, float] = {}
        sums: Dict[str, float] = {}
        n_sum = 0
        win_start = time.perf_counter()
        win_samples = 0
        last = min(t.steps, t.stop_at) if t.stop_at > 0 else t.steps
        while self.step < last:
            micro_done = 0
            while micro_done < t.grad_accum_steps:
                td = time.perf_counter()
                batch = self._to_device(next(it))
                if self._resume_rng is not None:
                    # after the first fetch: building the DataLoader iterator draws from the global torch RNG,
                    # which the uninterrupted run did at step 0, not here (dropout would differ otherwise)
                    checkpoint.set_rng_state(self._resume_rng)
                    self._resume_rng = None
                window["data_wait"] = window.get("data_wait", 0.0) + time.perf_counter() - td
                poison = t.inject_nan_at_step == self.step and self.rank == t.inject_nan_rank
                out = self.wenlan.micro_step(batch, self.step, window, poison=poison)
                win_samples += batch["image"].shape[0] * self.world
                self.samples += batch["image"].shape[0] * self.world
                if out is None:
                    self.skipped += 1
                    self.bad_in_row += 1
                    log.warning("step %d: non-finite loss on some rank; micro-batch skipped on every rank "
                                "(%d in a row, %d in total)", self.step, self.bad_in_row, self.skipped)
                    if self.bad_in_row >= t.max_bad_steps_in_row:
                        raise TrainingStopped(
                            f"{self.bad_in_row} non-finite steps in a row (train.max_bad_steps_in_row="
                            f"{t.max_bad_steps_in_row}): stopping. Lower the learning rate (optim.lr), check the "
                            f"data, or resume from the last checkpoint with --resume auto.")
                    if self.step == t.inject_nan_at_step:
                        break  # the injected NaN is tied to this step: move on to the next step
                    continue
                self.bad_in_row = 0
                micro_done += 1
                for k, v in out.items():  # (sum, count) of finite values: a diagnostic may be undefined
                    v = float(v.detach())   # (no negative yet at step 0)
                    if math.isfinite(v):
                        s, c = sums.get(k, (0.0, 0))
                        sums[k] = (s + v, c + 1)
                n_sum += 1
            if micro_done == t.grad_accum_steps and not self.wenlan.boundary(self.step, window):
                self.skipped += 1
            self.step += 1
            # a signal reaches the ranks at different moments: agree, so that all stop after this same step
            stop = dist.any_rank(self.stop_request.signum is not None, self.device)
            if self.step % t.log_every == 0 or self.step == last or stop:
                self._log(window, sums, n_sum, win_start, win_samples)
                window, sums, n_sum, win_start, win_samples = {}, {}, 0, time.perf_counter(), 0
            if stop:
                names = dist.all_gather_objects(self.stop_request.name)
                self.stopped_by = next((n for n in names if n), "a signal")
                break
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                self.evaluate()
                win_start = time.perf_counter()
            if self.step % t.save_every == 0 and self.step < t.steps:
                self.save()
                win_start = time.perf_counter()
        del it  # stop the loader workers before the last save and evaluation
        self.save()  # the final checkpoint comes before the final evaluation: a failing evaluation loses no work
        results = self.evaluate() if self.step >= t.steps and not self.stopped_by else {}
        self.writer.close()
        if self.stopped_by:
            log.info("stopped by %s after step %d of %d; checkpoint %s. Continue with the same command and "
                     "--resume auto", self.stopped_by, self.step, t.steps, self.last_checkpoint)
        elif self.step < t.steps:
            log.info("stopped at step %d of %d (train.stop_at); continue with --resume auto", self.step, t.steps)
        return results

    def _final_eval_missing(self) -> bool:
        if not self.cfg.data.val_shards:
            return False
        names = ["eval"] + (["eval_momentum"] if self.wenlan.keys is not None and self.wenlan.keys.key is not None
                            else [])
        missing = dist.broadcast_object(any(
            not os.path.isfile(os.path.join(self.cfg.train.output_dir, n, f"step_{self.step:08d}.json"))
            for n in names))
        if missing and self.rank == 0:  # a partial evaluation of this step is logged again in full
            truncate_metrics(self.cfg.train.output_dir, self.step, drop_eval_at_last=True)
        return missing

    def _log(self, window, sums, n_sum, win_start, win_samples) -> None:
        elapsed = max(time.perf_counter() - win_start, 1e-9)
        counts = self.stream.skip_counts()
        counts = dist.sum_counts(dict(counts, _read=self.stream.samples_read()))
        read = counts.pop("_read", 0)
        grad_norm = self.engine.get_global_grad_norm()
        keys = sorted(set().union(*dist.all_gather_objects(sorted(sums))))  # a rank that skipped all has none
        vec = dist.all_reduce(torch.tensor([sums.get(k, (0.0, 0))[i] for k in keys for i in (0, 1)] + [float(n_sum)],
                                           dtype=torch.float64))
        n_all = float(vec[-1])
        metrics: Dict[str, Any] = {k: float(vec[2 * j]) / float(vec[2 * j + 1]) for j, k in enumerate(keys)
                                   if float(vec[2 * j + 1]) > 0}
        if not n_all:
            metrics.update({k: float("nan") for k in ("loss", "loss_i2t", "loss_t2i")})
        groups = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.engine.optimizer.param_groups)}
        tower_lr = groups.get("tower_decay", groups.get("tower_nodecay"))
        head_lr = groups.get("head_decay", groups.get("head_nodecay"))
        metrics.update({
            "lr": tower_lr,
            "lr_head": head_lr,
            "samples_per_s": win_samples / elapsed,
            "data_wait_frac": window.get("data_wait", 0.0) / elapsed,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "skipped_steps": self.skipped,
            "samples": self.samples,
            "data_read": read,
            "data_skipped": sum(counts.values()),
        })
        if self.wenlan.keys is not None:
            metrics["momentum"] = momentum_at(self.step, self.cfg.train.steps, self.cfg.wenlan)
            metrics.update(self.wenlan.queue_stats(self.step))
        for k, v in counts.items():
            metrics[f"data_skip/{k}"] = v
        for k in ("key_forward", "query_forward", "backward", "optimizer", "momentum", "gather_enqueue"):
            metrics[f"time_frac/{k}"] = window.get(k, 0.0) / elapsed
        self.writer.write(self.step, metrics)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Held-out retrieval over distinct queries and distinct images (both directions), streamed, of the query
        towers (``eval/``) and, when there are momentum towers, of those too (``eval_momentum/``)."""
        d = self.cfg.data
        if not d.val_shards:
            return {}
        results = self._evaluate_towers(self.engine.module.query, "eval", contextlib.nullcontext())
        keys = self.wenlan.keys
        if keys is not None and keys.key is not None:
            self._evaluate_towers(keys.key, "eval_momentum", keys._gathered())
        self.last_eval = results
        return results

    def _evaluate_towers(self, towers, name: str, gathered) -> Dict[str, float]:
        from .eval.embed import embed_shards
        from .eval.retrieval import build_pairs, pair_retrieval_metrics

        d = self.cfg.data
        t0, cpu0 = time.perf_counter(), time.process_time()
        size, length = self.cfg.model.image.image_size, self.cfg.model.text.max_length
        dummy = {"image": torch.zeros(1, 3, size, size), "input_ids": torch.zeros(1, length, dtype=torch.long),
                 "attention_mask": torch.ones(1, length, dtype=torch.long)}
        with gathered:
            emb = embed_shards(towers, d.val_shards, self.eval_transform, self.tokenizer, max_length=length,
                               batch_size=self.cfg.train.micro_batch_size, rank=self.rank, world_size=self.world,
                               device=self.device, max_samples=d.val_max_samples,
                               lockstep=self.cfg.train.zero_stage == 3 and towers is self.engine.module.query,
                               autocast=self.autocast, dummy=dummy)
        results: Dict[str, float] = {}
        if self.rank == 0:
            pq, pi, q_first, i_first, gains = build_pairs(emb.query_id, emb.image_id, emb.clicks)
            results = pair_retrieval_metrics(emb.text[q_first], emb.image[i_first], pq, pi, gains)
            results["eval_seconds"] = time.perf_counter() - t0
            results["eval_cpu_seconds"] = time.process_time() - cpu0  # this process, all its threads
            self.writer.write(self.step, results, progress=False, prefix=f"{name}/")
            log.info("%s step %d: %d queries, %d images | t2i R@1 %.3f R@5 %.3f R@10 %.3f | i2t R@1 %.3f R@5 "
                     "%.3f R@10 %.3f | rsum %.1f | chance t2i R@1 %.4f", name, self.step,
                     results.get("t2i_num_queries", 0), results.get("t2i_gallery_size", 0),
                     results.get("t2i_hit@1", float("nan")), results.get("t2i_hit@5", float("nan")),
                     results.get("t2i_hit@10", float("nan")), results.get("i2t_hit@1", float("nan")),
                     results.get("i2t_hit@5", float("nan")), results.get("i2t_hit@10", float("nan")),
                     results.get("rsum", float("nan")), results.get("t2i_chance_hit@1", float("nan")))
            os.makedirs(os.path.join(self.cfg.train.output_dir, name), exist_ok=True)
            with open(os.path.join(self.cfg.train.output_dir, name, f"step_{self.step:08d}.json"), "w") as f:
                json.dump({"step": self.step, **results}, f, indent=1)
        return dist.broadcast_object(results)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Collective. A step that already has a complete checkpoint is left as it is."""
        shared = {"keys": self.wenlan.state_dict(), "step": self.step, "samples": self.samples,
                  "skipped": self.skipped, "bad_in_row": self.bad_in_row}
        own = {"stream": self.stream.state_dict(), "rng": checkpoint.rng_state()}
        path, written = checkpoint.save(self.engine, self.ckpt_dir, self.step, shared, own,
                                        self.cfg.train.keep_checkpoints)
        log.info("%s checkpoint %s", "saved" if written else "kept the complete", path)
        self.last_checkpoint = path
        return path

    def _restore(self, path: str) -> None:
        shared, own = checkpoint.load(self.engine, path)
        self.wenlan.load_state_dict(shared["keys"])
        self.step, self.samples = shared["step"], shared["samples"]
        self.skipped, self.bad_in_row = shared["skipped"], shared["bad_in_row"]
        self.stream.load_state_dict(own["stream"])
        self._resume_rng = own["rng"]
        self.last_checkpoint = path
        log.info("resumed from %s at step %d", path, self.step)
