"""Router metrics and router-loss settings of mixture-of-experts models.

* :func:`router_overrides` -- the ``TransformerConfig`` arguments for megatron's router losses from
  ``model.moe_aux_loss_coeff`` / ``model.moe_z_loss_coeff`` (nothing for dense models).
* :class:`RouterLoad` -- per-layer expert load of the tokens the model routed since the last
  :meth:`RouterLoad.collect`: tokens per expert (max and mean), the max/mean imbalance, and the
  router aux/z-loss values megatron recorded per layer. Tokens are counted from the router's own
  ``routing_map`` through forward hooks, so nothing in megatron is changed. No token is ever
  dropped (megacov sets no capacity factor, as in HF and vLLM), so there is no dropped-token count.
"""
from __future__ import annotations

from typing import Any

import torch


def router_overrides(model_cfg: Any, model_path: str) -> dict[str, Any]:
    """``moe_aux_loss_coeff`` / ``moe_z_loss_coeff`` for a MoE model at ``model_path`` (HF or mcore)."""
    from megacov.models.loader import resolve_source

    if resolve_source(model_path, vocab_divisible_by=model_cfg.vocab_divisible_by).arch.moe is None:
        return {}
    aux, z = float(model_cfg.moe_aux_loss_coeff), float(model_cfg.moe_z_loss_coeff)
    return {"moe_aux_loss_coeff": aux, "moe_z_loss_coeff": z if z > 0 else None,
            "moe_router_load_balancing_type": "aux_loss" if aux > 0 else "none"}


def _routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    from megatron.core.transformer.moe.router import TopKRouter

    out = []
    for layer in getattr(getattr(model, "decoder", None), "layers", []):
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if isinstance(router, TopKRouter):
            out.append((int(layer.layer_number) - 1, router))
    return out


class RouterLoad:
    """Counts the tokens each expert of each MoE layer of ``model`` receives (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.moe_layers = torch.zeros(num_layers, dtype=torch.float64)
        self._handles = []
        for index, router in _routers(model):
            self.moe_layers[index] = 1
            self._handles.append(router.register_forward_hook(self._hook(index)))

    def _hook(self, index: int) -> Any:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            routing_map = output[1]
            self.counts[index] += routing_map.detach().reshape(-1, self.num_experts).sum(0).to("cpu", torch.float64)

        return hook

    def reset(self) -> None:
        """Forget the tokens counted so far (e.g. those of forward-only log-prob passes)."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        self.counts.zero_()
        clear_aux_losses_tracker()

    def collect(self, layout: Any) -> dict[str, float]:
        """Metrics since the last call, identical on every rank (collective over the whole world).

        TP ranks route the same tokens, so the world sum is divided by TP; each pipeline stage
        contributes its own layers; DP (and EP) ranks route different tokens and add up.
        """
        import torch.distributed as dist

        packed = torch.cat([self.counts.flatten(), self.moe_layers, self._losses(layout)])
        if dist.is_initialized():
            packed = packed.to(layout.device)
            dist.all_reduce(packed)
            packed = packed.cpu()
        n = self.num_layers * self.num_experts
        counts = packed[:n].view(self.num_layers, self.num_experts) / max(1, layout.tp)
        layers = packed[n:n + self.num_layers] > 0
        losses = packed[n + self.num_layers:].view(2, self.num_layers)
        self.counts.zero_()
        out: dict[str, float] = {}
        for i in torch.nonzero(layers).flatten().tolist():
            mean = float(counts[i].mean())
            out[f"moe/tokens_per_expert_max/layer_{i}"] = float(counts[i].max())
            out[f"moe/tokens_per_expert_mean/layer_{i}"] = mean
            out[f"moe/load_imbalance/layer_{i}"] = float(counts[i].max()) / mean if mean > 0 else 0.0
            for j, name in enumerate(("aux_loss", "z_loss")):
                if losses[j, i] != 0:
                    out[f"moe/{name}/layer_{i}"] = float(losses[j, i])
        return out

    def _losses(self, layout: Any) -> torch.Tensor:
        """megatron's per-layer aux/z-loss records (summed over the calls since the last clear),
        this rank's share of the world sum; then the tracker is cleared."""
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
        )

        out = torch.zeros(2, self.num_layers, dtype=torch.float64)
        tracker = get_moe_layer_wise_logging_tracker()
        for j, name in enumerate(("load_balancing_loss", "z_loss")):
            values = tracker.get(name, {}).get("values")
            if values is not None:
                # recorded identically on the TP ranks of a stage and per DP rank: mean over TP x DP
                out[j, :values.numel()] = values.detach().to("cpu", torch.float64) / max(1, layout.tp * layout.dp)
        clear_aux_losses_tracker()
        return out.flatten()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
