"""``tiny``: the exact-answer reward of the embedded addition task (``megacov.tiny``).

The response must be the answer and nothing else (surrounding whitespace aside): the demo measures
whether RL sharpens an exact skill, so partial credit or lenient parsing would blur the curves.
"""
from __future__ import annotations


def tiny_reward(response: str, answer: str) -> float:
    return 1.0 if response.strip() == answer.strip() else 0.0


def first_digit_even(response: str, answer: str) -> float:
    """``tiny_parity``: 1 when the response starts with an even digit. A check of the PPO critic, not
    a skill: the first generated token decides the reward, so a critic that reads the response can
    predict it exactly from the second token on, which the addition reward does not allow a tiny
    backbone (see ``tools/value_ceiling.py``)."""
    del answer
    head = response.strip()[:1]
    return 1.0 if head != "" and head in "02468" else 0.0
