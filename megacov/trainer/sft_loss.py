"""``sft_nll``: the warm-start's loss, registered like any policy loss.

A module of its own so that the actor worker can register it without importing the warm-start
driver (which builds the runtime, which starts actor workers).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from megacov.algorithms.losses import LossNormalizer, aggregate, register_policy_loss

SFT_LOSS = "sft_nll"


@register_policy_loss(SFT_LOSS)
def sft_nll_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                 response_mask: torch.Tensor, *, norm: LossNormalizer, selected: Optional[torch.Tensor], hp: Any,
                 entropy: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                 global_ids: Optional[torch.Tensor] = None, stats: Any = None,
                 step: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token-mean NLL of the response tokens [B, T]; the policy-gradient inputs are ignored."""
    m = response_mask.bool()
    loss = aggregate(-log_prob, m, "token-mean", norm)
    metrics: dict[str, Any] = {"pg_loss": loss.detach()}
    if entropy is not None:
        metrics["entropy"] = aggregate(entropy.detach().to(loss.dtype), m, "token-mean", norm)
    return loss, metrics
