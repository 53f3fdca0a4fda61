"""The ``critic`` section and the GAE / reward-model settings at start-up: the dry run shows the
critic and the reward model, and bad values fail in one line with exit code 2."""
from __future__ import annotations

import pytest

from megacov.config import load_config
from megacov.critic.plan import placement_lines

EXAMPLE = "examples/tiny/ppo-gae.yaml"


def test_dry_run_shows_critic(capsys):
    from megacov.cli import main

    assert main(["train", EXAMPLE, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "critic (DeepSpeed ZeRO-2): 1 rank(s)" in out and "config, layout, reward and data OK" in out


def test_placement_lines_reward_model_and_offload():
    cfg = load_config(EXAMPLE, ["critic.zero_stage=3", "critic.offload_optimizer=true", "critic.world_size=2",
                                "reward.name=model", "reward.model_path=/rm", "reward.rule=tiny",
                                "reward.rule_weight=0.5", "reward.model_normalize=true",
                                "reward.model_workers=0"])
    lines = placement_lines(cfg)
    assert lines[0].startswith("critic (DeepSpeed ZeRO-3, optimizer state offloaded to CPU): 2 rank(s)")
    assert lines[1].startswith("reward model (HF sequence classification, in the driver): /rm")
    assert "0.5 x rule 'tiny'" in lines[1] and "running-normalised" in lines[1]
    assert placement_lines(load_config(EXAMPLE, ["algorithm.advantage=grpo"])) == []


@pytest.mark.parametrize("override,message", [
    ("critic.zero_stage=1", "critic.zero_stage=1 must be 2 or 3"),
    ("critic.micro_batch_size=5", "does not divide the 64 sequences of a mini-batch"),
    ("critic.world_size=3", "does not divide"),
    ("algorithm.gamma=0", "algorithm.gamma=0"),
    ("algorithm.lam=1.5", "algorithm.lam=1.5"),
    ("algorithm.gae_whiten=batch", "algorithm.gae_whiten='batch'"),
    ("critic.warmup_steps=40", "critic.warmup_steps=40"),
    ("reward.name=model", "reward.name=model needs reward.model_path"),
    ("parallel.num_gpus=2", "the critic needs critic.world_size=1 GPU(s) beside the 2"),
])
def test_bad_settings_exit_2(override, message, capsys):
    from megacov.cli import main

    assert main(["train", EXAMPLE, override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0
