"""Outcome-reward advantage estimators, registered by name.

Every estimator maps per-sequence scalar rewards ``[B]`` and group ids ``[B]`` (the prompt each
response answers) to token advantages ``[B, T]``: the sequence's advantage on every valid token,
0 on padding. Statistics are computed in float64 (group sizes are small and rewards are often
binary, so a float32 std of near-identical values would be noisy) and returned in float32.

Groups of one response have no baseline to compare with; GRPO and RLOO give them advantage 0
instead of the raw reward, so a lone sample never pushes the policy with an unbaselined signal
(:func:`megacov.algorithms.checks.check_algorithm_config` warns when rollout.n == 1).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megacov.algorithms.registry import Registry
from megacov.config.schema import AlgorithmConfig

#: Added to standard deviations before dividing, so all-equal groups give 0, not NaN.
STD_EPS = 1e-6

AdvantageFn = Callable[..., torch.Tensor]
_ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
register_advantage = _ADVANTAGES.register
"""Decorator: make an estimator selectable as ``algorithm.advantage=<name>``."""
get_advantage = _ADVANTAGES.get
list_advantages = _ADVANTAGES.names


def compute_advantages(name: str, rewards: torch.Tensor, group_ids: torch.Tensor,
                       response_mask: torch.Tensor, hp: Any = None) -> torch.Tensor:
    """Advantages [B, T] from rewards [B], group ids [B] and the response mask [B, T].

    ``hp`` is an AlgorithmConfig-like object (``norm_adv_by_std`` is read by grpo); None uses the
    schema defaults.
    """
    rewards, group_ids = _check_inputs(rewards, group_ids, response_mask)
    return get_advantage(name)(rewards, group_ids, response_mask.bool(),
                               hp=hp if hp is not None else AlgorithmConfig())


def _check_inputs(rewards: torch.Tensor, group_ids: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if rewards.dim() != 1 or group_ids.shape != rewards.shape or mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"expected rewards [B], group_ids [B], response_mask [B, T]; got {tuple(rewards.shape)}, "
                         f"{tuple(group_ids.shape)}, {tuple(mask.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"rewards must be finite; non-finite at rows {bad[:10]}")
    return rewards.to(torch.float64), group_ids.to(torch.int64)


def _broadcast(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = seq_adv.to(torch.float32).unsqueeze(-1).expand(mask.shape)
    return torch.where(mask, out, torch.zeros((), dtype=torch.float32, device=out.device))


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sequence group size, group mean and unbiased group std (0 for groups of one)."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64, device=rewards.device).index_add_(
        0, inv, torch.ones_like(rewards))
    total = torch.zeros_like(count).index_add_(0, inv, rewards)
    mean = total / count
    sq = torch.zeros_like(count).index_add_(0, inv, (rewards - mean[inv]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return count[inv], mean[inv], std[inv]


def _token_whiten(seq_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whiten per-sequence values over the valid *tokens* of the batch (token-weighted mean and
    unbiased variance), as REINFORCE++ whitens token returns; long responses weigh more."""
    w = mask.sum(dim=-1).to(torch.float64)
    n = w.sum()
    if n < 2:
        return torch.zeros_like(seq_values)
    mean = (w * seq_values).sum() / n
    var = (w * (seq_values - mean) ** 2).sum() / (n - 1)
    return (seq_values - mean) / torch.sqrt(var + STD_EPS**2)


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, *, hp: Any) -> torch.Tensor:
    """A = (r - mean_group) / (std_group + eps); without std normalisation this is Dr.GRPO."""
    count, mean, std = _group_stats(rewards, group_ids)
    adv = rewards - mean
    if hp.norm_adv_by_std:
        adv = adv / (std + STD_EPS)
    return _broadcast(torch.where(count > 1, adv, torch.zeros_like(adv)), mask)


@register_advantage("rloo")
def rloo(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, *, hp: Any) -> torch.Tensor:
    """A_i = r_i - mean of the other responses of the group = n/(n-1) (r_i - mean_group)."""
    count, mean, _ = _group_stats(rewards, group_ids)
    adv = (rewards - mean) * count / (count - 1).clamp(min=1)
    return _broadcast(torch.where(count > 1, adv, torch.zeros_like(adv)), mask)


@register_advantage("reinforce_pp")
def reinforce_pp(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, *, hp: Any) -> torch.Tensor:
    """REINFORCE++: the outcome reward (every token's return, gamma = 1) whitened over the batch."""
    return _broadcast(_token_whiten(rewards, mask), mask)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, *,
                          hp: Any) -> torch.Tensor:
    """REINFORCE++ with a group-mean baseline subtracted before the batch whitening."""
    count, mean, _ = _group_stats(rewards, group_ids)
    centred = torch.where(count > 1, rewards - mean, torch.zeros_like(rewards))
    return _broadcast(_token_whiten(centred, mask), mask)
