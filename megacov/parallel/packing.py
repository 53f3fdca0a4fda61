"""Packing a micro-batch into one row, without padding, for megatron's local attention.

A padded micro-batch computes ``rows x L`` tokens, most of them padding when response lengths are
long-tailed. Packed, its sequences sit end to end in one row of ``sum(token_counts)`` tokens, and
an explicit block-diagonal causal mask keeps each sequence from seeing the others: megatron-core's
local ``DotProductAttention`` applies a given ``attention_mask`` (True = masked) in place of its
own causal mask. Rotary embeddings run over the packed row's positions; attention scores depend
only on the *difference* of the query and key positions, but megatron's angle table (like HF's) is
float32, so angles at other absolute positions round differently: :func:`per_sequence_rotary` hands
the model the table rows of each token's position within its sequence instead, which makes the
packed outputs those of the padded rows up to the order of floating-point sums.

The per-token log-probs and entropies of the packed row are scattered back onto the micro-batch's
[B, L] columns (a differentiable copy), so the loss, the normaliser and the global Clip-Cov / KL-Cov
choice see exactly the tensors of the padded path. Column 0 of each sequence has no prediction
and stays 0, as in the padded kernel output.

TransformerEngine's attention takes ``PackedSeqParams`` (THD) instead of a dense mask; that GPU
branch is not wired here, so packing requires the local layer spec.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megacov.parallel.batch import ActorBatch


@dataclass
class PackedRow:
    input_ids: torch.Tensor
    """[1, T] the micro-batch's sequences end to end (then padding up to T)."""
    position_ids: torch.Tensor
    """[1, T] position within each sequence."""
    attention_mask: torch.Tensor
    """[1, 1, T, T] bool, True where a query must not see a key: block-diagonal causal."""
    source: torch.Tensor
    """[N] int64 packed column of every kept token (each sequence's columns 1..n-1)."""
    dest: torch.Tensor
    """[N] int64 flat index ``row * L + t`` of the same token in the padded micro-batch."""
    shape: tuple[int, int]
    """(B, L) of the padded micro-batch."""

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """[1, T] per-token values -> [B, L] (zeros where nothing was computed); keeps autograd."""
        out = values.new_zeros(self.shape[0] * self.shape[1])
        return out.index_copy(0, self.dest, values.reshape(-1).index_select(0, self.source)).view(self.shape)


@contextlib.contextmanager
def per_sequence_rotary(model: Any, row: PackedRow | None) -> Iterator[None]:
    """While the model runs ``row``, its rotary table has one entry per packed token, taken at the
    token's position within its sequence (what megatron's THD path does from ``cu_seqlens``)."""
    from megacov.models.loader import unwrap

    rope = getattr(unwrap(model), "rotary_pos_emb", None)
    if row is None or rope is None or type(rope).__name__ != "RotaryEmbedding":
        yield
        return
    table = rope.forward
    positions = row.position_ids[0]

    def forward(max_seq_len: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        full = table(int(positions.max()) + 1, *args, **kwargs)  # [S, 1, 1, D]
        return full.index_select(0, positions.to(full.device))

    rope.forward = forward
    try:
        yield
    finally:
        del rope.forward


def packed_length(mb: ActorBatch) -> int:
    """Tokens of ``mb`` once packed (padding rows take none)."""
    return int(mb.token_counts.sum())


def pack(mb: ActorBatch, length: int | None = None) -> PackedRow:
    """``mb`` as one row of its :attr:`~ActorBatch.token_counts` tokens each, padded to ``length``
    (a pipeline needs one shape; default: no padding). Padding tokens form one more causal block."""
    counts = [int(c) for c in mb.token_counts.tolist()]
    total = sum(counts)
    length = total if length is None else length
    if length < total:
        raise ValueError(f"cannot pack {total} tokens into a row of {length}")
    device = mb.input_ids.device
    ids, pos, block = [], [], []
    source, dest = [], []
    start = 0
    for row, n in enumerate(counts):
        if n == 0:
            continue
        ids.append(mb.input_ids[row, :n])
        pos.append(torch.arange(n, device=device))
        block.append(torch.full((n,), row, device=device))
        source.append(torch.arange(start + 1, start + n, device=device))
        dest.append(row * mb.seq_len + torch.arange(1, n, device=device))
        start += n
    if length > total:
        ids.append(torch.zeros(length - total, dtype=torch.int64, device=device))
        pos.append(torch.arange(length - total, device=device))
        block.append(torch.full((length - total,), -1, device=device))
    blocks = torch.cat(block)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    visible = causal & (blocks.unsqueeze(0) == blocks.unsqueeze(1))
    return PackedRow(input_ids=torch.cat(ids).unsqueeze(0), position_ids=torch.cat(pos).unsqueeze(0),
                     attention_mask=(~visible).view(1, 1, length, length),
                     source=torch.cat(source).to(torch.int64), dest=torch.cat(dest).to(torch.int64),
                     shape=(mb.batch_size, mb.seq_len))
