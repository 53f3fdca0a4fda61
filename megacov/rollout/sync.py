"""Weight sync driver: Megatron TP x PP shards -> every rollout engine, through vLLM's lifecycle.

One sync, as the driver sees it (:meth:`WeightSync.sync`): every actor rank runs ``send_weights()``
(:class:`~megacov.rollout.sender.WeightSenderMixin`), which drives its trainer-side transfer engine
built by vLLM's ``WeightTransferTrainerFactory``. Actor rank 0 calls the engines' vLLM lifecycle
through a client of vLLM's ``VLLMWeightSyncClient`` protocol: ``start_weight_update``, ``update_weights`` (while every
pipeline stage's exporting rank sends its own layers, all stages at once), ``finish_weight_update``
with the new weight version. Each engine then checks that every tensor it expects arrived exactly
once and resets its prefix cache (:meth:`~megacov.rollout.engine.EngineActor.finish_weight_update`).
The client is :class:`~megacov.rollout.engine.EngineWeightClient` (vLLM's client protocol, every call
with a deadline): an engine that dies or wedges mid-sync fails the sync as an
:class:`~megacov.runtime.recovery.EngineFault` naming it, the actor ranks leave the transfer together,
and the next sync forms the transfer groups again (over replacements, when recovery made some).

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
        """The last version a sync was started for."""
        self.completed = 0
        """The last version every engine completed: the actor's weights as the engines hold them."""
        self._connected: Any = None
        self.routes: list[Any] = []
        """Per engine: node and backend, decided at :meth:`connect` from where things actually run."""

    def connect(self, actor: Any, indices: list[int] | None = None) -> None:
        """Rendezvous every actor rank's trainer-side engine with the workers of engines ``indices``
        (all by default); again only when the actor group or the engine set changed."""
        chosen = list(range(self.engines.count)) if indices is None else sorted(indices)
        if self._connected is not None and self._connected[0] is actor and self._connected[1] == tuple(chosen):
            return
        stages = sorted(e for e in actor.transfer_endpoints() if e is not None)
        if [s for s, _, _ in stages] != list(range(len(stages))):
            raise SyncError(f"expected one exporting rank per pipeline stage, got stages {[s for s, _, _ in stages]}")
        if self.transport != "megacov_gloo" and len(stages) > 1:
            raise SyncError(f"vLLM's '{self.transport}' engine has one sender; with parallel.pp={len(stages)} "
                            f"use rollout.sync_transport=gloo (one sender per stage) or auto")
        info = {"backend": self.transport, "endpoints": [[host, port] for _, host, port in stages],
                "world_size": 1 + len(chosen) * self.engines.spec.tp, "bucket_bytes": self.bucket_bytes,
                "groups": self.engines.weight_groups(), "timeout_s": self.timeout_s}
        from megacov.rollout.plan import route_engines, routes_table

        self.routes = route_engines("auto" if self.transport == "megacov_gloo" and not self.engines.spec.use_gpu
                                    else self.transport, use_gpu=self.engines.spec.use_gpu,
                                    exporter_nodes=[host for _, host, _ in stages],
                                    engine_nodes=[i["node_ip"] for i in self.engines.infos], pp=len(stages))
        if indices is None:
            log.info("weight sync per engine (exporters on %s):\n%s", sorted({h for _, h, _ in stages}),
                     routes_table(self.routes))
        self._connected = None
        try:
            actor.init_weight_transfer(info, self.engines.weight_client(chosen, self.timeout_s),
                                       timeout_s=self._rank_deadline())
        except Exception as exc:  # noqa: BLE001 - an engine fault passes as it is
            raise _engine_fault_or(exc, "weight-transfer rendezvous failed") from exc
        self._connected = (actor, tuple(chosen))
        self.version = max([s["version"] for s in self.engines.weight_states()] + [self.version])

    def disconnect(self) -> None:
        """Forget the rendezvous (engines were replaced): the next sync forms the group again."""
        self._connected = None

    def _rank_deadline(self) -> float:
        """The ranks' own deadline: rank 0 waits up to ``timeout_s`` for an engine, then everybody leaves."""
        return 2 * self.timeout_s + 30.0

    def sync(self, actor: Any, indices: list[int] | None = None, version: int | None = None) -> SyncReport:
        """Push the actor's current weights into engines ``indices`` (all by default), as weight
        ``version`` (the next one by default); raise :class:`SyncError` if any of them is stale, and
        :class:`~megacov.runtime.recovery.EngineFault` naming an engine that died or wedged."""
        self.connect(actor, indices)
        start = time.perf_counter()
        if version is None:
            self.version += 1
            version = self.version
        try:
            results = actor.send_weights(version, timeout_s=self._rank_deadline())
        except Exception as exc:  # noqa: BLE001 - the engines stay marked inconsistent
            self._connected = None  # the transfer groups were torn down: the next sync forms them again
            raise _engine_fault_or(exc, "weight sync failed; the engines refuse to generate until a sync "
                                        "succeeds") from exc
        chosen = list(range(self.engines.count)) if indices is None else sorted(indices)
        seconds = time.perf_counter() - start
        if self.transport != "megacov_gloo":  # vLLM's engines finish without a version: record it here
            self.engines.set_weight_version(version)
        states = [s for s in self.engines.weight_states() if s["index"] in chosen]
        stale = [s for s in states if s["version"] != version or not s["consistent"]]
        if stale:
            s = stale[0]
            raise SyncError(f"engine {s['index']} holds weight version {s['version']} (consistent={s['consistent']}) "
                            f"after sync {version}: it is stale")
        if indices is None:
            self.completed = version
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
            version=version, transport=self.transport,
            stage_windows=[(r["start_s"], r["end_s"]) for r in sorted(exporters, key=lambda r: r["stage"])],
            per_rank=results,
        )


def _engine_fault_or(exc: BaseException, what: str) -> BaseException:
    """The engine fault behind ``exc`` (it names the engine; recovery replaces it), else a SyncError."""
    from megacov.runtime.recovery import EngineFault, find_fault

    fault = find_fault(exc)
    if fault is not None:
        return EngineFault(fault.who, fault.call, fault.kind, fault.detail)
    return SyncError(f"{what}: {_first_line(exc)}")


def _max_or_none(values: Iterable[int | None]) -> int | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _first_line(exc: BaseException) -> str:
    """The innermost error of a Ray task failure, on one line."""
    text = str(getattr(exc, "cause", None) or exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
