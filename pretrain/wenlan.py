"""The WenLan (BriVL) core: two query/key encoder pairs, two negative queues, momentum, loss.

Pairs: (image query f_I, text key g_T) and (text query f_T, image key g_I). For M local pairs::

    q_I, q_T = f_I(images), f_T(texts)                    # M x D, gradients flow
    k_I, k_T = g_I(images), g_T(texts)                    # M x D, no gradient
    L_I2T = CE([q_I.k_T, q_I.Q_T] / tau, 0)               # positive first, then the text queue
    L_T2I = CE([q_T.k_I, q_T.Q_I] / tau, 0)               # image queue
    loss = L_I2T + L_T2I
    after each optimizer step: g <- m*g + (1-m)*f          (fp32, fused over all parameters)
    after each micro-batch:    enqueue all_gather(k_I) into Q_I, all_gather(k_T) into Q_T

Extensions (config ``wenlan.*``): unfilled queue slots masked; any K (the ring wraps);
false negatives masked (queue entries sharing the positive's query id or image id);
in-batch keys of all ranks as extra negatives; learnable clamped temperature; momentum schedule;
click-count weighting of positives.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, WenLanConfig
from .dist import all_gather_with_local_grad, concat_all_gather, rank
from .models import DualEncoder


class NegativeQueue(nn.Module):
    """Ring buffer of K keys (K x D) with the query id and image id of the pair each came from.

    Identical on every rank: it is only written with keys all-gathered from every rank.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("features", torch.zeros(size, dim))                  # K x D
        self.register_buffer("query_ids", torch.full((size,), -1, dtype=torch.long))  # K
        self.register_buffer("image_ids", torch.full((size,), -1, dtype=torch.long))  # K
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, query_ids: torch.Tensor, image_ids: torch.Tensor) -> None:
        n = keys.shape[0]
        if n > self.size:  # more keys than slots: only the newest K survive
            keys, query_ids, image_ids = keys[-self.size:], query_ids[-self.size:], image_ids[-self.size:]
            n = self.size
        idx = (self.ptr + torch.arange(n, device=keys.device)) % self.size  # wraps around the ring
        self.features[idx] = keys.to(self.features.dtype)
        self.query_ids[idx] = query_ids
        self.image_ids[idx] = image_ids
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))

    def valid(self) -> torch.Tensor:
        """K bools: slots ever written (the ring is written from slot 0 on)."""
        return torch.arange(self.size, device=self.features.device) < self.filled


def contrastive_loss(q: torch.Tensor, k_pos: torch.Tensor, negatives: torch.Tensor,
                     negative_mask: torch.Tensor, temperature: torch.Tensor,
                     weights: Optional[torch.Tensor] = None):
    """InfoNCE with the positive in column 0.

    q, k_pos: M x D; negatives: N x D; negative_mask: M x N (True = excluded). Returns
    (loss, mean positive logit, mean negative logit over unmasked entries) -- logits are cosines.
    """
    l_pos = (q * k_pos.to(q.dtype)).sum(-1, keepdim=True)            # M x 1
    l_neg = q @ negatives.to(q.dtype).t()                              # M x N
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature               # M x (1+N)
    # mask after the division: -inf / tau would give NaN gradients to a learnable tau
    full_mask = torch.cat([torch.zeros_like(negative_mask[:, :1]), negative_mask], dim=1)
    logits = logits.masked_fill(full_mask, float("-inf"))
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")  # M
    loss = per_sample.mean() if weights is None else (per_sample * weights).sum() / weights.sum()
    keep = ~negative_mask
    neg_mean = (l_neg.detach() * keep).sum() / keep.sum().clamp_min(1)
    return loss, l_pos.detach().mean(), neg_mean


class WenLanModel(nn.Module):
    """What DeepSpeed trains: the query towers and the temperature.

    The loss is computed inside ``forward`` so that, under ZeRO-3, every trained parameter is
    gathered by DeepSpeed's hooks while it is used.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: WenLanConfig):
        super().__init__()
        self.cfg = cfg
        self.query = DualEncoder(model_cfg)
        # log(1/tau), learnable (or fixed) and clamped to [1/tau_max, 1/tau_min]
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / cfg.temperature)]),  # shape 1: DeepSpeed broadcasts need dim > 0
                                        requires_grad=cfg.learn_temperature)

    def temperature(self) -> torch.Tensor:
        c = self.cfg
        return 1.0 / self.logit_scale.clamp(math.log(1 / c.temperature_max), math.log(1 / c.temperature_min)).exp()[0]

    def forward(self, images, input_ids, attention_mask, k_image, k_text, query_ids, image_ids,
                image_queue: NegativeQueue, text_queue: NegativeQueue, clicks: Optional[torch.Tensor] = None,
                all_k_image: Optional[torch.Tensor] = None, all_k_text: Optional[torch.Tensor] = None,
                all_query_ids: Optional[torch.Tensor] = None, all_image_ids: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        c = self.cfg
        q_image, q_text = self.query(images, input_ids, attention_mask)          # M x D each
        tau = self.temperature()
        if c.mode == "in_batch":
            return in_batch_loss(q_image, q_text, tau)
        weights = click_weights(clicks, c.click_weighting) if clicks is not None else None

        def negatives(queue: NegativeQueue, all_keys: Optional[torch.Tensor]):
            feats, qids, iids = queue.features, queue.query_ids, queue.image_ids     # K x D, K, K
            mask = torch.zeros(q_image.shape[0], queue.size, dtype=torch.bool, device=feats.device)
            if c.mask_unfilled:
                mask |= ~queue.valid().unsqueeze(0)
            if c.in_batch_negatives and all_keys is not None:
                m = q_image.shape[0]
                own = torch.zeros(m, all_keys.shape[0], dtype=torch.bool, device=feats.device)
                own[torch.arange(m), rank() * m + torch.arange(m)] = True  # the positive itself
                feats = torch.cat([feats, all_keys])
                qids, iids = torch.cat([qids, all_query_ids]), torch.cat([iids, all_image_ids])
                mask = torch.cat([mask, own], dim=1)
            if c.mask_false_negatives:  # same query or same clicked image as the positive pair
                mask |= (qids.unsqueeze(0) == query_ids.unsqueeze(1)) | (iids.unsqueeze(0) == image_ids.unsqueeze(1))
            return feats, mask

        neg_t, mask_t = negatives(text_queue, all_k_text)
        neg_i, mask_i = negatives(image_queue, all_k_image)
        loss_i2t, pos_i2t, negm_i2t = contrastive_loss(q_image, k_text, neg_t, mask_t, tau, weights)
        loss_t2i, pos_t2i, negm_t2i = contrastive_loss(q_text, k_image, neg_i, mask_i, tau, weights)
        return {"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach(),
                "pos_logit": (pos_i2t + pos_t2i) / 2, "neg_logit": (negm_i2t + negm_t2i) / 2,
                "temperature": tau.detach()}


def in_batch_loss(q_image: torch.Tensor, q_text: torch.Tensor, tau: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The OpenCLIP loss over the global batch (its default: every rank scores all G*M x G*M pairs, with
    gradients through its own slice): the reference for throughput comparisons."""
    all_image, all_text = all_gather_with_local_grad(q_image), all_gather_with_local_grad(q_text)  # GM x D
    labels = torch.arange(all_image.shape[0], device=q_image.device)
    logits = all_image @ all_text.t() / tau                                      # GM x GM
    loss_i2t, loss_t2i = F.cross_entropy(logits.float(), labels), F.cross_entropy(logits.t().float(), labels)
    pos = (q_image * q_text).sum(-1).detach().mean()
    return {"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach(),
            "pos_logit": pos, "neg_logit": (logits.detach() * tau).mean(), "temperature": tau.detach()}


def click_weights(clicks: torch.Tensor, kind: str) -> Optional[torch.Tensor]:
    if kind == "none":
        return None
    w = torch.log1p(clicks.float()) + 1.0 if kind == "log" else torch.sqrt(1.0 + clicks.float())
    return w / w.mean()


def momentum_at(step: int, total_steps: int, cfg: WenLanConfig) -> float:
    if cfg.momentum_schedule == "constant":
        return cfg.momentum
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return cfg.momentum_end - (cfg.momentum_end - cfg.momentum) * (math.cos(math.pi * frac) + 1) / 2


@torch.no_grad()
def momentum_update(key_params: Iterable[torch.Tensor], query_params: Iterable[torch.Tensor], m: float) -> None:
    """g <- m*g + (1-m)*f in fp32, one fused foreach call over all parameters (no Python loop per tensor).

    Under ZeRO-3 the caller gathers the query parameters first (``deepspeed.zero.GatheredParameters``):
    reading ``param.data`` of a partitioned parameter gives an empty tensor (DeepSpeed issue 2056).
    """
    key_params = list(key_params)
    query_params = [p.detach().to(torch.float32) for p in query_params]
    torch._foreach_lerp_(key_params, query_params, 1.0 - m)


class KeyEncoders:
    """The momentum encoders g_I, g_T (one frozen fp32 DualEncoder) and the two queues.

    ``partitioned`` (ZeRO-3): the momentum encoders are partitioned like the query encoders
    (``deepspeed.zero.Init(module=...)``), so each rank holds 1/G of them. The momentum update then
    runs on the local partitions, ``g.ds_tensor <- m*g.ds_tensor + (1-m)*f.ds_tensor``, with no
    communication (same shapes and world size give the same partitioning); the key forward gathers them.
    """

    def __init__(self, key: DualEncoder, cfg: WenLanConfig, embed_dim: int, device: torch.device,
                 partitioned: bool = False):
        self.cfg = cfg
        self.key = key.to(device)
        self.partitioned = partitioned
        if partitioned:
            import deepspeed
            deepspeed.zero.Init(module=self.key, mem_efficient_linear=False, dtype=torch.float32,
                                config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                     "zero_optimization": {"stage": 3}})
        self.image_queue = NegativeQueue(cfg.queue_size, embed_dim).to(device)
        self.text_queue = NegativeQueue(cfg.queue_size, embed_dim).to(device)

    def _gathered(self, modifier_rank=None):
        if not self.partitioned:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(self.key.parameters()), modifier_rank=modifier_rank)

    @torch.no_grad()
    def keys(self, images, input_ids, attention_mask):
        with self._gathered():
            return self.key(images.float() if images.is_floating_point() else images, input_ids, attention_mask)

    @torch.no_grad()
    def update(self, query: nn.Module, m: float, query_partitioned: bool) -> None:
        """g <- m*g + (1-m)*f after an optimizer step (fp32, fused)."""
        key_params, query_params = list(self.key.parameters()), list(query.parameters())
        if self.partitioned:
            momentum_update([k.ds_tensor for k in key_params], [q.ds_tensor for q in query_params], m)
        elif query_partitioned:  # ZeRO-3 query encoders with full momentum copies: gather f first
            import deepspeed
            with deepspeed.zero.GatheredParameters(query_params, modifier_rank=None):
                momentum_update(key_params, query_params, m)
        else:
            momentum_update(key_params, query_params, m)

    def full_parameters(self):
        """Full copies of the momentum parameters (collective when partitioned)."""
        with self._gathered():
            return [p.detach().clone() for p in self.key.parameters()]

    @torch.no_grad()
    def enqueue(self, k_image, k_text, query_ids, image_ids, gathered=None) -> None:
        """Enqueue the keys of every rank (gathered here unless given), in rank order."""
        if gathered is None:
            gathered = gather_keys(k_image, k_text, query_ids, image_ids)
        all_k_image, all_k_text, all_q, all_i = gathered
        self.image_queue.enqueue(all_k_image, all_q, all_i)
        self.text_queue.enqueue(all_k_text, all_q, all_i)

    def state_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Full (unpartitioned) state; collective when partitioned."""
        with self._gathered():
            key_state = {k: v.detach().clone() for k, v in self.key.state_dict().items()}
        return {"key": key_state, "image_queue": self.image_queue.state_dict(),
                "text_queue": self.text_queue.state_dict()}

    def load_state_dict(self, state) -> None:
        with self._gathered(modifier_rank=0):  # every rank loads the same file; rank 0's copy is kept
            self.key.load_state_dict(state["key"])
        self.image_queue.load_state_dict(state["image_queue"])
        self.text_queue.load_state_dict(state["text_queue"])


@torch.no_grad()
def gather_keys(k_image, k_text, query_ids, image_ids):
    """All-gather keys and ids of every rank (G*M rows, rank order). No gradient."""
    return (concat_all_gather(k_image.float().contiguous()), concat_all_gather(k_text.float().contiguous()),
            concat_all_gather(query_ids), concat_all_gather(image_ids))
