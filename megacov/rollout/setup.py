"""Start the actor ranks and the rollout engines with the placement the config asks for.

Three shapes, decided by ``rollout.placement`` and whether CUDA is present:

* **CPU**: every actor rank and every engine gets its own CPU bundle (``trainer.cpus_per_worker``,
  ``rollout.cpus_per_engine``); weights travel through Ray's object store. ``colocated`` means
  nothing on CPU and is treated as disaggregated.
* **GPU, disaggregated**: actor ranks get one GPU each, every engine its own ``rollout.tp`` GPUs;
  weights travel by NCCL broadcast.
* **GPU, colocated**: one placement group of ``max(world, engines * rollout.tp)`` GPU bundles shared by
  both: rank ``r`` and engine worker ``r`` book a fraction of the same GPU. All processes see the
  node's GPUs (each selects its own) so that engines can open the actor's CUDA IPC buffers; vLLM must
  sleep while the actor trains (:meth:`RolloutSetup.before_training`; :meth:`RolloutSetup.sync_weights`
wakes them).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megacov.rollout.engine import EngineSpec, RolloutEngines
from megacov.rollout.sync import SyncReport, WeightSync
from megacov.workers.group import GPU_FRACTION_COLOCATED, BundleSpec, Placement, WorkerGroup


@dataclass
class RolloutSetup:
    group: WorkerGroup
    engines: RolloutEngines
    weight_sync: WeightSync
    tp: int
    pp: int
    dp: int
    colocated_gpu: bool
    placement: Placement | None = None

    def sync_weights(self) -> SyncReport:
        """Push the actor's current weights into every engine (wakes colocated engines' weights first)."""
        if self.colocated_gpu:
            self.engines.wake_up(["weights"])
        report = self.weight_sync.sync(self.group, tp=self.tp, pp=self.pp, dp=self.dp)
        if self.colocated_gpu:
            self.engines.wake_up(["kv_cache"])
        return report

    def before_training(self) -> None:
        """Colocated GPU: give the engines' GPU memory to the actor (weights parked in host memory)."""
        if self.colocated_gpu:
            self.engines.sleep(level=1)

    def shutdown(self) -> None:
        self.engines.shutdown()
        self.group.shutdown()
        if self.placement is not None:
            self.placement.remove()
            self.placement = None


def launch(cfg: Any, worker_cls: type, worker_args: Sequence[Any] = (), *, use_gpu: bool | None = None,
           env: dict[str, str] | None = None) -> RolloutSetup:
    """Actor ranks (``worker_cls(*worker_args)`` in each) + engines + their weight sync, from ``cfg``."""
    import torch

    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    par, ro = cfg.parallel, cfg.rollout
    world = par.world_size or par.tp * par.pp * (par.dp or 1)
    dp = world // (par.tp * par.pp)
    spec = EngineSpec.from_config(cfg, use_gpu=use_gpu)
    colocated_gpu = use_gpu and ro.placement == "colocated"
    spec.colocated = colocated_gpu
    env = dict(env or {})
    placement = None
    try:
        if colocated_gpu:
            bundles = max(world, ro.engines * ro.tp)
            placement = Placement(bundles, BundleSpec(cfg.trainer.cpus_per_worker + ro.cpus_per_engine, 1.0),
                                  name="megacov-colocated")
            env.setdefault("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
            group = WorkerGroup(worker_cls, world, args=worker_args, cpus_per_worker=cfg.trainer.cpus_per_worker,
                                gpus_per_worker=GPU_FRACTION_COLOCATED, placement=placement, env=env,
                                backend=par.backend)
        else:
            group = WorkerGroup(worker_cls, world, args=worker_args, cpus_per_worker=cfg.trainer.cpus_per_worker,
                                gpus_per_worker=1.0 if use_gpu else 0.0, env=env, backend=par.backend)
        try:
            engines = RolloutEngines(spec, ro.engines, placement=placement)
        except BaseException:
            group.shutdown()
            raise
    except BaseException:
        if placement is not None:
            placement.remove()
        raise
    sync = WeightSync(engines, bucket_mb=ro.sync_bucket_mb, transport=ro.sync_transport)
    return RolloutSetup(group, engines, sync, par.tp, par.pp, dp, colocated_gpu, placement)
