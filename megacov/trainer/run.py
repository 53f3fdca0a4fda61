"""Everything around the loop: the run folder, data, rewards, warm-start, resume, evaluation,
checkpoints, metrics sinks and the final export.

:class:`RunContext` is what :mod:`megacov.trainer.loop` calls. The processes it uses (Ray, the actor
group, the engines, the weight sync) belong to its :class:`~megacov.runtime.core.Runtime`. Building a
context reads data and config only; :meth:`RunContext.start` starts things (the warm-start included),
and :func:`run` always tears them down, whatever happened in between.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any, Callable, Optional

import torch

from megacov.trainer.rollout import Timer

log = logging.getLogger("megacov.trainer")

#: Seed of the evaluation samples: fixed, so successive evals differ by the policy, not the dice.
EVAL_SEED_OFFSET = 7919


def setup_logging(run_dir: str) -> list[logging.Handler]:
    """Log megacov's messages to stderr and ``<run_dir>/train.log``; returns the handlers to remove."""
    root = logging.getLogger("megacov")
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(os.path.join(run_dir, "train.log"))]
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handlers


class RunContext:
    """The state of one RL run that the loop uses (see :func:`megacov.trainer.loop.rl_step`)."""

    def __init__(self, cfg: Any, plan: Any, run_dir: str) -> None:
        from megacov.algorithms import build_entropy_controller
        from megacov.data import LoadReport, PromptLoader, load_from_config
        from megacov.runtime.core import Runtime
        from megacov.trainer.checkpoint import CheckpointManager
        from megacov.trainer.evaluate import unique_names

        self.cfg, self.plan, self.run_dir = cfg, plan, run_dir
        self.runtime = Runtime(cfg, plan, call_timeout_s=cfg.rollout.weight_update_timeout_s,
                               rank_timeout_s=cfg.trainer.rank_timeout_s)
        self.tokenizer = _tokenizer(cfg.model.path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        report = LoadReport()
        self.loader = PromptLoader(load_from_config(list(cfg.data.train_files), self.tokenizer, cfg.data, report),
                                   shuffle=cfg.data.shuffle, seed=cfg.data.seed)
        log.info("training prompts: %s", report.summary())
        self.eval_sets = {name: load_from_config([path], self.tokenizer, cfg.data)
                          for name, path in zip(unique_names(cfg.data.eval_files), cfg.data.eval_files)}
        self.controller = build_entropy_controller(cfg.algorithm, total_epochs=cfg.trainer.total_epochs)
        self.mini_batch_seqs = cfg.data.mini_batch_size * cfg.rollout.n
        self.updates_per_step = (cfg.data.batch_size // cfg.data.mini_batch_size) * cfg.algorithm.ppo_epochs
        self.ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last, with_hashes=cfg.checkpoint.manifest_hashes)
        self.ckpt.remove_partial()
        self.resume_from = self.ckpt.resolve_resume(cfg.trainer.resume)
        from megacov.runtime.recovery import EngineRecovery

        self.recovery = EngineRecovery(self.runtime, cfg.rollout.max_engine_restarts, self.ckpt.latest)
        """Dead or wedged engines are replaced, re-synced, and the work that hit them is redone."""
        # faults: safe-point stop on SIGTERM/SIGINT, non-finite storms, row N before checkpoint N
        from megacov.trainer.faults import NonFiniteGuard, StopRequest

        self.stop = StopRequest()
        self.guard = NonFiniteGuard(cfg.trainer.max_skipped_steps, self.updates_per_step)
        self._staged: Any = None
        self.stopped_by: Optional[str] = None
        self.init_path = cfg.model.path
        """The HF directory RL starts from: ``model.path``, or the warm-start's export (set by :meth:`start`)."""
        # bad names fail here; the judge and a served reward model start with the workers
        self.rewards = None if _served_reward(cfg) else build_reward_manager(cfg)[0]
        self.has_reference = self.runtime.with_reference
        self.start_step = 0
        self.history: list[tuple[float, float]] = []
        self.judge_engines = self.metrics = None
        self.critic: Any = None  # PPO-GAE: megacov.critic.group.CriticGroup
        self.last_saved = 0
        # trainer.async_rollout: the next step's batch, in flight (launched) or finished (ready)
        self.async_rollout = bool(cfg.trainer.async_rollout)
        self.actor_version = 0
        """Policy version of the actor: how many updates it has applied."""
        self.engine_version = 0
        """Policy version of the weights in the engines (what a batch generated now is tagged with)."""
        self._launched: Any = None  # megacov.trainer.rollout.Launched
        self._ready: Any = None  # megacov.trainer.rollout.Rollout, generated for the next step
        self._stale_ok = 1 if self.async_rollout else 0

    @property
    def engines(self) -> Any:
        return self.runtime.engines

    @property
    def actor(self) -> Any:
        return self.runtime.actor

    # -- lifetime ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Ray, the warm-start (when asked for), rewards, actor + engines + sync, resume."""
        from megacov.trainer.sft import warm_start

        cfg = self.cfg
        self.runtime.connect()
        if cfg.trainer.sft_steps > 0:
            self.init_path = warm_start(cfg, self.plan, self.tokenizer, self.runtime)
        if self.rewards is None:
            self.rewards, self.judge_engines = build_reward_manager(cfg, self.runtime)
        mcore = cfg.model.mcore_checkpoint
        self.runtime.start(self.init_path, total_updates=cfg.trainer.total_steps * self.updates_per_step,
                           mcore_checkpoint=mcore)
        from megacov.critic.plan import uses_critic

        if uses_critic(cfg):  # the DeepSpeed critic beside the actor (resumed from <ckpt>/critic/)
            from megacov.critic.group import CriticGroup
            from megacov.runtime.core import worker_env

            self.critic = CriticGroup(cfg, self.init_path, seqs_per_update=self.mini_batch_seqs,
                                      env=worker_env(), resume_from=self.resume_from,
                                      use_gpu=self.runtime.use_gpu)
        if self.resume_from is not None:
            self._resume(self.resume_from)
        if self.resume_from is not None or mcore:
            self.sync()  # the engines loaded the initial HF weights; the actor holds others
        elif self.runtime.offload:
            self.actor.offload()  # the first rollout has the GPUs to itself
        from megacov.trainer.metrics import MetricsLogger

        self.stop.install()  # after Ray's start-up, which installs its own SIGTERM handler
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, run_name=cfg.trainer.name,
                                     total_steps=cfg.trainer.total_steps, start_step=self.start_step,
                                     config=dataclasses.asdict(cfg))

    def _resume(self, path: str) -> None:
        from megacov.trainer.checkpoint import load_trainer_state

        self.actor.load_checkpoint(path)
        state = load_trainer_state(path)
        self.loader.load_state_dict(state["loader"])
        self.controller.load_state_dict(state["controller"])
        self.rewards.load_state_dict(state.get("rewards", {}))
        self.history = [tuple(p) for p in state.get("history", [])]
        self.start_step = int(state["step"])
        self.actor_version = self.engine_version = int(state.get("policy_version", self.start_step))
        self._ready = load_next_rollout(path)
        if self._ready is not None and not self.async_rollout:  # its prompts are drawn: train on it anyway
            log.warning("%s holds the batch an async run generated for step %d; it is used (one step "
                        "off-policy) although trainer.async_rollout=false", path, self.start_step + 1)
            self._stale_ok = 1
        log.info("resumed from %s (step %d)", path, self.start_step)

    def close(self) -> None:
        for closer in (getattr(self.metrics, "close", None), getattr(self.rewards, "close", None),
                       getattr(self.judge_engines, "shutdown", None), getattr(self.critic, "shutdown", None),
                       self.runtime.close):
            if closer is not None:
                try:
                    closer()
                except Exception as exc:  # noqa: BLE001 - keep tearing down the rest
                    log.warning("teardown: %s", exc)

    # -- what the loop calls -----------------------------------------------------------------------

    def collect(self, step: int, timer: Timer) -> Any:
        """The step's experience: the batch finished during the previous step (async), else generated
        now. An engine that dies or wedges is replaced (and re-synced), and the rollout is redone from
        the same data position and seeds: no prompt is skipped or repeated."""
        if self._ready is not None:
            ro, self._ready = self._ready, None
            return ro
        return self._collect(step, timer, None, self.loader.state_dict())

    def _collect(self, step: int, timer: Timer, launched: Any, position: dict[str, Any]) -> Any:
        from megacov.trainer.rollout import collect

        def work() -> Any:
            return collect(self.engines, self.loader, self.rewards, self.cfg, step, timer, launched=launched,
                           version=self.engine_version)

        def before_retry() -> None:  # the replacement engines hold the actor's weights; redo it all
            nonlocal launched
            launched = None
            self.loader.load_state_dict(position)
            self.engine_version = self.actor_version

        return self.recovery.run(f"the rollout of step {step}", work, before_retry=before_retry)

    def prefetch(self, step: int) -> None:
        """``trainer.async_rollout``: start step ``step``'s generation now, on the weights the engines
        hold, so that it runs while the actor trains on the current batch."""
        from megacov.trainer.rollout import launch

        if not self.async_rollout or step > self.cfg.trainer.total_steps or self.out_of_epochs():
            return
        self._launched = launch(self.engines, self.loader, self.cfg, step, self.engine_version)

    def finish_prefetch(self, timer: Timer) -> None:
        """Wait for the launched batch (then score it and refill it): the engines must be idle before
        they take the new weights, and a checkpoint after this step holds the finished batch."""
        if self._launched is None:
            return
        launched, self._launched = self._launched, None
        self._ready = self._collect(launched.step, timer, launched, launched.position)

    def staleness(self, ro: Any) -> int:
        """Updates between the policy that generated ``ro`` and the actor about to train on it: 0
        (synchronous) or 1 (async); anything else is refused rather than trained on."""
        lag, bound = self.actor_version - ro.version, self._stale_ok
        self._stale_ok = 1 if self.async_rollout else 0  # a saved async batch resumed synchronously: once
        if not 0 <= lag <= bound:
            raise RuntimeError(f"batch generated by policy version {ro.version}, the actor holds version "
                               f"{self.actor_version}: staleness {lag} outside [0, {bound}]; not trained on")
        return lag

    def out_of_epochs(self) -> bool:
        """``trainer.total_epochs`` reached and no batch drawn before that is waiting for its step."""
        total = self.cfg.trainer.total_epochs
        return total is not None and self.loader.epochs_done >= total and self._ready is None

    def engine_seconds(self) -> float:
        """Seconds the engines have spent generating so far (mean over engines)."""
        return float(getattr(self.engines, "busy_s", 0.0))

    def log_probs(self, batch: Any, which: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[B, L] log-probs (and entropies for the actor) of the whole batch, in row order."""
        import ray

        from megacov.trainer.session import gather_shards

        replicas = gather_shards(self.actor.log_probs(ray.put(batch), self.mini_batch_seqs, which))
        parts = [part for rep in replicas for part in rep]
        rows = torch.cat([part[2] for part in parts])  # global sequence id = row of the batch
        lp = torch.empty((len(rows),) + tuple(parts[0][0].shape[1:]), dtype=parts[0][0].dtype)
        lp[rows] = torch.cat([part[0] for part in parts])
        ent = None
        if parts[0][1] is not None:
            ent = torch.empty_like(lp)
            ent[rows] = torch.cat([part[1] for part in parts])
        return lp, ent

    def update(self, batch: Any, step: int, controls: Any) -> list[dict[str, Any]]:
        import ray

        # The driver's algorithm section travels with every update, so the driver alone decides the loss.
        outs = self.actor.update(ray.put(batch), self.mini_batch_seqs, step=step, controls=controls,
                                 algo_cfg=self.cfg.algorithm)
        self.actor_version += 1
        return outs

    def release_engines(self) -> None:
        """Colocated on GPU: vLLM offloads its weights and drops its KV cache while the actor trains."""
        self.runtime.release_engines()

    def sync(self) -> None:
        """Push the actor's weights into the engines (waking them first when they sleep). An engine
        that is dead before the sync, or dies or wedges during it, is replaced (the others kept) and
        the sync is retried: every engine then holds the actor's new weights."""
        assert self._launched is None, "a weight sync while a generation is in flight"
        self.recovery.run("the weight sync", self.runtime.sync, catch_up=False)
        self.engine_version = self.actor_version

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, seed: int) -> list[list[Any]]:
        ro = self.cfg.rollout
        flat = self.engines.generate(prompts, n=n, temperature=temperature, top_p=ro.top_p, top_k=ro.top_k,
                                     max_tokens=ro.max_response_len, stop=list(ro.stop), seed=seed)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def evaluate(self) -> dict[str, float]:
        from megacov.trainer.evaluate import evaluate

        t = self.cfg.trainer
        return self.recovery.run("the evaluation", lambda: evaluate(
            self.eval_sets, self.generate, self.rewards, k=t.eval_n, temperature=t.eval_temperature,
            seed=t.seed + EVAL_SEED_OFFSET))

    def after_update(self, step: int, metrics: dict[str, float], timer: Timer) -> None:
        """Eval, ceiling prediction and checkpoint, when due (their time is reported apart)."""
        t, c = self.cfg.trainer, self.cfg.checkpoint
        last = step == t.total_steps
        if self.eval_sets and t.eval_every > 0 and (step % t.eval_every == 0 or last):
            with timer("eval"):
                metrics.update(self.evaluate())
        self.history.append((metrics["actor/entropy"], metrics["reward/acc"]))
        if t.predict_ceiling_every > 0 and step % t.predict_ceiling_every == 0:
            metrics.update(self._ceiling())
        if (c.save_every > 0 and step % c.save_every == 0) or last:
            with timer("checkpoint"):
                self.save(step, commit=False)  # committed by log(), once the step's metrics row is on disk

    def _ceiling(self) -> dict[str, float]:
        from megacov.analysis.fit import predict_ceiling

        fit = predict_ceiling([h for h, _ in self.history], [r for _, r in self.history])
        if fit is None:
            return {}
        return {"fit/a": fit["a"], "fit/b": fit["b"], "fit/ceiling": fit["ceiling"], "fit/r2": fit["r2"]}

    def save(self, step: int, commit: bool = True) -> Optional[str]:
        state = {"step": step, "loader": self.loader.state_dict(), "controller": self.controller.state_dict(),
                 "history": self.history, "init_path": os.path.abspath(self.init_path),
                 "rewards": self.rewards.state_dict(), "policy_version": self.actor_version}
        save_optimizer = self.cfg.checkpoint.save_optimizer
        assert self._launched is None, "a checkpoint while a generation is in flight"
        ready = self._ready

        def write(tmp: str) -> None:
            self.actor.save_checkpoint(tmp, save_optimizer)
            if self.runtime.offload:  # saving brought the state back; the engines generate next
                self.actor.offload()
            if self.critic is not None:
                self.critic.save(tmp)
            if ready is not None:  # async: the batch generated for the next step (its prompts are drawn)
                save_next_rollout(tmp, ready)

        staged = self.ckpt.stage(step, write, state)
        self.last_saved = step
        if not commit:
            self._staged = staged
            return None
        return self.ckpt.commit(staged)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        metrics.update(self.recovery.step_metrics())  # engine/restarts, engine/replaced, engine/recovery_s
        self.metrics.log(step, metrics)  # durable (fsync) before the step's checkpoint is committed
        self.metrics.progress(step, metrics)
        if self._staged is not None:
            self.ckpt.commit(self._staged)
            self._staged = None
        self.guard.observe(step, metrics)
        every = self.cfg.checkpoint.export_hf_every
        final_export = self.cfg.checkpoint.export_hf and step == self.cfg.trainer.total_steps  # goes to hf/
        if every > 0 and step > 0 and step % every == 0 and not final_export:
            from megacov.trainer.session import export_hf

            out = export_hf(self.actor, self.init_path, os.path.join(self.run_dir, "hf_exports", f"step_{step:08d}"))
            log.info("step %d policy exported to %s", step, out)

    def stop_requested(self, step: int) -> bool:
        """At a safe point (after step ``step``'s row): on SIGTERM/SIGINT save a checkpoint and stop."""
        if not self.stop.requested:
            return False
        path = self.save(step) if self.last_saved != step else self.ckpt.latest()
        self.stopped_by = self.stop.signal_name
        log.info("%s: stopped after step %d, checkpoint %s; the same command resumes the run",
                 self.stopped_by, step, path)
        return True


#: The batch an async run generated for the step after the checkpoint's (JSON, never a pickle).
NEXT_ROLLOUT = "next_rollout.json"


def save_next_rollout(folder: str, ro: Any) -> None:
    import json

    from megacov.trainer.rollout import rollout_to_json

    with open(os.path.join(folder, NEXT_ROLLOUT), "w") as fh:
        json.dump(rollout_to_json(ro), fh)
        fh.flush()
        os.fsync(fh.fileno())


def load_next_rollout(folder: str) -> Any:
    """The saved next batch of an async run, or None when the checkpoint has none."""
    import json

    from megacov.trainer.checkpoint import CheckpointError
    from megacov.trainer.rollout import rollout_from_json

    path = os.path.join(folder, NEXT_ROLLOUT)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            return rollout_from_json(json.load(fh))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a saved rollout ({type(exc).__name__}: {exc})") from None


def build_reward_manager(cfg: Any, runtime: Any = None) -> tuple[Any, Any]:
    """The run's RewardManager and, for ``reward.name=judge``, the judge's engines (to shut down);
    the judge's engines are started by ``runtime`` (needed then)."""
    from megacov.rewards import RewardManager

    r = cfg.reward
    if r.name == "model" and r.model_workers > 0:  # the reward model in its own worker group
        from megacov.rewards.model import RemoteRewardModel
        from megacov.runtime.core import worker_env

        use_gpu = runtime is not None and runtime.use_gpu
        return RewardManager(r, model=RemoteRewardModel(r, worker_env(), use_gpu=use_gpu)), None
    if r.name != "judge":
        return RewardManager(r), None
    from megacov.rewards.judge import JudgeReward

    if not r.judge_model:
        from megacov.config import ConfigError

        raise ConfigError("reward.name=judge needs reward.judge_model (an HF directory)")
    judge_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engines=1, tp=1))
    engines = runtime.start_engines(r.judge_model, cfg=judge_cfg, max_model_len=_context_len(r.judge_model),
                                    primary=False)
    judge = JudgeReward(engines, _tokenizer(r.judge_model), mode=r.judge_mode, verdicts=r.judge_verdicts)
    return RewardManager(r, judge=judge), engines


def _served_reward(cfg: Any) -> bool:
    return cfg.reward.name == "judge" or (cfg.reward.name == "model" and cfg.reward.model_workers > 0)


def _context_len(hf_dir: str, cap: int = 32768) -> int:
    """The judge reads long prompts (question + reference + response tail): its whole context."""
    import json

    with open(os.path.join(hf_dir, "config.json")) as fh:
        return min(int(json.load(fh).get("max_position_embeddings", cap)), cap)


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def run(cfg: Any, plan: Any) -> int:
    """Bad input found while setting up (a malformed dataset row, an unknown reward, an unusable
    checkpoint) becomes a ConfigError: one line naming the problem, exit code 2."""
    from megacov.config import ConfigError
    from megacov.data import DataError
    from megacov.models import CheckpointError as ModelCheckpointError
    from megacov.rewards import RewardSpecError
    from megacov.trainer import faults, startup
    from megacov.trainer.checkpoint import CheckpointError

    run_dir = os.path.join(cfg.trainer.output_dir, cfg.trainer.name)
    os.makedirs(run_dir, exist_ok=True)
    handlers = setup_logging(run_dir)
    startup.quiet_library_warnings()
    try:
        def body() -> int:
            if cfg.trainer.mode == "rl":
                startup.prepare_run_dir(run_dir, cfg.trainer.resume, cfg.trainer.overwrite)
            return _run(cfg, plan, run_dir)

        # every error that ends the run is recorded in train.log (bad input: exit 2; else one line, exit 1)
        return faults.guarded(run_dir, body, (ConfigError, DataError, RewardSpecError, CheckpointError,
                                              ModelCheckpointError), lambda exc: ConfigError(str(exc)))
    finally:
        for handler in handlers:
            logging.getLogger("megacov").removeHandler(handler)
            handler.close()


def _run(cfg: Any, plan: Any, run_dir: str) -> int:
    from megacov.config import to_yaml

    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        fh.write(to_yaml(cfg))
    torch.manual_seed(cfg.trainer.seed)
    if cfg.trainer.mode == "sft":
        return _run_sft(cfg, plan, run_dir)
    start = time.perf_counter()
    from megacov.trainer.startup import banner

    banner(cfg, plan, run_dir)
    ctx = RunContext(cfg, plan, run_dir)
    try:
        ctx.stop.install()
        ctx.start()
        from megacov.trainer.loop import rl_loop

        last = rank_guard(ctx, lambda: rl_loop(ctx))
        if ctx.stopped_by:  # SIGTERM / SIGINT: saved at the safe point; exit 0 so the job is requeued
            return 0
        if last > ctx.last_saved and last > ctx.start_step:  # stopped early (trainer.total_epochs)
            ctx.save(last)
        if cfg.checkpoint.export_hf and last > 0:
            from megacov.trainer.session import export_hf

            out = export_hf(ctx.actor, ctx.init_path, os.path.join(run_dir, "hf"))
            log.info("final policy exported to %s", out)
    finally:
        ctx.close()
        ctx.stop.restore()
    _finish(cfg, run_dir)
    log.info("run finished in %.0f s: %s", time.perf_counter() - start, run_dir)
    return 0


def rank_guard(ctx: RunContext, body: Callable[[], int]) -> int:
    """``body()``; a training rank that died or wedged ends the run with one line naming the last good
    checkpoint (the surviving ranks, likely blocked in a collective with it, are killed, not waited for)."""
    from megacov.runtime.recovery import RankFault

    try:
        return body()
    except Exception as error:  # noqa: BLE001 - re-raised unless a rank fault caused it
        exc = error
        while exc is not None and not isinstance(exc, RankFault):  # e.g. a SyncError caused by one
            exc = exc.__cause__
        if exc is None:
            raise
        latest = ctx.ckpt.latest()
        where = f"last good checkpoint: {latest} (the same command resumes from it)" if latest else \
            "no checkpoint saved yet (the same command starts over)"
        if ctx.actor is not None:
            ctx.actor.shutdown(timeout_s=1.0)
        raise RankFault(exc.who, exc.call, exc.kind, exc.detail, where) from error


def _run_sft(cfg: Any, plan: Any, run_dir: str) -> int:
    from megacov.runtime.core import Runtime
    from megacov.trainer.sft import run_sft, sft_lr

    steps = cfg.trainer.sft_steps or cfg.trainer.total_steps
    optim = dataclasses.replace(cfg.optim, lr=sft_lr(cfg))  # no RL after it: the schedule is its own
    with Runtime(cfg, plan) as runtime:
        runtime.connect()
        out = run_sft(cfg, plan, _tokenizer(cfg.model.path), runtime, steps=steps, optim=optim,
                      out_dir=os.path.join(run_dir, "hf"), metrics_path=os.path.join(run_dir, "metrics.jsonl"))
    log.info("SFT finished: %s", out)
    return 0


def _finish(cfg: Any, run_dir: str) -> None:
    if cfg.logging.plot:
        from megacov.trainer.metrics import plot_curves

        png = plot_curves(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "curves.png"))
        if png:
            log.info("curves: %s", png)
