"""The :class:`Runtime`: one object that starts and owns Ray, the actor group, the engines and the sync.

Building it does nothing; every start is an explicit method, in the order a job needs them
(``connect`` -> ``start_actor`` -> ``start_engines`` -> ``sync``). What it started, it tears down in
:meth:`Runtime.close`, whatever failed in between.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from megacov.runtime.layout import BundleLayout, ClusterView, decide_gpu, needs_reference, reference_note

if TYPE_CHECKING:
    from megacov.rollout.backend import RolloutBackend

log = logging.getLogger(__name__)


def worker_env() -> dict[str, str]:
    """Environment of every rank and engine: megacov importable from the driver's tree, and the
    libraries' known warnings filtered at the source (remote nodes do not inherit the driver's env)."""
    import megacov
    from megacov.trainer.startup import quiet_warnings_env

    root = os.path.dirname(os.path.dirname(os.path.abspath(megacov.__file__)))
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {"PYTHONPATH": os.pathsep.join(paths), "PYTHONWARNINGS": quiet_warnings_env()}


def cpus_needed(cfg: Any, world: int) -> int:
    """CPUs the job books in Ray: training ranks, engine workers, judge engines, critic and reward-model ranks."""
    engines = cfg.rollout.engines * cfg.rollout.tp * cfg.rollout.cpus_per_engine
    judge = cfg.rollout.cpus_per_engine if cfg.reward.name == "judge" else 0
    critic = cfg.critic.world_size * cfg.critic.cpus_per_worker if cfg.algorithm.advantage == "gae" else 0
    rm = cfg.reward.model_workers if cfg.reward.name == "model" else 0
    return world * cfg.trainer.cpus_per_worker + engines + judge + critic + rm


class Runtime:
    """Ray + actor group + rollout engines + weight sync of one job, built from ``cfg`` and ``plan``."""

    def __init__(self, cfg: Any, plan: Any, *, call_timeout_s: Optional[float] = None,
                 rank_timeout_s: Optional[float] = None) -> None:
        self.cfg, self.plan = cfg, plan
        self.call_timeout_s = call_timeout_s
        """Deadline of the engines' control calls and of a weight sync (None: wait)."""
        self.rank_timeout_s = rank_timeout_s if rank_timeout_s is not None else call_timeout_s
        """Deadline of calls into the actor ranks (None: wait)."""
        self.cluster: Optional[ClusterView] = None
        self.use_gpu = False
        self.offload = False
        """Colocated GPU runs move the actor's training state to host memory while the engines generate."""
        self.layout: Optional[BundleLayout] = None
        self.placement: Any = None
        self.actor: Any = None
        self.engines: Optional[RolloutBackend] = None
        self.weight_sync: Any = None
        self.with_reference = needs_reference(cfg)
        self.started: list[str] = []
        """What this runtime built, in order (``actor``, ``reference``, ``engines``, ``sync``)."""
        self._asleep = False
        self._owns_ray = False
        self.engines_replaced = 0
        """Engines replaced by :meth:`restart_engines` so far (the run's ``engine/replaced``)."""

    # -- start -------------------------------------------------------------------------------------

    def connect(self) -> ClusterView:
        """Join ``trainer.ray_address`` / ``$RAY_ADDRESS``, or start a private local Ray; then decide
        CPU or GPU from what the cluster declares."""
        import ray

        from megacov.workers.cluster import _available_cpus, connect_ray, resolve_address

        if not ray.is_initialized():
            if resolve_address(self.cfg.trainer.ray_address) is None:
                # A private cluster never joins one that `ray start` advertises on this host. It gets at
                # least the CPUs the job books: on a small machine ranks and engines take turns.
                ray.init(address="local", num_cpus=max(_available_cpus(), cpus_needed(self.cfg, self.plan.world_size)),
                         namespace="megacov", include_dashboard=False, log_to_driver=True, configure_logging=False)
                self._owns_ray = True
            else:
                connect_ray(self.cfg.trainer.ray_address)
        self.cluster = ClusterView.from_ray()
        self.use_gpu = decide_gpu(self.cfg, self.cluster)
        from megacov.config.validate import offload_enabled

        self.offload = offload_enabled(self.cfg, on_gpu=self.use_gpu)
        self.layout = BundleLayout.plan(self.cfg, self.plan.world_size, self.use_gpu)
        log.info("cluster: %g CPU, %g GPU on %d node(s): %s path; %s", self.cluster.cpus, self.cluster.gpus,
                 self.cluster.nodes, "GPU" if self.use_gpu else "CPU", self.layout.describe())
        log.info(reference_note(self.cfg))
        return self.cluster

    def _shared_placement(self) -> Any:
        from megacov.workers.group import BundleSpec, Placement

        if self.layout is None or not self.layout.shared:
            return None
        if self.placement is None:
            b = self.layout.bundle
            self.placement = Placement(self.layout.bundles, BundleSpec(b["CPU"], b.get("GPU", 0.0)),
                                       name="megacov-colocated")
        return self.placement

    def start_actor(self, model_path: str, *, total_updates: int, cfg: Any = None,
                    with_reference: Optional[bool] = None, reference_path: Optional[str] = None,
                    mcore_checkpoint: Optional[str] = None) -> Any:
        """``plan.world_size`` actor ranks (:class:`~megacov.trainer.actor_worker.ActorWorker`); the
        reference is built on them only when a KL term reads it."""
        from megacov.trainer.actor_worker import ActorWorker

        cfg = cfg or self.cfg
        ref = self.with_reference if with_reference is None else with_reference
        actor = self.start_group(ActorWorker, (cfg, os.path.abspath(model_path)),
                                 dict(total_updates=total_updates, with_reference=ref, reference_path=reference_path,
                                      mcore_checkpoint=mcore_checkpoint), backend=cfg.parallel.backend)
        self.started += ["actor"] + (["reference"] if ref else [])
        return actor

    def start_group(self, worker_cls: type, args: tuple = (), kwargs: Optional[dict] = None, *,
                    backend: str = "auto", world_size: Optional[int] = None) -> Any:
        """Any per-rank worker class on the actor's bundles (``megacov verify sync`` uses its own)."""
        from megacov.workers.actors import ActorGroup
        from megacov.workers.group import WorkerGroup

        self._require_connected()
        env = worker_env()
        placement = self._shared_placement()
        if placement is not None:
            env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"  # engines open the ranks' IPC buffers
        group = WorkerGroup(worker_cls, world_size or self.plan.world_size, args=args, kwargs=kwargs or {},
                            cpus_per_worker=self.layout.rank_cpus, gpus_per_worker=self.layout.rank_gpus,
                            placement=placement, env=env, backend=backend, name="megacov-actor")
        self.actor = ActorGroup(group, timeout_s=self.rank_timeout_s)
        return self.actor

    def stop_actor(self) -> None:
        """Shut the actor group down (the warm-start's group, before RL starts its own)."""
        if self.actor is not None:
            self.actor.shutdown()
            self.actor = None
            self.weight_sync = None

    def engine_spec(self, model_path: str, max_model_len: Optional[int] = None, cfg: Any = None) -> Any:
        from megacov.rollout.engine import EngineSpec

        spec = EngineSpec.from_config(cfg or self.cfg, model_path=os.path.abspath(model_path), use_gpu=self.use_gpu)
        spec.colocated = bool(self.layout is not None and self.layout.shared)
        if max_model_len is not None:
            spec.max_model_len = max_model_len
        spec.env.update(worker_env())
        return spec

    def start_engines(self, model_path: str, *, cfg: Any = None, max_model_len: Optional[int] = None,
                      engines: Optional[int] = None, primary: bool = True) -> Any:
        """The rollout engines (in the ranks' bundles when colocated on GPU). ``primary=False``: extra
        engines the caller owns (the judge's), never colocated and never synced."""
        from megacov.rollout.engine import RolloutEngines
        from megacov.rollout.plan import route_engines

        self._require_connected()
        cfg = cfg or self.cfg
        spec = self.engine_spec(model_path, max_model_len, cfg)
        spec.colocated = spec.colocated and primary
        count = engines or cfg.rollout.engines
        routes = route_engines(cfg.rollout.sync_transport, use_gpu=self.use_gpu, exporter_nodes=["node0"],
                               engine_nodes=["node0" if spec.colocated else f"engine-node{e}" for e in range(count)],
                               pp=cfg.parallel.pp)
        spec.transfer_backend = routes[0].backend
        pool = RolloutEngines(spec, count, placement=self._shared_placement() if spec.colocated else None,
                              call_timeout_s=self.call_timeout_s)
        if primary:
            self.engines = pool
            self.started.append("engines")
        return pool

    def connect_sync(self) -> Any:
        """The weight sync between the actor group and the engines (rendezvous on first use)."""
        from megacov.rollout.sync import WeightSync

        if self.weight_sync is None:
            self.weight_sync = WeightSync(self.engines, bucket_mb=self.cfg.rollout.sync_bucket_mb,
                                          transport=self.engines.spec.transfer_backend,
                                          **({} if self.call_timeout_s is None else {"timeout_s": self.call_timeout_s}))
            self.started.append("sync")
        return self.weight_sync

    def start(self, model_path: str, *, total_updates: int, mcore_checkpoint: Optional[str] = None) -> None:
        """Everything an RL run needs, in order."""
        if self.cluster is None:
            self.connect()
        self.start_actor(model_path, total_updates=total_updates, reference_path=self.cfg.model.reference_path,
                         mcore_checkpoint=mcore_checkpoint)
        self.start_engines(model_path)
        self.connect_sync()

    # -- during the run ----------------------------------------------------------------------------

    @property
    def colocated_gpu(self) -> bool:
        return bool(self.layout is not None and self.layout.shared)

    def release_engines(self) -> None:
        """Colocated on GPU: vLLM offloads its weights and drops its KV cache while the actor trains."""
        if self.colocated_gpu and not self._asleep:
            self.engines.sleep(level=1)
            self._asleep = True
        if self.offload:
            self.actor.reload()

    def sync(self) -> Any:
        """Push the actor's weights into the engines (waking them first when they sleep). A dead or
        wedged engine raises :class:`~megacov.runtime.recovery.EngineFault` naming it: found by a
        liveness check before the transfer group is formed, or during the transfer itself."""
        if self._asleep:
            self.engines.wake_up(["weights"])
        self.engines.probe()
        report = self.connect_sync().sync(self.actor)
        if self.offload:  # before the KV cache comes back
            self.actor.offload()
        if self._asleep:
            self.engines.wake_up(["kv_cache"])
            self._asleep = False
        return report

    def restart_engines(self, faulty: Sequence[int] = (), *, catch_up: bool = True) -> list[int]:
        """Replace engines ``faulty`` (all when empty) and any other that is dead or does not answer;
        keep the healthy ones, with their weights. Returns the replaced indices.

        ``catch_up``: the actor holds the weights the engines last completed a sync to (a fault during
        a rollout): the replacements, and any survivor not at that version (vLLM's own record is
        checked), receive them through a transfer group of their own, labelled with that version;
        every engine is then at the same version. Otherwise (a fault during a sync, whose retry
        brings every engine to the actor's new weights) nothing is sent here. Either way the next
        sync forms the transfer group again, over the new engine set."""
        engines, weights = self.engines, self.connect_sync()
        named = set(faulty or range(engines.count))
        asked = time.perf_counter()
        health = engines.health([i for i in range(engines.count) if i not in named], self.call_timeout_s)
        dead = sorted(named | {i for i, s in health.items() if s is None})
        log.info("engine restart: %s answered in %.1f s; replacing %s", sorted(i for i, s in health.items() if s),
                 time.perf_counter() - asked, dead)
        if self._asleep:  # colocated GPU: the survivors come back with the replacements
            engines.wake_up(indices=[i for i in range(engines.count) if i not in dead])
            self._asleep = False
        engines.replace(dead)
        self.engines_replaced += len(dead)
        weights.disconnect()
        if not catch_up:
            return dead
        version = weights.completed
        stale = [i for i in range(engines.count) if i in dead or not _holds(health.get(i), version)]
        if version > 0 and stale:
            weights.sync(self.actor, stale, version=version)
            weights.disconnect()  # the next sync forms the group over every engine
        states = engines.weight_states()
        behind = [s["index"] for s in states if not _holds(s, version)]
        if behind:
            from megacov.rollout.buckets import SyncError

            raise SyncError(f"after replacing engine(s) {dead}, engine(s) {behind} do not hold weight version "
                            f"{version}: {states}")
        return dead

    # -- stop --------------------------------------------------------------------------------------

    def close(self) -> None:
        for closer in (getattr(self.engines, "shutdown", None), getattr(self.actor, "shutdown", None),
                       getattr(self.placement, "remove", None)):
            if closer is not None:
                try:
                    closer()
                except Exception as exc:  # noqa: BLE001 - keep tearing down the rest
                    log.warning("teardown: %s", exc)
        self.engines = self.actor = self.placement = self.weight_sync = None

    def _require_connected(self) -> None:
        if self.cluster is None or self.layout is None:
            raise RuntimeError("Runtime.connect() first")

    def __enter__(self) -> Runtime:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _holds(state: Optional[dict[str, Any]], version: int) -> bool:
    """An engine's weight state is complete and at ``version``, by megacov's count and by vLLM's record
    (vLLM has none before the first sync: the engine holds the weights it started from)."""
    if state is None or not state["consistent"] or state["version"] != version:
        return False
    return state["vllm_version"] == (str(version) if version > 0 else state["vllm_version"])
