"""The conversion pipeline's read-ahead (order, overlap, bounded items in flight, errors) and direct writes."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from megacov.models.hf_io import ReadAhead


def test_read_ahead_resolves_the_next_item_while_the_caller_works():
    started = {i: threading.Event() for i in range(6)}
    alive, peak, lock = [0], [0], threading.Lock()

    def resolve(i: int) -> int:
        started[i].set()
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        return i * 10

    ahead = ReadAhead(resolve, list(range(6)), key=lambda i: i)
    try:
        for i in range(6):
            assert ahead(i) == i * 10
            if i + 1 < 6:  # item i + 1 is being read while the caller still holds item i
                assert started[i + 1].wait(5)
            with lock:
                alive[0] -= 1  # the caller has written item i and dropped it
        assert ahead.overlapped == 6 and peak[0] <= 2
    finally:
        ahead.close()


def test_read_ahead_out_of_order_and_errors():
    calls = []

    def resolve(i: int) -> int:
        calls.append(i)
        if i == 3:
            raise OSError("disk says no")
        return -i

    ahead = ReadAhead(resolve, [0, 1, 2, 3], key=lambda i: i)
    try:
        assert ahead(0) == 0
        assert ahead(2) == -2  # not the announced next item: resolved directly, still right
        assert ahead(1) == -1
        assert ahead.overlapped == 2
    finally:
        ahead.close()
    broken = ReadAhead(resolve, [3], key=lambda i: i)
    try:
        with pytest.raises(OSError, match="disk says no"):
            broken(3)
    finally:
        broken.close()


def direct_io_supported(path) -> bool:
    try:
        os.close(os.open(str(path / "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("direct", [True, False])
def test_direct_file_writes_exactly_the_bytes_given(tmp_path, monkeypatch, direct) -> None:
    """Records of odd sizes straddling the staging block, a tail shorter than the device block, and
    a file system that refuses O_DIRECT: the file holds exactly the bytes written, nothing padded."""
    from megacov.models import hf_io

    monkeypatch.setattr(hf_io, "_DIRECT_BLOCK", 1 << 16)
    if not direct:  # open(O_DIRECT) refused, as on tmpfs
        real_open = os.open
        monkeypatch.setattr(hf_io.os, "open", lambda p, f, *a: (_ for _ in ()).throw(OSError(22, "EINVAL"))
                            if f & os.O_DIRECT else real_open(p, f, *a))
    gen = torch.Generator().manual_seed(0)
    records = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in (7, 65536, 100003, 1, 4095)]
    path = str(tmp_path / "out.bin")
    with hf_io.DirectFile(path) as fh:
        assert fh.direct is direct or not direct_io_supported(tmp_path)
        for i, r in enumerate(records):
            assert fh.tell() == sum(len(x) for x in records[:i])
            fh.write(memoryview(r.numpy()))
            fh.flush()
    assert open(path, "rb").read() == b"".join(r.numpy().tobytes() for r in records)


def test_direct_file_out_of_order_writes_fall_back_to_buffered(tmp_path, monkeypatch) -> None:
    from megacov.models import hf_io

    monkeypatch.setattr(hf_io, "_DIRECT_BLOCK", 1 << 16)
    path = str(tmp_path / "out.bin")
    with hf_io.DirectFile(path, size=200_000) as fh:
        fh.write_at(0, b"a" * 70_000)  # in order: staged, one block written directly
        fh.write_at(150_000, b"c" * 50_000)  # ahead of the cursor: the rest is buffered
        assert not fh.direct and fh.tell() == 200_000
        fh.write_at(70_000, b"b" * 80_000)
    assert open(path, "rb").read() == b"a" * 70_000 + b"b" * 80_000 + b"c" * 50_000
