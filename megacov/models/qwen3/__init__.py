"""Qwen3 (dense): per-head RMSNorm on queries and keys, no QKV bias, explicit ``head_dim``."""
from megacov.models.family import Family
from megacov.models.qwen3 import config, weights

FAMILY = Family(name="qwen3", architectures=config.ARCHITECTURES, model_types=config.MODEL_TYPES,
                layer_rules=weights.LAYER_RULES, qkv_bias=config.QKV_BIAS, qk_norm=config.QK_NORM,
                check=config.check)
