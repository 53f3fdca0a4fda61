"""The actor objective of one micro-batch: policy loss + entropy bonus + KL to the reference.

A thin composition so the trainer and the parallel layer call one function; every term uses the
same normaliser and aggregation mode, so the total still sums exactly over micro-batches and ranks.
"""
from __future__ import annotations

from typing import Any

import torch

from megacov.algorithms.entropy import Controls, par_weights
from megacov.algorithms.kl import kl_loss
from megacov.algorithms.losses import LossNormalizer, aggregate, get_policy_loss
from megacov.algorithms.selection import ScopeStats


def actor_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
               response_mask: torch.Tensor, *, hp: Any, norm: LossNormalizer,
               selected: torch.Tensor | None = None, controls: Controls | None = None,
               entropy: torch.Tensor | None = None, ref_log_prob: torch.Tensor | None = None,
               global_ids: torch.Tensor | None = None, stats: ScopeStats | None = None,
               step: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """Total loss of ``hp.policy_loss`` plus the enabled terms; all tensors [B, T].

    ``controls`` (from the entropy controller) give the entropy coefficient and the PAR weight of
    positive-advantage tokens; None means ``hp.entropy_coef`` and weight 1. ``entropy`` must carry
    gradient when the coefficient is non-zero; ``ref_log_prob`` is needed when ``hp.kl_coef > 0``
    and the KL is not folded into the reward.
    """
    if controls is None:
        controls = Controls(entropy_coef=float(hp.entropy_coef), positive_weight=1.0)
    weights = par_weights(advantages, response_mask, controls.positive_weight)
    fn = get_policy_loss(hp.policy_loss)
    loss, metrics = fn(log_prob, old_log_prob, advantages, response_mask, norm=norm, selected=selected,
                       hp=hp, entropy=entropy, weights=weights, global_ids=global_ids, stats=stats, step=step)
    if controls.entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("the entropy bonus is enabled (coefficient "
                             f"{controls.entropy_coef}) but no entropy tensor was passed")
        ent = aggregate(entropy.to(loss.dtype), response_mask, hp.loss_agg_mode, norm)
        loss = loss - controls.entropy_coef * ent
        metrics["entropy_bonus"] = ent.detach()
    if hp.kl_coef > 0 and not hp.use_kl_in_reward:
        if ref_log_prob is None:
            raise ValueError(f"algorithm.kl_coef={hp.kl_coef} needs reference log-probs (ref_log_prob)")
        kl, kl_metrics = kl_loss(log_prob, ref_log_prob, response_mask, estimator=hp.kl_estimator,
                                 loss_agg_mode=hp.loss_agg_mode, norm=norm)
        loss = loss + hp.kl_coef * kl
        metrics.update(kl_metrics)
    metrics["total_loss"] = loss.detach()
    return loss, metrics
