"""Cross-entropy phase losses: label smoothing, the doubly stochastic attention term, scheduled sampling."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def label_smoothed_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                       smoothing: float) -> torch.Tensor:
    """Mean over unmasked positions of ``(1 - eps) * -log p(y) + eps * mean_v(-log p(v))``
    (the target distribution puts eps/V on every word and 1 - eps more on the reference word).
    logits: B x T x V, targets/mask: B x T."""
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # B x T
    uniform = -logp.mean(dim=-1)                              # B x T
    loss = (1.0 - smoothing) * nll + smoothing * uniform
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp_min(1.0)


def doubly_stochastic(alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Show-Attend-Tell's regulariser: every region should receive a total attention of about 1 over the caption.
    ``mean_{b,i} (1 - sum_t mask_bt * alpha_bti)^2``; alphas: B x T x N, mask: B x T."""
    total = (alphas * mask.unsqueeze(-1).to(alphas.dtype)).sum(1)  # B x N
    return ((1.0 - total) ** 2).mean()


def scheduled_sampling_prob(epoch: int, start: int, every: int, increase: float, maximum: float) -> float:
    """0 before ``start``; then ``increase`` more every ``every`` epochs, capped at ``maximum``."""
    if start < 0 or epoch < start:
        return 0.0
    return min(increase * ((epoch - start) // max(every, 1) + 1), maximum)
