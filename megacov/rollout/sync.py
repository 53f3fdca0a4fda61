"""Weight sync driver: Megatron TP x PP shards -> every rollout engine, through vLLM's lifecycle.

One sync, as the driver sees it (:meth:`WeightSync.sync`): every actor rank runs ``send_weights()``
(:class:`~megacov.rollout.sender.WeightSenderMixin`), which drives its trainer-side transfer engine
built by vLLM's ``WeightTransferTrainerFactory``. Actor rank 0 calls the engines' vLLM lifecycle
through vLLM's ``RayVLLMWeightSyncClient``: ``start_weight_update``, ``update_weights`` (while every
pipeline stage's exporting rank sends its own layers, all stages at once), ``finish_weight_update``
with the new weight version. Each engine then checks that every tensor it expects arrived exactly
once and resets its prefix cache (:meth:`~megacov.rollout.engine.EngineActor.finish_weight_update`).

After the round trip the driver reads every engine's state: an engine that is not at the new
version, or whose update was incomplete, fails the sync (:class:`SyncError`): a stale engine is
detected here, not in a rollout's log-probs.

Which vLLM backend carries the bytes is decided per engine by :mod:`megacov.rollout.plan`; on CPU
it is ``megacov_gloo`` (:mod:`megacov.rollout.transfer`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from megacov.rollout.buckets import SyncError

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    seconds: float
    bytes: int
    """Bytes sent by the exporting ranks (every engine worker receives all of them)."""
    engines: int
    buckets: int
    tensors: int
    oversized_buckets: int
    largest_group_bytes: int
    exporter_held_peak_bytes: int
    """Most bytes one exporting rank held at once (staging buffer fill + the group being assembled)."""
    exporter_peak_extra_bytes: int | None
    """Largest rise of an exporting rank's resident memory during its send (VmHWM)."""
    engine_peak_extra_bytes: int | None
    engine_load_seconds: float
    version: int
    transport: str
    stage_windows: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) wall-clock time of every stage's send: overlapping windows = concurrent stages."""
    per_rank: list[Any] = field(repr=False, default_factory=list)


class WeightSync:
    """Connects an actor group to a :class:`~megacov.rollout.engine.RolloutEngines` and syncs it."""

    def __init__(self, engines: Any, *, bucket_mb: float, transport: str = "megacov_gloo",
                 timeout_s: float = 600.0):
        if bucket_mb <= 0:
            raise SyncError(f"rollout.sync_bucket_mb must be positive, got {bucket_mb}")
        self.engines = engines
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self.transport = transport
        self.timeout_s = timeout_s
        self.version = 0
        self._connected: Any = None
        self.routes: list[Any] = []
        """Per engine: node and backend, decided at :meth:`connect` from where things actually run."""

    def connect(self, actor: Any) -> None:
        """Rendezvous every actor rank's trainer-side engine with every engine worker (once)."""
        if self._connected is actor:
            return
        stages = sorted(e for e in actor.transfer_endpoints() if e is not None)
        if [s for s, _, _ in stages] != list(range(len(stages))):
            raise SyncError(f"expected one exporting rank per pipeline stage, got stages {[s for s, _, _ in stages]}")
        if self.transport != "megacov_gloo" and len(stages) > 1:
            raise SyncError(f"vLLM's '{self.transport}' engine has one sender; with parallel.pp={len(stages)} "
                            f"use rollout.sync_transport=gloo (one sender per stage) or auto")
        info = {"backend": self.transport, "endpoints": [[host, port] for _, host, port in stages],
                "world_size": 1 + self.engines.count * self.engines.spec.tp, "bucket_bytes": self.bucket_bytes,
                "groups": self.engines.weight_groups(), "timeout_s": self.timeout_s}
        from megacov.rollout.plan import route_engines, routes_table

        self.routes = route_engines("auto" if self.transport == "megacov_gloo" and not self.engines.spec.use_gpu
                                    else self.transport, use_gpu=self.engines.spec.use_gpu,
                                    exporter_nodes=[host for _, host, _ in stages],
                                    engine_nodes=[i["node_ip"] for i in self.engines.infos], pp=len(stages))
        log.info("weight sync per engine (exporters on %s):\n%s", sorted({h for _, h, _ in stages}),
                 routes_table(self.routes))
        actor.init_weight_transfer(info, self.engines.weight_client())
        self._connected = actor
        self.version = max([s["version"] for s in self.engines.weight_states()] + [self.version])

    def disconnect(self) -> None:
        """Forget the rendezvous (the engines were replaced): the next sync connects again."""
        self._connected = None

    def sync(self, actor: Any) -> SyncReport:
        """Push the actor's current weights into every engine; raise :class:`SyncError` if any is stale."""
        self.connect(actor)
        start = time.perf_counter()
        self.version += 1
        try:
            results = actor.send_weights(self.version, timeout_s=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - the engines stay marked inconsistent
            raise SyncError(f"weight sync failed; the engines refuse to generate until a sync succeeds: "
                            f"{_first_line(exc)}") from exc
        seconds = time.perf_counter() - start
        if self.transport != "megacov_gloo":  # vLLM's engines finish without a version: record it here
            self.engines.set_weight_version(self.version)
        states = self.engines.weight_states()
        stale = [s for s in states if s["version"] != self.version or not s["consistent"]]
        if stale:
            s = stale[0]
            raise SyncError(f"engine {s['index']} holds weight version {s['version']} (consistent={s['consistent']}) "
                            f"after sync {self.version}: it is stale")
        exporters = [r for r in results if r]
        workers = [w for s in states for w in s["workers"]]
        return SyncReport(
            seconds=seconds, bytes=sum(r["bytes"] for r in exporters), engines=self.engines.count,
            buckets=sum(r["buckets"] for r in exporters), tensors=sum(r["tensors"] for r in exporters),
            oversized_buckets=sum(r["oversized_buckets"] for r in exporters),
            largest_group_bytes=max((r["largest_group_bytes"] for r in exporters), default=0),
            exporter_held_peak_bytes=max((r["peak_held_bytes"] for r in exporters), default=0),
            exporter_peak_extra_bytes=_max_or_none(r.get("peak_extra_bytes") for r in exporters),
            engine_peak_extra_bytes=_max_or_none(w.get("peak_extra_bytes") for w in workers),
            engine_load_seconds=max((w["load_s"] for w in workers), default=0.0),
            version=self.version, transport=self.transport,
            stage_windows=[(r["start_s"], r["end_s"]) for r in sorted(exporters, key=lambda r: r["stage"])],
            per_rank=results,
        )


def _max_or_none(values: Iterable[int | None]) -> int | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _first_line(exc: BaseException) -> str:
    """The innermost error of a Ray task failure, on one line."""
    text = str(getattr(exc, "cause", None) or exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
