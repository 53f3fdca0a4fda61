"""Trainer-side producers of HF-named weights, as vLLM ``WeightSource`` objects.

:class:`MegatronSource` streams one pipeline stage of a Megatron model chunk in HF names
(:func:`megacov.models.iter_hf_weights`: TP shards gathered inside the TP group, q/k/v and gate/up
split back out). Iterating is collective over the stage's TP group, so every TP rank of an
exporting replica iterates in lockstep; only TP rank 0 receives tensors. Ranks of other DP
replicas hold copies of the same weights and iterate nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

Named = tuple[str, torch.Tensor]


class MegatronSource(WeightSource):
    """One pipeline stage of ``model_chunk`` in HF names (DP replica 0 only)."""

    def __init__(self, model_chunk: Any, layout: Any, info: Any) -> None:
        self.chunk, self.layout, self.info = model_chunk, layout, info
        self._meta: list[ParamMeta] | None = None

    @property
    def exporting(self) -> bool:
        """DP replica 0 exports; with expert parallelism, its experts are spread over the first ``ep``
        DP ranks (one EP group), which all iterate so that EP rank 0 can gather every expert."""
        return self.layout.dp_rank < getattr(self.layout, "ep", 1)

    def __iter__(self) -> Iterator[Named]:
        from megacov.models import iter_hf_weights

        if not self.exporting:
            return iter(())
        return iter_hf_weights(self.chunk, self.layout, self.info)

    def metadata(self) -> list[ParamMeta]:
        """Learned from one export pass (collective, like iteration) and cached: shapes do not change."""
        if self._meta is None:
            self._meta = [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self]
        return self._meta

    def held_names(self) -> Collection[str] | None:
        return [m.name for m in self.metadata()]


class CallableSource(WeightSource):
    """A source over ``fn()`` returning a fresh ``(name, tensor)`` iterator (tests, tools)."""

    def __init__(self, fn: Callable[[], Iterator[Named]]) -> None:
        self.fn = fn

    def __iter__(self) -> Iterator[Named]:
        return iter(self.fn())

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self]
