"""Llama layer weights: the base table (fused QKV, fused gate/up, RMSNorms)."""
from megacov.models.mapping import BASE_LAYER_RULES

LAYER_RULES = BASE_LAYER_RULES
