"""The RL loop, written to read like the algorithm.

Per step: sample prompts -> n rollouts each (vLLM) -> rewards -> old log-probs (actor) and reference
log-probs (reference policy, same Megatron layout, forward-only) -> advantages (optionally
entropy-shaped) -> optional train-rollout mismatch correction (TIS / MIS) -> mini-batch updates with
``algorithm.policy_loss`` (ppo, clip_cov, kl_cov, gspo, cispo; selected tokens -- Clip-Cov / KL-Cov,
high-entropy -- are chosen over the whole mini-batch, exactly) ->
weight sync into the engines -> periodic eval and checkpoint.

With ``trainer.async_rollout`` the engines generate step t+1's batch (with the policy of step t-1)
while the actor trains on step t's; the generation is collected before the weight sync at the end of
the step, so every batch is exactly one update stale (``rollout/staleness``, never more).

Everything that is not the algorithm -- starting Ray, worker groups and engines, resuming, sinks --
is in :mod:`megacov.trainer.run` (processes: :mod:`megacov.runtime`); the per-step numbers are in :mod:`megacov.trainer.step_metrics`.

Metric names (what ``megacov analyze`` reads): step, actor/entropy, reward/{mean,std,acc},
val/acc, val/<dataset>/{avg,pass}@<k>, cov/{mean,std,max,selected_mean,num_selected},
response/{len_mean,len_max,clip_frac}, actor/{pg_loss,clipfrac,ppo_kl,kl_ref,grad_norm,lr},
rollout/logprob_diff_{mean,max}, rollout/{staleness,policy_version},
time/{rollout,reward,logprob,update,sync,other,step,engine_busy,actor_busy},
perf/{tokens_per_s,engine_idle_frac,actor_idle_frac}, engine/{restarts,replaced,recovery_s}; with
``algorithm.advantage=gae`` also critic/{value_loss,vf_clipfrac,explained_var,explained_var_last,
return_mean,value_mean,grad_norm,lr,updates}.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from megacov.algorithms import compute_advantages, kl_reward_penalty
from megacov.algorithms.rollout_correction import rollout_correction
from megacov.algorithms.shaping import entropy_advantage
from megacov.analysis.diversity import diversity_metrics
from megacov.algorithms.advantages import gae_returns
from megacov.algorithms.value import value_metrics
from megacov.rollout.mismatch import logprob_mismatch, mismatch_sample
from megacov.trainer import step_metrics as sm
from megacov.trainer.batching import (
    build_actor_batch,
    group_ids_for,
    masked_mean,
    response_positions,
    seq_multiple,
)
from megacov.trainer.rollout import Timer

if TYPE_CHECKING:
    from megacov.trainer.run import RunContext

log = logging.getLogger(__name__)


def rl_step(ctx: RunContext, step: int) -> dict[str, float]:
    """One RL step; returns its metrics (the weights in the engines are already the new policy)."""
    cfg, algo = ctx.cfg, ctx.cfg.algorithm
    timer, engine_s = Timer(), ctx.engine_seconds()

    # 1. experience: n samples per prompt, scored (dynamic sampling refills uninformative groups)
    ro = ctx.collect(step, timer)  # an engine that dies or wedges is replaced, re-synced, the rollout redone
    staleness = ctx.staleness(ro)  # updates since the policy that generated it: 0, or 1 when async
    ctx.prefetch(step + 1)  # async: the engines generate the next batch while the actor trains on this one
    with timer("rollout"):
        ctx.release_engines()  # colocated GPU: vLLM gives its memory back while the actor trains
    truncated = ro.flat("truncated")
    train_rows = [not t for t in truncated] if cfg.data.overlong_filter else None
    batch, rollout_lp = build_actor_batch(ro.prompt_ids, ro.flat("response_ids"), pad_id=ctx.pad_id,
                                          train_rows=train_rows, rollout_logprobs=ro.flat("logprobs"),
                                          multiple=seq_multiple(cfg.parallel))
    mask = batch.mask

    # 2. log-probs of the behaviour policy (with token entropies) and of the reference policy
    with timer("logprob"):
        old_lp, entropy = ctx.log_probs(batch, "actor")
        ref_lp = ctx.log_probs(batch, "ref")[0] if ctx.has_reference else None
        values = ctx.critic.values(batch) if ctx.critic is not None else None  # PPO-GAE: token values

    # 3. advantages from the outcome rewards (optionally KL-penalised), one group per prompt
    rewards = torch.as_tensor(ro.array("scores"), dtype=torch.float64)
    extra: dict[str, float] = {}
    if algo.use_kl_in_reward and algo.kl_coef > 0 and ref_lp is not None:
        rewards, kl_m = kl_reward_penalty(rewards, old_lp, ref_lp, mask, coef=algo.kl_coef,
                                          estimator=algo.kl_estimator)
        extra.update({f"actor/{k}": float(v) for k, v in kl_m.items()})
    groups = torch.as_tensor(group_ids_for(len(ro.groups), ro.n))
    batch.advantages = compute_advantages(algo.advantage, rewards, groups, mask, algo, values=values)
    batch.advantages, shaped = entropy_advantage(batch.advantages, entropy, mask, coef=algo.entropy_advantage_coef,
                                                 kappa=algo.entropy_advantage_kappa)
    corr = rollout_correction(old_lp, rollout_lp, mask, algo)  # TIS weights / MIS mask, or nothing
    batch.response_mask, batch.loss_weight = corr.mask, corr.weight
    extra.update(**shaped, **corr.metrics)
    batch.old_log_prob = old_lp
    batch.ref_log_prob = ref_lp if (algo.kl_coef > 0 and not algo.use_kl_in_reward) else None

    # 4. entropy control sees the entropy of the batch it is about to train on
    mean_entropy = masked_mean(entropy, mask)
    controls = ctx.controller.step(entropy=mean_entropy, step=step, epoch=ro.epoch)

    # 5. mini-batch updates (exact global Clip-Cov / KL-Cov selection inside), then weight sync
    with timer("update"):
        if values is not None:  # the critic regresses on the GAE returns; in its warm-up it alone trains
            returns = gae_returns(rewards, values, mask, algo)
            extra.update({**ctx.critic.update(batch, returns, values), **value_metrics(returns, values, mask)})
        train_actor = values is None or step > cfg.critic.warmup_steps
        outs = ctx.update(batch, step, controls) if train_actor else []
    ctx.finish_prefetch(timer)  # async: the next batch is complete (engines idle) before the new weights go in
    with timer("sync"):
        if train_actor:
            ctx.sync()

    # 6. the numbers of this step
    positions = response_positions(ro.prompt_ids, ro.flat("response_ids"), batch.seq_len)
    metrics = {"actor/entropy": mean_entropy, **sm.rollout_metrics(ro, cfg.rollout.max_response_len),
               **sm.update_metrics(outs), **extra, **ro_mismatch(ctx, old_lp, rollout_lp, positions, step),
               "actor/entropy_coef": controls.entropy_coef, "actor/positive_weight": controls.positive_weight,
               "rollout/staleness": float(staleness), "rollout/policy_version": float(ro.version)}
    metrics.update(diversity_metrics(ro, entropy, positions))
    if ref_lp is not None:
        metrics["actor/kl_ref"] = sm.kl_to_ref(old_lp, ref_lp, mask, algo.kl_estimator)
    engine_s = ctx.engine_seconds() - engine_s  # before eval: the step's own generation
    ctx.after_update(step, metrics, timer)
    generated = int(positions.sum())
    tokens = sum(len(p) for p in ro.prompt_ids) + generated
    metrics.update(sm.timing_metrics(timer.seconds, timer.total(), tokens, generated, engine_s))
    return metrics


def ro_mismatch(ctx: RunContext, old_lp: torch.Tensor, rollout_lp: torch.Tensor, positions: torch.Tensor,
                step: int) -> dict[str, float]:
    """Train / rollout log-prob gap on ``rollout.mismatch_sample`` sequences of the step."""
    idx = mismatch_sample(old_lp.shape[0], ctx.cfg.rollout.mismatch_sample, step, ctx.cfg.rollout.seed)
    if not idx:
        return {}
    m = logprob_mismatch(old_lp[idx], rollout_lp[idx], positions[idx])
    return {"rollout/logprob_diff_mean": m["mismatch/abs_mean"], "rollout/logprob_diff_max": m["mismatch/abs_max"],
            "rollout/k3": m["mismatch/k3"]}


def rl_loop(ctx: RunContext) -> int:
    """Steps ``start_step + 1 .. trainer.total_steps`` (or until ``trainer.total_epochs``)."""
    cfg = ctx.cfg
    if ctx.start_step == 0 and cfg.trainer.eval_every > 0 and ctx.eval_sets:
        ctx.log(0, ctx.evaluate())
    step = ctx.start_step
    for step in range(ctx.start_step + 1, cfg.trainer.total_steps + 1):
        if cfg.trainer.total_epochs is not None and ctx.out_of_epochs():  # a batch drawn before still runs
            log.info("reached trainer.total_epochs=%d at step %d", cfg.trainer.total_epochs, step - 1)
            step -= 1
            break
        metrics = rl_step(ctx, step)
        ctx.log(step, metrics)
        if ctx.stop_requested(step):  # SIGTERM / SIGINT: a checkpoint of this step is saved, then exit 0
            break
    return step
