"""Mistral layer weights: the base table, same names as Llama."""
from megacov.models.mapping import BASE_LAYER_RULES

LAYER_RULES = BASE_LAYER_RULES
