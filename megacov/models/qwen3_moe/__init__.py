"""Qwen3-MoE: Qwen3 attention (q/k RMSNorm) with routed SwiGLU experts, optionally dense MLPs in some layers."""
from megacov.models.family import Family
from megacov.models.qwen3_moe import config, weights

FAMILY = Family(name="qwen3_moe", architectures=config.ARCHITECTURES, model_types=config.MODEL_TYPES,
                layer_rules=weights.LAYER_RULES, qkv_bias=config.QKV_BIAS, qk_norm=config.QK_NORM,
                check=config.check, moe=config.moe_arch)
