"""Reading and writing HF checkpoint directories without holding a model in memory.

:class:`SafetensorsReader` resolves a tensor name to its shard through ``model.safetensors.index.json``
(or the single ``model.safetensors``) and hands out *lazy* slices: indexing one reads only the
requested rows/columns from the file, which is how a TP rank loads just its shard.
:class:`ShardWriter` writes safetensors shards planned from the config, each tensor straight to its
place in its file, so export memory is bounded by one tensor. :func:`atomic_dir` makes every output appear complete or not at all.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tokenizer and generation files copied verbatim between HF and megacov directories.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
              "chat_template.json", "generation_config.json")


class CheckpointError(ValueError):
    """Bad input: missing directory/file/tensor, or a file that is not what it claims to be."""


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file {path}")
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def read_hf_config(hf_dir: str) -> dict:
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"no such directory: {hf_dir}")
    return read_json(os.path.join(hf_dir, "config.json"))


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_BLOCK_BYTES = 64 << 20  # rows read at a time when only some columns are wanted


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsFile:
    """The header of one safetensors file, and reads of byte ranges from it with plain ``preadv``.

    Not memory-mapped on purpose: a mapped file's touched pages count as the reader's resident
    memory, so a converter that maps a 60 GB checkpoint looks (and under pressure behaves) as if it
    held all of it. Here a slice is read into a fresh tensor and nothing else stays resident.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or n > size - 8:
                    raise ValueError("invalid header length")
                header = json.loads(fh.read(n))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for name, entry in header.items():
            if entry.get("dtype") not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')}")
            begin, end = entry["data_offsets"]
            if self.data_start + end > size:
                raise CheckpointError(f"{path}: tensor {name} lies beyond the end of the file (truncated?)")
            self.entries[name] = (_DTYPES[entry["dtype"]], tuple(entry["shape"]), begin)
        self._fd = os.open(path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self.entries)

    def read_into(self, out: torch.Tensor, offset: int) -> None:
        """Fill the contiguous tensor ``out`` with the bytes at data offset ``offset``."""
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], self.data_start + offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file")
            done += got

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class LazyTensor:
    """A tensor in a safetensors file, read only when (and only as far as) it is indexed.

    Supports what the weight mapping uses: ``t[:]``, ``t[a:b]`` (rows) and ``t[:, a:b]`` (columns of a
    matrix, read in blocks of rows).
    """

    def __init__(self, file: SafetensorsFile, name: str) -> None:
        self.file, self.name = file, name
        self.dtype, self.shape, self._begin = file.entries[name]

    def _rows(self, a: int, b: int) -> torch.Tensor:
        rest = self.shape[1:]
        out = torch.empty((b - a, *rest), dtype=self.dtype)
        if b > a:
            self.file.read_into(out, self._begin + a * _numel(rest) * _itemsize(self.dtype))
        return out

    def read_rows_into(self, out: torch.Tensor, start: int) -> None:
        """Read rows ``start .. start + len(out)`` straight into the contiguous tensor ``out``."""
        if not out.is_contiguous() or out.dtype != self.dtype or tuple(out.shape[1:]) != self.shape[1:] \
                or start < 0 or start + out.shape[0] > self.shape[0]:
            raise ValueError(f"{self.name}: cannot read rows {start}+{out.shape[0]} of {self.shape} {self.dtype} "
                             f"into {tuple(out.shape)} {out.dtype}")
        if out.numel():
            self.file.read_into(out, self._begin + start * _numel(self.shape[1:]) * _itemsize(self.dtype))

    def row_extent(self, start: int, rows: int) -> tuple[str, int, int]:
        """``(file path, absolute byte offset, bytes)`` of rows ``start .. start + rows``."""
        if not self.shape or start < 0 or rows < 0 or start + rows > self.shape[0]:
            raise ValueError(f"{self.name}: no rows {start}+{rows} in a tensor of shape {self.shape}")
        row = _numel(self.shape[1:]) * _itemsize(self.dtype)
        return self.file.path, self.file.data_start + self._begin + start * row, rows * row

    def __getitem__(self, index: Any) -> torch.Tensor:
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        if not (isinstance(rows, slice) and isinstance(cols, slice)) or rows.step not in (None, 1) \
                or cols.step not in (None, 1):
            raise TypeError(f"{self.name}: unsupported index {index!r}")
        if not self.shape:
            out = torch.empty((), dtype=self.dtype)
            self.file.read_into(out, self._begin)
            return out
        a, b, _ = rows.indices(self.shape[0])
        b = max(a, b)
        if cols == slice(None):
            return self._rows(a, b)
        c0, c1, _ = cols.indices(self.shape[1])
        if c0 == 0 and c1 >= self.shape[1]:  # every column: one contiguous read, no block copies
            return self._rows(a, b)
        out = torch.empty((b - a, max(0, c1 - c0), *self.shape[2:]), dtype=self.dtype)
        step = max(1, _BLOCK_BYTES // max(1, _numel(self.shape[1:]) * _itemsize(self.dtype)))
        for r in range(a, b, step):
            block = self._rows(r, min(b, r + step))
            out[r - a:r - a + block.shape[0]] = block[:, c0:c1]
        return out


class SafetensorsReader:
    """Name -> :class:`LazyTensor` over the shards of one HF directory. Files open on first use."""

    def __init__(self, hf_dir: str) -> None:
        self.dir = hf_dir
        self._handles: dict[str, Any] = {}
        index_path = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: no 'weight_map'")
            self.weight_map: dict[str, str] = weight_map
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
            self.weight_map = dict.fromkeys(self._handle(SINGLE_FILE).keys(), SINGLE_FILE)
        else:
            raise CheckpointError(f"{hf_dir}: no {INDEX_FILE} or {SINGLE_FILE} (only safetensors checkpoints "
                                  f"are supported)")
        missing = sorted({f for f in self.weight_map.values() if not os.path.isfile(os.path.join(hf_dir, f))})
        if missing:
            raise CheckpointError(f"{hf_dir}: shard files listed in the index are missing: {', '.join(missing)}")

    def _handle(self, filename: str) -> Any:
        if filename not in self._handles:
            self._handles[filename] = SafetensorsFile(os.path.join(self.dir, filename))
        return self._handles[filename]

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def __getitem__(self, name: str) -> LazyTensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor '{name}' not found in the checkpoint")
        return LazyTensor(self._handle(self.weight_map[name]), name)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def total_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.dir, f)) for f in set(self.weight_map.values()))

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


_T = TypeVar("_T")
_R = TypeVar("_R")


class ReadAhead(Generic[_T, _R]):
    """``resolve(item)`` for items asked for in a known order, computed one step ahead on a thread.

    A converter alternates "read and map item k" with "write item k". Reading (``preadv``), mapping
    (torch copies) and writing (``write``) all release the GIL, so while the caller writes item k a
    background thread reads item k + 1: disk reads, conversion and writes overlap, and at most
    ``depth + 1`` resolved items exist at once. ``hint(item)`` is called for the item after the
    last one submitted (a cheap "will need" for the disk). An item asked for out of the announced order is
    resolved directly (correct, just not overlapped); an error on the thread is raised to the caller.
    """

    def __init__(self, resolve: Callable[[_T], _R], order: Sequence[_T], key: Callable[[_T], Hashable],
                 depth: int = 1, hint: Callable[[_T], None] | None = None) -> None:
        self._resolve, self._order, self._key, self._depth = resolve, list(order), key, depth
        self._hint = hint
        self._next = 0
        self._pending: deque[tuple[Hashable, Future]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megacov-read-ahead")
        self.overlapped = 0
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._depth and self._next < len(self._order):
            item = self._order[self._next]
            self._next += 1
            self._pending.append((self._key(item), self._pool.submit(self._resolve, item)))
            if self._hint is not None and self._next < len(self._order):
                self._hint(self._order[self._next])  # e.g. start the disk read of the item after

    def __call__(self, item: _T) -> _R:
        if self._pending and self._pending[0][0] == self._key(item):
            _, future = self._pending.popleft()
            result = future.result()
            self._fill()  # the next read starts while the caller writes this one
            self.overlapped += 1
            return result
        return self._resolve(item)

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)


_DIRECT_ALIGN = 4096  # O_DIRECT wants file offsets, lengths and buffers aligned to the device block
_DIRECT_BLOCK = 8 << 20


class DirectFile:
    """A sequential binary output file written with ``O_DIRECT`` through one reused aligned buffer.

    A converter writes each output byte once and never reads it back; sending it through the page
    cache costs more than the disk: every write into a *new* file allocates fresh cache pages, which
    here ran at 0.3-0.8 GB/s against 1.8 GB/s for direct writes of the same bytes. So bytes are
    copied into an 8 MiB page-aligned buffer and written to disk a block at a time, on a thread,
    while the caller fills the other of two buffers (so copying and the disk overlap); :meth:`close`
    writes the tail padded to the block size and truncates the file to its real length. Where the
    file system refuses ``O_DIRECT`` (tmpfs, some network file systems) the same code writes
    buffered. :meth:`flush` is deliberately a no-op (callers flush after every record); the bytes
    are on disk when :meth:`close` returns, without an fsync of the metadata (like a buffered writer).

    ``write_at`` writes at an explicit position: at the cursor it is an ordinary write; anywhere
    else the file drops to buffered writes for the rest of its life (correct, only slower).
    """

    def __init__(self, path: str, size: int | None = None) -> None:
        self.name = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self._fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o666)
            self.direct = hasattr(os, "O_DIRECT")
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fd, self.direct = os.open(path, flags, 0o666), False
        if size is not None:
            os.ftruncate(self._fd, size)
        self._bufs = [mmap.mmap(-1, _DIRECT_BLOCK) for _ in range(2)]
        self._views = [memoryview(b) for b in self._bufs]
        self._view = self._views[0]
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None  # the write of the other buffer, in flight
        self._fill = 0  # bytes staged in the buffer
        self._done = 0  # bytes already in the file (a multiple of the block size while direct)
        self._size = size or 0

    def tell(self) -> int:
        return self._done + self._fill

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def flush(self) -> None:
        pass

    def write(self, data: Any) -> int:
        src = memoryview(data).cast("B")
        n, at = len(src), 0
        while at < n:
            take = min(n - at, _DIRECT_BLOCK - self._fill)
            self._view[self._fill:self._fill + take] = src[at:at + take]
            self._fill += take
            at += take
            if self._fill == _DIRECT_BLOCK:
                self._drain(self._fill)
        return n

    def write_at(self, pos: int, data: Any) -> None:
        if pos != self.tell():
            self._go_buffered()
            self._done, self._fill = pos, 0
        self.write(data)

    def _pwrite(self, view: memoryview, pos: int) -> None:
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self._fd, view[done:], pos + done)
            except OSError as exc:  # O_DIRECT accepted at open, refused at write: go buffered
                if not self.direct or exc.errno != errno.EINVAL:
                    raise
                self._set_direct(False)

    def _drain(self, nbytes: int) -> None:
        """Write the staged block on the writing thread and switch to the other buffer."""
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megacov-direct-write")
        self._pending = self._pool.submit(self._pwrite, self._view[:nbytes], self._done)
        self._view = self._views[1] if self._view is self._views[0] else self._views[0]
        self._done += nbytes
        self._fill = 0

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _set_direct(self, on: bool) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if on else (flags & ~os.O_DIRECT))
        self.direct = on

    def _go_buffered(self) -> None:
        self._wait()
        if self.direct:
            self._set_direct(False)
        if self._fill:
            self._drain(self._fill)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            end = self.tell()
            if self._fill:
                if self.direct:  # the last block, padded; the file is cut back to its length below
                    pad = -self._fill % _DIRECT_ALIGN
                    self._view[self._fill:self._fill + pad] = bytes(pad)
                    self._drain(self._fill + pad)
                else:
                    self._drain(self._fill)
            self._wait()
            os.ftruncate(self._fd, max(end, self._size))
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)  # a failed write is raised above; the thread is done here
            os.close(self._fd)
            self._fd = -1
            for view, buf in zip(self._views, self._bufs):
                view.release()
                buf.close()

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


class ShardWriter:
    """Stream tensors into safetensors shards whose layout is planned before any weight is read.

    ``plan`` maps every tensor name (in the order to store them) to ``(shape, dtype)``; both are known
    from the config alone. Each shard's header is written up front, and :meth:`add` writes a tensor's
    bytes straight to its place in the file, so memory holds only the tensor being written, whatever
    the shard size. :meth:`finish` checks that every planned tensor arrived and writes the index.
    """

    def __init__(self, out_dir: str, plan: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int) -> None:
        self.out_dir, self.plan = out_dir, plan
        shards: list[list[str]] = [[]]
        size = 0
        for name, (shape, dtype) in plan.items():
            nbytes = _numel(shape) * _itemsize(dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        n = len(shards)
        self.files = [SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._where: dict[str, tuple[Any, int, int]] = {}
        self._handles = []
        self.total_bytes = 0
        for filename, names in zip(self.files, shards):
            self._handles.append(self._open_shard(filename, names))
        self._written: set[str] = set()

    def _open_shard(self, filename: str, names: list[str]) -> Any:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            shape, dtype = self.plan[name]
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        fh = DirectFile(os.path.join(self.out_dir, filename), size=8 + len(raw) + offset)
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name in names:
            begin, end = header[name]["data_offsets"]
            self._where[name] = (fh, 8 + len(raw) + begin, end - begin)
        self.total_bytes += offset
        return fh

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.plan:
            raise ValueError(f"tensor {name} is not in the export plan")
        if name in self._written:
            raise ValueError(f"tensor {name} written twice")
        shape, dtype = self.plan[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, planned {tuple(shape)}")
        fh, pos, nbytes = self._where[name]
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != nbytes:
            raise ValueError(f"tensor {name}: {data.numel()} bytes, planned {nbytes}")
        fh.write_at(pos, memoryview(data.numpy()))
        self._written.add(name)

    def add_bytes(self, name: str, chunks: Iterable[Any]) -> None:
        """Write tensor ``name`` from its raw bytes in the planned dtype, given chunk by chunk."""
        if name not in self.plan or name in self._written:
            raise ValueError(f"tensor {name} is not in the export plan or was written twice")
        fh, pos, nbytes = self._where[name]
        end = pos + nbytes
        for chunk in chunks:
            if pos + len(chunk) > end:
                raise ValueError(f"tensor {name}: more than the planned {nbytes} bytes")
            fh.write_at(pos, chunk)
            pos += len(chunk)
        if pos != end:
            raise ValueError(f"tensor {name}: {nbytes - (end - pos)} bytes, planned {nbytes}")
        self._written.add(name)

    def finish(self) -> dict[str, str]:
        """Close the shards and write the index (several shards); returns the weight map."""
        for fh in self._handles:
            fh.close()
        missing = [n for n in self.plan if n not in self._written]
        if missing:
            raise ValueError(f"export incomplete: {len(missing)} tensors never arrived, e.g. {missing[:3]}")
        weight_map = {name: os.path.basename(fh.name) for name, (fh, _, _) in self._where.items()}
        for filename in self.files:
            os.chmod(os.path.join(self.out_dir, filename), 0o666 & ~_umask())
        if len(self.files) > 1:
            with open(os.path.join(self.out_dir, INDEX_FILE), "w") as fh:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, fh, indent=2)
        return weight_map


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy tokenizer/generation files that exist in ``src_dir``; returns the names copied."""
    copied = []
    for name in SIDE_FILES:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling of ``out_dir``; on success it is renamed to ``out_dir``.

    On failure the temporary directory is removed, so a crash never leaves a directory under the
    requested name. An existing non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)) and not overwrite:
        raise CheckpointError(f"output {out_dir} already exists (choose another path or pass --overwrite)")
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise CheckpointError(f"parent directory of the output does not exist: {parent}")
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: str | None = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=parent)
        os.replace(out_dir, os.path.join(old, "x"))
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
