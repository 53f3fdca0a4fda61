"""What the weight sync needs to know about, and do to, the model inside a vLLM engine worker.

:func:`engine_fusion_map` names the tensors the engine expects and the groups it fuses, including a
MoE layer's experts (:func:`expert_hf_names`). :func:`reprocess_cpu_moe_on_reload` makes vLLM's
layer-wise reload re-run the CPU MoE experts' weight pre-packing, for the reason below.

vLLM's CPU MoE experts (``CPUUnquantizedExperts`` and its x86/Arm/Power variants in
``vllm/model_executor/layers/fused_moe/experts/cpu_moe.py``) do not compute on the checkpoint layout
of ``w13_weight`` / ``w2_weight``: their ``process_weights_after_loading`` zero-pads the intermediate
dimension to the kernel's alignment and pre-packs both tensors into the grouped-GEMM layout
(``cpu_prepack_moe_weight``: same shape, different element order).

On a weight update, the layer-wise reload (``vllm.model_executor.model_loader.reload``) puts the
layer back in checkpoint format, loads the new raw tensors and runs the layer's quant method
``process_weights_after_loading``. For unquantized MoE that is
``UnquantizedFusedMoEMethod._setup_kernel``, which on an update (its ``moe_kernel`` already built)
copies the weights in place and *skips* the experts' own ``process_weights_after_loading``, the only
place the CPU experts pre-pack. The raw, unpacked tensors are then copied into the kernel's storage:
the shapes agree, so nothing fails, but every routed expert computes on scrambled weights and the
engine's log-probs drift far from the trainer's.

:func:`reprocess_cpu_moe_on_reload` wraps, per MoE layer whose experts are CPU experts, the quant
method's ``process_weights_after_loading`` so that on an update it also runs the experts' own
processing (vLLM's pad + pre-pack) before the reload copies the result into the kernel's storage.
GPU experts are left alone: their layout conversion already runs on every update.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

_MARK = "_megacov_reprocesses_experts"


def _cpu_experts(method: Any) -> Any | None:
    """The CPU experts object behind an unquantized MoE quant method, or None."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # a vLLM build without the CPU MoE path
        return None
    kernel = getattr(method, "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    return experts if isinstance(experts, CPUUnquantizedExperts) else None


def reprocess_cpu_moe_on_reload(model: torch.nn.Module) -> int:
    """Wrap every CPU-experts MoE layer of ``model`` (idempotent); returns how many layers are wrapped."""
    wrapped = 0
    for layer in model.modules():
        method = getattr(layer, "quant_method", None)
        if method is None or _cpu_experts(method) is None:
            continue
        wrapped += 1
        if getattr(method, _MARK, False):
            continue
        original = method.process_weights_after_loading

        @functools.wraps(original)
        def process(target: torch.nn.Module, _method: Any = method, _original: Any = original) -> None:
            updating = getattr(_method, "moe_kernel", None) is not None
            _original(target)
            experts = _cpu_experts(_method)
            if updating and experts is not None:
                experts.process_weights_after_loading(target)

        method.process_weights_after_loading = process
        setattr(method, _MARK, True)
    return wrapped


def expert_hf_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Engine MoE parameter -> the HF tensor names its weight loader fills, from vLLM's own mapping.

    A vLLM ``RoutedExperts`` layer (``…mlp.experts.routed_experts``) holds every expert of a layer in
    two parameters, ``w13_weight`` (gate and up) and ``w2_weight`` (down); its ``get_expert_mapping()``
    lists ``(param, checkpoint name, expert, shard)`` for every expert, with checkpoint names relative
    to the layer's ``layer_name`` (``model.layers.0.mlp.experts``). Those are the names a sync sends.
    """
    out: dict[str, list[str]] = {}
    for prefix, module in model.named_modules():
        mapping = getattr(module, "get_expert_mapping", None)
        layer_name = getattr(module, "layer_name", None)
        if not callable(mapping) or not isinstance(layer_name, str):
            continue
        base = layer_name.rpartition("experts")[0]  # "model.layers.0.mlp."
        for param_prefix, weight_name, _expert, _shard in mapping():
            pname = f"{prefix}.{param_prefix.removeprefix('experts.')}weight"
            hf_name = f"{base}{weight_name}weight"
            names = out.setdefault(pname, [])
            if hf_name not in names:  # redundant (EPLB) experts repeat a logical expert's name
                names.append(hf_name)
    return out


def engine_fusion_map(model: torch.nn.Module) -> Any:
    """The engine's :class:`~megacov.rollout.buckets.FusionMap`: fused modules and MoE expert groups."""
    from megacov.rollout.buckets import FusionMap

    names = [n for n, _ in model.named_parameters()]
    return FusionMap.from_engine_params(names, getattr(model, "packed_modules_mapping", None),
                                        expanded=expert_hf_names(model))
