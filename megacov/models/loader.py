"""Build this rank's megatron-core model chunk from an HF directory or a megacov mcore checkpoint.

:func:`build_model` is what the actor, the reference policy, ``megacov verify`` and the converter
use. From an HF directory, every rank reads only the tensors of its pipeline stage, and of those
only the rows/columns of its TP shard (lazy safetensors slices), so loading a 32B model at TP=8 does
not make eight processes read 32B parameters each. From a megacov mcore checkpoint
(``megacov convert hf-to-mcore``) megatron's ``dist_checkpointing`` reshards to the layout asked for.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megacov.models import mapping
from megacov.models.arch import (
    Arch,
    arch_from_hf,
    check_layout,
    gpt_model_kwargs,
    hf_tensor_shapes,
    megatron_config,
    torch_dtype,
)
from megacov.models.family import families
from megacov.models.hf_io import CheckpointError, SafetensorsReader, read_hf_config, read_json

MCORE_META_FILE = "megacov.json"
MCORE_FORMAT = "megacov-mcore"
_LOCAL_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT_RE = re.compile(r"\.local_experts\.(\d+)\.")


@dataclass
class ModelInfo:
    """What callers need to know about a built chunk besides the module itself (picklable)."""

    family: str
    arch: Arch
    hf_config: dict = field(repr=False)
    source: str
    """``hf`` or ``mcore``: what :func:`build_model` loaded from."""
    path: str
    dtype: str
    tp: int
    pp: int
    pp_rank: int
    layer_offset: int
    """Global index of this stage's first decoder layer."""
    num_local_layers: int
    ep: int = 1
    """Expert-parallel size the chunk was built with."""
    ep_rank: int = 0

    @property
    def num_local_experts(self) -> int:
        return self.arch.moe.num_experts // self.ep if self.arch.moe else 0

    @property
    def expert_offset(self) -> int:
        """Global index of this rank's first expert (megatron numbers local experts from 0)."""
        return self.ep_rank * self.num_local_experts

    @property
    def vocab_size(self) -> int:
        return self.arch.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.arch.padded_vocab_size

    @property
    def layer_rules(self) -> tuple[mapping.Rule, ...]:
        return families()[self.family].layer_rules

    @property
    def dims(self) -> mapping.Dims:
        return self.arch.dims


@dataclass(frozen=True)
class Source:
    """A resolved model directory: HF or megacov mcore, with its normalised architecture."""

    kind: str
    path: str
    hf_config: dict
    arch: Arch
    meta: dict | None = None


def is_mcore_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MCORE_META_FILE))


def read_mcore_meta(path: str) -> dict:
    if not is_mcore_checkpoint(path):
        raise CheckpointError(f"{path} is not a megacov mcore checkpoint (no {MCORE_META_FILE}; "
                              f"'megacov convert hf-to-mcore' writes one)")
    meta = read_json(os.path.join(path, MCORE_META_FILE))
    if meta.get("format") != MCORE_FORMAT or "hf_config" not in meta:
        raise CheckpointError(f"{path}/{MCORE_META_FILE} is not a megacov mcore checkpoint description")
    return meta


def resolve_source(path: str, *, tp: int = 1, vocab_divisible_by: int | None = None) -> Source:
    """Read the config of an HF directory or megacov mcore checkpoint (no weights are read)."""
    if vocab_divisible_by is None:
        from megacov.config.schema import ModelConfig

        vocab_divisible_by = ModelConfig.vocab_divisible_by
    if not os.path.isdir(path):
        raise CheckpointError(f"no such directory: {path}")
    if is_mcore_checkpoint(path):
        meta = read_mcore_meta(path)
        arch = arch_from_hf(meta["hf_config"], vocab_divisible_by=vocab_divisible_by,
                            padded_vocab_size=int(meta["padded_vocab_size"]))
        return Source("mcore", path, meta["hf_config"], arch, meta)
    hf_config = read_hf_config(path)
    return Source("hf", path, hf_config, arch_from_hf(hf_config, vocab_divisible_by=vocab_divisible_by, tp=tp))


def check_hf_weights(path: str, arch: Arch) -> SafetensorsReader:
    """Fail early, with names, when the safetensors do not hold the tensors config.json describes.

    Only the safetensors headers are read. Returns the open reader.
    """
    reader = SafetensorsReader(path)
    expected = hf_tensor_shapes(arch, families()[arch.family].layer_rules)
    missing = [n for n in expected if n not in reader]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: tensors missing from the safetensors: {', '.join(missing[:3])}{more}")
    for name, shape in expected.items():
        found = reader[name].shape
        if tuple(found) != shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {tuple(found)}, config.json implies {shape}")
    return reader


def unwrap(model: Any) -> torch.nn.Module:
    """The bare GPTModel under DDP / Float16Module wrappers (or a one-element chunk list)."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError("virtual pipeline stages (several model chunks per rank) are not supported")
        model = model[0]
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of the first decoder layer this chunk holds (megatron numbers layers from 1)."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return int(layers[0].layer_number) - 1


def global_name(local_name: str, offset: int, expert_offset: int = 0) -> str:
    """``decoder.layers.<local>.x`` -> ``decoder.layers.<local + offset>.x`` and, for experts,
    ``local_experts.<l>`` -> ``local_experts.<l + expert_offset>``; other names unchanged."""
    name = _LOCAL_LAYER_RE.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local_name, count=1)
    if expert_offset:
        name = _LOCAL_EXPERT_RE.sub(lambda m: f".local_experts.{int(m.group(1)) + expert_offset}.", name, count=1)
    return name


def build_model(path: str, layout: Any, *, load_weights: bool = True, dtype: Any = "auto",
                vocab_divisible_by: int | None = None, use_te: bool | None = None, progress: bool = False,
                **config_overrides: Any) -> tuple[torch.nn.Module, ModelInfo]:
    """This rank's chunk of the model in ``path`` (HF directory or megacov mcore checkpoint).

    ``layout`` is a :class:`megacov.parallel.layout.ParallelLayout`. ``dtype``: ``auto`` (bf16 on
    GPU, fp32 on CPU), ``fp32``, ``bf16``, ``fp16`` or a torch dtype. ``config_overrides`` go to the
    megatron ``TransformerConfig``. Returns ``(model_chunk, info)``.
    """
    src = resolve_source(path, tp=layout.tp, vocab_divisible_by=vocab_divisible_by)
    arch = src.arch
    ep = getattr(layout, "ep", 1)
    check_layout(arch, layout.tp, layout.pp, ep)
    dt = torch_dtype(dtype)
    cfg = megatron_config(arch, tp=layout.tp, pp=layout.pp, dtype=dt, perform_initialization=not load_weights,
                          ep=ep, **config_overrides)
    model = build_chunk(cfg, arch, layout, use_te)
    _cast_params(model, dt)
    info = ModelInfo(family=arch.family, arch=arch, hf_config=src.hf_config, source=src.kind, path=path,
                     dtype=str(dt).replace("torch.", ""), tp=layout.tp, pp=layout.pp, pp_rank=layout.pp_rank,
                     layer_offset=layer_offset(model), num_local_layers=len(model.decoder.layers),
                     ep=ep, ep_rank=getattr(layout, "ep_rank", 0))
    if load_weights:
        if src.kind == "hf":
            load_hf_weights(model, layout, info, progress=progress)
        else:
            load_mcore_checkpoint(model, path)
    return model, info


def build_chunk(cfg: Any, arch: Arch, layout: Any, use_te: bool | None = None) -> torch.nn.Module:
    """The GPTModel chunk of ``layout`` for a ``TransformerConfig`` (dense or mixture-of-experts)."""
    from megacov.models import core

    if arch.moe is not None:
        spec = core.moe_block_spec(cfg, layout.pp_rank, use_te)
    else:
        spec = core.layer_spec(cfg.normalization, arch.qk_norm, use_te)
    return core.build_gpt_model(cfg, layout, spec=spec, **gpt_model_kwargs(arch))


def _cast_params(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """megatron's local-spec norms ignore ``params_dtype`` and stay fp32; make every parameter ``dtype``
    (what megatron's Float16Module does for training), so checkpoints and exports have one dtype."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def load_hf_weights(model: Any, layout: Any, info: ModelInfo, *, progress: bool = False) -> int:
    """Copy this rank's shards from the HF safetensors of ``info.path`` into ``model``; returns the
    number of bytes copied. Reads nothing outside this rank's stage and TP shard."""
    bare = unwrap(model)
    reader = SafetensorsReader(info.path)
    params = list(bare.named_parameters())
    copied = 0
    iterator: Sequence = params
    if progress:
        from tqdm import tqdm

        iterator = tqdm(params, desc=f"loading stage {layout.pp_rank} tp {layout.tp_rank}", unit="tensor",
                        file=sys.stderr, disable=layout.tp_rank != 0)
    with torch.no_grad():
        for name, param in iterator:
            gname = global_name(name, info.layer_offset, info.expert_offset)
            shard = mapping.hf_to_mcore_shard(gname, reader, info.layer_rules, info.dims, layout.tp_rank, layout.tp)
            if tuple(shard.shape) != tuple(param.shape):
                raise CheckpointError(f"{info.path}: {gname} built from HF has shape {tuple(shard.shape)}, the "
                                      f"model expects {tuple(param.shape)} (config.json does not match the weights)")
            param.copy_(shard)
            copied += shard.numel() * shard.element_size()
    reader.close()
    return copied


TE_EXTRA_STATE = "_extra_state"
"""Suffix of TransformerEngine's per-module state (FP8 scaling metadata; empty without FP8)."""


def load_mcore_checkpoint(model: Any, ckpt_dir: str) -> None:
    """Load a dist_checkpointing checkpoint into ``model`` at whatever layout it was built with.

    Checkpoints cross between layer specs: megatron's local spec (CPU, ``megacov convert``) saves its
    norms under TransformerEngine's names, so a TE model and a local one ask for the same tensors.
    The one difference is TE's ``_extra_state`` objects, absent from a local-spec checkpoint: they keep
    TE's defaults (no FP8 history), which is exact for bf16/fp16/fp32 training. A TE checkpoint
    loaded into a local model simply leaves its ``_extra_state`` unread. Any other tensor the model
    needs and the checkpoint lacks is a one-line :class:`CheckpointError` naming it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    bare = unwrap(model)
    if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
        raise CheckpointError(f"{ckpt_dir}: not a megatron dist_checkpointing checkpoint (no metadata.json)")
    # "unexpected" in megatron's terms: asked for by the model, absent from the checkpoint
    state, _, absent = dist_checkpointing.load(bare.sharded_state_dict(), ckpt_dir,
                                               strict=StrictHandling.RETURN_UNEXPECTED)
    lacking = sorted(k for k in absent if not k.endswith(TE_EXTRA_STATE))
    if lacking:
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        raise CheckpointError(f"{ckpt_dir}: the checkpoint lacks {', '.join(lacking[:3])}{more} "
                              f"(another model, or an unsupported layer spec)")
    result = bare.load_state_dict(state, strict=False)
    left = [k for k in result.missing_keys if not k.endswith(TE_EXTRA_STATE)] + list(result.unexpected_keys)
    if left:
        raise CheckpointError(f"{ckpt_dir}: state does not match the model: {', '.join(sorted(left)[:3])}")
