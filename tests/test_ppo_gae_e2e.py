"""PPO-GAE end to end on CPU: the Megatron actor (gloo), a vLLM engine, and the DeepSpeed critic
(ZeRO-2, two ranks on gloo) in its own Ray worker group, in the real loop.

* A 3-step run (the first step trains the critic only): critic metrics present and finite, the
  critic saved inside every checkpoint, the actor untouched during the critic warm-up.
* The same run killed with SIGKILL mid-step and resumed: metrics, the exported actor and the final
  critic weights equal the uninterrupted run's bit for bit.
"""
from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch
from conftest import (
    DIGITS_REWARD,
    metric_rows,
    safetensors_dir,
    stable_metrics,
    task_overrides,
    tiny_task,
    train_cli,
    train_example,
)

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ("trainer.total_steps=3", "checkpoint.save_every=1", "critic.warmup_steps=1", "critic.world_size=2",
       "critic.micro_batch_size=4", "critic.lr=1e-3")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from tiny_task(str(tmp_path_factory.mktemp("ppo-tiny")), "dense_gae_mod", DIGITS_REWARD)


def _overrides(tiny, name, *extra):
    return [*task_overrides(tiny, name), "logging.plot=false",
            "reward.name=dense_gae_mod:digits", "reward.workers=0", "data.batch_size=4", "data.mini_batch_size=4",
            "rollout.n=4", "parallel.tp=1", "parallel.micro_batch_size=4", "rollout.max_response_len=6",
            "trainer.eval_every=0", "rollout.mismatch_sample=4", "optim.lr=1e-3", *RUN, *extra]


@pytest.fixture(scope="module")
def straight(ray_cluster, tiny):
    train_example("ppo-gae.yaml", _overrides(tiny, "gae"))
    return os.path.join(tiny["root"], "runs", "gae")


def test_ppo_gae_run(straight):
    rows = metric_rows(straight)
    assert sorted(rows) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("critic/value_loss", "critic/vf_clipfrac", "critic/return_mean", "critic/value_mean",
                    "critic/grad_norm"):
            assert math.isfinite(rows[step][key]), (step, key)
        assert rows[step]["critic/updates"] == 2  # critic.ppo_epochs=2 of the example, one 16-row mini-batch
        assert "critic/explained_var_last" in rows[step]
    assert "actor/pg_loss" not in rows[1] and "actor/pg_loss" in rows[2]  # step 1: critic warm-up only
    ckpt = os.path.join(straight, "checkpoints", "step_00000003", "critic")
    assert sorted(os.listdir(ckpt)) == ["critic_state.json", "model.safetensors", "optim_rank00000.safetensors",
                                       "optim_rank00001.safetensors"]


def test_sigkill_then_resume_is_bit_identical(straight, ray_cluster, tiny):
    run_dir = os.path.join(tiny["root"], "runs", "gae-killed")
    proc = train_cli(tiny, ray_cluster, _overrides(tiny, "gae-killed"), "examples/tiny/ppo-gae.yaml")
    try:
        deadline = time.monotonic() + 500
        while not (os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and 2 in metric_rows(run_dir)):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "step 2 not reached"
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert 3 not in metric_rows(run_dir)
    resumed = train_cli(tiny, ray_cluster, _overrides(tiny, "gae-killed"), "examples/tiny/ppo-gae.yaml")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err.decode()[-3000:]
    assert b"resumed from" in err
    a, b = metric_rows(straight), metric_rows(run_dir)
    assert sorted(a) == sorted(b)
    for step in a:
        assert stable_metrics(a[step]) == stable_metrics(b[step]), step
    for sub in ("hf", os.path.join("checkpoints", "step_00000003", "critic")):
        wa, wb = safetensors_dir(os.path.join(straight, sub)), safetensors_dir(os.path.join(run_dir, sub))
        assert wa.keys() == wb.keys() and wa
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub
