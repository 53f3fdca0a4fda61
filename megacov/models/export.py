"""Stream a live megatron chunk out as full HF-named tensors (checkpoint export and weight sync).

Contract of :func:`iter_hf_weights` (the weight sync into vLLM is built on it):

* Every TP rank of a stage must iterate the generator to the end in lockstep: each megatron
  parameter that is split across TP ranks is gathered with one ``gather`` collective inside
  ``layout.tp_group``. Only TP rank 0 yields; the others yield nothing but take part.
* A stage yields the tensors of the layers it owns, named with *global* layer indices, in order:
  embedding (first stage), then layer by layer, then final norm and LM head (last stage; the head is
  skipped when embeddings are tied, since HF has no separate tensor for it).
* Tensors are full (TP-gathered) and unpadded; the HF tensors made from one megatron tensor (q/k/v,
  gate/up) come out consecutively. At most one gathered megatron tensor is alive at a time.
* Yielded tensors may alias the model's parameters (TP=1) or a transient gather buffer: copy them
  if they must outlive the next optimizer step or the next item.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from megacov.models import mapping
from megacov.models.loader import ModelInfo, global_name, unwrap


def _gather_tp(tensor: torch.Tensor, kind: str, layout: Any) -> torch.Tensor | None:
    """The full megatron tensor on TP rank 0 (``None`` on the other ranks)."""
    if layout.tp == 1 or kind == "replicated":
        return tensor if layout.tp_rank == 0 else None
    import torch.distributed as dist

    local = tensor.contiguous()
    root = dist.get_global_rank(layout.tp_group, 0)
    shards = [torch.empty_like(local) for _ in range(layout.tp)] if layout.tp_rank == 0 else None
    dist.gather(local, shards, dst=root, group=layout.tp_group)
    if shards is None:
        return None
    return mapping.merge_tp_shards(kind, shards)


def iter_hf_weights(model_chunk: Any, layout: Any, info: ModelInfo) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for the layers this PP stage owns (see the module docstring)."""
    model = unwrap(model_chunk)
    rules, dims = info.layer_rules, info.dims
    with torch.no_grad():
        for name, param in model.named_parameters():
            gname = global_name(name, info.layer_offset)
            if gname == "output_layer.weight" and dims.tie_word_embeddings:
                continue  # the tied head is a copy of the first stage's embedding
            res = mapping.resolve(gname, rules, dims)
            full = _gather_tp(param.detach(), res.rule.kind, layout)
            if full is None:
                continue
            yield from mapping.mcore_to_hf(gname, full, rules, dims)
            del full

