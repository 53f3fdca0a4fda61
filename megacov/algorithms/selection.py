"""Which tokens Clip-Cov and KL-Cov act on: pure, deterministic and independent of the layout.

The reference implementation chooses tokens per micro-batch and per rank (so the choice changes
with the micro-batch size and the data-parallel degree) and draws Clip-Cov's random subset with an
unseeded ``torch.randperm`` (so no run can be reproduced). Here every decision is a pure function of
*scope statistics* (valid-token count, mean log-prob, mean advantage) and of per-token *global ids*:

* Clip-Cov ranks eligible tokens by a counter-based hash of ``(seed, step, global id)`` and keeps
  the ``n`` smallest keys. A token's key does not depend on where the token lives, so any split of
  the scope over ranks and micro-batches chooses the same set once the candidates are combined.
* KL-Cov keeps the ``k`` largest covariances, ties going to the smaller global id.

Nothing here communicates: :mod:`megacov.parallel` reduces the statistics (:class:`ScopeStats`),
gathers each shard's candidates (:func:`clip_cov_candidates`, :func:`kl_cov_candidates`, at most
n per shard), chooses once on the union (:func:`select_smallest`, :func:`select_largest`) and maps
the chosen ids back (:func:`mask_from_ids`); the result equals the single-process choice.

The hash is splitmix64, evaluated in torch on four 16-bit limbs held in int64 tensors, so every
intermediate stays below 2**40: the result never relies on signed overflow and is bit-identical on
CPU and GPU. Keys are the top 63 bits of the hash (non-negative int64).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Scalar = float | torch.Tensor

_MASK64 = (1 << 64) - 1
_MASK16 = 0xFFFF
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_INT64_MAX = (1 << 63) - 1

#: Log-ratios are clamped to this magnitude before ``exp`` so a stale or broken token cannot
#: overflow float32 (exp(89) = inf); gradients vanish beyond it, as in common PPO code.
LOG_RATIO_CLAMP = 20.0


def splitmix64(x: int) -> int:
    """Pure-Python splitmix64 output for state ``x`` (the specification the tensor code follows)."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


def _limbs_of(c: int) -> list[int]:
    return [(c >> (16 * i)) & _MASK16 for i in range(4)]


def _add_const(limbs: list[torch.Tensor], c: int) -> list[torch.Tensor]:
    out, carry = [], None
    for limb, ci in zip(limbs, _limbs_of(c)):
        s = limb + ci if carry is None else limb + ci + carry
        out.append(s & _MASK16)
        carry = s >> 16
    return out  # the carry out of the top limb is the mod-2**64 wrap


def _xor_shift_right(limbs: list[torch.Tensor], s: int) -> list[torch.Tensor]:
    """z ^ (z >> s) for 0 < s < 64, limb-wise."""
    q, r = divmod(s, 16)
    out = []
    for i in range(4):
        lo = limbs[i + q] >> r if i + q < 4 else None
        hi = ((limbs[i + q + 1] << (16 - r)) & _MASK16) if (r and i + q + 1 < 4) else None
        shifted = lo if hi is None else (hi if lo is None else lo | hi)
        out.append(limbs[i] if shifted is None else limbs[i] ^ shifted)
    return out


def _mul_const(limbs: list[torch.Tensor], c: int) -> list[torch.Tensor]:
    """z * c mod 2**64; each partial product is < 2**32 and each column sum < 2**35."""
    cl = _limbs_of(c)
    out, carry = [], None
    for k in range(4):
        col = None
        for i in range(k + 1):
            term = limbs[i] * cl[k - i]
            col = term if col is None else col + term
        if carry is not None:
            col = col + carry
        out.append(col & _MASK16)
        carry = col >> 16
    return out


def _splitmix64_limbs(limbs: list[torch.Tensor]) -> list[torch.Tensor]:
    z = _add_const(limbs, _GOLDEN)
    z = _mul_const(_xor_shift_right(z, 30), _MUL1)
    z = _mul_const(_xor_shift_right(z, 27), _MUL2)
    return _xor_shift_right(z, 31)


def token_keys(seed: int, step: int, global_ids: torch.Tensor) -> torch.Tensor:
    """Clip-Cov sort keys: ``splitmix64(splitmix64(splitmix64(seed) ^ step) ^ id) >> 1``.

    ``global_ids`` must be non-negative int64 (any shape); the result has the same shape, is
    non-negative int64, and equals :func:`token_keys_reference` element for element.
    """
    if global_ids.dtype != torch.int64:
        raise TypeError(f"global_ids must be int64, got {global_ids.dtype}")
    prefix = splitmix64(splitmix64(seed & _MASK64) ^ (step & _MASK64))
    ids = global_ids
    limbs = [((ids >> (16 * i)) & _MASK16) ^ pl for i, pl in enumerate(_limbs_of(prefix))]
    z = _splitmix64_limbs(limbs)
    return (z[3] << 47) | (z[2] << 31) | (z[1] << 15) | (z[0] >> 1)


def token_keys_reference(seed: int, step: int, global_id: int) -> int:
    """One key in pure Python (used by tests and by anyone porting the scheme)."""
    prefix = splitmix64(splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return splitmix64(prefix ^ global_id) >> 1


@dataclass(frozen=True)
class ScopeStats:
    """Statistics of the whole selection scope (one rank's micro-batch, or a global mini-batch).

    ``mean_logp`` and ``mean_adv`` are token-weighted means over the valid tokens of the scope; they
    may be Python floats or 0-dim tensors (the parallel layer passes all-reduced tensors).
    """

    n_valid: int
    mean_logp: Scalar
    mean_adv: Scalar


def scope_stats(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> ScopeStats:
    """Statistics of a scope that is exactly the tensors passed ([B, T] each)."""
    m = mask.bool()
    n = int(m.sum())
    dtype = _compute_dtype(log_prob)
    denom = max(n, 1)
    lp = torch.where(m, log_prob.detach().to(dtype), 0).sum() / denom
    adv = torch.where(m, advantages.detach().to(dtype), 0).sum() / denom
    return ScopeStats(n_valid=n, mean_logp=lp, mean_adv=adv)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def covariance(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               mean_logp: Scalar, mean_adv: Scalar) -> torch.Tensor:
    """cov_t = (A_t - mean_adv) * (logp_t - mean_logp), 0 where mask == 0; [B, T] -> [B, T].

    Computed in float32 (float64 if the inputs are float64) on detached inputs: the covariance
    only decides *which* tokens are treated differently, it never carries gradient.
    """
    dtype = _compute_dtype(log_prob)
    m = mask.bool()
    lp = log_prob.detach().to(dtype)
    adv = advantages.detach().to(dtype)
    cov = (adv - mean_adv) * (lp - mean_logp)
    return torch.where(m, cov, torch.zeros((), dtype=dtype, device=cov.device))


def ppo_clipped_mask(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, clip_ratio_low: float, clip_ratio_high: float) -> torch.Tensor:
    """Valid tokens whose clipped PPO term exceeds the unclipped one (PPO already stops them)."""
    m = mask.bool()
    log_ratio = masked_log_ratio(log_prob.detach(), old_log_prob.detach(), m)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.detach().to(ratio.dtype), 0)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    return (clipped > unclipped) & m


def masked_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logp - old_logp on valid tokens, 0 on padding, clamped to +-LOG_RATIO_CLAMP ([B, T])."""
    dtype = _compute_dtype(log_prob)
    delta = log_prob.to(dtype) - old_log_prob.detach().to(dtype)
    delta = torch.where(mask.bool(), delta, torch.zeros((), dtype=dtype, device=delta.device))
    return torch.clamp(delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def clip_cov_eligible(cov: torch.Tensor, ppo_clipped: torch.Tensor, mask: torch.Tensor,
                      lb: float, ub: float) -> torch.Tensor:
    """Clip-Cov candidates: valid, not PPO-clipped, lb < cov < ub (both strict)."""
    return mask.bool() & ~ppo_clipped.bool() & (cov > lb) & (cov < ub)


def clip_cov_count(n_valid: int, ratio: float) -> int:
    """Tokens Clip-Cov detaches: max(1, int(ratio * n_valid)); 0 for an empty scope."""
    return 0 if n_valid <= 0 else max(1, int(ratio * n_valid))


def kl_cov_count(n_valid: int, ratio: float) -> int:
    """Tokens KL-Cov penalises: max(1, int(ratio * n_valid)); 0 for an empty scope."""
    return 0 if n_valid <= 0 else max(1, int(ratio * n_valid))


def _select(order: torch.Tensor, candidates: torch.Tensor, global_ids: torch.Tensor, n: int,
            largest: bool) -> torch.Tensor:
    """The n candidates first in (order, global id); exact ties resolved by the smaller id.

    A threshold on ``order`` takes everything strictly better than the n-th value; the remaining
    places go to the tied candidates with the smallest ids. Two top-k calls, no sort, no host copy
    of the data (only two counts are read back).
    """
    shape = candidates.shape
    cand = candidates.reshape(-1).bool()
    n_cand = int(cand.sum())
    if n <= 0 or n_cand == 0:
        return torch.zeros(shape, dtype=torch.bool, device=candidates.device)
    if n >= n_cand:
        return cand.reshape(shape).clone()
    vals = order.reshape(-1)
    ids = global_ids.reshape(-1).to(torch.int64)
    if vals.is_floating_point():
        fill = float("-inf") if largest else float("inf")
        vals = torch.where(torch.isnan(vals), torch.full((), fill, dtype=vals.dtype, device=vals.device), vals)
    else:
        fill = torch.iinfo(vals.dtype).min if largest else torch.iinfo(vals.dtype).max
    work = torch.where(cand, vals, torch.full((), fill, dtype=vals.dtype, device=vals.device))
    thr = torch.topk(work, n, largest=largest, sorted=True).values[-1]
    better = cand & ((work > thr) if largest else (work < thr))
    ties = cand & (work == thr)
    need = n - int(better.sum())
    if int(ties.sum()) == need:  # the usual case: no tie straddles the cut
        return (better | ties).reshape(shape)
    tie_ids = torch.where(ties, ids, torch.full((), _INT64_MAX, dtype=ids.dtype, device=ids.device))
    id_thr = torch.topk(tie_ids, need, largest=False, sorted=True).values[-1]
    chosen = better | (ties & (ids <= id_thr))
    return chosen.reshape(shape)


def select_smallest(keys: torch.Tensor, candidates: torch.Tensor, global_ids: torch.Tensor,
                    n: int) -> torch.Tensor:
    """Boolean mask of the ``n`` candidates with the smallest (key, global id); all if fewer.

    Global ids must be unique within the scope; shapes are arbitrary but equal.
    """
    return _select(keys, candidates, global_ids, n, largest=False)


def select_largest(values: torch.Tensor, candidates: torch.Tensor, global_ids: torch.Tensor,
                   k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` candidates with the largest value, ties to the smaller global id.

    NaN values rank last (they can only arise from NaN log-probs, which poison the loss anyway).
    """
    return _select(values, candidates, global_ids, k, largest=True)


def default_global_ids(mask: torch.Tensor) -> torch.Tensor:
    """Row-major position ids ``b * T + t`` for a scope that is exactly the tensor passed."""
    return torch.arange(mask.numel(), device=mask.device, dtype=torch.int64).reshape(mask.shape)


def _clip_cov_local(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, global_ids: torch.Tensor, stats: ScopeStats, hp: Any, step: int,
                    cov: torch.Tensor | None, ppo_clipped: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Flat positions, global ids and keys of the <= n best eligible tokens of these tensors."""
    if cov is None:
        cov = covariance(log_prob, advantages, mask, stats.mean_logp, stats.mean_adv)
    if ppo_clipped is None:
        ppo_clipped = ppo_clipped_mask(log_prob, old_log_prob, advantages, mask, hp.clip_ratio_low,
                                       hp.clip_ratio_high)
    eligible = clip_cov_eligible(cov, ppo_clipped, mask, hp.clip_cov_lb, hp.clip_cov_ub)
    # Hash only the (few) eligible tokens: same keys, a fraction of the work.
    where = eligible.reshape(-1).nonzero().squeeze(1)
    cand_ids = global_ids.reshape(-1)[where]
    keys = token_keys(hp.seed, step, cand_ids)
    every = torch.ones_like(cand_ids, dtype=torch.bool)
    keep = select_smallest(keys, every, cand_ids, clip_cov_count(stats.n_valid, hp.clip_cov_ratio))
    return where[keep], cand_ids[keep], keys[keep]


def select_clip_cov(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, global_ids: torch.Tensor, stats: ScopeStats, *, hp: Any, step: int,
                    cov: torch.Tensor | None = None, ppo_clipped: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Clip-Cov's chosen tokens [B, T] when the tensors passed hold the whole scope.

    ``hp`` is AlgorithmConfig-like (clip_ratio_low/high, clip_cov_ratio/lb/ub, seed). ``cov`` /
    ``ppo_clipped`` may be passed when already computed (same values as recomputing).
    """
    pos, _, _ = _clip_cov_local(log_prob, old_log_prob, advantages, mask, global_ids, stats, hp, step,
                                cov, ppo_clipped)
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    out[pos] = True
    return out.reshape(mask.shape)


def clip_cov_candidates(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, global_ids: torch.Tensor, stats: ScopeStats, *, hp: Any,
                        step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's share of a distributed Clip-Cov choice: (global ids, keys), 1-D, at most n.

    ``stats`` describe the whole scope. The scope's n smallest keys lie among each shard's n
    smallest, so gathering these from every shard and calling :func:`select_smallest` on the
    union (then :func:`mask_from_ids` per shard) chooses exactly what one process would.
    """
    _, ids, keys = _clip_cov_local(log_prob, old_log_prob, advantages, mask, global_ids, stats, hp, step,
                                   None, None)
    return ids, keys


def select_kl_cov(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  global_ids: torch.Tensor, stats: ScopeStats, *, kl_cov_ratio: float,
                  cov: torch.Tensor | None = None) -> torch.Tensor:
    """KL-Cov's chosen tokens [B, T] when the tensors passed hold the whole scope."""
    if cov is None:
        cov = covariance(log_prob, advantages, mask, stats.mean_logp, stats.mean_adv)
    return select_largest(cov, mask.bool(), global_ids, kl_cov_count(stats.n_valid, kl_cov_ratio))


def kl_cov_candidates(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      global_ids: torch.Tensor, stats: ScopeStats, *, kl_cov_ratio: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's share of a distributed KL-Cov choice: (global ids, cov values), 1-D, at most k
    (the shard's own top-k by (cov desc, id asc), which contains its part of the global top-k).
    Gather from every shard, :func:`select_largest` on the union, :func:`mask_from_ids` per shard."""
    cov = covariance(log_prob, advantages, mask, stats.mean_logp, stats.mean_adv)
    chosen = select_kl_cov(log_prob, advantages, mask, global_ids, stats, kl_cov_ratio=kl_cov_ratio, cov=cov)
    return global_ids[chosen], cov[chosen]


def mask_from_ids(global_ids: torch.Tensor, chosen_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask (shape of ``global_ids``) of the tokens whose id is in ``chosen_ids``."""
    return torch.isin(global_ids, chosen_ids.to(global_ids.dtype))
