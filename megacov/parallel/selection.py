"""Global Clip-Cov / KL-Cov token selection over data-parallel ranks and micro-batches.

The pure rules live in :mod:`megacov.algorithms.selection`; this module feeds them *global* inputs
so that every layout chooses what one device holding the whole mini-batch would choose:

1. Scope statistics: valid-token count, sequence count, sum of advantages and of log-probs over the
   DP rank's whole share of the mini-batch (all micro-batches at once), summed in float64 and
   all-reduced over the DP group; the means follow.
2. Clip-Cov: every rank ranks its eligible tokens by the hash key of their global id and keeps its
   ``n`` smallest (``n`` from the *global* count); the ``dp * n`` candidates are all-gathered and
   merged by the same pure rule. A token in the global top-n is necessarily in its own rank's
   top-n, so the merge is exact.
3. KL-Cov: the same with the ``k`` largest covariances, ties to the smaller global id.

All ranks of the DP group end with the same sorted list of selected global token ids; a
micro-batch turns it into its own mask with :meth:`GlobalSelection.mask_for`. The inputs need
only be identical across TP and PP ranks (they are: the log-probs are broadcast from the last
pipeline stage), so every rank of the job reaches the identical selection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megacov.algorithms import selection as sel
from megacov.algorithms.losses import LossNormalizer
from megacov.parallel.vocab_parallel import all_gather_stacked, group_size_rank

#: Policy losses whose tokens are chosen by covariance (the others need no selection pass).
SELECTION_LOSSES = ("clip_cov", "kl_cov")

_INT64_MAX = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class GlobalSelection:
    """The outcome of one global selection (identical on every rank)."""

    stats: sel.ScopeStats
    """Global valid-token count and float64 means of log-prob and advantage."""
    selected_ids: torch.Tensor
    """Sorted int64 global token ids chosen by Clip-Cov / KL-Cov (empty for other losses)."""
    n_target: int
    """How many tokens the rule asked for: n (Clip-Cov) or k (KL-Cov)."""
    n_candidates: int
    """Global number of candidates: eligible tokens (Clip-Cov) or valid tokens (KL-Cov)."""

    def mask_for(self, global_token_ids: torch.Tensor) -> torch.Tensor:
        """Boolean [B, L] mask of the selected tokens among ``global_token_ids`` [B, L]."""
        return sel.mask_from_ids(global_token_ids, self.selected_ids.to(global_token_ids.device))


def _all_reduce(t: torch.Tensor, group: Any, op: Any = None) -> torch.Tensor:
    if group_size_rank(group)[0] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def global_normalizer(mask: torch.Tensor, dp_group: Any, max_len: int) -> LossNormalizer:
    """LossNormalizer of the whole mini-batch from this DP rank's [B, L] mask."""
    m = mask.bool()
    counts = torch.tensor([float(m.sum()), float(m.any(dim=-1).sum())], dtype=torch.float64,
                          device=mask.device)
    counts = _all_reduce(counts, dp_group)
    return LossNormalizer(num_tokens=float(counts[0]), num_seqs=float(counts[1]), max_len=int(max_len))


def global_scope_stats(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       dp_group: Any) -> sel.ScopeStats:
    """ScopeStats of the whole mini-batch; float64 sums all-reduced over ``dp_group``.

    The means come back as 0-dim float64 tensors (never rounded through fp32 before use).
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=mask.device)
    sums = torch.stack([m.sum().to(torch.float64),
                        torch.where(m, log_prob.detach().double(), zero).sum(),
                        torch.where(m, advantages.detach().double(), zero).sum()])
    sums = _all_reduce(sums, dp_group)
    n = round(float(sums[0]))
    denom = max(n, 1)
    return sel.ScopeStats(n_valid=n, mean_logp=sums[1] / denom, mean_adv=sums[2] / denom)


def _merge_candidates(values: torch.Tensor, ids: torch.Tensor, n: int, dp_group: Any,
                      largest: bool) -> torch.Tensor:
    """Gather each rank's <= n candidates (padded to n, id -1) and keep the global best n."""
    pad = n - values.numel()
    if pad > 0:
        fill = float("-inf") if values.is_floating_point() else _INT64_MAX
        values = torch.cat([values, torch.full((pad,), fill, dtype=values.dtype, device=values.device)])
        ids = torch.cat([ids, torch.full((pad,), -1, dtype=torch.int64, device=ids.device)])
    all_vals = all_gather_stacked(values, dp_group).reshape(-1)
    all_ids = all_gather_stacked(ids, dp_group).reshape(-1)
    valid = all_ids >= 0
    pick = (sel.select_largest if largest else sel.select_smallest)(all_vals, valid, all_ids, n)
    return torch.sort(all_ids[pick]).values


def select_global(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, global_ids: torch.Tensor, *, hp: Any, step: int, dp_group: Any,
                  stats: sel.ScopeStats | None = None) -> GlobalSelection:
    """The Clip-Cov / KL-Cov choice for the mini-batch whose DP-local share is passed ([B, L] each).

    ``log_prob`` are the log-probs the covariance uses (current weights for ``cov_scope=global``,
    ``old_log_prob`` for ``global_old``); ``hp`` is the AlgorithmConfig. Every rank of ``dp_group``
    must call this with its own share; all receive the same result.
    """
    m = mask.bool()
    if stats is None:
        stats = global_scope_stats(log_prob, advantages, m, dp_group)
    empty = torch.zeros(0, dtype=torch.int64, device=mask.device)
    if hp.policy_loss not in SELECTION_LOSSES:
        return GlobalSelection(stats=stats, selected_ids=empty, n_target=0, n_candidates=0)
    ids = global_ids.to(torch.int64)
    if hp.policy_loss == "clip_cov":
        n = sel.clip_cov_count(stats.n_valid, hp.clip_cov_ratio)
        vids, vals = sel.clip_cov_candidates(log_prob, old_log_prob, advantages, m, ids, stats, hp=hp, step=step)
        cov = sel.covariance(log_prob, advantages, m, stats.mean_logp, stats.mean_adv)
        clipped = sel.ppo_clipped_mask(log_prob, old_log_prob, advantages, m, hp.clip_ratio_low,
                                       hp.clip_ratio_high)
        largest, n_cand = False, int(sel.clip_cov_eligible(cov, clipped, m, hp.clip_cov_lb, hp.clip_cov_ub).sum())
    else:
        n = sel.kl_cov_count(stats.n_valid, hp.kl_cov_ratio)
        vids, vals = sel.kl_cov_candidates(log_prob, advantages, m, ids, stats, kl_cov_ratio=hp.kl_cov_ratio)
        largest, n_cand = True, int(m.sum())
    count = _all_reduce(torch.tensor([n_cand], dtype=torch.int64, device=mask.device), dp_group)
    chosen = _merge_candidates(vals, vids, n, dp_group, largest) if n > 0 else empty
    return GlobalSelection(stats=stats, selected_ids=chosen, n_target=n, n_candidates=int(count))
