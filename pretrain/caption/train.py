"""Captioning fine-tuning: cross-entropy, then self-critical training, under DeepSpeed; typed arguments only
(launch/finetune_caption.py is the CLI).

    constant baseline  the best of the k most frequent training captions, scored on the test set
    xe phase           label-smoothed cross-entropy (+ scheduled sampling, + SAT's doubly stochastic term);
                       the image tower is frozen, or fine-tuned at encoder.lr from encoder.finetune_from_epoch
    scst phase         starts from the best XE model; CIDEr-D reward, greedy or leave-one-out baseline
    every epoch        greedy captions of the validation set -> CIDEr-D (COCO tokenisation) -> <phase>_best/
    at the end         test metrics of xe_best/ and scst_best/ with greedy decoding and ``decode.strategy``

Each phase builds its own DeepSpeed engine on a fresh copy of the model (its own optimizer and schedule).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections import Counter
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import dist
from ..metrics import MetricsWriter
from .cider import cider_d
from .config import CaptionRunConfig
from .data import CaptionDataset, CaptionUnit, collate, split_units
from .decoders import expand_memory
from .decoding import DecodeRules, decode, sequences_to_lists
from .losses import doubly_stochastic, label_smoothed_nll, scheduled_sampling_prob
from .metrics import score_many, tokenize
from ..models import image_transform
from ..runtime import adamw, deepspeed_config, start_run
from .model import CaptionModel, build_model, load_towers, save_model_dir
from .scst import CiderReward, scst_step
from ..vocab import WordVocab, sentence_tokens
from .vocab import TokenizerVocab

log = logging.getLogger("pretrain.caption")


class TrainStep(nn.Module):
    """What the DeepSpeed engine runs: one phase's loss for a batch (the engine wraps this module)."""

    def __init__(self, model: CaptionModel, cfg: CaptionRunConfig, rules: DecodeRules,
                 reward: Optional[CiderReward] = None):
        super().__init__()
        self.model, self.cfg, self.rules, self.reward = model, cfg, rules, reward

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor], indices: List[int],
                conditions: Optional[List[str]], phase: str, ss_prob: float = 0.0) -> Dict[str, torch.Tensor]:
        if phase == "scst":
            s = self.cfg.scst
            return scst_step(self.model, images, indices, self.reward, self.rules, s.num_samples, s.baseline,
                             s.temperature, conditions)
        b, s_per, t = labels.shape
        memory = expand_memory(self.model.encode(images, conditions), s_per)    # B*S rows
        labels = labels.view(b * s_per, t)
        pad = self.rules.pad
        longest = int((labels != pad).sum(1).max())                            # BOS .. EOS
        labels = labels[:, :longest]
        inputs, targets = labels[:, :-1], labels[:, 1:]
        mask = targets != pad
        logits, alphas = self.model.decoder(memory, inputs, ss_prob)
        xe = label_smoothed_nll(logits, targets, mask, self.cfg.xe.label_smoothing)
        out = {"xe": xe.detach()}
        loss = xe
        if self.cfg.decoder.kind == "sat" and self.cfg.decoder.doubly_stochastic > 0:
            ds = doubly_stochastic(alphas, mask)
            loss = loss + self.cfg.decoder.doubly_stochastic * ds
            out["doubly_stochastic"] = ds.detach()
        out["loss"] = loss
        return out


def derive_deepspeed_config(cfg: CaptionRunConfig, batch_size: int, world: int) -> Dict[str, Any]:
    t = cfg.train
    return deepspeed_config(batch_size, 1, world, cfg.xe.grad_clip, t.zero_stage, t.precision)


def schedule(warmup: int, total: int, floor: float, start: int = 0):
    """Multiplier of the peak learning rate: 0 before ``start``, linear warm-up, cosine to ``floor``."""

    def f(step: int) -> float:
        if step < start:
            return 0.0
        s = step - start
        if s < warmup:
            return (s + 1) / warmup
        frac = min((s - warmup) / max(total - start - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    return f


def format_table(results: Dict[str, Any]) -> str:
    """The final table: constant baseline, then every (model, decoding) row on the test set."""
    rows = results.get("test", [])
    names = ["BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"]
    cols = [n for n in names if any(n in r["metrics"] for r in rows)]
    head = f"{'model':<10} {'decoding':<10} " + " ".join(f"{c:>8}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        vals = [r["metrics"].get(c) for c in cols]
        lines.append(f"{r['model']:<10} {r['decoding']:<10} " +
                     " ".join(f"{v:8.3f}" if v is not None else f"{'n/a':>8}" for v in vals))
    const = results.get("constant")
    if const:
        lines.append(f"constant caption: \"{const['caption']}\"")
    for name, why in sorted(results.get("unavailable", {}).items()):
        lines.append(f"{name}: unavailable ({why})")
    return "\n".join(lines)


class CaptionTrainer:
    def __init__(self, cfg: CaptionRunConfig):
        self.cfg = cfg
        t = cfg.train
        run = start_run(cfg, t.device, t.precision, t.output_dir)
        self.device, self.rank, self.world, self.autocast = run.device, run.rank, run.world, run.autocast
        torch.manual_seed(t.seed)

        d = cfg.data
        self.units = split_units(d.karpathy_json, d.images_root, d.condition_field, d.use_restval)
        if d.max_val_images:
            self.units["val"] = self.units["val"][:d.max_val_images]
        need_text = bool(d.condition_field) or d.vocab == "tokenizer"
        self.towers_cfg, image_tower, text_tower, tokenizer = load_towers(cfg.encoder, need_text)
        if d.vocab == "word":
            self.vocab = WordVocab.build((sentence_tokens(s) for u in self.units["train"] for s in u.sentences),
                                         d.min_word_freq)
        else:
            self.vocab = TokenizerVocab(tokenizer)
        self.transform = image_transform(image_tower, self.towers_cfg.image.image_size)
        self.base_model = build_model(cfg, self.vocab.size, image_tower, text_tower, tokenizer)  # never trained
        n_dec = sum(p.numel() for p in self.base_model.decoder.parameters())
        log.info("data: %d train / %d val / %d test units; vocabulary %d (%s); decoder %s with %.2fM parameters",
                 len(self.units["train"]), len(self.units["val"]), len(self.units["test"]), self.vocab.size,
                 d.vocab, cfg.decoder.kind, n_dec / 1e6)
        self.train_set = CaptionDataset(self.units["train"], self.transform, self.vocab, d.max_length,
                                        d.seq_per_img, train=True, cache_images=d.cache_images, seed=t.seed,
                                        random_shift=d.random_shift)
        self.eval_sets = {k: CaptionDataset(self.units[k], self.transform, cache_images=d.cache_images)
                          for k in ("val", "test")}
        dc = cfg.decode
        self.rules = DecodeRules.from_vocab(self.vocab, dc.max_length, dc.min_length, dc.bad_endings, dc.allow_unk)
        self.scst_rules = DecodeRules.from_vocab(self.vocab, cfg.scst.max_length, dc.min_length, dc.bad_endings,
                                                 dc.allow_unk)
        # references of val/test and the constant-caption candidates: tokenised once, in one tokenizer run
        self.refs_tok: Dict[str, Dict[str, List[str]]] = {}
        self.constant_candidates: List[Tuple[str, str]] = []  # (caption, tokenised)
        if self.rank == 0:
            counts = Counter(" ".join(sentence_tokens(s)) for u in self.units["train"] for s in u.sentences)
            cands = [c for c, _ in counts.most_common(cfg.eval.constant_topk)]
            todo = {(split, u.key): u.refs_raw for split in ("val", "test") for u in self.units[split]}
            todo.update({("constant", str(i)): [c] for i, c in enumerate(cands)})
            done = tokenize(todo, cfg.eval.tokenize)
            for split in ("val", "test"):
                self.refs_tok[split] = {u.key: done[(split, u.key)] for u in self.units[split]}
            self.constant_candidates = [(c, done[("constant", str(i))][0]) for i, c in enumerate(cands)]
        self.writer = MetricsWriter(t.output_dir, self.rank == 0, 0)
        self.global_step = 0
        self.results: Dict[str, Any] = {"test": [], "unavailable": {}, "time_s": {}}

    # ------------------------------------------------------------------ helpers
    def _conditions(self, units: List[CaptionUnit], indices) -> Optional[List[str]]:
        if not self.cfg.data.condition_field:
            return None
        return [units[int(i)].condition for i in indices]

    def _gathered(self, module: nn.Module):
        if self.cfg.train.zero_stage == 3:
            import deepspeed
            return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        return nullcontext()

    def _full_state(self, model: CaptionModel) -> Dict[str, torch.Tensor]:
        with self._gathered(model):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def generate(self, model: CaptionModel, split: str, strategy: str) -> Dict[str, str]:
        """Captions of a split (units shared out over ranks; every rank gets all captions)."""
        units = self.units[split]
        mine = list(range(self.rank, len(units), self.world))
        ds = self.eval_sets[split]
        model.eval()
        out: Dict[str, str] = {}
        bs = self.cfg.eval.batch_size
        dc = self.cfg.decode
        with self._gathered(model):
            for s in range(0, len(mine), bs):
                idx = mine[s:s + bs]
                images = torch.stack([ds.image(i) for i in idx]).to(self.device, _dtype(model))
                memory = model.encode(images, self._conditions(units, idx))
                seqs, _ = decode(model.decoder, memory, self.rules, strategy, dc.beam_size, dc.length_penalty,
                                 dc.temperature)
                for i, words in zip(idx, sequences_to_lists(seqs, self.vocab.eos, self.vocab.pad)):
                    out[units[i].key] = self.vocab.decode(words)
        merged: Dict[str, str] = {}
        for part in dist.all_gather_objects(out):
            merged.update(part)
        return merged

    def val_cider(self, model: CaptionModel) -> float:
        hyps = self.generate(model, "val", "greedy")
        score = 0.0
        if self.rank == 0:
            res = tokenize({k: [h] for k, h in hyps.items()}, self.cfg.eval.tokenize)
            score, _ = cider_d(self.refs_tok["val"], {k: v[0] for k, v in res.items()})
        return float(dist.broadcast_object(score))

    # ------------------------------------------------------------------ constant baseline
    def constant_baseline(self) -> Dict[str, Any]:
        """The best (test CIDEr-D) of the k most frequent training captions (rank 0)."""
        gts = self.refs_tok["test"]
        scored = [(cider_d(gts, {k: tok for k in gts})[0], cap, tok) for cap, tok in self.constant_candidates]
        score, caption, tok = max(scored)
        log.info("constant baseline: best of %d frequent training captions is \"%s\" (test CIDEr-D %.3f)",
                 len(scored), caption, score)
        return {"caption": caption, "tokenized": tok, "candidates": len(scored)}

    # ------------------------------------------------------------------ one phase
    def run_phase(self, phase: str, init_state: Optional[Dict[str, torch.Tensor]]) -> Tuple[str, float]:
        """Train one phase; returns (its best model directory, best validation CIDEr-D)."""
        import deepspeed

        cfg = self.cfg
        pc = cfg.xe if phase == "xe" else cfg.scst
        model = copy.deepcopy(self.base_model)
        if init_state is not None:
            model.load_state_dict(init_state)
        enc_from = cfg.encoder.finetune_from_epoch if phase == "xe" else (0 if cfg.encoder.finetune_in_scst else -1)
        if enc_from < 0 or enc_from >= pc.epochs:
            model.image_tower.requires_grad_(False)
        else:
            model.image_tower.backbone.requires_grad_(True)

        self.train_set.with_labels = phase == "xe"
        sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=cfg.train.seed + (0 if phase == "xe" else 1))
        loader = DataLoader(self.train_set, batch_size=pc.batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=cfg.data.num_workers)
        steps_per_epoch = len(loader)
        total = steps_per_epoch * pc.epochs
        floor = cfg.xe.min_lr_ratio
        enc_lr = cfg.encoder.lr * (1.0 if phase == "xe" else cfg.scst.lr / cfg.xe.lr)
        groups, lambdas = [], []
        dec_decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("image_tower")
                     and p.ndim >= 2]
        dec_other = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("image_tower")
                     and p.ndim < 2]
        wd = cfg.xe.weight_decay if phase == "xe" else 0.0
        for params, decay in ((dec_decay, wd), (dec_other, 0.0)):
            if params:
                groups.append({"params": params, "lr": pc.lr, "weight_decay": decay})
                lambdas.append(schedule(pc.warmup_steps, total, floor))
        enc_params = [p for p in model.image_tower.parameters() if p.requires_grad]
        if enc_params:
            groups.append({"params": enc_params, "lr": enc_lr, "weight_decay": 0.0})
            lambdas.append(schedule(pc.warmup_steps, total, floor, start=enc_from * steps_per_epoch))
        optimizer = adamw(groups, lr=pc.lr)
        reward = None
        if phase == "scst":
            reward = CiderReward(self.train_set.encoded)
        step_module = TrainStep(model, cfg, self.rules if phase == "xe" else self.scst_rules, reward)
        engine, _, _, scheduler = deepspeed.initialize(
            model=step_module, optimizer=optimizer, config=derive_deepspeed_config(cfg, pc.batch_size, self.world),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambdas))
        torch.manual_seed(cfg.train.seed + 1000 * self.rank + (0 if phase == "xe" else 1))  # own samples per rank
        best_dir = os.path.join(cfg.train.output_dir, f"{phase}_best")
        best = -1.0
        t0 = time.time()
        log.info("%s: %d epochs x %d steps (%d images per rank per step, %d ranks)%s", phase, pc.epochs,
                 steps_per_epoch, pc.batch_size, self.world,
                 f"; image tower fine-tuned from epoch {enc_from} at lr {enc_lr:g}" if enc_params else
                 "; image tower frozen")
        for epoch in range(pc.epochs):
            sampler.set_epoch(epoch)
            self.train_set.set_epoch(epoch)
            model.set_image_tower_trainable(bool(enc_params) and epoch >= enc_from)
            engine.train()
            model.train()
            ss = scheduled_sampling_prob(epoch, cfg.xe.ss_start_epoch, cfg.xe.ss_increase_every,
                                         cfg.xe.ss_increase_prob, cfg.xe.ss_max_prob) if phase == "xe" else 0.0
            sums: Dict[str, float] = {}
            for i, batch in enumerate(loader):
                idx = batch["index"].tolist()
                images = batch["image"].to(self.device, _dtype(model))  # bf16/fp16 engines hold 16-bit weights
                labels = batch["labels"].to(self.device) if phase == "xe" else None
                out = engine(images, labels, idx, self._conditions(self.units["train"], idx), phase, ss)
                engine.backward(out["loss"])
                engine.step()
                self.global_step += 1
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if self.global_step % cfg.train.log_every == 0:
                    m = {f"{phase}/{k}": float(v.detach()) for k, v in out.items()}
                    m[f"{phase}/lr"] = scheduler.get_last_lr()[0]
                    self.writer.write(self.global_step, m, progress=False)
                    log.info("%s epoch %d step %d/%d | %s", phase, epoch, i + 1, steps_per_epoch,
                             " | ".join(f"{k} {float(v.detach()):.4g}" for k, v in out.items()))
            score = self.val_cider(model)
            means = {f"{phase}/epoch_{k}": v / max(steps_per_epoch, 1) for k, v in sums.items()}
            self.writer.write(self.global_step, {**means, f"{phase}/val_cider_d": score, "epoch": epoch},
                              progress=False)
            improved = score > best
            if improved:
                best = score
                state = self._full_state(model)
                if self.rank == 0:
                    save_model_dir(best_dir, model, self.vocab, cfg, self.towers_cfg, state)
                dist.barrier()
            log.info("%s epoch %d/%d done (%.0f s): %s | val CIDEr-D %.3f%s", phase, epoch + 1, pc.epochs,
                     time.time() - t0, " | ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in means.items()), score,
                     " (best: saved)" if improved else "")
        self.results["time_s"][phase] = round(time.time() - t0, 1)
        self.results[f"{phase}_val_cider_d"] = best
        return best_dir, best

    # ------------------------------------------------------------------ test
    def test_captions(self, phase: str, state: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, str]]:
        """{decoding label: {unit key: caption}} of the test split for one phase's best weights (rank 0)."""
        model = copy.deepcopy(self.base_model)
        model.load_state_dict(state)
        model.to(self.device)
        dc = self.cfg.decode
        strategies = (["greedy"] if self.cfg.eval.test_greedy else []) + (
            [dc.strategy] if dc.strategy != "greedy" else ([] if self.cfg.eval.test_greedy else ["greedy"]))
        out: Dict[str, Dict[str, str]] = {}
        for strategy in strategies:
            hyps = self.generate(model, "test", strategy)
            label = f"beam{dc.beam_size}" if strategy == "beam" else strategy
            out[label] = hyps
            if self.rank == 0:
                with open(os.path.join(self.cfg.train.output_dir, f"test_captions_{phase}_{label}.json"), "w") as f:
                    json.dump([{"image_id": k, "caption": h} for k, h in hyps.items()], f, indent=0,
                              ensure_ascii=False)
        return out

    def score_test(self, constant: Dict[str, Any], captions: Dict[Tuple[str, str], Dict[str, str]]) -> None:
        """All rows of the final table at once (one tokenizer run, one METEOR process)."""
        gts = self.refs_tok["test"]
        done = tokenize({(row, k): [h] for row, hyps in captions.items() for k, h in hyps.items()},
                        self.cfg.eval.tokenize)
        runs = {("constant", "-"): {k: [constant["tokenized"]] for k in gts}}
        runs.update({row: {k: done[(row, k)] for k in gts} for row in captions})
        named = {f"{m}|{d}": res for (m, d), res in runs.items()}
        scores, unavailable = score_many(gts, named, self.cfg.eval.test_metrics)
        self.results["unavailable"].update(unavailable)
        for (m, d) in runs:
            metrics = scores[f"{m}|{d}"]
            self.results["test"].append({"model": m, "decoding": d, "metrics": metrics})
            log.info("test %s %s: %s", m, d, " | ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None))

    def _load_init(self, model_dir: str) -> Dict[str, torch.Tensor]:
        """Weights of an earlier model directory; its vocabulary must be this run's."""
        from .vocab import load_vocab

        other = load_vocab(model_dir)
        same = (other.kind == self.vocab.kind and
                (other.itos == self.vocab.itos if isinstance(other, WordVocab) else other.size == self.vocab.size))
        if not same:
            raise ValueError(f"scst.init_from={model_dir} was trained with another vocabulary than this run builds "
                             f"(data.vocab, data.min_word_freq and the training split must be the same)")
        log.info("SCST starts from %s", model_dir)
        return _load_state(model_dir)

    # ------------------------------------------------------------------ the run
    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        t0 = time.time()
        if self.rank == 0:
            self.results["constant"] = self.constant_baseline()
        states: Dict[str, Dict[str, torch.Tensor]] = {}
        if cfg.xe.epochs:
            best_dir, _ = self.run_phase("xe", None)
            states["xe"] = _load_state(best_dir)
        elif cfg.scst.init_from:
            states["xe"] = self._load_init(cfg.scst.init_from)
        if cfg.scst.epochs:
            best_dir, _ = self.run_phase("scst", states["xe"])
            states["scst"] = _load_state(best_dir)
        captions: Dict[Tuple[str, str], Dict[str, str]] = {}
        for phase, state in states.items():
            for label, hyps in self.test_captions(phase, state).items():
                captions[(phase.upper(), label)] = hyps
        if self.rank == 0:
            self.score_test(self.results["constant"], captions)
        self.results["time_s"]["total"] = round(time.time() - t0, 1)
        if self.rank == 0:
            with open(os.path.join(cfg.train.output_dir, "results.json"), "w") as f:
                json.dump(self.results, f, indent=1)
        self.writer.close()
        dist.barrier()
        return self.results


def _load_state(model_dir: str) -> Dict[str, torch.Tensor]:
    """Weights of a saved model directory (every rank reads the file rank 0 wrote)."""
    from safetensors.torch import load_file

    dist.barrier()
    return load_file(os.path.join(model_dir, "model.safetensors"))


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
