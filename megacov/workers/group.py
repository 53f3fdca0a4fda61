"""A Ray worker group: one Ray actor per Megatron rank, torch.distributed joined inside the group.

Why a generic host actor: the trainer, the reference model and ``megacov verify sync`` all need
"N processes, one per rank, with a process group between them", but they run different code in those
processes. :class:`WorkerGroup` starts ``world_size`` copies of a small host actor, agrees on a
rendezvous on rank 0's node (its routable IP and a port free *there*, never ``localhost``: see
:mod:`megacov.workers.cluster`), initialises ``torch.distributed`` (gloo on CPU, nccl on GPU) and only
then instantiates the user's class inside every actor. ``group.execute("method", ...)`` calls that
method on every rank and returns the results ordered by rank.

Resources are always explicit: every actor sits in its own bundle of a placement group
(``{CPU: n}`` or ``{GPU: 1, CPU: n}``), so two groups started by two jobs on one cluster cannot
silently share cores, and colocated rollout engines can be put into the *same* bundles as the
training ranks (they then share the GPUs; vLLM sleeps while training runs). Ray sets
``OMP_NUM_THREADS`` to an actor's ``num_cpus``; environment variables the caller passes are set
before any library is imported in the actor.

Ray is imported inside functions only, so ``import megacov.workers.group`` stays cheap.
"""
from __future__ import annotations

import datetime
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from megacov.workers.cluster import RendezvousMixin

log = logging.getLogger(__name__)

GPU_FRACTION_COLOCATED = 0.45
"""GPU share each of the two tenants of a colocated bundle asks for (training rank + engine worker).
Ray only books the fraction; memory is shared by vLLM sleeping while the actor trains."""


@dataclass(frozen=True)
class BundleSpec:
    cpus: float = 1.0
    gpus: float = 0.0

    def as_bundle(self) -> dict[str, float]:
        bundle = {"CPU": float(self.cpus)}
        if self.gpus:
            bundle["GPU"] = float(self.gpus)
        return bundle


class Placement:
    """A Ray placement group with ``count`` identical bundles, one per device slot.

    ``strategy`` is Ray's: ``PACK`` (fill nodes in order; the default, which keeps TP groups on one
    node when the bundles are in TP order), ``STRICT_PACK`` or ``SPREAD``.
    """

    def __init__(self, count: int, spec: BundleSpec, *, strategy: str = "PACK", name: str = "",
                 timeout_s: float = 300.0):
        import ray
        from ray.util.placement_group import placement_group

        if count < 1:
            raise ValueError(f"a placement needs at least one bundle, got {count}")
        self.count = count
        self.spec = spec
        # Ray refuses a second live group of the same name in a namespace: keep names unique.
        self.name = f"{name}-{uuid.uuid4().hex[:8]}" if name else ""
        self.pg = placement_group([spec.as_bundle() for _ in range(count)], strategy=strategy, name=self.name)
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except Exception as exc:  # GetTimeoutError: say what could not be placed
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            total = ray.cluster_resources()
            raise RuntimeError(
                f"could not place {count} bundle(s) of {spec.as_bundle()} within {timeout_s:.0f} s "
                f"(cluster has CPU={total.get('CPU', 0):g}, GPU={total.get('GPU', 0):g}); lower the "
                f"parallel sizes or cpus per worker, or add nodes"
            ) from exc

    def strategy(self, bundle_index: int, capture_child_tasks: bool = False) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not 0 <= bundle_index < self.count:
            raise IndexError(f"bundle {bundle_index} outside placement of {self.count} bundles")
        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=bundle_index,
                                                placement_group_capture_child_tasks=capture_child_tasks)

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.pg)


class RankHost(RendezvousMixin):
    """The Ray actor behind every rank: joins the process group, then hosts the user's worker object."""

    def __init__(self) -> None:
        self.worker: Any = None
        self.rank = -1

    def setup(self, rank: int, world_size: int, ip: str, port: int, backend: str, timeout_s: float,
              worker_cls: type | None, args: tuple, kwargs: dict) -> dict[str, Any]:
        import ray
        import torch
        import torch.distributed as dist

        from megacov.workers.cluster import collective_env, node_ip

        self.rank = rank
        gpu_ids = ray.get_gpu_ids()
        local_rank = 0
        if gpu_ids and os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):
            local_rank = int(gpu_ids[0])  # every GPU of the node is visible: select ours
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                          MASTER_ADDR=ip, MASTER_PORT=str(port))
        os.environ.update(collective_env(node_ip()))
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        dist.init_process_group(backend, init_method=f"tcp://{ip}:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        if worker_cls is not None:
            self.worker = worker_cls(*args, **kwargs)
        return {"rank": rank, "pid": os.getpid(), "backend": backend, "gpu_ids": [str(g) for g in gpu_ids],
                **self.node_info()}

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        target = self.worker if self.worker is not None else self
        fn = getattr(target, method, None)
        if fn is None or not callable(fn):
            raise AttributeError(f"rank {self.rank}: worker {type(target).__name__} has no method '{method}'")
        return fn(*args, **kwargs)

    def call_fn(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return fn(self.worker, *args, **kwargs)

    def teardown(self) -> None:
        import torch.distributed as dist

        close = getattr(self.worker, "close", None)
        if callable(close):
            close()
        self.worker = None
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerGroup:
    """``world_size`` Ray actors, one per rank, each hosting ``worker_cls(*args, **kwargs)``.

    ``placement`` (optional) is a :class:`Placement` shared with other tenants (colocated engines);
    the group then uses bundles ``bundle_offset .. bundle_offset + world_size - 1`` of it and books
    ``gpus_per_worker`` (a fraction) of each. Without it the group creates and owns its own placement.
    ``env`` is set in every actor before the worker class is imported.
    """

    def __init__(self, worker_cls: type | None, world_size: int, *, args: Sequence[Any] = (),
                 kwargs: dict[str, Any] | None = None, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, placement: Placement | None = None, bundle_offset: int = 0,
                 env: dict[str, str] | None = None, backend: str = "auto", name: str = "megacov-rank",
                 timeout_s: float = 600.0):
        import ray

        from megacov.workers.cluster import rendezvous_address

        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not ray.is_initialized():
            raise RuntimeError("Ray is not connected: call megacov.workers.cluster.connect_ray() first")
        self.world_size = world_size
        self._owns_placement = placement is None
        if placement is None:
            placement = Placement(world_size, BundleSpec(cpus_per_worker, 1.0 if gpus_per_worker else 0.0),
                                  name=f"{name}-pg")
        elif bundle_offset + world_size > placement.count:
            raise ValueError(f"placement has {placement.count} bundles, the group needs "
                             f"{bundle_offset}..{bundle_offset + world_size - 1}")
        self.placement = placement
        self.bundle_offset = bundle_offset
        env_vars = {k: str(v) for k, v in (env or {}).items()}
        actor_cls = ray.remote(RankHost)
        self.actors = [
            actor_cls.options(
                num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, name=None,
                scheduling_strategy=placement.strategy(bundle_offset + rank),
                runtime_env={"env_vars": env_vars} if env_vars else None,
            ).remote()
            for rank in range(world_size)
        ]
        try:
            ip, port = rendezvous_address(self.actors)
            self.rendezvous = (ip, port)
            self.infos = ray.get([
                actor.setup.remote(rank, world_size, ip, port, backend, timeout_s, worker_cls, tuple(args),
                                   dict(kwargs or {}))
                for rank, actor in enumerate(self.actors)
            ], timeout=timeout_s)
        except BaseException:
            self.shutdown()
            raise

    # -- calls -----------------------------------------------------------------------------------

    def execute_async(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Refs of ``worker.method(*args, **kwargs)`` on every rank, ordered by rank."""
        return [a.call.remote(method, args, kwargs) for a in self.actors]

    def execute(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``worker.method(*args, **kwargs)`` on every rank (concurrently); results ordered by rank."""
        import ray

        return ray.get(self.execute_async(method, *args, **kwargs))

    def execute_rank_async(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.actors[rank].call.remote(method, args, kwargs)

    def execute_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(self.execute_rank_async(rank, method, *args, **kwargs))

    def execute_ranks_async(self, ranks: Sequence[int], method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return [self.actors[r].call.remote(method, args, kwargs) for r in ranks]

    def execute_fn(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """``fn(worker, *args, **kwargs)`` on every rank: ad-hoc code without a method on the class."""
        import ray

        return ray.get([a.call_fn.remote(fn, args, kwargs) for a in self.actors])

    # -- lifetime --------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Destroy the process group in every actor, kill the actors, release an owned placement."""
        import ray

        actors, self.actors = list(getattr(self, "actors", [])), []
        if actors:
            try:
                ray.get([a.teardown.remote() for a in actors], timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - a rank that died or hung is killed below anyway
                log.warning("worker group teardown: %s", exc)
            for actor in actors:
                ray.kill(actor)
        if getattr(self, "_owns_placement", False) and getattr(self, "placement", None) is not None:
            self.placement.remove()
            self.placement = None

    def __enter__(self) -> WorkerGroup:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
