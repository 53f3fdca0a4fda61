"""Correction of the train-rollout mismatch: the engines sample with pi_rollout, the update
assumes pi_old (the actor's recomputed log-probs). Kernels, precision and batching make the two
differ; these functions weigh or drop tokens by w = pi_old / pi_rollout before the update.

* TIS (truncated importance sampling, Yao et al. 2025): the per-token loss is multiplied by the
  detached weight min(w, C).
* MIS (masked importance sampling): tokens whose w leaves [low, high] leave the loss (and its
  normaliser), like rows dropped by the overlong filter.

``level="token"`` uses each token's w; ``"sequence"`` the product over the sequence's valid tokens
(one decision for the whole response). Pure torch on the driver's whole batch, so the metrics
(share truncated / masked) are exact without any reduction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
CORRECTION_LEVELS = ("token", "sequence")
#: Log-weights are clamped to this magnitude (a sequence product can overflow otherwise); far
#: outside any sensible cap or band, so no decision changes.
LOG_WEIGHT_CLAMP = 40.0


@dataclass
class Correction:
    """What the update applies: ``weight`` [B, T] (TIS, None otherwise), the new ``mask`` [B, T]
    (MIS drops tokens) and the metrics."""

    weight: torch.Tensor | None
    mask: torch.Tensor
    metrics: dict[str, float]


def log_weights(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, mask: torch.Tensor,
                level: str) -> torch.Tensor:
    """log(pi_old / pi_rollout) per token ([B, T], float64, 0 on padding); at ``sequence`` level
    every token of a row carries the row's sum."""
    m = mask.bool()
    d = torch.where(m, old_log_prob.double() - rollout_log_prob.double(), torch.zeros((), dtype=torch.float64))
    if level == "sequence":
        d = torch.where(m, d.sum(dim=-1, keepdim=True).expand_as(d), torch.zeros((), dtype=torch.float64))
    elif level != "token":
        raise ValueError(f"unknown rollout_correction_level '{level}'; expected one of {', '.join(CORRECTION_LEVELS)}")
    return d.clamp(-LOG_WEIGHT_CLAMP, LOG_WEIGHT_CLAMP)


def rollout_correction(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor | None,
                       mask: torch.Tensor, hp: Any) -> Correction:
    """TIS / MIS of ``hp.rollout_correction`` (AlgorithmConfig fields ``rollout_correction*``,
    ``rollout_is_cap``, ``rollout_mis_low/high``) for a batch ([B, T] each)."""
    m = mask.bool()
    mode = hp.rollout_correction
    if mode == "none":
        return Correction(weight=None, mask=m, metrics={})
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout_correction '{mode}'; expected one of {', '.join(ROLLOUT_CORRECTIONS)}")
    if rollout_log_prob is None:
        raise ValueError(f"algorithm.rollout_correction={mode} needs the rollout log-probs of the engines")
    lw = log_weights(old_log_prob, rollout_log_prob, m, hp.rollout_correction_level)
    w = torch.exp(lw)
    n = max(int(m.sum()), 1)
    metrics = {"rollout_corr/weight_mean": float(w[m].sum()) / n if bool(m.any()) else 0.0}
    if mode == "tis":
        capped = m & (w > hp.rollout_is_cap)
        metrics["rollout_corr/truncated_frac"] = float(capped.sum()) / n
        weight = torch.where(m, w.clamp(max=hp.rollout_is_cap), torch.ones((), dtype=torch.float64)).float()
        return Correction(weight=weight, mask=m, metrics=metrics)
    keep = (w >= hp.rollout_mis_low) & (w <= hp.rollout_mis_high)
    metrics["rollout_corr/masked_frac"] = float((m & ~keep).sum()) / n
    return Correction(weight=None, mask=m & keep, metrics=metrics)
