"""Qwen3 layer weights: the base table plus the q/k RMSNorm weights (one head_dim vector each)."""
from megacov.models.mapping import BASE_LAYER_RULES, QK_NORM_RULES

LAYER_RULES = BASE_LAYER_RULES + QK_NORM_RULES
