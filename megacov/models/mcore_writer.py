"""Write a megatron torch_dist checkpoint straight from HF safetensors, without holding a tensor.

Saving a built model would hold this rank's whole chunk in memory (and megatron's writer copies it
once more). Instead the chunk is built on the ``meta`` device: it has every name, shape, sharding
offset and replica id megatron's ``sharded_state_dict()`` needs, but no storage. megatron's own
``dist_checkpointing.save`` then runs with a strategy whose DCP storage writer copies each write
item's bytes from the HF files while it writes the item's record: the item's box (global offsets
and sizes, e.g. "layer 5, rows 0..1023 of linear_qkv") is, through the pure mapping, a list of
row ranges of HF tensors (q/k/v groups, gate and up halves, zero rows of vocabulary padding), and
safetensors says where each lies on disk. The resulting directory is the ordinary torch_dist
format (megatron's metadata.json, common.pt and DCP metadata), which megatron loads and reshards
at any layout.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import torch

from megacov.models import mapping
from megacov.models.extent_reader import Extent
from megacov.models.extent_reader import Source as ExtentSource
from megacov.models.family import families
from megacov.models.loader import Source

_LAYER_PREFIX = mapping.CKPT_LAYER_PREFIX


def import_megatron() -> None:
    """Import what the writer uses from megatron and DCP (process start-up, seconds on a cold cache),
    so that a caller can do it before it starts timing or measuring the conversion itself."""
    import torch.distributed.checkpoint  # noqa: F401


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
    :meth:`source` says where a box's bytes lie in the HF files instead of reading them, where the
    box is made of whole HF rows (every box but a row-parallel weight's columns at TP > 1).
    """

    def __init__(self, hf: Any, src: Source) -> None:
        self.hf, self.dims = hf, src.arch.dims
        self.rules = families()[src.arch.family].layer_rules
        self.bytes_read = 0

    def _name(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> tuple[str, int]:
        """The model parameter behind box ``key`` at ``offsets``, and how many leading axes it drops."""
        if not key.startswith(_LAYER_PREFIX):
            return key, 0
        parsed = mapping.parse_checkpoint_key(key)  # mixed dense/MoE models: per-layer keys
        lead = parsed.lead_axes  # leading layer axis (stacked keys), then expert axis (experts)
        if any(s != 1 for s in sizes[:lead]):
            raise ValueError(f"{key}: write item spans {tuple(sizes[:lead])} layers/experts")
        index = list(offsets[:lead])
        layer = parsed.layer if parsed.layer is not None else index.pop(0)
        return mapping.model_name_of_checkpoint_key(key, layer, index[0] if parsed.expert else None), lead

    def __call__(self, key: str, offsets: Sequence[int], sizes: Sequence[int], full: Sequence[int]) -> torch.Tensor:
        name, lead = self._name(key, offsets, sizes)
        box = self._box(name, list(offsets[lead:]), list(sizes[lead:]), list(full[lead:]))
        out = box.reshape(tuple(sizes))
        self.bytes_read += out.numel() * out.element_size()
        return out.contiguous()

    def _shard_of(self, name: str, off: list, size: list, full: list) -> tuple[int, int, int | None] | None:
        """``(tp_rank, tp, half)`` when the box is TP shard ``tp_rank`` of ``tp`` (``half`` 0/1: only the
        gate or up half of a fused fc1 shard), else ``None``."""
        kind = mapping.resolve(name, self.rules, self.dims).rule.kind

        def whole_rest(dims: Any) -> bool:
            return all(off[d] == 0 and size[d] == full[d] for d in dims)

        if kind == "replicated" and size == full:
            return 0, 1, None
        if kind == "row" and whole_rest([0]) and full[1] % size[1] == 0 and off[1] % size[1] == 0:
            return off[1] // size[1], full[1] // size[1], None
        if kind in ("qkv", "vocab") and whole_rest(range(1, len(full))) and off[0] % size[0] == 0 \
                and full[0] % size[0] == 0:
            return off[0] // size[0], full[0] // size[0], None
        if kind == "fc1" and whole_rest(range(1, len(full))):
            ffn = full[0] // 2
            part, start = (0, off[0]) if off[0] < ffn else (1, off[0] - ffn)
            if ffn % size[0] == 0 and start % size[0] == 0 and start + size[0] <= ffn:
                return start // size[0], ffn // size[0], part
        return None

    def _box(self, name: str, off: list, size: list, full: list) -> torch.Tensor:
        shard = self._shard_of(name, off, size, full)
        if shard is not None:
            tp_rank, tp, half = shard
            out = self._shard(name, tp_rank, tp)
            return out if half is None else out.chunk(2, dim=0)[half]
        whole = self._shard(name, 0, 1)
        for d, (o, s) in enumerate(zip(off, size)):
            whole = whole.narrow(d, o, s)
        return whole

    def source(self, key: str, offsets: Sequence[int], sizes: Sequence[int], full: Sequence[int],
               dtype: torch.dtype) -> tuple[ExtentSource, tuple]:
        """Where box ``key`` lies in the HF files (extents), or how to build it; and a sort key: the
        position of its first HF bytes, so that boxes written in that order read the files in order."""
        name, lead = self._name(key, offsets, sizes)
        off, size, whole = list(offsets[lead:]), list(sizes[lead:]), list(full[lead:])
        hf_names = mapping.resolve(name, self.rules, self.dims).hf
        first = self.hf[hf_names[0]]
        position = first.row_extent(0, 0)[:2] if first.shape else (first.file.path, 0)
        shard = self._shard_of(name, off, size, whole)
        parts = None if shard is None else mapping.hf_rows_of_shard(name, self.hf, self.rules, self.dims,
                                                                    shard[0], shard[1])
        if parts is not None and shard is not None and shard[2] is not None:
            parts = [parts[shard[2]]]  # fc1 half: the gate or the up rows of the shard
        numel = 1
        for s in sizes:
            numel *= s
        if parts is not None:
            extents = []
            for hf_name, start, rows in parts:
                if hf_name is None:  # zero rows of the row size of the real tensor
                    row = first.row_extent(0, 1)[2] if first.shape[0] else 0
                    extents.append(Extent(None, 0, rows * row))
                else:
                    extents.append(Extent(*self.hf[hf_name].row_extent(start, rows)))
            if sum(e.nbytes for e in extents) == numel * first.dtype.itemsize:
                self.bytes_read += numel * first.dtype.itemsize
                position = next(((e.path, e.offset) for e in extents if e.path is not None), position)
                return ExtentSource(extents, first.dtype, dtype), position
        return ExtentSource(build=lambda: self(key, offsets, sizes, full), wanted=dtype), position

    def _shard(self, name: str, tp_rank: int, tp: int) -> torch.Tensor:
        return mapping.hf_to_mcore_shard(name, self.hf, self.rules, self.dims, tp_rank, tp)


def _strategy(read_box: BoxReader, progress: bool) -> Any:
    """A torch_dist save strategy whose records are copied from the HF files as they are written.

    megatron plans the checkpoint (its sharded state dict of meta tensors, DCP's planner: keys,
    boxes, metadata) exactly as for a model in memory. Only the storage writer differs: where
    DCP's would ask the planner for each tensor and ``torch.save`` it, this one ``torch.save``-s a
    placeholder of the right shape and dtype under ``torch.serialization.skip_data`` (which writes
    the record without its data bytes: the placeholder's storage is reserved address space, never
    touched), and fills the skipped bytes from the HF files, which an
    :class:`~megacov.models.extent_reader.ExtentReader` reads ahead with ``O_DIRECT`` on a thread.
    The records are those ``torch.save`` writes, in files and metadata DCP's reader and megatron's
    loader read; records are written in the HF files' order, so the input is read sequentially.
    Memory: the reader's ring and the writer's buffer, not a tensor. The records' CRC32 (which
    ``torch.load`` does not check) is skipped, as it is by megatron's own writer. Files are written
    with ``O_DIRECT`` (:class:`~megacov.models.hf_io.DirectFile`): the page cache is what bounded
    a buffered writer's speed.
    """
    import io
    import mmap
    from contextlib import contextmanager

    import torch.serialization
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystem, _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    from megacov.models.extent_reader import ExtentReader
    from megacov.models.hf_io import DirectFile

    class _DirectFileSystem(FileSystem):
        @contextmanager
        def create_stream(self, path: Any, mode: str) -> Any:
            if mode != "wb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with DirectFile(str(path)) as stream:
                yield stream

    class _Record(io.RawIOBase):
        """What ``torch.save`` writes one record into: the file, where the skipped data bytes come
        from the reader (``skip_data`` passes them over as a relative seek of their length)."""

        def __init__(self, out: DirectFile, reader: ExtentReader, nbytes: int, key: str) -> None:
            self.out, self.reader, self.nbytes, self.key, self.filled = out, reader, nbytes, key, False

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            return self.out.write(data)

        def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
            if whence != io.SEEK_CUR or offset != self.nbytes or self.filled:
                raise RuntimeError(f"{self.key}: torch.save skipped {offset} bytes (whence {whence}); "
                                   f"the record's data is {self.nbytes} bytes")
            copied = 0
            for chunk in self.reader.chunks():
                copied += self.out.write(chunk)
            if copied != self.nbytes:
                raise RuntimeError(f"{self.key}: read {copied} bytes for a record of {self.nbytes}")
            self.filled = True
            return self.out.tell()

        def tell(self) -> int:
            return self.out.tell()

    class _RecordWriter(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            items = [item for item in plan.items if item.type != WriteItemType.BYTE_IO]
            sources = {}
            for item in items:
                td = item.tensor_data
                sources[item.index] = read_box.source(item.index.fqn, td.chunk.offsets, td.chunk.sizes, td.size,
                                                      td.properties.dtype)
            items.sort(key=lambda item: sources[item.index][1])
            sizes = [_numel(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize
                     for item in items]
            reserve = mmap.mmap(-1, max(sizes, default=0) or 1)  # placeholders' storage: never touched
            results = []
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(items), desc="writing checkpoint", unit="tensor", file=sys.stderr)
            with DirectFile(str(self.fs.concat_path(self.path, name))) as out, \
                    ExtentReader([sources[item.index][0] for item in items]) as reader:
                for item in plan.items:
                    if item.type == WriteItemType.BYTE_IO:
                        at = out.tell()
                        out.write(planner.resolve_data(item).getbuffer())
                        results.append(WriteResult(item.index, out.tell() - at, _StorageInfo(name, at, out.tell() - at)))
                for item, nbytes in zip(items, sizes):
                    td, at = item.tensor_data, out.tell()
                    placeholder = (torch.frombuffer(reserve, dtype=td.properties.dtype, count=_numel(td.chunk.sizes))
                                   if nbytes else torch.empty(0, dtype=td.properties.dtype)).view(td.chunk.sizes)
                    record = _Record(out, reader, nbytes, item.index.fqn)
                    with torch.serialization.skip_data():
                        torch.save(placeholder, record)
                    if not record.filled:
                        raise RuntimeError(f"{item.index.fqn}: torch.save wrote no data record")
                    results.append(WriteResult(item.index, out.tell() - at, _StorageInfo(name, at, out.tell() - at)))
                    if bar is not None:
                        bar.update(1)
            if bar is not None:
                bar.close()
            future: Future = Future()
            future.set_result(results)
            return future

    class _RecordTorchDist(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
            writer = _RecordWriter(str(checkpoint_dir), thread_count=1, sync_files=False)
            writer.fs = _DirectFileSystem()
            crc = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
            try:
                # One process: no plan to gather (DCP's gather pickles every plan through gloo,
                # a fixed ~0.2 s); the files and metadata are those the coordinator would write.
                dcp_save(mcore_to_pyt_state_dict(state, False), storage_writer=writer, planner=planner,
                         no_dist=not torch.distributed.is_initialized()
                         or torch.distributed.get_world_size() == 1)
            finally:
                torch.serialization.set_crc32_options(crc)

    return _RecordTorchDist("torch_dist", 1, thread_count=1)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def save_from_hf(src: Source, layout: Any, out_dir: str, dtype: torch.dtype, progress: bool = False) -> int:
    """Collective over the layout's ranks: write this rank's part of the checkpoint. Returns bytes read."""
    from megatron.core import dist_checkpointing

    from megacov.models.hf_io import SafetensorsReader

    chunk = build_meta_chunk(src, layout, dtype)
    read_box = BoxReader(SafetensorsReader(src.path), src)
    dist_checkpointing.save(chunk.sharded_state_dict(), out_dir, sharded_strategy=_strategy(read_box, progress))
    return read_box.bytes_read
