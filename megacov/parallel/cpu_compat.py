"""Let the real megatron-core run on CPU processes over ``gloo``.

megatron-core assumes CUDA in a handful of places. Rather than fork it, or replace it with a
stand-in, this layer bends exactly those places while it is active, and only when CUDA is absent:

1. **Device redirection.** A ``TorchFunctionMode`` rewrites ``device="cuda"`` / integer device
   arguments of tensor factories and ``.to()`` calls to ``cpu``, and makes ``Tensor.cuda()`` a no-op.
   ``Tensor.type()`` (no arguments) answers with the CUDA type name, because megatron's optimizers
   dispatch on strings such as ``'torch.cuda.FloatTensor'``.
   This covers megatron's ``torch.empty(..., device=torch.cuda.current_device())`` idiom (RoPE,
   buffers, pipeline send/recv tensors) without touching its source.
2. **torch.cuda stubs.** ``current_device`` (returns 0, which the mode maps to CPU),
   ``synchronize``, ``empty_cache`` and ``device_count`` (reports 0 real devices is kept, but the calls
   that must not raise do not).
3. **RNG tracker.** ``CudaRNGStatesTracker`` saves and restores CUDA RNG states around dropout in TP
   regions; on CPU there is no CUDA generator, so ``add``/``fork`` keep the CPU generator's state per
   name, which keeps dropout reproducible per TP region exactly like the CUDA path.
4. **GlobalMemoryBuffer** allocates its scratch tensors on CPU.
5. **MoE without TransformerEngine.** ``moe_utils`` imports ``te_general_gemm`` only when TE is
   installed but the router tests ``te_general_gemm is not None`` unconditionally; the name is
   defined as ``None`` (megatron's own "no TE" value) so the router takes its torch path.
6. **Tensor collectives on gloo.** megatron's sequence/expert-parallel mappings call
   ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` (the all-gather MoE token dispatcher uses
   them whenever TP x EP > 1), which gloo does not implement; they are expressed with ``all_reduce``
   and ``all_gather``, which give the same values (the reduction is the same sum).

Everything is undone on exit (:func:`cpu_compat` is a context manager; :func:`enable` /
:func:`disable` are the explicit pair used by long-lived worker processes). With CUDA present the
layer does nothing, so GPU runs execute megatron-core untouched.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # megatron passes torch.cuda.current_device() (an int) as a device
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CpuDeviceMode(TorchFunctionMode):
    """Map CUDA device requests to CPU for every torch call made while the mode is active."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers dispatch on type strings ('torch.cuda.FloatTensor'); CPU tensors
            # answer with the CUDA name of their dtype so that dispatch takes the same branch.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func in (torch.Tensor.to,) and args:
            args = tuple(_CPU if (i > 0 and _is_cuda_device(a)) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


class _State:
    active = 0
    mode: Optional[_CpuDeviceMode] = None
    saved: list[tuple[Any, str, Any]] = []


def _patch(obj: Any, name: str, value: Any) -> None:
    _State.saved.append((obj, name, getattr(obj, name)))
    setattr(obj, name, value)


def _rng_tracker_patches() -> None:
    """Make megatron's CUDA RNG tracker keep CPU generator states instead of CUDA ones."""
    from megatron.core.tensor_parallel import random as mrandom

    def add(self, name: str, seed: int) -> None:
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

    tracker = mrandom.CudaRNGStatesTracker
    _patch(tracker, "add", add)
    _patch(tracker, "fork", fork)
    # model_parallel_cuda_manual_seed also seeds the (absent) CUDA default generator.
    _patch(mrandom, "_set_cuda_rng_state", lambda *a, **k: None)


def _memory_buffer_patch() -> None:
    from megatron.core import utils as mutils

    original = mutils.GlobalMemoryBuffer.get_tensor

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        mode = _CpuDeviceMode()
        with mode:
            return original(self, tensor_shape, dtype, name, mem_alloc_context)

    _patch(mutils.GlobalMemoryBuffer, "get_tensor", get_tensor)


_MISSING = object()


def _moe_patches() -> None:
    """Define the TE-only names megatron's MoE router reads when TE is absent (see the docstring)."""
    from megatron.core.transformer.moe import moe_utils

    if getattr(moe_utils, "te_general_gemm", _MISSING) is _MISSING:
        _State.saved.append((moe_utils, "te_general_gemm", _MISSING))
        moe_utils.te_general_gemm = None


def _reduce_scatter(output: torch.Tensor, input_: torch.Tensor, group: Any = None, async_op: bool = False) -> None:
    import torch.distributed as dist

    full = input_.clone()
    dist.all_reduce(full, group=group)
    rank = dist.get_rank(group)
    output.copy_(full.narrow(0, rank * output.shape[0], output.shape[0]))


def _all_gather(output: torch.Tensor, input_: torch.Tensor, group: Any = None, async_op: bool = False) -> None:
    import torch.distributed as dist

    parts = list(output.chunk(dist.get_world_size(group), dim=0))
    gathered = [torch.empty_like(input_) for _ in parts]
    dist.all_gather(gathered, input_.contiguous(), group=group)
    for dst, src in zip(parts, gathered):
        dst.copy_(src)


def _collective_patches() -> None:
    """gloo stand-ins for the tensor collectives megatron's mappings use (see the docstring)."""
    from megatron.core.tensor_parallel import mappings

    _patch(mappings, "dist_reduce_scatter_func", _reduce_scatter)
    _patch(mappings, "dist_all_gather_func", _all_gather)
    # These allocate with device=torch.cuda.current_device() and also run inside autograd's backward
    # thread, where the (thread-local) device mode is not active: enter it around them.
    for name in ("_gather_along_first_dim", "_reduce_scatter_along_first_dim"):
        _patch(mappings, name, _in_cpu_mode(getattr(mappings, name)))


def _in_cpu_mode(fn: Callable) -> Callable:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _CpuDeviceMode():
            return fn(*args, **kwargs)

    return wrapped


def cuda_available() -> bool:
    return torch.cuda.is_available()


def enable() -> bool:
    """Activate the layer (idempotent, reference-counted). Returns False when CUDA is present."""
    if cuda_available():
        return False
    _State.active += 1
    if _State.active > 1:
        return True
    _patch(torch.cuda, "current_device", lambda: 0)
    _patch(torch.cuda, "synchronize", lambda *a, **k: None)
    _patch(torch.cuda, "empty_cache", lambda *a, **k: None)
    _patch(torch.cuda, "set_device", lambda *a, **k: None)
    _rng_tracker_patches()
    _memory_buffer_patch()
    _moe_patches()
    _collective_patches()
    _State.mode = _CpuDeviceMode()
    _State.mode.__enter__()
    return True


def disable() -> None:
    """Undo :func:`enable` once; the last call restores every patched attribute."""
    if _State.active == 0:
        return
    _State.active -= 1
    if _State.active > 0:
        return
    if _State.mode is not None:
        _State.mode.__exit__(None, None, None)
        _State.mode = None
    while _State.saved:
        obj, name, value = _State.saved.pop()
        if value is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, value)


def is_enabled() -> bool:
    return _State.active > 0


@contextlib.contextmanager
def cpu_compat() -> Iterator[bool]:
    """``with cpu_compat(): ...`` runs megatron-core on CPU inside the block; a no-op with CUDA."""
    enabled = enable()
    try:
        yield enabled
    finally:
        if enabled:
            disable()
