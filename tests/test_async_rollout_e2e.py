"""Async rollout end to end on CPU: real Megatron ranks, a real vLLM engine, the real loop.

* A 4-step async run: step t trains on the batch the engines generated with policy version t-2 (the
  policy of step t-1) -- the tag travels with the batch and is checked per step; staleness is 0 on the
  first step and exactly 1 after; the generating policy really was the older one (the engines' log-probs
  match the actor's recomputed ones on step 1 only); TIS applies to the stale batches; the checkpoint
  of step 2 holds step 3's finished batch.
* The same run killed with SIGKILL mid-step and resumed: metrics and final weights equal the
  uninterrupted run's bit for bit (the in-flight batch comes back from the checkpoint).
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from conftest import (
    DIGITS_REWARD,
    VOLATILE,
    metric_rows,
    safetensors_dir,
    task_overrides,
    tiny_task,
    train_cli,
    train_example,
    wait_for_step,
)

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ASYNC_RUN = ("trainer.async_rollout=true", "rollout.placement=disaggregated", "parallel.tp=1",
             "trainer.total_steps=4", "checkpoint.save_every=1", "checkpoint.keep_last=4",
             "algorithm.policy_loss=clip_cov", "algorithm.rollout_correction=tis")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from tiny_task(str(tmp_path_factory.mktemp("tiny")), "async_reward_mod", DIGITS_REWARD)


def _overrides(tiny, name):
    return [*task_overrides(tiny, name), "reward.name=async_reward_mod:digits", "reward.workers=0",
            "data.batch_size=4", "data.mini_batch_size=4", "rollout.n=4", "parallel.micro_batch_size=4",
            "rollout.max_response_len=6", "trainer.eval_every=2", "trainer.eval_n=2", "rollout.mismatch_sample=16",
            "algorithm.clip_cov_lb=0.0", "optim.lr=1e-3", *ASYNC_RUN]


@pytest.fixture(scope="module")
def async_run(ray_cluster, tiny):
    train_example("config.yaml", _overrides(tiny, "async"))
    return os.path.join(tiny["root"], "runs", "async")


def test_step_t_trains_on_the_batch_of_policy_t_minus_1(async_run):
    rows = metric_rows(async_run)
    assert sorted(rows) == [0, 1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        r = rows[step]
        assert r["rollout/policy_version"] == max(0, step - 2), step  # the policy of step t-1
        assert r["rollout/staleness"] == (0 if step == 1 else 1), step
        assert r["actor/ppo_kl_first_update"] == 0.0  # the ratio uses the recomputed old log-probs
        assert "rollout_corr/truncated_frac" in r and r["actor/skipped_updates"] == 0
        assert 0.0 <= r["perf/engine_idle_frac"] <= 1.0 and 0.0 <= r["perf/actor_idle_frac"] <= 1.0
        assert r["time/actor_busy"] > 0
        assert (r["time/engine_busy"] > 0) == (step < 4)  # the last step generates nothing for a next one
    # on-policy on step 1 only: later batches came from the weights before the last update
    assert rows[1]["rollout/logprob_diff_mean"] < 1e-4
    assert min(rows[s]["rollout/logprob_diff_mean"] for s in (2, 3, 4)) > 10 * max(rows[1]["rollout/logprob_diff_mean"],
                                                                                    1e-6)
    ckpts = os.path.join(async_run, "checkpoints")
    assert sorted(os.listdir(ckpts)) == [f"step_0000000{s}" for s in (1, 2, 3, 4)]
    for step in (1, 2, 3):
        with open(os.path.join(ckpts, f"step_0000000{step}", "next_rollout.json")) as fh:
            saved = json.load(fh)
        assert saved["version"] == step - 1 and len(saved["groups"]) == 4  # step+1's batch, by policy step-1
        with open(os.path.join(ckpts, f"step_0000000{step}", "trainer_state.json")) as fh:
            assert json.load(fh)["policy_version"] == step
    assert not os.path.exists(os.path.join(ckpts, "step_00000004", "next_rollout.json"))  # nothing after the last


def test_sigkill_mid_step_then_resume_equals_uninterrupted(async_run, ray_cluster, tiny):
    run_dir = os.path.join(tiny["root"], "runs", "async-killed")
    proc = train_cli(tiny, ray_cluster, _overrides(tiny, "async-killed"))
    try:
        wait_for_step(run_dir, 2, proc)
        ckpt = os.path.join(run_dir, "checkpoints", "step_00000002")
        while not os.path.isdir(ckpt) and proc.poll() is None:  # committed right after the row
            time.sleep(0.01)
        # now in step 3: its batch is the one step 2 generated, step 4's is in flight
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert 3 not in metric_rows(run_dir)
    resumed = train_cli(tiny, ray_cluster, _overrides(tiny, "async-killed"))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err.decode()[-3000:]
    assert b"resumed from" in err and b"step 2" in err
    a, b = metric_rows(async_run), metric_rows(run_dir)
    assert sorted(a) == sorted(b)
    for step in a:
        stable = [k for k in a[step] if not k.startswith(VOLATILE)]
        assert {k: a[step][k] for k in stable} == {k: b[step].get(k) for k in stable}, step
    wa, wb = safetensors_dir(os.path.join(async_run, "hf")), safetensors_dir(os.path.join(run_dir, "hf"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
