"""The critic's side of PPO: the clipped value loss and the numbers that say whether it learns.

Pure torch like the rest of :mod:`megacov.algorithms`. The loss is returned as a *sum* over the
tokens passed plus the token count, so a caller that splits a mini-batch over data-parallel ranks and
micro-batches divides by the mini-batch's global token count once, and every layout computes the same
token mean.
"""
from __future__ import annotations

from typing import Optional

import torch


def value_loss_sum(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip: Optional[float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over ``mask`` of the PPO value loss 0.5 * max((V - R)^2, (V_clip - R)^2), where V_clip
    keeps V within ``clip`` of the values the advantages were computed with (``None`` or 0: plain
    squared error). Metrics are sums too: ``clipped`` (tokens whose clipped term was larger)."""
    m = mask.to(values.dtype)
    err = (values - returns) ** 2
    if clip:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        err_clip = (v_clip - returns) ** 2
        clipped = (err_clip > err).to(values.dtype)
        err = torch.maximum(err, err_clip)
    else:
        clipped = torch.zeros_like(err)
    return 0.5 * (err * m).sum(), {"clipped": (clipped * m).sum().detach(), "tokens": m.sum().detach()}


def explained_variance(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the valid tokens (float64): 1 for a perfect critic, 0 for one that
    predicts the mean, negative for worse. NaN when the returns do not vary."""
    m = mask.bool()
    r, v = returns.double()[m], values.double()[m]
    if r.numel() < 2:
        return float("nan")
    var_r = r.var(unbiased=False)
    if float(var_r) == 0.0:
        return float("nan")
    return float(1.0 - (r - v).var(unbiased=False) / var_r)


def last_tokens(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: each row's last valid token (none for an empty row)."""
    m = mask.bool()
    following = torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)
    later = following.flip(1).cumsum(1).flip(1) > 0  # some valid token after this column
    return m & ~later


def value_metrics(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Per-step numbers of the critic before its update: ``critic/{explained_var,explained_var_last,
    return_mean,value_mean}``. ``explained_var_last`` is taken over each response's last token only,
    where the value has read every generated token but the last: with an outcome reward it says
    whether the critic can tell a good response from a bad one, which the all-token figure blurs
    with the early tokens, whose outcome is not yet decided."""
    m = mask.bool()
    n = max(int(m.sum()), 1)
    return {"critic/explained_var": explained_variance(returns, values, mask),
            "critic/explained_var_last": explained_variance(returns, values, last_tokens(mask)),
            "critic/return_mean": float(returns.double()[m].sum() / n),
            "critic/value_mean": float(values.double()[m].sum() / n)}
