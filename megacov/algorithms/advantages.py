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
from typing import Any, Optional

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
#: Estimators that read a critic's token values (the trainer then runs a critic beside the actor).
VALUE_ADVANTAGES = frozenset({"gae"})
list_advantages = _ADVANTAGES.names


def compute_advantages(name: str, rewards: torch.Tensor, group_ids: torch.Tensor,
                       response_mask: torch.Tensor, hp: Any = None,
                       values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Advantages [B, T] from rewards [B], group ids [B] and the response mask [B, T].

    ``hp`` is an AlgorithmConfig-like object (``norm_adv_by_std`` is read by grpo); None uses the
    schema defaults. ``values`` [B, T] (a critic's token values, same columns as the mask) is passed
    only to estimators that need it (those in :data:`VALUE_ADVANTAGES`).
    """
    rewards, group_ids = _check_inputs(rewards, group_ids, response_mask)
    extra: dict[str, Any] = {}
    if name in VALUE_ADVANTAGES:
        if values is None or tuple(values.shape) != tuple(response_mask.shape):
            raise ValueError(f"advantage '{name}' needs critic values shaped like the response mask "
                             f"{tuple(response_mask.shape)}, got {None if values is None else tuple(values.shape)}")
        extra["values"] = values
    return get_advantage(name)(rewards, group_ids, response_mask.bool(),
                               hp=hp if hp is not None else AlgorithmConfig(), **extra)


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


# -- GAE (PPO with a learned value function) ----------------------------------------------------------

#: ``algorithm.gae_whiten`` choices: whiten over the batch's valid tokens, scale only, or leave raw.
GAE_WHITEN_MODES = ("mean_std", "std", "none")


def outcome_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] float64: each sequence's outcome reward on its last valid token, 0 elsewhere (a row
    without valid tokens gets nothing)."""
    mask = mask.bool()
    t = mask.shape[1]
    cols = torch.arange(t, device=mask.device).expand_as(mask)
    last = torch.where(mask, cols, torch.full_like(cols, -1)).max(dim=1).values
    out = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    rows = torch.nonzero(last >= 0).flatten()
    out[rows, last[rows]] = rewards.to(torch.float64)[rows]
    return out


def gae_advantages_returns(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
                           gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw GAE advantages and returns [B, T] (float64, 0 off the mask).

    The recursion runs over each row's *valid* tokens only: the successor of a token is the next
    valid token of the same row (value 0 after the last one: the episode ends there), and masked
    columns are skipped without breaking the chain. Returns are advantages + values, the critic's
    regression target; with gamma = lambda = 1 they are the reward-to-go.
    """
    mask = mask.bool()
    r, v = token_rewards.to(torch.float64), values.to(torch.float64)
    adv = torch.zeros_like(r)
    zero = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    next_value, next_adv = zero, zero
    for t in range(r.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(m, a_t, zero)
        next_adv = torch.where(m, a_t, next_adv)
        next_value = torch.where(m, v[:, t], next_value)
    returns = torch.where(mask, adv + v, torch.zeros_like(adv))
    return adv, returns


def whiten_tokens(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool) -> torch.Tensor:
    """Whiten ``x`` over the valid tokens of the whole batch (unbiased variance); 0 off the mask.
    ``shift_mean=False`` only rescales, keeping the sign of every advantage."""
    mask = mask.bool()
    n = int(mask.sum())
    if n < 2:
        return torch.zeros_like(x)
    vals = x[mask]
    mean = vals.mean()
    var = ((vals - mean) ** 2).sum() / (n - 1)
    out = (x - mean) if shift_mean else x
    out = out / torch.sqrt(var + STD_EPS**2)
    return torch.where(mask, out, torch.zeros_like(out))


def gae_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, hp: Any) -> torch.Tensor:
    """[B, T] float32 critic targets for the outcome rewards [B] (what ``gae`` whitens away)."""
    _, returns = gae_advantages_returns(outcome_token_rewards(rewards, mask), values, mask,
                                        gamma=hp.gamma, lam=hp.lam)
    return returns.to(torch.float32)


@register_advantage("gae")
def gae(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, *, hp: Any,
        values: torch.Tensor) -> torch.Tensor:
    """PPO's generalised advantage estimate from token values (``algorithm.gamma``, ``algorithm.lam``),
    whitened over the batch as ``algorithm.gae_whiten`` says. Group ids are not used: the critic is
    the baseline."""
    adv, _ = gae_advantages_returns(outcome_token_rewards(rewards, mask), values, mask,
                                    gamma=hp.gamma, lam=hp.lam)
    if hp.gae_whiten != "none":
        adv = whiten_tokens(adv, mask, shift_mean=hp.gae_whiten == "mean_std")
    return adv.to(torch.float32)
