"""End to end on CPU: real Megatron ranks (gloo) in Ray actors, a real vLLM engine, the real loop.

Runs are short (2-3 steps, 4 prompts x 4 samples) and share one Ray cluster. A dense test reward
(share of digit characters in the response) gives a random tiny model non-zero advantages, so the
covariance statistics and the Clip-Cov / KL-Cov choices are exercised without a warm-start.

* TP=2 Clip-Cov run: metrics present and finite, first ppo_kl exactly 0, train/rollout mismatch
  small, tokens selected, eval / checkpoint / export / plot written.
* The same run killed with SIGKILL mid-step and resumed with trainer.resume=auto: its metrics and
  final weights equal the uninterrupted run's bit for bit.
* PP=2 run whose steps use ppo, clip_cov and kl_cov in turn (two mini-batches per step), then a NaN
  injected into the loss: the update is skipped and reported, the weights are unchanged.
* The model-based judge reward scored by a vLLM engine (the tiny model as judge: plumbing).
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
    wait_for_step,
)

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from tiny_task(str(tmp_path_factory.mktemp("tiny")), "dense_reward_mod", DIGITS_REWARD)


def _overrides(tiny, name, *extra):
    return [*task_overrides(tiny, name),
            "reward.name=dense_reward_mod:digits", "reward.workers=0", "data.batch_size=4", "data.mini_batch_size=4",
            "rollout.n=4", "parallel.micro_batch_size=4", "rollout.max_response_len=6", "trainer.eval_every=2",
            "trainer.eval_n=2", "rollout.mismatch_sample=16", "algorithm.clip_cov_lb=0.0", "optim.lr=1e-3", *extra]


def _config(tiny, name, *extra):
    from megacov.config import load_config
    from megacov.config.validate import validate

    cfg = load_config(os.path.join(ROOT, "examples/tiny/config.yaml"), _overrides(tiny, name, *extra))
    return cfg, validate(cfg)


# A small KL-to-reference loss term, so that the reference policy is built and actor/kl_ref logged
# (with algorithm.kl_coef=0 the runtime builds no reference at all).
KILL_RUN = ("trainer.total_steps=3", "checkpoint.save_every=1", "algorithm.policy_loss=clip_cov", "parallel.tp=2",
            "algorithm.kl_coef=0.001")


@pytest.fixture(scope="module")
def tp2_run(ray_cluster, tiny):
    from megacov.trainer import train

    cfg, plan = _config(tiny, "tp2", *KILL_RUN)
    assert train(cfg, plan) == 0
    return os.path.join(tiny["root"], "runs", "tp2")


def _finite(row, key):
    return key in row and row[key] is not None and math.isfinite(row[key])


def test_tp2_clip_cov_run_metrics_checkpoints_export(tp2_run):
    rows = metric_rows(tp2_run)
    assert sorted(rows) == [0, 1, 2, 3]
    for step in (1, 2, 3):
        r = rows[step]
        for key in ("actor/entropy", "cov/mean", "cov/std", "cov/max", "reward/mean", "reward/std", "reward/acc",
                    "response/len_mean", "actor/pg_loss", "actor/grad_norm", "actor/lr", "actor/kl_ref",
                    "time/rollout", "time/update", "time/sync", "time/other", "perf/tokens_per_s"):
            assert _finite(r, key), (step, key)
        assert r["actor/entropy"] > 0 and r["actor/skipped_updates"] == 0
    first = rows[1]
    assert first["actor/ppo_kl_first_update"] == 0.0  # on-policy: recomputed log-probs are bit-identical
    assert first["actor/kl_ref"] == 0.0  # the reference is the initial actor
    assert first["rollout/logprob_diff_mean"] < 1e-4 and first["rollout/logprob_diff_max"] < 1e-2
    assert sum(rows[s]["cov/num_selected"] for s in (1, 2, 3)) > 0
    assert _finite(first, "cov/selected_mean") or first["cov/num_selected"] == 0
    assert rows[3]["actor/kl_ref"] > 0  # the policy moved
    for step in (0, 2, 3):
        assert 0 <= rows[step]["val/eval/avg@2"] <= rows[step]["val/eval/pass@2"] <= 1
    ckpts = sorted(os.listdir(os.path.join(tp2_run, "checkpoints")))
    assert ckpts == ["step_00000002", "step_00000003"]
    assert os.path.getsize(os.path.join(tp2_run, "curves.png")) > 1000
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(tp2_run, "hf"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sigkill_mid_step_then_resume_equals_uninterrupted(tp2_run, ray_cluster, tiny):
    run_dir = os.path.join(tiny["root"], "runs", "killed")
    proc = train_cli(tiny, ray_cluster, _overrides(tiny, "killed", *KILL_RUN))
    try:
        wait_for_step(run_dir, 2, proc)
        time.sleep(0.3)  # into step 3: rollout / log-probs / update
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert 3 not in metric_rows(run_dir)
    resumed = train_cli(tiny, ray_cluster, _overrides(tiny, "killed", *KILL_RUN))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err.decode()[-3000:]
    assert b"resumed from" in err and b"step 2" in err
    a, b = metric_rows(tp2_run), metric_rows(run_dir)
    assert sorted(a) == sorted(b)
    for step in a:
        assert stable_metrics(a[step]) == stable_metrics(b[step]), step
    wa, wb = safetensors_dir(os.path.join(tp2_run, "hf")), safetensors_dir(os.path.join(run_dir, "hf"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_pp2_ppo_clip_cov_kl_cov_steps_and_nan_loss_is_skipped(ray_cluster, tiny):
    """One PP=2 run whose three steps use ppo, clip_cov and kl_cov in turn (the driver's algorithm
    section travels with every update), two mini-batches per step; then a NaN loss."""
    from megacov.trainer.batching import build_actor_batch
    from megacov.trainer.loop import rl_step
    from megacov.trainer.rollout import Timer, collect
    from megacov.trainer.run import RunContext
    from megacov.trainer.step_metrics import update_metrics

    cfg, plan = _config(tiny, "pp2", "parallel.tp=1", "parallel.pp=2", "data.mini_batch_size=2",
                        "parallel.micro_batch_size=2", "trainer.total_steps=3", "trainer.eval_every=0",
                        "algorithm.cov_metrics=true",  # cov/* for the ppo step too
                        "checkpoint.save_every=0", "checkpoint.export_hf=false")
    run_dir = os.path.join(tiny["root"], "runs", "pp2")
    os.makedirs(run_dir, exist_ok=True)
    ctx = RunContext(cfg, plan, run_dir)
    try:
        ctx.start()
        rows = {}
        for step, loss in enumerate(("ppo", "clip_cov", "kl_cov"), start=1):
            cfg.algorithm.policy_loss = loss
            rows[step] = rl_step(ctx, step)
        for step, r in rows.items():
            assert r["actor/updates"] == 2 and r["actor/skipped_updates"] == 0
            assert r["actor/ppo_kl_first_update"] == 0.0
            assert r["rollout/logprob_diff_mean"] < 1e-4
            assert all(_finite(r, k) for k in ("actor/entropy", "cov/mean", "cov/std", "cov/max", "actor/pg_loss"))
        assert rows[1]["cov/num_selected"] == 0 and rows[1]["actor/clipfrac"] >= 0
        assert rows[2]["cov/num_selected"] >= 1 or rows[2]["cov/n_candidates"] == 0
        assert rows[3]["cov/num_selected"] >= 2 and _finite(rows[3], "cov/selected_mean")  # k >= 1 per mini-batch

        ro = collect(ctx.engines, ctx.loader, ctx.rewards, cfg, 99, Timer())
        batch, _ = build_actor_batch(ro.prompt_ids, ro.flat("response_ids"), pad_id=ctx.pad_id)
        batch.old_log_prob, _ = ctx.log_probs(batch, "actor")
        batch.advantages = torch.where(batch.response_mask, 1.0, 0.0)
        row, col = torch.nonzero(batch.response_mask)[0].tolist()
        batch.advantages[row, col] = float("nan")
        before = ctx.actor.state_fingerprint()
        outs = ctx.update(batch, 4, None)
        assert [o["applied"] for o in outs] == [0.0, 1.0]  # only the poisoned mini-batch is skipped
        assert update_metrics(outs)["actor/skipped_updates"] == 1
        batch.advantages[:] = float("nan")
        after_good = ctx.actor.state_fingerprint()
        outs = ctx.update(batch, 5, None)
        assert [o["applied"] for o in outs] == [0.0, 0.0]
        assert ctx.actor.state_fingerprint() == after_good != before
    finally:
        ctx.close()


def test_judge_reward_scores_with_a_vllm_engine(ray_cluster, tiny):
    """Plumbing of the model-based reward, with the tiny model as judge."""
    from megacov.rewards import RewardManager
    from megacov.rewards.judge import JudgeReward
    from megacov.runtime.core import Runtime
    from megacov.trainer.run import _context_len, _tokenizer

    cfg, plan = _config(tiny, "judge", "parallel.tp=1", "reward.name=judge", f"reward.judge_model={tiny['model']}")
    runtime = Runtime(cfg, plan)
    runtime.connect()
    engines = runtime.start_engines(tiny["model"], max_model_len=_context_len(tiny["model"]), primary=False)
    try:
        tok = _tokenizer(tiny["model"])
        soft = JudgeReward(engines, tok, mode="soft", verdicts=["y", "n"])
        binary = JudgeReward(engines, tok, mode="binary", verdicts=["y", "n"])
        args = (["12", "7", "99"], ["12", "12", "12"], ["5+7=", "5+7=", "5+7="])
        s = RewardManager(cfg.reward, judge=soft).score(*args)
        b = RewardManager(cfg.reward, judge=binary).score(*args)
        assert s.errors == b.errors == 0
        assert all(0.0 < v < 1.0 for v in s.raw)  # probabilities, not verdicts
        assert b.raw.tolist() == [1.0 if v > 0.5 else 0.0 for v in s.raw]
        direct = engines.score([soft.prompt_ids(args[0][0], "12", "5+7=") + [soft.yes_id],
                                soft.prompt_ids(args[0][0], "12", "5+7=") + [soft.no_id]])
        assert s.raw[0] == pytest.approx(soft.reward(direct[0][-1], direct[1][-1]))
        with pytest.raises(Exception, match="different tokens"):
            JudgeReward(engines, tok, mode="soft", verdicts=["yes", "yay"])
    finally:
        engines.shutdown()


def test_sigterm_saves_at_the_safe_point_then_resume_falls_back_past_a_damaged_checkpoint(tp2_run, ray_cluster,
                                                                                          tiny):
    """Preemption: SIGTERM mid-run -> checkpoint at the end of the step, exit 0. The newest checkpoint
    is then truncated (a dying file system); resume falls back to the previous one, says so, and the
    finished run equals the uninterrupted one bit for bit."""
    run_dir = os.path.join(tiny["root"], "runs", "sigterm")
    proc = train_cli(tiny, ray_cluster, _overrides(tiny, "sigterm", *KILL_RUN))
    try:
        wait_for_step(run_dir, 1, proc)
        time.sleep(0.3)  # into step 2
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err.decode()[-3000:]
    log_text = open(os.path.join(run_dir, "train.log")).read()
    assert "SIGTERM received" in log_text and "SIGTERM: stopped after step" in log_text
    assert sorted(metric_rows(run_dir)) == [0, 1, 2]  # the signal came during step 2: that step was finished
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert ckpts == ["step_00000001", "step_00000002"]  # nothing half-written
    newest = os.path.join(run_dir, "checkpoints", ckpts[-1], "actor")
    shard = max((os.path.join(newest, f) for f in os.listdir(newest) if f.endswith(".distcp")), key=os.path.getsize)
    with open(shard, "r+b") as fh:  # damage the newest: resume must fall back to the previous one
        fh.truncate(os.path.getsize(shard) // 2)
    resumed = train_cli(tiny, ray_cluster, _overrides(tiny, "sigterm", *KILL_RUN))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err.decode()[-3000:]
    assert b"is damaged" in err and b"falling back to" in err and b"(step 1)" in err
    a, b = metric_rows(tp2_run), metric_rows(run_dir)
    assert sorted(a) == sorted(b)
    for step in a:
        assert stable_metrics(a[step]) == stable_metrics(b[step]), step
    wa, wb = safetensors_dir(os.path.join(tp2_run, "hf")), safetensors_dir(os.path.join(run_dir, "hf"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


HUGE_REWARD = "def huge(response, answer):\n    return 1e308\n"


def test_nan_storm_stops_the_run_with_one_clear_error(ray_cluster, tiny):
    """A reward of 1e308 makes every update non-finite: each skip is warned, and after
    trainer.max_skipped_steps steps the run stops with an error (and says so in train.log)."""
    from megacov.trainer import train
    from megacov.trainer.faults import RunFailed

    with open(os.path.join(tiny["root"], "huge_reward_mod.py"), "w") as fh:
        fh.write(HUGE_REWARD)
    cfg, plan = _config(tiny, "storm", "parallel.tp=1", "reward.name=huge_reward_mod:huge", "trainer.total_steps=4",
                        "trainer.max_skipped_steps=2", "trainer.eval_every=0", "checkpoint.save_every=0",
                        "checkpoint.export_hf=false", "rollout.max_response_len=4")
    with pytest.raises(RunFailed, match="NonFiniteStorm: stopped at step 2: .*2 consecutive steps") as info:
        train(cfg, plan)
    assert "\n" not in str(info.value)
    run_dir = os.path.join(tiny["root"], "runs", "storm")
    log_text = open(os.path.join(run_dir, "train.log")).read()
    assert "step 1: 1 of 1 update(s) skipped" in log_text and "step 2: 1 of 1 update(s) skipped" in log_text
    assert "run failed: NonFiniteStorm" in log_text
    assert sorted(metric_rows(run_dir)) == [1, 2]  # both rows kept; nothing after the stop
