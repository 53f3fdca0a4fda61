"""Qwen2 layer weights: the base table plus the fused q/k/v bias (interleaved like the weight)."""
from megacov.models.mapping import BASE_LAYER_RULES, QKV_BIAS_RULES

LAYER_RULES = BASE_LAYER_RULES + QKV_BIAS_RULES
