"""What distinguishes Qwen3-MoE configs from dense Qwen3: the expert block.

* ``num_experts`` (saved by transformers 5 as ``num_local_experts``), ``num_experts_per_tok`` (top-k),
  ``moe_intermediate_size`` (one expert's hidden size; ``intermediate_size`` is the dense MLPs').
* ``norm_topk_prob``: renormalise the top-k routing weights (megatron ``moe_router_pre_softmax=False``).
* Which layers are sparse: layer ``i`` has experts unless ``i in mlp_only_layers``, and only when
  ``(i + 1) % decoder_sparse_step == 0`` (HF's rule, reproduced as megatron's per-layer
  ``moe_layer_freq`` pattern).
* No shared experts and no router bias exist in Qwen3-MoE; configs that carry them belong to other
  families and are refused rather than dropped.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megacov.models._checks import no_linear_bias, no_sliding_window
from megacov.models.arch import MoeArch
from megacov.models.family import UnsupportedModelError

ARCHITECTURES = ("Qwen3MoeForCausalLM",)
MODEL_TYPES = ("qwen3_moe",)
QKV_BIAS = False
QK_NORM = True


def check(hf: Mapping[str, Any]) -> None:
    no_sliding_window(hf)
    no_linear_bias(hf, "attention_bias")
    for key in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
        if hf.get(key):
            raise UnsupportedModelError(f"{key}={hf[key]}: shared experts are not part of Qwen3-MoE")


def _int(hf: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        if hf.get(key) is not None:
            return int(hf[key])
    raise UnsupportedModelError(f"config.json has no '{keys[0]}'")


def moe_arch(hf: Mapping[str, Any]) -> MoeArch:
    experts = _int(hf, "num_experts", "num_local_experts")
    top_k = _int(hf, "num_experts_per_tok")
    layers = _int(hf, "num_hidden_layers")
    if not 1 <= top_k <= experts:
        raise UnsupportedModelError(f"num_experts_per_tok={top_k} must be between 1 and num_experts={experts}")
    step = int(hf.get("decoder_sparse_step") or 1)
    dense = {int(i) for i in (hf.get("mlp_only_layers") or [])}
    bad = sorted(i for i in dense if not 0 <= i < layers)
    if bad:
        raise UnsupportedModelError(f"mlp_only_layers={sorted(dense)} names layers outside 0..{layers - 1}")
    pattern = tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))
    return MoeArch(num_experts=experts, top_k=top_k, ffn_hidden_size=_int(hf, "moe_intermediate_size"),
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)), layers=pattern)
