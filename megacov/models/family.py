"""The registry of model families and the detection of a family from an HF ``config.json``.

A family is data, not code: which HF architectures it covers, which optional parts its layers have
(QKV bias, q/k layer norms, experts) and its weight table. Every family is a pre-norm decoder with
RMSNorm, RoPE and SwiGLU MLPs (dense, or a routed mixture of SwiGLU experts), so one generic config
mapping (:mod:`megacov.models.arch`) and one generic weight mapping (:mod:`megacov.models.mapping`)
serve them all; the per-family packages hold only what differs.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from megacov.models.mapping import Rule

if TYPE_CHECKING:
    from megacov.models.arch import MoeArch

FAMILY_PACKAGES = ("llama", "qwen2", "qwen3", "mistral", "qwen3_moe")


class UnsupportedModelError(ValueError):
    """The HF checkpoint is not one megacov can convert (wrong family or unsupported feature)."""


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    """HF ``architectures`` entries (class names) of this family."""
    model_types: tuple[str, ...]
    """HF ``model_type`` values of this family (used when ``architectures`` is missing)."""
    layer_rules: tuple[Rule, ...]
    """Weight table of one decoder layer (see :mod:`megacov.models.mapping`)."""
    qkv_bias: bool
    qk_norm: bool
    check: Callable[[Mapping[str, Any]], None]
    """Raise :class:`UnsupportedModelError` for family features megacov cannot reproduce exactly."""
    moe: Optional[Callable[[Mapping[str, Any]], "MoeArch"]] = None
    """Reads the expert layout from the HF config (mixture-of-experts families only)."""


def families() -> dict[str, Family]:
    """Every registered family by name (the family packages are tiny and import nothing heavy)."""
    out = {}
    for pkg in FAMILY_PACKAGES:
        fam = importlib.import_module(f"megacov.models.{pkg}").FAMILY
        out[fam.name] = fam
    return out


def supported_architectures() -> list[str]:
    return [a for fam in families().values() for a in fam.architectures]


def detect_family(hf_config: Mapping[str, Any]) -> Family:
    """The family of an HF config; unknown ones fail with the list of supported architectures."""
    fams = families().values()
    archs = list(hf_config.get("architectures") or [])
    for fam in fams:
        if any(a in fam.architectures for a in archs):
            return fam
    if not archs:
        model_type = hf_config.get("model_type")
        for fam in fams:
            if model_type in fam.model_types:
                return fam
    what = ", ".join(archs) if archs else f"model_type={hf_config.get('model_type')!r}"
    raise UnsupportedModelError(
        f"unsupported architecture {what}; supported: {', '.join(supported_architectures())}")
