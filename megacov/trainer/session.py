"""Driver-side helpers around the actor group: the HF export and the DP-shard gather.

Starting the job's processes is :class:`megacov.runtime.core.Runtime`'s business.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

log = logging.getLogger(__name__)

#: HF files that are not weights and travel with every exported policy.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt")


def export_hf(group: Any, src_dir: str, out_dir: str) -> str:
    """Write the actor's weights as an HF directory (atomically): one safetensors file per pipeline
    stage plus the index, and the config/tokenizer files of ``src_dir``."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weight_map: dict[str, str] = {}
    for part in group.export_hf_shards(tmp):
        if part:
            weight_map.update(part)
    if not weight_map:
        raise RuntimeError("export produced no tensors")
    total = sum(os.path.getsize(os.path.join(tmp, f)) for f in set(weight_map.values()))
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh, indent=1)
    for name in os.listdir(src_dir):
        path = os.path.join(src_dir, name)
        if os.path.isfile(path) and not name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, os.path.join(tmp, name))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return out_dir


def gather_shards(results: list[Any]) -> list[Any]:
    """The answers of the ranks that answer (one per DP replica), in DP order."""
    return [r for r in results if r is not None]
