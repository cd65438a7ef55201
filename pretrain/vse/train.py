"""VSE fine-tuning loop: pretrained towers from an export, a ranking loss, DeepSpeed, per-epoch evaluation,
early stopping and the best model kept as an export directory. Typed arguments only;
``launch/finetune_vse.py`` is the CLI.

One run::

    zero-shot:   the export's own towers on the val (and test) split            -> results["zero_shot"]
    per epoch:   backbones frozen while epoch < optim.freeze_epochs (heads only), then fine-tuned with
                 fresh optimizer state; hinge sums over all negatives while epoch < loss.warmup_epochs;
                 learning rates x lr_decay_factor at every epoch of optim.lr_decay_epochs
                 -> val rsum; a better rsum saves output_dir/best/ (export format); patience stops early
    test:        output_dir/best/ reloaded and evaluated on the test split      -> results["test"]
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional

import torch

from .. import dist
from ..eval.embed import embed_karpathy, embed_shards
from ..eval.retrieval import build_pairs, coco_1k_5fold, pair_retrieval_metrics, vse_metrics
from ..metrics import MetricsWriter
from .config import VSERunConfig
from ..data.karpathy import read_karpathy, training_splits
from .data import CaptionPairs, caption_collate
from .losses import hinge_loss, info_nce_loss, similarity_stats
from ..models import image_transform
from ..runtime import adamw, deepspeed_config, start_run
from .model import VSEModel, build_vse_model, load_vse_export, save_vse_export
from ..vocab import WordVocab

log = logging.getLogger("pretrain.vse")

GRU_MAX_LENGTH = 32
ROLES = ("image_backbone", "text_backbone", "head")


def derive_deepspeed_config(cfg: VSERunConfig, world_size: int) -> Dict[str, Any]:
    t = cfg.train
    return deepspeed_config(t.batch_size, 1, world_size, cfg.optim.grad_clip, t.zero_stage, t.precision)


def role_lr(cfg: VSERunConfig, role: str) -> float:
    o = cfg.optim
    return o.lr * {"image_backbone": o.image_lr_factor, "text_backbone": o.text_lr_factor, "head": 1.0}[role]


def param_groups(model: VSEModel, cfg: VSERunConfig) -> List[Dict[str, Any]]:
    """One group per (role, decay); backbones with a learning-rate factor of 0 are left out (frozen for good)."""
    groups: Dict[str, Dict[str, Any]] = {}
    for role, name, p in model.named_parameter_roles():
        if role_lr(cfg, role) == 0.0:
            p.requires_grad_(False)
            continue
        decay = p.ndim >= 2
        key = f"{role}_{'decay' if decay else 'nodecay'}"
        g = groups.setdefault(key, {"params": [], "name": key, "role": role, "base_lr": role_lr(cfg, role),
                                    "lr": role_lr(cfg, role), "weight_decay": cfg.optim.weight_decay if decay else 0.0})
        g["params"].append(p)
    return list(groups.values())


class VSETrainer:
    def __init__(self, cfg: VSERunConfig):
        import deepspeed

        self.cfg = cfg
        t, d, m = cfg.train, cfg.data, cfg.model
        run = start_run(cfg, t.device, t.precision, t.output_dir)
        self.device, self.rank, self.world, self.autocast = run.device, run.rank, run.world, run.autocast

        # ---------------------------------------------------------------- data (fails early on bad input)
        self.val_images = self.test_images = None
        if d.source == "karpathy":
            self.train_images = read_karpathy(d.karpathy_json, d.images_root, training_splits(d.train_split, d.use_restval),
                                              d.captions_per_image)
            self.val_images = read_karpathy(d.karpathy_json, d.images_root, [d.val_split], d.captions_per_image,
                                            max_images=d.max_val_images)
            try:
                self.test_images = read_karpathy(d.karpathy_json, d.images_root, [d.test_split], d.captions_per_image)
            except ValueError as e:
                if "no image has field 'split'" not in str(e):
                    raise
                log.warning("no '%s' split in %s: no test evaluation", d.test_split, d.karpathy_json)
            log.info("Karpathy data %s: %d training images (%d captions), %d val, %d test images", d.karpathy_json,
                     len(self.train_images), sum(len(i.captions) for i in self.train_images), len(self.val_images),
                     len(self.test_images or []))

        # ---------------------------------------------------------------- zero-shot: the export as it is
        torch.manual_seed(t.seed)
        export_model, hf_tokenizer, self.eval_transform, export_max_length, export_cfg = load_vse_export(
            m.export, str(self.device))
        self.results: Dict[str, Any] = {"zero_shot": {}}
        if t.eval_zero_shot:
            for split in ("val", "test"):
                r = self.evaluate_model(export_model, hf_tokenizer, export_max_length, split, use_tokens=False)
                if r:
                    self.results["zero_shot"][split] = r
            if "val" in self.results["zero_shot"]:
                log.info("zero-shot val rsum %.2f (the export's towers, before fine-tuning)",
                         self.results["zero_shot"]["val"]["rsum"])

        # ---------------------------------------------------------------- model, tokenizer
        vocab = None
        if m.text_encoder == "gru":
            vocab = WordVocab.build([im.tokens[j] or im.captions[j] for im in self.train_images
                                     for j in range(len(im.captions))], m.min_word_freq)
            log.info("GRU vocabulary: %d words seen >= %d times in the training captions", len(vocab), m.min_word_freq)
        self.tokenizer = vocab if vocab is not None else hf_tokenizer
        self.use_tokens = vocab is not None
        self.max_length = m.max_length or (GRU_MAX_LENGTH if vocab is not None else export_max_length)
        model, self.model_cfg = build_vse_model(m, export_model, export_cfg, vocab)
        model.train()
        self.train_transform = image_transform(model.image, self.model_cfg.image.image_size, train=d.augment,
                                               crop_scale_min=d.crop_scale_min, hflip=d.hflip)

        # ---------------------------------------------------------------- training data
        if d.source == "karpathy":
            from torch.utils.data import DataLoader
            from torch.utils.data.distributed import DistributedSampler

            self.dataset = CaptionPairs(self.train_images, self.train_transform, use_tokens=self.use_tokens,
                                        cache_images=d.cache_images)
            self.sampler = DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank, shuffle=True,
                                              seed=d.seed, drop_last=True)
            self.loader = DataLoader(self.dataset, batch_size=t.batch_size, sampler=self.sampler, drop_last=True,
                                     num_workers=d.num_workers, collate_fn=caption_collate(self.tokenizer, self.max_length),
                                     persistent_workers=d.num_workers > 0)
            self.steps_per_epoch = len(self.loader)
            if self.steps_per_epoch == 0:
                raise ValueError(f"{len(self.dataset)} training captions give no full batch of train.batch_size="
                                 f"{t.batch_size} per rank on {self.world} rank(s): lower train.batch_size")
        else:
            from ..data import ShardStream

            self.stream = ShardStream(d.train_shards, batch_size=t.batch_size, rank=self.rank, world_size=self.world,
                                      num_workers=d.num_workers, seed=d.seed, shuffle_buffer=d.shuffle_buffer,
                                      image_transform=self.train_transform, tokenizer=self.tokenizer,
                                      max_length=self.max_length)
            self.steps_per_epoch = max(1, d.epoch_samples // (t.batch_size * self.world))
            self.stream_iter = None

        # ---------------------------------------------------------------- DeepSpeed
        groups = param_groups(model, cfg)
        optimizer = adamw(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=1e-8)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=derive_deepspeed_config(cfg, self.world))
        self.epoch = 0
        self.step = 0
        self.frozen: Optional[bool] = None
        self.last_sims = (float("nan"), float("nan"))   # (positive, hardest negative) scores of the last batch
        self.writer = MetricsWriter(t.output_dir, self.rank == 0, t.epochs * self.steps_per_epoch)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_model(self, model: VSEModel, tokenizer, max_length: int, split: str,
                       use_tokens: bool) -> Dict[str, float]:
        """Retrieval metrics of ``model`` on the ``val`` or ``test`` split (every rank gets the same result)."""
        d, t = self.cfg.data, self.cfg.train
        t0 = time.perf_counter()
        if d.source == "karpathy":
            images = self.val_images if split == "val" else self.test_images
            if not images:
                return {}
            emb = embed_karpathy(model, images, self.eval_transform, tokenizer, max_length=max_length,
                                 batch_size=t.eval_batch_size, rank=self.rank, world_size=self.world,
                                 device=self.device, use_tokens=use_tokens, num_workers=d.num_workers)
            results = vse_metrics(emb.image, emb.text, emb.text_to_image) if self.rank == 0 else {}
            if self.rank == 0 and split == "test" and t.coco_1k and len(images) == 5000:
                results.update({f"1k_{k}": v for k, v in coco_1k_5fold(emb.image, emb.text,
                                                                        emb.text_to_image).items()})
            results["num_images"], results["num_captions"] = len(images), int(emb.text.shape[0])
        else:
            urls = d.val_shards if split == "val" else d.test_shards
            if not urls:
                return {}
            emb = embed_shards(model, urls, self.eval_transform, tokenizer, max_length=max_length,
                               batch_size=t.eval_batch_size, rank=self.rank, world_size=self.world, device=self.device,
                               max_samples=d.val_max_samples)
            results = {}
            if self.rank == 0:
                pq, pi, q_first, i_first, gains = build_pairs(emb.query_id, emb.image_id, emb.clicks)
                results = pair_retrieval_metrics(emb.text[q_first], emb.image[i_first], pq, pi, gains)
        results["eval_seconds"] = time.perf_counter() - t0
        return dist.broadcast_object(results)

    def evaluate(self, split: str = "val") -> Dict[str, float]:
        return self.evaluate_model(self.engine.module, self.tokenizer, self.max_length, split, self.use_tokens)

    # ------------------------------------------------------------------ schedule
    def lr_factor(self, role: str) -> float:
        o = self.cfg.optim
        if role != "head" and self.epoch < o.freeze_epochs:
            return 0.0
        f = o.lr_decay_factor ** sum(self.epoch >= e for e in o.lr_decay_epochs)
        if o.warmup_steps and self.step < o.warmup_steps:
            f *= (self.step + 1) / o.warmup_steps
        return f

    def _set_lrs(self) -> None:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = g["base_lr"] * self.lr_factor(g["role"])

    def _set_frozen(self, frozen: bool) -> None:
        """Freeze / unfreeze the backbones that the optimizer trains. Unfreezing drops their optimizer state
        (the frozen steps counted toward Adam's bias correction without gradients: a restart is the clean way)."""
        module: VSEModel = self.engine.module
        trained = [b for k, b in module.backbones().items() if role_lr(self.cfg, f"{k}_backbone") > 0]
        for b in trained:
            for p in b.parameters():
                p.requires_grad_(not frozen)
        if self.frozen and not frozen:
            inner = self.engine.optimizer
            while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
                inner = inner.optimizer
            for g in inner.param_groups:
                if g.get("role") != "head":
                    for p in g["params"]:
                        inner.state.pop(p, None)
            log.info("epoch %d: backbones unfrozen (optimizer state of the backbones reset)", self.epoch)
        elif frozen and not self.frozen:
            log.info("epoch %d: backbones frozen until epoch %d (heads only)", self.epoch, self.cfg.optim.freeze_epochs)
        self.frozen = frozen

    def _apply_backbone_modes(self) -> None:
        """Backbones that do not learn stay in eval mode (fixed BatchNorm statistics, no dropout)."""
        for k, b in self.engine.module.backbones().items():
            if self.frozen or role_lr(self.cfg, f"{k}_backbone") == 0:
                b.eval()

    # ------------------------------------------------------------------ training
    def _batches(self):
        if self.cfg.data.source == "karpathy":
            self.sampler.set_epoch(self.epoch)
            yield from self.loader
        else:
            if self.stream_iter is None:
                self.stream_iter = iter(self.stream)
            for _ in range(self.steps_per_epoch):
                yield next(self.stream_iter)

    def loss(self, img: torch.Tensor, txt: torch.Tensor, image_ids: torch.Tensor,
             text_ids: Optional[torch.Tensor]) -> torch.Tensor:
        c = self.cfg.loss
        if c.global_negatives and self.world > 1:
            img, txt = dist.all_gather_with_local_grad(img), dist.all_gather_with_local_grad(txt)   # G*M x D
            image_ids = dist.concat_all_gather(image_ids)
            text_ids = dist.concat_all_gather(text_ids) if text_ids is not None else None
        if not c.mask_false_negatives:
            image_ids = text_ids = None
        self.last_sims = similarity_stats(img, txt, image_ids, text_ids)
        if c.kind == "hinge":
            return hinge_loss(img, txt, c.margin, c.max_violation and self.epoch >= c.warmup_epochs, image_ids, text_ids)
        return info_nce_loss(img, txt, c.temperature, image_ids, text_ids)

    def train_epoch(self) -> Dict[str, float]:
        t = self.cfg.train
        self.engine.train()
        self._set_frozen(self.epoch < self.cfg.optim.freeze_epochs)
        self._apply_backbone_modes()
        total, n, skipped = 0.0, 0, 0
        window, window_n = 0.0, 0
        t0 = tw = time.perf_counter()
        for batch in self._batches():
            self._set_lrs()
            images = batch["image"].to(self.device, non_blocking=True)
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            if self.cfg.data.source == "karpathy":
                image_ids, text_ids = batch["image_index"].to(self.device), batch["text_id"].to(self.device)
            else:
                image_ids, text_ids = batch["image_id"].to(self.device), batch["query_id"].to(self.device)
            with self.autocast:
                img, txt = self.engine(images, ids, mask)
                loss = self.loss(img.float(), txt.float(), image_ids, text_ids)
            if dist.any_rank(not bool(torch.isfinite(loss.detach())), self.device):
                skipped += 1
                log.warning("epoch %d step %d: non-finite loss on some rank; batch skipped on every rank",
                            self.epoch, self.step)
                continue
            scale = self.world if self.cfg.loss.global_negatives else 1  # DeepSpeed averages over ranks
            self.engine.backward(loss * scale)
            self.engine.step()
            self.step += 1
            total += float(loss.detach())
            window += float(loss.detach())
            n += 1
            window_n += 1
            if self.step % t.log_every == 0:
                lrs = {f"lr_{g['name']}": g["lr"] for g in self.engine.optimizer.param_groups if g["name"].endswith("_decay")}
                elapsed = time.perf_counter() - tw
                self.writer.write(self.step, {"loss": window / window_n, "epoch": self.epoch,
                                              "pos_sim": self.last_sims[0], "hardest_neg_sim": self.last_sims[1],
                                              "samples_per_s": window_n * t.batch_size * self.world / elapsed, **lrs})
                window, window_n, tw = 0.0, 0, time.perf_counter()
        stats = dist.all_reduce(torch.tensor([total, float(n)], dtype=torch.float64))
        return {"loss": float(stats[0] / max(stats[1], 1)), "steps": n, "skipped": skipped,
                "seconds": time.perf_counter() - t0, "pos_sim": self.last_sims[0], "hardest_neg_sim": self.last_sims[1]}

    def log_epoch(self, stats: Dict[str, float], val: Dict[str, float]) -> None:
        """The epoch's training values (loss, steps, skipped, seconds, pos_sim, hardest_neg_sim) under ``train/``,
        its validation metrics under ``val/`` (both with the epoch), at the current step."""
        self.writer.write(self.step, {"epoch": self.epoch, **stats}, progress=False, prefix="train/")
        self.writer.write(self.step, {"epoch": self.epoch, **val}, progress=False, prefix="val/")

    def fit(self) -> Dict[str, Any]:
        """Train ``train.epochs`` epochs (or until ``train.patience`` epochs without a better val rsum),
        then evaluate the best model on the test split. Returns (and writes) ``results.json``'s content."""
        t = self.cfg.train
        best_dir = os.path.join(t.output_dir, "best")
        best, best_epoch, since_best = -math.inf, -1, 0
        history: List[Dict[str, Any]] = []
        log.info("fine-tuning %d epochs x %d steps on %d process(es): batch %d x %d, ZeRO-%d, %s, %s loss, %s text "
                 "encoder", t.epochs, self.steps_per_epoch, self.world, t.batch_size, self.world, t.zero_stage,
                 self.device, self.cfg.loss.kind, self.cfg.model.text_encoder)
        for self.epoch in range(t.epochs):
            stats = self.train_epoch()
            val = self.evaluate("val")
            rsum = val["rsum"]
            history.append({"epoch": self.epoch, **stats, "val_rsum": rsum})
            self.log_epoch(stats, val)
            improved = rsum > best
            log.info("epoch %d: loss %.4f (%d steps, %.0f s), last batch: positive %.3f, hardest negative %.3f | "
                     "val rsum %.2f%s", self.epoch, stats["loss"], stats["steps"], stats["seconds"], stats["pos_sim"],
                     stats["hardest_neg_sim"], rsum, " (best)" if improved else f" (best {best:.2f})")
            if improved:
                best, best_epoch, since_best = rsum, self.epoch, 0
                if self.rank == 0:
                    save_vse_export(self.engine.module, self.model_cfg, self.tokenizer, best_dir, self.max_length,
                                    meta={"epoch": self.epoch, "val_rsum": rsum, "val": val,
                                          "export": os.path.abspath(self.cfg.model.export)})
                dist.barrier()
            else:
                since_best += 1
                if t.patience and since_best >= t.patience:
                    log.info("early stopping: %d epochs without a better val rsum", since_best)
                    break
        self.results.update({"best_epoch": best_epoch, "best_val_rsum": best, "best_dir": best_dir,
                             "history": history})
        if best_epoch >= 0:
            model, tokenizer, _, max_length, _ = load_vse_export(best_dir, str(self.device))
            test = self.evaluate_model(model, tokenizer, max_length, "test", self.use_tokens)
            if test:
                self.results["test"] = test
                log.info("best model (epoch %d) on the test split: rsum %.2f", best_epoch, test["rsum"])
        if self.rank == 0:
            with open(os.path.join(t.output_dir, "results.json"), "w", encoding="utf-8") as f:
                json.dump(self.results, f, indent=1)
        self.writer.close()
        return self.results
