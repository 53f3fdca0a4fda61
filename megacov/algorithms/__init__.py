"""The math of reasoning-RL: advantages, policy losses, KL estimators and entropy controllers.

Pure torch, no collectives and no global state: tensors in, ``(loss, metrics)`` out. The parallel
layer (:mod:`megacov.parallel`) computes global statistics and token choices and passes them in;
:func:`policy_loss` is the single-scope entry point that treats the tensors passed as everything.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megacov.algorithms.advantages import (  # noqa: F401  (public API)
    compute_advantages,
    get_advantage,
    list_advantages,
    register_advantage,
)
from megacov.algorithms.entropy import (  # noqa: F401
    Controls,
    build_entropy_controller,
    list_entropy_controllers,
    par_weights,
    register_entropy_controller,
)
from megacov.algorithms.kl import kl_estimate, kl_loss, kl_reward_penalty  # noqa: F401
from megacov.algorithms.losses import (  # noqa: F401
    AGG_MODES,
    METRIC_REDUCTIONS,
    LossNormalizer,
    aggregate,
    get_policy_loss,
    list_policy_losses,
    register_policy_loss,
)
from megacov.algorithms.losses import cov_metrics
from megacov.algorithms.objective import actor_loss  # noqa: F401
from megacov.algorithms.selection import covariance, scope_stats
from megacov.config.schema import AlgorithmConfig

_CALL_ARGS = ("step", "entropy", "weights", "global_ids", "max_len")


def algorithm_hparams(**overrides: Any) -> AlgorithmConfig:
    """An AlgorithmConfig with the schema defaults and ``overrides`` (names as in the config)."""
    known = {f.name for f in dataclasses.fields(AlgorithmConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown algorithm hyperparameter(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(known))}")
    return dataclasses.replace(AlgorithmConfig(), **overrides)


def policy_loss(name: str, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, **hparams: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Policy loss ``name`` over tensors [B, T] that form the whole selection scope.

    ``hparams`` are AlgorithmConfig fields (clip_ratio_low, clip_cov_ratio, kl_cov_coef,
    loss_agg_mode, seed, ...; unspecified ones take the schema defaults) plus ``step`` (Clip-Cov
    keys; 0 if absent), ``entropy`` [B, T] (logged), ``weights`` [B, T] (per-token loss
    multipliers, e.g. PAR), ``global_ids`` [B, T] (default: row-major positions) and ``max_len``
    (seq-mean-token-sum-norm constant; default T). Returns the 0-dim loss and its metrics;
    ``metrics["selected"]`` is the chosen-token mask for clip_cov / kl_cov.
    """
    call = {k: hparams.pop(k) for k in _CALL_ARGS if k in hparams}
    hp = algorithm_hparams(**hparams)
    norm = LossNormalizer.from_mask(response_mask, call.pop("max_len", None))
    fn = get_policy_loss(name)
    step = int(call.pop("step", 0))
    loss, metrics = fn(log_prob, old_log_prob, advantages, response_mask, norm=norm, selected=None, hp=hp,
                       step=step, **call)
    if "cov_mean" in metrics:  # one scope: its quantiles describe it (they would not add up over shards)
        m = response_mask.bool()
        stats = scope_stats(log_prob, advantages, m)
        cov = covariance(log_prob, advantages, m, stats.mean_logp, stats.mean_adv)
        metrics.update({k: v for k, v in cov_metrics(cov, m, norm).items() if k not in metrics})
    return loss, metrics
