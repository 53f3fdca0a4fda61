"""Rewards: answer extraction and math-verify equivalence, the exact-answer tiny reward, custom
``module:function`` rewards, and failures (exceptions, hangs, crashes, NaN) that score 0 and are
counted without stopping the batch."""
from __future__ import annotations

import sys
import textwrap
import time

import pytest

from megacov.config.schema import RewardConfig
from megacov.rewards import RewardManager, RewardSpecError, list_rewards
from megacov.rewards.math import extract_final_answer, math_reward
from megacov.rewards.tiny import tiny_reward


@pytest.mark.parametrize("response, expected", [
    ("so x = \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{3} then \\boxed{4}", "4"),
    ("\\fbox{ 7 }", "7"),
    ("We get 12 and so the final answer is 13.", "13"),
    ("Answer: 2x+1", "2x+1"),
    ("12 apples ... #### 1,000", "1,000"),
    ("I think 3 or maybe 5", "5"),
    ("no digits here", None),
    ("\\boxed{unclosed", None),
])
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


@pytest.mark.parametrize("response, answer, score", [
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac12}", "0.5", 1.0),
    ("The answer is 34.0", "34", 1.0),
    ("\\boxed{x = 2}", "2", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("\\boxed{35}", "34", 0.0),
    ("The answer is 3 and \\boxed{4}", "3", 0.0),
    ("nothing", "3", 0.0),
])
def test_math_reward_equivalence(response, answer, score):
    assert math_reward(response, answer) == score


def test_tiny_reward_is_exact():
    assert tiny_reward("46", "46") == 1.0
    assert tiny_reward(" 46 ", "46") == 1.0
    assert tiny_reward("46.", "46") == 0.0
    assert tiny_reward("4", "46") == 0.0


def test_tiny_parity_reads_the_first_generated_digit():
    from megacov.rewards.tiny import first_digit_even

    assert "tiny_parity" in list_rewards()
    assert [first_digit_even(r, "46") for r in ("46", " 8", "0", "71", "", "x2")] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


FLAKY = textwrap.dedent('''
    import os, time
    def flaky(response, answer, question=""):
        if response == "hang":
            time.sleep(60)
        if response == "boom":
            raise RuntimeError("boom")
        if response == "nan":
            return float("nan")
        if response == "text":
            return "yes"
        if response == "die":
            os._exit(3)
        if response == "q":
            return {"score": float(question == "why")}
        return response == answer
''')


@pytest.fixture
def flaky_module(tmp_path, monkeypatch):
    (tmp_path / "flaky_reward_mod.py").write_text(FLAKY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "flaky_reward_mod:flaky"
    sys.modules.pop("flaky_reward_mod", None)


def test_failures_score_zero_are_counted_and_the_pool_survives(flaky_module):
    mgr = RewardManager(RewardConfig(name=flaky_module, workers=2, timeout_s=1.0))
    try:
        start = time.monotonic()
        responses = ["1", "hang", "boom", "nan", "text", "die", "2", "q", "2"]
        batch = mgr.score(responses, ["1", "1", "1", "1", "1", "1", "2", "x", "3"], ["", "", "", "", "", "", "",
                                                                                       "why", ""])
        assert time.monotonic() - start < 20  # the hang was cut at its 1 s deadline, not slept through
        assert batch.raw.tolist() == [1, 0, 0, 0, 0, 0, 1, 1, 0]
        assert (batch.errors, batch.timeouts) == (4, 1)
        assert batch.metrics() == {"reward/errors": 4.0, "reward/timeouts": 1.0}
        assert batch.correct.tolist() == [True, False, False, False, False, False, True, True, False]
        again = mgr.score(["5", "6"], ["5", "5"], ["", ""])  # replaced workers still serve
        assert again.raw.tolist() == [1, 0] and again.errors == again.timeouts == 0
    finally:
        mgr.close()


def test_in_process_mode_counts_exceptions(flaky_module):
    mgr = RewardManager(RewardConfig(name=flaky_module, workers=0))
    batch = mgr.score(["boom", "1"], ["1", "1"], ["", ""])
    assert batch.raw.tolist() == [0, 1] and batch.errors == 1


def test_overlong_penalty_applies_to_truncated_only():
    mgr = RewardManager(RewardConfig(name="tiny", workers=0, overlong_penalty=0.5))
    batch = mgr.score(["3", "3", "4"], ["3", "3", "3"], ["", "", ""], truncated=[False, True, True])
    assert batch.scores.tolist() == [1.0, 0.5, -0.5] and batch.raw.tolist() == [1.0, 1.0, 0.0]


def test_math_reward_through_the_pool():
    mgr = RewardManager(RewardConfig(name="math", workers=1, timeout_s=10.0))
    try:
        batch = mgr.score(["\\boxed{\\frac{2}{4}}", "\\boxed{7}"], ["0.5", "8"], ["", ""])
        assert batch.raw.tolist() == [1.0, 0.0]
    finally:
        mgr.close()


@pytest.mark.parametrize("name, message", [
    ("nonsense", "neither a registered name"),
    ("no_such_module_xyz:f", "cannot be loaded"),
    ("megacov.rewards.tiny:missing", "cannot be loaded"),
])
def test_bad_reward_names_fail_at_start(name, message):
    with pytest.raises(RewardSpecError, match=message):
        RewardManager(RewardConfig(name=name, workers=0))


def test_registered_names():
    assert {"tiny", "math", "judge"} <= set(list_rewards())
