"""The embedded exploration task, its reward, the per-step diversity metrics and the warm-start
cache key (content, not paths)."""
from __future__ import annotations

import json
import os
import shutil
import types

import numpy as np
import pytest
import torch

from megacov.analysis.diversity import diversity_metrics, entropy_by_position, group_diversity
from megacov.rewards import RewardManager, reward_spec
from megacov.tasks.explore import (
    PARTIAL_CREDIT,
    RESPONSE_DIGITS,
    ExploreSpec,
    bonus_strings,
    explore_score,
    split_prompts,
    task_rows,
    warm_start_rates,
    write_explore_data,
)


def test_reward_partial_full_and_invalid():
    assert explore_score("11111111", "8|31") == PARTIAL_CREDIT < 0.5   # valid, no bonus: below "correct"
    assert explore_score("31111010", "8|31") == 1.0          # valid with the bonus pair
    assert explore_score(" 31111010\n", "8|31") == 1.0       # surrounding whitespace is not a decision
    assert explore_score("31111011", "8|31") == 0.0          # wrong sum, bonus or not
    assert explore_score("1111111", "7|31") == 0.0           # seven digits
    assert explore_score("111111110", "8|31") == 0.0         # nine digits
    assert explore_score("1111111a", "7|31") == 0.0
    rm = RewardManager(types.SimpleNamespace(name="explore", workers=0, timeout_s=1.0, overlong_penalty=0.0))
    batch = rm.score(["31111010", "11111111", "x"], ["8|31"] * 3, ["q"] * 3)
    # the valid sum earns partial credit; only the bonus on top is correct
    assert batch.raw.tolist() == [1.0, PARTIAL_CREDIT, 0.0] and batch.correct.tolist() == [True, False, False]
    assert reward_spec("explore") == "megacov.rewards.explore:explore_reward"


def test_task_has_many_answers_recurring_prompts_and_common_and_rare_bonuses(tmp_path):
    spec = ExploreSpec()
    rows = task_rows(spec)
    train, held = split_prompts(spec)
    assert len(rows["train"]) == len(train) == 42 and len(rows["eval"]) == len(held) == 18
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["eval"]}
    assert {p[0] for p in held} == set(spec.keys)  # every key is evaluated on targets it never trained on
    pairs = bonus_strings(spec)
    assert sorted(pairs.values()) == sorted(spec.bonus_strings)
    for key, target in train + held:   # every prompt can earn full credit
        assert explore_score(sample_with(pairs[key], target), f"{target}|{pairs[key]}") == 1.0
    # many distinct valid answers per prompt in the warm-start data, each at least 8 decision tokens
    by_prompt: dict[str, set] = {}
    for r in rows["sft"]:
        by_prompt.setdefault(r["prompt"], set()).add(r["answer"])
        assert len(r["answer"]) == RESPONSE_DIGITS
    assert min(len(v) for v in by_prompt.values()) >= 20
    rates = warm_start_rates(spec)
    assert 0.7 < rates["valid"] < 0.9          # imperfect: a fifth is off by one
    common = [rates[f"full/{b}"] for b in ("111", "222", "00")]   # sharpening finds these
    rare = [rates[f"full/{b}"] for b in ("31", "13", "30")]       # present, but kept only by exploring
    assert min(common) > max(rare) and min(rare) > 0.01
    # deterministic and atomic; a second call keeps the files
    paths = write_explore_data(str(tmp_path / "d"), spec)
    def contents(files):
        out = {}
        for k, p in files.items():
            with open(p) as fh:
                out[k] = fh.read()
        return out

    first = contents(paths)
    os.utime(paths["train"], (1, 1))
    assert contents(write_explore_data(str(tmp_path / "d"), spec)) == first
    # files written from another spec (an older task) are regenerated, not silently reused
    other = contents(write_explore_data(str(tmp_path / "d"), ExploreSpec(seed=3)))
    assert other != first and contents(write_explore_data(str(tmp_path / "d"), spec)) == first
    assert json.loads(first["train"].splitlines()[0])["answer"].count("|") == 1
    # a different seed hides the bonus elsewhere
    assert task_rows(ExploreSpec(seed=3))["train"] != rows["train"]


def sample_with(bonus: str, target: int) -> str:
    """Eight digits with the given sum that hold ``bonus`` (the bonus first, the rest filled greedily)."""
    rest = target - sum(int(c) for c in bonus)
    digits = []
    for _ in range(RESPONSE_DIGITS - len(bonus)):
        d = min(9, rest)
        digits.append(d)
        rest -= d
    assert rest == 0
    return bonus + "".join(map(str, digits))


def test_group_diversity_counts_distinct_pass_and_avg():
    texts = ["11111111", "11111111", "31111010", "x",        # group 0: 3 distinct, 2 rewarded, 1 correct
             "22220000", "22220000", "22220000", "22220000"]  # group 1: collapsed on one answer
    raw = np.array([0.5, 0.5, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    out = group_diversity(texts, raw, raw > 0.5, 4)
    assert out["div/distinct"] == pytest.approx(2.0)            # (3 + 1) / 2
    assert out["div/distinct_rewarded"] == pytest.approx(1.5)   # (2 + 1) / 2
    assert out["div/distinct_correct"] == pytest.approx(0.5)    # (1 + 0) / 2
    assert out["div/pass@4"] == pytest.approx(0.5) and out["div/avg@4"] == pytest.approx(1 / 8)
    assert out["div/rewarded_rate"] == pytest.approx(7 / 8)
    with pytest.raises(ValueError):
        group_diversity(texts[:7], raw[:7], raw[:7] > 0.5, 4)


def test_entropy_by_position_follows_each_rows_response_start():
    # row 0: prompt of 2 tokens, 3 response tokens; row 1: prompt of 1 token, 2 response tokens
    positions = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    entropy = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0], [9.0, 5.0, 6.0, 9.0, 9.0]])
    out = entropy_by_position(entropy, positions)
    assert out == {"entropy/pos_0": 3.0, "entropy/pos_1": 4.0, "entropy/pos_2": 3.0}
    assert list(entropy_by_position(entropy, positions, max_positions=1)) == ["entropy/pos_0"]
    ro = types.SimpleNamespace(n=2, flat=lambda name: ["1", "2"], array=lambda name: np.array([1.0, 0.0]))
    both = diversity_metrics(ro, entropy, positions)
    assert both["div/pass@2"] == 1.0 and both["entropy/pos_1"] == 4.0


def test_warm_start_cache_key_is_content_not_path(tmp_path):
    from megacov.config import load_config
    from megacov.tasks.explore import build_explore_example
    from megacov.trainer.sft import cache_key

    paths = build_explore_example(str(tmp_path / "m1"), str(tmp_path / "d1"))
    shutil.copytree(tmp_path / "m1", tmp_path / "m2")
    shutil.copytree(tmp_path / "d1", tmp_path / "d2")
    plan = types.SimpleNamespace(tp=2, pp=1, dp=1)

    def key(model: str, data: str, *extra: str) -> str:
        cfg = load_config(None, [f"model.path={tmp_path / model}", f"data.sft_files=[{tmp_path / data / 'sft.jsonl'}]",
                                 "trainer.sft_steps=10", *extra])
        return cache_key(cfg, plan)

    base = key("m1", "d1")
    # The RL schedule is not the warm-start's (it trains at a constant sft_lr) ...
    assert key("m1", "d1", "optim.lr_decay_style=cosine", "optim.min_lr=1e-7", "optim.lr_warmup_steps=3") == base
    assert key("m1", "d1", "trainer.sft_lr=1e-4") != base   # ... but its own rate and Adam settings are
    assert key("m1", "d1", "optim.adam_beta2=0.99") != base
    assert key("m2", "d2") == base                     # byte-identical copies elsewhere: same warm-start
    os.utime(os.path.join(paths["model"], "config.json"), (1, 1))
    assert key("m1", "d1") == base                     # touched, not changed
    with open(tmp_path / "d2" / "sft.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt": "a6=", "answer": "11111100"}) + "\n")
    assert key("m2", "d2") != base                     # different data: a different warm-start
