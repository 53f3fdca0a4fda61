"""What distinguishes Llama configs: optional ``attention_bias`` / ``mlp_bias`` (refused: megatron
has one switch for every linear bias, which does not match HF's split)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megacov.models._checks import no_linear_bias

ARCHITECTURES = ("LlamaForCausalLM",)
MODEL_TYPES = ("llama",)
QKV_BIAS = False
QK_NORM = False


def check(hf: Mapping[str, Any]) -> None:
    no_linear_bias(hf, "attention_bias", "mlp_bias")
