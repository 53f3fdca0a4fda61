"""Outcome rewards, chosen by ``reward.name``: a registered name or ``module:function``.

A reward function is ``fn(response: str, answer: str[, question: str]) -> float`` (a bool, or a
dict with a ``score`` entry, also works). Built in: ``tiny`` (exact answer of the demo task), ``explore`` (the entropy demo's task:
partial credit for a valid answer, full credit for a rarer one, :mod:`megacov.tasks.explore`),
``math`` (final answer checked with math-verify) and ``judge`` (a judge model's probability of the
"correct" verdict, :mod:`megacov.rewards.judge`). Rule-based functions run in a process pool with a
per-call timeout (:mod:`megacov.rewards.pool`); ``reward.workers=0`` runs them in-process instead
(cheaper, but a hang cannot be stopped).

:class:`RewardManager` is what the trainer calls: it scores a batch, applies the overlong penalty and
counts failures, which become the ``reward/errors`` and ``reward/timeouts`` metrics.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from megacov.rewards.pool import Outcome, RewardPool, RewardSpecError, call_reward, resolve

log = logging.getLogger(__name__)

_REGISTRY: dict[str, str] = {
    "tiny": "megacov.rewards.tiny:tiny_reward",
    "tiny_parity": "megacov.rewards.tiny:first_digit_even",
    "math": "megacov.rewards.math:math_reward",
    "explore": "megacov.rewards.explore:explore_reward",
}

#: A response whose reward is above this counts as correct in ``reward/acc`` and ``val/*``.
CORRECT_THRESHOLD = 0.5


def register_reward(name: str, spec: str) -> None:
    """Make ``module:function`` selectable as ``reward.name=<name>``."""
    if name in _REGISTRY and _REGISTRY[name] != spec:
        raise ValueError(f"reward '{name}' is already registered as {_REGISTRY[name]}")
    _REGISTRY[name] = spec


def list_rewards() -> list[str]:
    return sorted([*_REGISTRY, "judge", "model"])


def reward_spec(name: str) -> str:
    """``module:function`` of a rule-based reward (registered name or spec)."""
    return _REGISTRY.get(name, name)


@dataclass
class RewardBatch:
    """Scores of one batch. ``raw`` is what the function returned (0 for failures); ``scores`` adds
    the overlong penalty and is what advantages are computed from."""

    scores: np.ndarray
    raw: np.ndarray
    correct: np.ndarray
    errors: int = 0
    timeouts: int = 0
    failures: list[str] = field(default_factory=list)

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        return {f"{prefix}/errors": float(self.errors), f"{prefix}/timeouts": float(self.timeouts)}


class RewardManager:
    """Scores responses with the configured reward; one instance per run (the pool is reused)."""

    def __init__(self, reward_cfg: Any, judge: Optional[Any] = None, model: Optional[Any] = None) -> None:
        self.cfg = reward_cfg
        self.judge = judge
        self._pool: Optional[RewardPool] = None
        self._fn: Optional[Callable[..., Any]] = None
        self.model: Optional[Any] = None
        if reward_cfg.name == "judge":
            if judge is None:
                raise RewardSpecError("reward.name=judge needs a judge (reward.judge_model)")
            return
        if reward_cfg.name == "model":  # scalar reward model, optionally plus a rule reward
            self.model = model if model is not None else _scalar_model(reward_cfg)
            if not reward_cfg.rule:
                return
        spec = reward_spec(reward_cfg.rule if self.model is not None else reward_cfg.name)
        self._fn = resolve(spec)  # fail at start-up, in the driver, on a bad name
        if reward_cfg.workers > 0:
            self._pool = RewardPool(spec, reward_cfg.workers, reward_cfg.timeout_s)

    def _outcomes(self, responses: Sequence[str], answers: Sequence[str],
                  questions: Sequence[str]) -> list[Outcome]:
        if self.judge is not None:
            return self.judge.score(responses, answers, questions)
        if self.model is not None:
            return self._model_outcomes(responses, answers, questions)
        return self._rule_outcomes(responses, answers, questions)

    def _model_outcomes(self, responses: Sequence[str], answers: Sequence[str],
                        questions: Sequence[str]) -> list[Outcome]:
        from megacov.rewards.model import combine

        assert self.model is not None
        scores = self.model.scores([q + r for q, r in zip(questions, responses)])
        rule = self._rule_outcomes(responses, answers, questions) if self._fn is not None else None
        return combine(scores, rule, model_weight=self.cfg.model_weight, rule_weight=self.cfg.rule_weight)

    def _rule_outcomes(self, responses: Sequence[str], answers: Sequence[str],
                       questions: Sequence[str]) -> list[Outcome]:
        tasks = list(zip(responses, answers, questions))
        if self._pool is not None:
            return self._pool.map(tasks)
        out = []
        assert self._fn is not None
        for task in tasks:
            try:
                out.append(Outcome(call_reward(self._fn, *task), "ok"))
            except Exception as exc:  # noqa: BLE001 - a failing reward scores 0 and is counted
                out.append(Outcome(0.0, "error", f"{type(exc).__name__}: {exc}"[:300]))
        return out

    def score(self, responses: Sequence[str], answers: Sequence[str], questions: Sequence[str],
              truncated: Optional[Sequence[bool]] = None) -> RewardBatch:
        outcomes = self._outcomes(responses, answers, questions)
        raw = np.array([o.score for o in outcomes], dtype=np.float64)
        scores = raw.copy()
        if truncated is not None and self.cfg.overlong_penalty:
            scores -= self.cfg.overlong_penalty * np.asarray(truncated, dtype=np.float64)
        batch = RewardBatch(scores=scores, raw=raw, correct=raw > CORRECT_THRESHOLD,
                            errors=sum(o.status == "error" for o in outcomes),
                            timeouts=sum(o.status == "timeout" for o in outcomes),
                            failures=[o.detail for o in outcomes if o.status != "ok"][:5])
        if batch.errors or batch.timeouts:
            log.warning("reward: %d error(s), %d timeout(s) scored 0, e.g. %s", batch.errors, batch.timeouts,
                        batch.failures[0])
        return batch

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to score identically: the reward model's running normaliser."""
        norm = getattr(self.model, "norm", None)
        return {"model_norm": norm.state_dict()} if norm is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        norm = getattr(self.model, "norm", None)
        if norm is not None and "model_norm" in state:
            norm.load_state_dict(state["model_norm"])

    def close(self) -> None:
        if self.model is not None and hasattr(self.model, "close"):
            self.model.close()
        self.model = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _scalar_model(reward_cfg: Any) -> Any:
    from megacov.rewards.model import ScalarRewardModel

    if not reward_cfg.model_path:
        raise RewardSpecError("reward.name=model needs reward.model_path (an HF sequence-classification directory)")
    return ScalarRewardModel(reward_cfg.model_path, batch_size=reward_cfg.model_batch_size,
                             normalize=reward_cfg.model_normalize)


__all__ = ["CORRECT_THRESHOLD", "Outcome", "RewardBatch", "RewardManager", "RewardPool", "RewardSpecError",
           "list_rewards", "register_reward", "reward_spec", "resolve"]
