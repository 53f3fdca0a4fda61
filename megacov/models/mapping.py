"""HF <-> megatron-core weight mapping as pure functions over ``(name, tensor)``.

One table of :class:`Rule` objects per family (``megacov/models/<family>/weights.py``) says which HF
tensors make up each megatron parameter and how the parameter is split across tensor-parallel ranks.
Everything else here is generic and follows from the rule's ``kind``, and from its ``where``:
``dense`` rules belong to layers with a dense MLP only, ``moe`` rules (router, experts) to
mixture-of-experts layers only. Expert rules are templates over the expert index ``{e}``
(``mlp.experts.local_experts.{e}.linear_fc1.weight`` <-> ``mlp.experts.{e}.gate_proj.weight``, ...);
names carry the *global* expert index, and an expert's TP shards split like a dense MLP's.


``replicated``  norms and row-parallel biases: identical on every TP rank.
``row``         row-parallel weights (``linear_proj``, ``linear_fc2``): split along the input dim 1.
``qkv``         the fused attention input projection: megatron stores, per query group, the group's
                query heads followed by its key head and its value head. TP splits whole groups, so a
                rank's shard is itself a fused tensor over its groups.
``fc1``         the fused gated MLP input ``cat[gate, up]``; each TP rank holds ``cat[gate_r, up_r]``.
``vocab``       embedding / output layer: rows padded with zeros up to the padded vocabulary, then
                split along dim 0.

The loading direction (:func:`hf_to_mcore_shard`) only ever *slices* its HF inputs before doing
arithmetic on them, so the inputs can be lazy safetensors slices and a rank reads nothing but its
own shard from disk. The exporting direction works on full (TP-gathered) tensors
(:func:`merge_tp_shards` then :func:`mcore_to_hf`). Names on the megatron side are those of the
local spec or of the TransformerEngine spec (layer norms fused into the following linear layer);
both map to the same HF names.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

KINDS = ("replicated", "row", "qkv", "fc1", "vocab")
WHERE = ("any", "dense", "moe")
EXPERT = "{e}"

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
HF_LAYER_PREFIX = "model.layers.{i}."


class MappingError(KeyError):
    """A megatron or HF name that the family's table does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Rule:
    """How one megatron parameter relates to HF tensors.

    ``mcore`` is the local-spec name (relative to ``decoder.layers.{i}.`` for layer rules),
    ``te`` the TransformerEngine-spec alias when it differs, ``hf`` the HF names (relative to
    ``model.layers.{i}.`` for layer rules) in fusion order. ``where`` says which layers have the
    parameter (``any``, ``dense``-MLP layers, ``moe`` layers); names containing ``{e}`` are
    per-expert templates.
    """

    mcore: str
    hf: tuple[str, ...]
    kind: str
    te: str | None = None
    where: str = "any"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown rule kind {self.kind!r} (one of {KINDS})")
        if self.where not in WHERE:
            raise ValueError(f"rule {self.mcore}: unknown where {self.where!r} (one of {WHERE})")
        expected = {"qkv": 3, "fc1": 2}.get(self.kind, 1)
        if len(self.hf) != expected:
            raise ValueError(f"rule {self.mcore}: kind {self.kind} needs {expected} HF tensors")


@dataclass(frozen=True)
class Dims:
    """The sizes the mapping needs (a subset of :class:`megacov.models.arch.Arch`)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    tie_word_embeddings: bool


class SliceableTensor(Protocol):
    """A torch tensor or a lazy safetensors slice: has ``shape`` and supports basic slicing."""

    @property
    def shape(self) -> Sequence[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


# Rules shared by every family; the per-family tables add theirs to BASE_LAYER_RULES.
BASE_LAYER_RULES: tuple[Rule, ...] = (
    Rule("input_layernorm.weight", ("input_layernorm.weight",), "replicated",
         te="self_attention.linear_qkv.layer_norm_weight"),
    Rule("self_attention.linear_qkv.weight",
         ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "row"),
    Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicated",
         te="mlp.linear_fc1.layer_norm_weight"),
    Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1", where="dense"),
    Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "row", where="dense"),
)
# Mixture-of-experts layers: the router and one SwiGLU MLP per expert (megatron's SequentialMLP).
MOE_RULES: tuple[Rule, ...] = (
    Rule("mlp.router.weight", ("mlp.gate.weight",), "replicated", where="moe"),
    Rule("mlp.experts.local_experts.{e}.linear_fc1.weight",
         ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), "fc1", where="moe"),
    Rule("mlp.experts.local_experts.{e}.linear_fc2.weight", ("mlp.experts.{e}.down_proj.weight",), "row",
         where="moe"),
)
QKV_BIAS_RULES: tuple[Rule, ...] = (
    Rule("self_attention.linear_qkv.bias",
         ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
)
QK_NORM_RULES: tuple[Rule, ...] = (
    Rule("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "replicated"),
    Rule("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "replicated"),
)
GLOBAL_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab"),
)
TIED_OUTPUT_RULE = Rule("output_layer.weight", ("model.embed_tokens.weight",), "vocab")


@dataclass(frozen=True)
class Resolved:
    """A rule bound to one global name: the HF names are absolute (layer index filled in)."""

    rule: Rule
    hf: tuple[str, ...]
    layer: int | None


_EXPERT_RE = re.compile(r"(?<=\.local_experts\.)(\d+)(?=\.)")


def split_expert(suffix: str) -> tuple[str, int | None]:
    """``mlp.experts.local_experts.5.linear_fc1.weight`` -> (the ``{e}`` template, 5); others unchanged."""
    m = _EXPERT_RE.search(suffix)
    if m is None:
        return suffix, None
    return suffix[:m.start()] + EXPERT + suffix[m.end():], int(m.group(1))


def expand_layer_rules(layer_rules: Sequence[Rule], moe_layer: bool, num_experts: int
                       ) -> list[tuple[str, Rule, tuple[str, ...], tuple[str, ...]]]:
    """The parameters of one layer: ``(mcore suffix, rule, hf suffixes, hf templates)`` per parameter,
    with expert templates expanded over ``range(num_experts)`` in expert order."""
    out = []
    for rule in layer_rules:
        if rule.where == ("dense" if moe_layer else "moe"):
            continue
        if EXPERT not in rule.mcore:
            out.append((rule.mcore, rule, rule.hf, rule.hf))
            continue
        for e in range(num_experts):
            out.append((rule.mcore.replace(EXPERT, str(e)), rule, tuple(h.replace(EXPERT, str(e)) for h in rule.hf),
                        rule.hf))
    return out


def resolve(name: str, layer_rules: Sequence[Rule], dims: Dims) -> Resolved:
    """Find the rule for a *global* megatron name (``decoder.layers.<global index>.…``, global
    expert index for experts)."""
    m = _LAYER_RE.match(name)
    if m:
        layer, suffix = int(m.group(1)), m.group(2)
        template, expert = split_expert(suffix)
        for rule in layer_rules:
            if template in (rule.mcore, rule.te):
                prefix = HF_LAYER_PREFIX.format(i=layer)
                hf = rule.hf if expert is None else tuple(h.replace(EXPERT, str(expert)) for h in rule.hf)
                return Resolved(rule, tuple(prefix + h for h in hf), layer)
        known = ", ".join(r.mcore for r in layer_rules)
        raise MappingError(f"no mapping for megatron parameter '{name}' (layer parameters known: {known})")
    if name == "output_layer.weight" and dims.tie_word_embeddings:
        return Resolved(TIED_OUTPUT_RULE, TIED_OUTPUT_RULE.hf, None)
    for rule in GLOBAL_RULES:
        if name == rule.mcore:
            return Resolved(rule, rule.hf, None)
    raise MappingError(f"no mapping for megatron parameter '{name}'")


# Megatron's sharded (checkpoint) keys stack the decoder layers along a leading axis
# (``decoder.layers.x``), except in models whose layers differ (dense and expert layers mixed), where
# each layer has its own keys (``decoder.layers.<i>.x``). The experts of a SequentialMLP are stacked
# along one more axis under ``mlp.experts.experts.`` (no local index).
CKPT_LAYER_PREFIX = "decoder.layers."
CKPT_EXPERT_INFIX = "mlp.experts.experts."
MODEL_EXPERT_INFIX = "mlp.experts.local_experts.{e}."
_CKPT_FIXED_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class CheckpointKey:
    """What a decoder-layer checkpoint key stacks: ``layer`` is fixed (per-layer keys) or ``None``
    (a leading layer axis); ``expert`` keys have an expert axis after it."""

    layer: int | None
    suffix: str
    expert: bool

    @property
    def lead_axes(self) -> int:
        return (self.layer is None) + self.expert


def parse_checkpoint_key(key: str) -> CheckpointKey:
    m = _CKPT_FIXED_LAYER_RE.match(key)
    layer, suffix = (int(m.group(1)), m.group(2)) if m else (None, key[len(CKPT_LAYER_PREFIX):])
    return CheckpointKey(layer, suffix, suffix.startswith(CKPT_EXPERT_INFIX))


def is_expert_checkpoint_key(key: str) -> bool:
    return parse_checkpoint_key(key).expert


def model_name_of_checkpoint_key(key: str, layer: int, expert: int | None = None) -> str:
    """The global model name of layer ``layer`` (and expert ``expert``) of a decoder-layer checkpoint key."""
    parsed = parse_checkpoint_key(key)
    suffix = parsed.suffix
    if parsed.expert:
        if expert is None:
            raise ValueError(f"{key} is an expert tensor: an expert index is needed")
        suffix = MODEL_EXPERT_INFIX.format(e=expert) + suffix[len(CKPT_EXPERT_INFIX):]
    return f"{CKPT_LAYER_PREFIX}{layer}.{suffix}"


def mcore_names(num_layers: int, layer_rules: Sequence[Rule], dims: Dims) -> list[str]:
    """Every global megatron name of a model, in export order (embedding, layers, norm, head)."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(num_layers):
        names += [f"decoder.layers.{i}.{r.mcore}" for r in layer_rules]
    names.append("decoder.final_layernorm.weight")
    if not dims.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


# ------------------------------------------------------------------------------------------------
# Loading: HF tensors -> this TP rank's shard of a megatron parameter.
# ------------------------------------------------------------------------------------------------


def _chunk(size: int, tp_rank: int, tp: int, what: str) -> tuple[int, int]:
    if size % tp:
        raise ValueError(f"{what} of size {size} is not divisible by tensor-parallel size {tp}")
    step = size // tp
    return tp_rank * step, (tp_rank + 1) * step


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: Dims) -> torch.Tensor:
    """Interleave full (or group-aligned partial) q, k, v into megatron's per-group layout."""
    hd = dims.head_dim
    groups = k.shape[0] // hd
    per_group = dims.num_heads // dims.num_kv_heads
    rest = tuple(q.shape[1:])
    parts = [q.reshape(groups, per_group * hd, *rest), k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest)]
    return torch.cat(parts, dim=1).reshape(groups * (per_group + 2) * hd, *rest)


def split_qkv(fused: torch.Tensor, dims: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv` for a full (all groups) or per-rank (whole groups) tensor."""
    hd = dims.head_dim
    per_group = dims.num_heads // dims.num_kv_heads
    rest = tuple(fused.shape[1:])
    groups = fused.shape[0] // ((per_group + 2) * hd)
    grouped = fused.reshape(groups, (per_group + 2) * hd, *rest)
    q, k, v = torch.split(grouped, [per_group * hd, hd, hd], dim=1)
    return (q.reshape(groups * per_group * hd, *rest), k.reshape(groups * hd, *rest),
            v.reshape(groups * hd, *rest))


def _rows_into(src: SliceableTensor, out: torch.Tensor, start: int) -> None:
    """``out[:] = src[start:start + len(out)]``; a lazy slice that can reads its rows straight into
    ``out``, so a fused tensor is assembled in place instead of read and then concatenated."""
    read_rows_into = getattr(src, "read_rows_into", None)
    if read_rows_into is not None:
        read_rows_into(out, start)
    else:
        out.copy_(src[start:start + out.shape[0]])


def hf_rows_of_shard(name: str, hf: Mapping[str, SliceableTensor], layer_rules: Sequence[Rule], dims: Dims,
                     tp_rank: int = 0, tp: int = 1) -> list[tuple[str | None, int, int]] | None:
    """This TP rank's shard of megatron parameter ``name`` as whole rows of HF tensors, in order.

    Each part is ``(absolute HF name, first row, rows)``, or ``(None, 0, rows)`` for rows of zeros
    (vocabulary padding); stacked, the parts are the shard. A writer that knows where each HF row
    lies on disk can copy the shard's bytes without building it. ``None`` where the shard is not
    made of whole rows: a row-parallel weight split over several TP ranks (a block of columns), a
    scalar. Only the HF tensors' shapes are read.
    """
    res = resolve(name, layer_rules, dims)
    src = [hf[h] for h in res.hf]
    kind = res.rule.kind
    if not src[0].shape or (kind == "row" and tp > 1):
        return None
    if kind in ("replicated", "row"):
        return [(res.hf[0], 0, src[0].shape[0])]
    if kind == "qkv":
        q, k, v = res.hf
        groups = src[1].shape[0] // dims.head_dim
        g0, g1 = _chunk(groups, tp_rank, tp, f"{name}: number of key/value heads")
        hd, qrows = dims.head_dim, (dims.num_heads // dims.num_kv_heads) * dims.head_dim
        parts: list[tuple[str | None, int, int]] = []
        for g in range(g0, g1):  # megatron's per-group [q heads, k head, v head]
            parts += [(q, g * qrows, qrows), (k, g * hd, hd), (v, g * hd, hd)]
        return parts
    if kind == "fc1":
        lo, hi = _chunk(src[0].shape[0], tp_rank, tp, f"{name} ffn size")
        return [(res.hf[0], lo, hi - lo), (res.hf[1], lo, hi - lo)]
    # vocab: zero rows beyond the real vocabulary, then this rank's block of the padded rows.
    lo, hi = _chunk(dims.padded_vocab_size, tp_rank, tp, f"{name} padded vocabulary")
    if src[0].shape[0] != dims.vocab_size:
        raise ValueError(f"{res.hf[0]} has {src[0].shape[0]} rows, config says vocab_size={dims.vocab_size}")
    top = min(hi, dims.vocab_size)
    parts = [(res.hf[0], lo, top - lo)] if top > lo else []
    return parts + ([(None, 0, hi - max(lo, top))] if hi > max(lo, top) else [])


def hf_to_mcore_shard(name: str, hf: Mapping[str, SliceableTensor], layer_rules: Sequence[Rule], dims: Dims,
                      tp_rank: int = 0, tp: int = 1) -> torch.Tensor:
    """This TP rank's shard of megatron parameter ``name`` built from the HF tensors in ``hf``.

    ``hf`` maps absolute HF names to tensors or lazy slices; only the rows/columns of this rank are
    read from it. Returns a new tensor in the HF tensor's dtype; fused tensors (q/k/v, gate/up) are
    filled in place, part by part (:func:`hf_rows_of_shard`), with no concatenation copy.
    """
    parts = hf_rows_of_shard(name, hf, layer_rules, dims, tp_rank, tp)
    res = resolve(name, layer_rules, dims)
    first = hf[res.hf[0]]
    if parts is None:
        if not first.shape:
            return first[:].clone()
        lo, hi = _chunk(first.shape[1], tp_rank, tp, f"{name} input dim")
        return first[:, lo:hi].contiguous()
    rest = tuple(first.shape[1:])
    out = torch.empty((sum(n for _, _, n in parts), *rest), dtype=first[0:0].dtype)
    at = 0
    for h, start, n in parts:
        if h is None:
            out[at:at + n].zero_()
        else:
            _rows_into(hf[h], out[at:at + n], start)
        at += n
    return out


# ------------------------------------------------------------------------------------------------
# Exporting: TP shards -> full megatron tensor -> HF tensors.
# ------------------------------------------------------------------------------------------------


def merge_tp_shards(kind: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full (TP=1) megatron tensor from the shards of every TP rank, in rank order."""
    if kind == "replicated" or len(shards) == 1:
        return shards[0]
    if kind == "row":
        return torch.cat(list(shards), dim=1)
    if kind in ("qkv", "vocab"):
        return torch.cat(list(shards), dim=0)
    if kind == "fc1":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown rule kind {kind!r}")


def split_tp(kind: str, full: torch.Tensor, tp_rank: int, tp: int, dims: Dims) -> torch.Tensor:
    """This rank's shard of a full megatron tensor (the inverse of :func:`merge_tp_shards`)."""
    if kind == "replicated" or tp == 1:
        return full
    if kind == "row":
        lo, hi = _chunk(full.shape[1], tp_rank, tp, "row-parallel input dim")
        return full[:, lo:hi]
    if kind == "fc1":
        gate, up = torch.chunk(full, 2, dim=0)
        lo, hi = _chunk(gate.shape[0], tp_rank, tp, "ffn size")
        return torch.cat([gate[lo:hi], up[lo:hi]], dim=0)
    if kind == "qkv":
        per_group_rows = (dims.num_heads // dims.num_kv_heads + 2) * dims.head_dim
        g0, g1 = _chunk(full.shape[0] // per_group_rows, tp_rank, tp, "number of key/value heads")
        return full[g0 * per_group_rows:g1 * per_group_rows]
    lo, hi = _chunk(full.shape[0], tp_rank, tp, "padded vocabulary")
    return full[lo:hi]


def mcore_to_hf(name: str, full: torch.Tensor, layer_rules: Sequence[Rule], dims: Dims
                ) -> list[tuple[str, torch.Tensor]]:
    """HF ``(name, tensor)`` pairs from one full (TP-gathered) megatron tensor with a global name.

    Fused tensors come back as their parts in HF order (q, k, v / gate, up); vocab padding is
    dropped. The tensors may be views of ``full``.
    """
    res = resolve(name, layer_rules, dims)
    kind = res.rule.kind
    if kind == "qkv":
        return list(zip(res.hf, split_qkv(full, dims)))
    if kind == "fc1":
        return list(zip(res.hf, torch.chunk(full, 2, dim=0)))
    if kind == "vocab":
        if full.shape[0] != dims.padded_vocab_size:
            raise ValueError(f"{name} has {full.shape[0]} rows, expected the padded vocabulary "
                             f"{dims.padded_vocab_size}")
        return [(res.hf[0], full[:dims.vocab_size])]
    return [(res.hf[0], full)]


def mcore_rows_of_hf(name: str, rows: int, layer_rules: Sequence[Rule], dims: Dims
                     ) -> list[tuple[str, list[tuple[int, int]]]]:
    """The HF tensors of full (TP-gathered) megatron parameter ``name`` of ``rows`` rows, each as the
    ``(first row, rows)`` ranges of it that make it up, in HF order: what :func:`mcore_to_hf` returns,
    said as places, so that an exporter can copy the bytes without loading the parameter."""
    res = resolve(name, layer_rules, dims)
    kind = res.rule.kind
    if kind == "qkv":
        hd, qrows = dims.head_dim, (dims.num_heads // dims.num_kv_heads) * dims.head_dim
        per_group = qrows + 2 * hd
        groups = range(rows // per_group)
        return [(res.hf[0], [(g * per_group, qrows) for g in groups]),
                (res.hf[1], [(g * per_group + qrows, hd) for g in groups]),
                (res.hf[2], [(g * per_group + qrows + hd, hd) for g in groups])]
    if kind == "fc1":
        return [(res.hf[0], [(0, rows // 2)]), (res.hf[1], [(rows // 2, rows // 2)])]
    if kind == "vocab":
        return [(res.hf[0], [(0, dims.vocab_size)])]
    return [(res.hf[0], [(0, rows)])]


def hf_to_mcore_full(name: str, hf: Mapping[str, SliceableTensor], layer_rules: Sequence[Rule], dims: Dims
                     ) -> torch.Tensor:
    """The full (TP=1) megatron tensor: :func:`hf_to_mcore_shard` at ``tp=1``."""
    return hf_to_mcore_shard(name, hf, layer_rules, dims, 0, 1)
