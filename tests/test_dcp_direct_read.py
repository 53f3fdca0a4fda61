"""Direct reads of DCP records into destination slices equal DCP's own torch.load path bit for bit."""
from __future__ import annotations

import warnings

import pytest
import torch

from megacov.models import dcp_slices


@pytest.fixture(scope="module", params=[True, False], ids=["crc", "no-crc"])
def ckpt(tmp_path_factory, request) -> tuple[str, dict]:
    """Records written with and without zip CRCs (megatron's writer leaves them out)."""
    import torch.utils.serialization.config as serialization_config
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    g = torch.Generator().manual_seed(0)
    state = {
        "stacked.bf16": torch.randn(4, 6, 10, generator=g).to(torch.bfloat16),
        "plain.fp32": torch.randn(7, 5, generator=g),
        "vector.fp16": torch.randn(9, generator=g).half(),
        # a transposed view: its record's storage is not in row-major order of the tensor
        "strided.fp32": torch.randn(5, 8, generator=g).t(),
        "empty.fp32": torch.empty(0, 3),
    }
    path = str(tmp_path_factory.mktemp("dcp"))
    old, serialization_config.save.compute_crc32 = serialization_config.save.compute_crc32, request.param
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        dcp_save(state, storage_writer=FileSystemWriter(path), no_dist=True)
    serialization_config.save.compute_crc32 = old
    return path, state


BOXES = [
    ("stacked.bf16", (2, 0, 0), (1, 6, 10)),   # one layer of a stack: contiguous, read directly
    ("stacked.bf16", (0, 0, 0), (4, 6, 10)),   # whole
    ("stacked.bf16", (1, 2, 0), (2, 3, 10)),   # not one byte range: DCP's reader
    ("plain.fp32", (0, 0), (7, 5)),
    ("plain.fp32", (3, 1), (2, 4)),
    ("vector.fp16", (4,), (5,)),
    ("strided.fp32", (0, 0), (8, 5)),
    ("empty.fp32", (0, 0), (0, 3)),
]


@pytest.mark.parametrize("key,offsets,shape", BOXES)
def test_direct_read_equals_dcp_reader_bit_for_bit(ckpt, key, offsets, shape) -> None:
    path, state = ckpt
    dtype = state[key].dtype
    direct = dcp_slices.load_slices(path, {key: (offsets, shape, dtype)})[key]
    reference = dcp_slices.load_slices(path, {key: (offsets, shape, dtype)}, direct=False)[key]
    expected = state[key]
    for dim, (o, n) in enumerate(zip(offsets, shape)):
        expected = expected.narrow(dim, o, n)
    assert direct.dtype == dtype and direct.shape == torch.Size(shape)
    assert torch.equal(direct.view(-1).view(torch.uint8) if direct.numel() else direct,
                       reference.view(-1).view(torch.uint8) if reference.numel() else reference)
    assert torch.equal(direct, expected)


def test_contiguous_items_bypass_torch_load_and_others_fall_back(ckpt, monkeypatch) -> None:
    path, state = ckpt
    reads: list[int] = []
    real = dcp_slices._pread_full
    monkeypatch.setattr(dcp_slices, "_pread_full", lambda fd, view, at: (reads.append(len(view)), real(fd, view, at)))
    loaded = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (loaded.append(k.get("map_location")), real_load(*a, **k))[1])
    requests = {"stacked.bf16": ((2, 0, 0), (1, 6, 10), torch.bfloat16), "plain.fp32": ((0, 0), (7, 5), torch.float32),
                "strided.fp32": ((0, 0), (8, 5), torch.float32)}
    out = dcp_slices.load_slices(path, requests)
    assert reads == [6 * 10 * 2, 7 * 5 * 4]  # the strided record is not one byte range
    assert loaded.count("cpu") == 1 and loaded.count("meta") == 3  # data loaded only for the fallback
    assert torch.equal(out["stacked.bf16"], state["stacked.bf16"][2:3])
    assert torch.equal(out["strided.fp32"], state["strided.fp32"])


def test_unexpected_records_fall_back(ckpt, monkeypatch) -> None:
    path, state = ckpt
    monkeypatch.setattr(dcp_slices, "_record_layout", lambda *a: None)
    out = dcp_slices.load_slices(path, {"plain.fp32": ((0, 0), (7, 5), torch.float32)})
    assert torch.equal(out["plain.fp32"], state["plain.fp32"])


def test_record_layout_rejects_a_non_zip_record(tmp_path) -> None:
    import os

    f = tmp_path / "x"
    f.write_bytes(b"not a zip record" * 10)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert dcp_slices._record_layout(fd, 0, 160) is None
    finally:
        os.close(fd)
