"""Packing exported weights into size-bounded buckets that never split a fused engine module.

Why fused groups matter: vLLM loads ``q_proj``, ``k_proj`` and ``v_proj`` into one ``qkv_proj``
parameter (``gate_proj`` + ``up_proj`` into ``gate_up_proj``) and re-packs a module only once all of
its parts have arrived. Sending q and k in one bucket and v in the next can leave a module processed
with a half-written weight, which produces plausible but wrong log-probs. So every bucket holds whole
groups: a group is the set of HF tensors that end up in one engine module, as the engine itself
reports it (:class:`FusionMap`).

Why a generator: :func:`pack_buckets` pulls tensors lazily and yields a bucket as soon as it is full;
the caller sends it before the next tensor is produced. At no point does this code hold more than one
bucket plus the fused group being assembled, which is the memory bound of a weight sync
(``rollout.sync_bucket_mb`` + the largest fused megatron tensor).

The wire format is deliberately dumb: a list of :class:`TensorMeta` and one raw byte buffer per tensor,
so any transport (Ray object store, bytes over msgpack, CUDA IPC, NCCL) can move it and the receiver
rebuilds views without copying.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Named = tuple[str, torch.Tensor]


class SyncError(RuntimeError):
    """A weight sync was refused or came out incomplete; the engines must not serve these weights."""


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    """``torch.float32`` style name (``str(tensor.dtype)``)."""
    shape: tuple[int, ...]
    nbytes: int


def dtype_from_name(name: str) -> torch.dtype:
    value = getattr(torch, name.split(".")[-1], None)
    if not isinstance(value, torch.dtype):
        raise SyncError(f"unknown tensor dtype '{name}' in a weight bucket")
    return value


def meta_of(name: str, tensor: torch.Tensor) -> TensorMeta:
    return TensorMeta(name, str(tensor.dtype), tuple(tensor.shape), tensor.numel() * tensor.element_size())


class FusionMap:
    """Which HF tensors the engine loads into the same module, and the full set it expects.

    ``members`` maps a group key (the engine's module name, e.g. ``model.layers.0.self_attn.qkv_proj``)
    to the HF tensor names loaded into it. Names outside every group are groups of their own.
    """

    def __init__(self, members: Mapping[str, Sequence[str]]):
        self.members: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in members.items()}
        self._key_of: dict[str, str] = {}
        for key, names in self.members.items():
            for name in names:
                if name in self._key_of:
                    raise SyncError(f"HF tensor '{name}' belongs to two engine modules "
                                    f"('{self._key_of[name]}' and '{key}')")
                self._key_of[name] = key

    @classmethod
    def from_engine_params(cls, param_names: Iterable[str],
                           packed_modules_mapping: Mapping[str, Sequence[str]] | None,
                           expanded: Mapping[str, Sequence[str]] | None = None) -> FusionMap:
        """Expand an engine's parameter names into HF names using its ``packed_modules_mapping``.

        ``model.layers.0.self_attn.qkv_proj.bias`` with ``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``
        becomes the three ``..._proj.bias`` HF names, all in group ``model.layers.0.self_attn.qkv_proj``.
        ``expanded`` gives parameters whose HF names the engine knows otherwise (a MoE layer's
        ``w13_weight`` / ``w2_weight``: every expert's gate+up / down); each is a group of its own,
        keyed by the parameter name.
        """
        packed = dict(packed_modules_mapping or {})
        members: dict[str, list[str]] = {}
        for pname in param_names:
            if expanded and pname in expanded:
                members.setdefault(pname, []).extend(expanded[pname])
                continue
            module, _, leaf = pname.rpartition(".")
            parent, _, mod_leaf = module.rpartition(".")
            subs = packed.get(mod_leaf)
            if subs:
                prefix = f"{parent}." if parent else ""
                names = [f"{prefix}{sub}.{leaf}" for sub in subs]
            else:
                names = [pname]
            members.setdefault(module or pname, []).extend(names)
        return cls(members)

    def key(self, name: str) -> str:
        return self._key_of.get(name, name)

    def group_size(self, key: str) -> int:
        return len(self.members.get(key, (key,)))

    @property
    def expected(self) -> set[str]:
        return set(self._key_of)

    def to_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.members.items()}


@dataclass
class PackStats:
    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    peak_held_bytes: int = 0
    """Most bytes this packer held at once (the bucket being filled + the group being assembled)."""
    largest_group_bytes: int = 0
    oversized_buckets: int = 0
    """Buckets larger than the capacity because one fused group alone exceeded it."""
    names: list[str] = field(default_factory=list)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def iter_groups(stream: Iterable[Named], fusion: FusionMap, stats: PackStats | None = None,
                held: Callable[[], int] | None = None) -> Iterator[list[Named]]:
    """Yield complete fused groups from a stream of ``(hf_name, tensor)`` in arrival order.

    Raises :class:`SyncError` when the stream ends with a group incomplete (q and k exported but not
    v), or repeats a name, because the engine would then mix new and stale parts of one module.
    ``held`` reports the bytes the consumer still holds, for the ``peak_held_bytes`` statistic.
    """
    stats = stats if stats is not None else PackStats()
    pending: dict[str, list[Named]] = {}
    pending_bytes = 0
    seen: set[str] = set()
    for name, tensor in stream:
        if name in seen:
            raise SyncError(f"tensor '{name}' was exported twice in one weight sync")
        seen.add(name)
        stats.tensors += 1
        stats.names.append(name)
        key = fusion.key(name)
        pending.setdefault(key, []).append((name, tensor))
        pending_bytes += _nbytes(tensor)
        stats.peak_held_bytes = max(stats.peak_held_bytes, pending_bytes + (held() if held else 0))
        if len(pending[key]) < fusion.group_size(key):
            continue
        group = pending.pop(key)
        group_bytes = sum(_nbytes(t) for _, t in group)
        pending_bytes -= group_bytes
        stats.largest_group_bytes = max(stats.largest_group_bytes, group_bytes)
        yield group
    if pending:
        parts = "; ".join(f"{key}: got {[n for n, _ in grp]}, expected {list(fusion.members.get(key, ()))}"
                          for key, grp in sorted(pending.items()))
        raise SyncError(f"incomplete fused module(s) at the end of the weight stream: {parts}")


def pack_buckets(stream: Iterable[Named], capacity_bytes: int, fusion: FusionMap,
                 stats: PackStats | None = None) -> Iterator[list[Named]]:
    """Yield lists of ``(hf_name, tensor)`` of at most ``capacity_bytes`` each, fused groups intact.

    A group larger than the capacity is sent alone (one oversized bucket) rather than split.
    """
    if capacity_bytes <= 0:
        raise SyncError(f"bucket capacity must be positive, got {capacity_bytes} bytes")
    stats = stats if stats is not None else PackStats()
    bucket: list[Named] = []
    bucket_bytes = 0
    for group in iter_groups(stream, fusion, stats, held=lambda: bucket_bytes):  # noqa: B023 - reads the live size
        group_bytes = sum(_nbytes(t) for _, t in group)
        if bucket and bucket_bytes + group_bytes > capacity_bytes:
            stats.buckets += 1
            stats.bytes += bucket_bytes
            yield bucket
            bucket, bucket_bytes = [], 0
        bucket.extend(group)
        bucket_bytes += group_bytes
        stats.peak_held_bytes = max(stats.peak_held_bytes, bucket_bytes)
        if bucket_bytes >= capacity_bytes:
            stats.oversized_buckets += int(bucket_bytes > capacity_bytes)
            stats.buckets += 1
            stats.bytes += bucket_bytes
            yield bucket
            bucket, bucket_bytes = [], 0
    if bucket:
        stats.buckets += 1
        stats.bytes += bucket_bytes
        yield bucket


# ------------------------------------------------------------------------------------------------
# wire format
# ------------------------------------------------------------------------------------------------

def to_wire(bucket: Sequence[Named]) -> tuple[list[TensorMeta], list[Any]]:
    """``(metas, buffers)`` with one uint8 numpy view per tensor (no copy for contiguous CPU tensors).

    Ray pickles numpy arrays out of band, so putting the result into the object store copies each
    tensor exactly once (into shared memory) and the engine reads it back without a copy.
    """
    metas, buffers = [], []
    for name, tensor in bucket:
        flat = tensor.detach()
        if flat.device.type != "cpu":
            flat = flat.cpu()
        flat = flat.contiguous().reshape(-1)
        metas.append(meta_of(name, tensor))
        buffers.append(flat.view(torch.uint8).numpy())
    return metas, buffers


def from_wire(metas: Sequence[Any], buffers: Sequence[Any]) -> list[Named]:
    """Rebuild ``(name, tensor)`` views over received buffers (numpy arrays, bytes or uint8 tensors)."""
    import warnings

    import numpy as np

    if len(metas) != len(buffers):
        raise SyncError(f"weight bucket has {len(metas)} descriptions but {len(buffers)} buffers")
    out: list[Named] = []
    for meta, buf in zip(metas, buffers):
        meta = meta if isinstance(meta, TensorMeta) else TensorMeta(*meta)
        dtype = dtype_from_name(meta.dtype)
        if meta.nbytes == 0:
            out.append((meta.name, torch.empty(meta.shape, dtype=dtype)))
            continue
        if isinstance(buf, torch.Tensor):
            raw = buf.reshape(-1).view(torch.uint8)
        else:
            with warnings.catch_warnings():  # object-store buffers are read-only; we only read them
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8))
        if raw.numel() != meta.nbytes:
            raise SyncError(f"tensor '{meta.name}': received {raw.numel()} bytes, expected {meta.nbytes}")
        out.append((meta.name, raw.view(dtype).view(meta.shape)))
    return out
