"""Train / rollout log-prob mismatch: how far the engines' sampling distribution is from the actor's.

Why it is logged every step: the PPO ratio assumes the rollout log-probs came from the actor's
weights. Stale weights (a sync that missed a layer), a mis-fused q/k/v, a prefix cache reused across
updates or a numerics gap between vLLM and Megatron all show up here first, long before the reward
curve bends. Measured on a sample of each step's sequences (``rollout.mismatch_sample``).

Pure torch: no collectives (sum the returned ``*_sum`` / ``tokens`` / ``max`` fields across ranks
before dividing when the sample is sharded).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def logprob_mismatch(actor_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mismatch statistics over the valid tokens.

    Args:
        actor_logp: ``[batch, seq]`` log-probs of the sampled tokens recomputed by the actor.
        rollout_logp: ``[batch, seq]`` log-probs the engine reported when sampling them.
        mask: ``[batch, seq]`` 1 for response tokens, 0 for prompt and padding.

    Returns:
        ``mismatch/abs_mean`` and ``mismatch/abs_max`` of ``|actor - rollout|``, ``mismatch/mean``
        (signed, actor - rollout), ``mismatch/k3`` (the k3 estimate of KL(rollout || actor), >= 0),
        ``mismatch/ratio_max`` (largest ``exp(actor - rollout)``) and ``mismatch/tokens``. With no
        valid token every statistic is 0 and ``tokens`` is 0.
    """
    if actor_logp.shape != rollout_logp.shape or actor_logp.shape != mask.shape:
        raise ValueError(f"shapes differ: actor {tuple(actor_logp.shape)}, rollout {tuple(rollout_logp.shape)}, "
                         f"mask {tuple(mask.shape)}")
    valid = mask.bool()
    n = int(valid.sum())
    if n == 0:
        return {"mismatch/abs_mean": 0.0, "mismatch/abs_max": 0.0, "mismatch/mean": 0.0, "mismatch/k3": 0.0,
                "mismatch/ratio_max": 0.0, "mismatch/tokens": 0}
    delta = (actor_logp.double() - rollout_logp.double())[valid]
    # k3 = exp(-d) - 1 + d with d = actor - rollout estimates KL(rollout || actor) for tokens sampled by rollout.
    k3 = torch.expm1(-delta) + delta
    return {
        "mismatch/abs_mean": float(delta.abs().mean()),
        "mismatch/abs_max": float(delta.abs().max()),
        "mismatch/mean": float(delta.mean()),
        "mismatch/k3": float(k3.mean()),
        "mismatch/ratio_max": float(torch.exp(delta).max()),
        "mismatch/tokens": n,
    }


def mismatch_sample(num_sequences: int, sample: int, step: int, seed: int = 0) -> list[int]:
    """Indices of the sequences whose mismatch is measured at ``step`` (deterministic, sorted).

    A different subset every step (seeded by ``seed`` and ``step``) so that no sequence position is
    systematically left out; all sequences when ``sample`` is at least ``num_sequences``.
    """
    if sample <= 0 or num_sequences <= 0:
        return []
    if sample >= num_sequences:
        return list(range(num_sequences))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return sorted(torch.randperm(num_sequences, generator=gen)[:sample].tolist())


def pad_logprobs(rows: Sequence[Sequence[float]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ragged per-token log-prob lists into ``([batch, width] float64, [batch, width] mask)``."""
    values = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} log-probs, more than width {width}")
        values[i, :len(row)] = torch.tensor(list(row), dtype=torch.float64)
        mask[i, :len(row)] = True
    return values, mask
