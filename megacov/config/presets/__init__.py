"""Named model shapes: published HF ``config.json`` files (no weights, no tokenizer).

They let ``megacov train CONFIG --dry-run`` check a layout and its memory for a model that is not on
disk yet: ``model.config=qwen2.5-32b`` (or a path to any ``config.json``, or to a directory holding
one). The numbers are those of the released checkpoints; only the architecture matters here.
"""
from __future__ import annotations

import json
import os
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))


def preset_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(_HERE) if f.endswith(".json"))


def preset_path(name: str) -> str | None:
    """The shipped file of preset ``name`` (case-insensitive), or None."""
    path = os.path.join(_HERE, f"{name.lower()}.json")
    return path if name and os.sep not in name and os.path.isfile(path) else None


def load_model_config(ref: str) -> tuple[dict[str, Any], str]:
    """``(hf_config, file)`` for a preset name, a ``config.json`` path or a directory holding one.

    Raises :class:`FileNotFoundError` when ``ref`` is none of them (callers name the key)."""
    path = preset_path(ref)
    if path is None:
        candidate = os.path.join(ref, "config.json") if os.path.isdir(ref) else ref
        if not os.path.isfile(candidate):
            raise FileNotFoundError(ref)
        path = candidate
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data, path
