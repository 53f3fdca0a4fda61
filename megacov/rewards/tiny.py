"""``tiny``: the exact-answer reward of the embedded addition task (``megacov.tiny``).

The response must be the answer and nothing else (surrounding whitespace aside): the demo measures
whether RL sharpens an exact skill, so partial credit or lenient parsing would blur the curves.
"""
from __future__ import annotations


def tiny_reward(response: str, answer: str) -> float:
    return 1.0 if response.strip() == answer.strip() else 0.0
