"""Qwen2 / Qwen2.5: Llama's layout plus a bias on the q, k and v projections."""
from megacov.models.family import Family
from megacov.models.qwen2 import config, weights

FAMILY = Family(name="qwen2", architectures=config.ARCHITECTURES, model_types=config.MODEL_TYPES,
                layer_rules=weights.LAYER_RULES, qkv_bias=config.QKV_BIAS, qk_norm=config.QK_NORM,
                check=config.check)
