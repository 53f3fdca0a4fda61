"""``tools/value_ceiling.py``: the Bayes-optimal value of each state and the explained variance it yields.

A stub policy with known next-token probabilities and scripted samples, so every value is checked by hand.
"""
from __future__ import annotations

import importlib.util
import math
import os
import types

import torch

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "value_ceiling.py")
spec = importlib.util.spec_from_file_location("value_ceiling", TOOL)
value_ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(value_ceiling)

EOS, PAD = 4, 0


class StubTokenizer:
    eos_token_id, pad_token_id = EOS, PAD

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [{"a": 1, "b": 2}[c] for c in text]}


class StubPolicy:
    """P(answer token 'b' after the prompt) = 0.5, P(EOS after it) = 0.8; ``generate`` replays scripted rows."""

    def __init__(self, rows):
        self.rows = rows

    def __call__(self, ids):
        logits = torch.full((1, ids.shape[1], 5), -1e9)
        logits[0, 0, 2], logits[0, 0, 3] = 0.0, 0.0                      # b or c: one half each
        logits[0, 1, EOS], logits[0, 1, 2] = math.log(0.8), math.log(0.2)
        return types.SimpleNamespace(logits=logits)

    def generate(self, prompts, **_):
        return torch.tensor(self.rows)


def test_best_value_is_the_probability_of_still_ending_exactly_right():
    rows = [[1, 2, EOS, PAD], [1, 3, EOS, PAD], [1, 2, 2, EOS]]
    out = value_ceiling.sample(StubPolicy(rows), StubTokenizer(), [{"prompt": "a", "answer": "b"}], n=3, max_new=3, seed=0)
    (ids, r0, y0, v0), (_, r1, y1, v1), (_, r2, y2, v2) = out
    assert ids == [1] and r0 == [2, EOS] and r1 == [3, EOS] and r2 == [2, 2, EOS]   # cut at the first EOS
    assert (y0, y1, y2) == (1.0, 0.0, 0.0)
    # before any token: 0.5 * 0.8; after the right first token: 0.8; once off the answer: 0
    assert torch.allclose(torch.tensor(v0), torch.tensor([0.4, 0.8]))
    assert torch.allclose(torch.tensor(v1), torch.tensor([0.4, 0.0]))
    assert torch.allclose(torch.tensor(v2), torch.tensor([0.4, 0.8, 0.0]))


def test_explained_variance():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert value_ceiling.ev(r, r) == 1.0
    assert value_ceiling.ev(r, torch.full_like(r, 0.5)) == 0.0
    assert value_ceiling.ev(r, 1 - r) == -3.0      # worse than the mean: negative, as the trainer's metric
