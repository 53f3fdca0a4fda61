"""``explore``: the reward of the embedded exploration task (:mod:`megacov.tasks.explore`).

0 for anything but eight digits with the target sum, 0.6 for such a string, 1.0 when it also holds
the prompt key's hidden bonus string. Both count as correct (``reward/acc``, ``val/acc``: a valid
answer); ``reward/full`` is the full-credit rate.
"""
from __future__ import annotations

from megacov.tasks.explore import explore_score


def explore_reward(response: str, answer: str) -> float:
    return explore_score(response, answer)
