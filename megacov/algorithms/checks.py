"""Start-up checks of the ``algorithm`` section (and the few other keys it depends on).

Unknown names are errors that list what is registered; settings that run but silently do nothing
useful (KL-Cov fully on-policy, GRPO with one response per prompt) are warnings.
"""
from __future__ import annotations

import warnings
from typing import Any

from megacov.config import ConfigError


def _name_error(key: str, value: str, registered: list[str]) -> ConfigError:
    return ConfigError(f"{key}='{value}' is not registered; registered: {', '.join(registered)}")


def _check_names(a: Any) -> None:
    from megacov.algorithms.advantages import list_advantages
    from megacov.algorithms.entropy import PAR_SCHEDULES, list_entropy_controllers
    from megacov.algorithms.kl import KL_ESTIMATORS
    from megacov.algorithms.losses import AGG_MODES, list_policy_losses
    from megacov.algorithms.rollout_correction import CORRECTION_LEVELS, ROLLOUT_CORRECTIONS

    for key, value, registered in [
        ("algorithm.policy_loss", a.policy_loss, list_policy_losses()),
        ("algorithm.advantage", a.advantage, list_advantages()),
        ("algorithm.entropy_control", a.entropy_control, list_entropy_controllers()),
        ("algorithm.kl_estimator", a.kl_estimator, list(KL_ESTIMATORS)),
        ("algorithm.loss_agg_mode", a.loss_agg_mode, list(AGG_MODES)),
        ("algorithm.par_schedule", a.par_schedule, list(PAR_SCHEDULES)),
        ("algorithm.rollout_correction", a.rollout_correction, list(ROLLOUT_CORRECTIONS)),
        ("algorithm.rollout_correction_level", a.rollout_correction_level, list(CORRECTION_LEVELS)),
    ]:
        if value not in registered:
            raise _name_error(key, value, registered)


def _check_ranges(a: Any, total_epochs: Any) -> None:
    def require(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    require(a.clip_ratio_low >= 0 and a.clip_ratio_high >= 0,
            f"algorithm.clip_ratio_low={a.clip_ratio_low} and clip_ratio_high={a.clip_ratio_high} must be >= 0")
    require(a.clip_ratio_c is None or a.clip_ratio_c > 1,
            f"algorithm.clip_ratio_c={a.clip_ratio_c} must be > 1 (or null to disable dual clip)")
    require(0 < a.clip_cov_ratio <= 1, f"algorithm.clip_cov_ratio={a.clip_cov_ratio} must be in (0, 1]")
    require(a.clip_cov_lb < a.clip_cov_ub,
            f"algorithm.clip_cov_lb={a.clip_cov_lb} must be < algorithm.clip_cov_ub={a.clip_cov_ub}")
    require(0 < a.kl_cov_ratio <= 1, f"algorithm.kl_cov_ratio={a.kl_cov_ratio} must be in (0, 1]")
    require(a.kl_cov_coef >= 0, f"algorithm.kl_cov_coef={a.kl_cov_coef} must be >= 0")
    require(a.kl_coef >= 0, f"algorithm.kl_coef={a.kl_coef} must be >= 0")
    require(a.ppo_epochs >= 1, f"algorithm.ppo_epochs={a.ppo_epochs} must be >= 1")
    require(a.entropy_coef_min <= a.entropy_coef_max,
            f"algorithm.entropy_coef_min={a.entropy_coef_min} must be <= entropy_coef_max={a.entropy_coef_max}")
    require(a.entropy_coef_delta >= 0, f"algorithm.entropy_coef_delta={a.entropy_coef_delta} must be >= 0")
    require(0 <= a.par_lambda <= 1, f"algorithm.par_lambda={a.par_lambda} must be in [0, 1]")
    require(a.par_delta >= 0, f"algorithm.par_delta={a.par_delta} must be >= 0")
    require(a.gspo_clip_ratio_low >= 0 and a.gspo_clip_ratio_high >= 0,
            f"algorithm.gspo_clip_ratio_low={a.gspo_clip_ratio_low} and gspo_clip_ratio_high="
            f"{a.gspo_clip_ratio_high} must be >= 0")
    require(0 <= a.cispo_clip_ratio_low <= 1 and a.cispo_clip_ratio_high >= 0,
            f"algorithm.cispo_clip_ratio_low={a.cispo_clip_ratio_low} must be in [0, 1] and "
            f"cispo_clip_ratio_high={a.cispo_clip_ratio_high} >= 0")
    require(a.entropy_top_ratio is None or 0 < a.entropy_top_ratio <= 1,
            f"algorithm.entropy_top_ratio={a.entropy_top_ratio} must be in (0, 1] (or null to disable)")
    require(a.entropy_top_ratio is None or a.cov_scope != "global_old",
            "algorithm.entropy_top_ratio needs cov_scope global (exact) or micro_batch: the batch carries "
            "no old-policy entropies for global_old")
    require(a.entropy_advantage_coef >= 0 and a.entropy_advantage_kappa > 0,
            f"algorithm.entropy_advantage_coef={a.entropy_advantage_coef} must be >= 0 and "
            f"entropy_advantage_kappa={a.entropy_advantage_kappa} > 0")
    require(a.rollout_is_cap > 0, f"algorithm.rollout_is_cap={a.rollout_is_cap} must be > 0")
    require(0 <= a.rollout_mis_low < 1 < a.rollout_mis_high,
            f"algorithm.rollout_mis_low={a.rollout_mis_low} and rollout_mis_high={a.rollout_mis_high} "
            "must satisfy 0 <= low < 1 < high")
    if a.entropy_control == "par" and a.par_schedule == "stage":
        steps, lams = list(a.par_stage_steps), list(a.par_stage_lambdas)
        require(not lams or len(lams) == len(steps) + 1,
                f"algorithm.par_stage_lambdas needs one more entry than par_stage_steps "
                f"({len(lams)} vs {len(steps)})")
        require(all(0 <= x <= 1 for x in lams), f"algorithm.par_stage_lambdas={lams} must lie in [0, 1]")
        require(steps == sorted(set(steps)), f"algorithm.par_stage_steps={steps} must be strictly increasing")
    if a.entropy_control == "par" and a.par_schedule == "epoch":
        require(total_epochs is not None and total_epochs >= 2,
                f"algorithm.par_schedule=epoch needs trainer.total_epochs >= 2 (got {total_epochs})")


def _warnings(cfg: Any) -> list[str]:
    a, out = cfg.algorithm, []
    on_policy = cfg.data.batch_size == cfg.data.mini_batch_size and a.ppo_epochs == 1
    if a.policy_loss == "kl_cov" and on_policy:
        out.append("algorithm.policy_loss=kl_cov runs fully on-policy (data.batch_size == data.mini_batch_size "
                   "and algorithm.ppo_epochs == 1): old_logp == logp, so the |logp - old_logp| penalty has zero "
                   "gradient and KL-Cov reduces to the unclipped policy gradient; use several mini-batches "
                   "or ppo_epochs > 1")
    if a.advantage in ("grpo", "rloo") and cfg.rollout.n == 1:
        out.append(f"algorithm.advantage={a.advantage} with rollout.n=1: every group has one response, "
                   "so every advantage is 0 and nothing is learned")
    if a.use_kl_in_reward and a.kl_coef == 0:
        out.append("algorithm.use_kl_in_reward=true has no effect while algorithm.kl_coef=0")
    if a.policy_loss == "gspo" and a.loss_agg_mode != "seq-mean-token-mean":
        out.append(f"algorithm.policy_loss=gspo with loss_agg_mode={a.loss_agg_mode}: the paper's objective "
                   "averages the sequence terms (loss_agg_mode=seq-mean-token-mean)")
    if a.entropy_control == "adaptive" and a.entropy_coef_max == 0:
        out.append("algorithm.entropy_control=adaptive with entropy_coef_max=0 never applies an entropy bonus")
    return out


def check_algorithm_config(cfg: Any) -> list[str]:
    """Raise ConfigError for unknown names or impossible values; return warnings (strings).

    ``cfg`` is a MegacovConfig (the data, rollout and trainer sections are read too).
    """
    _check_names(cfg.algorithm)
    _check_ranges(cfg.algorithm, cfg.trainer.total_epochs)
    return _warnings(cfg)


def warn_algorithm_config(cfg: Any) -> list[str]:
    """check_algorithm_config, emitting each warning through ``warnings.warn`` (used by validate)."""
    found = check_algorithm_config(cfg)
    for message in found:
        warnings.warn(message, UserWarning, stacklevel=2)
    return found
