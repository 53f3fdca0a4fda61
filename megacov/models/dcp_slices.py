"""Read arbitrary slices of a megatron torch_dist checkpoint with PyTorch DCP, in one process.

megatron's ``torch_dist`` format is a PyTorch Distributed Checkpoint whose tensors are stored in
global coordinates (decoder-layer tensors stacked along a leading layer axis). Megatron's own load
path describes a request as a regular grid of shards over ranks, which cannot express "layer 7 only"
in a single process. DCP's public planner interface can: a :class:`_SlicePlanner` asks for exactly
the boxes wanted, DCP computes which stored chunks overlap them (its resharding helper) and copies
only those. No process group is needed.
"""
from __future__ import annotations

import io
import os
import struct
import sys
import warnings
import zipfile
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


class _Window(io.RawIOBase):
    """A read-only view of ``length`` bytes at ``start`` of an open file, for parsing one DCP record."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        got = os.preadv(self._fd, [view[:n]], self._start + self._pos) if n else 0
        self._pos += got
        return got


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset}")
        view, offset = view[got:], offset + got


def _stored_bytes(fd: int, start: int, info: zipfile.ZipInfo) -> bytes:
    """The bytes of a small uncompressed zip entry, without ``zipfile``'s CRC check (writers may
    leave the CRC unset, as ``torch.save`` does when told not to compute it)."""
    header = os.pread(fd, 30, start + info.header_offset)
    if len(header) != 30 or header[:4] != b"PK\x03\x04" or info.compress_type != zipfile.ZIP_STORED:
        return b""
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return os.pread(fd, info.file_size, start + info.header_offset + 30 + name_len + extra_len)


def _record_layout(fd: int, start: int, length: int) -> tuple[torch.Tensor, int] | None:
    """``(meta tensor, absolute byte offset of its storage)`` of the ``torch.save`` record at ``start``,
    or None when the record is not one uncompressed, native-byte-order tensor storage.

    The tensor's layout comes from ``torch.load(weights_only=True)`` on the meta device (which reads
    only the record's pickle and zip directory); the zip directory confirms the storage entry."""
    window = _Window(fd, start, length)
    try:
        with zipfile.ZipFile(window) as zf:
            infos = zf.infolist()
            data = [i for i in infos if "/data/" in i.filename and not i.filename.endswith("/")]
            order = [i for i in infos if i.filename.endswith("/byteorder")]
            if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED or len(order) != 1:
                return None
            if _stored_bytes(fd, start, order[0]) != sys.byteorder.encode():
                return None
            stored = data[0].file_size
        window.seek(0)
        meta = torch.load(window, map_location="meta", weights_only=True)
    except Exception:  # noqa: BLE001 - anything unexpected: DCP's own reader handles the record
        return None
    if not isinstance(meta, torch.Tensor) or meta.device.type != "meta":
        return None
    storage = meta.untyped_storage()
    offset = getattr(storage, "_checkpoint_offset", None)
    if not isinstance(offset, int) or storage.nbytes() != stored or not 0 <= offset <= length - stored:
        return None
    return meta, start + offset


def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan

    class _DirectReader(FileSystemReader):
        """DCP's file reader, reading a tensor chunk straight into its destination slice.

        DCP's own reader ``torch.load``s each stored chunk whole and then copies the requested part
        into the destination, so a large tensor exists twice and its bytes are passed over twice.
        When the destination slice and the requested part of the chunk are both one contiguous byte
        range, the bytes are read from the file into the destination directly. Any other item
        (byte objects, transformed or strided records, other layouts) goes through DCP's reader.
        """

        def read_data(self, plan, planner):
            rest, fds, layouts = [], {}, {}
            try:
                for item in plan.items:
                    if not self._read_direct(item, planner, fds, layouts):
                        rest.append(item)
            finally:
                for fd in fds.values():
                    os.close(fd)
            return super().read_data(LoadPlan(rest), planner)

        def _read_direct(self, item, planner, fds, layouts) -> bool:
            info = self.storage_data[item.storage_index]
            if item.type != LoadItemType.TENSOR or info.transform_descriptors:
                return False
            path = os.path.join(str(self.path), info.relative_path)
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
            where = (path, info.offset)
            if where not in layouts:
                layouts[where] = _record_layout(fds[path], info.offset, info.length)
            if layouts[where] is None:
                return False
            meta, data_at = layouts[where]
            src = meta
            for dim, (start, size) in enumerate(zip(item.storage_offsets, item.lengths)):
                src = src.narrow(dim, start, size)
            dest = planner.resolve_tensor(item).detach()
            if (dest.dtype != src.dtype or dest.shape != src.shape or dest.device.type != "cpu"
                    or not src.is_contiguous() or not dest.is_contiguous()):
                return False
            if dest.numel():
                view = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
                _pread_full(fds[path], view, data_at + src.storage_offset() * src.element_size())
            planner.commit_tensor(item, dest)
            return True

    return _DirectReader


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


def load_slices(ckpt_dir: str, requests: dict[str, tuple[Sequence[int], Sequence[int], torch.dtype]],
                direct: bool = True) -> dict[str, torch.Tensor]:
    """Load ``{key: (offsets, shape, dtype)}`` boxes; returns ``{key: tensor of that shape}``.

    ``direct=False`` reads every chunk through DCP's own reader (the reference the direct reads
    are tested against)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException

    dests = {k: (tuple(off), torch.empty(tuple(shape), dtype=dt)) for k, (off, shape, dt) in requests.items()}
    planner = _planner_class()(dests)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp_load({}, storage_reader=(_reader_class() if direct else FileSystemReader)(ckpt_dir),
                     planner=planner, no_dist=True)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's error derives from BaseException
        keys = sorted(requests)
        what = keys[0] + (f" and {len(keys) - 1} more tensors" if len(keys) > 1 else "")
        raise _error(ckpt_dir, f"cannot read {what}", exc) from None
    return {k: t for k, (_, t) in dests.items()}


class RowExtents:
    """Where rows of a torch_dist checkpoint's tensors lie in its files, as byte ranges.

    A tensor is stored as chunks (one per saving rank's shard), each one ``torch.save`` record whose
    storage is one contiguous byte range (:func:`_record_layout`). A run of rows of one element of
    a stacked tensor (layer ``s``, expert ``e``) whose chunks hold every column is therefore a few
    byte ranges, which an exporter can copy without loading the tensor. :meth:`rows` returns None
    for anything else (a chunk holding a block of columns, a transformed or unusual record).
    """

    def __init__(self, ckpt_dir: str) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self._dir = ckpt_dir
        self._md = FileSystemReader(ckpt_dir).read_metadata()
        self._fds: dict[str, int] = {}
        self._layouts: dict[tuple[str, int], tuple[torch.Tensor, int] | None] = {}

    def _layout(self, key: str, offsets: Sequence[int]) -> tuple[str, torch.Tensor, int] | None:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = (self._md.storage_data or {}).get(MetadataIndex(key, offsets))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        path = os.path.join(self._dir, info.relative_path)
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        where = (path, info.offset)
        if where not in self._layouts:
            self._layouts[where] = _record_layout(self._fds[path], info.offset, info.length)
        found = self._layouts[where]
        return None if found is None else (path, found[0], found[1])

    def rows(self, key: str, lead: Sequence[int], ranges: Sequence[tuple[int, int]]) -> list | None:
        """:class:`~megacov.models.extent_reader.Extent`\\ s of rows ``ranges`` (``(first, count)`` along the
        axis after the ``lead`` ones) of element ``lead`` of tensor ``key``, or None."""
        from megacov.models.extent_reader import Extent

        tmd = self._md.state_dict_metadata.get(key)
        if tmd is None or not hasattr(tmd, "chunks"):
            return None
        shape, nl = tuple(tmd.size), len(lead)
        if len(shape) <= nl:
            return None
        inner = shape[nl + 1:]
        out = []
        for first, count in ranges:
            row = first
            while row < first + count:
                chunk = next((c for c in tmd.chunks
                              if all(o <= i < o + n for i, o, n in zip(lead, c.offsets, c.sizes))
                              and c.offsets[nl] <= row < c.offsets[nl] + c.sizes[nl]
                              and all(o == 0 for o in c.offsets[nl + 1:]) and tuple(c.sizes[nl + 1:]) == inner),
                             None)
                found = None if chunk is None else self._layout(key, chunk.offsets)
                if found is None:
                    return None
                path, meta, data_at = found
                if tuple(meta.shape) != tuple(chunk.sizes) or not meta.is_contiguous():
                    return None
                take = min(first + count, chunk.offsets[nl] + chunk.sizes[nl]) - row
                index = [i - o for i, o in zip(lead, chunk.offsets)] + [row - chunk.offsets[nl]]
                element = meta.storage_offset() + sum(i * s for i, s in zip(index, meta.stride()))
                row_bytes = meta.element_size()
                for n in inner:
                    row_bytes *= n
                out.append(Extent(path, data_at + element * meta.element_size(), take * row_bytes))
                row += take
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
