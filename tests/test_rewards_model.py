"""``reward.name=model``: a scalar reward model scores like a plain transformers forward, in batches,
normalises by running statistics, combines with a rule reward, and refuses bad checkpoints in one line."""
from __future__ import annotations

import math

import pytest
import torch

from megacov.config.schema import RewardConfig
from megacov.rewards import RewardManager, RewardSpecError
from megacov.rewards.model import RunningNorm, check_reward_model


def _seq_cls(tmp_path, name: str, num_labels: int = 1, vocab_extra: bool = False) -> str:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from megacov.tiny import build_model, build_tokenizer

    base = build_model(str(tmp_path / f"{name}-base"), num_layers=1, hidden_size=64, intermediate_size=64)
    cfg = AutoConfig.from_pretrained(base, num_labels=num_labels)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    out = str(tmp_path / name)
    model.save_pretrained(out)
    tok = build_tokenizer()
    if vocab_extra:
        tok.add_tokens(["<extra>"])
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return _seq_cls(tmp_path_factory.mktemp("rm"), "rm")


QUESTIONS = ["12+7=", "3+4=", "40+2=", "1+1=", "99+1=", "5+5="]
RESPONSES = ["19", "8 maybe", "42", "", "100 is the answer", "ten"]


def test_scores_equal_plain_transformers_forward(rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    mgr = RewardManager(RewardConfig(name="model", model_path=rm_dir, model_batch_size=4, workers=0))
    got = mgr.score(RESPONSES, [""] * 6, QUESTIONS).scores
    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # one text at a time, no padding: nothing for batching to get wrong
        ref = [float(model(**tok(q + r, return_tensors="pt")).logits[0, 0]) for q, r in zip(QUESTIONS, RESPONSES)]
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-5
    assert max(ref) - min(ref) > 1e-2  # the texts really score differently


def test_normalisation_and_rule_combination(rm_dir):
    plain = RewardManager(RewardConfig(name="model", model_path=rm_dir, workers=0))
    raw = list(plain.score(RESPONSES, [""] * 6, QUESTIONS).scores)
    norm = RewardManager(RewardConfig(name="model", model_path=rm_dir, workers=0, model_normalize=True))
    first = list(norm.score(RESPONSES[:4], [""] * 4, QUESTIONS[:4]).scores)
    second = list(norm.score(RESPONSES[4:], [""] * 2, QUESTIONS[4:]).scores)
    mean = sum(raw) / 6
    std = math.sqrt(sum((x - mean) ** 2 for x in raw) / 6)
    assert max(abs(a - (b - mean) / (std + 1e-6)) for a, b in zip(second, raw[4:])) < 1e-5
    m4 = sum(raw[:4]) / 4
    s4 = math.sqrt(sum((x - m4) ** 2 for x in raw[:4]) / 4)
    assert max(abs(a - (b - m4) / (s4 + 1e-6)) for a, b in zip(first, raw[:4])) < 1e-5
    combo = RewardManager(RewardConfig(name="model", model_path=rm_dir, workers=0, rule="tiny",
                                       model_weight=0.5, rule_weight=2.0))
    answers = ["19", "7", "42", "2", "100", "10"]
    got = combo.score(RESPONSES, answers, QUESTIONS).scores
    from megacov.rewards.tiny import tiny_reward

    want = [0.5 * r + 2.0 * float(tiny_reward(resp, a)) for r, resp, a in zip(raw, RESPONSES, answers)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5


def test_running_norm_state_round_trip(rm_dir):
    a, b = RunningNorm(), RunningNorm()
    a.update([1.0, 2.0, 5.0])
    b.load_state_dict(a.state_dict())
    assert b.normalise([3.0]) == a.normalise([3.0])
    cfg = RewardConfig(name="model", model_path=rm_dir, workers=0, model_normalize=True)
    first, resumed = RewardManager(cfg), RewardManager(cfg)
    first.score(RESPONSES[:3], [""] * 3, QUESTIONS[:3])
    import json

    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # travels in trainer_state.json
    assert list(first.score(RESPONSES[3:], [""] * 3, QUESTIONS[3:]).scores) == \
        list(resumed.score(RESPONSES[3:], [""] * 3, QUESTIONS[3:]).scores)
    assert RewardManager(RewardConfig(name="tiny", workers=0)).state_dict() == {}


def test_bad_reward_models_fail_in_one_line(tmp_path, rm_dir):
    from megacov.tiny import build_model

    actor = build_model(str(tmp_path / "actor"), num_layers=1, hidden_size=64, intermediate_size=64)
    check_reward_model(RewardConfig(name="model", model_path=rm_dir), actor)  # fine
    two = _seq_cls(tmp_path, "two-labels", num_labels=2)
    with pytest.raises(RewardSpecError, match="not a scalar reward model") as e:
        check_reward_model(RewardConfig(name="model", model_path=two), actor)
    assert "\n" not in str(e.value)
    with pytest.raises(RewardSpecError, match="not a scalar reward model"):
        check_reward_model(RewardConfig(name="model", model_path=actor), actor)  # a causal LM, no head
    other = _seq_cls(tmp_path, "other-tok", vocab_extra=True)
    with pytest.raises(RewardSpecError, match="tokenizer differs from the actor's") as e:
        check_reward_model(RewardConfig(name="model", model_path=other), actor)
    assert "\n" not in str(e.value)
    with pytest.raises(RewardSpecError, match="needs reward.model_path"):
        check_reward_model(RewardConfig(name="model"), actor)


@pytest.mark.slow
def test_served_by_its_own_worker_group(rm_dir):
    """reward.model_workers=2: two Ray ranks score contiguous blocks; same scores as in-process."""
    import ray

    from megacov.rewards.model import RemoteRewardModel

    local = RewardManager(RewardConfig(name="model", model_path=rm_dir, workers=0, model_normalize=True))
    want = [list(local.score(RESPONSES[:5], [""] * 5, QUESTIONS[:5]).scores),
            list(local.score(RESPONSES[5:], [""] * 1, QUESTIONS[5:]).scores)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        from megacov.runtime.core import worker_env

        cfg = RewardConfig(name="model", model_path=rm_dir, workers=0, model_normalize=True, model_workers=2)
        mgr = RewardManager(cfg, model=RemoteRewardModel(cfg, worker_env()))
        try:
            got = [list(mgr.score(RESPONSES[:5], [""] * 5, QUESTIONS[:5]).scores),
                   list(mgr.score(RESPONSES[5:], [""] * 1, QUESTIONS[5:]).scores)]
        finally:
            mgr.close()
    finally:
        ray.shutdown()
    assert all(max(abs(a - b) for a, b in zip(g, w)) <= 1e-5 for g, w in zip(got, want))
