"""Everything around the loop: the run folder, data, rewards, warm-start, Ray workers and engines,
resume, evaluation, checkpoints, metrics sinks and the final export.

:class:`RunContext` is what :mod:`megacov.trainer.loop` calls; :func:`run` builds it, runs the loop
and always tears the workers down, whatever happened in between.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any, Optional

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
        from megacov.trainer.checkpoint import CheckpointManager
        from megacov.trainer.evaluate import unique_names
        from megacov.trainer.sft import warm_start

        self.cfg, self.plan, self.run_dir = cfg, plan, run_dir
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
        self.ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last)
        self.ckpt.remove_partial()
        self.resume_from = self.ckpt.resolve_resume(cfg.trainer.resume)
        self.init_path = warm_start(cfg, plan, self.tokenizer) if cfg.trainer.sft_steps > 0 else cfg.model.path
        self.rewards = None if cfg.reward.name == "judge" else build_reward_manager(cfg)[0]  # bad names fail here
        self.has_reference = True
        self.start_step = 0
        self.history: list[tuple[float, float]] = []
        self.group = self.engines = self.judge_engines = self.metrics = None
        self._sync = None
        self._asleep = False
        self._offload = False
        self.last_saved = 0

    # -- lifetime ----------------------------------------------------------------------------------

    def start(self) -> None:
        from megacov.trainer import session

        cfg = self.cfg
        session.connect(cfg, self.plan)
        if self.rewards is None:
            self.rewards, self.judge_engines = build_reward_manager(cfg)
        mcore = cfg.model.mcore_checkpoint
        self.group = session.start_actor_group(
            cfg, self.plan, self.init_path, total_updates=cfg.trainer.total_steps * self.updates_per_step,
            with_reference=self.has_reference, reference_path=cfg.model.reference_path, mcore_checkpoint=mcore)
        self.engines = session.start_engines(cfg, self.init_path, placement=self.group.placement)
        self._sync = session.make_sync(cfg, self.engines)
        if self.resume_from is not None:
            self._resume(self.resume_from)
        from megacov.config.validate import offload_enabled

        self._offload = offload_enabled(cfg, on_gpu=self.engines.spec.use_gpu)
        if self.resume_from is not None or mcore:
            self.sync()  # the engines loaded the initial HF weights; the actor holds others
        elif self._offload:
            self.group.execute("offload")  # the first rollout has the GPUs to itself
        from megacov.trainer.metrics import MetricsLogger

        self.metrics = MetricsLogger(self.run_dir, cfg.logging, run_name=cfg.trainer.name,
                                     total_steps=cfg.trainer.total_steps, start_step=self.start_step,
                                     config=dataclasses.asdict(cfg))

    def _resume(self, path: str) -> None:
        from megacov.trainer.checkpoint import load_trainer_state

        self.group.execute("load_checkpoint", path)
        state = load_trainer_state(path)
        self.loader.load_state_dict(state["loader"])
        self.controller.load_state_dict(state["controller"])
        self.history = [tuple(p) for p in state.get("history", [])]
        self.start_step = int(state["step"])
        log.info("resumed from %s (step %d)", path, self.start_step)

    def close(self) -> None:
        for closer in (getattr(self.metrics, "close", None), getattr(self.rewards, "close", None),
                       getattr(self.engines, "shutdown", None), getattr(self.judge_engines, "shutdown", None),
                       getattr(self.group, "shutdown", None)):
            if closer is not None:
                try:
                    closer()
                except Exception as exc:  # noqa: BLE001 - keep tearing down the rest
                    log.warning("teardown: %s", exc)

    # -- what the loop calls -----------------------------------------------------------------------

    def log_probs(self, batch: Any, which: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[B, L] log-probs (and entropies for the actor) of the whole batch, in row order."""
        import ray

        from megacov.trainer.session import gather_shards

        replicas = gather_shards(self.group.execute("log_probs", ray.put(batch), self.mini_batch_seqs, which))
        n_mb = len(replicas[0])
        lp = torch.cat([torch.cat([rep[j][0] for rep in replicas]) for j in range(n_mb)])
        ent = None
        if replicas[0][0][1] is not None:
            ent = torch.cat([torch.cat([rep[j][1] for rep in replicas]) for j in range(n_mb)])
        return lp, ent

    def update(self, batch: Any, step: int, controls: Any) -> list[dict[str, Any]]:
        import ray

        # The driver's algorithm section travels with every update, so the driver alone decides the loss.
        return self.group.execute("update", ray.put(batch), self.mini_batch_seqs, step=step, controls=controls,
                                  algo_cfg=self.cfg.algorithm)[0]

    def _colocated_gpu(self) -> bool:
        return bool(self.engines.spec.use_gpu and self.engines.spec.colocated)

    def release_engines(self) -> None:
        """Colocated on GPU: vLLM offloads its weights and drops its KV cache while the actor trains."""
        if self._colocated_gpu() and not self._asleep:
            self.engines.sleep(level=1)
            self._asleep = True
        if self._offload:
            self.group.execute("reload")

    def sync(self) -> None:
        """Push the actor's weights into the engines (waking them first when they sleep)."""
        from megacov.trainer.session import sync_weights

        if self._asleep:
            self.engines.wake_up(["weights"])
        sync_weights(self._sync, self.group, self.plan)
        if self._offload:  # before the KV cache comes back
            self.group.execute("offload")
        if self._asleep:
            self.engines.wake_up(["kv_cache"])
            self._asleep = False

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, seed: int) -> list[list[Any]]:
        ro = self.cfg.rollout
        flat = self.engines.generate(prompts, n=n, temperature=temperature, top_p=ro.top_p, top_k=ro.top_k,
                                     max_tokens=ro.max_response_len, stop=list(ro.stop), seed=seed)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def evaluate(self) -> dict[str, float]:
        from megacov.trainer.evaluate import evaluate

        t = self.cfg.trainer
        return evaluate(self.eval_sets, self.generate, self.rewards, k=t.eval_n, temperature=t.eval_temperature,
                        seed=t.seed + EVAL_SEED_OFFSET)

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
                self.save(step)

    def _ceiling(self) -> dict[str, float]:
        from megacov.analysis.fit import predict_ceiling

        fit = predict_ceiling([h for h, _ in self.history], [r for _, r in self.history])
        if fit is None:
            return {}
        return {"fit/a": fit["a"], "fit/b": fit["b"], "fit/ceiling": fit["ceiling"], "fit/r2": fit["r2"]}

    def save(self, step: int) -> str:
        tmp = self.ckpt.begin(step)
        self.group.execute("save_checkpoint", tmp, self.cfg.checkpoint.save_optimizer)
        if self._offload:  # saving brought the state back; the engines generate next
            self.group.execute("offload")
        state = {"step": step, "loader": self.loader.state_dict(), "controller": self.controller.state_dict(),
                 "history": self.history, "init_path": os.path.abspath(self.init_path)}
        path = self.ckpt.commit(tmp, step, state)
        self.last_saved = step
        return path

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.log(step, metrics)
        self.metrics.progress(step, metrics)


def build_reward_manager(cfg: Any) -> tuple[Any, Any]:
    """The run's RewardManager and, for ``reward.name=judge``, the judge's engines (to shut down)."""
    from megacov.rewards import RewardManager

    r = cfg.reward
    if r.name != "judge":
        return RewardManager(r), None
    from megacov.rewards.judge import JudgeReward
    from megacov.trainer import session

    if not r.judge_model:
        from megacov.config import ConfigError

        raise ConfigError("reward.name=judge needs reward.judge_model (an HF directory)")
    judge_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engines=1, tp=1))
    engines = session.start_engines(judge_cfg, r.judge_model, max_model_len=_context_len(r.judge_model))
    judge = JudgeReward(engines, _tokenizer(r.judge_model), mode=r.judge_mode, verdicts=r.judge_verdicts)
    return RewardManager(r, judge=judge), engines


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
    from megacov.trainer.checkpoint import CheckpointError

    run_dir = os.path.join(cfg.trainer.output_dir, cfg.trainer.name)
    os.makedirs(run_dir, exist_ok=True)
    handlers = setup_logging(run_dir)
    try:
        return _run(cfg, plan, run_dir)
    except (DataError, RewardSpecError, CheckpointError, ModelCheckpointError) as exc:
        raise ConfigError(str(exc)) from None
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
    ctx = RunContext(cfg, plan, run_dir)
    try:
        ctx.start()
        from megacov.trainer.loop import rl_loop

        last = rl_loop(ctx)
        if last > ctx.last_saved and last > ctx.start_step:  # stopped early (trainer.total_epochs)
            ctx.save(last)
        if cfg.checkpoint.export_hf and last > 0:
            from megacov.trainer.session import export_hf

            out = export_hf(ctx.group, ctx.init_path, os.path.join(run_dir, "hf"))
            log.info("final policy exported to %s", out)
    finally:
        ctx.close()
    _finish(cfg, run_dir)
    log.info("run finished in %.0f s: %s", time.perf_counter() - start, run_dir)
    return 0


def _run_sft(cfg: Any, plan: Any, run_dir: str) -> int:
    from megacov.trainer.sft import run_sft

    steps = cfg.trainer.sft_steps or cfg.trainer.total_steps
    out = run_sft(cfg, plan, _tokenizer(cfg.model.path), steps=steps, out_dir=os.path.join(run_dir, "hf"),
                  metrics_path=os.path.join(run_dir, "metrics.jsonl"))
    log.info("SFT finished: %s", out)
    return 0


def _finish(cfg: Any, run_dir: str) -> None:
    if cfg.logging.plot:
        from megacov.trainer.metrics import plot_curves

        png = plot_curves(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "curves.png"))
        if png:
            log.info("curves: %s", png)
