"""The running pieces of a job: Ray, the actor worker group, the vLLM engines, weight sync, export.

Kept apart from the loop so that the loop reads as the algorithm, and so that the warm-start, the
RL loop, ``megacov eval`` and the tests start these pieces the same way.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Optional

log = logging.getLogger(__name__)

#: HF files that are not weights and travel with every exported policy.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt")


def cpus_needed(cfg: Any, plan: Any) -> int:
    """CPUs the job books in Ray: training ranks, engine workers and (judge reward) judge engines."""
    engines = cfg.rollout.engines * cfg.rollout.tp * cfg.rollout.cpus_per_engine
    judge = cfg.rollout.cpus_per_engine if cfg.reward.name == "judge" else 0
    critic = cfg.critic.world_size * cfg.critic.cpus_per_worker if cfg.algorithm.advantage == "gae" else 0
    rm = cfg.reward.model_workers if cfg.reward.name == "model" else 0
    return plan.world_size * cfg.trainer.cpus_per_worker + engines + judge + critic + rm


def connect(cfg: Any, plan: Any) -> None:
    """Join ``trainer.ray_address`` / ``$RAY_ADDRESS``, or start a private local Ray.

    A private Ray gets at least as many logical CPUs as the job books: on a small machine the training
    ranks and the engines take turns (rollout, then training), so booking them on the same cores is
    what colocation means on CPU, not an over-subscription.
    """
    import ray

    from megacov.workers.cluster import _available_cpus, connect_ray, resolve_address

    if ray.is_initialized():
        return
    if resolve_address(cfg.trainer.ray_address) is None:
        # address="local": always a fresh private cluster, never one that `ray start` (or a stale
        # /tmp/ray/ray_current_cluster left by another job) advertises on this host.
        ray.init(address="local", num_cpus=max(_available_cpus(), cpus_needed(cfg, plan)), namespace="megacov",
                 include_dashboard=False, log_to_driver=True, configure_logging=False)
        return
    connect_ray(cfg.trainer.ray_address)


def worker_env() -> dict[str, str]:
    """Environment of every training rank: one BLAS/OpenMP thread per reserved CPU is set by Ray;
    megacov must be importable from the same tree as the driver."""
    import megacov

    root = os.path.dirname(os.path.dirname(os.path.abspath(megacov.__file__)))
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def start_actor_group(cfg: Any, plan: Any, model_path: str, *, total_updates: int, with_reference: bool,
                      reference_path: Optional[str] = None, mcore_checkpoint: Optional[str] = None) -> Any:
    """``plan.world_size`` :class:`~megacov.trainer.actor_worker.ActorWorker` ranks on Ray."""
    import torch

    from megacov.trainer.actor_worker import ActorWorker
    from megacov.workers.group import WorkerGroup

    gpus = 1.0 if torch.cuda.is_available() else 0.0
    if gpus and cfg.rollout.placement == "colocated":
        from megacov.workers.group import GPU_FRACTION_COLOCATED

        gpus = GPU_FRACTION_COLOCATED
    return WorkerGroup(ActorWorker, plan.world_size, args=(cfg, os.path.abspath(model_path)),
                       kwargs=dict(total_updates=total_updates, with_reference=with_reference,
                                   reference_path=reference_path, mcore_checkpoint=mcore_checkpoint),
                       cpus_per_worker=cfg.trainer.cpus_per_worker, gpus_per_worker=gpus, env=worker_env(),
                       backend=cfg.parallel.backend, name="megacov-actor")


def start_engines(cfg: Any, model_path: str, placement: Any = None, max_model_len: Optional[int] = None) -> Any:
    """The vLLM engines of ``rollout``, loaded from ``model_path`` (an HF directory)."""
    from megacov.rollout.engine import EngineSpec, RolloutEngines

    spec = EngineSpec.from_config(cfg, model_path=os.path.abspath(model_path))
    if max_model_len is not None:
        spec.max_model_len = max_model_len
    spec.env.update(worker_env())
    colocated = placement is not None and spec.use_gpu and spec.colocated
    return RolloutEngines(spec, cfg.rollout.engines, placement=placement if colocated else None)


def make_sync(cfg: Any, engines: Any) -> Any:
    from megacov.rollout.sync import WeightSync

    return WeightSync(engines, bucket_mb=cfg.rollout.sync_bucket_mb, transport=cfg.rollout.sync_transport)


def sync_weights(sync: Any, group: Any, plan: Any) -> Any:
    return sync.sync(group, tp=plan.tp, pp=plan.pp, dp=plan.dp)


def export_hf(group: Any, src_dir: str, out_dir: str) -> str:
    """Write the actor's weights as an HF directory (atomically): one safetensors file per pipeline
    stage plus the index, and the config/tokenizer files of ``src_dir``."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weight_map: dict[str, str] = {}
    for part in group.execute("export_hf_shard", tmp):
        if part:
            weight_map.update(part)
    if not weight_map:
        raise RuntimeError("export produced no tensors")
    total = sum(os.path.getsize(os.path.join(tmp, f)) for f in set(weight_map.values()))
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh, indent=1)
    for name in os.listdir(src_dir):
        path = os.path.join(src_dir, name)
        if os.path.isfile(path) and not name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, os.path.join(tmp, name))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return out_dir


def gather_shards(results: list[Any]) -> list[Any]:
    """The answers of the ranks that answer (one per DP replica), in DP order."""
    return [r for r in results if r is not None]
