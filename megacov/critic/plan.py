"""Start-up checks and ``--dry-run`` lines for the critic and the scalar reward model (no torch,
no DeepSpeed, no Ray imported: a bad setting costs a second, before any worker starts)."""
from __future__ import annotations

from typing import Any

from megacov.config import ConfigError

WHITEN = ("mean_std", "std", "none")


def uses_critic(cfg: Any) -> bool:
    return cfg.algorithm.advantage == "gae"


def check_critic(cfg: Any, devices_needed: int, num_gpus: int) -> None:
    a, c = cfg.algorithm, cfg.critic

    def require(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    require(0 < a.gamma <= 1, f"algorithm.gamma={a.gamma} must be in (0, 1]")
    require(0 <= a.lam <= 1, f"algorithm.lam={a.lam} must be in [0, 1]")
    require(a.gae_whiten in WHITEN, f"algorithm.gae_whiten='{a.gae_whiten}' must be one of {', '.join(WHITEN)}")
    if not uses_critic(cfg):
        return
    require(c.zero_stage in (2, 3), f"critic.zero_stage={c.zero_stage} must be 2 or 3")
    require(c.world_size >= 1, f"critic.world_size={c.world_size} must be >= 1")
    require(c.micro_batch_size >= 1, f"critic.micro_batch_size={c.micro_batch_size} must be >= 1")
    require(c.lr > 0, f"critic.lr={c.lr} must be > 0")
    require(c.value_clip is None or c.value_clip >= 0, f"critic.value_clip={c.value_clip} must be >= 0 or null")
    require(c.dtype in ("auto", "fp32", "bf16"), f"critic.dtype='{c.dtype}' must be one of auto, fp32, bf16")
    require(0 <= c.warmup_steps < cfg.trainer.total_steps,
            f"critic.warmup_steps={c.warmup_steps} must be in [0, trainer.total_steps={cfg.trainer.total_steps})")
    seqs = cfg.data.mini_batch_size * cfg.rollout.n
    require(seqs % (c.world_size * c.micro_batch_size) == 0,
            f"critic.world_size*critic.micro_batch_size={c.world_size}x{c.micro_batch_size} does not divide the "
            f"{seqs} sequences of a mini-batch (data.mini_batch_size*rollout.n)")
    require(num_gpus == 0 or devices_needed + c.world_size <= num_gpus,
            f"the critic needs critic.world_size={c.world_size} GPU(s) beside the {devices_needed} of the actor and "
            f"the engines, but parallel.num_gpus={num_gpus}")


def placement_lines(cfg: Any) -> list[str]:
    """What ``megacov train --dry-run`` adds for the critic and the reward model."""
    out = []
    if uses_critic(cfg):
        c = cfg.critic
        off = ", optimizer state offloaded to CPU" if c.offload_optimizer else ""
        out.append(f"critic (DeepSpeed ZeRO-{c.zero_stage}{off}): {c.world_size} rank(s) x "
                   f"{c.cpus_per_worker} CPU (1 GPU each on GPU machines), from "
                   f"{c.model_path or 'the actor initial weights'}")
    if cfg.reward.name == "model":
        r = cfg.reward
        rule = f" + {r.rule_weight:g} x rule '{r.rule}'" if r.rule else ""
        where = f"{r.model_workers} Ray rank(s), 1 GPU each on GPU machines" if r.model_workers else "in the driver"
        out.append(f"reward model (HF sequence classification, {where}): {r.model_path}, batches of "
                   f"{r.model_batch_size}, score = {r.model_weight:g} x model{rule}"
                   f"{', running-normalised' if r.model_normalize else ''}")
    return out
