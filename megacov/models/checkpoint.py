"""``megacov convert``: HF safetensors <-> megatron ``dist_checkpointing`` (torch_dist) checkpoints.

hf-to-mcore spawns TP x PP gloo processes (one is enough: the result does not depend on the layout;
more processes convert in parallel). Each builds its chunk on the meta device and megatron saves it
with a strategy that copies every record's bytes from the HF files as it writes the record
(:mod:`megacov.models.mcore_writer`), so memory stays at a few I/O buffers per process. Tensors are stored in
global (TP=1, all layers) coordinates, which is what makes the checkpoint load at any TP x PP:
megatron reshards on load. Next to megatron's files the directory holds
``megacov.json`` (family, padded vocabulary, a copy of the HF config) and the tokenizer files.

mcore-to-hf needs no model and no layout: it reads the checkpoint's tensor metadata, finds where the
rows of every HF tensor lie in the checkpoint's files and copies them into safetensors shards
(:func:`_extent_sources`; memory: a few I/O buffers). Mixture-of-experts checkpoints are exported
one decoder layer at a time instead (a slice of megatron's stacked per-layer tensors, mapped to HF
names, the next layer read meanwhile; peak memory two layers).

Both directions write into ``<out>.tmp-*`` and rename at the end, so an interrupted conversion
never leaves a directory that looks complete. Before writing anything, mcore-to-hf checks every
stored tensor's shape against the model config (on meta tensors: no data is read) and, when the
config comes from ``--hf``, that the embedding rows past its ``vocab_size`` are only padding, so a
config that does not describe the checkpoint is one clear error instead of a traceback or a
silently cut vocabulary.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from megacov.models import mapping
from megacov.models.arch import Arch, check_layout, hf_tensor_shapes, torch_dtype
from megacov.models.extent_reader import ExtentReader
from megacov.models.extent_reader import Source as ExtentSource
from megacov.models.family import families
from megacov.models.hf_io import CheckpointError, ReadAhead, ShardWriter, atomic_dir, copy_side_files
from megacov.models.loader import (
    MCORE_FORMAT,
    MCORE_META_FILE,
    check_hf_weights,
    is_mcore_checkpoint,
    read_mcore_meta,
    resolve_source,
)
from megacov.rollout.memory import PeakRss

DEFAULT_MAX_SHARD_MB = 2048
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def _mb(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ------------------------------------------------------------------------------------------------
# HF -> mcore
# ------------------------------------------------------------------------------------------------


def _hf_to_mcore_rank(rank: int, world_size: int, hf_dir: str, out_dir: str, tp: int, pp: int, dtype: str,
                      progress: bool, ep: int = 1) -> dict:
    from megacov.models.mcore_writer import import_megatron, save_from_hf
    from megacov.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(tp, pp, ep=ep)
    try:
        import_megatron()  # start-up, like the process group: not part of the conversion's time
        src = resolve_source(hf_dir, tp=tp)
        start = time.perf_counter()
        with PeakRss() as peak:
            read = save_from_hf(src, layout, out_dir, torch_dtype(dtype), progress=progress and rank == 0)
        return {"rank": rank, "padded_vocab_size": src.arch.padded_vocab_size, "bytes_written": read,
                "save_seconds": time.perf_counter() - start, "rss_at_start_mb": _mb(peak.start_bytes),
                "peak_rss_mb": _mb(peak.peak_bytes)}
    finally:
        layout.destroy()


def hf_to_mcore(hf_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1, dtype: str | None = None,
                overwrite: bool = False, progress: bool = True, timeout_s: float = 3600.0, ep: int = 1) -> dict:
    """Convert an HF directory into a megacov mcore checkpoint (saved with ``tp`` x ``pp`` x ``ep`` processes).

    ``dtype`` defaults to the HF config's dtype. Returns statistics (seconds, bytes, peak RSS per rank).
    """
    from megacov.parallel.spawn import run_distributed

    src = resolve_source(hf_dir, tp=tp)
    if src.kind != "hf":
        raise CheckpointError(f"{hf_dir} is already a megacov mcore checkpoint")
    check_layout(src.arch, tp, pp, ep)
    hf_bytes = check_hf_weights(hf_dir, src.arch).total_bytes()
    dt = torch_dtype(dtype or src.arch.hf_dtype)
    start = time.perf_counter()
    with atomic_dir(out_dir, overwrite) as tmp:
        ranks = run_distributed(_hf_to_mcore_rank, tp * pp * ep, os.path.abspath(hf_dir), tmp, tp, pp,
                                _dtype_name(dt), progress, ep, timeout_s=timeout_s)
        meta = {
            "format": MCORE_FORMAT, "version": 1, "family": src.arch.family, "dtype": _dtype_name(dt),
            "vocab_size": src.arch.vocab_size, "padded_vocab_size": ranks[0]["padded_vocab_size"],
            "saved_with": {"tp": tp, "pp": pp, "ep": ep}, "megatron_core": _megatron_version(),
            "hf_source": os.path.abspath(hf_dir), "hf_config": src.hf_config,
        }
        copy_side_files(hf_dir, tmp)
        with open(os.path.join(tmp, MCORE_META_FILE), "w") as fh:
            json.dump(meta, fh, indent=2)
    return {"seconds": time.perf_counter() - start, "hf_bytes": hf_bytes, "ranks": ranks}


def _megatron_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------------
# mcore -> HF
# ------------------------------------------------------------------------------------------------


def _rule_order(arch: Arch) -> dict[str, int]:
    """Position of each layer-relative megatron name (local or TE alias) in the family's table."""
    order = {}
    for i, rule in enumerate(families()[arch.family].layer_rules):
        order[rule.mcore] = i
        if rule.te:
            order[rule.te] = i
    return order


def iter_checkpoint_tensors(ckpt_dir: str, arch: Arch, progress: bool = False
                            ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(global megatron name, full tensor)`` from a dist checkpoint, layer by layer: the layer
    being yielded and the next one, read meanwhile, are in memory."""
    from megacov.models.dcp_slices import StorageHints, load_slices, tensor_metadata

    # Training checkpoints also hold optimizer state: only the model's keys are exported.
    meta = {k: v for k, v in tensor_metadata(ckpt_dir).items() if k.startswith(MODEL_KEY_PREFIXES)}
    rules, dims = families()[arch.family].layer_rules, arch.dims
    order = _rule_order(arch)
    prefix = "decoder.layers."
    layer_keys = sorted((k for k in meta if k.startswith(prefix)),
                        key=lambda k: order.get(mapping.parse_checkpoint_key(k).suffix, 1 << 30))
    parsed, where = {}, {}
    for key in layer_keys:  # unknown tensors fail before any work
        parsed[key] = mapping.parse_checkpoint_key(key)
        where[key] = mapping.resolve(mapping.model_name_of_checkpoint_key(key, 0, 0), rules, dims).rule.where
        if parsed[key].layer is None and meta[key][0][0] != arch.num_layers:
            raise CheckpointError(f"{ckpt_dir}: {key} stacks {meta[key][0][0]} layers, the config "
                                  f"says {arch.num_layers}")
    for key in (k for k in meta if not k.startswith(prefix)):
        mapping.resolve(key, rules, dims)

    def whole(keys: Sequence[str]) -> dict[str, torch.Tensor]:
        return load_slices(ckpt_dir, {k: ((0,) * len(meta[k][0]), meta[k][0], meta[k][1]) for k in keys if k in meta})

    def step(s: Any) -> dict[str, torch.Tensor]:
        if s == "embedding":
            return whole(["embedding.word_embeddings.weight"])
        if s == "final":
            return whole(["decoder.final_layernorm.weight", "output_layer.weight"])
        skip = "dense" if arch.moe is not None and arch.moe.is_moe(s) else "moe"  # MoE: layer-type tensors only
        keys = [k for k in layer_keys if where[k] != skip and parsed[k].layer in (None, s)]
        boxes = {k: ((s,) + (0,) * (len(meta[k][0]) - 1), (1,) + meta[k][0][1:], meta[k][1])
                 if parsed[k].layer is None else ((0,) * len(meta[k][0]), meta[k][0], meta[k][1]) for k in keys}
        tensors = load_slices(ckpt_dir, boxes)
        out: dict[str, torch.Tensor] = {}
        for k in keys:
            tensor = tensors[k][0] if parsed[k].layer is None else tensors[k]
            if parsed[k].expert:  # [experts, ...]: one tensor per expert
                for e in range(tensor.shape[0]):
                    out[mapping.model_name_of_checkpoint_key(k, s, e)] = tensor[e]
            else:
                out[mapping.model_name_of_checkpoint_key(k, s)] = tensor
        return out

    def hint(s: Any) -> None:
        if s == "embedding":
            hints.will_need("embedding.word_embeddings.weight")
        elif s == "final":
            hints.will_need("decoder.final_layernorm.weight")
            hints.will_need("output_layer.weight")
        else:
            for k in layer_keys:
                hints.will_need(k, s if parsed[k].layer is None else 0)

    # The next step is read while the caller maps and writes this one (two steps in memory), and the
    # disk is asked for the step after that.
    steps: list[Any] = ["embedding", *range(arch.num_layers), "final"]
    hints = StorageHints(ckpt_dir)
    ahead = ReadAhead(step, steps, key=lambda s: s, hint=hint)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="exporting layers", unit="layer", file=sys.stderr)
    try:
        for s in steps:
            tensors = ahead(s)
            yield from tensors.items()
            del tensors
    finally:
        ahead.close()
        hints.close()


def _extent_sources(mcore_dir: str, arch: Arch, plan: dict) -> dict[str, ExtentSource] | None:
    """Every planned HF tensor as byte ranges of the checkpoint's files (q/k/v row groups, gate and
    up halves, the vocabulary's real rows: :func:`mapping.mcore_rows_of_hf`), converted to the
    planned dtype while read; a tensor whose rows are not whole in the stored chunks (a row-parallel
    weight saved at TP > 1) is loaded and mapped instead. None (export layer by layer) for
    mixture-of-experts models, or when the checkpoint's tensors and the plan do not match one to one.
    """
    from megacov.models.dcp_slices import RowExtents, load_slices, tensor_metadata

    if arch.moe is not None:
        return None
    rules, dims = families()[arch.family].layer_rules, arch.dims
    meta = {k: v for k, v in tensor_metadata(mcore_dir).items() if k.startswith(MODEL_KEY_PREFIXES)}

    def build(key: str, lead: tuple, gname: str, hf_name: str) -> Callable[[], torch.Tensor]:
        shape, stored = meta[key]
        box = {key: (lead + (0,) * (len(shape) - len(lead)), (1,) * len(lead) + tuple(shape[len(lead):]), stored)}
        return lambda: dict(mapping.mcore_to_hf(gname, load_slices(mcore_dir, box)[key].reshape(shape[len(lead):]),
                                                rules, dims))[hf_name]

    places = RowExtents(mcore_dir)
    sources: dict[str, ExtentSource] = {}
    try:
        for key, (shape, stored) in meta.items():
            elements: list[tuple[tuple, int | None]] = [((), None)]
            if key.startswith("decoder.layers."):
                parsed = mapping.parse_checkpoint_key(key)
                if parsed.expert:
                    return None
                elements = [((s,), s) for s in range(shape[0])] if parsed.layer is None else [((), parsed.layer)]
            for lead, layer in elements:
                if len(shape) <= len(lead):
                    return None
                gname = key if layer is None else mapping.model_name_of_checkpoint_key(key, layer)
                for hf_name, ranges in mapping.mcore_rows_of_hf(gname, shape[len(lead)], rules, dims):
                    if hf_name not in plan or hf_name in sources:
                        return None
                    extents = places.rows(key, lead, ranges)
                    sources[hf_name] = (ExtentSource(extents, stored, plan[hf_name][1]) if extents is not None else
                                        ExtentSource(build=build(key, lead, gname, hf_name), wanted=plan[hf_name][1]))
    finally:
        places.close()
    return sources if set(sources) == set(plan) else None


def _describe_mcore(mcore_dir: str, hf_dir: str | None) -> tuple[dict, Arch, str]:
    """``(hf_config, arch, side_files_dir)`` of a checkpoint: from its megacov.json, or, for a checkpoint
    without one (the trainer's ``actor/`` folders), from the HF directory it was trained from."""
    from megacov.models.arch import arch_from_hf
    from megacov.models.dcp_slices import tensor_metadata
    from megacov.models.hf_io import read_hf_config

    if not os.path.isdir(mcore_dir):
        raise CheckpointError(f"no such directory: {mcore_dir}")
    if not os.path.isfile(os.path.join(mcore_dir, "metadata.json")):
        if os.path.isfile(os.path.join(mcore_dir, "config.json")):
            raise CheckpointError(f"{mcore_dir} is an HF model directory, not a megatron checkpoint")
        raise CheckpointError(f"{mcore_dir}: megatron checkpoint files are missing (no metadata.json)")
    if not is_mcore_checkpoint(mcore_dir) and hf_dir is None:
        raise CheckpointError(f"{mcore_dir} has no {MCORE_META_FILE}; for a checkpoint written by training, "
                              f"name the HF model it started from (--hf DIR)")
    if is_mcore_checkpoint(mcore_dir):
        meta = read_mcore_meta(mcore_dir)
        return meta["hf_config"], resolve_source(mcore_dir).arch, mcore_dir
    hf_config = read_hf_config(hf_dir)
    embedding = tensor_metadata(mcore_dir).get("embedding.word_embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"{mcore_dir}: no embedding.word_embeddings.weight in the checkpoint")
    from megacov.config.schema import ModelConfig

    arch = arch_from_hf(hf_config, vocab_divisible_by=ModelConfig.vocab_divisible_by,
                        padded_vocab_size=embedding[0][0])
    return hf_config, arch, hf_dir


def _check_shapes(mcore_dir: str, arch: Arch, plan: dict, source: str) -> None:
    """Map every stored model tensor on the meta device and compare with the export plan."""
    from megacov.models.dcp_slices import tensor_metadata

    rules, dims = families()[arch.family].layer_rules, arch.dims
    prefix = "decoder.layers."
    meta = {k: v for k, v in tensor_metadata(mcore_dir).items() if k.startswith(MODEL_KEY_PREFIXES)}
    for key, (shape, _) in sorted(meta.items()):
        name, one = key, tuple(shape)
        if key.startswith(prefix):  # stacked layers (and, for MoE, experts): one element of the stack
            parsed = mapping.parse_checkpoint_key(key)
            layer = parsed.layer if parsed.layer is not None else 0
            name = mapping.model_name_of_checkpoint_key(key, layer, 0 if parsed.expert else None)
            one = tuple(shape[parsed.lead_axes:])
        try:
            outs = list(mapping.mcore_to_hf(name, torch.empty(one, device="meta"), rules, dims))
        except Exception as exc:  # noqa: BLE001 - any mapping failure means the config does not fit
            raise CheckpointError(f"{mcore_dir}: tensor {key} of shape {tuple(shape)} does not fit the model "
                                  f"config of {source} ({type(exc).__name__}: {exc})") from None
        for hf_name, tensor in outs:
            want = plan.get(hf_name)
            if want is not None and tuple(want[0]) != tuple(tensor.shape):
                raise CheckpointError(f"{mcore_dir}: tensor {key} of shape {tuple(shape)} gives {hf_name} of shape "
                                      f"{tuple(tensor.shape)}, but the model config of {source} expects "
                                      f"{tuple(want[0])}")


def _check_vocab_padding(mcore_dir: str, arch: Arch, source: str) -> None:
    """Rows past the config's ``vocab_size`` must be megatron's zero padding, not real tokens."""
    from megacov.models.dcp_slices import load_slices, tensor_metadata

    if arch.padded_vocab_size <= arch.vocab_size:
        return
    meta = tensor_metadata(mcore_dir)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key not in meta:
            continue
        (rows, cols), dtype = meta[key]
        extra = load_slices(mcore_dir, {key: ((arch.vocab_size, 0), (rows - arch.vocab_size, cols), dtype)})[key]
        if bool(extra.ne(0).any()):
            raise CheckpointError(f"{mcore_dir}: {key} has {rows} rows and rows past vocab_size={arch.vocab_size} "
                                  f"of {source} are not padding: that config's vocabulary is smaller than the "
                                  f"checkpoint's (exporting would cut real tokens); name the HF model the "
                                  f"checkpoint was trained from")


def mcore_to_hf(mcore_dir: str, out_dir: str, *, dtype: str | None = None, overwrite: bool = False,
                max_shard_mb: int = DEFAULT_MAX_SHARD_MB, progress: bool = True, hf_dir: str | None = None) -> dict:
    """Convert a megatron checkpoint into an HF directory (safetensors, config, tokenizer).

    The checkpoint is a megacov one (``megacov.json``) or, with ``hf_dir`` naming the HF model it
    derives from, any checkpoint of the model's sharded state (e.g. a training checkpoint's ``actor/``).
    ``dtype`` defaults to the checkpoint's. Memory: I/O buffers (MoE: two decoder layers).
    """
    from megacov.models.dcp_slices import tensor_metadata
    from megacov.trainer import safe_load

    safe_load.install()  # the checkpoint's metadata is unpickled only through an allow-list
    hf_config, arch, side_dir = _describe_mcore(mcore_dir, hf_dir)
    rules, dims = families()[arch.family].layer_rules, arch.dims
    dt = torch_dtype(dtype) if dtype else None
    start = time.perf_counter()
    if dt is None:
        stored = tensor_metadata(mcore_dir).get("embedding.word_embeddings.weight")
        if stored is None:
            raise CheckpointError(f"{mcore_dir}: no embedding.word_embeddings.weight in the checkpoint")
        dt = stored[1]
    plan = {name: (shape, dt) for name, shape in hf_tensor_shapes(arch, rules).items()}
    source = hf_dir if hf_dir is not None and not is_mcore_checkpoint(mcore_dir) else f"{mcore_dir}/{MCORE_META_FILE}"
    _check_shapes(mcore_dir, arch, plan, source)
    if hf_dir is not None and not is_mcore_checkpoint(mcore_dir):
        _check_vocab_padding(mcore_dir, arch, source)
    with atomic_dir(out_dir, overwrite) as tmp, PeakRss() as peak:
        writer = ShardWriter(tmp, plan, max_shard_mb * 1024 * 1024)
        sources = _extent_sources(mcore_dir, arch, plan)
        if sources is not None:  # every tensor's bytes are known places in the checkpoint's files
            names: Any = list(plan)
            with ExtentReader([sources[n] for n in names]) as reader:
                if progress:
                    from tqdm import tqdm

                    names = tqdm(names, desc="exporting tensors", unit="tensor", file=sys.stderr)
                for name in names:
                    writer.add_bytes(name, reader.chunks())
        else:
            for gname, full in iter_checkpoint_tensors(mcore_dir, arch, progress):
                for hf_name, tensor in mapping.mcore_to_hf(gname, full, rules, dims):
                    writer.add(hf_name, tensor)
        writer.finish()
        hf_config = dict(hf_config)
        for key in [k for k in ("dtype", "torch_dtype") if k in hf_config] or ["torch_dtype"]:
            hf_config[key] = _dtype_name(dt)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(hf_config, fh, indent=2)
        copy_side_files(side_dir, tmp)
        written = writer.total_bytes
    return {"seconds": time.perf_counter() - start, "hf_bytes": written, "rss_at_start_mb": _mb(peak.start_bytes),
            "peak_rss_mb": _mb(peak.peak_bytes)}
