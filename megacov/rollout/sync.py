"""Weight sync: Megatron TP x PP shards -> every rollout engine, in bounded memory, checked complete.

The flow of one sync (driven by :meth:`WeightSync.sync` on the driver):

1. every engine opens an update (vLLM layer-wise reload, :mod:`megacov.rollout.extension`);
2. every actor rank runs its worker's ``push_weights(plan)``, which feeds the model's HF-named export
   (``megacov.models.iter_hf_weights``: TP shards gathered inside each TP group, each pipeline stage
   exporting its own layers) into :func:`push_weights`. Only TP rank 0 of each stage of DP replica 0
   receives tensors; the other TP ranks take part in the gathers and send nothing;
3. :func:`push_weights` groups the stream into buckets of ``rollout.sync_bucket_mb`` that never split
   a fused engine module, and sends bucket after bucket, waiting for every engine before building the
   next one;
4. every engine closes the update, checks that each tensor it expects arrived exactly once (a missing
   stage or layer is an error, not a silently stale engine) and resets its prefix cache.

Transports: ``object_store`` (CPU or any setup: the bucket goes into Ray's shared-memory object store
once and every engine on the node reads it without a copy), ``cuda_ipc`` (colocated on GPU: the bucket
is staged in one CUDA buffer whose IPC handle the engine workers open) and ``nccl`` (disaggregated on
GPU: a broadcast from the stage's exporting rank to every engine worker). The GPU transports are
written for CUDA and are not exercised by the CPU test suite.

Memory bound on an exporting rank: one bucket plus the fused group being assembled (which is one
megatron tensor such as ``linear_qkv.weight``, i.e. the largest tensor); engines additionally map the
bucket they are loading.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from megacov.rollout.buckets import (
    FusionMap,
    Named,
    PackStats,
    SyncError,
    TensorMeta,
    iter_groups,
    meta_of,
    pack_buckets,
    to_wire,
)
from megacov.rollout.memory import PeakRss

log = logging.getLogger(__name__)

TRANSPORTS = ("object_store", "cuda_ipc", "nccl")
_ALIGN = 256  # byte alignment of tensors inside a flat GPU staging buffer


def resolve_transport(name: str, use_gpu: bool, colocated: bool) -> str:
    if name == "auto":
        if not use_gpu:
            return "object_store"
        return "cuda_ipc" if colocated else "nccl"
    if name not in TRANSPORTS:
        raise SyncError(f"rollout.sync_transport='{name}' is not one of auto, {', '.join(TRANSPORTS)}")
    if name != "object_store" and not use_gpu:
        raise SyncError(f"rollout.sync_transport='{name}' needs CUDA; use object_store (or auto) on CPU")
    return name


@dataclass
class SyncPlan:
    """What an exporting rank needs to push its weights (small and picklable)."""

    transport: str
    bucket_bytes: int
    groups: dict[str, list[str]]
    engines: list[Any]
    """Ray handles of the engine actors."""
    nccl_group: str | None = None


def push_weights(named: Iterable[Named], plan: SyncPlan, *, dp_rank: int = 0) -> dict[str, Any]:
    """Bucket the HF-named stream and push it to every engine. Runs inside an actor rank.

    Every rank of a TP group must call this in lockstep (the stream's gathers are collectives); ranks
    whose stream yields nothing send nothing. Ranks of DP replicas other than 0 return at once.
    """
    if dp_rank != 0:
        return {"skipped": True}
    fusion = FusionMap(plan.groups)
    stats = PackStats()
    start = time.perf_counter()
    named = iter(named)
    with PeakRss() as peak:
        try:
            if plan.transport == "object_store":
                sender: Any = _ObjectStoreSender(plan.engines)
                for bucket in pack_buckets(named, plan.bucket_bytes, fusion, stats):
                    sender.send(bucket)
                    del bucket  # the object store holds the bytes now
                sender.close()
            else:
                _push_staged(named, plan, fusion, stats)
        except BaseException:
            # The other TP ranks are still iterating the same export (its gathers are collectives):
            # finish it without sending so that they are not left waiting in a gather, then fail.
            for _ in named:
                pass
            raise
    report = {k: v for k, v in asdict(stats).items() if k != "names"}
    report.update(seconds=time.perf_counter() - start, peak_extra_bytes=peak.extra_bytes, skipped=False,
                  first_names=stats.names[:2])
    return report


class _ObjectStoreSender:
    """Puts a bucket into the object store and lets the engines load it while the next one is built.

    ``send`` first waits for the engines to finish the previous bucket and only then puts the new
    one, so at most one bucket is in the object store and one is being assembled: the same memory
    as strictly alternating, but the export (TP gathers, q/k/v splits) of bucket k+1 overlaps the
    engines' loading of bucket k.
    """

    def __init__(self, engines: list[Any]):
        self.engines = engines
        self._inflight: list[Any] = []

    def _wait(self) -> None:
        import ray

        refs, self._inflight = self._inflight, []
        if refs:
            ray.get(refs)

    def send(self, bucket: list[Named]) -> None:
        import ray

        self._wait()
        ref = ray.put(to_wire(bucket))
        self._inflight = [engine.load.remote(ref) for engine in self.engines]

    def close(self) -> None:
        self._wait()


# ------------------------------------------------------------------------------------------------
# GPU transports: groups are copied into one flat CUDA staging buffer as they complete, so the rank
# holds the staging buffer plus one group, never a bucket of tensors *and* its packed copy.
# ------------------------------------------------------------------------------------------------

def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _push_staged(named: Iterable[Named], plan: SyncPlan, fusion: FusionMap, stats: PackStats) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    staging = torch.empty(plan.bucket_bytes, dtype=torch.uint8, device=device)
    metas: list[TensorMeta] = []
    offsets: list[int] = []
    used = 0
    send = _IpcSend(plan.engines) if plan.transport == "cuda_ipc" else _NcclSend(plan.engines, plan.nccl_group)

    def flush(buf: torch.Tensor, nbytes: int) -> None:
        torch.cuda.current_stream().synchronize()
        send(buf, list(metas), list(offsets), nbytes)
        stats.buckets += 1
        stats.bytes += nbytes
        metas.clear()
        offsets.clear()

    for group in iter_groups(named, fusion, stats, held=lambda: plan.bucket_bytes):
        sizes = [_align(t.numel() * t.element_size()) for _, t in group]
        if sum(sizes) > plan.bucket_bytes:  # alone, from its own buffer (the "largest tensor" allowance)
            if used:
                flush(staging, used)
                used = 0
            own = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
            _copy_group(own, 0, group, metas, offsets)
            stats.oversized_buckets += 1
            flush(own, sum(sizes))
            del own
            continue
        if used + sum(sizes) > plan.bucket_bytes:
            flush(staging, used)
            used = 0
        used = _copy_group(staging, used, group, metas, offsets)
        del group
    if used:
        flush(staging, used)
    send.close()


def _copy_group(buf: torch.Tensor, offset: int, group: list[Named], metas: list[TensorMeta],
                offsets: list[int]) -> int:
    for name, tensor in group:
        nbytes = tensor.numel() * tensor.element_size()
        src = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buf[offset:offset + nbytes].copy_(src, non_blocking=True)
        metas.append(meta_of(name, tensor))
        offsets.append(offset)
        offset = _align(offset + nbytes)
    return offset


class _IpcSend:
    """Colocated: engines open the staging buffer by CUDA IPC and copy from it, then answer."""

    def __init__(self, engines: list[Any]):
        self.engines = engines

    def __call__(self, buf: torch.Tensor, metas: list[TensorMeta], offsets: list[int], nbytes: int) -> None:
        import ray
        from torch.multiprocessing.reductions import reduce_tensor

        _, args = reduce_tensor(buf)
        uuid = str(torch.cuda.get_device_properties(buf.device).uuid)
        ray.get([e.load_ipc.remote(metas, {uuid: args}, offsets) for e in self.engines])

    def close(self) -> None:
        pass


_NCCL_SENDERS: dict[str, Any] = {}
"""Communicators of this process, by group name (kept across syncs: NCCL setup costs seconds)."""


class _NcclSend:
    """Disaggregated: rank 0 of ``group`` broadcasts the staging buffer to every engine worker."""

    def __init__(self, engines: list[Any], group: str | None):
        if group is None or group not in _NCCL_SENDERS:
            raise SyncError(f"NCCL weight-sync group '{group}' is not initialised in this process")
        self.engines, self.group, self.comm = engines, group, _NCCL_SENDERS[group]

    def __call__(self, buf: torch.Tensor, metas: list[TensorMeta], offsets: list[int], nbytes: int) -> None:
        import ray

        refs = [e.load_nccl.remote(self.group, metas, offsets, nbytes) for e in self.engines]
        self.comm.broadcast(buf[:nbytes], src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        ray.get(refs)

    def close(self) -> None:
        pass


def init_nccl_sender(worker: Any, group: str, host: str, port: int, world_size: int) -> None:
    """Join ``group`` as rank 0 (runs in the exporting actor rank via ``WorkerGroup`` ``call_fn``)."""
    del worker
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    pg = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=world_size)
    _NCCL_SENDERS[group] = PyNcclCommunicator(pg, device=torch.cuda.current_device())


# ------------------------------------------------------------------------------------------------
# driver side
# ------------------------------------------------------------------------------------------------

@dataclass
class SyncReport:
    seconds: float
    bytes: int
    """Bytes exported once (every engine receives all of them)."""
    engines: int
    buckets: int
    tensors: int
    oversized_buckets: int
    largest_group_bytes: int
    exporter_held_peak_bytes: int
    """Most bytes one exporting rank held in buckets + the group being assembled (exact accounting)."""
    exporter_peak_extra_bytes: int | None
    """Largest rise of an exporting rank's resident memory during its push (VmHWM; incl. shared memory)."""
    engine_peak_extra_bytes: int | None
    engine_load_seconds: float
    """Longest time one engine worker spent inside vLLM loading and re-packing (part of ``seconds``)."""
    version: int
    transport: str
    per_rank: list[dict[str, Any]] = field(repr=False, default_factory=list)


class WeightSync:
    """Pushes an actor group's weights into a :class:`~megacov.rollout.engine.RolloutEngines`.

    The actor workers must have a method (``push_weights`` by default) taking a :class:`SyncPlan`
    that calls :func:`push_weights` with the model's HF-named export.
    """

    def __init__(self, engines: Any, *, bucket_mb: float, transport: str = "auto"):
        if bucket_mb <= 0:
            raise SyncError(f"rollout.sync_bucket_mb must be positive, got {bucket_mb}")
        self.engines = engines
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self.transport = resolve_transport(transport, engines.spec.use_gpu, engines.spec.colocated)
        self._nccl_groups: dict[int, str] = {}

    def plan(self, stage: int = 0) -> SyncPlan:
        return SyncPlan(self.transport, self.bucket_bytes, self.engines.weight_groups(), list(self.engines.actors),
                        self._nccl_groups.get(stage))

    def _init_nccl(self, group: Any, leaders: list[int]) -> None:
        """One NCCL group per pipeline stage: its exporting rank + every engine worker."""
        import ray

        tp = self.engines.spec.tp
        world = 1 + self.engines.count * tp
        for stage, leader in enumerate(leaders):
            if stage in self._nccl_groups:
                continue
            name = f"megacov-sync-{stage}"
            host, port = ray.get(group.actors[leader].rendezvous_endpoint.remote())
            refs = [a.init_nccl.remote(name, host, port, world, 1 + e * tp) for e, a in enumerate(self.engines.actors)]
            refs.append(group.actors[leader].call_fn.remote(init_nccl_sender, (name, host, port, world), {}))
            ray.get(refs)
            self._nccl_groups[stage] = name

    def sync(self, group: Any, *, tp: int, pp: int, dp: int = 1, method: str = "push_weights") -> SyncReport:
        """Push the weights of ``group`` (ranks ordered ``pp, dp, tp``) into every engine."""
        import ray

        if group.world_size != tp * pp * dp:
            raise SyncError(f"actor group has {group.world_size} ranks, not tp*pp*dp = {tp}*{pp}*{dp}")
        stage_ranks = [[s * dp * tp + t for t in range(tp)] for s in range(pp)]
        if self.transport == "nccl":
            self._init_nccl(group, [ranks[0] for ranks in stage_ranks])
        start = time.perf_counter()
        self.engines.call("begin_update")
        try:
            if self.transport == "nccl":  # stages one after the other: each broadcast spans every engine
                results = []
                for stage, ranks in enumerate(stage_ranks):
                    results += ray.get(group.execute_ranks_async(ranks, method, self.plan(stage)))
            else:
                results = group.execute(method, self.plan())
            finished = self.engines.call("finish_update", None)
        except BaseException as exc:
            try:
                self.engines.call("abort_update")
            except Exception as abort_exc:  # noqa: BLE001 - a dead engine cannot be closed; report the first error
                log.warning("closing the failed update on the engines failed too: %s", abort_exc)
            if isinstance(exc, SyncError):
                raise
            raise SyncError(f"weight sync failed; the engines refuse to generate until a sync succeeds: {exc}") from exc
        seconds = time.perf_counter() - start
        exporters = [r for r in results if isinstance(r, dict) and not r.get("skipped") and r.get("tensors")]
        engine_peaks = [w.get("peak_extra_bytes") for f in finished for w in f["workers"]]
        return SyncReport(
            seconds=seconds, bytes=sum(r["bytes"] for r in exporters), engines=self.engines.count,
            buckets=sum(r["buckets"] for r in exporters), tensors=sum(r["tensors"] for r in exporters),
            oversized_buckets=sum(r["oversized_buckets"] for r in exporters),
            largest_group_bytes=max((r["largest_group_bytes"] for r in exporters), default=0),
            exporter_held_peak_bytes=max((r["peak_held_bytes"] for r in exporters), default=0),
            exporter_peak_extra_bytes=_max_or_none(r.get("peak_extra_bytes") for r in exporters),
            engine_peak_extra_bytes=_max_or_none(engine_peaks),
            engine_load_seconds=max((w["load_s"] for f in finished for w in f["workers"]), default=0.0),
            version=min(f["version"] for f in finished), transport=self.transport, per_rank=results,
        )


def _max_or_none(values: Iterable[int | None]) -> int | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None
