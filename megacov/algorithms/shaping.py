"""Entropy-based advantage shaping (Cheng et al. 2025, "Reasoning with Exploration: An Entropy
Perspective", arXiv 2506.14758): A'_t = A_t + min(alpha * H_t, |A_t| / kappa).

The bonus favours tokens where the policy was uncertain (exploratory reasoning steps) and is
clipped by |A_t| / kappa so it can never flip the sign of an advantage or dominate it. H_t is the
old policy's entropy, detached: the shaping changes the advantage, not the gradient's form.
"""
from __future__ import annotations

import torch


def entropy_advantage(advantages: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, *,
                      coef: float, kappa: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Shaped advantages [B, T] (dtype of ``advantages``, 0 on padding) and metrics: the mean
    bonus and the share of tokens where the |A| / kappa clip was active. ``coef == 0``: unchanged."""
    m = mask.bool()
    if coef == 0.0:
        return advantages, {}
    if kappa <= 0:
        raise ValueError(f"entropy_advantage_kappa must be > 0, got {kappa}")
    a = advantages.double()
    raw = coef * entropy.detach().double()
    cap = a.abs() / kappa
    bonus = torch.where(m, torch.minimum(raw, cap), torch.zeros((), dtype=torch.float64))
    shaped = torch.where(m, a + bonus, torch.zeros((), dtype=torch.float64)).to(advantages.dtype)
    n = max(int(m.sum()), 1)
    return shaped, {"actor/entropy_adv_bonus": float(bonus.sum()) / n,
                    "actor/entropy_adv_clipped_frac": float((m & (raw > cap)).sum()) / n}
