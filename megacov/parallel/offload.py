"""Colocated offload: the actor's training state leaves the GPU while the engines generate.

When vLLM shares the GPUs with the actor, the actor's parameters, gradient buffers and optimizer
states (fp32 main weights, Adam moments), and the reference model, would otherwise sit beside vLLM's
weights and KV cache for the whole rollout. :class:`TrainStateOffload` moves them to (pinned) host
memory and back, and frees the caching allocator's blocks between phases, so that each phase has the
GPU to itself (the dry run's memory plan counts on it, see :mod:`megacov.config.memory`).

How: every tensor involved is a view of some storage -- megatron DDP's contiguous param/grad
buffers, a parameter's own storage, the optimizer's main params and moments. Each distinct storage is
copied to host memory and then resized to zero bytes, which frees its device memory while every
view (``param.data``, ``param.main_grad``, the optimizer's references) stays attached to it. Reloading
resizes the storage back and copies the bytes in: the same tensors, bit for bit, with no pointer in
megatron or the optimizer to fix up. Gradient storages are not copied: the trainer zeroes gradients
before every accumulation, so they come back zero-filled (``keep_grads=True`` keeps them too).

On CPU the same code runs: host "offload" of a host tensor is a copy and a real free/realloc round
trip, so CI exercises exactly the GPU path (and tests that it is bit-identical).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch


@dataclass
class _Saved:
    storage: Any
    """The tensor storage (``torch.UntypedStorage``) whose bytes were moved."""
    nbytes: int
    host: Optional[torch.Tensor]
    """Its bytes on the host (uint8); None for gradients, which come back zero."""


def _as_bytes(storage: Any) -> torch.Tensor:
    """A uint8 tensor over all of ``storage``."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def torch_optimizers(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron optimizer (chained, mixed-precision, distributed or fp32)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        yield optimizer
        return
    for sub in getattr(optimizer, "chained_optimizers", None) or []:
        yield from torch_optimizers(sub)
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and not getattr(optimizer, "chained_optimizers", None):
        yield from torch_optimizers(inner)


def _ddp_buffers(module: torch.nn.Module) -> list[Any]:
    """megatron DDP's contiguous param/grad buffers (a list attribute that shadows Module.buffers)."""
    found = []
    for name in ("buffers", "expert_parallel_buffers"):
        value = getattr(module, name, None)
        if isinstance(value, list):
            found += value
    return found


def _grad_tensors(modules: Iterable[torch.nn.Module]) -> Iterator[torch.Tensor]:
    for module in modules:
        for buffer in _ddp_buffers(module):
            if getattr(buffer, "grad_data", None) is not None:
                yield buffer.grad_data
        for p in module.parameters():
            for g in (getattr(p, "main_grad", None), p.grad):
                if isinstance(g, torch.Tensor):
                    yield g


def _state_tensors(modules: Iterable[torch.nn.Module], optimizers: Iterable[Any]) -> Iterator[torch.Tensor]:
    for module in modules:
        for buffer in _ddp_buffers(module):
            if getattr(buffer, "param_data", None) is not None:
                yield buffer.param_data
        yield from module.parameters()
    for opt in optimizers:
        for inner in torch_optimizers(opt):
            for group in inner.param_groups:
                yield from group["params"]
            for state in inner.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class TrainStateOffload:
    """Offload/reload of ``modules`` (model chunks, DDP-wrapped or not, and the reference model) and
    ``optimizers`` (megatron or torch). Idempotent: offloading twice or reloading a resident state
    does nothing."""

    def __init__(self, modules: Iterable[Optional[torch.nn.Module]], optimizers: Iterable[Any] = (),
                 *, keep_grads: bool = False) -> None:
        self.modules = [m for m in modules if m is not None]
        self.optimizers = list(optimizers)
        self.keep_grads = keep_grads
        self._saved: list[_Saved] = []

    @property
    def offloaded(self) -> bool:
        return bool(self._saved)

    def _storages(self) -> tuple[list[Any], list[Any]]:
        """Distinct non-empty, resizable storages: (state, gradients). The optimizer's state appears
        after its first step, so this is collected at every offload."""
        seen: set[int] = set()

        def distinct(tensors: Iterable[torch.Tensor]) -> list[Any]:
            out = []
            for t in tensors:
                s = t.untyped_storage()
                if s.nbytes() == 0 or not s.resizable() or s.data_ptr() in seen:
                    continue
                seen.add(s.data_ptr())
                out.append(s)
            return out

        grads = distinct(_grad_tensors(self.modules))  # first: a grad storage is never state
        return distinct(_state_tensors(self.modules, self.optimizers)), grads

    def offload(self) -> int:
        """Move everything to host memory, free the device memory; returns the bytes freed."""
        if self.offloaded:
            return 0
        state, grads = self._storages()
        pin = torch.cuda.is_available()
        for storage in state + (grads if self.keep_grads else []):
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pin)
            host.copy_(_as_bytes(storage), non_blocking=pin)
            self._saved.append(_Saved(storage, storage.nbytes(), host))
        for storage in [] if self.keep_grads else grads:
            self._saved.append(_Saved(storage, storage.nbytes(), None))
        if pin:
            torch.cuda.synchronize()  # the copies must land before the device memory goes
        for saved in self._saved:
            saved.storage.resize_(0)
        free_cache()
        return sum(s.nbytes for s in self._saved)

    def reload(self) -> int:
        """Bring everything back (same storages, so every view is valid again); returns the bytes."""
        moved = 0
        for saved in self._saved:
            saved.storage.resize_(saved.nbytes)
            target = _as_bytes(saved.storage)
            if saved.host is None:
                target.zero_()
            else:
                target.copy_(saved.host, non_blocking=True)
            moved += saved.nbytes
        if self._saved and torch.cuda.is_available():
            torch.cuda.synchronize()
        self._saved = []
        return moved


def free_cache() -> None:
    """Return the caching allocator's free blocks to the device (a no-op on CPU), so that the next
    phase's process (vLLM waking up, or the actor) can have them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
