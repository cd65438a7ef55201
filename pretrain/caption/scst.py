"""Self-critical sequence training (Rennie et al. 2017) with a CIDEr-D reward.

For each image, ``n`` captions are sampled; each gets the reward r = CIDEr-D against the image's training
references (document frequencies from all training references). The baseline b is either

- ``greedy``: the reward of the image's greedy caption (test-time inference, no dropout), or
- ``mean``: the mean reward of the *other* n-1 samples of the same image (leave-one-out),

and the loss is the REINFORCE estimate ``-(r - b) * log p(sample)``, summed over the sampled words (and the
EOS) and divided by the number of those words in the batch.

Rewards are computed on token-id strings: any vocabulary (Chinese sub-words included) works, and no Java.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .cider import CiderD
from .decoding import DecodeRules, greedy, sample, sequences_to_lists


def advantages(rewards: torch.Tensor, baseline: str, greedy_rewards: Optional[torch.Tensor] = None) -> torch.Tensor:
    """rewards: B x n (sample j of image i) -> r - b, B x n."""
    if baseline == "greedy":
        if greedy_rewards is None:
            raise ValueError("the greedy baseline needs the rewards of the greedy captions")
        return rewards - greedy_rewards.unsqueeze(1)
    if baseline == "mean":
        n = rewards.shape[1]
        if n < 2:
            raise ValueError("the mean baseline needs at least 2 samples per image")
        return rewards - (rewards.sum(1, keepdim=True) - rewards) / (n - 1)
    raise ValueError(f"unknown SCST baseline '{baseline}': greedy or mean")


def policy_loss(logprobs: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """logprobs, mask: M x T (log p of each sampled word; 1 for words and EOS); adv: M."""
    return -(adv.unsqueeze(1).to(logprobs.dtype) * logprobs * mask).sum() / mask.sum().clamp_min(1.0)


class CiderReward:
    """CIDEr-D of token-id captions against the references of training unit ``i`` (ids, untruncated)."""

    def __init__(self, train_refs: Sequence[Sequence[Sequence[int]]]):
        self.refs = [[" ".join(map(str, r)) for r in refs] for refs in train_refs]
        self.scorer = CiderD(self.refs)

    def __call__(self, unit_indices: Sequence[int], captions: List[List[int]], per_unit: int = 1) -> np.ndarray:
        refs = [self.refs[int(unit_indices[j // per_unit])] for j in range(len(captions))]
        return self.scorer.scores([" ".join(map(str, c)) for c in captions], refs)


def scst_step(model, images: torch.Tensor, unit_indices: Sequence[int], reward: CiderReward, rules: DecodeRules,
              num_samples: int, baseline: str, temperature: float = 1.0, conditions: Optional[List[str]] = None,
              generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """One SCST loss for a batch of images (``model``: a CaptionModel in train mode)."""
    feats, cond, cond_mask = model.encoder_outputs(images, conditions)
    memory = model.decoder.prepare(feats, cond, cond_mask)
    seqs, logps, mask, _ = sample(model.decoder, memory, rules, num_samples, temperature, generator=generator)
    words = sequences_to_lists(seqs, rules.eos, rules.pad)
    r = torch.as_tensor(reward(unit_indices, words, num_samples), dtype=torch.float32,
                        device=logps.device).view(-1, num_samples)
    g = None
    if baseline == "greedy":
        was_training = model.training
        model.eval()
        with torch.no_grad():  # test-time inference: no dropout anywhere
            gseq, _, _ = greedy(model.decoder, model.decoder.prepare(feats.detach(), cond, cond_mask), rules)
        model.train(was_training)
        g = torch.as_tensor(reward(unit_indices, sequences_to_lists(gseq, rules.eos, rules.pad)),
                            dtype=torch.float32, device=logps.device)
    adv = advantages(r, baseline, g).view(-1)
    out = {"loss": policy_loss(logps, mask, adv), "reward": r.mean().detach(),
           "sample_length": mask.sum(1).mean().detach()}
    if g is not None:
        out["greedy_reward"] = g.mean()
    return out
