"""``megacov_gloo``: a weight-transfer engine in vLLM's factories, so CPU runs take the GPU lifecycle.

vLLM owns the weight-update lifecycle (:mod:`vllm.distributed.weight_transfer`): a worker-side
engine created by every vLLM worker from ``LLM(weight_transfer_config={"backend": ...})`` and driven
by ``init_weight_transfer_engine / start_weight_update / update_weights / finish_weight_update``; a
trainer-side engine built by ``WeightTransferTrainerFactory.trainer_init`` that talks to the
inference side through a :class:`~vllm.distributed.weight_transfer.base.VLLMWeightSyncClient`.
vLLM ships ``ipc`` and ``nccl`` (CUDA only). This module adds a gloo pair with the same calls, so a
CPU run (and CI) goes through exactly the handshake a GPU run does.

What it adds over vLLM's single-sender engines:

* **one sender per pipeline stage, all at once**: stage ``s``'s exporting rank (TP rank 0 of DP
  replica 0) opens its own gloo group with every engine worker; an engine worker receives from all
  stage groups on concurrent threads and loads into the model as buckets arrive;
* **fused groups whole**: the sender packs its stream into buckets of at most ``bucket_bytes`` that
  never split an engine module (q/k/v, gate/up: :class:`~megacov.rollout.buckets.FusionMap`), copied
  into one reusable staging buffer, so an exporting rank holds one bucket plus one fused group;
* **completeness**: at ``finish_weight_update`` the worker compares what arrived with what its model
  expects; a missing, unknown or repeated tensor is reported by :meth:`GlooWeightTransferEngine.report`
  and the engine actor refuses to serve (see :mod:`megacov.rollout.engine`).

The wire format per bucket on a stage group (broadcast from rank 0): an ``int64[3]`` header ``(kind,
meta_bytes, data_bytes)`` (kind 1 = bucket, 0 = end of stage, -1 = the sender failed), the bucket's
metadata as JSON bytes, then the packed bytes. Nothing is unpickled.

Registration happens in every process that builds a vLLM worker: the ``vllm.general_plugins`` entry
point ``megacov`` calls :func:`register`, and importing the worker extension does too.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, ClassVar

import torch

from megacov.rollout.buckets import FusionMap, Named, PackStats, SyncError, dtype_from_name, iter_groups
from megacov.rollout.memory import PeakRss

BACKEND = "megacov_gloo"
_ALIGN = 64
_BUCKET, _END, _ABORT = 1, 0, -1
log = logging.getLogger(__name__)


def register() -> None:
    """Register the gloo engines in vLLM's worker and trainer factories (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, cls_name in ((WeightTransferEngineFactory, "GlooWeightTransferEngine"),
                              (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine")):
        try:
            factory.register_engine(BACKEND, __name__, cls_name)
        except ValueError:  # already registered in this process
            pass


# ------------------------------------------------------------------------------------------------
# the gloo channel: one group per pipeline stage, rank 0 = that stage's exporting rank
# ------------------------------------------------------------------------------------------------

def open_group(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> tuple[Any, Any]:
    """A gloo process group outside ``torch.distributed``'s global state (vLLM's stateless helper),
    and its rendezvous store (hosted by rank 0, the exporter): the exporter marks an abandoned
    update there (:data:`ABANDONED`), which a receiver blocked in the group cannot otherwise learn."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(host, port, rank, world_size, "gloo",
                                                          timeout=timedelta(seconds=timeout_s), return_store=True)


#: Store key an exporter sets when it gives an update up (a peer died or timed out, another rank failed).
ABANDONED = "megacov/abandoned"
#: How often a receiver waiting for buckets looks at that key.
POLL_S = 0.5


class TransportError(SyncError):
    """A broadcast on a transfer group failed: a peer died, or one did not take part within the timeout."""


def _bcast(pg: Any, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    try:
        pg.broadcast([tensor], opts).wait()
    except RuntimeError as exc:  # gloo: "Connection closed by peer", "Timed out waiting ..."
        raise TransportError(f"weight-transfer group: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc


def _send_header(pg: Any, kind: int, meta_len: int = 0, data_len: int = 0) -> None:
    _bcast(pg, torch.tensor([kind, meta_len, data_len], dtype=torch.int64))


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class StageStats:
    """What one exporting rank sent in one update (returned to the driver)."""

    stage: int
    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    oversized_buckets: int = 0
    largest_group_bytes: int = 0
    peak_held_bytes: int = 0
    """Most bytes this rank held for the sync at once: staging buffer fill + the group being assembled."""
    peak_extra_bytes: int | None = None
    start_s: float = 0.0
    """``time.time()`` when this stage started sending (the bench reads the stages' overlap from it)."""
    end_s: float = 0.0


def send_stream(pg: Any, named: Iterable[Named], fusion: FusionMap, bucket_bytes: int, stats: StageStats) -> None:
    """Pack ``named`` into buckets (fused groups whole) in one staging buffer and broadcast each.

    A fused group larger than the bucket goes alone from its own buffer (the largest-group allowance).
    """
    staging = torch.empty(bucket_bytes, dtype=torch.uint8)
    metas: list[list[Any]] = []
    used = 0
    pack = PackStats()

    def flush(buf: torch.Tensor, nbytes: int) -> None:
        blob = torch.frombuffer(bytearray(json.dumps(metas).encode()), dtype=torch.uint8)
        _send_header(pg, _BUCKET, blob.numel(), nbytes)
        _bcast(pg, blob)
        _bcast(pg, buf[:nbytes])
        stats.buckets += 1
        stats.bytes += nbytes
        metas.clear()

    for group in iter_groups(named, fusion, pack, held=lambda: used):
        sizes = [_align(t.numel() * t.element_size()) for _, t in group]
        if sum(sizes) > bucket_bytes:
            if used:
                flush(staging, used)
                used = 0
            own = torch.empty(sum(sizes), dtype=torch.uint8)
            _copy_into(own, 0, group, metas)
            stats.oversized_buckets += 1
            flush(own, sum(sizes))
            del own
            continue
        if used + sum(sizes) > bucket_bytes:
            flush(staging, used)
            used = 0
        used = _copy_into(staging, used, group, metas)
    if used:
        flush(staging, used)
    stats.tensors += pack.tensors
    stats.largest_group_bytes = max(stats.largest_group_bytes, pack.largest_group_bytes)
    stats.peak_held_bytes = max(stats.peak_held_bytes, pack.peak_held_bytes)


def _copy_into(buf: torch.Tensor, offset: int, group: list[Named], metas: list[list[Any]]) -> int:
    for name, tensor in group:
        nbytes = tensor.numel() * tensor.element_size()
        src = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        buf[offset:offset + nbytes].copy_(src)
        metas.append([name, str(tensor.dtype), list(tensor.shape), offset, nbytes])
        offset = _align(offset + nbytes)
    return offset


def receive_stage(pg: Any, deliver: Callable[[list[Named]], None]) -> None:
    """Receive buckets from one stage group until its end marker; ``deliver`` gets each bucket."""
    while True:
        header = torch.empty(3, dtype=torch.int64)
        _bcast(pg, header)
        kind, meta_len, data_len = (int(v) for v in header)
        if kind == _END:
            return
        if kind == _ABORT:
            raise SyncError("the exporting rank failed mid-sync (see its error); this update is incomplete")
        blob = torch.empty(meta_len, dtype=torch.uint8)
        _bcast(pg, blob)
        flat = torch.empty(data_len, dtype=torch.uint8)
        _bcast(pg, flat)
        named = []
        for name, dtype, shape, offset, nbytes in json.loads(bytes(blob.numpy()).decode()):
            named.append((name, flat[offset:offset + nbytes].view(dtype_from_name(dtype)).view(shape)))
        deliver(named)


# ------------------------------------------------------------------------------------------------
# worker side (inside every vLLM worker process)
# ------------------------------------------------------------------------------------------------

@dataclass
class GlooInitInfo:
    """``init_weight_transfer_engine`` payload: one ``[host, port]`` per pipeline stage."""

    endpoints: list[list[Any]]
    world_size: int
    """1 sender + every engine worker of every engine."""
    rank_offset: int
    """This engine's first rank in every stage group (filled in by the engine actor)."""
    timeout_s: float = 600.0


@dataclass
class GlooUpdateInfo:
    """``update_weights`` payload: the stages sending in this update."""

    stages: list[int]
    version: int = 0


def _engine_base() -> type:
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    return WeightTransferEngine


class GlooWeightTransferEngine(_engine_base()):  # type: ignore[misc]
    """Worker side: joins every stage group, receives all stages at once, loads by layer-wise reload."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.groups: list[Any] = []
        self.stores: list[Any] = []
        self.stuck = False
        """A receive was abandoned while its thread still waits in the group: drop, do not destroy, it."""
        from megacov.rollout.engine_model import engine_fusion_map

        # Expected names are read now, before any reload reshapes the modules.
        self.expected = engine_fusion_map(model).expected
        self._reset()

    def _reset(self) -> None:
        self.received: dict[str, int] = {}
        self.problem: str | None = None
        self.load_s = 0.0
        self._peak: PeakRss | None = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        rank = init_info.rank_offset + int(self.parallel_config.rank)
        self.shutdown()
        opened = [open_group(str(h), int(p), rank, init_info.world_size, init_info.timeout_s)
                  for h, p in init_info.endpoints]
        self.groups, self.stores = [g for g, _ in opened], [st for _, st in opened]

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        from megacov.rollout.engine_model import reprocess_cpu_moe_on_reload

        self._reset()
        self._peak = PeakRss().__enter__()
        reprocess_cpu_moe_on_reload(self.model)  # vLLM skips the CPU experts' pre-packing on updates
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises without an accelerator.
        self.receive_weights(self.parse_update_info(update_info))
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        """Every stage on its own thread (gloo waits release the GIL); loads happen here, in order."""
        inbox: queue.Queue = queue.Queue(maxsize=max(1, len(update_info.stages)))
        errors: list[BaseException] = []

        def pump(stage: int) -> None:
            try:
                receive_stage(self.groups[stage], inbox.put)
            except BaseException as exc:  # noqa: BLE001 - surfaced below
                errors.append(exc)
            finally:
                inbox.put(None)

        threads = [threading.Thread(target=pump, args=(s,), daemon=True) for s in update_info.stages]
        for t in threads:
            t.start()
        open_stages = len(threads)
        while open_stages:
            try:
                bucket = inbox.get(timeout=POLL_S)
            except queue.Empty:
                gone = self._abandoned(update_info.stages)
                if gone is None:
                    continue
                self.stuck = True  # the pump threads wait in the group until its timeout
                self.problem = f"stage {gone}'s exporter abandoned the update"
                self._restore()
                raise SyncError(f"{self.problem} (another engine or rank failed); this update is incomplete")
            if bucket is None:
                open_stages -= 1
                continue
            if errors:
                continue  # drain: the other stages still send
            start = time.perf_counter()
            with torch.no_grad():
                self.model.load_weights(iter(bucket))
            self.load_s += time.perf_counter() - start
            for name, _ in bucket:
                self.received[name] = self.received.get(name, 0) + 1
        for t in threads:
            t.join()
        if errors:
            self.problem = f"receiving failed: {errors[0]}"
            self._restore()
            raise errors[0]

    def _abandoned(self, stages: list[int]) -> int | None:
        """The first stage whose exporter gave this update up (or is gone), else None."""
        for stage in stages:
            try:
                if self.stores[stage].check([ABANDONED]):
                    return stage
            except Exception:  # noqa: BLE001 - the exporter's store is unreachable: it is gone
                return stage
        return None

    def _restore(self) -> None:
        """Put the modules back together after a failed receive (their weights are a mix now)."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        try:
            finalize_layerwise_reload(self.model, self.model_config)
        except Exception as exc:  # noqa: BLE001 - incomplete by definition
            log.debug("restoring after a failed update: %s", exc)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        start = time.perf_counter()
        try:
            finalize_layerwise_reload(self.model, self.model_config)
        finally:
            if self._peak is not None:
                self._peak.__exit__(None, None, None)
        self.load_s += time.perf_counter() - start
        if self.problem is None:
            self.problem = completeness_problem(self.expected, self.received)

    def report(self) -> dict[str, Any]:
        return {"tensors": len(self.received), "load_s": self.load_s, "problem": self.problem,
                "peak_extra_bytes": None if self._peak is None else self._peak.extra_bytes}

    def shutdown(self) -> None:
        from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

        for pg in [] if self.stuck else self.groups:
            try:
                stateless_destroy_torch_distributed_process_group(pg)
            except Exception as exc:  # noqa: BLE001 - a peer may be gone already
                log.debug("closing a weight-transfer group: %s", exc)
        self.groups, self.stores, self.stuck = [], [], False


def completeness_problem(expected: set[str], received: dict[str, int]) -> str | None:
    """One line naming what is wrong with an update, or None when every expected tensor came once."""
    missing = sorted(expected - set(received))
    unknown = sorted(set(received) - expected)
    repeated = sorted(n for n, c in received.items() if c > 1)
    problems = []
    if missing:
        problems.append(f"{len(missing)} expected tensor(s) never arrived (e.g. {missing[:4]})")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) unknown to the engine (e.g. {unknown[:4]})")
    if repeated:
        problems.append(f"{len(repeated)} tensor(s) arrived more than once (e.g. {repeated[:4]})")
    return "; ".join(problems) or None


# ------------------------------------------------------------------------------------------------
# trainer side (inside every actor rank)
# ------------------------------------------------------------------------------------------------

def _trainer_bases() -> tuple[type, type]:
    from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine

    return TrainerInitInfo, TrainerWeightTransferEngine


_TrainerInitInfo, _TrainerEngine = _trainer_bases()


@dataclass
class GlooTrainerInitInfo(_TrainerInitInfo):  # type: ignore[misc,valid-type]
    """Per actor rank. ``rank`` 0 (stage 0's exporter) drives the client; ``exports`` ranks send."""

    backend: ClassVar[str] = BACKEND

    stage: int = 0
    exports: bool = False
    endpoints: list[list[Any]] = field(default_factory=list)
    world_size: int = 1
    bucket_bytes: int = 64 << 20
    groups: dict[str, list[str]] = field(default_factory=dict)
    timeout_s: float = 600.0


class GlooTrainerWeightTransferEngine(_TrainerEngine):  # type: ignore[misc,valid-type]
    """Trainer side. ``send_weights`` is collective over the actor's default process group."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: Any, source: Any, init_info: GlooTrainerInitInfo) -> None:
        super().__init__(client=client, source=source, is_sender=init_info.is_sender)
        self.info = init_info
        self.fusion = FusionMap(init_info.groups)
        self.pg: Any = None
        self.store: Any = None
        self.version = 0
        self.next_version: int | None = None
        """Set by the driver before ``send_weights``: versions count across actor groups and restarts."""
        self.last: StageStats | None = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: Any, source: Any = None
                     ) -> GlooTrainerWeightTransferEngine:
        if source is None:
            raise ValueError("the gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, init_info=init_info)
        info = init_info
        future = None
        if engine.is_sender:  # engines join every stage group while the exporters open theirs
            from concurrent.futures import ThreadPoolExecutor

            payload = {"endpoints": info.endpoints, "world_size": info.world_size, "rank_offset": 1,
                       "timeout_s": info.timeout_s}
            pool = ThreadPoolExecutor(max_workers=1)
            future = pool.submit(client.init_weight_transfer_engine, payload)
            pool.shutdown(wait=False)
        try:
            if info.exports:
                host, port = info.endpoints[info.stage]
                engine.pg, engine.store = open_group(str(host), int(port), 0, info.world_size, info.timeout_s)
        finally:
            if future is not None:
                future.result()
        return engine

    def send_weights(self) -> None:
        """start (rank 0) -> every stage sends while rank 0 runs ``update_weights`` -> ``finish_weight_update``
        with the new version (rank 0).

        The ranks agree after every phase (:func:`_agree`, over the actor's own process group): when a
        phase fails anywhere -- an engine that died or wedged (rank 0's client names it), a broken
        transfer group -- every rank leaves together with an error, none waits in a collective, and
        the exporters tear their transfer groups down at once, which breaks the surviving engines'
        pending receives too. The group is then re-formed by the next ``init_weight_transfer``."""
        self.version = self.next_version if self.next_version is not None else self.version + 1
        self.next_version = None
        self._phase("start_weight_update", self.client.start_weight_update if self.is_sender else None)
        pool = None
        future = None
        if self.is_sender:
            from concurrent.futures import ThreadPoolExecutor

            payload = asdict(GlooUpdateInfo(stages=list(range(len(self.info.endpoints))), version=self.version))
            pool = ThreadPoolExecutor(max_workers=1)
            future = pool.submit(self.client.update_weights, payload)
        error = self._send_stage()
        if future is not None:
            try:
                future.result()
            except Exception as engine_exc:  # noqa: BLE001 - an engine fault names the cause; else ours does
                if error is None or _is_engine_fault(engine_exc):
                    error = engine_exc
            finally:
                pool.shutdown(wait=False)
        self._phase("update_weights", error=error)
        self._phase("finish_weight_update",
                    (lambda: self.client.finish_weight_update(weight_version=str(self.version)))
                    if self.is_sender else None)

    def _phase(self, name: str, call: Callable[[], Any] | None = None, error: BaseException | None = None) -> None:
        """Run ``call`` (when given), then agree with every rank; raise on all of them if any failed."""
        if call is not None and error is None:
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - raised after the agreement, so nobody hangs
                error = exc
        if not _agree(error is not None):
            return
        self.abort()
        if error is not None:
            raise error
        raise SyncError(f"weight sync aborted in {name}: another actor rank's part failed (its error names the "
                        f"cause)")

    def _send_stage(self) -> BaseException | None:
        """This rank's part: exporters stream their stage; TP peers iterate for the gathers."""
        stats = StageStats(stage=self.info.stage, start_s=time.time())
        stream = iter(self.source)
        try:
            if self.info.exports:
                with PeakRss() as peak:
                    send_stream(self.pg, stream, self.fusion, self.info.bucket_bytes, stats)
                    _send_header(self.pg, _END)
                stats.peak_extra_bytes = peak.extra_bytes
            else:
                for _ in stream:
                    pass
        except BaseException as exc:  # noqa: BLE001 - reported after the agreement, so nobody hangs
            for _ in stream:  # TP peers are still in the export's gathers
                pass
            if isinstance(exc, TransportError):  # the group is broken: closing it tells the other peers
                self.abort()
            elif self.info.exports and self.pg is not None:  # the export failed: the engines drop the update
                try:
                    _send_header(self.pg, _ABORT)
                except Exception as abort_exc:  # noqa: BLE001
                    log.debug("could not tell the engines that the sync failed: %s", abort_exc)
                    self.abort()
            return exc
        stats.end_s = time.time()
        self.last = stats if self.info.exports else None
        return None

    def abort(self) -> None:
        """Give this rank's transfer group up now: mark the update abandoned in the group's store (the
        engine workers waiting for buckets poll it and fail at once) and abort the group."""
        if self.pg is not None:
            pg, self.pg = self.pg, None
            try:
                self.store.set(ABANDONED, "1")
                pg.abort()
            except Exception as exc:  # noqa: BLE001 - closing a broken group
                log.debug("aborting the weight-transfer group: %s", exc)

    def shutdown(self) -> None:
        if self.pg is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            pg, self.pg = self.pg, None
            try:
                stateless_destroy_torch_distributed_process_group(pg)
            except Exception as exc:  # noqa: BLE001 - a peer may be gone already
                log.debug("closing the weight-transfer group: %s", exc)


def _agree(failed: bool) -> bool:
    """Whether any actor rank failed (every rank calls this at the same point): the ranks of the
    actor are healthy -- it is an engine or a transfer group that failed -- so their own group decides."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return failed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(failed)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _is_engine_fault(exc: BaseException) -> bool:
    from megacov.runtime.recovery import find_fault

    return find_fault(exc) is not None
