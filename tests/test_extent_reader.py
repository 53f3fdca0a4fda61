"""The O_DIRECT extent reader: exact bytes at any offset, zeros, dtype conversion, bounded read-ahead, errors."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from megacov.models.extent_reader import Extent, ExtentReader, Source

BLOCK = 8192


@pytest.fixture()
def data_file(tmp_path):
    raw = torch.randint(0, 256, (5 * BLOCK + 1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = str(tmp_path / "data.bin")
    with open(path, "wb") as fh:
        fh.write(raw.numpy().tobytes())
    return path, raw.numpy().tobytes()


def _read_all(reader: ExtentReader, n: int) -> list[bytes]:
    return [b"".join(bytes(c) for c in reader.chunks()) for _ in range(n)]


def test_bytes_at_unaligned_offsets_across_blocks_and_zeros(data_file) -> None:
    path, raw = data_file
    sources = [
        Source([Extent(path, 12, 3 * BLOCK + 4)]),  # unaligned start, several blocks
        Source([Extent(path, 4 * BLOCK + 3, 997), Extent(None, 0, BLOCK + 5), Extent(path, 0, 16)]),
        Source([Extent(path, len(raw) - 40, 40)]),  # ends at the file's (unaligned) end
        Source([]),  # an empty record
    ]
    with ExtentReader(sources, depth=2, block=BLOCK) as reader:
        got = _read_all(reader, len(sources))
    assert got[0] == raw[12:12 + 3 * BLOCK + 4]
    assert got[1] == raw[4 * BLOCK + 3:4 * BLOCK + 1000] + bytes(BLOCK + 5) + raw[:16]
    assert got[2] == raw[-40:]
    assert got[3] == b""


def test_converts_dtype_and_builds_what_is_not_a_range(tmp_path) -> None:
    values = torch.randn(3000, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "f32.bin")
    with open(path, "wb") as fh:
        fh.write(b"\0" * 6 + values.numpy().tobytes())  # data at offset 6: not aligned to its elements
    built = torch.arange(5000, dtype=torch.float32)
    sources = [Source([Extent(path, 6, values.numel() * 4)], torch.float32, torch.bfloat16),
               Source([Extent(path, 6, 4), Extent(path, 10, values.numel() * 4 - 4)], torch.float32, torch.bfloat16),
               Source(build=lambda: built, wanted=torch.float16)]
    with ExtentReader(sources, depth=2, block=BLOCK) as reader:
        as_bf16, again, as_f16 = _read_all(reader, 3)
    assert as_bf16 == again == values.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert as_f16 == built.to(torch.float16).view(torch.int16).numpy().tobytes()


def test_reads_ahead_at_most_depth_blocks(data_file) -> None:
    path, raw = data_file
    with ExtentReader([Source([Extent(path, 0, len(raw))])], depth=2, block=BLOCK) as reader:
        consumed = 0
        for chunk in reader.chunks():
            consumed += len(chunk)
            threading.Event().wait(0.02)  # let the thread run as far ahead as it may
            assert reader.bytes_read <= consumed + 2 * BLOCK
        assert consumed == len(raw)


def test_errors_reach_the_caller_and_close_mid_stream(data_file) -> None:
    path, raw = data_file
    with ExtentReader([Source([Extent(path, len(raw) - 10, 100)])], block=BLOCK) as reader, \
            pytest.raises(OSError, match="unexpected end of file"):
        _read_all(reader, 1)
    with ExtentReader([Source([Extent(path, 2, 10)], torch.uint8, torch.float32)], block=BLOCK) as reader:
        _read_all(reader, 1)  # uint8 elements: any offset is aligned
    with ExtentReader([Source([Extent(path, 2, 10)], torch.float32, torch.bfloat16)], block=BLOCK) as reader, \
            pytest.raises(ValueError, match="not whole"):
        _read_all(reader, 1)
    with ExtentReader([Source([Extent(path, 0, len(raw))])] * 3, depth=1, block=BLOCK) as reader:
        next(reader.chunks())  # closed with the thread blocked on a full ring: must not hang
    missing = os.path.join(os.path.dirname(path), "missing")
    with ExtentReader([Source([Extent(missing, 0, 1)])]) as reader, pytest.raises(FileNotFoundError):
        _read_all(reader, 1)
