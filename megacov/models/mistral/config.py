"""What distinguishes Mistral configs: ``sliding_window`` (v0.1 uses 4096; refused when active)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megacov.models._checks import no_sliding_window

ARCHITECTURES = ("MistralForCausalLM",)
MODEL_TYPES = ("mistral",)
QKV_BIAS = False
QK_NORM = False


def check(hf: Mapping[str, Any]) -> None:
    no_sliding_window(hf)
