"""Policy losses (PPO-clip, Clip-Cov, KL-Cov, GSPO, CISPO), registered by name, and loss aggregation.

Every loss is a pure function ``(log_prob, old_log_prob, advantages, response_mask, *, norm,
selected, hp, entropy=None, ...) -> (loss, metrics)`` on [B, T] tensors (B sequences x T response
positions). A loss that acts on chosen tokens names its rule when it registers
(``@register_policy_loss("clip_cov", selects="clip_cov")``, the rule being registered in
:mod:`megacov.algorithms.selection`); the parallel layer then computes that choice globally
without knowing the loss. Two decisions keep them exact under any parallel layout:

* The normaliser (:class:`LossNormalizer`) is passed in and describes the *whole* scope, so the
  losses of micro-batches and data-parallel ranks simply add up to the loss of the mini-batch.
  Scalar metrics are divided by the same normaliser, so they also add up (see
  :data:`METRIC_REDUCTIONS` for the few that do not: maxima and quantiles).
* The token choice may be passed in (``selected``), computed globally by :mod:`megacov.parallel`
  from the loss's registered rule; with ``selected=None`` the loss computes it from the tensors
  passed, treating them as the whole scope. Either way the loss arithmetic after the choice is the
  same code, so both paths give identical numbers.

The covariance statistics (and the sort behind their quantiles) cost a pass over the tokens; they
are computed only for losses that select by covariance, or when ``hp.cov_metrics`` asks for them,
and their quantiles only by the single-scope entry :func:`megacov.algorithms.policy_loss`: across
micro-batches they could not be combined anyway.

Padding never influences anything: values under ``mask == 0`` are replaced before any arithmetic
(``torch.where``, not multiplication, so even inf/NaN padding cannot leak into the loss or grads).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megacov.algorithms import selection as sel
from megacov.algorithms.registry import Registry
from megacov.algorithms.selection import LOG_RATIO_CLAMP, masked_log_ratio  # noqa: F401 (re-exported)

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

#: How each scalar metric combines across micro-batches and ranks. Everything not listed is
#: pre-normalised by the global normaliser and combines by SUM. "local" statistics describe only
#: the tensors passed (exact when those are the whole scope, e.g. a gathered global batch).
METRIC_REDUCTIONS = {
    "cov_max": "max",
    "cov_min": "min",
    "cov_std": "local",
    "cov_q10": "local",
    "cov_q50": "local",
    "cov_q90": "local",
    "cov_q99": "local",
    "he_entropy_min": "min",
}

#: Quantiles of cov_t reported as metrics (name suffix -> q).
COV_QUANTILES = {"q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}


@dataclass(frozen=True)
class LossNormalizer:
    """GLOBAL counts of the scope a loss is normalised over (one mini-batch over all ranks).

    ``num_tokens``: valid tokens (token-mean); ``num_seqs``: sequences (seq-mean-*);
    ``max_len``: the constant of ``seq-mean-token-sum-norm`` (usually rollout.max_response_len).
    """

    num_tokens: float
    num_seqs: float
    max_len: int

    def __post_init__(self) -> None:
        if self.num_tokens < 0 or self.num_seqs < 0 or self.max_len < 1:
            raise ValueError(f"LossNormalizer needs num_tokens, num_seqs >= 0 and max_len >= 1, got {self}")

    @classmethod
    def from_mask(cls, mask: torch.Tensor, max_len: int | None = None) -> LossNormalizer:
        """The normaliser of a scope that is exactly ``mask`` ([B, T]); sequences without any valid
        token are not counted; ``max_len`` defaults to T."""
        m = mask.bool()
        return cls(num_tokens=float(m.sum()), num_seqs=float(m.any(dim=-1).sum()),
                   max_len=int(max_len if max_len is not None else m.shape[-1]))


def _positive(x: float) -> float:
    # An empty scope has an all-zero numerator; dividing by 1 keeps the loss 0 instead of NaN.
    return x if x > 0 else 1.0


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, norm: LossNormalizer) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar share of the global loss.

    token-mean: sum / num_tokens. seq-mean-token-sum: sum / num_seqs. seq-mean-token-mean:
    sum_b (sum_t / len_b) / num_seqs. seq-mean-token-sum-norm (Dr.GRPO): sum / (num_seqs * max_len),
    i.e. the mean over sequences of the token sum divided by a constant length.
    """
    m = mask.bool()
    masked = torch.where(m, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    if mode == "token-mean":
        return masked.sum() / _positive(norm.num_tokens)
    if mode == "seq-mean-token-sum":
        return masked.sum() / _positive(norm.num_seqs)
    if mode == "seq-mean-token-mean":
        lens = m.sum(dim=-1).clamp(min=1).to(loss_mat.dtype)
        return (masked.sum(dim=-1) / lens).sum() / _positive(norm.num_seqs)
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (_positive(norm.num_seqs) * norm.max_len)
    raise ValueError(f"unknown loss_agg_mode '{mode}'; expected one of {', '.join(AGG_MODES)}")


def _token_sum(x: torch.Tensor, m: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
    """Share of the global token-mean of ``x`` held by these tokens (sums correctly)."""
    x = x.detach()
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / _positive(norm.num_tokens)


def _share(x: torch.Tensor, norm: LossNormalizer, dtype: torch.dtype) -> torch.Tensor:
    """Like :func:`_token_sum` for a tensor already 0 / False on padding (no masking pass)."""
    return x.detach().sum().to(dtype) / _positive(norm.num_tokens)


#: Quantiles are computed on at most this many valid tokens, taken at an even stride over the
#: positions (deterministic): exact for micro-batches up to that size, and a full sort of a
#: million-token scope would cost more than the loss itself on CPU.
QUANTILE_SAMPLE = 65536


def cov_metrics(cov: torch.Tensor, m: torch.Tensor, norm: LossNormalizer,
                quantiles: bool = True) -> dict[str, torch.Tensor]:
    """Mean / second moment (summable), max, min, std and (``quantiles``) quantiles of cov_t over
    valid tokens. ``cov`` must be 0 on padding (as :func:`~megacov.algorithms.selection.covariance`
    returns it)."""
    s1 = cov.sum(dtype=torch.float64)
    s2 = (cov * cov).sum(dtype=torch.float64)
    out = {"cov_mean": (s1 / _positive(norm.num_tokens)).to(cov.dtype),
           "cov_sq_mean": (s2 / _positive(norm.num_tokens)).to(cov.dtype)}
    zero = torch.zeros((), dtype=cov.dtype, device=cov.device)
    n = int(m.sum())
    if n == 0:
        out.update({"cov_max": zero, "cov_min": zero, "cov_std": zero})
        out.update({f"cov_{k}": zero for k in COV_QUANTILES} if quantiles else {})
        return out
    inf = torch.full((), float("inf"), dtype=cov.dtype, device=cov.device)
    out["cov_max"] = torch.where(m, cov, -inf).max()
    out["cov_min"] = torch.where(m, cov, inf).min()
    out["cov_std"] = torch.sqrt(torch.clamp(s2 / n - (s1 / n) ** 2, min=0)).to(cov.dtype)
    if not quantiles:
        return out
    stride = max(1, -(-m.numel() // QUANTILE_SAMPLE))
    flat_c, flat_m = cov.reshape(-1)[::stride], m.reshape(-1)[::stride]
    vals = torch.sort(flat_c[flat_m]).values if bool(flat_m.any()) else cov[m].sort().values
    k = vals.numel()
    for name, q in COV_QUANTILES.items():
        out[f"cov_{name}"] = vals[min(k - 1, round(q * (k - 1)))]
    return out


class _Prepared:
    """Shared preamble of the losses: masked log-ratio, ratio, masked advantages, statistics."""

    def __init__(self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                 response_mask: torch.Tensor, global_ids: torch.Tensor | None,
                 stats: sel.ScopeStats | None) -> None:
        if not (log_prob.shape == old_log_prob.shape == advantages.shape == response_mask.shape):
            raise ValueError(
                "log_prob, old_log_prob, advantages and response_mask must share one [B, T] shape, got "
                f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}, "
                f"{tuple(response_mask.shape)}")
        self.m = response_mask.bool()
        self.log_ratio = masked_log_ratio(log_prob, old_log_prob, self.m)
        self.ratio = torch.exp(self.log_ratio)
        dtype = self.ratio.dtype
        self.adv = torch.where(self.m, advantages.detach().to(dtype), torch.zeros((), dtype=dtype,
                                                                                 device=self.ratio.device))
        self.log_prob = log_prob
        self.global_ids = global_ids if global_ids is not None else sel.default_global_ids(self.m)
        self._advantages = advantages
        self._stats = stats
        self._cov: torch.Tensor | None = None

    @property
    def stats(self) -> sel.ScopeStats:
        if self._stats is None:
            self._stats = sel.scope_stats(self.log_prob, self._advantages, self.m)
        return self._stats

    @property
    def cov(self) -> torch.Tensor:
        """Token covariances with the scope means, computed on first use."""
        if self._cov is None:
            self._cov = sel.covariance(self.log_prob, self._advantages, self.m, self.stats.mean_logp,
                                       self.stats.mean_adv)
        return self._cov

    def masked_log_prob(self) -> torch.Tensor:
        """The log-probs with gradient, 0 on padding (so non-finite padding cannot leak)."""
        lp = self.log_prob.to(self.ratio.dtype)
        return torch.where(self.m, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))


def _finish(loss_mat: torch.Tensor, p: _Prepared, norm: LossNormalizer, hp: Any,
            weights: torch.Tensor | None, entropy: torch.Tensor | None,
            metrics: dict[str, torch.Tensor], *, covariance: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """Weights, aggregation and the common metrics. ``covariance``: the loss selects by covariance
    (the statistics are then logged whatever ``hp.cov_metrics`` says)."""
    if weights is not None:
        loss_mat = loss_mat * torch.where(p.m, weights.to(loss_mat.dtype), 1)
    loss = aggregate(loss_mat, p.m, hp.loss_agg_mode, norm)
    metrics = {"pg_loss": loss.detach(), **metrics}
    if covariance or getattr(hp, "cov_metrics", False):
        metrics.update(cov_metrics(p.cov, p.m, norm, quantiles=False))
    if entropy is not None:
        metrics["entropy"] = _token_sum(entropy.to(p.ratio.dtype), p.m, norm)
    return loss, metrics


PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]
_POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
_LOSS_SELECTION: dict[str, str | None] = {}
get_policy_loss = _POLICY_LOSSES.get
list_policy_losses = _POLICY_LOSSES.names


def register_policy_loss(name: str, *, selects: str | None = None) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: make a loss selectable as ``algorithm.policy_loss=<name>``.

    ``selects`` names the registered selection rule (:mod:`megacov.algorithms.selection`) whose
    chosen tokens the loss receives as ``selected``; the parallel layer computes that choice over
    the whole mini-batch, so a new token-selecting loss is one rule and one loss function.
    """
    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        if selects is not None:
            sel.get_selection_rule(selects)  # fails early, listing the registered rules
        _POLICY_LOSSES.register(name)(fn)
        _LOSS_SELECTION[name] = selects
        return fn
    return deco


def loss_selection(name: str) -> str | None:
    """The selection rule of policy loss ``name`` (None for a loss that selects no tokens)."""
    get_policy_loss(name)
    return _LOSS_SELECTION.get(name)


def _selection_metrics(chosen: torch.Tensor, p: _Prepared, norm: LossNormalizer, dt: torch.dtype
                       ) -> dict[str, Any]:
    """The chosen mask and what the driver logs about it, computed here, on the ranks:
    the count and the covariance sum of the chosen tokens (both add up over micro-batches)."""
    return {"selected": chosen, "selected_count": chosen.sum(),
            "selected_frac": _share(chosen, norm, dt),
            "selected_cov_sum": torch.where(chosen, p.cov, torch.zeros((), dtype=p.cov.dtype,
                                                                       device=p.cov.device)).sum(dtype=torch.float64)}


@register_policy_loss("ppo")
def ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
             response_mask: torch.Tensor, *, norm: LossNormalizer, selected: torch.Tensor | None,
             hp: Any, entropy: torch.Tensor | None = None, weights: torch.Tensor | None = None,
             global_ids: torch.Tensor | None = None, stats: sel.ScopeStats | None = None,
             step: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """PPO-clip with clip-higher (eps_low, eps_high) and optional dual clip c for A < 0.

    per token: l = max(-A r, -A clip(r, 1-eps_low, 1+eps_high)); if c is set and A < 0:
    min(l, -A c). ``selected`` is ignored. Shapes: all [B, T]; returns a 0-dim loss.
    """
    p = _Prepared(log_prob, old_log_prob, advantages, response_mask, global_ids, stats)
    unclipped = -p.adv * p.ratio
    clipped = -p.adv * torch.clamp(p.ratio, 1.0 - hp.clip_ratio_low, 1.0 + hp.clip_ratio_high)
    loss_mat = torch.maximum(unclipped, clipped)
    metrics = {"clipfrac": _share(clipped > unclipped, norm, loss_mat.dtype)}
    if hp.clip_ratio_c is not None:
        dual = -p.adv * hp.clip_ratio_c
        negative = p.adv < 0
        metrics["clipfrac_lower"] = _share(negative & (loss_mat > dual), norm, loss_mat.dtype)
        loss_mat = torch.where(negative, torch.minimum(loss_mat, dual), loss_mat)
    metrics["ppo_kl"] = _share(-p.log_ratio, norm, loss_mat.dtype)
    return _finish(loss_mat, p, norm, hp, weights, entropy, metrics)


@register_policy_loss("clip_cov", selects="clip_cov")
def clip_cov_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  response_mask: torch.Tensor, *, norm: LossNormalizer, selected: torch.Tensor | None,
                  hp: Any, entropy: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                  global_ids: torch.Tensor | None = None, stats: sel.ScopeStats | None = None,
                  step: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """Clip-Cov (Cui et al. 2025): PPO-clip, but a few high-covariance tokens lose their gradient.

    The chosen tokens (``selected``, or chosen here from the whole scope with keys from
    ``(hp.seed, step, global id)``, ``step`` being the pass's key stream of RL step and PPO
    epoch) get loss x 0 and stay in the denominator. No dual clip, as in
    the reference. clipfrac = share of valid tokens PPO clipped or Clip-Cov detached.
    """
    p = _Prepared(log_prob, old_log_prob, advantages, response_mask, global_ids, stats)
    unclipped = -p.adv * p.ratio
    clipped = -p.adv * torch.clamp(p.ratio, 1.0 - hp.clip_ratio_low, 1.0 + hp.clip_ratio_high)
    if selected is None:
        selected = sel.select_clip_cov(log_prob, old_log_prob, advantages, p.m, p.global_ids, p.stats,
                                       hp=hp, step=step, cov=p.cov,
                                       ppo_clipped=(clipped > unclipped).detach() & p.m)
    chosen = selected.bool() & p.m
    ppo_mat = torch.maximum(unclipped, clipped)
    loss_mat = torch.where(chosen, torch.zeros((), dtype=ppo_mat.dtype, device=ppo_mat.device), ppo_mat)
    dt = loss_mat.dtype
    metrics = {
        "clipfrac": _share((clipped > unclipped) | chosen, norm, dt),
        "ppo_kl": _share(-p.log_ratio, norm, dt),
        **_selection_metrics(chosen, p, norm, dt),
    }
    return _finish(loss_mat, p, norm, hp, weights, entropy, metrics, covariance=True)


@register_policy_loss("kl_cov", selects="kl_cov")
def kl_cov_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, *, norm: LossNormalizer, selected: torch.Tensor | None,
                hp: Any, entropy: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                global_ids: torch.Tensor | None = None, stats: sel.ScopeStats | None = None,
                step: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """KL-Cov (Cui et al. 2025): plain policy gradient -A r (no clipping) plus beta |logp - old_logp|
    on the top-k covariance tokens (``selected``, or chosen here from the whole scope).

    Fully on-policy (old_logp == logp) the penalty has zero gradient, so KL-Cov reduces to the
    unclipped policy gradient; :func:`megacov.algorithms.checks.check_algorithm_config` warns.
    """
    p = _Prepared(log_prob, old_log_prob, advantages, response_mask, global_ids, stats)
    if selected is None:
        selected = sel.select_kl_cov(log_prob, advantages, p.m, p.global_ids, p.stats,
                                     kl_cov_ratio=hp.kl_cov_ratio, cov=p.cov)
    chosen = selected.bool() & p.m
    abs_kl = p.log_ratio.abs()
    pg = -p.adv * p.ratio
    loss_mat = torch.where(chosen, pg + hp.kl_cov_coef * abs_kl, pg)
    dt = loss_mat.dtype
    metrics = {
        "clipfrac": torch.zeros((), dtype=dt, device=loss_mat.device),
        "ppo_kl": _share(abs_kl, norm, dt),
        **_selection_metrics(chosen, p, norm, dt),
    }
    return _finish(loss_mat, p, norm, hp, weights, entropy, metrics, covariance=True)


@register_policy_loss("gspo")
def gspo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
              response_mask: torch.Tensor, *, norm: LossNormalizer, selected: torch.Tensor | None,
              hp: Any, entropy: torch.Tensor | None = None, weights: torch.Tensor | None = None,
              global_ids: torch.Tensor | None = None, stats: sel.ScopeStats | None = None,
              step: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): one importance ratio per *sequence*,
    s_i = exp(mean_t (logp - old_logp)) over its valid tokens, clipped to
    [1 - gspo_clip_ratio_low, 1 + gspo_clip_ratio_high] (the paper's 3e-4 / 4e-4).

    Written in the paper's GSPO-token form, s_it = sg(s_i) * pi_t / sg(pi_t), per token
    l = max(-A_t s_it, -A_t clip(s_it)): the value is s_i on every token and, with one advantage
    per sequence and ``loss_agg_mode=seq-mean-token-mean`` (the paper's normalisation), value and
    gradient equal GSPO's exactly; token-level advantages (e.g. entropy shaping) stay meaningful.
    A sequence never spans micro-batches, so the ratio needs no communication.
    """
    p = _Prepared(log_prob, old_log_prob, advantages, response_mask, global_ids, stats)
    lens = p.m.sum(dim=-1, keepdim=True).clamp(min=1).to(p.ratio.dtype)
    seq_log_ratio = (p.log_ratio.sum(dim=-1, keepdim=True) / lens).detach()
    lp = p.masked_log_prob()
    ratio = torch.exp(seq_log_ratio + lp - lp.detach())
    unclipped = -p.adv * ratio
    clipped = -p.adv * torch.clamp(ratio, 1.0 - hp.gspo_clip_ratio_low, 1.0 + hp.gspo_clip_ratio_high)
    loss_mat = torch.maximum(unclipped, clipped)
    dt = loss_mat.dtype
    metrics = {"clipfrac": _share((clipped > unclipped) & p.m, norm, dt),
               "ppo_kl": _share(-p.log_ratio, norm, dt),
               "seq_ratio": _token_sum(torch.exp(seq_log_ratio).expand_as(p.m), p.m, norm)}
    return _finish(loss_mat, p, norm, hp, weights, entropy, metrics)


@register_policy_loss("cispo")
def cispo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
               response_mask: torch.Tensor, *, norm: LossNormalizer, selected: torch.Tensor | None,
               hp: Any, entropy: torch.Tensor | None = None, weights: torch.Tensor | None = None,
               global_ids: torch.Tensor | None = None, stats: sel.ScopeStats | None = None,
               step: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): per token l = -sg(clip(r, 1 - eps_low, 1 + eps_high))
    * A * logp. The importance weight is clipped and detached instead of the update, so every
    token keeps a gradient (PPO drops the clipped ones, often the rare "reflective" tokens).
    Defaults: no lower bound (``cispo_clip_ratio_low=1``), as the paper; clipfrac is the share
    of tokens whose weight was truncated.
    """
    p = _Prepared(log_prob, old_log_prob, advantages, response_mask, global_ids, stats)
    low, high = 1.0 - hp.cispo_clip_ratio_low, 1.0 + hp.cispo_clip_ratio_high
    weight = torch.clamp(p.ratio, low, high).detach()
    loss_mat = -p.adv * weight * p.masked_log_prob()
    dt = loss_mat.dtype
    metrics = {"clipfrac": _share(((p.ratio < low) | (p.ratio > high)) & p.m, norm, dt),
               "ppo_kl": _share(-p.log_ratio, norm, dt)}
    return _finish(loss_mat, p, norm, hp, weights, entropy, metrics)
