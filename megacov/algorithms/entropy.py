"""Entropy controllers: small stateful objects the trainer steps once per RL step.

Each controller turns the measured mean token entropy of the step into the two knobs the loss
has (:class:`Controls`): the entropy-bonus coefficient and lambda, the weight of tokens with a
positive advantage (Positive-Advantage Reweighting, Jin et al. 2025, who find those tokens drive
entropy collapse). The state is a few floats, saved with :meth:`state_dict` in every checkpoint so
a resumed run continues the same schedule.

Order within a step: the trainer measures the entropy H of the batch it is about to train on,
calls ``controls = controller.step(entropy=H, step=k, epoch=e)`` and uses ``controls`` in that
step's losses. The controller first moves its state with H, then returns the values to use, so a
collapse is answered in the same step it is seen.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megacov.algorithms.registry import Registry


@dataclass(frozen=True)
class Controls:
    """What the loss of one step uses: ``entropy_coef`` multiplies the entropy bonus (loss -=
    coef * H), ``positive_weight`` multiplies the loss of tokens with A > 0."""

    entropy_coef: float
    positive_weight: float


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


class EntropyController:
    """Base: a constant entropy coefficient (algorithm.entropy_coef) and lambda = 1."""

    name = "none"

    def __init__(self, hp: Any, total_epochs: int | None = None) -> None:
        self.hp = hp

    def step(self, *, entropy: float, step: int, epoch: int = 1) -> Controls:
        return Controls(entropy_coef=float(self.hp.entropy_coef), positive_weight=1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint holds entropy controller '{state.get('name')}', "
                             f"but algorithm.entropy_control is '{self.name}'")


class AdaptiveEntropyCoef(EntropyController):
    """Adaptive entropy regularisation (Skywork-OR1): c <- clip(c + delta, c_min, c_max) when the
    entropy is below the target, c - delta above it; the bonus is applied only below the target,
    so a healthy entropy is left alone rather than inflated."""

    name = "adaptive"

    def __init__(self, hp: Any, total_epochs: int | None = None) -> None:
        super().__init__(hp)
        self.coef = _clip(float(hp.entropy_coef), hp.entropy_coef_min, hp.entropy_coef_max)

    def step(self, *, entropy: float, step: int, epoch: int = 1) -> Controls:
        below = entropy < self.hp.entropy_target
        delta = self.hp.entropy_coef_delta if below else -self.hp.entropy_coef_delta
        self.coef = _clip(self.coef + delta, self.hp.entropy_coef_min, self.hp.entropy_coef_max)
        return Controls(entropy_coef=self.coef if below else 0.0, positive_weight=1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.coef = float(state["coef"])


class PositiveAdvantageReweighting(EntropyController):
    """PAR: lambda in [0, 1] scales the loss of tokens with A > 0.

    Schedules (algorithm.par_schedule): ``stage`` (lambda fixed per stage of RL steps),
    ``epoch`` (lambda = (e - 1) / (E - 1) for epoch e of E: sharpen little early, fully late) and
    ``entropy`` (lambda <- clip(lambda -/+ par_delta, 0, 1) when the entropy is below/above the
    target). The entropy bonus keeps its constant algorithm.entropy_coef.
    """

    name = "par"

    def __init__(self, hp: Any, total_epochs: int | None = None) -> None:
        super().__init__(hp)
        if hp.par_schedule == "epoch" and (total_epochs is None or total_epochs < 2):
            raise ValueError("algorithm.par_schedule=epoch needs trainer.total_epochs >= 2 "
                             f"(got {total_epochs})")
        self.total_epochs = total_epochs
        self.lam = _clip(float(hp.par_lambda), 0.0, 1.0)

    def _stage_lambda(self, step: int) -> float:
        lambdas = list(self.hp.par_stage_lambdas) or [self.hp.par_lambda]
        stage = sum(1 for boundary in self.hp.par_stage_steps if step >= boundary)
        return float(lambdas[min(stage, len(lambdas) - 1)])

    def step(self, *, entropy: float, step: int, epoch: int = 1) -> Controls:
        schedule = self.hp.par_schedule
        if schedule == "stage":
            self.lam = self._stage_lambda(step)
        elif schedule == "epoch":
            assert self.total_epochs is not None
            self.lam = _clip((epoch - 1) / (self.total_epochs - 1), 0.0, 1.0)
        elif schedule == "entropy":
            delta = -self.hp.par_delta if entropy < self.hp.entropy_target else self.hp.par_delta
            self.lam = _clip(self.lam + delta, 0.0, 1.0)
        else:
            raise ValueError(f"unknown algorithm.par_schedule '{schedule}'; expected one of "
                             f"{', '.join(PAR_SCHEDULES)}")
        return Controls(entropy_coef=float(self.hp.entropy_coef), positive_weight=self.lam)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lambda": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.lam = float(state["lambda"])


PAR_SCHEDULES = ("stage", "epoch", "entropy")

_CONTROLLERS: Registry[Callable[..., EntropyController]] = Registry("entropy controller", {
    "none": EntropyController,
    "adaptive": AdaptiveEntropyCoef,
    "par": PositiveAdvantageReweighting,
})
register_entropy_controller = _CONTROLLERS.register
"""Decorator: make a controller class selectable as ``algorithm.entropy_control=<name>``."""
list_entropy_controllers = _CONTROLLERS.names


def build_entropy_controller(hp: Any, total_epochs: int | None = None) -> EntropyController:
    """The controller named by ``hp.entropy_control`` (an AlgorithmConfig-like object)."""
    return _CONTROLLERS.get(hp.entropy_control)(hp, total_epochs=total_epochs)


def par_weights(advantages: torch.Tensor, mask: torch.Tensor, positive_weight: float) -> torch.Tensor | None:
    """Per-token loss weights [B, T]: lambda where A > 0, 1 elsewhere; None when lambda == 1."""
    if positive_weight == 1.0:
        return None
    one = torch.ones((), dtype=torch.float32, device=advantages.device)
    lam = torch.full((), positive_weight, dtype=torch.float32, device=advantages.device)
    return torch.where(mask.bool() & (advantages > 0), lam, one)
