"""The paper's released Clip-Cov / KL-Cov recipes (examples/paper/) load, validate on their layout and
carry the released settings."""
from __future__ import annotations

import json
import os

import pytest

from megacov.config import load_config
from megacov.config.validate import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(REPO, "examples", "paper")
# The architecture numbers of Qwen2.5-7B that the layout depends on (its config.json, abridged).
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "hidden_size": 3584}


@pytest.mark.parametrize("name,loss", [("qwen2.5-7b-clip-cov.yaml", "clip_cov"),
                                       ("qwen2.5-7b-kl-cov.yaml", "kl_cov")])
def test_released_recipe_validates_with_its_settings(tmp_path, name, loss):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    cfg = load_config(os.path.join(PAPER, name), [f"model.path={tmp_path}"])
    plan = validate(cfg)
    assert (plan.tp, plan.pp, plan.dp, plan.world_size) == (4, 1, 8, 32)
    a = cfg.algorithm
    assert a.policy_loss == loss and a.loss_agg_mode == "token-mean" and a.entropy_coef == 0 and a.kl_coef == 0
    assert cfg.data.batch_size == 256 and cfg.data.mini_batch_size == 32 and cfg.rollout.n == 8
    assert cfg.data.dynamic_sampling and cfg.optim.lr == 1e-6 and a.clip_ratio_c == 10.0
    if loss == "clip_cov":   # released: PPO ratio clipped to [0, 2]; megacov's defaults are 0.2 / 0.28
        assert (a.clip_ratio_low, a.clip_ratio_high) == (1.0, 1.0)
        assert (a.clip_cov_ratio, a.clip_cov_lb, a.clip_cov_ub) == (2e-4, 1.0, 5.0)
    else:
        assert (a.kl_cov_ratio, a.kl_cov_coef) == (2e-3, 1.0)
