"""Checks shared by the family ``config.py`` modules: HF features megatron-core cannot reproduce."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megacov.models.family import UnsupportedModelError


def no_sliding_window(hf: Mapping[str, Any]) -> None:
    """Sliding-window attention is not in megatron's local attention; refuse it rather than ignore it."""
    window = hf.get("sliding_window")
    if window is None or hf.get("use_sliding_window") is False:
        return
    if int(window) < int(hf.get("max_position_embeddings", 0)):
        raise UnsupportedModelError(f"sliding_window={window} (< max_position_embeddings) is not supported")


def no_linear_bias(hf: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        if hf.get(key):
            raise UnsupportedModelError(f"{key}=true is not supported for {hf.get('model_type')} models")
