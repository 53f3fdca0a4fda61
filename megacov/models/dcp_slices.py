"""Read arbitrary slices of a megatron torch_dist checkpoint with PyTorch DCP, in one process.

megatron's ``torch_dist`` format is a PyTorch Distributed Checkpoint whose tensors are stored in
global coordinates (decoder-layer tensors stacked along a leading layer axis). Megatron's own load
path describes a request as a regular grid of shards over ranks, which cannot express "layer 7 only"
in a single process. DCP's public planner interface can: a :class:`_SlicePlanner` asks for exactly
the boxes wanted, DCP computes which stored chunks overlap them (its resharding helper) and copies
only those. No process group is needed.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch


def _error(ckpt_dir: str, what: str, exc: BaseException) -> Exception:
    from megacov.models.hf_io import CheckpointError

    detail = str(exc).strip().splitlines()
    return CheckpointError(f"{ckpt_dir}: {what} ({type(exc).__name__}: {detail[-1] if detail else ''})")


def tensor_metadata(ckpt_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``key -> (global shape, dtype)`` of every tensor in the checkpoint (objects are skipped)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        md = FileSystemReader(ckpt_dir).read_metadata()
    except Exception as exc:  # noqa: BLE001 - DCP raises plain OSError/pickle errors
        raise _error(ckpt_dir, "cannot read the checkpoint metadata", exc) from None
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


class StorageHints:
    """Tell the kernel which checkpoint bytes will be read soon (``posix_fadvise(WILLNEED)``).

    A torch_dist file stores its chunks key by key, so reading one decoder layer touches one
    chunk per key, scattered over the file, where sequential read-ahead does not help. Hinting the
    chunks of the layer after the one being read lets the disk fetch them while the CPU works.
    """

    def __init__(self, ckpt_dir: str) -> None:
        import os

        from torch.distributed.checkpoint import FileSystemReader

        reader = FileSystemReader(ckpt_dir)
        md = reader.read_metadata()
        self._fds: dict[str, int] = {}
        self._chunks: dict[tuple[str, int], list[tuple[str, int, int]]] = {}
        for index, info in (md.storage_data or {}).items():
            lead = int(index.offset[0]) if index.offset is not None and len(index.offset) else 0
            where = (os.path.join(ckpt_dir, info.relative_path), info.offset, info.length)
            self._chunks.setdefault((index.fqn, lead), []).append(where)

    def will_need(self, key: str, lead: int = 0) -> None:
        """Hint the chunks of ``key`` whose first coordinate is ``lead`` (a stacked key's layer)."""
        import os

        for path, offset, length in self._chunks.get((key, lead), ()):
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            os.posix_fadvise(self._fds[path], offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        import os

        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _planner_class() -> type:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class _SlicePlanner(LoadPlanner):
        def __init__(self, requests: dict[str, tuple[Sequence[int], torch.Tensor]]) -> None:
            self.requests = requests

        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
            self.metadata = metadata

        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, (offsets, dest) in self.requests.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def create_global_plan(self, global_plan: list) -> list:
            return global_plan

        def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
            return central_plan

        def load_bytes(self, read_item, value) -> None:
            raise RuntimeError(f"unexpected object {read_item.dest_index.fqn} in a tensor request")

        def resolve_tensor(self, read_item) -> torch.Tensor:
            dest = self.requests[read_item.dest_index.fqn][1]
            for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                dest = dest.narrow(dim, start, length)
            return dest

        def commit_tensor(self, read_item, tensor) -> None:
            pass  # resolve_tensor handed out views of the destination: nothing to copy back

    return _SlicePlanner


def load_slices(ckpt_dir: str, requests: dict[str, tuple[Sequence[int], Sequence[int], torch.dtype]]
                ) -> dict[str, torch.Tensor]:
    """Load ``{key: (offsets, shape, dtype)}`` boxes; returns ``{key: tensor of that shape}``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException

    dests = {k: (tuple(off), torch.empty(tuple(shape), dtype=dt)) for k, (off, shape, dt) in requests.items()}
    planner = _planner_class()(dests)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp_load({}, storage_reader=FileSystemReader(ckpt_dir), planner=planner, no_dist=True)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's error derives from BaseException
        keys = sorted(requests)
        what = keys[0] + (f" and {len(keys) - 1} more tensors" if len(keys) > 1 else "")
        raise _error(ckpt_dir, f"cannot read {what}", exc) from None
    return {k: t for k, (_, t) in dests.items()}
