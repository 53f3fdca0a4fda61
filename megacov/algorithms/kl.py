"""KL-to-reference estimators (k1, k2, k3) used as a loss term or as a reward penalty.

With delta = logp - ref_logp on tokens sampled from the current policy (Schulman's notes):
k1 = delta (unbiased, high variance, can be negative), k2 = delta**2 / 2 (biased, low variance),
k3 = exp(-delta) - 1 + delta (unbiased, non-negative, low variance). As a loss term the estimate
carries gradient through logp; as a reward penalty it is detached and summed over the response.
"""
from __future__ import annotations

from typing import Any

import torch

from megacov.algorithms.losses import LossNormalizer, aggregate
from megacov.algorithms.selection import LOG_RATIO_CLAMP

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, mask: torch.Tensor,
                estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate [B, T]; 0 on padding. Gradient flows through log_prob."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator '{estimator}'; expected one of {', '.join(KL_ESTIMATORS)}")
    m = mask.bool()
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    delta = log_prob.to(dtype) - ref_log_prob.detach().to(dtype)
    delta = torch.where(m, delta, torch.zeros((), dtype=dtype, device=delta.device))
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta * delta
    delta = torch.clamp(delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(-delta) - 1.0 + delta


def kl_loss(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, mask: torch.Tensor, *, estimator: str,
            loss_agg_mode: str, norm: LossNormalizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Aggregated KL estimate (multiply by algorithm.kl_coef and add to the loss)."""
    kl = kl_estimate(log_prob, ref_log_prob, mask, estimator)
    loss = aggregate(kl, mask, loss_agg_mode, norm)
    return loss, {"kl_loss": loss.detach()}


def kl_reward_penalty(rewards: torch.Tensor, log_prob: torch.Tensor, ref_log_prob: torch.Tensor,
                      mask: torch.Tensor, *, coef: float, estimator: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """rewards [B] - coef * sum_t KL_t: the KL penalty folded into the outcome reward.

    The advantage estimators take one scalar per response, so the per-token penalty is summed
    over the response (gamma = 1), which is what a token-level return would propagate anyway.
    """
    kl = kl_estimate(log_prob.detach(), ref_log_prob, mask, estimator)
    seq_kl = kl.sum(dim=-1)
    n_tok = mask.bool().sum().clamp(min=1)
    metrics = {"kl_reward_mean": (kl.sum() / n_tok).detach(), "kl_reward_seq_mean": seq_kl.mean().detach()}
    return rewards - coef * seq_kl.to(rewards.dtype), metrics
