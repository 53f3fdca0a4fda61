"""Qwen3-MoE layer weights: Qwen3's table (q/k RMSNorm) plus the router and the per-expert MLPs.

Dense-MLP rules apply to the layers listed in ``mlp_only_layers`` (or skipped by
``decoder_sparse_step``); the expert rules to every other layer.
"""
from megacov.models.mapping import BASE_LAYER_RULES, MOE_RULES, QK_NORM_RULES

LAYER_RULES = BASE_LAYER_RULES + QK_NORM_RULES + MOE_RULES
