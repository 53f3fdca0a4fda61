"""What distinguishes Qwen3 configs: q/k layer norms always on; ``head_dim`` may differ from
hidden_size / num_attention_heads (megatron's ``kv_channels``); ``attention_bias`` refused."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megacov.models._checks import no_linear_bias, no_sliding_window

ARCHITECTURES = ("Qwen3ForCausalLM",)
MODEL_TYPES = ("qwen3",)
QKV_BIAS = False
QK_NORM = True


def check(hf: Mapping[str, Any]) -> None:
    no_sliding_window(hf)
    no_linear_bias(hf, "attention_bias")
