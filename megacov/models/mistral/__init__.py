"""Mistral (v0.2 and later: full attention, no sliding window): Llama's layout."""
from megacov.models.family import Family
from megacov.models.mistral import config, weights

FAMILY = Family(name="mistral", architectures=config.ARCHITECTURES, model_types=config.MODEL_TYPES,
                layer_rules=weights.LAYER_RULES, qkv_bias=config.QKV_BIAS, qk_norm=config.QK_NORM,
                check=config.check)
