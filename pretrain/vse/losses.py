"""Ranking losses of visual-semantic embeddings.

``hinge_loss`` is the VSE++ triplet loss (Faghri et al., 2018) on a batch of N matching pairs
(image i, caption i) with scores S = images @ captions.T (cosine when both are L2-normalised)::

    cost_c[i, j] = [alpha - S[i, i] + S[i, j]]_+     caption j as a negative of image i   (i2t)
    cost_i[i, j] = [alpha - S[j, j] + S[i, j]]_+     image i as a negative of caption j   (t2i)
    SH (sum):      loss = sum_{i != j} cost_c[i, j] + cost_i[i, j]
    MH (max):      loss = sum_i max_{j != i} cost_c[i, j] + sum_j max_{i != j} cost_i[i, j]

summed (not averaged) over the batch, as VSE++ does: its learning rate 2e-4 is tuned for a sum.
Pairs whose image ids are equal (two captions of the same image in one batch), or whose text ids
are equal (a click log's repeated query), are not negatives when the ids are given.
``info_nce_loss`` is the symmetric cross-entropy alternative.

Both accept a global batch: ``images`` / ``captions`` may be all-gathered from every rank
(``pretrain.dist.all_gather_with_local_grad``: gradients flow only into the local rows); each rank then
computes the loss of the whole global batch, and DeepSpeed's gradient averaging over the G ranks gives
the global batch's gradient / G (the trainer multiplies the loss by G to undo that).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _negatives_mask(n: int, image_ids: Optional[torch.Tensor], text_ids: Optional[torch.Tensor],
                    device: torch.device) -> torch.Tensor:
    """N x N bool: True where (image i, caption j) is a negative: off the diagonal, and neither the same image
    id nor the same text id as the positive pair (click logs repeat queries and images)."""
    negative = ~torch.eye(n, dtype=torch.bool, device=device)
    for ids in (image_ids, text_ids):
        if ids is not None:
            ids = ids.to(device).reshape(-1)
            negative &= ids[:, None] != ids[None, :]
    return negative


def hinge_loss(images: torch.Tensor, captions: torch.Tensor, margin: float = 0.2, max_violation: bool = True,
               image_ids: Optional[torch.Tensor] = None, text_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """VSE++ hinge triplet loss of N matching pairs (row i of both is a positive pair); a scalar, summed."""
    scores = images @ captions.t()                                   # N x N: S[i, j] = image i . caption j
    diag = scores.diag()                                             # N
    negative = _negatives_mask(scores.shape[0], image_ids, text_ids, scores.device)
    cost_c = (margin + scores - diag[:, None]).clamp(min=0)          # row i: captions vs image i
    cost_i = (margin + scores - diag[None, :]).clamp(min=0)          # column j: images vs caption j
    cost_c = cost_c.masked_fill(~negative, 0.0)
    cost_i = cost_i.masked_fill(~negative, 0.0)
    if max_violation:  # the hardest negative only (costs are >= 0, so a masked 0 never wins wrongly)
        return cost_c.max(dim=1).values.sum() + cost_i.max(dim=0).values.sum()
    return cost_c.sum() + cost_i.sum()


def info_nce_loss(images: torch.Tensor, captions: torch.Tensor, temperature: float = 0.05,
                  image_ids: Optional[torch.Tensor] = None, text_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE: mean of CE over captions for every image and CE over images for every caption."""
    logits = images @ captions.t() / temperature                     # N x N
    negative = _negatives_mask(logits.shape[0], image_ids, text_ids, logits.device)
    keep = negative | torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(~keep, float("-inf"))                # same-image pairs: neither positive nor negative
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@torch.no_grad()
def similarity_stats(images: torch.Tensor, captions: torch.Tensor, image_ids: Optional[torch.Tensor] = None,
                     text_ids: Optional[torch.Tensor] = None) -> Tuple[float, float]:
    """(mean positive score, mean hardest-negative score of the images) of a batch: a collapse detector
    (hinge with hardest negatives can collapse every embedding onto one point: both near 1, loss = 2 N alpha)."""
    scores = images @ captions.t()
    negative = _negatives_mask(scores.shape[0], image_ids, text_ids, scores.device)
    hardest = scores.masked_fill(~negative, float("-inf")).max(dim=1).values
    hardest = hardest[torch.isfinite(hardest)]
    return float(scores.diag().mean()), float(hardest.mean()) if hardest.numel() else float("nan")
