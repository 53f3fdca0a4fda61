"""Global token selection over data-parallel ranks and micro-batches, for every registered rule.

The pure rules live in :mod:`megacov.algorithms.selection` (a registry: Clip-Cov, KL-Cov, the
high-entropy tokens, and whatever is registered next); this module feeds them *global* inputs so
that every layout chooses what one device holding the whole mini-batch would choose, without
naming any rule:

1. Scope statistics: valid-token count, sum of advantages and of log-probs over the DP rank's whole
   share of the mini-batch (all micro-batches at once), summed in float64 and all-reduced over the
   DP group; the means follow.
2. Every rank keeps its ``n`` best eligible tokens by the rule's score (``n`` from the *global*
   count); the ``dp * n`` candidates are all-gathered and merged by the same pure rule. A token in
   the global best n is necessarily among its own rank's best n, so the merge is exact.

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
from megacov.algorithms.losses import LossNormalizer, loss_selection
from megacov.parallel.vocab_parallel import all_gather_stacked, group_size_rank

_INT64_MAX = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class GlobalSelection:
    """The outcome of one global selection (identical on every rank)."""

    stats: sel.ScopeStats
    """Global valid-token count and float64 means of log-prob and advantage."""
    selected_ids: torch.Tensor
    """Sorted int64 global token ids chosen by the rule (empty when there is no rule)."""
    n_target: int
    """How many tokens the rule asked for."""
    n_candidates: int
    """Global number of eligible tokens."""

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


def step_rules(hp: Any) -> list[str]:
    """The selection rules a step of ``hp`` (AlgorithmConfig) applies: the policy loss's own (if it
    selects tokens) and the high-entropy tokens when ``hp.entropy_top_ratio`` is set."""
    rules = [r for r in (loss_selection(hp.policy_loss),) if r is not None]
    if getattr(hp, "entropy_top_ratio", None) is not None:
        rules.append("high_entropy")
    return rules


def select_global(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, global_ids: torch.Tensor, *, hp: Any, step: int, dp_group: Any,
                  stats: sel.ScopeStats | None = None, entropy: torch.Tensor | None = None,
                  rule: str | None = None) -> GlobalSelection:
    """The choice of selection ``rule`` (default: the policy loss's) for the mini-batch whose
    DP-local share is passed ([B, L] each).

    ``log_prob`` / ``entropy`` are those the rule scores (current weights for ``cov_scope=global``,
    the old policy's for ``global_old``); ``hp`` is the AlgorithmConfig. Every rank of ``dp_group``
    must call this with its own share; all receive the same result.
    """
    m = mask.bool()
    if stats is None:
        stats = global_scope_stats(log_prob, advantages, m, dp_group)
    empty = torch.zeros(0, dtype=torch.int64, device=mask.device)
    name = rule if rule is not None else loss_selection(hp.policy_loss)
    if name is None:
        return GlobalSelection(stats=stats, selected_ids=empty, n_target=0, n_candidates=0)
    spec = sel.get_selection_rule(name)
    n = spec.count(stats.n_valid, hp)
    inp = sel.SelectionInputs(log_prob, old_log_prob, advantages, m, global_ids, stats, hp=hp, step=step,
                              entropy=entropy)
    _, ids, scores, n_eligible = sel.rule_candidates(spec, inp, n)
    count = _all_reduce(n_eligible.reshape(1).to(mask.device), dp_group)
    chosen = _merge_candidates(scores, ids, n, dp_group, spec.largest) if n > 0 else empty
    return GlobalSelection(stats=stats, selected_ids=chosen, n_target=n, n_candidates=int(count))
