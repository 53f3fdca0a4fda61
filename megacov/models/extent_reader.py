"""Stream the bytes of known file ranges, in a known order, read ahead on a thread with ``O_DIRECT``.

A converter knows before it writes anything which byte ranges of which input files make up each
output tensor (safetensors gives every tensor's offset; a fused or padded tensor is a list of row
ranges and zero rows). :class:`ExtentReader` reads those ranges in that order on one background
thread, into a small ring of page-aligned buffers, and hands them to the writer chunk by chunk.

Why ``O_DIRECT``: a cold buffered ``pread`` of a file that is read once runs at a third of the
disk's speed here (every page is allocated in the page cache, filled, copied out and left behind),
while direct reads of large aligned blocks run at the disk's speed and cost no page cache. Where the
file system refuses ``O_DIRECT`` the same aligned reads go through the page cache.

Memory: ``depth`` chunks of at most ``block`` bytes, whatever the tensor sizes. Reading (the
thread, blocked in ``preadv``), converting dtypes (on the thread, in torch, which releases the GIL)
and writing (the caller) overlap.
"""
from __future__ import annotations

import errno
import fcntl
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

_ALIGN = 4096  # O_DIRECT wants file offsets, lengths and buffers aligned to the device block
DEFAULT_BLOCK = 8 << 20


@dataclass(frozen=True)
class Extent:
    """``nbytes`` bytes at absolute offset ``offset`` of file ``path``; ``path=None``: zero bytes."""

    path: str | None
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Source:
    """One output tensor's bytes: ``extents`` in order, stored as ``stored`` and wanted as ``wanted``
    (converted on the reading thread), or, for what is not a list of ranges, ``build()`` -> tensor."""

    extents: Sequence[Extent] = ()
    stored: torch.dtype = torch.uint8
    wanted: torch.dtype = torch.uint8
    build: Callable[[], torch.Tensor] | None = None


def _aligned(nbytes: int) -> memoryview:
    """A writable page-aligned byte buffer (freed with its last reference)."""
    raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8)
    skip = -raw.data_ptr() % _ALIGN
    return memoryview(raw.numpy())[skip:skip + nbytes]


_END = object()


class ExtentReader:
    """The bytes of ``sources``, in order: ``chunks()`` yields the next source's bytes as memoryviews.

    Each chunk is valid until the iterator advances (its buffer goes back to the ring). An error on
    the reading thread is raised in the caller; :meth:`close` stops the thread and closes the files.
    """

    def __init__(self, sources: Sequence[Source], depth: int = 4, block: int = DEFAULT_BLOCK) -> None:
        if block % _ALIGN or depth < 1:
            raise ValueError(f"block {block} must be a multiple of {_ALIGN}, depth >= 1")
        self._sources, self._block = list(sources), block
        self._free: queue.Queue = queue.Queue()
        for _ in range(depth):
            self._free.put(_aligned(block))
        self._full: queue.Queue = queue.Queue()
        self._fds: dict[str, int] = {}
        self._stop = threading.Event()
        self.bytes_read = 0
        self._thread = threading.Thread(target=self._run, name="megacov-extent-reader", daemon=True)
        self._thread.start()

    # -- reading thread ----------------------------------------------------------------------------

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _pread(self, path: str, view: memoryview, pos: int, need: int) -> None:
        """Read at least ``need`` bytes of ``view`` from ``pos`` (an aligned direct read may end at EOF)."""
        fd, done = self._fd(path), 0
        while done < need:
            try:
                got = os.preadv(fd, [view[done:]], pos + done)
            except OSError as exc:  # O_DIRECT accepted at open, refused at read: read buffered
                if exc.errno != errno.EINVAL or not fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
                    raise
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                continue
            if got <= 0:
                raise OSError(errno.EIO, f"{path}: unexpected end of file at byte {pos + done}")
            done += got

    def _put(self, item: object) -> bool:
        self._full.put(item)
        return not self._stop.is_set()

    def _slot(self) -> memoryview | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _convert(self, buf: memoryview, view: memoryview, src: Source) -> tuple[memoryview, memoryview, object]:
        if src.stored == src.wanted:
            return buf, view, None
        out = torch.frombuffer(view, dtype=src.stored).to(src.wanted)
        return buf, memoryview(out.view(torch.uint8).numpy()), out

    def _extent(self, ext: Extent, src: Source) -> bool:
        size = torch.empty((), dtype=src.stored).element_size()
        pos, end = ext.offset, ext.offset + ext.nbytes
        if ext.nbytes % size:
            raise ValueError(f"{ext.path}: byte range {pos}..{end} is not whole {src.stored} elements")
        while pos < end:
            buf = self._slot()
            if buf is None:
                return False
            if ext.path is None:
                take = min(end - pos, self._block)
                buf[:take] = bytes(take)
                view = buf[:take]
            else:
                start = pos - pos % _ALIGN
                want = min(self._block, -(-(end - start) // _ALIGN) * _ALIGN)
                take = min(end, start + want) - pos
                take -= take % size if pos + take < end else 0  # whole elements: chunks convert alone
                self._pread(ext.path, buf[:want], start, pos - start + take)
                view = buf[pos - start:pos - start + take]
            self.bytes_read += take
            if not self._put(self._convert(buf, view, src)):
                return False
            pos += take
        return True

    def _built(self, src: Source) -> bool:
        assert src.build is not None
        tensor = src.build().to(src.wanted).contiguous()
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        self.bytes_read += len(data)
        for at in range(0, len(data), self._block):
            buf = self._slot()
            if buf is None or not self._put((buf, data[at:at + self._block], tensor)):
                return False
        return True

    def _run(self) -> None:
        try:
            for src in self._sources:
                ok = self._built(src) if src.build is not None else all(self._extent(e, src) for e in src.extents)
                if not ok or not self._put(_END):
                    return
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            self._full.put(exc)

    # -- caller ------------------------------------------------------------------------------------

    def chunks(self) -> Iterator[memoryview]:
        """The next source's bytes (converted to its ``wanted`` dtype), chunk by chunk."""
        while True:
            item = self._full.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            buf, view, _keep = item
            try:
                yield view
            finally:
                del view, _keep
                self._free.put(buf)

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a thread waiting for a free buffer
                item = self._full.get(timeout=0.1)
                if isinstance(item, tuple):
                    self._free.put(item[0])
            except queue.Empty:
                pass
        self._thread.join()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ExtentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
