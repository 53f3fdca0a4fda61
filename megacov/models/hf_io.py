"""Reading and writing HF checkpoint directories without holding a model in memory.

:class:`SafetensorsReader` resolves a tensor name to its shard through ``model.safetensors.index.json``
(or the single ``model.safetensors``) and hands out *lazy* slices: indexing one reads only the
requested rows/columns from the memory-mapped file, which is how a TP rank loads just its shard.
:class:`ShardWriter` writes safetensors shards planned from the config, each tensor straight to its
place in its file, so export memory is bounded by one tensor. :func:`atomic_dir` makes every output appear complete or not at all.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tokenizer and generation files copied verbatim between HF and megacov directories.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
              "chat_template.json", "generation_config.json")


class CheckpointError(ValueError):
    """Bad input: missing directory/file/tensor, or a file that is not what it claims to be."""


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file {path}")
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def read_hf_config(hf_dir: str) -> dict:
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"no such directory: {hf_dir}")
    return read_json(os.path.join(hf_dir, "config.json"))


def _open_safetensors(path: str) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


class LazyTensor:
    """A tensor in a safetensors file that is read only when (and as far as) it is indexed."""

    def __init__(self, handle: Any, name: str) -> None:
        self._slice = handle.get_slice(name)
        self.name = name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._slice.get_shape())

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._slice[index]


class SafetensorsReader:
    """Name -> :class:`LazyTensor` over the shards of one HF directory. Files open on first use."""

    def __init__(self, hf_dir: str) -> None:
        self.dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: no 'weight_map'")
            self.weight_map: dict[str, str] = weight_map
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
            self.weight_map = {k: SINGLE_FILE for k in _open_safetensors(os.path.join(hf_dir, SINGLE_FILE)).keys()}
        else:
            raise CheckpointError(f"{hf_dir}: no {INDEX_FILE} or {SINGLE_FILE} (only safetensors checkpoints "
                                  f"are supported)")
        missing = sorted({f for f in self.weight_map.values() if not os.path.isfile(os.path.join(hf_dir, f))})
        if missing:
            raise CheckpointError(f"{hf_dir}: shard files listed in the index are missing: {', '.join(missing)}")
        self._handles: dict[str, Any] = {}

    def _handle(self, filename: str) -> Any:
        if filename not in self._handles:
            self._handles[filename] = _open_safetensors(os.path.join(self.dir, filename))
        return self._handles[filename]

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def __getitem__(self, name: str) -> LazyTensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor '{name}' not found in the checkpoint")
        return LazyTensor(self._handle(self.weight_map[name]), name)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def total_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.dir, f)) for f in set(self.weight_map.values()))

    def close(self) -> None:
        self._handles.clear()


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


class ShardWriter:
    """Stream tensors into safetensors shards whose layout is planned before any weight is read.

    ``plan`` maps every tensor name (in the order to store them) to ``(shape, dtype)``; both are known
    from the config alone. Each shard's header is written up front, and :meth:`add` writes a tensor's
    bytes straight to its place in the file, so memory holds only the tensor being written, whatever
    the shard size. :meth:`finish` checks that every planned tensor arrived and writes the index.
    """

    def __init__(self, out_dir: str, plan: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int) -> None:
        self.out_dir, self.plan = out_dir, plan
        shards: list[list[str]] = [[]]
        size = 0
        for name, (shape, dtype) in plan.items():
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        n = len(shards)
        self.files = [SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._where: dict[str, tuple[Any, int, int]] = {}
        self._handles = []
        self.total_bytes = 0
        for filename, names in zip(self.files, shards):
            self._handles.append(self._open_shard(filename, names))
        self._written: set[str] = set()

    def _open_shard(self, filename: str, names: list[str]) -> Any:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            shape, dtype = self.plan[name]
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        fh = open(os.path.join(self.out_dir, filename), "wb")
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)
        for name in names:
            begin, end = header[name]["data_offsets"]
            self._where[name] = (fh, 8 + len(raw) + begin, end - begin)
        self.total_bytes += offset
        return fh

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.plan:
            raise ValueError(f"tensor {name} is not in the export plan")
        if name in self._written:
            raise ValueError(f"tensor {name} written twice")
        shape, dtype = self.plan[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, planned {tuple(shape)}")
        fh, pos, nbytes = self._where[name]
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != nbytes:
            raise ValueError(f"tensor {name}: {data.numel()} bytes, planned {nbytes}")
        fh.seek(pos)
        fh.write(memoryview(data.numpy()))
        self._written.add(name)

    def finish(self) -> dict[str, str]:
        """Close the shards and write the index (several shards); returns the weight map."""
        for fh in self._handles:
            fh.close()
        missing = [n for n in self.plan if n not in self._written]
        if missing:
            raise ValueError(f"export incomplete: {len(missing)} tensors never arrived, e.g. {missing[:3]}")
        weight_map = {name: os.path.basename(fh.name) for name, (fh, _, _) in self._where.items()}
        for filename in self.files:
            os.chmod(os.path.join(self.out_dir, filename), 0o666 & ~_umask())
        if len(self.files) > 1:
            with open(os.path.join(self.out_dir, INDEX_FILE), "w") as fh:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, fh, indent=2)
        return weight_map


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy tokenizer/generation files that exist in ``src_dir``; returns the names copied."""
    copied = []
    for name in SIDE_FILES:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling of ``out_dir``; on success it is renamed to ``out_dir``.

    On failure the temporary directory is removed, so a crash never leaves a directory under the
    requested name. An existing non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)) and not overwrite:
        raise CheckpointError(f"output {out_dir} already exists (choose another path or pass --overwrite)")
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise CheckpointError(f"parent directory of the output does not exist: {parent}")
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Optional[str] = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=parent)
        os.replace(out_dir, os.path.join(old, "x"))
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
