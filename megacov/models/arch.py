"""HF ``config.json`` -> :class:`Arch` (normalised facts) -> megatron ``TransformerConfig``.

:class:`Arch` is the single place where the quirks of HF configs are absorbed (transformers 5 keeps
``rope_theta`` under ``rope_parameters``, transformers 4 at top level with ``rope_scaling``;
``head_dim`` is optional; dtype is ``torch_dtype`` or ``dtype``), so the weight mapping and the
model builder never read the raw dict. Features that megatron-core would silently compute
differently (sliding-window attention, unusual RoPE variants, non-SiLU activations) are refused
with a message naming the key, never approximated.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megacov.models.family import Family, UnsupportedModelError, detect_family
from megacov.models.mapping import Dims

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# megatron-core's llama3 RoPE scaling hard-codes these; other values would silently differ from HF.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class MoeArch:
    """The mixture-of-experts facts of a model (``None`` on :class:`Arch` for dense models)."""

    num_experts: int
    top_k: int
    ffn_hidden_size: int
    """Hidden size of one expert MLP (HF ``moe_intermediate_size``)."""
    norm_topk_prob: bool
    """Renormalise the top-k routing weights to sum to 1 (megatron: softmax over the top-k logits)."""
    layers: tuple[bool, ...]
    """Per decoder layer: True where the MLP is the expert block, False for a dense MLP."""

    def is_moe(self, layer: int) -> bool:
        return self.layers[layer]


@dataclass(frozen=True)
class Arch:
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    rope_type: str
    rope_factor: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    hf_dtype: str
    """dtype recorded in the HF config (``float32``, ``bfloat16`` ...)."""
    moe: MoeArch | None = None
    """Expert layout of a mixture-of-experts family (from the family's ``moe`` reader)."""

    @property
    def dims(self) -> Dims:
        return Dims(self.num_heads, self.num_kv_heads, self.head_dim, self.vocab_size,
                    self.padded_vocab_size, self.tie_word_embeddings)


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round up to a multiple of lcm(divisible_by, tp): the same padding at every power-of-two TP."""
    multiple = math.lcm(divisible_by, tp)
    return -(-vocab_size // multiple) * multiple


def _rope(hf: Mapping[str, Any]) -> tuple[float, str, float]:
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope type '{rope_type}' is not supported "
                                    f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    factor = float(params.get("factor", 1.0))
    if rope_type == "llama3":
        for key, value in _LLAMA3_FIXED.items():
            if float(params.get(key, value)) != value:
                raise UnsupportedModelError(f"llama3 rope scaling with {key}={params[key]} is not supported "
                                            f"(megatron-core fixes it to {value})")
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported")
    return theta, rope_type, factor


def _require(hf: Mapping[str, Any], key: str) -> Any:
    if key not in hf:
        raise UnsupportedModelError(f"config.json has no '{key}'")
    return hf[key]


def arch_from_hf(hf: Mapping[str, Any], *, vocab_divisible_by: int, tp: int = 1,
                 padded_vocab_size: int | None = None, family: Family | None = None) -> Arch:
    """Normalise an HF config dict. ``padded_vocab_size`` overrides the padding (a checkpoint keeps
    the padding it was saved with)."""
    fam = family or detect_family(hf)
    fam.check(hf)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act '{act}' is not supported (only silu)")
    hidden, heads = int(_require(hf, "hidden_size")), int(_require(hf, "num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise UnsupportedModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    vocab = int(_require(hf, "vocab_size"))
    theta, rope_type, factor = _rope(hf)
    padded = padded_vocab_size if padded_vocab_size is not None else padded_vocab(vocab, vocab_divisible_by, tp)
    if padded < vocab:
        raise UnsupportedModelError(f"padded vocabulary {padded} is smaller than vocab_size {vocab}")
    return Arch(
        family=fam.name, num_layers=int(_require(hf, "num_hidden_layers")), hidden_size=hidden,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=int(hf.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(_require(hf, "intermediate_size")), vocab_size=vocab, padded_vocab_size=padded,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_type=rope_type, rope_factor=factor,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=fam.qkv_bias,
        qk_norm=fam.qk_norm, hf_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        moe=fam.moe(hf) if fam.moe is not None else None,
    )


def check_layout(arch: Arch, tp: int, pp: int, ep: int = 1) -> None:
    """Refuse layouts megatron cannot build for this model, with the reason."""
    if ep > 1 and arch.moe is None:
        raise UnsupportedModelError(f"expert-parallel size {ep} needs a mixture-of-experts model "
                                    f"({arch.family} is dense); use ep=1")
    if arch.moe is not None:
        if arch.moe.num_experts % ep:
            raise UnsupportedModelError(f"expert-parallel size {ep} does not divide num_experts="
                                        f"{arch.moe.num_experts}")
        if arch.moe.ffn_hidden_size % tp:
            raise UnsupportedModelError(f"tensor-parallel size {tp} does not divide moe_intermediate_size="
                                        f"{arch.moe.ffn_hidden_size}")
    if arch.num_kv_heads % tp:
        raise UnsupportedModelError(
            f"tensor-parallel size {tp} does not divide num_key_value_heads={arch.num_kv_heads} "
            f"(each TP rank needs whole key/value heads); use tp in "
            f"{[t for t in range(1, arch.num_kv_heads + 1) if arch.num_kv_heads % t == 0]}")
    if arch.ffn_hidden_size % tp or arch.num_heads % tp:
        raise UnsupportedModelError(f"tensor-parallel size {tp} does not divide the heads/ffn size")
    if arch.padded_vocab_size % tp:
        raise UnsupportedModelError(f"tensor-parallel size {tp} does not divide the padded vocabulary "
                                    f"{arch.padded_vocab_size}")
    if arch.num_layers % pp:
        raise UnsupportedModelError(f"pipeline-parallel size {pp} does not divide num_hidden_layers={arch.num_layers}")


def torch_dtype(name: Any) -> Any:
    """``fp32``/``float32``/``bf16``/``bfloat16``/``fp16``/torch.dtype -> torch.dtype."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in table:
        raise ValueError(f"unknown dtype '{name}' (choose from auto, {', '.join(table)})")
    return table[name]


def moe_config(arch: Arch, ep: int) -> dict[str, Any]:
    """``TransformerConfig`` arguments of the expert layers (empty for dense models).

    HF routes with softmax over all experts, then top-k, then (``norm_topk_prob``) renormalises;
    megatron's ``moe_router_pre_softmax=False`` takes top-k of the logits and softmaxes those, which
    is the same distribution, and ``pre_softmax=True`` is the unnormalised variant. No capacity
    factor: no token is dropped, as in HF and vLLM. The router runs in fp32 like HF's. Experts are
    per-expert MLPs (``SequentialMLP``), whose names map one-to-one onto HF's per-expert tensors.
    The all-gather token dispatcher runs on gloo; GPUs use all-to-all.
    """
    import torch

    moe = arch.moe
    if moe is None:
        return {}
    return dict(
        num_moe_experts=moe.num_experts, moe_router_topk=moe.top_k, moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_layer_freq=[int(x) for x in moe.layers], moe_router_pre_softmax=not moe.norm_topk_prob,
        moe_router_score_function="softmax", moe_router_dtype="fp32", moe_grouped_gemm=False,
        moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
        expert_model_parallel_size=ep, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None,
    )


def megatron_config(arch: Arch, *, tp: int, pp: int, dtype: Any, perform_initialization: bool = True,
                    ep: int = 1, **overrides: Any) -> Any:
    """The ``TransformerConfig`` reproducing the HF model; ``overrides`` pass through to it
    (recompute, sequence parallelism, router loss coefficients ... chosen by the trainer)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    dt = torch_dtype(dtype)
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=arch.norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dt, pipeline_dtype=dt,
        bf16=dt == torch.bfloat16, fp16=dt == torch.float16, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=perform_initialization,
    )
    kwargs.update(moe_config(arch, ep))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def gpt_model_kwargs(arch: Arch) -> dict[str, Any]:
    """Positional-embedding arguments of ``GPTModel`` (via :func:`megacov.models.core.build_gpt_model`)."""
    kw: dict[str, Any] = dict(vocab_size=arch.padded_vocab_size, max_sequence_length=arch.max_position_embeddings,
                              share_embeddings_and_output_weights=arch.tie_word_embeddings,
                              rotary_base=arch.rope_theta)
    if arch.rope_type == "llama3":
        kw.update(rope_scaling=True, rope_scaling_factor=arch.rope_factor)
    elif arch.rope_type == "linear":
        kw.update(seq_len_interpolation_factor=arch.rope_factor)
    return kw


def hf_tensor_shapes(arch: Arch, layer_rules: Any) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the model has, with its shape, in export order (known before any weight is read)."""
    from megacov.models.mapping import expand_layer_rules

    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    mf, experts = (arch.moe.ffn_hidden_size, arch.moe.num_experts) if arch.moe else (0, 0)
    q, kv = arch.num_heads * hd, arch.num_kv_heads * hd
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q), "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
        "mlp.gate.weight": (experts, h), "mlp.experts.{e}.gate_proj.weight": (mf, h),
        "mlp.experts.{e}.up_proj.weight": (mf, h), "mlp.experts.{e}.down_proj.weight": (h, mf),
    }
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h)}
    for i in range(arch.num_layers):
        moe_layer = arch.moe is not None and arch.moe.is_moe(i)
        for _, rule, hf_names, template in expand_layer_rules(layer_rules, moe_layer, experts):
            for name, tmpl in zip(hf_names, template):
                out[f"model.layers.{i}.{name}"] = per_layer[tmpl]
    out["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = (arch.vocab_size, h)
    return out
