"""Model families and the HF <-> megatron-core bridge.

* :func:`build_model` -- this rank's megatron chunk from an HF directory or a megacov mcore
  checkpoint, at any TP x PP, reading only this rank's shard.
* :func:`iter_hf_weights` -- stream a live chunk out as full HF-named tensors (export, weight sync).
* :mod:`megacov.models.mapping` -- the pure per-tensor mapping (``hf_to_mcore_shard``,
  ``mcore_to_hf``, ``merge_tp_shards``, ``split_tp``) driven by each family's table in
  ``megacov/models/<family>/weights.py``.
* :mod:`megacov.models.checkpoint` -- ``megacov convert`` (hf-to-mcore, mcore-to-hf).
* :mod:`megacov.verify.conversion` -- ``megacov verify conversion`` (above this package).

Nothing here imports megatron, vLLM or Ray at import time.
"""
from megacov.models.arch import Arch, arch_from_hf
from megacov.models.export import iter_hf_weights
from megacov.models.family import UnsupportedModelError, detect_family, families, supported_architectures
from megacov.models.hf_io import CheckpointError
from megacov.models.loader import (
    ModelInfo,
    build_model,
    load_hf_weights,
    load_mcore_checkpoint,
    resolve_source,
)
from megacov.models.mapping import hf_to_mcore_shard, mcore_to_hf, merge_tp_shards, split_tp

__all__ = [
    "Arch",
    "CheckpointError",
    "ModelInfo",
    "UnsupportedModelError",
    "arch_from_hf",
    "build_model",
    "detect_family",
    "families",
    "hf_to_mcore_shard",
    "iter_hf_weights",
    "load_hf_weights",
    "load_mcore_checkpoint",
    "mcore_to_hf",
    "merge_tp_shards",
    "resolve_source",
    "split_tp",
    "supported_architectures",
]
