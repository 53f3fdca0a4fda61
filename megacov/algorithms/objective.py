"""The actor objective of one micro-batch: policy loss + entropy bonus + KL to the reference.

A thin composition so the trainer and the parallel layer call one function; every term uses the
same normaliser and aggregation mode, so the total still sums exactly over micro-batches and ranks.
Per-token multipliers of the policy loss compose here: PAR's positive-advantage weight, the
high-entropy token mask (``hp.entropy_top_ratio``; masked tokens keep their place in the
normaliser, as in the paper's indicator form) and the rollout-correction weight (TIS).
"""
from __future__ import annotations

from typing import Any

import torch

from megacov.algorithms.entropy import Controls, par_weights
from megacov.algorithms.kl import kl_loss
from megacov.algorithms.losses import LossNormalizer, aggregate, get_policy_loss
from megacov.algorithms import selection as sel
from megacov.algorithms.selection import ScopeStats


def actor_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
               response_mask: torch.Tensor, *, hp: Any, norm: LossNormalizer,
               selected: torch.Tensor | None = None, controls: Controls | None = None,
               entropy: torch.Tensor | None = None, ref_log_prob: torch.Tensor | None = None,
               global_ids: torch.Tensor | None = None, stats: ScopeStats | None = None,
               step: int = 0, entropy_keep: torch.Tensor | None = None,
               loss_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Total loss of ``hp.policy_loss`` plus the enabled terms; all tensors [B, T].

    ``controls`` (from the entropy controller) give the entropy coefficient and the PAR weight of
    positive-advantage tokens; None means ``hp.entropy_coef`` and weight 1. ``entropy`` must carry
    gradient when the coefficient is non-zero; ``ref_log_prob`` is needed when ``hp.kl_coef > 0``
    and the KL is not folded into the reward. ``entropy_keep``: the high-entropy tokens chosen
    over the whole mini-batch (None with ``hp.entropy_top_ratio`` set: chosen from the tensors
    passed, as one scope); ``loss_weight``: per-token rollout-correction weights.
    """
    if controls is None:
        controls = Controls(entropy_coef=float(hp.entropy_coef), positive_weight=1.0)
    weights = par_weights(advantages, response_mask, controls.positive_weight)
    extra: dict[str, Any] = {}
    if getattr(hp, "entropy_top_ratio", None) is not None:
        keep, extra = _high_entropy(log_prob, advantages, response_mask, entropy, entropy_keep, global_ids,
                                    stats, hp, step, norm)
        weights = _times(weights, keep)
    if loss_weight is not None:
        weights = _times(weights, loss_weight)
    fn = get_policy_loss(hp.policy_loss)
    loss, metrics = fn(log_prob, old_log_prob, advantages, response_mask, norm=norm, selected=selected,
                       hp=hp, entropy=entropy, weights=weights, global_ids=global_ids, stats=stats, step=step)
    metrics.update(extra)
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


def _times(weights: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.detach().to(torch.float32)
    return factor if weights is None else weights * factor


def _high_entropy(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  entropy: torch.Tensor | None, keep: torch.Tensor | None, global_ids: torch.Tensor | None,
                  stats: ScopeStats | None, hp: Any, step: int, norm: LossNormalizer
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The high-entropy token mask and its metrics (count, entropy sum and minimum of the kept
    tokens: the threshold actually applied)."""
    m = mask.bool()
    if entropy is None:
        raise ValueError(f"algorithm.entropy_top_ratio={hp.entropy_top_ratio} needs the token entropies")
    if keep is None:
        ids = global_ids if global_ids is not None else sel.default_global_ids(m)
        scope = stats if stats is not None else sel.scope_stats(log_prob, advantages, m)
        inp = sel.SelectionInputs(log_prob, log_prob, advantages, m, ids, scope, hp=hp, step=step, entropy=entropy)
        keep = sel.select_in_scope(sel.get_selection_rule("high_entropy"), inp)
    keep = keep.bool() & m
    ent = entropy.detach().to(torch.float64)
    inf = torch.full((), float("inf"), dtype=torch.float64, device=ent.device)
    zero = torch.zeros((), dtype=torch.float64, device=ent.device)
    return keep, {"he_selected": keep, "he_count": keep.sum(), "he_frac": keep.sum().double() / max(norm.num_tokens, 1.0),
                  "he_entropy_sum": torch.where(keep, ent, zero).sum(),
                  "he_entropy_min": torch.where(keep, ent, inf).min() if bool(keep.any()) else inf}
