"""Llama-2 / Llama-3 (3.1/3.2 RoPE scaling included): no biases, untied or tied embeddings."""
from megacov.models.family import Family
from megacov.models.llama import config, weights

FAMILY = Family(name="llama", architectures=config.ARCHITECTURES, model_types=config.MODEL_TYPES,
                layer_rules=weights.LAYER_RULES, qkv_bias=config.QKV_BIAS, qk_norm=config.QK_NORM,
                check=config.check)
