"""The WenLan (BriVL) core: two query/key encoder pairs, two negative queues, momentum, loss, one step.

Pairs: (image query f_I, text key g_T) and (text query f_T, image key g_I). For M local pairs on G ranks::

    q_I, q_T = f_I(images), f_T(texts)                    # M x D, gradients flow
    k_I, k_T = g_I(images), g_T(texts)                    # M x D, no gradient (momentum towers)
    L_I2T = CE([q_I.k_T, q_I.Q_T] / tau, 0)               # positive first, then the text queue Q_T (K x D)
    L_T2I = CE([q_T.k_I, q_T.Q_I] / tau, 0)               # image queue Q_I
    loss = L_I2T + L_T2I
    after each micro-batch:    enqueue all_gather(k_I) into Q_I, all_gather(k_T) into Q_T
    after each optimizer step: g <- m*g + (1-m)*f          (fp32, fused over all parameters)

Every loss here is one softmax over columns = [batch block | queue block]:
  batch block (GM or M columns): the positive plus, optionally, the other pairs of the global batch --
      ``in_batch_block``: the other tower's *query* embeddings of all ranks, gradients to both towers
      (the OpenCLIP block; the positive is q_I.q_T); otherwise the momentum keys (MoCo; the positive
      is q_I.k_T), whose other columns count only with ``in_batch_negatives``;
  queue block (K columns): momentum keys of earlier steps, no gradient; masked where unfilled, where they
      share the positive's query or image id, before ``queue_start_step``; ``queue_logit_bias`` adds
      log(w) to every queue logit (a queue entry counts as w of a negative); ``queue_center`` scores
      q.(Q_j - mean Q) instead, so that the towers cannot lower every queue logit at once by drifting away
      from where they were when the keys were written (the keys' common age signal).
``distill_alpha`` (ALBEF) mixes the one-hot target with the momentum towers' own softmax over the same
columns. ``mode: in_batch`` is the OpenCLIP loss alone: no key towers, no queues.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist
from .config import ModelConfig, WenLanConfig
from .models import DualEncoder


class NegativeQueue(nn.Module):
    """Ring buffer of K keys (K x D) with the query id, image id and optimizer step of the pair each came
    from. Identical on every rank: it is only written with keys all-gathered from every rank."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("features", torch.zeros(size, dim))                      # K x D
        self.register_buffer("query_ids", torch.full((size,), -1, dtype=torch.long))  # K
        self.register_buffer("image_ids", torch.full((size,), -1, dtype=torch.long))  # K
        self.register_buffer("steps", torch.zeros(size, dtype=torch.long))             # K: step at enqueue
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, query_ids: torch.Tensor, image_ids: torch.Tensor, step: int = 0) -> None:
        n = keys.shape[0]
        if n > self.size:  # more keys than slots: only the newest K survive
            keys, query_ids, image_ids = keys[-self.size:], query_ids[-self.size:], image_ids[-self.size:]
            n = self.size
        idx = (self.ptr + torch.arange(n, device=keys.device)) % self.size  # wraps around the ring
        self.features[idx] = keys.to(self.features.dtype)
        self.query_ids[idx] = query_ids
        self.image_ids[idx] = image_ids
        self.steps[idx] = step
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))

    def valid(self) -> torch.Tensor:
        """K bools: slots ever written (the ring is written from slot 0 on)."""
        return torch.arange(self.size, device=self.features.device) < self.filled

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        state.setdefault(prefix + "steps", torch.zeros_like(self.steps))  # checkpoints from before `steps`
        super()._load_from_state_dict(state, prefix, *args, **kwargs)


class WenLanModel(nn.Module):
    """What DeepSpeed trains: the query towers and the temperature. ``forward`` returns the two M x D
    embeddings and tau (read inside forward, so that ZeRO-3 has gathered the temperature)."""

    def __init__(self, model_cfg: ModelConfig, cfg: WenLanConfig):
        super().__init__()
        self.cfg = cfg
        self.query = DualEncoder(model_cfg)
        # log(1/tau), learnable (or fixed) and clamped to [1/tau_max, 1/tau_min]; shape 1: DeepSpeed needs dim > 0
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / cfg.temperature)]),
                                        requires_grad=cfg.learn_temperature)

    def temperature(self) -> torch.Tensor:
        c = self.cfg
        return 1.0 / self.logit_scale.clamp(math.log(1 / c.temperature_max), math.log(1 / c.temperature_min)).exp()[0]

    def forward(self, images, input_ids, attention_mask, text_tokens=None, text_bank=None):
        """(q_image, q_text, tau), M x D each; with ``text_bank`` (K x C frozen pooled text features) also the
        bank projected by the current text head, K x D, and this batch's pooled features, M x C.
        ``text_tokens``: the frozen text encoder's output for this batch when the momentum towers computed it
        already (``model.text.lock``)."""
        out = self.query(images, input_ids, attention_mask, text_tokens, text_bank)
        return out[0], out[1], self.temperature(), *out[2:]


def info_nce(q: torch.Tensor, cols: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, tau: torch.Tensor,
             bias: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
             weights: Optional[torch.Tensor] = None, queue_cols: int = 0,
             positives: Optional[torch.Tensor] = None, any_positive: bool = False
             ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Cross-entropy of each row's positive among its columns, plus diagnostics.

    q: M x D; cols: N x D (the last ``queue_cols`` of them are queue entries); pos: M (column of each
    row's positive); mask: M x N, True = excluded (never the positive); bias: N, added to the logits
    after the division by tau; targets: M x N soft targets (rows sum to 1) instead of one-hot;
    weights: M per-row weights (click weighting); positives: M x N, True = a further positive of the row (not
    counted as a negative in the diagnostics); any_positive: the loss is -log of the softmax mass on the set of
    the row's positive and ``positives`` (MIL-NCE) instead of a target over them. Diagnostics are cosines, not
    logits.
    """
    m = q.shape[0]
    rows = torch.arange(m, device=q.device)
    cos = q @ cols.to(q.dtype).t()                                               # M x N
    logits = (cos / tau).float()
    if bias is not None:
        logits = logits + bias
    mask = mask.clone()
    mask[rows, pos] = False
    # mask after the division: -inf / tau would give NaN gradients to a learnable tau
    logits = logits.masked_fill(mask, float("-inf"))
    logp = F.log_softmax(logits, dim=1)
    if any_positive and positives is not None:
        pset = positives & ~mask
        pset[rows, pos] = True
        per_row = -torch.logsumexp(logp.masked_fill(~pset, float("-inf")), dim=1)
    elif targets is None:
        per_row = -logp[rows, pos]
    else:
        per_row = -(targets * logp.masked_fill(mask, 0.0)).sum(1)
    loss = per_row.mean() if weights is None else (per_row * weights).sum() / weights.sum()
    with torch.no_grad():
        neg = mask.clone() if positives is None else mask | positives
        neg[rows, pos] = True                                                    # M x N: True = not a negative
        c = cos.detach().float()
        has_neg = (~neg).any(1)
        hardest = c.masked_fill(neg, float("-inf")).max(1).values
        p = F.softmax(logits.detach().masked_fill(neg, float("-inf")), dim=1).nan_to_num(0.0)  # over negatives
        entropy = -(p * p.clamp_min(1e-30).log()).sum(1)
        k = max(queue_cols, 1)
        stats = {"pos_cos": c[rows, pos].mean(),
                 "hardest_neg_cos": hardest[has_neg].mean() if has_neg.any() else c.new_tensor(float("nan")),
                 "effective_negatives": entropy.exp()[has_neg].mean() if has_neg.any() else c.new_tensor(0.0),
                 "queue_masked_frac": mask[:, -k:].float().mean() if queue_cols else c.new_tensor(float("nan")),
                 "queue_mass": p[:, -k:].sum(1).mean() if queue_cols else c.new_tensor(0.0)}
        if positives is not None:
            stats["extra_positives"] = positives.float().sum(1).mean()
    return loss, stats


class ScoredQueue:
    """A queue's ids and fill, scored with other features: the frozen text features projected by the current
    head (``text_queue_features``), K x D, with gradient."""

    def __init__(self, queue: NegativeQueue, features: torch.Tensor):
        self.queue, self.features, self.size = queue, features, queue.size
        self.query_ids, self.image_ids = queue.query_ids, queue.image_ids

    def valid(self) -> torch.Tensor:
        return self.queue.valid()


def wenlan_loss(cfg: WenLanConfig, q_image, q_text, tau, step: int, k_image=None, k_text=None, gathered=None,
                image_queue: Optional[NegativeQueue] = None, text_queue: Optional[NegativeQueue] = None,
                query_ids=None, image_ids=None, clicks=None, distill_alpha: float = 0.0) -> Dict[str, torch.Tensor]:
    """L_I2T + L_T2I over [batch block | queue block] (see the module docstring). ``gathered``: the keys and
    ids of every rank, (GM x D, GM x D, GM, GM), from ``gather_keys``."""
    if cfg.mode == "in_batch":
        return in_batch_loss(q_image, q_text, tau)
    m, r = q_image.shape[0], dist.rank()
    all_k_image, all_k_text, all_qids, all_iids = gathered
    weights = click_weights(clicks, cfg.click_weighting) if clicks is not None else None
    if cfg.in_batch_block or cfg.in_batch_negatives:  # GM batch columns, the positive at this rank's slice
        pos = r * m + torch.arange(m, device=q_image.device)
        bqids, biids = all_qids, all_iids
        batch_mask = torch.zeros(m, all_qids.shape[0], dtype=torch.bool, device=q_image.device)
    else:                                              # MoCo: only the own key of each row counts
        pos = torch.arange(m, device=q_image.device)
        bqids, biids = query_ids, image_ids
        batch_mask = ~torch.eye(m, dtype=torch.bool, device=q_image.device)
    if cfg.in_batch_block:
        cols_t, cols_i = dist.all_gather_with_local_grad(q_text), dist.all_gather_with_local_grad(q_image)
    elif cfg.in_batch_negatives:
        cols_t, cols_i = all_k_text, all_k_image
    else:
        cols_t, cols_i = k_text, k_image
    key_cols_t = all_k_text if (cfg.in_batch_block or cfg.in_batch_negatives) else k_text
    key_cols_i = all_k_image if (cfg.in_batch_block or cfg.in_batch_negatives) else k_image

    def centred(queue: NegativeQueue, center_on):
        """The queue's features as they are scored: minus the filled entries' mean (queue_center), or with that
        mean moved onto this step's keys of all ranks (queue_recenter)."""
        feats, valid = queue.features, queue.valid()
        if not (cfg.queue_center or cfg.queue_recenter) or not bool(valid.any()):
            return feats
        shift = -feats[valid].float().mean(0)
        if not cfg.queue_center:
            shift = shift + center_on.float().mean(0)
        return feats + shift.to(feats.dtype).unsqueeze(0)

    # the caption-to-caption scores of the momentum text tower (distill_teacher: caption), both directions
    teacher_rows, teacher_queue = k_text, None
    teacher_batch = all_k_text if (cfg.in_batch_block or cfg.in_batch_negatives) else k_text
    if cfg.distill_teacher == "caption" and distill_alpha > 0:
        teacher_queue = centred(text_queue, all_k_text)

    def direction(q, k_self, batch_cols, key_batch_cols, queue: NegativeQueue, center_on, queue_on=True, pos=pos,
                  batch_mask=batch_mask, bqids=bqids, biids=biids, teacher_batch=teacher_batch):
        ids_q, ids_i = torch.cat([bqids, queue.query_ids]), torch.cat([biids, queue.image_ids])
        qmask = torch.zeros(m, queue.size, dtype=torch.bool, device=q.device)
        if cfg.mask_unfilled:
            qmask |= ~queue.valid().unsqueeze(0)
        if step < cfg.queue_start_step or not queue_on:
            qmask[:] = True
        mask = torch.cat([batch_mask, qmask], dim=1)
        # same query or same clicked image as the positive pair: masked, or (queue_positives) positives
        same = (ids_q.unsqueeze(0) == query_ids.unsqueeze(1)) | (ids_i.unsqueeze(0) == image_ids.unsqueeze(1))
        extra = None
        if cfg.queue_positives:
            extra = same & ~mask
            extra[torch.arange(m), pos] = False
            if not cfg.queue_negatives:  # the queue as a memory of positives only
                nb = batch_cols.shape[0]
                mask[:, nb:] |= ~extra[:, nb:]
        elif cfg.mask_false_negatives:
            mask |= same
        bias = None
        if cfg.queue_logit_bias:
            bias = torch.cat([torch.zeros(batch_cols.shape[0], device=q.device),
                              torch.full((queue.size,), cfg.queue_logit_bias, device=q.device)])
        queue_feats = centred(queue, center_on)  # drifting away from the old keys as a whole gains nothing
        cols = torch.cat([batch_cols.to(q.dtype), queue_feats.to(q.dtype)])
        targets = hot = None
        # MIL-NCE scores the positives as one set: no target to build (validate keeps distill_alpha at 0 with it)
        any_positive = extra is not None and cfg.queue_positives_loss == "any"
        if extra is not None and not any_positive:  # the target spread evenly over the positives (SupCon)
            hot = F.one_hot(pos, cols.shape[0]).float() + extra.float()
            hot = hot / hot.sum(1, keepdim=True)
            targets = hot
        if distill_alpha > 0:  # ALBEF: the momentum towers' softmax over the same columns, mixed with one-hot
            with torch.no_grad():
                t_tau = cfg.distill_temperature or tau.detach()
                if cfg.distill_teacher == "caption":
                    t_logits = (teacher_rows.float() @ torch.cat([teacher_batch, teacher_queue]).float().t()) / t_tau
                else:
                    t_logits = (k_self.float() @ torch.cat([key_batch_cols, queue_feats]).float().t()) / t_tau
                if bias is not None:
                    t_logits = t_logits + bias
                m_ = mask.clone()
                m_[torch.arange(m), pos] = False
                soft = F.softmax(t_logits.masked_fill(m_, float("-inf")), dim=1)
                if hot is None:
                    hot = F.one_hot(pos, cols.shape[0]).float()
                targets = distill_alpha * soft + (1 - distill_alpha) * hot
        return info_nce(q, cols, pos, mask, tau, bias, targets, weights, queue_cols=queue.size, positives=extra,
                        any_positive=any_positive)

    separate = cfg.in_batch_block and cfg.queue_loss == "separate"
    on_i2t, on_t2i = cfg.queue_directions in ("both", "i2t"), cfg.queue_directions in ("both", "t2i")
    loss_i2t, s_i2t = direction(q_image, k_image, cols_t, key_cols_t, text_queue, all_k_text,
                                queue_on=on_i2t and not separate)
    loss_t2i, s_t2i = direction(q_text, k_text, cols_i, key_cols_i, image_queue, all_k_image,
                                queue_on=on_t2i and not separate)
    out = {"temperature": tau.detach().float()}
    for name in s_i2t:
        out[name] = (s_i2t[name] + s_t2i[name]) / 2
    if separate:  # MoCo's term of its own: each query against its own momentum key, then the queue
        own = dict(pos=torch.arange(m, device=q_image.device),
                   batch_mask=~torch.eye(m, dtype=torch.bool, device=q_image.device),
                   bqids=query_ids, biids=image_ids, teacher_batch=k_text)
        lq_i2t, sq_i2t = direction(q_image, k_image, k_text, k_text, text_queue, all_k_text, queue_on=on_i2t, **own)
        lq_t2i, sq_t2i = direction(q_text, k_text, k_image, k_image, image_queue, all_k_image, queue_on=on_t2i, **own)
        lq_i2t, lq_t2i = lq_i2t * on_i2t, lq_t2i * on_t2i  # a direction without its queue has no MoCo term
        w = cfg.queue_loss_weight
        out["loss_queue"] = (lq_i2t + lq_t2i).detach()
        for name in ("queue_masked_frac", "queue_mass"):
            out[name] = (sq_i2t[name] + sq_t2i[name]) / 2
        if "extra_positives" in sq_i2t:  # per row, over both terms
            out["extra_positives"] = out["extra_positives"] + (sq_i2t["extra_positives"] + sq_t2i["extra_positives"]) / 2
        loss_i2t, loss_t2i = loss_i2t + w * lq_i2t, loss_t2i + w * lq_t2i
    out.update({"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach()})
    if cfg.image_ssl_weight > 0:  # image query against its other view's momentum key, then the image queue
        qmask = ~image_queue.valid().unsqueeze(0) | (image_queue.image_ids.unsqueeze(0) == image_ids.unsqueeze(1))
        mask = torch.cat([~torch.eye(m, dtype=torch.bool, device=q_image.device), qmask], dim=1)
        l_ssl, s_ssl = info_nce(q_image, torch.cat([k_image, image_queue.features]), torch.arange(m, device=q_image.device),
                                mask, torch.tensor(cfg.image_ssl_temperature, device=q_image.device),
                                queue_cols=image_queue.size)
        out["loss_image_ssl"], out["image_ssl_pos_cos"] = l_ssl.detach(), s_ssl["pos_cos"]
        out["loss"] = out["loss"] + cfg.image_ssl_weight * l_ssl
    with torch.no_grad():  # key lag: cosine between a sample's query and momentum-key embeddings
        out["key_lag_cos_image"] = (q_image.detach().float() * k_image.float()).sum(-1).mean()
        out["key_lag_cos_text"] = (q_text.detach().float() * k_text.float()).sum(-1).mean()
    return out


@torch.no_grad()
def random_resized_views(images: torch.Tensor, scale_min: float, hflip: float = 0.5) -> torch.Tensor:
    """A random-resized crop of each image of the batch (area in [scale_min, 1], aspect ratio in [3/4, 4/3]),
    flipped with probability ``hflip``, resampled to the same size (bilinear, one ``grid_sample``)."""
    b, dev = images.shape[0], images.device
    area = torch.empty(b, device=dev).uniform_(scale_min, 1.0)
    ratio = torch.exp(torch.empty(b, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3)))
    sx, sy = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)  # half-extents in [-1, 1]
    tx, ty = (torch.rand(b, device=dev) * 2 - 1) * (1 - sx), (torch.rand(b, device=dev) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(b, device=dev) < hflip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(images.dtype)


def in_batch_loss(q_image: torch.Tensor, q_text: torch.Tensor, tau: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The OpenCLIP loss over the global batch (its default: every rank scores all G*M x G*M pairs, with
    gradients through its own slice): the reference for throughput and learning comparisons."""
    all_image, all_text = dist.all_gather_with_local_grad(q_image), dist.all_gather_with_local_grad(q_text)
    labels = torch.arange(all_image.shape[0], device=q_image.device)
    logits = all_image @ all_text.t() / tau                                      # GM x GM
    loss_i2t, loss_t2i = F.cross_entropy(logits.float(), labels), F.cross_entropy(logits.t().float(), labels)
    with torch.no_grad():
        cos = (logits.detach() * tau).float()
        neg = torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device)
        hardest = cos.masked_fill(neg, float("-inf")).max(1).values
        p = F.softmax((cos / tau).masked_fill(neg, float("-inf")), dim=1).nan_to_num(0.0)
        eff = (-(p * p.clamp_min(1e-30).log()).sum(1)).exp()
    return {"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach(),
            "temperature": tau.detach().float(), "pos_cos": cos.diagonal().mean(),
            "hardest_neg_cos": hardest.mean() if cos.shape[0] > 1 else cos.new_tensor(float("nan")),
            "effective_negatives": eff.mean() if cos.shape[0] > 1 else cos.new_tensor(0.0)}


def click_weights(clicks: torch.Tensor, kind: str) -> Optional[torch.Tensor]:
    if kind == "none":
        return None
    w = torch.log1p(clicks.float()) + 1.0 if kind == "log" else torch.sqrt(1.0 + clicks.float())
    return w / w.mean()


def key_towers_are_query(cfg: WenLanConfig) -> bool:
    """Momentum 0 throughout: g would equal f after every step, so no momentum towers are built and the queues
    take the detached query embeddings (a cross-batch memory, with no extra forward)."""
    return cfg.momentum == 0.0 and (cfg.momentum_schedule == "constant" or cfg.momentum_end == 0.0)


def momentum_at(step: int, total_steps: int, cfg: WenLanConfig) -> float:
    if cfg.momentum_schedule == "constant":
        return cfg.momentum
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return cfg.momentum_end - (cfg.momentum_end - cfg.momentum) * (math.cos(math.pi * frac) + 1) / 2


def distill_alpha_at(step: int, cfg: WenLanConfig) -> float:
    """ALBEF's ramp: alpha grows linearly to ``distill_alpha`` over ``distill_ramp_steps``."""
    if cfg.distill_alpha <= 0:
        return 0.0
    return cfg.distill_alpha * min(1.0, (step + 1) / max(cfg.distill_ramp_steps, 1))


@torch.no_grad()
def momentum_update(key_params: Iterable[torch.Tensor], query_params: Iterable[torch.Tensor], m: float) -> None:
    """g <- m*g + (1-m)*f in fp32, one fused foreach call over all parameters (no Python loop per tensor).

    Under ZeRO-3 the caller gathers the query parameters first (``deepspeed.zero.GatheredParameters``):
    reading ``param.data`` of a partitioned parameter gives an empty tensor (DeepSpeed issue 2056).
    """
    key_params = list(key_params)
    query_params = [p.detach().to(torch.float32) for p in query_params]
    torch._foreach_lerp_(key_params, query_params, 1.0 - m)


@torch.no_grad()
def gather_keys(k_image, k_text, query_ids, image_ids):
    """All-gather keys and ids of every rank (G*M rows, rank order). No gradient."""
    return (dist.concat_all_gather(k_image.float().contiguous()), dist.concat_all_gather(k_text.float().contiguous()),
            dist.concat_all_gather(query_ids), dist.concat_all_gather(image_ids))


def key_forward_settings(precision: str, channels_last: Optional[bool], device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """The dtype (None: fp32) and memory format of the momentum towers' forward, which needs no gradient.

    ``auto`` looks at the hardware: bf16 + channels-last on CUDA with bf16 and on CPUs with AMX (a
    resnet18 forward was measured 3.1x faster there), fp32 elsewhere (bf16 was measured 20x *slower*
    than fp32 on an AMD EPYC without it)."""
    fast_bf16 = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (device.type == "cpu" and cpu_has_amx())
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
             "auto": torch.bfloat16 if fast_bf16 else None}[precision]
    cl = fast_bf16 if channels_last is None else bool(channels_last)
    return dtype, cl


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


class KeyEncoders:
    """The momentum encoders g_I, g_T (one frozen fp32 DualEncoder) and the two queues. ``key`` None (momentum
    0: the key towers would equal the query towers): queues only, filled with the detached query embeddings.

    ``partitioned`` (ZeRO-3): the momentum encoders are partitioned like the query encoders
    (``deepspeed.zero.Init(module=...)``), so each rank holds 1/G of them. The momentum update then
    runs on the local partitions, ``g.ds_tensor <- m*g.ds_tensor + (1-m)*f.ds_tensor``, with no
    communication (same shapes and world size give the same partitioning); the key forward gathers them.
    """

    def __init__(self, key: Optional[DualEncoder], cfg: WenLanConfig, embed_dim: int, device: torch.device,
                 partitioned: bool = False, text_feature_dim: int = 0):
        self.cfg = cfg
        self.key = key.to(device) if key is not None else None
        self.partitioned = partitioned and key is not None
        self.dtype, self.channels_last = key_forward_settings(cfg.key_precision, cfg.key_channels_last, device)
        if self.channels_last and key is not None and not partitioned:
            self.key.image.to(memory_format=torch.channels_last)
        self.device_type = device.type
        if self.partitioned:
            import deepspeed
            deepspeed.zero.Init(module=self.key, mem_efficient_linear=False, dtype=torch.float32,
                                config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                     "zero_optimization": {"stage": 3}})
        self.image_queue = NegativeQueue(cfg.queue_size, embed_dim).to(device)
        self.text_queue = NegativeQueue(cfg.queue_size, embed_dim).to(device)
        # a frozen text encoder (model.text.lock) is its own momentum copy: run it once per step, reuse its output
        self.text_locked = key is not None and bool(getattr(key.text, "locked", False))
        self.text_feature_queue = (NegativeQueue(cfg.queue_size, text_feature_dim).to(device)
                                   if cfg.text_queue_features and text_feature_dim else None)

    def _gathered(self, modifier_rank=None):
        if not self.partitioned:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(self.key.parameters()), modifier_rank=modifier_rank)

    @torch.no_grad()
    def keys(self, images, input_ids, attention_mask) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.keys_and_text_tokens(images, input_ids, attention_mask)[:2]

    @torch.no_grad()
    def keys_and_text_tokens(self, images, input_ids, attention_mask):
        """(k_image, k_text, text_tokens): ``text_tokens`` is None, or with a locked text encoder its token
        features for this batch, which the query forward reuses."""
        images = images.float() if images.is_floating_point() else images
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        cast = (torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None
                else contextlib.nullcontext())
        tokens = None
        with self._gathered(), cast:
            if self.text_locked:
                tokens = self.key.text.frozen_tokens(input_ids, attention_mask)
            k_image, k_text = self.key(images, input_ids, attention_mask, text_tokens=tokens)
        return F.normalize(k_image.float(), dim=-1), F.normalize(k_text.float(), dim=-1), tokens

    @torch.no_grad()
    def update(self, query: nn.Module, m: float, query_partitioned: bool) -> None:
        """g <- m*g + (1-m)*f after an optimizer step (fp32, fused)."""
        pairs = [(k, q) for k, q in zip(self.key.parameters(), query.parameters()) if q.requires_grad]
        key_params, query_params = [k for k, _ in pairs], [q for _, q in pairs]  # frozen ones never move
        if self.partitioned:
            momentum_update([k.ds_tensor for k in key_params], [q.ds_tensor for q in query_params], m)
        elif query_partitioned:  # ZeRO-3 query encoders with full momentum copies: gather f first
            import deepspeed
            with deepspeed.zero.GatheredParameters(query_params, modifier_rank=None):
                momentum_update(key_params, query_params, m)
        else:
            momentum_update(key_params, query_params, m)

    def full_parameters(self) -> List[torch.Tensor]:
        """Full copies of the momentum parameters (collective when partitioned)."""
        with self._gathered():
            return [p.detach().clone() for p in self.key.parameters()]

    @torch.no_grad()
    def enqueue(self, gathered, step: int, all_text_features: Optional[torch.Tensor] = None) -> None:
        """Enqueue the keys of every rank (from ``gather_keys``), in rank order; with ``text_queue_features`` also
        the gathered pooled frozen text features."""
        all_k_image, all_k_text, all_q, all_i = gathered
        self.image_queue.enqueue(all_k_image, all_q, all_i, step)
        self.text_queue.enqueue(all_k_text, all_q, all_i, step)
        if self.text_feature_queue is not None and all_text_features is not None:
            self.text_feature_queue.enqueue(all_text_features, all_q, all_i, step)

    def state_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Full (unpartitioned) state; collective when partitioned."""
        out = {"image_queue": self.image_queue.state_dict(), "text_queue": self.text_queue.state_dict()}
        if self.text_feature_queue is not None:
            out["text_feature_queue"] = self.text_feature_queue.state_dict()
        if self.key is not None:
            with self._gathered():
                out["key"] = {k: v.detach().clone() for k, v in self.key.state_dict().items()}
        return out

    def load_state_dict(self, state) -> None:
        if self.key is not None:
            if "key" not in state:
                raise ValueError("the checkpoint has no momentum towers (it was written with wenlan.momentum=0); "
                                 "resume it with wenlan.momentum=0")
            with self._gathered(modifier_rank=0):  # every rank loads the same file; rank 0's copy is kept
                self.key.load_state_dict(state["key"])
        self.image_queue.load_state_dict(state["image_queue"])
        self.text_queue.load_state_dict(state["text_queue"])
        if self.text_feature_queue is not None and "text_feature_queue" in state:  # else it refills from empty
            self.text_feature_queue.load_state_dict(state["text_feature_queue"])


class WenLanStep:
    """One optimizer step of WenLan, in order, for A = ``grad_accum_steps`` micro-batches::

        for each micro-batch:  keys (momentum towers, no grad) -> all-gather keys and ids of every rank
                               -> query forward, loss against the current queues -> backward
                               -> enqueue the gathered keys (so the next micro-batch scores them)
        at the boundary:       optimizer step (DeepSpeed) -> momentum update g <- m*g + (1-m)*f

    Owns the key towers and queues (none in ``in_batch`` mode). A micro-batch whose loss is not finite
    on any rank is skipped on every rank: no backward, no enqueue, unseen by DeepSpeed's accumulation.
    """

    def __init__(self, engine, cfg: WenLanConfig, key: Optional[DualEncoder], embed_dim: int,
                 device: torch.device, autocast, total_steps: int, zero_stage: int):
        self.engine, self.cfg, self.device, self.autocast = engine, cfg, device, autocast
        self.total_steps, self.zero_stage = total_steps, zero_stage
        text = engine.module.query.text
        feature_dim = text.num_features if getattr(text, "locked", False) else 0
        self.keys = (KeyEncoders(key if not key_towers_are_query(cfg) else None, cfg, embed_dim, device,
                                 partitioned=zero_stage == 3, text_feature_dim=feature_dim)
                     if cfg.mode == "momentum" else None)

    def _clock(self) -> float:
        if self.device.type == "cuda":  # kernels are asynchronous: without this, forward time lands in backward
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def micro_step(self, batch: Dict[str, Any], step: int, timings: Dict[str, float],
                   poison: bool = False) -> Optional[Dict[str, torch.Tensor]]:
        """Keys, gather, loss, backward (unless non-finite on any rank), enqueue. Returns the loss outputs or None."""
        images, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        qid, iid = batch["query_id"], batch["image_id"]
        momentum_towers = self.keys is not None and self.keys.key is not None
        t0 = self._clock()
        k_image = k_text = gathered = text_tokens = all_text_feats = None
        if momentum_towers:
            key_images = (random_resized_views(images, self.cfg.image_ssl_crop_min) if self.cfg.image_ssl_weight > 0
                          else images)
            k_image, k_text, text_tokens = self.keys.keys_and_text_tokens(key_images, ids, mask)  # no grad
        t1 = self._clock()
        feature_queue = self.keys.text_feature_queue if self.keys is not None else None
        if momentum_towers:
            gathered = gather_keys(k_image, k_text, qid, iid)                      # G*M rows, rank order
        t2 = self._clock()
        extra = {}
        if text_tokens is not None:  # the frozen text encoder ran once, in the key forward
            extra["text_tokens"] = text_tokens
        if feature_queue is not None:
            extra["text_bank"] = feature_queue.features
        with self.autocast:
            q_image, q_text, tau, *bank = self.engine(images, ids, mask, **extra)
        text_queue = self.keys and self.keys.text_queue
        if bank:  # the text queue's features as the current head sees them; this batch's pooled features
            text_queue = ScoredQueue(feature_queue, bank[0].float())
            all_text_feats = dist.concat_all_gather(bank[1].contiguous())
        if self.keys is not None and not momentum_towers:  # m = 0: the keys are the query embeddings
            k_image, k_text = q_image.detach().float(), q_text.detach().float()
            gathered = gather_keys(k_image, k_text, qid, iid)
        out = wenlan_loss(self.cfg, q_image, q_text, tau, step, k_image, k_text, gathered,
                          self.keys and self.keys.image_queue, text_queue, qid, iid,
                          batch.get("clicks"), distill_alpha_at(step, self.cfg))
        loss = out["loss"] * float("nan") if poison else out["loss"]
        t3 = self._clock()
        if dist.any_rank(not bool(torch.isfinite(loss.detach()).all()), self.device):
            return None
        self.engine.backward(loss)
        t4 = self._clock()
        if self.keys is not None:
            self.keys.enqueue(gathered, step, all_text_feats)
        t5 = self._clock()
        phases = [("query_forward", t3 - t2), ("backward", t4 - t3)]
        if self.keys is not None:  # the in-batch mode has no key towers and no queue: nothing to time there
            phases += [("key_forward", t1 - t0), ("gather_enqueue", t2 - t1 + t5 - t4)]
        for k, v in phases:
            timings[k] = timings.get(k, 0.0) + v
        return out

    def boundary(self, step: int, timings: Dict[str, float]) -> bool:
        """At the accumulation boundary: optimizer step, then momentum. False if the step was skipped."""
        t0 = self._clock()
        if self.zero_stage == 0 and not self._grads_finite():
            # stage 0 applies the optimizer without an overflow check: drop these gradients ourselves
            self.engine.optimizer.zero_grad(set_to_none=True)
            return False
        before = self.engine.skipped_steps
        self.engine.step()
        t1 = self._clock()
        timings["optimizer"] = timings.get("optimizer", 0.0) + t1 - t0
        if self.engine.skipped_steps != before:  # DeepSpeed found inf/nan gradients (or fp16 overflow)
            return False
        if self.keys is not None and self.keys.key is not None:
            self.keys.update(self.engine.module.query, momentum_at(step, self.total_steps, self.cfg),
                             query_partitioned=self.zero_stage == 3)
            timings["momentum"] = timings.get("momentum", 0.0) + self._clock() - t1
        return True

    def _grads_finite(self) -> bool:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())

    def queue_stats(self, step: int) -> Dict[str, float]:
        """Fill and age (optimizer steps since enqueue) of the filled queue slots."""
        if self.keys is None:
            return {}
        q = self.keys.image_queue
        valid = q.valid()
        age = (step - q.steps[valid]).float()
        return {"queue_fill": float(q.filled) / q.size,
                "queue_age_mean": float(age.mean()) if age.numel() else 0.0,
                "queue_age_max": float(age.max()) if age.numel() else 0.0}

    def state_dict(self) -> Dict[str, Any]:
        return self.keys.state_dict() if self.keys is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.keys is not None:
            self.keys.load_state_dict(state)
