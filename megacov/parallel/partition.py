"""Balanced assignment of sequences to DP ranks and to token-budget micro-batches.

With long-tailed response lengths, cutting a batch into contiguous equal-count shares leaves one DP
rank with the long sequences while the others wait for it. These partitions assign sequences by
their token counts instead. They decide only *where* a sequence is computed: every row keeps its
global sequence id, so the global normaliser and the Clip-Cov / KL-Cov choice (which read global
token ids, see :mod:`megacov.parallel.selection`) are the same whatever the cut.

Both functions are deterministic (ties break on the sequence index), so every rank computes the
same assignment from the same lengths without communicating.
"""
from __future__ import annotations

from collections.abc import Sequence


def _longest_first(weights: Sequence[int]) -> list[int]:
    return sorted(range(len(weights)), key=lambda i: (-int(weights[i]), i))


def balanced_partition(weights: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``weights`` split into ``parts`` non-empty groups of near-equal sums.

    Greedy longest-first (LPT): each sequence, longest first, goes to the group with the smallest
    sum so far (fewest members, then lowest group index, on ties), which keeps the largest sum
    within 4/3 of the optimum. Each group's indices are returned in ascending order, so a rank
    processes its sequences in batch order.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if len(weights) < parts:
        raise ValueError(f"{len(weights)} sequences cannot fill {parts} non-empty groups")
    loads = [0] * parts
    groups: list[list[int]] = [[] for _ in range(parts)]
    for i in _longest_first(weights):
        g = min(range(parts), key=lambda k: (loads[k], len(groups[k]), k))
        groups[g].append(i)
        loads[g] += int(weights[i])
    return [sorted(g) for g in groups]


def token_budget_groups(weights: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``weights`` cut into micro-batches of at most ``max_tokens`` tokens each.

    First-fit decreasing: each sequence, longest first, joins the first micro-batch it still fits
    in, else opens a new one; a sequence longer than the budget gets a micro-batch of its own.
    Micro-batches are returned in the order they were opened (longest first), indices ascending.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    loads: list[int] = []
    groups: list[list[int]] = []
    for i in _longest_first(weights):
        w = int(weights[i])
        for g, load in enumerate(loads):
            if load + w <= max_tokens:
                groups[g].append(i)
                loads[g] += w
                break
        else:
            groups.append([i])
            loads.append(w)
    return [sorted(g) for g in groups]


def imbalance(loads: Sequence[int]) -> float:
    """max / mean of per-rank loads (1.0 = perfectly balanced)."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean else 1.0
