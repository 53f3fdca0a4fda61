"""Checks that need more than one field: the parallel layout and the model's shape.

These run before anything heavy is imported or started, so a bad layout costs a second, not a
cluster allocation. Every failure is a :class:`ConfigError` whose one-line message names the keys
involved; the CLI turns it into exit code 2.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from megacov.config import ConfigError
from megacov.config.schema import MegacovConfig


@dataclass(frozen=True)
class ModelShape:
    """The few architecture numbers the layout depends on, read from an HF ``config.json``."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    hidden_size: int
    architecture: str

    @classmethod
    def from_hf_dir(cls, path: str) -> "ModelShape":
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ConfigError(f"model.path: no config.json in '{path}'")
        with open(cfg_file) as fh:
            hf = json.load(fh)
        heads = int(hf["num_attention_heads"])
        return cls(
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            architecture=(hf.get("architectures") or ["?"])[0],
        )


@dataclass(frozen=True)
class LayoutPlan:
    """What a run will occupy; printed by ``megacov train --dry-run``."""

    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    micro_batches_per_mini_batch: int
    mini_batches_per_step: int
    sequences_per_step: int
    rollout_engines: int
    rollout_tp: int
    placement: str
    devices_needed: int
    num_gpus: int

    def table(self) -> str:
        rows = [
            ("world size (training ranks)", self.world_size),
            ("actor TP x PP x DP", f"{self.tp} x {self.pp} x {self.dp}"),
            ("sequences per RL step", self.sequences_per_step),
            ("mini-batches per step", self.mini_batches_per_step),
            ("micro-batches per mini-batch (per DP rank)", self.micro_batches_per_mini_batch),
            ("micro-batch size", self.micro_batch_size),
            ("rollout engines x TP", f"{self.rollout_engines} x {self.rollout_tp}"),
            ("placement", self.placement),
            ("devices needed", f"{self.devices_needed} GPU(s)" if self.num_gpus else
             f"{self.world_size} CPU process(es) on gloo + {self.rollout_engines} vLLM engine(s)"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_positive(cfg: MegacovConfig) -> None:
    for key, value in [
        ("parallel.tp", cfg.parallel.tp), ("parallel.pp", cfg.parallel.pp),
        ("parallel.micro_batch_size", cfg.parallel.micro_batch_size),
        ("rollout.engines", cfg.rollout.engines), ("rollout.tp", cfg.rollout.tp),
        ("rollout.n", cfg.rollout.n), ("data.batch_size", cfg.data.batch_size),
        ("data.mini_batch_size", cfg.data.mini_batch_size),
    ]:
        _require(value >= 1, f"{key}={value} must be >= 1")
    if cfg.parallel.dp is not None:
        _require(cfg.parallel.dp >= 1, f"parallel.dp={cfg.parallel.dp} must be >= 1")


def _world_and_dp(cfg: MegacovConfig) -> tuple[int, int]:
    p = cfg.parallel
    mp = p.tp * p.pp
    if p.world_size is None:
        dp = p.dp or 1
        return mp * dp, dp
    _require(p.world_size % mp == 0,
             f"parallel.world_size={p.world_size} is not a multiple of parallel.tp*parallel.pp={mp}")
    dp = p.world_size // mp
    _require(p.dp is None or p.dp == dp,
             f"parallel.dp={p.dp} disagrees with parallel.world_size/(tp*pp)={dp}")
    return p.world_size, dp


def _check_model(cfg: MegacovConfig, shape: ModelShape) -> None:
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    _require(shape.num_heads % tp == 0,
             f"parallel.tp={tp} does not divide the model's {shape.num_heads} attention heads")
    _require(shape.num_kv_heads % tp == 0,
             f"parallel.tp={tp} does not divide the model's {shape.num_kv_heads} KV heads")
    _require(shape.num_layers % pp == 0,
             f"parallel.pp={pp} does not divide the model's {shape.num_layers} layers")
    rtp = cfg.rollout.tp
    _require(shape.num_heads % rtp == 0,
             f"rollout.tp={rtp} does not divide the model's {shape.num_heads} attention heads")


def _count_gpus() -> int:
    # torch is already a dependency; importing it here is fine (the dry run needs no megatron/vllm).
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_layout(cfg: MegacovConfig, shape: Optional[ModelShape] = None) -> LayoutPlan:
    """Validate the layout arithmetic and return what the run will occupy."""
    _check_positive(cfg)
    world, dp = _world_and_dp(cfg)
    if shape is not None:
        _check_model(cfg, shape)
    d, r = cfg.data, cfg.rollout
    _require(d.batch_size % d.mini_batch_size == 0,
             f"data.batch_size={d.batch_size} is not a multiple of data.mini_batch_size={d.mini_batch_size}")
    seqs_per_mini = d.mini_batch_size * r.n
    _require(seqs_per_mini % dp == 0,
             f"data.mini_batch_size*rollout.n={seqs_per_mini} sequences do not split over dp={dp} ranks")
    per_rank = seqs_per_mini // dp
    mbs = cfg.parallel.micro_batch_size
    _require(per_rank % mbs == 0,
             f"parallel.micro_batch_size={mbs} does not divide the {per_rank} sequences per DP rank "
             f"of a mini-batch (data.mini_batch_size*rollout.n/dp)")
    placement = r.placement
    _require(placement in ("colocated", "disaggregated"),
             f"rollout.placement='{placement}' must be 'colocated' or 'disaggregated'")
    num_gpus = cfg.parallel.num_gpus if cfg.parallel.num_gpus is not None else _count_gpus()
    rollout_devices = r.engines * r.tp
    if placement == "colocated":
        needed = max(world, rollout_devices)
    else:
        needed = world + rollout_devices
    if num_gpus > 0:
        _require(needed <= num_gpus,
                 f"layout needs {needed} GPUs (parallel.tp*pp*dp={world}, rollout.engines*tp="
                 f"{rollout_devices}, rollout.placement={placement}) but parallel.num_gpus={num_gpus}")
    return LayoutPlan(
        world_size=world, tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=dp, micro_batch_size=mbs,
        micro_batches_per_mini_batch=per_rank // mbs,
        mini_batches_per_step=d.batch_size // d.mini_batch_size,
        sequences_per_step=d.batch_size * r.n, rollout_engines=r.engines, rollout_tp=r.tp,
        placement=placement, devices_needed=needed, num_gpus=num_gpus,
    )


def validate(cfg: MegacovConfig, check_model: bool = True) -> LayoutPlan:
    """All start-up checks. Returns the layout plan; raises ConfigError on the first problem."""
    shape = ModelShape.from_hf_dir(cfg.model.path) if check_model else None
    plan = plan_layout(cfg, shape)
    _check_choices(cfg)
    _check_critic_and_reward_model(cfg, plan, check_model)
    from megacov.algorithms.checks import warn_algorithm_config  # lazy: pulls in torch

    warn_algorithm_config(cfg)
    return plan


def _check_critic_and_reward_model(cfg: MegacovConfig, plan: LayoutPlan, check_model: bool) -> None:
    from megacov.critic.plan import check_critic
    from megacov.rewards.model import RewardSpecError, check_reward_model

    check_critic(cfg, plan.devices_needed, plan.num_gpus)
    if check_model:
        try:
            check_reward_model(cfg.reward, cfg.model.path)
        except RewardSpecError as exc:
            raise ConfigError(str(exc)) from None


def _check_choices(cfg: MegacovConfig) -> None:
    a = cfg.algorithm
    choices = {
        "algorithm.cov_scope": (a.cov_scope, ("global", "global_old", "micro_batch")),
        "algorithm.loss_agg_mode": (a.loss_agg_mode, ("token-mean", "seq-mean-token-sum",
                                                      "seq-mean-token-mean", "seq-mean-token-sum-norm")),
        "data.on_bad_row": (cfg.data.on_bad_row, ("error", "skip")),
        "trainer.mode": (cfg.trainer.mode, ("rl", "sft")),
        "parallel.backend": (cfg.parallel.backend, ("auto", "nccl", "gloo")),
        "model.dtype": (cfg.model.dtype, ("auto", "fp32", "bf16", "fp16")),
    }
    for key, (value, allowed) in choices.items():
        _require(value in allowed, f"{key}='{value}' must be one of {', '.join(allowed)}")
