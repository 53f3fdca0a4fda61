"""Which tokens a token-selecting method acts on: pure, deterministic and independent of the layout.

Every rule is a :class:`SelectionRule` in a registry (``clip_cov``, ``kl_cov``, ``high_entropy``;
a loss names its rule when it registers), so :mod:`megacov.parallel` computes any of them over the
whole mini-batch without knowing which method it serves.

The reference implementation of Clip-Cov / KL-Cov chooses tokens per micro-batch and per rank (so the choice changes
with the micro-batch size and the data-parallel degree) and draws Clip-Cov's random subset with an
unseeded ``torch.randperm`` (so no run can be reproduced). Here every decision is a pure function of
*scope statistics* (valid-token count, mean log-prob, mean advantage) and of per-token *global ids*:

* Clip-Cov ranks eligible tokens by a counter-based hash of ``(seed, step, PPO epoch, global id)``
  and keeps the ``n`` smallest keys (each epoch draws anew, as the reference's fresh ``randperm``). A token's key does not depend on where the token lives, so any split of
  the scope over ranks and micro-batches chooses the same set once the candidates are combined.
* KL-Cov keeps the ``k`` largest covariances, ties going to the smaller global id.
* The high-entropy tokens are the ``k`` largest entropies, ``k`` the count at or above the scope's
  quantile (:func:`high_entropy_count`), ties again to the smaller global id.

Nothing here communicates: :mod:`megacov.parallel` reduces the statistics (:class:`ScopeStats`),
gathers each shard's candidates (:func:`rule_candidates`, at most n per shard), chooses once on the union (:func:`select_smallest`, :func:`select_largest`) and maps
the chosen ids back (:func:`mask_from_ids`); the result equals the single-process choice.

The hash is splitmix64, evaluated in torch on four 16-bit limbs held in int64 tensors, so every
intermediate stays below 2**40: the result never relies on signed overflow and is bit-identical on
CPU and GPU. Keys are the top 63 bits of the hash (non-negative int64).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megacov.algorithms.registry import Registry

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


#: The PPO epoch enters the key stream above this bit, so steps below 2**40 never collide with it.
EPOCH_SHIFT = 40


def key_stream(step: int, epoch: int = 0) -> int:
    """The number that picks one optimiser pass's Clip-Cov keys: ``step + epoch * 2**40``.

    Epoch 0 gives the step itself, so a run with ``ppo_epochs = 1`` draws exactly the keys it drew
    before the epoch was part of the key; every later epoch of the same step draws anew.
    """
    if epoch < 0 or not 0 <= step < (1 << EPOCH_SHIFT):
        raise ValueError(f"key_stream needs 0 <= step < 2**{EPOCH_SHIFT} and epoch >= 0, got {step}, {epoch}")
    return step + (epoch << EPOCH_SHIFT)


def token_keys(seed: int, step: int, global_ids: torch.Tensor) -> torch.Tensor:
    """Clip-Cov sort keys: ``splitmix64(splitmix64(splitmix64(seed) ^ step) ^ id) >> 1``.

    ``step`` is the key stream of the pass (:func:`key_stream`: the RL step and the PPO epoch).

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


def select_clip_cov(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, global_ids: torch.Tensor, stats: ScopeStats, *, hp: Any, step: int,
                    cov: torch.Tensor | None = None, ppo_clipped: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Clip-Cov's chosen tokens [B, T] when the tensors passed hold the whole scope.

    ``hp`` is AlgorithmConfig-like (clip_ratio_low/high, clip_cov_ratio/lb/ub, seed). ``cov`` /
    ``ppo_clipped`` may be passed when already computed (same values as recomputing).
    """
    inp = SelectionInputs(log_prob, old_log_prob, advantages, mask, global_ids, stats, hp=hp, step=step,
                          cov=cov, ppo_clipped=ppo_clipped)
    return select_in_scope(get_selection_rule("clip_cov"), inp)


def clip_cov_candidates(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, global_ids: torch.Tensor, stats: ScopeStats, *, hp: Any,
                        step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's share of a distributed Clip-Cov choice: (global ids, keys), 1-D, at most n.

    ``stats`` describe the whole scope. The scope's n smallest keys lie among each shard's n
    smallest, so gathering these from every shard and calling :func:`select_smallest` on the
    union (then :func:`mask_from_ids` per shard) chooses exactly what one process would.
    """
    inp = SelectionInputs(log_prob, old_log_prob, advantages, mask, global_ids, stats, hp=hp, step=step)
    _, ids, keys, _ = rule_candidates(get_selection_rule("clip_cov"), inp,
                                      clip_cov_count(stats.n_valid, hp.clip_cov_ratio))
    return ids, keys


@dataclass(frozen=True)
class _KlCovRatio:
    kl_cov_ratio: float


def select_kl_cov(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  global_ids: torch.Tensor, stats: ScopeStats, *, kl_cov_ratio: float,
                  cov: torch.Tensor | None = None) -> torch.Tensor:
    """KL-Cov's chosen tokens [B, T] when the tensors passed hold the whole scope."""
    inp = SelectionInputs(log_prob, log_prob, advantages, mask, global_ids, stats, hp=_KlCovRatio(kl_cov_ratio),
                          step=0, cov=cov)
    return select_in_scope(get_selection_rule("kl_cov"), inp)


def kl_cov_candidates(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      global_ids: torch.Tensor, stats: ScopeStats, *, kl_cov_ratio: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's share of a distributed KL-Cov choice: (global ids, cov values), 1-D, at most k
    (the shard's own top-k by (cov desc, id asc), which contains its part of the global top-k).
    Gather from every shard, :func:`select_largest` on the union, :func:`mask_from_ids` per shard."""
    inp = SelectionInputs(log_prob, log_prob, advantages, mask, global_ids, stats, hp=_KlCovRatio(kl_cov_ratio),
                          step=0)
    _, ids, cov, _ = rule_candidates(get_selection_rule("kl_cov"), inp, kl_cov_count(stats.n_valid, kl_cov_ratio))
    return ids, cov


def mask_from_ids(global_ids: torch.Tensor, chosen_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask (shape of ``global_ids``) of the tokens whose id is in ``chosen_ids``."""
    return torch.isin(global_ids, chosen_ids.to(global_ids.dtype))


# ----------------------------------------------------------------------------------------------
# the selection registry: any token-selecting rule, computed exactly by megacov.parallel
# ----------------------------------------------------------------------------------------------


class SelectionInputs:
    """What a rule may look at, for one shard of a scope (or the whole scope): [B, T] tensors.

    ``stats`` describe the *whole* scope; ``entropy`` is the per-token entropy of the policy whose
    log-probs are in ``log_prob`` (None when no rule of the step needs it). The covariance is
    computed once, on first use, and may be passed when the caller already has it.
    """

    def __init__(self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor, global_ids: torch.Tensor, stats: ScopeStats, *, hp: Any, step: int,
                 entropy: torch.Tensor | None = None, cov: torch.Tensor | None = None,
                 ppo_clipped: torch.Tensor | None = None) -> None:
        self.log_prob, self.old_log_prob, self.advantages = log_prob, old_log_prob, advantages
        self.mask, self.global_ids, self.stats = mask.bool(), global_ids.to(torch.int64), stats
        self.hp, self.step, self.entropy = hp, step, entropy
        self._cov, self._ppo_clipped = cov, ppo_clipped

    @property
    def cov(self) -> torch.Tensor:
        if self._cov is None:
            self._cov = covariance(self.log_prob, self.advantages, self.mask, self.stats.mean_logp,
                                   self.stats.mean_adv)
        return self._cov

    @property
    def ppo_clipped(self) -> torch.Tensor:
        if self._ppo_clipped is None:
            self._ppo_clipped = ppo_clipped_mask(self.log_prob, self.old_log_prob, self.advantages, self.mask,
                                                 self.hp.clip_ratio_low, self.hp.clip_ratio_high)
        return self._ppo_clipped


@dataclass(frozen=True)
class SelectionRule:
    """A token-selecting rule: the ``count(n_valid, hp)`` eligible tokens best by ``score``.

    ``eligible(inputs)`` is a [B, T] bool mask; ``score(inputs, flat_positions)`` returns the 1-D
    scores of the eligible tokens only (so a costly score, such as a hash, is evaluated on few
    tokens). Ties in the score go to the smaller global id. The score of a token must depend only on
    that token and the scope statistics, never on where the token lives: then every shard's best
    ``count`` contain its share of the scope's best, and the parallel layer's gather-and-merge
    chooses exactly what one process would. ``uses`` names the current-policy inputs the rule
    reads ("log_prob", "entropy"): they decide what the pre-pass of ``cov_scope=global`` computes.
    """

    name: str
    count: Callable[[int, Any], int]
    eligible: Callable[[SelectionInputs], torch.Tensor]
    score: Callable[[SelectionInputs, torch.Tensor], torch.Tensor]
    largest: bool
    uses: frozenset[str] = frozenset({"log_prob"})
    uses_covariance: bool = True
    """The rule reads the scope's covariance (its statistics must then be global)."""


_RULES: Registry[SelectionRule] = Registry("token selection")
get_selection_rule = _RULES.get
list_selection_rules = _RULES.names


def register_selection_rule(rule: SelectionRule) -> SelectionRule:
    """Make ``rule`` available by its name to every loss and to the parallel layer."""
    return _RULES.register(rule.name)(rule)


def rule_candidates(rule: SelectionRule, inp: SelectionInputs, n: int) -> tuple[torch.Tensor, ...]:
    """(flat positions, global ids, scores) of this shard's <= n best eligible tokens, and the
    number of eligible tokens (0-dim int64)."""
    eligible = rule.eligible(inp) & inp.mask
    where = eligible.reshape(-1).nonzero().squeeze(1)
    ids = inp.global_ids.reshape(-1)[where]
    scores = rule.score(inp, where)
    keep = _select(scores, torch.ones_like(ids, dtype=torch.bool), ids, n, rule.largest)
    return where[keep], ids[keep], scores[keep], torch.tensor(where.numel(), dtype=torch.int64)


def select_in_scope(rule: SelectionRule, inp: SelectionInputs) -> torch.Tensor:
    """The rule's chosen tokens [B, T] when ``inp`` holds the whole scope."""
    pos, _, _, _ = rule_candidates(rule, inp, rule.count(inp.stats.n_valid, inp.hp))
    out = torch.zeros(inp.mask.numel(), dtype=torch.bool, device=inp.mask.device)
    out[pos] = True
    return out.reshape(inp.mask.shape)


def high_entropy_count(n_valid: int, ratio: float) -> int:
    """Tokens at or above the scope's (1 - ratio) entropy quantile (linear interpolation, as
    ``torch.quantile``) when no entropies tie: ``n - ceil((1 - ratio) (n - 1))``; 0 when empty.

    Fixing the count (ties at the cut going to the smaller global id) makes the choice exact and
    independent of the layout even when entropies tie."""
    if n_valid <= 0:
        return 0
    pos = round((1.0 - ratio) * (n_valid - 1), 9)  # 0.8 * 100 must not become 80.00000000000001
    return n_valid - math.ceil(pos)


def _flat(t: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)[where]


def _entropy_scores(inp: SelectionInputs, where: torch.Tensor) -> torch.Tensor:
    if inp.entropy is None:
        raise ValueError("the high_entropy selection needs the token entropies of the scope")
    return _flat(inp.entropy.detach().to(_compute_dtype(inp.entropy)), where)


register_selection_rule(SelectionRule(
    name="clip_cov", count=lambda n, hp: clip_cov_count(n, hp.clip_cov_ratio),
    eligible=lambda i: clip_cov_eligible(i.cov, i.ppo_clipped, i.mask, i.hp.clip_cov_lb, i.hp.clip_cov_ub),
    score=lambda i, where: token_keys(i.hp.seed, i.step, _flat(i.global_ids, where)), largest=False))
"""Clip-Cov: random (seeded hash keys) among the valid, not PPO-clipped tokens with lb < cov < ub."""

register_selection_rule(SelectionRule(
    name="kl_cov", count=lambda n, hp: kl_cov_count(n, hp.kl_cov_ratio), eligible=lambda i: i.mask,
    score=lambda i, where: _flat(i.cov, where), largest=True))
"""KL-Cov: the largest covariances."""

register_selection_rule(SelectionRule(
    name="high_entropy", count=lambda n, hp: high_entropy_count(n, hp.entropy_top_ratio),
    eligible=lambda i: i.mask, score=_entropy_scores, largest=True, uses=frozenset({"entropy"}),
    uses_covariance=False))
"""High-entropy "forking" tokens (Wang et al. 2025, arXiv 2506.01939): the top-rho fraction of
the scope's tokens by entropy keep their gradient (``algorithm.entropy_top_ratio``)."""
