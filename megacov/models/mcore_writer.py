"""Write a megatron torch_dist checkpoint straight from HF safetensors, one tensor in memory at a time.

Saving a built model would hold this rank's whole chunk in memory (and megatron's writer copies it
once more). Instead the chunk is built on the ``meta`` device: it has every name, shape, sharding
offset and replica id megatron's ``sharded_state_dict()`` needs, but no storage. megatron's own
``dist_checkpointing.save`` then runs with a strategy that hands that state dict to PyTorch DCP's
file writer, whose planner materialises each write item only when the writer asks for its bytes:
the item's box (global offsets and sizes, e.g. "layer 5, rows 0..1023 of linear_qkv") is read from
the HF files through the pure mapping, written, and dropped. The resulting directory is the
ordinary torch_dist format (megatron's metadata.json, common.pt and DCP metadata), which megatron
loads and reshards at any layout.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import torch

from megacov.models import mapping
from megacov.models.family import families
from megacov.models.loader import Source

_LAYER_PREFIX = mapping.CKPT_LAYER_PREFIX


def build_meta_chunk(src: Source, layout: Any, dtype: torch.dtype) -> torch.nn.Module:
    """This rank's GPTModel chunk with every parameter on the meta device (no memory, no init)."""
    from megacov.models.arch import megatron_config
    from megacov.models.loader import build_chunk

    cfg = megatron_config(src.arch, tp=layout.tp, pp=layout.pp, dtype=dtype, perform_initialization=False,
                          use_cpu_initialization=True, ep=getattr(layout, "ep", 1))
    meta_layout = dataclasses.replace(layout, device=torch.device("meta"))
    with torch.device("meta"):
        return build_chunk(cfg, src.arch, meta_layout, use_te=False)


class BoxReader:
    """The megatron tensor box ``(key, offsets, sizes)`` of a checkpoint, computed from HF tensors.

    Boxes that are whole TP shards (what megatron writes) are read as shards, so only their rows or
    columns are read from disk; any other box falls back to the full tensor, narrowed.
    """

    def __init__(self, hf: Any, src: Source) -> None:
        self.hf, self.dims = hf, src.arch.dims
        self.rules = families()[src.arch.family].layer_rules
        self.bytes_read = 0

    def __call__(self, key: str, offsets: Sequence[int], sizes: Sequence[int], full: Sequence[int]) -> torch.Tensor:
        if key.startswith(_LAYER_PREFIX):  # stacked per-layer tensor: leading layer axis of size 1
            parsed = mapping.parse_checkpoint_key(key)  # mixed dense/MoE models: per-layer keys
            lead = parsed.lead_axes  # leading layer axis (stacked keys), then expert axis (experts)
            if any(s != 1 for s in sizes[:lead]):
                raise ValueError(f"{key}: write item spans {tuple(sizes[:lead])} layers/experts")
            index = list(offsets[:lead])
            layer = parsed.layer if parsed.layer is not None else index.pop(0)
            name = mapping.model_name_of_checkpoint_key(key, layer, index[0] if parsed.expert else None)
            box = self._box(name, list(offsets[lead:]), list(sizes[lead:]), list(full[lead:]))
            out = box.reshape(tuple(sizes))
        else:
            out = self._box(key, list(offsets), list(sizes), list(full))
        self.bytes_read += out.numel() * out.element_size()
        return out.contiguous()

    def _box(self, name: str, off: list, size: list, full: list) -> torch.Tensor:
        kind = mapping.resolve(name, self.rules, self.dims).rule.kind

        def whole_rest(dims: Any) -> bool:
            return all(off[d] == 0 and size[d] == full[d] for d in dims)

        shard = None
        if kind == "replicated" and size == full:
            shard = self._shard(name, 0, 1)
        elif kind == "row" and whole_rest([0]) and full[1] % size[1] == 0 and off[1] % size[1] == 0:
            shard = self._shard(name, off[1] // size[1], full[1] // size[1])
        elif kind in ("qkv", "vocab") and whole_rest(range(1, len(full))) and off[0] % size[0] == 0 \
                and full[0] % size[0] == 0:
            shard = self._shard(name, off[0] // size[0], full[0] // size[0])
        elif kind == "fc1" and whole_rest(range(1, len(full))):
            ffn = full[0] // 2
            part, start = (0, off[0]) if off[0] < ffn else (1, off[0] - ffn)
            if ffn % size[0] == 0 and start % size[0] == 0 and start + size[0] <= ffn:
                halves = self._shard(name, start // size[0], ffn // size[0]).chunk(2, dim=0)
                return halves[part]
        if shard is not None:
            return shard
        whole = self._shard(name, 0, 1)
        for d, (o, s) in enumerate(zip(off, size)):
            whole = whole.narrow(d, o, s)
        return whole

    def will_need(self, key: str, offsets: Sequence[int]) -> None:
        """Hint the disk about the HF tensors behind box ``key`` at ``offsets`` (read soon)."""
        name = key
        if key.startswith(_LAYER_PREFIX):  # the same naming as __call__: stacked layer, then expert axis
            parsed = mapping.parse_checkpoint_key(key)
            index = list(offsets[:parsed.lead_axes])
            layer = parsed.layer if parsed.layer is not None else index.pop(0)
            name = mapping.model_name_of_checkpoint_key(key, layer, index[0] if parsed.expert else None)
        self.hf.will_need(mapping.resolve(name, self.rules, self.dims).hf)

    def _shard(self, name: str, tp_rank: int, tp: int) -> torch.Tensor:
        return mapping.hf_to_mcore_shard(name, self.hf, self.rules, self.dims, tp_rank, tp)


def _strategy(read_box: BoxReader, progress: bool) -> Any:
    """A torch_dist save strategy whose tensors come from ``read_box`` at write time.

    The planner knows the order in which DCP's writer will ask for the tensors (its plan order, one
    file per rank), so a :class:`~megacov.models.hf_io.ReadAhead` reads and maps the next write item
    while the current one is written. DCP's writer keeps a reference to every tensor of a file
    until the file is closed; each tensor's bytes are freed as soon as the writer asks for the next
    one (it has been written by then), so memory holds two items, not the rank's share. The
    records' CRC32 (which ``torch.load`` does not check) is skipped: it costs as much as the write.
    The files are written with ``O_DIRECT`` (:class:`~megacov.models.hf_io.DirectFile`): the same
    bytes, without allocating page cache for them, which is what bounded the writer's speed.
    """
    import torch.serialization
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from contextlib import contextmanager

    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    from megacov.models.hf_io import DirectFile, ReadAhead, release_storage

    class _DirectFileSystem(FileSystem):
        @contextmanager
        def create_stream(self, path: Any, mode: str) -> Any:
            if mode != "wb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with DirectFile(str(path)) as stream:
                yield stream

    def materialise(item: Any) -> torch.Tensor:
        td = item.tensor_data
        tensor = read_box(item.index.fqn, td.chunk.offsets, td.chunk.sizes, td.size).to(td.properties.dtype)
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a view of a larger read: DCP would clone it anyway
        return tensor

    class _LazyPlanner(MCoreSavePlanner):
        bar: Any | None = None
        ahead: ReadAhead | None = None
        last: torch.Tensor | None = None

        def finish_plan(self, new_plan: Any) -> Any:
            plan = super().finish_plan(new_plan)
            tensors = [item for item in plan.items if item.type != WriteItemType.BYTE_IO]
            self.ahead = ReadAhead(materialise, tensors, key=lambda item: item.index,
                                   hint=lambda item: read_box.will_need(item.index.fqn,
                                                                        item.tensor_data.chunk.offsets))
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(total=len(tensors), desc="writing checkpoint", unit="tensor", file=sys.stderr)
            return plan

        def resolve_data(self, write_item: Any) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            if self.last is not None:  # asked for the next item: the previous one is on disk
                release_storage(self.last)
            self.last = self.ahead(write_item) if self.ahead is not None else materialise(write_item)
            if self.bar is not None:
                self.bar.update(1)
            return self.last

        def close(self) -> None:
            if self.ahead is not None:
                self.ahead.close()
            if self.bar is not None:
                self.bar.close()

    class _LazyTorchDist(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            planner = _LazyPlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
            writer = FileSystemWriter(str(checkpoint_dir), thread_count=1, sync_files=False)
            writer.fs = _DirectFileSystem()
            crc = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
            try:
                dcp_save(mcore_to_pyt_state_dict(state, False), storage_writer=writer, planner=planner)
            finally:
                torch.serialization.set_crc32_options(crc)
                planner.close()

    return _LazyTorchDist("torch_dist", 1, thread_count=1)


def save_from_hf(src: Source, layout: Any, out_dir: str, dtype: torch.dtype, progress: bool = False) -> int:
    """Collective over the layout's ranks: write this rank's part of the checkpoint. Returns bytes read."""
    from megatron.core import dist_checkpointing

    from megacov.models.hf_io import SafetensorsReader

    chunk = build_meta_chunk(src, layout, dtype)
    read_box = BoxReader(SafetensorsReader(src.path), src)
    dist_checkpointing.save(chunk.sharded_state_dict(), out_dir, sharded_strategy=_strategy(read_box, progress))
    return read_box.bytes_read
