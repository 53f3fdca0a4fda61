"""The critic as a Ray worker group beside the Megatron actor.

:class:`CriticWorker` is the object each rank hosts (one :class:`~megacov.critic.engine.CriticEngine`
per process, the ranks joined by gloo or nccl through :class:`~megacov.workers.group.WorkerGroup`);
:class:`CriticGroup` is what the trainer holds: typed ``values`` / ``update`` / ``save`` calls that
take the whole RL batch (every rank reads its own row block out of the same object-store copy).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

#: Folder of the critic inside a trainer checkpoint.
CKPT_SUBDIR = "critic"


def critic_epochs(cfg: Any) -> int:
    """Passes of the critic over an RL batch: ``critic.ppo_epochs``, else the actor's ``algorithm.ppo_epochs``."""
    c = cfg.critic.ppo_epochs
    return int(c) if c is not None else int(cfg.algorithm.ppo_epochs)


def _resolve(obj: Any) -> Any:
    """The batch travels once through the object store as a reference nested in the call's arguments,
    which Ray does not resolve by itself."""
    import ray

    return ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj


class CriticWorker:
    """One critic rank (constructed inside the Ray actor after torch.distributed is up)."""

    def __init__(self, critic_cfg: Any, init_path: str, seqs_per_update: int, resume_dir: Optional[str] = None) -> None:
        import torch.distributed as dist

        from megacov.critic.engine import CriticEngine, CriticShape

        shape = CriticShape(seqs_per_update, int(critic_cfg.micro_batch_size), dist.get_world_size())
        self.engine = CriticEngine(critic_cfg, init_path, shape, resume_dir=resume_dir)

    def values(self, batch: Any) -> torch.Tensor:
        batch = _resolve(batch)
        return self.engine.values(batch.input_ids, batch.position_ids)

    def update(self, batch: Any, returns: torch.Tensor, old_values: torch.Tensor, epochs: int) -> dict[str, float]:
        batch = _resolve(batch)
        return self.engine.update(batch.input_ids, batch.position_ids, batch.mask, returns, old_values,
                                  epochs=epochs)

    def save(self, out_dir: str) -> None:
        self.engine.save(out_dir)


class CriticGroup:
    """``critic.world_size`` DeepSpeed ranks on Ray, initialised from ``init_path`` (or resumed)."""

    def __init__(self, cfg: Any, init_path: str, *, seqs_per_update: int, env: dict[str, str],
                 resume_from: Optional[str] = None, use_gpu: bool = False) -> None:
        """``use_gpu`` is the runtime's decision from the cluster's resources, not this process's CUDA."""
        from megacov.workers.group import WorkerGroup

        c = cfg.critic
        resume_dir = os.path.join(resume_from, CKPT_SUBDIR) if resume_from else None
        gpus = 1.0 if use_gpu else 0.0
        self.epochs = critic_epochs(cfg)
        self.group = WorkerGroup(CriticWorker, int(c.world_size),
                                 args=(c, os.path.abspath(c.model_path or init_path), seqs_per_update),
                                 kwargs={"resume_dir": resume_dir}, cpus_per_worker=c.cpus_per_worker,
                                 gpus_per_worker=gpus, env=env, backend=cfg.parallel.backend, name="megacov-critic")

    def values(self, batch: Any) -> torch.Tensor:
        """[B, L] token values of the whole batch (column convention of the log-probs)."""
        import ray

        return torch.cat(self.group.execute("values", ray.put(batch)))

    def update(self, batch: Any, returns: torch.Tensor, old_values: torch.Tensor) -> dict[str, float]:
        """``critic_epochs(cfg)`` passes, one optimizer step per mini-batch in each; the value-loss metrics."""
        import ray

        return self.group.execute("update", ray.put(batch), returns, old_values, self.epochs)[0]

    def save(self, ckpt_dir: str) -> None:
        """Into ``<ckpt_dir>/critic/`` (the trainer's temp folder, renamed into place with the actor's)."""
        self.group.execute("save", os.path.join(ckpt_dir, CKPT_SUBDIR))

    def shutdown(self) -> None:
        self.group.shutdown()
