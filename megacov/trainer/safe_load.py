"""Loading megatron / torch distributed checkpoints without running code from them.

A torch ``dist_checkpointing`` folder holds two kinds of pickled data that torch loads unrestricted:
the ``.metadata`` file (``pickle.load``) and the non-tensor entries of the state dict (megatron's
``ShardedObject``\\ s, loaded with ``torch.load(..., weights_only=False)``). A crafted checkpoint can
therefore run arbitrary code on resume. :func:`install` closes both doors for this process:

* ``.metadata`` is read by an unpickler that resolves only the classes an honest checkpoint
  contains (:data:`METADATA_ALLOW_LIST`: torch's checkpoint-metadata dataclasses, ``torch.Size``,
  dtypes and the layout helper); anything else raises :class:`UnsafeCheckpointError`.
* byte entries are loaded with ``weights_only=True`` (torch's own allow-list: tensors, containers
  and plain values).

``common.pt`` is loaded by megatron with ``torch.load``'s default, which is ``weights_only=True``
since torch 2.6. Writing is unchanged.
"""
from __future__ import annotations

import io
import pickle
import threading
from typing import Any

#: ``module -> names`` the ``.metadata`` unpickler may resolve.
METADATA_ALLOW_LIST: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.planner": frozenset({
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem",
        "LoadItemType"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size", "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16",
                        "int8", "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
                        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"}),
    "collections": frozenset({"OrderedDict"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"}),
    "builtins": frozenset({"set", "frozenset", "slice", "tuple", "list", "dict"}),
}

_lock = threading.Lock()
_installed = False


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's pickled metadata refers to something outside the allow-list."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in METADATA_ALLOW_LIST.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"checkpoint metadata refers to {module}.{name}, which is not on megacov's "
                                    f"allow-list; refusing to load it (see 'Trust' in docs/trainer.md)")


def safe_metadata_load(fh: Any) -> Any:
    """``pickle.load`` for checkpoint metadata, restricted to :data:`METADATA_ALLOW_LIST`."""
    return _MetadataUnpickler(fh).load()


class _RestrictedPickle:
    """Stands in for the ``pickle`` module inside torch's filesystem reader: loads are restricted,
    everything else (``dump``, ``HIGHEST_PROTOCOL``, ...) is the real module."""

    load = staticmethod(safe_metadata_load)

    @staticmethod
    def loads(data: bytes) -> Any:
        return safe_metadata_load(io.BytesIO(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)


def _load_bytes_weights_only(self: Any, read_item: Any, value: io.BytesIO) -> None:
    import torch
    from torch.distributed.checkpoint._traverse import set_element

    obj = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def install() -> None:
    """Restrict checkpoint unpickling in this process (idempotent; call before any checkpoint load)."""
    global _installed
    with _lock:
        if _installed:
            return
        from torch.distributed.checkpoint import default_planner, filesystem

        filesystem.pickle = _RestrictedPickle()  # type: ignore[assignment]
        default_planner.DefaultLoadPlanner.load_bytes = _load_bytes_weights_only  # type: ignore[method-assign]
        _installed = True
