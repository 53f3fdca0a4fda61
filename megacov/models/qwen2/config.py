"""What distinguishes Qwen2 configs: QKV bias always on; ``use_sliding_window`` (off in every
released checkpoint) is refused when on."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megacov.models._checks import no_sliding_window

ARCHITECTURES = ("Qwen2ForCausalLM",)
MODEL_TYPES = ("qwen2",)
QKV_BIAS = True
QK_NORM = False


def check(hf: Mapping[str, Any]) -> None:
    no_sliding_window(hf)
