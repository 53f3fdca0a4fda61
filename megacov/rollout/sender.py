"""The actor-rank side of weight sync: a mixin for any per-rank worker that can export HF weights.

The driver (:class:`megacov.rollout.sync.WeightSync`) calls, on every rank at once:
``transfer_endpoint()`` (exporting ranks answer with a host and a port free on their node),
``init_weight_transfer(info, client)`` once, then ``send_weights()`` after every update. The
worker only has to provide :meth:`weight_source` (a vLLM ``WeightSource``) and its ``layout``.
vLLM is imported inside the methods, so importing a worker class stays cheap on the driver.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any


class WeightSenderMixin:
    """``weight_source()`` and ``layout`` come from the class this is mixed into."""

    layout: Any
    _transfer: Any = None

    def weight_source(self) -> Any:
        raise NotImplementedError

    def exports_weights(self) -> bool:
        """TP rank 0 of DP replica 0 of each stage sends its stage; everybody else helps or idles."""
        return self.layout.tp_rank == 0 and self.layout.dp_rank == 0

    def transfer_endpoint(self) -> tuple[int, str, int] | None:
        """``(stage, host, port)`` on an exporting rank (a port free on its own node), else None."""
        from megacov.workers.cluster import free_port, node_ip

        if not self.exports_weights():
            return None
        return self.layout.pp_rank, node_ip(), free_port()

    def init_weight_transfer(self, info: dict[str, Any], client: Any) -> None:
        """Build this rank's trainer-side engine through vLLM's factory (rendezvous with the engines)."""
        import torch.distributed as dist
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from megacov.rollout.transfer import GlooTrainerInitInfo, register

        register()
        rank = dist.get_rank() if dist.is_initialized() else 0
        info = dict(info)
        backend = info.pop("backend", "megacov_gloo")
        if backend == "megacov_gloo":
            init: Any = GlooTrainerInitInfo(rank=rank, stage=self.layout.pp_rank, exports=self.exports_weights(),
                                            **info)
        else:
            init = _vllm_gpu_init_info(backend, rank, info)
        if self._transfer is not None:
            self._transfer.shutdown()
        self._transfer = WeightTransferTrainerFactory.trainer_init(init, client=client, source=self.weight_source())

    def send_weights(self, version: int) -> dict[str, Any] | None:
        """One full update of every engine to weight ``version``; returns this rank's stage statistics
        when it exported."""
        if self._transfer is None:
            raise RuntimeError("send_weights before init_weight_transfer")
        self._transfer.next_version = version
        self._transfer.send_weights()
        last = getattr(self._transfer, "last", None)
        return None if last is None else asdict(last)

    def close_weight_transfer(self) -> None:
        if self._transfer is not None:
            self._transfer.shutdown()
            self._transfer = None


def _vllm_gpu_init_info(backend: str, rank: int, info: dict[str, Any]) -> Any:
    """vLLM's own trainer init info for its CUDA backends (one sender: actor rank 0, pipeline size 1).

    GPU only; exercised by ``tools/gpu_check.sh``.
    """
    bucket = int(info["bucket_bytes"])
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=bucket)
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        host, port = info["endpoints"][0]
        return NCCLTrainerInitInfo(rank=rank, master_address=str(host), master_port=int(port),
                                   world_size=int(info["world_size"]), packed=True, packed_buffer_size_bytes=bucket)
    raise ValueError(f"weight-transfer backend '{backend}' is not wired to the Megatron source")
