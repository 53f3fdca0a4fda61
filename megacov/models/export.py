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
* Mixture-of-experts layers: with expert parallelism the experts of a layer live on the ``ep`` ranks
  of ``layout.ep_group``; every rank of that group takes part (one ``gather`` per local expert
  tensor) and EP rank 0 yields the whole layer's experts after the router: every expert's
  ``gate_proj``/``up_proj`` in expert order (vLLM's fused ``w13`` group, complete), then every
  ``down_proj`` (``w2``); :func:`hf_weight_groups` names these groups. Ranks with EP rank > 0 yield
  nothing. A layer whose experts do not all arrive raises :class:`MappingError` naming the layer
  and the missing experts, so a partial sync can never reach an engine. Memory: one layer's experts.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from megacov.models import mapping
from megacov.models.loader import ModelInfo, global_name, unwrap
from megacov.models.mapping import EXPERT, MappingError


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


def _gather_ep(tensor: torch.Tensor, layout: Any) -> list[torch.Tensor] | None:
    """Every EP rank's copy of one local expert tensor, in EP-rank order, on EP rank 0 (else ``None``)."""
    if getattr(layout, "ep", 1) == 1:
        return [tensor]
    import torch.distributed as dist

    local = tensor.contiguous()
    root = dist.get_global_rank(layout.ep_group, 0)
    parts = [torch.empty_like(local) for _ in range(layout.ep)] if layout.ep_rank == 0 else None
    dist.gather(local, parts, dst=root, group=layout.ep_group)
    return parts


class _ExpertLayer:
    """The expert tensors of one MoE layer, collected until the layer is complete."""

    def __init__(self, layer: int, info: ModelInfo) -> None:
        self.layer, self.info = layer, info
        self.items: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}

    def add(self, expert: int, rule_index: int, pairs: list[tuple[str, torch.Tensor]]) -> None:
        self.items[(expert, rule_index)] = [(n, t.clone()) for n, t in pairs]

    def flush(self, expert_rules: int) -> Iterator[tuple[str, torch.Tensor]]:
        experts = self.info.arch.moe.num_experts
        missing = sorted({e for e in range(experts) for r in range(expert_rules) if (e, r) not in self.items})
        if missing:
            raise MappingError(f"layer {self.layer}: experts {missing} are missing from the export "
                               f"({experts} expected); the weights would be incomplete")
        for key in sorted(self.items, key=lambda k: (k[1], k[0])):  # all fc1 (w13), then all fc2 (w2)
            yield from self.items[key]
        self.items.clear()


def _expert_rule_index(rules: tuple, rule: mapping.Rule) -> int:
    return [r for r in rules if EXPERT in r.mcore].index(rule)


def iter_hf_weights(model_chunk: Any, layout: Any, info: ModelInfo) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for the layers this PP stage owns (see the module docstring)."""
    model = unwrap(model_chunk)
    rules, dims = info.layer_rules, info.dims
    ep_leader = getattr(layout, "ep_rank", 0) == 0
    yields = ep_leader and layout.tp_rank == 0  # the only rank that assembles (and checks) expert layers
    n_local, expert_rules = info.num_local_experts, sum(1 for r in rules if EXPERT in r.mcore)
    pending: _ExpertLayer | None = None
    with torch.no_grad():
        for name, param in model.named_parameters():
            gname = global_name(name, info.layer_offset, info.expert_offset)
            if gname == "output_layer.weight" and dims.tie_word_embeddings:
                continue  # the tied head is a copy of the first stage's embedding
            res = mapping.resolve(gname, rules, dims)
            if EXPERT not in res.rule.mcore:
                if pending is not None:
                    yield from pending.flush(expert_rules)
                    pending = None
                if not ep_leader:
                    continue  # the EP leader of this TP group yields the non-expert tensors
                full = _gather_tp(param.detach(), res.rule.kind, layout)
                if full is None:
                    continue
                yield from mapping.mcore_to_hf(gname, full, rules, dims)
                del full
                continue
            if yields and (pending is None or pending.layer != res.layer):
                if pending is not None:
                    yield from pending.flush(expert_rules)
                pending = _ExpertLayer(res.layer, info)
            _, local_expert = mapping.split_expert(name.split(".", 3)[-1])
            parts = _gather_ep(param.detach(), layout)
            if parts is None:
                continue
            for ep_rank, part in enumerate(parts):
                full = _gather_tp(part, res.rule.kind, layout)
                if full is None or pending is None:
                    continue
                expert = ep_rank * n_local + local_expert
                ename = global_name(name, info.layer_offset, expert - local_expert)
                pending.add(expert, _expert_rule_index(rules, res.rule),
                            mapping.mcore_to_hf(ename, full, rules, dims))
        if pending is not None:
            yield from pending.flush(expert_rules)


def hf_weight_groups(info: ModelInfo) -> dict[str, list[str]]:
    """The HF tensors of this stage by the group an inference engine fuses them into, in export order.

    One group per megatron parameter (q/k/v, gate/up, a norm ...), except that a MoE layer's experts
    form two groups, ``<layer>.mlp.experts.w13`` (every expert's gate and up) and ``…w2`` (every
    down), as vLLM stores them. A sync is complete when every name of every group arrived.
    """
    arch, rules = info.arch, info.layer_rules
    experts = arch.moe.num_experts if arch.moe else 0
    groups: dict[str, list[str]] = {}
    if info.layer_offset == 0:
        groups["model.embed_tokens"] = ["model.embed_tokens.weight"]
    for i in range(info.layer_offset, info.layer_offset + info.num_local_layers):
        moe_layer = arch.moe is not None and arch.moe.is_moe(i)
        for suffix, rule, hf_names, _ in mapping.expand_layer_rules(rules, moe_layer, experts):
            names = [mapping.HF_LAYER_PREFIX.format(i=i) + h for h in hf_names]
            if EXPERT in rule.mcore:
                key = f"model.layers.{i}.mlp.experts." + ("w13" if rule.kind == "fc1" else "w2")
            else:
                key = f"model.layers.{i}.{suffix.rsplit('.', 1)[0]}"
            groups.setdefault(key, []).extend(names)
    if info.layer_offset + info.num_local_layers == arch.num_layers:
        groups["model.norm"] = ["model.norm.weight"]
        if not arch.tie_word_embeddings:
            groups["lm_head"] = ["lm_head.weight"]
    return groups
