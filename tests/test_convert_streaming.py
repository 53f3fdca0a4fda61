"""The conversion pipeline's read-ahead: order, overlap, bounded items in flight, errors."""
from __future__ import annotations

import threading

import pytest
import torch

from megacov.models.hf_io import ReadAhead, release_storage


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


def test_release_storage_frees_bytes_held_by_other_references():
    t = torch.ones(1000)
    kept = t.detach()  # what a writer keeps until its file is closed
    release_storage(t)
    assert kept.untyped_storage().nbytes() == 0
    release_storage(torch.from_numpy(torch.ones(3).numpy()))  # not torch-owned: left alone, no error
