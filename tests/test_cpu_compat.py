"""The megatron-core CPU layer is active only inside its scope and restores everything on exit."""
from __future__ import annotations

import pytest
import torch

from megacov.parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is a no-op with CUDA")


def test_layer_redirects_inside_and_restores_outside():
    from megatron.core.tensor_parallel import random as mrandom

    originals = (torch.cuda.current_device, mrandom.CudaRNGStatesTracker.fork, mrandom._set_cuda_rng_state)
    with cpu_compat.cpu_compat() as active:
        assert active and cpu_compat.is_enabled()
        t = torch.empty(3, device=torch.cuda.current_device())
        assert t.device.type == "cpu"
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"
        assert torch.ones(2).to("cuda:0").device.type == "cpu"
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"
        with cpu_compat.cpu_compat():  # nested use is reference-counted
            pass
        assert cpu_compat.is_enabled()
    assert not cpu_compat.is_enabled()
    assert (torch.cuda.current_device, mrandom.CudaRNGStatesTracker.fork, mrandom._set_cuda_rng_state) == originals
    assert torch.ones(2).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(2, device="cuda")


def test_rng_tracker_forks_reproducible_cpu_streams():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    with cpu_compat.cpu_compat():
        tracker = CudaRNGStatesTracker()
        tracker.add("model-parallel-rng", 1234)
        torch.manual_seed(0)
        outer_before = torch.get_rng_state()
        with tracker.fork("model-parallel-rng"):
            first = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), outer_before), "fork must not disturb the default stream"
        with tracker.fork("model-parallel-rng"):
            second = torch.rand(4)
        assert not torch.equal(first, second), "the forked stream must advance"
        replay = CudaRNGStatesTracker()
        replay.add("model-parallel-rng", 1234)
        with replay.fork("model-parallel-rng"):
            assert torch.equal(torch.rand(4), first)
