"""Methods megacov adds to every vLLM worker (``worker_extension_cls``) to receive weights in place.

vLLM instantiates its worker class with this class mixed in, in every worker process of an engine
(one per engine TP rank), and ``LLM.collective_rpc(name, args)`` calls a method on all of them. Only
vLLM worker processes import this module.

Why not ``model.load_weights``: on CPU vLLM pre-packs every Linear into a oneDNN handle after loading
and leaves ``weight`` empty, and on GPU quantised or re-laid-out kernels have the same problem.
vLLM's layer-wise reload (``initialize_layerwise_reload`` / ``finalize_layerwise_reload``) restores
each layer to checkpoint format, buffers incoming tensors until the layer is complete, re-runs the
kernel post-processing and copies the result into the original storage. One update is bracketed by
:meth:`megacov_begin_update` / :meth:`megacov_finish_update` so that any number of buckets, from any
number of pipeline stages, can arrive in between.

:meth:`megacov_finish_update` refuses an update in which an expected tensor never arrived: vLLM would
quietly keep the old tensors for such a layer, and a rollout from half-updated weights is the silent
failure this project exists to avoid.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch


class WeightReceiver:
    """Mixed into ``vllm.v1.worker.*Worker``; ``self`` is the vLLM worker."""

    # -- description -----------------------------------------------------------------------------

    def megacov_weight_groups(self) -> dict[str, list[str]]:
        """Engine module -> HF tensor names loaded into it (see :class:`~megacov.rollout.buckets.FusionMap`)."""
        from megacov.rollout.buckets import FusionMap

        model = self.get_model()
        names = [n for n, _ in model.named_parameters()]
        return FusionMap.from_engine_params(names, getattr(model, "packed_modules_mapping", None)).to_dict()

    # -- one update ------------------------------------------------------------------------------

    def megacov_begin_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        from megacov.rollout.memory import PeakRss

        if getattr(self, "_megacov_updating", False):
            raise RuntimeError("a weight update is already in progress on this engine")
        self._megacov_received: dict[str, int] = {}
        self._megacov_load_s = 0.0
        self._megacov_updating = True
        self._megacov_peak = PeakRss().__enter__()
        initialize_layerwise_reload(self.get_model())

    def _megacov_load(self, named: Sequence[tuple[str, torch.Tensor]]) -> int:
        if not getattr(self, "_megacov_updating", False):
            raise RuntimeError("weights received outside megacov_begin_update / megacov_finish_update")
        start = time.perf_counter()
        model = self.get_model()
        with torch.no_grad():
            model.load_weights(iter(named))
        for name, tensor in named:
            self._megacov_received[name] = self._megacov_received.get(name, 0) + 1
        self._megacov_load_s += time.perf_counter() - start
        return sum(t.numel() * t.element_size() for _, t in named)

    def megacov_load(self, metas: Sequence[Any], buffers: Sequence[Any]) -> int:
        """Load one bucket given as metadata + raw buffers (views, bytes or arrays). Returns bytes."""
        from megacov.rollout.buckets import from_wire

        return self._megacov_load(from_wire(metas, buffers))

    def megacov_finish_update(self, expected: Sequence[str] | None = None) -> dict[str, Any]:
        """Finalise the reload; raise if an expected tensor is missing, unknown or arrived twice."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if not getattr(self, "_megacov_updating", False):
            raise RuntimeError("megacov_finish_update without megacov_begin_update")
        start = time.perf_counter()
        try:
            finalize_layerwise_reload(self.get_model(), self.model_config)
        finally:
            self._megacov_updating = False
            self._megacov_peak.__exit__(None, None, None)
        self._megacov_load_s += time.perf_counter() - start
        received = self._megacov_received
        if expected is None:
            groups = self.megacov_weight_groups()
            expected = [n for names in groups.values() for n in names]
        expected_set = set(expected)
        missing = sorted(expected_set - set(received))
        unknown = sorted(set(received) - expected_set)
        repeated = sorted(n for n, c in received.items() if c > 1)
        problems = []
        if missing:
            problems.append(f"{len(missing)} expected tensor(s) never arrived (e.g. {missing[:4]})")
        if unknown:
            problems.append(f"{len(unknown)} tensor(s) unknown to the engine (e.g. {unknown[:4]})")
        if repeated:
            problems.append(f"{len(repeated)} tensor(s) arrived more than once (e.g. {repeated[:4]})")
        if problems:
            raise RuntimeError("weight update incomplete, engine weights are inconsistent: " + "; ".join(problems))
        return {"tensors": len(received), "load_s": self._megacov_load_s,
                "peak_extra_bytes": self._megacov_peak.extra_bytes}

    # -- GPU transports (written for CUDA; not exercised by the CPU test suite) -------------------

    def megacov_load_ipc(self, metas: Sequence[Any], handles: dict[str, tuple], offsets: Sequence[int]) -> int:
        """Load a bucket packed in one CUDA buffer shared by IPC (colocated placement).

        ``handles`` maps the physical GPU UUID of the exporting device to the ``rebuild_cuda_tensor``
        arguments of the flat uint8 buffer. The buffer is opened on whichever visible device has that
        UUID (the exporter may sit on a different GPU of the node than this worker), its views are
        loaded (a device-to-device copy), and the mapping is dropped before returning so the exporter
        may reuse or free the buffer once every engine answered.
        """
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        from megacov.rollout.buckets import TensorMeta, dtype_from_name

        device_index = _device_with_uuid(set(handles))
        uuid = _gpu_uuid(device_index)
        args = list(handles[uuid])
        args[6] = device_index  # storage device index, in this process's numbering
        flat = rebuild_cuda_tensor(*args)
        named = []
        for meta, off in zip(metas, offsets):
            meta = meta if isinstance(meta, TensorMeta) else TensorMeta(*meta)
            view = flat[off:off + meta.nbytes].view(dtype_from_name(meta.dtype)).view(meta.shape)
            named.append((meta.name, view))
        nbytes = self._megacov_load(named)
        torch.cuda.synchronize()
        del named, flat
        return nbytes

    def megacov_init_nccl(self, group: str, host: str, port: int, world_size: int, rank_offset: int) -> None:
        """Join the NCCL group ``group`` whose rank 0 is an exporting actor rank (disaggregated)."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        rank = rank_offset + int(getattr(self, "rank", 0))  # this worker's rank inside its engine
        pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        comms = getattr(self, "_megacov_nccl", {})
        comms[group] = PyNcclCommunicator(pg, device=self.device)
        self._megacov_nccl = comms

    def megacov_load_nccl(self, group: str, metas: Sequence[Any], offsets: Sequence[int], total: int) -> int:
        """Receive one bucket broadcast from rank 0 of ``group`` into a flat buffer and load it."""
        from megacov.rollout.buckets import TensorMeta, dtype_from_name

        comm = self._megacov_nccl[group]
        flat = torch.empty(total, dtype=torch.uint8, device=self.device)
        comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        named = []
        for meta, off in zip(metas, offsets):
            meta = meta if isinstance(meta, TensorMeta) else TensorMeta(*meta)
            named.append((meta.name, flat[off:off + meta.nbytes].view(dtype_from_name(meta.dtype)).view(meta.shape)))
        nbytes = self._megacov_load(named)
        torch.cuda.synchronize()
        return nbytes

    def megacov_close_nccl(self) -> None:
        self._megacov_nccl = {}


def _gpu_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _device_with_uuid(uuids: set[str]) -> int:
    for index in range(torch.cuda.device_count()):
        if _gpu_uuid(index) in uuids:
            return index
    raise RuntimeError(
        "CUDA IPC weight sync: the exporting GPU is not visible to this engine worker; colocated "
        "placement needs actor and engine processes of a node to see the node's GPUs"
    )
